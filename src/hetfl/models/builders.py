"""Language models by name: the shipped offline `tiny-llama` and `tiny-llama-large`, a random twin,
or a local HF folder.

`tiny-llama` is a ~3.7M-parameter LlamaForCausalLM plus a 2048-token byte-level BPE tokenizer,
pretrained on Shakespeare and generated plain text by `scripts/pretrain_lm.py` (its exact args and
per-step losses are in `assets/tiny-llama/pretrain_log.json`). `tiny-llama-large` is the wider and
deeper sibling (~11M parameters, hidden 384, 6 layers) from the same script, corpus and tokenizer,
stored in float16 to keep the package small and loaded as float32. Nothing here touches the network.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch

from hetfl.errors import ConfigError

ASSET_DIR = Path(__file__).resolve().parent / "assets"
TINY_LLAMA_DIR = ASSET_DIR / "tiny-llama"
TINY_LLAMA_LARGE_DIR = ASSET_DIR / "tiny-llama-large"
SHIPPED_MODELS: tuple[str, ...] = ("tiny-llama", "tiny-llama-large", "tiny-llama-random")


def _prepare_tokenizer(tokenizer):
    # Batched generation needs a pad token and left padding (new tokens follow the last real one).
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"  # a too-long prompt loses its start, never the question
    return tokenizer


def _load_folder(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        # float32 whatever the storage dtype: training and evaluation run on a CPU.
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.name: cannot load a causal LM from '{path}': {e}") from None
    model.eval()
    return model, _prepare_tokenizer(tokenizer)


def load_causal_lm(name: str, *, seed: int = 0) -> tuple[torch.nn.Module, object]:
    """Build a causal language model and its tokenizer, offline.

    Args:
        name: ``"tiny-llama"`` or ``"tiny-llama-large"`` (shipped pretrained checkpoints),
            ``"tiny-llama-random"`` (tiny-llama's architecture and tokenizer, random init) or a
            path to a local Hugging Face folder.
        seed: initialisation seed for ``"tiny-llama-random"`` (the global torch RNG is untouched).

    Returns:
        ``(model, tokenizer)``; the model is in eval mode, the tokenizer has a pad token and pads
        on the left (ready for ``generate_greedy``).

    Raises:
        ConfigError: unknown name, or a folder that does not hold a causal LM.
    """
    if name == "tiny-llama":
        return _load_folder(TINY_LLAMA_DIR)
    if name == "tiny-llama-large":
        return _load_folder(TINY_LLAMA_LARGE_DIR)
    if name == "tiny-llama-random":
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        config = LlamaConfig.from_pretrained(TINY_LLAMA_DIR, local_files_only=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
        model.eval()
        tokenizer = AutoTokenizer.from_pretrained(TINY_LLAMA_DIR, local_files_only=True)
        return model, _prepare_tokenizer(tokenizer)
    path = Path(name).expanduser()
    if path.is_dir():
        return _load_folder(path)
    raise ConfigError(
        f"model.name: unknown model '{name}' (shipped: {', '.join(SHIPPED_MODELS)}; "
        "or a path to a local Hugging Face folder)"
    )


@contextmanager
def _eval_mode(model: torch.nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def generate_greedy(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy-decode each prompt, stopping at eos; returns only the new text, stripped.

    Prompts are left-padded in batches of ``batch_size`` and left-truncated so that prompt plus
    answer fit the model's context.
    """
    if not prompts:
        return []
    old_side, old_trunc = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ctx = getattr(model.config, "max_position_embeddings", None) or 2048
    outputs: list[str] = []
    try:
        with _eval_mode(model):
            for i in range(0, len(prompts), batch_size):
                enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True,
                                truncation=True, max_length=max(1, ctx - max_new_tokens))
                gen = model.generate(
                    input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                    max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id,
                )  # (B, T_prompt + T_new)
                new = gen[:, enc["input_ids"].shape[1]:]
                outputs += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = old_side, old_trunc
    return outputs
