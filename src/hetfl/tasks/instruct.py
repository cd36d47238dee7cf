"""Instruction tuning as a task: batching, loss and evaluation for a causal LM.

A task is what methods and the loop need to know about the data without knowing the method:
how to draw local batches, what the loss is, and how to score a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from hetfl.data.instruct import IGNORE_INDEX, Example, collate, encode_examples, prompt_of
from hetfl.eval.metrics import EVAL_N, exact_match, rouge_l_f1
from hetfl.tasks.base import TaskData, batch_indices

Sample = tuple[list[int], list[int]]  # (input_ids, labels with -100 on the prompt)

PAD_MULTIPLE = 16  # pad batches to a multiple of this many tokens: few distinct shapes -> few FLOP counts


@dataclass
class InstructTask:
    """Causal-LM instruction tuning on (prompt, response) pairs.

    Args:
        tokenizer: the model's tokenizer (pad token set).
        max_len: longest tokenized example kept.
        eval_examples: held-out examples scored by `evaluate` (server side).
        max_new_tokens: cap on the greedy decoding budget (``eval.max_new_tokens``). The budget
            used, `gen_tokens`, is the longest held-out answer in tokens plus its eos, capped by
            this: a model that answers like the references is never cut short, and decoding
            does not run past the longest answer the task has.
        eval_batch_size: prompts decoded together.
    """

    tokenizer: object
    max_len: int
    eval_examples: Sequence[Example]
    max_new_tokens: int = 12
    eval_batch_size: int = 48
    primary_metric: str = "eval_rougeL"

    def __post_init__(self) -> None:
        self.pad_id = self.tokenizer.pad_token_id
        self._eval_encoded = self.encode(self.eval_examples)
        # Reference answer ids (answer + eos) per held-out example, scored teacher-forced.
        self._eval_answers = [[t for t in lab if t != IGNORE_INDEX] for _, lab in self._eval_encoded]
        self.gen_tokens = min(self.max_new_tokens, max((len(a) for a in self._eval_answers), default=1))

    def encode(self, examples: Sequence[Example]) -> list[Sample]:
        return encode_examples(self.tokenizer, list(examples), self.max_len)

    def batches(self, samples: Sequence[Sample], steps: int, batch_size: int,
                gen: torch.Generator) -> Iterator[dict[str, torch.Tensor]]:
        """`steps` padded batches in a seeded epoch-wise order."""
        for idx in batch_indices(len(samples), steps, batch_size, gen):
            yield self.collate([samples[i] for i in idx])

    def collate(self, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
        batch = collate(list(samples), self.pad_id)
        t = batch["input_ids"].shape[1]
        pad = (-t) % PAD_MULTIPLE
        if pad:
            b = batch["input_ids"].shape[0]
            batch["input_ids"] = torch.cat([batch["input_ids"], torch.full((b, pad), self.pad_id)], 1)
            batch["labels"] = torch.cat([batch["labels"], torch.full((b, pad), -100)], 1)
            batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.zeros(b, pad, dtype=torch.long)], 1)
        return batch

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean next-token cross-entropy over response tokens."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # (B, T, V) predicts token t+1 from position t.
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch["labels"][:, 1:].reshape(-1), ignore_index=-100
        )

    def flop_key(self, batch: dict[str, torch.Tensor]) -> tuple:
        return tuple(batch["input_ids"].shape)

    def num_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["input_ids"].numel())

    @torch.no_grad()
    def perplexity(self, model: torch.nn.Module, samples: Sequence[Sample]) -> float:
        """Teacher-forced perplexity of the response tokens of `samples`."""
        nll, ntok = 0.0, 0
        for i in range(0, len(samples), self.eval_batch_size):
            batch = self.collate(samples[i: i + self.eval_batch_size])
            n = int((batch["labels"][:, 1:] != -100).sum())
            nll += float(self.loss(model, batch)) * n
            ntok += n
        return math.exp(nll / max(1, ntok))

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, samples: Sequence[Sample] | None = None) -> dict:
        """Rouge-L F1 and exact match of greedy answers, and response perplexity, on held-out tasks.

        Decoding is batched (left-padded) and shares its prompt pass with the perplexity pass
        (eval/decode.py), so perplexity conditions on the prompt exactly as decoding sees it (cut
        from the left only where prompt plus answer exceed the model's context). Also returns the item count `eval_n` and, per task family (the
        examples' category), `eval_rougeL_by_family` and `eval_n_by_family` (dicts, so summaries
        that keep numeric metrics only skip them). With `samples` (a client's own test split),
        only their perplexity and count are computed.
        """
        from hetfl.eval.decode import greedy_with_nll

        if samples is not None:
            was_training = model.training
            model.eval()
            out = {"eval_ppl": self.perplexity(model, samples), EVAL_N: len(samples)}
            model.train(was_training)
            return out
        prompts = [prompt_of(e, self.tokenizer) for e in self.eval_examples]
        refs = [e.output for e in self.eval_examples]
        preds, nll, ntok = greedy_with_nll(model, self.tokenizer, prompts, self._eval_answers, self.gen_tokens,
                                           self.eval_batch_size)
        rouge = [rouge_l_f1(p, r) for p, r in zip(preds, refs)]
        by_family: dict[str, list[float]] = {}
        for e, r in zip(self.eval_examples, rouge):
            by_family.setdefault(e.category, []).append(r)
        n = max(1, len(refs))
        return {
            "eval_rougeL": 100.0 * sum(rouge) / n,
            "eval_exact_match": 100.0 * sum(exact_match(p, r) for p, r in zip(preds, refs)) / n,
            "eval_ppl": math.exp(nll / max(1, ntok)),
            EVAL_N: len(refs),
            "eval_rougeL_by_family": {f: 100.0 * sum(v) / len(v) for f, v in sorted(by_family.items())},
            "eval_n_by_family": {f: len(v) for f, v in sorted(by_family.items())},
        }


def _instruction_examples(cfg) -> tuple[list[Example], list[Example]]:
    """(train, held-out eval) examples for synth-instruct or a local instruction file."""
    import numpy as np

    from hetfl.data import instruct
    from hetfl.seeding import derive_seed
    from hetfl.errors import ConfigError

    d = cfg.data
    if d.name == "synth-instruct":
        train = instruct.make_synth_instruct(d.samples_per_family, derive_seed(cfg.seed, "data", "train"),
                                             instruct.TRAIN_FAMILIES)
        per_family = -(-d.eval_samples // len(instruct.HELDOUT_FAMILIES))
        held = instruct.make_synth_instruct(per_family, derive_seed(cfg.seed, "data", "eval"),
                                            instruct.HELDOUT_FAMILIES)
        rng = np.random.default_rng(derive_seed(cfg.seed, "data", "eval-pick"))
        return train, [held[i] for i in sorted(rng.permutation(len(held))[: d.eval_samples])]
    rows = _load_rows(d.name, cfg.seed)
    if d.eval_categories:
        missing = set(d.eval_categories) - {r.category for r in rows}
        if missing:
            raise ConfigError(f"data.eval_categories: {sorted(missing)} not found in {d.name}")
        held = [r for r in rows if r.category in d.eval_categories][: d.eval_samples]
        train = [r for r in rows if r.category not in d.eval_categories]
    else:
        rng = np.random.default_rng(derive_seed(cfg.seed, "data", "eval-pick"))
        perm = rng.permutation(len(rows))
        n_eval = min(d.eval_samples, max(1, len(rows) // 5))
        held = [rows[i] for i in sorted(perm[:n_eval])]
        train = [rows[i] for i in sorted(perm[n_eval:])]
    if not train or not held:
        raise ConfigError(f"data.name: {d.name} has too few rows for a train and an eval split")
    return train, held


def _load_rows(name: str, seed: int) -> list:
    """Rows of a local instruction file, or of every Natural Instructions task file in a folder
    (preprocessed as FedHDS does: spec/fedhds.md section 5; the task name is the category)."""
    from pathlib import Path

    from hetfl.data import instruct
    from hetfl.data.natural_instructions import load_ni_tasks
    from hetfl.seeding import derive_seed
    from hetfl.errors import DataError

    folder = Path(name)
    if not folder.is_dir():
        return instruct.load_instruction_file(name)
    files = sorted(folder.glob("*.json"))
    if not files:
        raise DataError(f"{name}: no Natural Instructions task files (*.json) in this folder")
    rows = load_ni_tasks(files, seed=derive_seed(seed, "data", "ni-sample"))
    if not rows:
        raise DataError(f"{name}: every task has fewer than 20 instances with inputs under 1024 characters")
    return rows


def build_instruct(cfg):
    """TaskData for instruction tuning a causal LM (synth-instruct or a local Alpaca/Dolly file)."""
    import numpy as np

    from hetfl.seeding import derive_seed
    from hetfl.models.builders import load_causal_lm

    train, held = _instruction_examples(cfg)
    model, tok = load_causal_lm(cfg.model.name, seed=derive_seed(cfg.seed, "model-init") % 2**31)
    task = InstructTask(tok, cfg.data.max_len, held, cfg.eval.max_new_tokens, cfg.eval.batch_size)
    categories = sorted({e.category for e in train})
    labels = np.array([categories.index(e.category) for e in train])
    return TaskData(model, tok, task, task.encode(train), labels, categories)

