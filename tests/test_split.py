"""Split learning plumbing: head | body | tail layout, the linked server handle, per-message
sizes against the spec's formulas (batch x tokens x width x bytes), server vs client FLOPs, and
per-client cut points as seen by the ledger."""

import json
import pytest
import torch

from hetfl.config import load_config
from hetfl.engine.api import Message
from hetfl.engine.link import DOWN, UP, Ledger, Link
from hetfl.engine.loop import plan_population
from hetfl.engine.sim import SimulatedBackend
from hetfl.engine.split import LinkedServer
from hetfl.models.classifiers import build_image_classifier
from hetfl.models.split import body_forward, head_forward, lengths_to_mask, mask_to_lengths, split_layout
from hetfl.runner import build_method
from hetfl.scenario import build_scenario
from hetfl.methods.common import TYPICAL_LOSS

torch.set_num_threads(1)


def split_cfg(model="tiny-vit-random", method=None, tiers=None, codec="fp32", **train):
    return load_config({
        "seed": 2, "rounds": 1, "model": {"name": model},
        "data": {"name": "digits", "samples_per_family": 6, "eval_samples": 20, "partition": "iid"},
        "train": {"optimizer": "sgd", "lr": 0.05, "local_steps": 2, "batch_size": 4, **train},
        "method": method or {"name": "fedv"}, "comm": {"up": codec, "down": "fp32"},
        "population": {"num_clients": 2, "clients_per_round": 2, "tiers": tiers or {"laptop": 1}},
        "eval": {"at_start": False},
    })


def one_round(cfg):
    """Run round 1 on every client by hand; returns (ledger, method, state, replies, ctxs, scenario)."""
    sc = build_scenario(cfg)
    method = build_method(cfg)
    state = method.setup(sc)
    knobs, mem = plan_population(method, sc)
    ledger = Ledger()
    link = Link(cfg.comm.up, cfg.comm.down, ledger, cfg.seed)
    backend = SimulatedBackend(sc, method, link)
    cids = list(range(sc.num_clients))
    down = method.configure(state, 1, cids)
    for cid, kinds in method.codecs(1, cids).items():  # as the loop does: per-client codecs (sflam)
        for kind, codec in kinds.items():
            link.set_codec(cid, kind, codec)
    replies, ctxs = backend.run_round(1, down, knobs, mem)
    state = method.aggregate(state, 1, replies)
    return ledger, method, state, replies, ctxs, sc


# ----------------------------------------------------------------------------- layout


@pytest.mark.parametrize("name", ["tiny-vit-random", "mlp", "cnn"])
def test_head_body_tail_compose_to_forward(name):
    model = build_image_classifier(name, 10, seed=0)
    batch = {"pixel_values": torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))}
    layout = split_layout(model, batch)
    with torch.no_grad():
        full = model(batch)
        for c in range(len(model.blocks)):
            h, mask = head_forward(model, batch, c)
            assert torch.equal(model.tail(body_forward(model, h, mask, c), mask), full)
    names = [n for n, _ in model.named_parameters()]
    assert sorted(layout.head(0) + layout.body(0) + layout.tail) == sorted(names)  # a partition
    assert set(layout.tail) >= {"classifier.weight", "classifier.bias"}


def test_tiny_vit_layout_names():
    model = build_image_classifier("tiny-vit-random", 10, seed=0)
    layout = split_layout(model, {"pixel_values": torch.zeros(1, 1, 32, 32)})
    assert layout.stem == ("embed.pos", "embed.proj.weight", "embed.proj.bias")
    assert layout.tail == ("norm.weight", "norm.bias", "classifier.weight", "classifier.bias")
    assert layout.num_blocks == 6 and all(n.startswith("blocks.1.") for n in layout.blocks[1])
    assert layout.head(2) == layout.stem + layout.blocks[0] + layout.blocks[1]
    assert layout.body(5) == layout.blocks[5]


def test_lengths_rebuild_right_padded_mask():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    lengths = mask_to_lengths(mask)
    assert lengths.dtype == torch.int32 and lengths.tolist() == [3, 1]
    assert torch.equal(lengths_to_mask(lengths, 4), mask)


# ----------------------------------------------------------------------------- linked server


def test_linked_server_sends_both_ways_through_the_codec():
    ledger = Ledger()
    link = Link("fp16", "fp32", ledger, seed=0)
    seen = []

    def handler(cid, kind, msg):
        seen.append((cid, kind, msg.tensors["h"].dtype))
        return Message({"u": msg.tensors["h"] * 2}, kind="outputs")

    server = LinkedServer(link, 3, 7, handler)
    reply = server.call("activations", Message({"h": torch.full((2, 5), 1.0 + 2**-12)}))
    assert seen == [(7, "activations", torch.float32)]
    assert torch.equal(reply.tensors["u"], torch.full((2, 5), 2.0))  # the fp16 rounding reached the server
    assert ledger.by_kind() == {(UP, "activations"): 10 * 2, (DOWN, "outputs"): 10 * 4}
    assert {e.cid for e in ledger.entries} == {7} and {e.rnd for e in ledger.entries} == {3}


def test_non_split_methods_get_no_server_handle():
    cfg = split_cfg("mlp", {"name": "fedavg-full"})
    *_, ctxs, _ = one_round(cfg)
    assert all(c.server is None for c in ctxs.values())


# ----------------------------------------------------------------------------- sizes per message kind

T, D, B, K = 64, 128, 4, 2  # tiny-vit tokens and width; batch, local steps
ACT = B * T * D * 4  # one fp32 activation tensor at the cut, per step
SIZES = [  # (method options, codec, {kind: bytes per client per step})
    ({"name": "fedv"}, "fp32", {(UP, "activations"): ACT, (UP, "grad_outputs"): ACT,
                                (DOWN, "outputs"): ACT, (DOWN, "grad_cut"): ACT}),
    ({"name": "fedv", "cut": 3}, "fp16", {(UP, "activations"): ACT // 2, (UP, "grad_outputs"): ACT // 2,
                                          (DOWN, "outputs"): ACT, (DOWN, "grad_cut"): ACT}),
    ({"name": "fedvz", "q": 2}, "fp32", {(UP, "activations"): 3 * ACT, (DOWN, "outputs"): 3 * ACT}),
    ({"name": "fedvz", "q": 2, "difference": "central"}, "fp32",
     {(UP, "activations"): 5 * ACT, (DOWN, "outputs"): 5 * ACT}),
    ({"name": "splitfed-v1"}, "fp32", {(UP, "activations"): ACT + 8 * B, (DOWN, "grad_cut"): ACT + 4}),
    ({"name": "splitfed-v2", "cut": 1}, "fp32", {(UP, "activations"): ACT + 8 * B, (DOWN, "grad_cut"): ACT + 4}),
]


@pytest.mark.parametrize("method,codec,per_step", SIZES)
def test_split_message_sizes_match_the_spec(method, codec, per_step):
    ledger, m, _, replies, _, sc = one_round(split_cfg(method=method, codec=codec))
    for cid in replies:
        for (d, kind), nbytes in per_step.items():
            assert ledger.bytes(cid=cid, direction=d, kind=kind) == K * nbytes, (cid, d, kind)
    kinds = {k for k in ledger.by_kind()}
    assert kinds == set(per_step) | {(DOWN, "model"), (UP, "update")}
    # Per round: the client part travels down as values and up as deltas (plus JSON metadata).
    held = sum(p.numel() for n, p in sc.model.named_parameters() if n in m.split.client_names(m.cuts.of(0)))
    bpe = 2 if codec == "fp16" else 4
    assert ledger.bytes(cid=0, direction=DOWN, kind="model") == 4 * held
    assert ledger.bytes(cid=0, direction=UP, kind="update") - bpe * held == replies[0].meta_nbytes()


# ----------------------------------------------------------------------------- FLOPs


def test_server_and_client_flops_are_counted_apart_by_hand():
    """mlp: stem 1024->128, one 128->128 block (the server body at cut 0), tail 128->10.
    Linear forward = 2*B*in*out FLOPs; backward = the same for the weight grad, again for the
    input grad. Server: forward F, input grad F, weight grad F (train) -> 3F; frozen -> 2F;
    FedVZ with q=1 forwards 2B samples -> 2F. Client (per step): stem forward and weight grad
    (its input needs no grad) + tail forward, weight grad and input grad."""
    F = 2 * B * 128 * 128
    client = K * (2 * 2 * B * 1024 * 128 + 3 * 2 * B * 128 * 10)
    for method, server in [({"name": "fedv"}, 3 * F), ({"name": "fedv", "body": "frozen"}, 2 * F),
                           ({"name": "fedvz"}, 2 * F)]:
        _, m, state, _, ctxs, _ = one_round(split_cfg("mlp", method))
        assert m.report(state, 1, []).stats["server_flops"] == 2 * K * server, method  # two clients
        if method["name"] == "fedv":
            assert all(c.flops == client for c in ctxs.values())


# ----------------------------------------------------------------------------- per-client cuts


def test_per_client_cut_changes_what_is_held_and_what_crosses():
    """cnn: cut 0 sends (16, 16, 16) activations, cut 1 sends (32, 8, 8) and keeps one conv block."""
    cfg = split_cfg("cnn", {"name": "fedv", "cut_by_tier": {"phone-low": 0, "laptop": 1}},
                    tiers={"phone-low": 1, "laptop": 1})
    ledger, m, _, _, ctxs, sc = one_round(cfg)
    by_tier = {ctxs[c].device.name: c for c in ctxs}
    low, lap = by_tier["phone-low"], by_tier["laptop"]
    assert (ctxs[low].knobs["cut"], ctxs[lap].knobs["cut"]) == (0, 1)
    assert ledger.bytes(cid=low, direction=UP, kind="activations") == K * B * 16 * 16 * 16 * 4
    assert ledger.bytes(cid=lap, direction=UP, kind="activations") == K * B * 32 * 8 * 8 * 4
    block0 = 16 * 32 * 9 + 32  # conv 16->32, 3x3, + bias
    model_bytes = {c: ledger.bytes(cid=c, direction=DOWN, kind="model") for c in (low, lap)}
    assert model_bytes[lap] - model_bytes[low] == 4 * block0
    assert ctxs[lap].mem_bytes > ctxs[low].mem_bytes
    stats = m.report(None, 1, []).stats
    held = {c: sum(p.numel() for n, p in sc.model.named_parameters() if n in m.split.client_names(ctxs[c].knobs["cut"]))
            for c in (low, lap)}
    assert held[lap] - held[low] == block0 and stats["client_params_max"] == held[lap]


def test_auto_cut_follows_device_speed_and_bad_cuts_are_config_errors():
    from hetfl.errors import ConfigError

    cfg = split_cfg(method={"name": "fedv", "cut": "auto"})
    sc = build_scenario(cfg)
    m = build_method(cfg)
    m.setup(sc)
    cuts = {t: m.plan(0, sc.population.profiles[t])[0]["cut"] for t in ("phone-low", "phone-high", "laptop")}
    # cut = floor(5 * flops / 1.5e11): phone-low 2e9 -> 0, phone-high 3e10 -> 1, laptop -> 5
    assert cuts == {"phone-low": 0, "phone-high": 1, "laptop": 5}
    bad = build_method(split_cfg(method={"name": "fedv", "cut": 6}))
    bad.setup(sc)
    with pytest.raises(ConfigError, match="method.cut"):
        bad.plan(0, sc.population.device(0))


def test_plan_counts_the_client_part_only():
    """mlp, cut 0, plain SGD: weights + grads of stem (1024*128 + 128) and tail (128*10 + 10),
    plus stem output, cut tensor and its gradient (3 * B * 128 fp32); nothing of the body."""
    cfg = split_cfg("mlp")
    sc = build_scenario(cfg)
    m = build_method(cfg)
    m.setup(sc)
    knobs, mem = m.plan(0, sc.population.device(0))
    n = 1024 * 128 + 128 + 128 * 10 + 10
    assert knobs == {"cut": 0} and mem == 2 * 4 * n + 3 * B * 128 * 4
    full = build_method(split_cfg("mlp", {"name": "fedavg-full"}))
    full.setup(sc)
    assert full.plan(0, sc.population.device(0))[1] > mem + 4 * (128 * 128 + 128)  # holds the body too


# ----------------------------------------------------------------------------- payload


PAYLOADS = [  # (model, method options, train options): every split method, batches smaller than the data and not
    ("tiny-vit-random", {"name": "fedv"}, {}),
    ("tiny-vit-random", {"name": "fedv", "cut": 1, "personal_tail": True}, {}),
    ("tiny-vit-random", {"name": "fedvz", "q": 2, "difference": "central"}, {}),
    ("tiny-vit-random", {"name": "splitfed-v1", "cut": 2}, {}),
    ("tiny-vit-random", {"name": "splitfed-v2"}, {}),
    ("tiny-vit-random", {"name": "sl-vanilla", "cut": 1}, {}),
    ("tiny-vit-random", {"name": "sflam", "bits": 32}, {}),
    ("mlp", {"name": "fedv", "body_schedule": "round"}, {"batch_size": 64}),  # one batch: all 30 samples
    ("mlp", {"name": "splitfed-v1"}, {"batch_size": 64, "local_steps": 3}),
    ("cnn", {"name": "sl-vanilla"}, {"epochs": 0.5}),
]


@pytest.mark.parametrize("model,method,train", PAYLOADS, ids=[f"{m}-{o['name']}-{i}" for i, (m, o, _) in
                                                             enumerate(PAYLOADS)])
def test_payload_is_what_the_ledger_measures(model, method, train):
    """`Method.payload` is computed from shapes and the method's rules; with fp32 codecs the
    ledger must measure exactly those bytes, each way, for every client (the reply's loss is
    counted at TYPICAL_LOSS's JSON length: no shape gives it)."""
    ledger, m, state, replies, ctxs, _ = one_round(split_cfg(model, method, **train))
    for cid, reply in replies.items():
        loss_chars = len(json.dumps(reply.meta["train_loss"])) - len(json.dumps(TYPICAL_LOSS))
        measured = (ledger.bytes(cid=cid, direction=DOWN), ledger.bytes(cid=cid, direction=UP) - loss_chars)
        assert m.payload(state, 1, cid, reply.meta["num_examples"]) == measured, cid
