"""Tests for hetfl.models.lora: hand-computed forward/merge, matching, state dicts, PEFT format."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from torch import nn

from hetfl.errors import ConfigError
from hetfl.models import lora
from hetfl.models.lora import LoRALinear

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ---------------------------------------------------------------- hand-computed single layer


def _hand_layer() -> LoRALinear:
    # Dyadic values, so every product and sum below is exact in fp32.
    base = nn.Linear(3, 2)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]]))  # (out=2, in=3)
        base.bias.copy_(torch.tensor([0.25, -0.5]))
    layer = LoRALinear(base, rank=1, alpha=2.0, name="hand")  # scaling = 2 / 1
    with torch.no_grad():
        layer.lora_A.copy_(torch.tensor([[1.0, 2.0, 0.0]]))  # (r=1, in=3)
        layer.lora_B.copy_(torch.tensor([[0.5], [-1.0]]))  # (out=2, r=1)
    return layer


X = torch.tensor([[1.0, 1.0, 2.0], [0.0, -1.0, 0.5]])
# Row 0: Wx+b = [-0.75, 2.0]; A x = 3; 2 * B * 3 = [3, -6]   -> [2.25, -4.0]
# Row 1: Wx+b = [-0.25, -2.5]; A x = -2; 2 * B * -2 = [-2, 4] -> [-2.25, 1.5]
EXPECTED = torch.tensor([[2.25, -4.0], [-2.25, 1.5]])


def test_forward_hand_computed():
    layer = _hand_layer()
    assert layer.scaling == 2.0 and layer.rank == 1
    torch.testing.assert_close(layer(X), EXPECTED, rtol=0, atol=0)
    layer.scaling = 0.5  # callers may change the scaling (FSLoRA)
    # 0.5 * B * (A x): row 0 -> [0.75, -1.5], row 1 -> [-0.5, 1.0]
    torch.testing.assert_close(layer(X), torch.tensor([[0.0, 0.5], [-0.75, -1.5]]), rtol=0, atol=0)


def test_merge_then_unmerge_hand_computed():
    layer = _hand_layer()
    w0 = layer.base.weight.detach().clone()
    unmerged_out = layer(X)
    layer.merge()
    assert layer.merged
    # W + 2 * B @ A = W + [[1, 2, 0], [-2, -4, 0]]
    torch.testing.assert_close(
        layer.base.weight.detach(),
        torch.tensor([[2.0, 2.0, -1.0], [-1.5, -2.0, 0.0]]),
        rtol=0,
        atol=0,
    )
    torch.testing.assert_close(layer(X), unmerged_out, rtol=0, atol=1e-6)
    layer.merge()  # idempotent: a second merge adds nothing
    torch.testing.assert_close(layer(X), unmerged_out, rtol=0, atol=1e-6)
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.base.weight.detach(), w0, rtol=0, atol=1e-7)
    torch.testing.assert_close(layer(X), EXPECTED, rtol=0, atol=0)


def test_merge_unmerge_random_values():
    g = torch.Generator().manual_seed(3)
    layer = LoRALinear(nn.Linear(16, 8), rank=4, alpha=8.0, generator=g)
    with torch.no_grad():
        layer.lora_B.copy_(0.1 * torch.randn(8, 4, generator=g))
    x = torch.randn(5, 16, generator=g)
    w0, y0 = layer.base.weight.detach().clone(), layer(x)
    with lora.merged(layer):
        assert layer.merged
        torch.testing.assert_close(layer(x), y0, rtol=0, atol=1e-6)
    assert not layer.merged
    torch.testing.assert_close(layer.base.weight.detach(), w0, rtol=0, atol=1e-7)


def test_set_rank_while_merged_raises():
    layer = _hand_layer()
    layer.merge()
    with pytest.raises(RuntimeError, match="unmerge first"):
        layer.set_rank(2)


def test_init_matches_peft_defaults_and_generator():
    def make(seed: int) -> LoRALinear:
        return LoRALinear(nn.Linear(25, 10), rank=3, alpha=6.0, generator=_gen(seed))

    layer = make(7)
    assert layer.lora_A.shape == (3, 25) and layer.lora_B.shape == (10, 3)
    assert torch.all(layer.lora_B == 0)
    # kaiming_uniform_(a=sqrt(5)) on (r, in) draws from U(-1/sqrt(in), 1/sqrt(in)) = U(-0.2, 0.2)
    assert layer.lora_A.abs().max() <= 0.2 and layer.lora_A.abs().max() > 0.1
    same, other = make(7), make(8)
    assert torch.equal(layer.lora_A, same.lora_A)
    assert not torch.equal(layer.lora_A, other.lora_A)
    assert not layer.base.weight.requires_grad and layer.lora_A.requires_grad


def test_set_rank_changes_shapes_and_scaling():
    layer = LoRALinear(nn.Linear(6, 4), rank=2, alpha=4.0)
    assert layer.scaling == 2.0
    layer.set_rank(4, generator=torch.Generator().manual_seed(1))
    assert layer.rank == 4
    assert layer.lora_A.shape == (4, 6) and layer.lora_B.shape == (4, 4)
    assert layer.scaling == 1.0  # reset to alpha / new rank
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), layer.base(x), rtol=0, atol=0)  # B = 0 after re-init
    with pytest.raises(ConfigError, match=r"rank 5 is larger than layer <unnamed> \(6 x 4\)"):
        layer.set_rank(5)
    with pytest.raises(ConfigError, match="at least 1"):
        layer.set_rank(0)


def test_dropout_only_on_lora_path():
    layer = _hand_layer()
    layer.lora_dropout = nn.Dropout(1.0)  # drops every LoRA input in training mode
    layer.train()
    torch.testing.assert_close(layer(X), layer.base(X), rtol=0, atol=0)
    layer.eval()
    torch.testing.assert_close(layer(X), EXPECTED, rtol=0, atol=0)


# ---------------------------------------------------------------- target matching on a toy model


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(8, 8)
        self.v_proj = nn.Linear(8, 4)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))

    def forward(self, x):  # (n, 8) -> (n, 8)
        return x + self.mlp(self.q_proj(x)) + self.v_proj(x).repeat(1, 2)


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.layers = nn.ModuleList([_Block(), _Block()])
        self.head = nn.Linear(8, 5)

    def forward(self, ids):  # (n,) -> (n, 5)
        h = self.emb(ids)
        for block in self.layers:
            h = block(h)
        return self.head(h)


def _toy(seed: int = 0) -> _Toy:
    torch.manual_seed(seed)
    return _Toy()


MLP = ["layers.0.mlp.0", "layers.0.mlp.2", "layers.1.mlp.0", "layers.1.mlp.2"]
MATCH_CASES = [
    # (targets, regex, exclude, expected names)
    (("q_proj",), None, (), ["layers.0.q_proj", "layers.1.q_proj"]),  # suffix
    (("layers.1.q_proj",), None, (), ["layers.1.q_proj"]),  # dotted suffix
    (("head",), None, (), ["head"]),  # exact
    ((), r"layers\.\d+\.mlp\.\d+", (), MLP),  # regex
    (
        ("q_proj", "v_proj"),
        None,
        ("layers.0.v_proj",),
        ["layers.0.q_proj", "layers.1.q_proj", "layers.1.v_proj"],
    ),  # exclude by name
    ((), r".*", ("mlp.0", "mlp.2", "q_proj"), ["layers.0.v_proj", "layers.1.v_proj", "head"]),
    (("head",), r"layers\.0\..*_proj", (), ["layers.0.q_proj", "layers.0.v_proj", "head"]),  # union
]


@pytest.mark.parametrize("targets,regex,exclude,expected", MATCH_CASES)
def test_find_target_modules(targets, regex, exclude, expected):
    assert lora.find_target_modules(_toy(), targets, regex, exclude) == expected


NO_MATCH_CASES = [
    (("proj",), None, ()),  # a suffix must start at a "." boundary
    (("emb",), None, ()),  # only nn.Linear can be adapted
    ((), r"mlp", ()),  # regex must match the whole name
    (("q_proj",), None, ("q_proj",)),  # everything excluded
]


@pytest.mark.parametrize("targets,regex,exclude", NO_MATCH_CASES)
def test_find_target_modules_no_match(targets, regex, exclude):
    with pytest.raises(ConfigError, match="lora.targets: no module matches"):
        lora.find_target_modules(_toy(), targets, regex, exclude)


def test_rank_too_large_names_module():
    msg = r"lora.rank: rank 5 is larger than layer layers.0.v_proj \(8 x 4\)"
    with pytest.raises(ConfigError, match=msg):
        lora.inject_lora(_toy(), rank=5, alpha=5.0, targets=("v_proj",))


def test_rank_override_without_match_raises():
    with pytest.raises(ConfigError, match="lora.rank_overrides: 'k_proj'"):
        lora.inject_lora(
            _toy(), rank=2, alpha=2.0, targets=("q_proj",), rank_overrides={"k_proj": 1}
        )


# ---------------------------------------------------------------- injection, freezing, counts


def test_inject_freezes_all_but_lora_and_counts():
    model = _toy()
    names = lora.inject_lora(model, rank=2, alpha=4.0, targets=("q_proj", "v_proj"))
    assert names == ["layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj", "layers.1.v_proj"]
    assert list(lora.lora_modules(model)) == names
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}" for n in names for ab in "AB"}
    # r * (in + out): q_proj 2 * (8 + 8) = 32, v_proj 2 * (8 + 4) = 24; two blocks -> 112
    assert lora.count_trainable(model) == 112
    # Injection keeps the function: B = 0, so outputs equal the un-adapted model's.
    ids = torch.arange(6)
    torch.testing.assert_close(model(ids), _toy()(ids), rtol=0, atol=0)
    # A second injection finds nothing new to adapt (LoRA internals are never matched).
    with pytest.raises(ConfigError):
        lora.inject_lora(model, rank=2, alpha=4.0, targets=("q_proj",))


def test_rank_overrides_longest_pattern_wins():
    model = _toy()
    lora.inject_lora(
        model,
        rank=2,
        alpha=4.0,
        targets=("q_proj", "v_proj"),
        rank_overrides={"v_proj": 3, "layers.1.v_proj": 1},
    )
    ranks = {n: m.rank for n, m in lora.lora_modules(model).items()}
    assert ranks == {
        "layers.0.q_proj": 2,
        "layers.0.v_proj": 3,
        "layers.1.q_proj": 2,
        "layers.1.v_proj": 1,
    }
    assert lora.lora_modules(model)["layers.0.v_proj"].scaling == pytest.approx(4.0 / 3)
    # 2*16 + 3*12 + 2*16 + 1*12 = 112
    assert lora.count_trainable(model) == 112


def test_injection_is_deterministic_given_generator():
    m1, m2 = _toy(), _toy()
    lora.inject_lora(m1, rank=2, alpha=2.0, targets=("q_proj",), generator=_gen(5))
    lora.inject_lora(m2, rank=2, alpha=2.0, targets=("q_proj",), generator=_gen(5))
    for (k, a), (_, b) in zip(lora.lora_state_dict(m1).items(), lora.lora_state_dict(m2).items()):
        assert torch.equal(a, b), k
    a0, a1 = m1.layers[0].q_proj.lora_A, m1.layers[1].q_proj.lora_A
    assert not torch.equal(a0, a1)  # one generator, consumed in order: layers differ


# ---------------------------------------------------------------- state dicts


def _randomize_b(model: nn.Module, seed: int = 11) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora.lora_modules(model).values():
            m.lora_B.copy_(0.5 * torch.randn(m.lora_B.shape, generator=g))


def test_state_dict_round_trip():
    src = _toy()
    lora.inject_lora(src, rank=2, alpha=4.0, targets=("q_proj", "v_proj"), generator=_gen(1))
    _randomize_b(src)
    state = lora.lora_state_dict(src)
    mods = [f"layers.{i}.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    assert sorted(state) == sorted(f"{m}.lora_{ab}" for m in mods for ab in "AB")
    assert all("lora_" in k and not t.requires_grad for k, t in state.items())
    # Detached views, not copies: they share storage with the parameters.
    assert state["layers.0.q_proj.lora_A"].data_ptr() == src.layers[0].q_proj.lora_A.data_ptr()

    dst = _toy()
    lora.inject_lora(dst, rank=2, alpha=4.0, targets=("q_proj", "v_proj"), generator=_gen(2))
    ids = torch.arange(7)
    assert not torch.allclose(dst(ids), src(ids))
    lora.load_lora_state_dict(dst, state)
    torch.testing.assert_close(dst(ids), src(ids), rtol=0, atol=0)


def test_load_state_dict_resizes_rank():
    src = _toy()
    lora.inject_lora(src, rank=3, alpha=6.0, targets=("q_proj",))
    _randomize_b(src)
    dst = _toy()
    lora.inject_lora(dst, rank=1, alpha=6.0, targets=("q_proj",))
    lora.load_lora_state_dict(dst, lora.lora_state_dict(src))
    assert all(m.rank == 3 and m.scaling == 2.0 for m in lora.lora_modules(dst).values())
    ids = torch.arange(4)
    torch.testing.assert_close(dst(ids), src(ids), rtol=0, atol=0)


def test_load_state_dict_errors_name_the_key():
    model = _toy()
    lora.inject_lora(model, rank=2, alpha=2.0, targets=("q_proj",))
    state = {k: v.clone() for k, v in lora.lora_state_dict(model).items()}
    bad = dict(state, **{"layers.1.q_proj.lora_A": torch.zeros(2, 7)})  # in_features is 8
    with pytest.raises(ConfigError, match=r"layers\.1\.q_proj\.lora_A \(2, 7\)"):
        lora.load_lora_state_dict(model, bad)
    missing = {k: v for k, v in state.items() if not k.startswith("layers.0.")}
    with pytest.raises(ConfigError, match=r"missing keys \['layers.0.q_proj.lora_A'"):
        lora.load_lora_state_dict(model, missing)
    lora.load_lora_state_dict(model, missing, strict=False)  # non-strict: partial load is fine
    with pytest.raises(ConfigError, match="unexpected keys"):
        lora.load_lora_state_dict(model, dict(state, **{"head.lora_A": torch.zeros(1, 8)}))


def test_merge_lora_whole_model():
    model = _toy()
    lora.inject_lora(model, rank=2, alpha=4.0, targets=("q_proj", "v_proj"))
    _randomize_b(model)
    ids = torch.arange(5)
    y0 = model(ids)
    lora.merge_lora(model)
    assert all(m.merged for m in lora.lora_modules(model).values())
    torch.testing.assert_close(model(ids), y0, rtol=0, atol=1e-5)
    lora.unmerge_lora(model)
    torch.testing.assert_close(model(ids), y0, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- PEFT format


def _tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )


@pytest.fixture(scope="module")
def llama_base():
    """A tiny Llama's config and state dict (fixed seed); each test builds fresh copies from it."""
    pytest.importorskip("transformers")
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = _tiny_llama_config()
    model = LlamaForCausalLM(cfg)
    return cfg, {k: v.clone() for k, v in model.state_dict().items()}


def _fresh_llama(llama_base):
    from transformers import LlamaForCausalLM

    cfg, state = llama_base
    model = LlamaForCausalLM(cfg)
    model.load_state_dict(state)
    return model.eval()


IDS = torch.tensor([[1, 5, 9, 33, 2, 63, 17, 8], [4, 4, 40, 0, 12, 7, 60, 3]])  # (batch=2, seq=8)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits  # (2, 8, vocab)


def _peft_logits(llama_base, path):
    peft = pytest.importorskip("peft")
    model = peft.PeftModel.from_pretrained(_fresh_llama(llama_base), str(path)).eval()
    return model, _logits(model)


def test_peft_round_trip_uniform_rank(llama_base, tmp_path):
    ours = _fresh_llama(llama_base)
    names = lora.inject_lora(ours, rank=4, alpha=8.0, targets=("q_proj", "v_proj"))
    assert len(names) == 4
    _randomize_b(ours)
    ref = _logits(ours)
    assert not torch.allclose(ref, _logits(_fresh_llama(llama_base)), atol=1e-3)  # adapter matters

    lora.save_peft_adapter(ours, tmp_path, base_model_name_or_path="tiny-llama", alpha=8.0)
    text = (tmp_path / "adapter_config.json").read_text()
    cfg = json.loads(text)
    assert list(cfg) == sorted(cfg)
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
    assert cfg["target_modules"] == ["q_proj", "v_proj"]
    assert cfg["rank_pattern"] == {} and cfg["alpha_pattern"] == {}
    assert cfg["bias"] == "none" and cfg["fan_in_fan_out"] is False and cfg["use_rslora"] is False

    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert len(keys) == 8

    _, theirs = _peft_logits(llama_base, tmp_path)
    torch.testing.assert_close(theirs, ref, rtol=0, atol=1e-5)

    # And back into our own layers, on a plain base model.
    back = _fresh_llama(llama_base)
    assert lora.load_peft_adapter(back, tmp_path) == names
    torch.testing.assert_close(_logits(back), ref, rtol=0, atol=1e-5)
    assert lora.count_trainable(back) == 2 * (4 * (32 + 32) + 4 * (32 + 16))


def test_peft_round_trip_heterogeneous_ranks(llama_base, tmp_path):
    ours = _fresh_llama(llama_base)
    lora.inject_lora(
        ours,
        rank=4,
        alpha=8.0,
        targets=("q_proj", "v_proj"),
        rank_overrides={"layers.1.self_attn.q_proj": 2, "v_proj": 3},
    )
    _randomize_b(ours)
    # A changed scaling must survive the round trip (through alpha_pattern).
    ours.model.layers[0].self_attn.v_proj.scaling = 0.75
    ref = _logits(ours)

    lora.save_peft_adapter(ours, tmp_path, base_model_name_or_path="tiny-llama", alpha=8.0)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 3  # most common rank
    attn = "model.layers.{}.self_attn.{}"
    assert cfg["rank_pattern"] == {attn.format(0, "q_proj"): 4, attn.format(1, "q_proj"): 2}
    # effective alpha = scaling * rank = 0.75 * 3
    assert cfg["alpha_pattern"] == {attn.format(0, "v_proj"): pytest.approx(2.25)}

    peft_model, theirs = _peft_logits(llama_base, tmp_path)
    torch.testing.assert_close(theirs, ref, rtol=0, atol=1e-5)
    attn = peft_model.base_model.model.model.layers
    assert attn[0].self_attn.q_proj.r["default"] == 4
    assert attn[1].self_attn.q_proj.r["default"] == 2
    assert attn[1].self_attn.v_proj.r["default"] == 3

    # Our loader into a model already injected at other ranks: layers are resized to match.
    back = _fresh_llama(llama_base)
    lora.inject_lora(back, rank=1, alpha=1.0, targets=("q_proj", "v_proj"))
    lora.load_peft_adapter(back, tmp_path)
    ranks = [m.rank for m in lora.lora_modules(back).values()]
    assert ranks == [4, 3, 2, 3]
    torch.testing.assert_close(_logits(back), ref, rtol=0, atol=1e-5)


def test_load_adapter_written_by_peft(llama_base, tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(
        r=2, lora_alpha=6, target_modules=["k_proj", "o_proj"], rank_pattern={"o_proj": 3}
    )
    peft_model = peft.get_peft_model(_fresh_llama(llama_base), config).eval()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    ref = _logits(peft_model)
    peft_model.save_pretrained(str(tmp_path))

    ours = _fresh_llama(llama_base)
    names = lora.load_peft_adapter(ours, tmp_path)
    assert names == [
        f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("k_proj", "o_proj")
    ]
    assert [lora.lora_modules(ours)[n].rank for n in names] == [2, 3, 2, 3]
    assert lora.lora_modules(ours)[names[1]].scaling == pytest.approx(6 / 3)
    torch.testing.assert_close(_logits(ours), ref, rtol=0, atol=1e-5)


def test_load_peft_adapter_missing_file(tmp_path):
    from hetfl.errors import DataError

    with pytest.raises(DataError, match="adapter_config.json: file not found"):
        lora.load_peft_adapter(_toy(), tmp_path)


def test_save_without_lora_raises(tmp_path):
    with pytest.raises(ConfigError, match="no LoRA layers"):
        lora.save_peft_adapter(_toy(), tmp_path, base_model_name_or_path="x", alpha=1.0)


def test_condensed_targets_fall_back_to_full_names(tmp_path):
    # Only layer 1's q_proj is adapted, so the suffix "q_proj" would over-match in PEFT.
    model = _toy()
    lora.inject_lora(model, rank=2, alpha=2.0, targets=("layers.1.q_proj",))
    lora.save_peft_adapter(model, tmp_path, base_model_name_or_path="x", alpha=2.0)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["layers.1.q_proj"]
    assert math.isclose(cfg["lora_alpha"], 2.0)
