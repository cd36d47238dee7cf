"""The shipped tiny-llama, model loading by name/path, greedy generation, and pretraining reproducibility."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hetfl.errors import ConfigError
from hetfl.models.builders import (
    TINY_LLAMA_DIR,
    TINY_LLAMA_LARGE_DIR,
    from_int8_rows,
    generate_greedy,
    load_causal_lm,
    to_int8_rows,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "pretrain_lm.py"
LOG = json.loads((TINY_LLAMA_DIR / "pretrain_log.json").read_text())
LOG_LARGE = json.loads((TINY_LLAMA_LARGE_DIR / "pretrain_log.json").read_text())


def _script():
    spec = importlib.util.spec_from_file_location("pretrain_lm", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def shipped():
    torch.set_num_threads(1)
    return load_causal_lm("tiny-llama")


def test_shipped_assets_small_and_complete():
    names = {p.name for p in TINY_LLAMA_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "pretrain_log.json"} <= names
    assert sum(p.stat().st_size for p in TINY_LLAMA_DIR.iterdir()) < 20 * 2**20


def test_shipped_model_architecture(shipped):
    model, tok = shipped
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == LOG["n_params"] == 3_688_704
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    assert {"q_proj", "k_proj", "v_proj", "o_proj"} <= names  # LoRA targets
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.padding_side) == ("<pad>", "<s>", "</s>", "left")
    assert len(tok) == 2048
    # Digits are single tokens.
    ids = tok("x 2024", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids)[-4:] == ["2", "0", "2", "4"]


def test_shipped_perplexity_far_below_random(shipped):
    mod = _script()
    model, tok = shipped
    args = LOG["args"]
    streams = [mod.encode_docs(tok, [d]) for d in mod.heldout_documents(args["seed"], args["gen_sentences"])]
    ppl = mod.stream_ppl(model, streams, args["seq_len"], windows=8)
    rnd, _ = load_causal_lm("tiny-llama-random", seed=0)
    ppl_rnd = mod.stream_ppl(rnd, streams, args["seq_len"], windows=8)
    # A random init is near uniform over 2048 tokens (ppl ~2000); the shipped model is recorded at
    # ~20 on the full held-out slice. Loose bounds: pretraining must cut ppl by far more than 2x.
    assert ppl_rnd > 1000
    assert ppl < 0.05 * ppl_rnd
    assert ppl < 60
    assert LOG["heldout_ppl"]["final"] < 0.5 * LOG["heldout_ppl"]["random_init"]


def test_large_model_is_larger_and_better(shipped):
    """tiny-llama-large: same tokenizer, ~3x the parameters, stored as int8 rows, lower held-out ppl."""
    names = {p.name for p in TINY_LLAMA_LARGE_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "pretrain_log.json"} <= names
    assert sum(p.stat().st_size for p in TINY_LLAMA_LARGE_DIR.iterdir()) < 12 * 2**20
    torch.set_num_threads(1)
    large, tok_l = load_causal_lm("tiny-llama-large")
    small, tok_s = shipped
    assert next(large.parameters()).dtype == torch.float32  # stored as int8 rows, loaded as float32
    n = sum(p.numel() for p in large.parameters())
    assert n == LOG_LARGE["n_params"] and n > 2.5 * LOG["n_params"]
    assert (large.config.hidden_size, large.config.num_hidden_layers) == (384, 6)
    assert tok_l.get_vocab() == tok_s.get_vocab()  # one tokenizer: proxies and features line up
    mod = _script()
    args = LOG["args"]
    streams = [mod.encode_docs(tok_s, [d]) for d in mod.heldout_documents(args["seed"], args["gen_sentences"])]
    ppl_small = mod.stream_ppl(small, streams, args["seq_len"], windows=8)
    ppl_large = mod.stream_ppl(large, streams, args["seq_len"], windows=8)
    assert ppl_large < 0.97 * ppl_small  # measured: 13.1 vs 13.8 on these 8 windows per source
    assert LOG_LARGE["heldout_ppl"]["final"] < LOG["heldout_ppl"]["final"]


def test_int8_rows_round_trip_by_hand():
    w = torch.tensor([[1.0, -0.5, 0.25], [0.0, 0.0, 0.0], [-254.0, 127.0, 1.0]])  # (3, 3)
    stored = to_int8_rows({"w": w, "norm": torch.tensor([1.0, 1 / 3])})
    # Row scales absmax/127 in float16: 1/127, 0 (an all-zero row), 2.
    assert stored["w.int8_scale"].dtype == torch.float16
    assert stored["w.int8_scale"].tolist() == [torch.tensor(1 / 127, dtype=torch.float16).item(), 0.0, 2.0]
    assert stored["w"].dtype == torch.int8
    assert stored["w"].tolist() == [[127, -64, 32], [0, 0, 0], [-127, 64, 0]]  # round(w / scale), half to even
    assert stored["norm"].dtype == torch.float16
    back = from_int8_rows(stored)
    assert set(back) == {"w", "norm"} and back["w"].dtype == torch.float32
    s0 = torch.tensor(1 / 127, dtype=torch.float16).float()
    assert torch.equal(back["w"][0], torch.tensor([127.0, -64.0, 32.0]) * s0)
    assert back["w"][2].tolist() == [-254.0, 128.0, 0.0] and back["w"][1].tolist() == [0.0, 0.0, 0.0]


def test_random_variant_is_seeded_and_leaves_global_rng():
    state = torch.random.get_rng_state()
    a, _ = load_causal_lm("tiny-llama-random", seed=1)
    b, _ = load_causal_lm("tiny-llama-random", seed=1)
    c, _ = load_causal_lm("tiny-llama-random", seed=2)
    assert torch.equal(torch.random.get_rng_state(), state)
    wa, wb, wc = (m.model.layers[0].self_attn.q_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_local_folder_loads(tmp_path, shipped):
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tok = shipped
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    tok.pad_token = None  # the loader must supply one
    try:
        tok.save_pretrained(tmp_path)
    finally:
        tok.pad_token = "<pad>"
    model, tok2 = load_causal_lm(str(tmp_path))
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.hidden_size == 16
    assert tok2.pad_token == "</s>" and tok2.padding_side == "left"
    out = generate_greedy(model, tok2, ["a", "bb cc"], max_new_tokens=3)
    assert len(out) == 2 and all(isinstance(s, str) for s in out)


def test_unknown_name_is_config_error(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_causal_lm("gpt-17")
    assert str(e.value) == ("model.name: unknown model 'gpt-17' (shipped: tiny-llama, tiny-llama-large, tiny-llama-random; "
                            "optional: smollm2-135m; or a path to a local Hugging Face folder)")
    with pytest.raises(ConfigError, match="cannot load a causal LM"):
        load_causal_lm(str(tmp_path))  # an empty folder


def test_generate_greedy_batched_equals_one_by_one(shipped):
    model, tok = shipped
    prompts = ["ROMEO:\n", "The numbers were 3, 8, 1. The largest was", "Spelled backwards, cat becomes"]
    batched = generate_greedy(model, tok, prompts, max_new_tokens=6, batch_size=3)
    single = [generate_greedy(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single
    assert all(isinstance(s, str) for s in batched)
    # Manual greedy loop for the last prompt: the same text.
    ids = tok(prompts[2], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        for _ in range(6):
            nxt = model(input_ids=ids).logits[0, -1].argmax()
            if nxt.item() == tok.eos_token_id:
                break
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    n_prompt = tok(prompts[2], return_tensors="pt")["input_ids"].shape[1]
    assert tok.decode(ids[0, n_prompt:], skip_special_tokens=True).strip() == single[2]


@pytest.mark.parametrize("log", [LOG, LOG_LARGE], ids=["tiny-llama", "tiny-llama-large"])
def test_pretraining_reproduces_shipped_losses(tmp_path, log):
    """Rerun the first steps of scripts/pretrain_lm.py with the shipped args: the same losses."""
    args = dict(log["args"])
    # One thread instead of the shipped two: on this CPU the losses are bit-identical either way
    # (checked), and one thread is several times faster when other processes share the cores.
    args["threads"] = 1
    n = 2
    cmd = [sys.executable, str(SCRIPT), "--out", str(tmp_path), "--max-steps", str(n)]
    for k, v in args.items():
        if k != "max_steps" and v is not None:
            cmd += ["--" + k.replace("_", "-"), str(v)]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=300)
    new = json.loads((tmp_path / "pretrain_log.json").read_text())
    assert new["train_tokens"] == log["train_tokens"]
    assert new["n_params"] == log["n_params"]
    assert new["heldout_ppl"]["random_init"] == pytest.approx(log["heldout_ppl"]["random_init"], rel=1e-5)
    assert len(new["loss"]) == n
    assert new["loss"] == pytest.approx(log["loss"][:n], abs=1e-4)
    # Checkpoints pretrained with instruction examples (--instruct-fraction) rebuild the same stream.
    assert new.get("instruct_tokens") == log.get("instruct_tokens")
    if "heldout_ppl_instruct" in log:
        assert new["heldout_ppl_instruct"]["random_init"] == pytest.approx(
            log["heldout_ppl_instruct"]["random_init"], rel=1e-5)
    # The tokenizer is rebuilt from scratch and must match the shipped one exactly.
    assert json.loads((tmp_path / "tokenizer.json").read_text())["model"] == \
        json.loads((TINY_LLAMA_DIR / "tokenizer.json").read_text())["model"]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-llama-large"])
def test_shipped_model_follows_the_prompt_format(name):
    """Checkpoints pretrained with instruction examples answer unseen pretraining-family prompts.

    The examples are drawn with a seed pretraining never used (its streams use seed and
    seed + 1_000_003), in hetfl's fine-tuning prompt; greedy answers are compared exactly.
    """
    from hetfl.data.instruct import prompt_of
    from hetfl.data.pretrain_families import make_pretrain_instruct

    log = LOG if name == "tiny-llama" else LOG_LARGE
    if not log["args"].get("instruct_fraction"):
        pytest.skip("text-only checkpoint: it has not seen the prompt format")
    torch.set_num_threads(1)
    model, tok = load_causal_lm(name)
    exs = make_pretrain_instruct(72, seed=12345)
    preds = generate_greedy(model, tok, [prompt_of(e) for e in exs], max_new_tokens=16, batch_size=24)
    exact = sum(p.strip() == e.output for p, e in zip(preds, exs)) / len(exs)
    # Measured: tiny-llama and tiny-llama-large 14/72 exact each, every answer at most 6 words;
    # the text-only tiny-llama answered 0/72, continuing with Shakespeare verse up to the budget.
    assert exact > 0.1, exact
    assert max(len(p.split()) for p in preds) <= 8
