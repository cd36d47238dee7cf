"""Quantizing codecs (sq/rq, per tensor and per group), per-kind and per-client codecs on the Link."""

import math

import pytest
import torch
from toy import toy_config, toy_scenario

from hetfl.comm.codecs import UniformQuantizer, make_codec, quant_error_bound, quant_nbytes
from hetfl.config import load_config
from hetfl.engine.api import Message
from hetfl.seeding import generator
from hetfl.engine.link import DOWN, UP, Ledger, Link
from hetfl.engine.loop import run_rounds
from hetfl.errors import ConfigError
from hetfl.runner import build_method

X = torch.tensor([0.0, 0.1, 0.25, 0.5, 0.77, 1.0, -0.3, 0.9])  # range [-0.3, 1.0]


# ----------------------------------------------------------------------------- the quantizer


def test_stochastic_rounding_picks_the_two_neighbouring_levels():
    # 2 bits on [0, 1]: D = 1/3; 0.25 sits at 0.75 of the step from 0 to 1/3.
    x = torch.tensor([0.0, 0.25, 1.0])
    outs = torch.stack([make_codec("sq2").roundtrip(x, generator(0, i)).tensor for i in range(400)])
    assert torch.all(outs[:, 0] == 0.0) and torch.all(outs[:, 2] == 1.0)  # the range ends are grid points
    mid = outs[:, 1]
    assert torch.all((mid == 0.0) | ((mid - 1 / 3).abs() < 1e-6))
    assert (mid > 0).float().mean().item() == pytest.approx(0.75, abs=0.07)  # 5 std of a 400-draw frequency


@pytest.mark.parametrize("bits", [1, 3, 8])
def test_stochastic_quantizer_is_unbiased_with_variance_at_most_d2_over_4(bits):
    n = 20000
    # n copies of X in one tensor: the per-tensor range stays [-0.3, 1.0], each copy gets fresh draws.
    out = make_codec(f"sq{bits}").roundtrip(X.repeat(n), generator(1, bits)).tensor.view(n, -1).double()
    step = 1.3 / (2**bits - 1)
    var_bound = step**2 / 4
    # The mean of n draws has std <= D/(2 sqrt(n)); allow 5 of them.
    assert torch.all((out.mean(0) - X.double()).abs() <= 5 * step / (2 * math.sqrt(n)))
    # Empirical variance within sampling noise (~1% at n = 20000) of its bound.
    assert torch.all(out.var(0) <= var_bound * 1.05)
    err = ((out - X.double()) ** 2).sum(1).mean().item()
    assert err <= quant_error_bound(X.numel(), 1.3, bits) * 1.05


def test_per_group_ranges_and_their_bytes():
    # groups of 3: [0, 1, 2], [10, 10, 10] (constant: sent exactly), [5, 6] (last, partial)
    x = torch.tensor([0.0, 1.0, 2.0, 10.0, 10.0, 10.0, 5.0, 6.0])
    enc = make_codec("rq1g3").roundtrip(x)
    # 1 bit: each value goes to its group's min or max, whichever is nearer (ties to even: 1 -> 0)
    assert enc.tensor.tolist() == [0.0, 0.0, 2.0, 10.0, 10.0, 10.0, 5.0, 6.0]
    assert enc.nbytes == math.ceil(8 * 1 / 8) + 8 * 3
    assert enc.sq_error == pytest.approx(1.0)


BYTES = [  # (codec, shape, bytes): ceil(d*b/8) + 8 per group
    ("sq4", (3, 5), 8 + 8),
    ("sq3g4", (3, 5), 6 + 4 * 8),
    ("rq8g64", (2, 64), 128 + 2 * 8),
    ("sq16", (7,), 14 + 8),
    ("sq1g1", (5,), 1 + 5 * 8),
]


@pytest.mark.parametrize("name,shape,nbytes", BYTES)
def test_payload_bytes(name, shape, nbytes):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    assert make_codec(name).roundtrip(t, generator(0)).nbytes == nbytes
    bits, _, group = name[2:].partition("g")
    assert quant_nbytes(t.numel(), int(bits), int(group) if group else None) == nbytes


@pytest.mark.parametrize("bits,group", [(2, None), (5, None), (4, 3), (12, 16)])
def test_round_to_nearest_error_is_at_most_half_a_step(bits, group):
    t = torch.randn(50, generator=torch.Generator().manual_seed(bits))
    out = UniformQuantizer(bits, group, stochastic=False).roundtrip(t).tensor
    g = group or 50
    for s in range(0, 50, g):
        chunk = t[s:s + g]
        step = (chunk.max() - chunk.min()) / (2**bits - 1)
        assert torch.all((out[s:s + g] - chunk).abs() <= step / 2 + 1e-6)


@pytest.mark.parametrize("name", ["sq32", "rq32", "sq32g8"])
def test_32_bits_is_lossless_fp32(name):
    t = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    enc = make_codec(name).roundtrip(t, generator(0))
    assert torch.equal(enc.tensor, t) and enc.nbytes == 4 * 24 and enc.sq_error == 0.0


def test_constant_tensor_integers_and_dtypes():
    c = torch.full((3, 4), 2.5)
    for name in ("sq4", "rq4", "sq2g5"):
        enc = make_codec(name).roundtrip(c, generator(0))
        assert torch.equal(enc.tensor, c) and enc.sq_error == 0.0  # no 0/0 for M == m
    labels = torch.tensor([3, 1, 4])
    enc = make_codec("sq2").roundtrip(labels, generator(0))
    assert enc.tensor is labels and enc.nbytes == 3 * 8 and enc.sq_error == 0.0
    half = torch.randn(10, dtype=torch.float16)
    assert make_codec("sq8").roundtrip(half, generator(0)).tensor.dtype == torch.float16
    scalar = torch.tensor([0.731])  # e.g. the batch loss: a one-element range is sent exactly
    assert make_codec("sq4").roundtrip(scalar, generator(0)).tensor.item() == pytest.approx(0.731)


def test_stochastic_codec_is_deterministic_given_the_generator_seed():
    t = torch.randn(100, generator=torch.Generator().manual_seed(0))
    q = make_codec("sq3")
    assert torch.equal(q.roundtrip(t, generator(5, 1)).tensor, q.roundtrip(t, generator(5, 1)).tensor)
    assert not torch.equal(q.roundtrip(t, generator(5, 1)).tensor, q.roundtrip(t, generator(5, 2)).tensor)


@pytest.mark.parametrize("name,msg", [
    ("sq0", "bits must be in 1..16"), ("sq17", "bits must be in 1..16"), ("rq8g0", "group size must be >= 1"),
    ("q8", "unknown codec 'q8'"), ("SQ8", "unknown codec 'SQ8'"),
])
def test_bad_codec_names_name_the_key(name, msg):
    with pytest.raises(ConfigError, match=f"comm.by_kind.activations: .*{msg}"):
        make_codec(name, "comm.by_kind.activations")


# ----------------------------------------------------------------------------- link and config


def test_link_resolves_codec_per_client_then_kind_then_direction():
    ledger = Ledger()
    link = Link("fp32", "fp16", ledger, seed=0, by_kind={"activations": "sq8", "grad_cut": "bf16"})
    h = torch.randn(4, 10)  # 40 elements
    link.send(UP, 1, 0, "activations", Message({"h": h, "labels": torch.arange(4)}))
    link.send(DOWN, 1, 0, "grad_cut", Message({"g": h}))
    link.send(UP, 1, 0, "update", Message({"u": h}))
    link.send(DOWN, 1, 0, "model", Message({"w": h}))
    link.set_codec(1, "activations", "sq4g20")  # e.g. the allocation gave client 1 four bits
    link.send(UP, 1, 1, "activations", Message({"h": h}))
    link.send(UP, 1, 0, "activations", Message({"h": h}))  # client 0 keeps the kind's codec
    assert [(e.cid, e.kind, e.codec, e.nbytes) for e in ledger.entries] == [
        (0, "activations", "sq8", 40 + 8 + 4 * 8),  # int64 labels pass at 8 bytes each
        (0, "grad_cut", "bf16", 80),
        (0, "update", "fp32", 160),
        (0, "model", "fp16", 80),
        (1, "activations", "sq4g20", 20 + 2 * 8),
        (0, "activations", "sq8", 48),
    ]
    assert link.codec_name(UP, 1, "activations") == "sq4g20"
    link.clear_codecs()
    assert link.codec_name(UP, 1, "activations") == "sq8"
    assert ledger.entries[0].sq_error > 0  # the quantizer's distortion is recorded per message


def test_link_quantization_is_seeded_by_round_client_and_call():
    h = torch.randn(64)

    def send(seed, rnd, cid):
        link = Link("sq2", "fp32", Ledger(), seed=seed)
        return link.send(UP, rnd, cid, "activations", Message({"h": h})).tensors["h"]

    assert torch.equal(send(0, 1, 2), send(0, 1, 2))
    assert not torch.equal(send(0, 1, 2), send(0, 2, 2)) and not torch.equal(send(0, 1, 2), send(0, 1, 3))


def test_link_and_set_codec_reject_unknown_names():
    with pytest.raises(ConfigError, match="comm.by_kind.grad_cut: unknown codec 'int3'"):
        Link("fp32", "fp32", Ledger(), 0, by_kind={"grad_cut": "int3"})
    link = Link("fp32", "fp32", Ledger(), 0)
    with pytest.raises(ConfigError, match="client 3, message kind 'activations'"):
        link.set_codec(3, "activations", "sq99")


@pytest.mark.parametrize("raw,msg", [
    ({"comm": {"by_kind": {"activations": "sq40"}}}, "comm.by_kind.activations: quantizer 'sq40': bits must be"),
    ({"comm": {"by_kind": {"grad_cut": "fp8"}}}, "comm.by_kind.grad_cut: unknown codec 'fp8'"),
    ({"comm": {"by_kind": {"grad_cut": 8}}}, "comm.by_kind.grad_cut: expected a string"),
    ({"comm": {"up": "fp7"}}, "comm.up: unknown codec 'fp7'"),
    ({"comm": {"by_kind": ["sq8"]}}, "comm.by_kind: expected a mapping"),
])
def test_comm_config_errors_name_the_key(raw, msg):
    with pytest.raises(ConfigError) as e:
        load_config(raw)
    assert msg in str(e.value)


def test_comm_config_accepts_quantizer_names():
    cfg = load_config({"comm": {"up": "sq8g64", "by_kind": {"activations": "rq4", "grad_cut": "fp16"}}})
    assert cfg.comm.by_kind == {"activations": "rq4", "grad_cut": "fp16"} and cfg.comm.up == "sq8g64"


def test_fedit_updates_and_models_go_through_per_kind_quantizers():
    cfg = toy_config("rounds=1", "eval.at_start=false", "comm.by_kind={update: sq8, model: rq4}")
    h = run_rounds(toy_scenario(cfg), build_method(cfg))
    # Rank-2 LoRA on fc1 (6->8) and fc2 (8->3): A/B have 12, 16, 16, 6 elements; 3 clients.
    model = sum(quant_nbytes(d, 4) for d in (12, 16, 16, 6))  # 6+8 + 8+8 + 8+8 + 3+8 = 57
    update = sum(quant_nbytes(d, 8) for d in (12, 16, 16, 6))  # 50 + 4*8 = 82
    assert h[-1]["bytes_by_kind"]["down:model"] == 3 * model
    # up = the quantized deltas + the JSON metadata (its length depends on the loss digits)
    assert h[-1]["bytes_by_kind"]["up:update"] - 3 * update == pytest.approx(3 * 45, abs=3 * 15)
