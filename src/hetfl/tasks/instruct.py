"""Instruction tuning as a task: batching, loss and evaluation for a causal LM.

A task is what methods and the loop need to know about the data without knowing the method:
how to draw local batches, what the loss is, and how to score a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from hetfl.data.instruct import Example, collate, encode_examples, prompt_of
from hetfl.eval.metrics import exact_match, mean_rouge_l
from hetfl.tasks.base import batch_indices

Sample = tuple[list[int], list[int]]  # (input_ids, labels with -100 on the prompt)

PAD_MULTIPLE = 16  # pad batches to a multiple of this many tokens: few distinct shapes -> few FLOP counts


@dataclass
class InstructTask:
    """Causal-LM instruction tuning on (prompt, response) pairs.

    Args:
        tokenizer: the model's tokenizer (pad token set).
        max_len: longest tokenized example kept.
        eval_examples: held-out examples scored by `evaluate` (server side).
        max_new_tokens: greedy decoding budget during evaluation.
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
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Rouge-L F1 and exact match of greedy answers, and response perplexity, on held-out tasks."""
        from hetfl.models.builders import generate_greedy

        was_training = model.training
        model.eval()
        prompts = [prompt_of(e) for e in self.eval_examples]
        refs = [e.output for e in self.eval_examples]
        preds = generate_greedy(model, self.tokenizer, prompts, self.max_new_tokens, self.eval_batch_size)
        nll, ntok = 0.0, 0
        for i in range(0, len(self._eval_encoded), self.eval_batch_size):
            batch = self.collate(self._eval_encoded[i: i + self.eval_batch_size])
            n = int((batch["labels"][:, 1:] != -100).sum())
            nll += float(self.loss(model, batch)) * n
            ntok += n
        model.train(was_training)
        return {
            "eval_rougeL": 100.0 * mean_rouge_l(preds, refs),
            "eval_exact_match": 100.0 * sum(exact_match(p, r) for p, r in zip(preds, refs)) / max(1, len(refs)),
            "eval_ppl": math.exp(nll / max(1, ntok)),
        }
