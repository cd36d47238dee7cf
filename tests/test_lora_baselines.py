"""The heterogeneous-rank LoRA baselines: HeteroLoRA (zero-padded truncation), FlexLoRA (SVD
redistribution) and FLoRA (stacking merged into the base), each with a hand-computed
aggregation test, cost checks and a pinned 2-round toy run; plus the fslora-instruct preset."""

import csv

import pytest
import torch
from wide_toy import UNITS, wide_run, wide_setup

from hetfl.config import load_config
from hetfl.engine.api import Message
from hetfl.engine.link import Ledger, Link
from hetfl.engine.sim import SimulatedBackend
from hetfl.methods.flexlora import svd_flops, truncate
from hetfl.methods.flora_stack import stack
from hetfl.models.lora import count_trainable, lora_modules
from hetfl.track.rundir import RunDir
from hetfl.track.walltime import without_walls

METHODS = ["fslora", "heterolora", "flexlora", "flora-stack", "fedit"]


def deterministic(history):
    """Metrics minus wall-clock timings (keys ending in _wall_s), which legitimately vary."""
    return without_walls(history)


def client_update(sc, method, state, cid, rnd=1):
    backend = SimulatedBackend(sc, method, Link("fp32", "fp32", Ledger(), sc.cfg.seed))
    knobs, mem = method.plan(cid, sc.population.device(cid))
    return method.client_update(method.configure(state, rnd, [cid])[cid], backend.context(rnd, cid, knobs, mem))


# ----------------------------------------------------------------------------- HeteroLoRA


def test_heterolora_sends_the_first_k_channels_and_no_indices():
    sc, method, state = wide_setup("method.name=heterolora")
    state["global"]["fc1.lora_A"] = torch.arange(24.0).reshape(4, 6)
    down = method.configure(state, 1, [0, 1])
    for cid in (0, 1):
        k = state["rank"][cid]
        assert torch.equal(down[cid].tensors["fc1.lora_A"], torch.arange(24.0).reshape(4, 6)[:k])
        assert not any(n.endswith(".index") for n in down[cid].tensors)
    assert method.configure(state, 7, [0])[0].tensors["fc1.lora_A"].shape == down[0].tensors["fc1.lora_A"].shape


def test_heterolora_zero_pads_and_divides_by_p():
    sc, method, state = wide_setup("method.name=heterolora")
    before = state["global"]["fc1.lora_A"].clone()

    def reply(k, value):
        t = {}
        for mod, m in lora_modules(sc.model).items():
            t[f"{mod}.lora_A"] = torch.full((k, m.in_features), value)
            t[f"{mod}.lora_B"] = torch.zeros(m.out_features, k)
        return Message(t, {"num_examples": 4, "rank": k})

    new = method.aggregate(state, 1, {0: reply(1, 3.0), 1: reply(2, 1.0), 4: reply(4, -1.0)})
    # Zero-padded to rank 4, summed, / P = 3: channel 0: (3 + 1 - 1)/3, 1: (1 - 1)/3, 2 and 3: -1/3.
    want = torch.tensor([1.0, 0.0, -1 / 3, -1 / 3])
    assert torch.allclose(new["global"]["fc1.lora_A"] - before, want[:, None].expand(4, 6))


# ----------------------------------------------------------------------------- FlexLoRA


def test_truncation_is_the_best_rank_k_approximation():
    g = torch.Generator().manual_seed(1)
    dw = torch.randn(7, 5, generator=g)
    s = torch.linalg.svdvals(dw)
    for k in (1, 2, 3):
        b, a = truncate(dw, k, scale=0.5)
        assert b.shape == (7, k) and a.shape == (k, 5)
        approx = 0.5 * b @ a
        # Eckart-Young: the error of the best rank-k approximation is sqrt(sum of the dropped s^2).
        assert torch.linalg.matrix_norm(dw - approx) == pytest.approx(float(s[k:].pow(2).sum().sqrt()), rel=1e-5)
        assert torch.linalg.matrix_rank(approx) == k


def test_flexlora_clients_get_the_rank_k_truncation_of_the_global_update():
    sc, method, state = wide_setup("method.name=flexlora")
    g = torch.Generator().manual_seed(2)
    for mod, m in lora_modules(sc.model).items():  # a known dense update, factorised as aggregate would
        state["dw"][mod] = torch.randn(m.out_features, m.in_features, generator=g)
        state["global"][f"{mod}.lora_B"], state["global"][f"{mod}.lora_A"] = truncate(state["dw"][mod], 4, method.s)
    down = method.configure(state, 1, list(range(6)))
    for cid, msg in down.items():
        k = state["rank"][cid]
        for mod in method.modules:
            dw = state["dw"][mod]
            got = method.scale(k) * msg.tensors[f"{mod}.lora_B"] @ msg.tensors[f"{mod}.lora_A"]
            s = torch.linalg.svdvals(dw)
            assert torch.linalg.matrix_norm(dw - got) == pytest.approx(float(s[k:].pow(2).sum().sqrt()), rel=1e-4)


def test_flexlora_averages_products_by_data_size_and_refactorises():
    sc, method, state = wide_setup("method.name=flexlora")
    p1 = (torch.ones(32, 1), torch.ones(1, 6))  # product: all ones, at k = 1 (scale alpha/1 = 4)
    p2 = (torch.ones(32, 2), torch.ones(2, 6))  # product: all 2s, at k = 2 (scale 2)

    def reply(b, a, n):
        t = {"fc1.lora_B": b, "fc1.lora_A": a, "fc2.lora_B": torch.zeros(32, a.shape[0]), "fc2.lora_A": torch.zeros(a.shape[0], 32)}
        return Message(t, {"num_examples": n, "rank": a.shape[0]})

    new = method.aggregate(state, 1, {0: reply(*p1, 3), 1: reply(*p2, 1)})
    # (3 * 4 * 1 + 1 * 2 * 2) / 4 = 4 everywhere in fc1; fc2 averages to zero.
    assert torch.allclose(new["dw"]["fc1"], torch.full((32, 6), 4.0))
    assert torch.allclose(method.s * new["global"]["fc1.lora_B"] @ new["global"]["fc1.lora_A"], new["dw"]["fc1"], atol=1e-5)
    assert new["stats"]["server_svd_flops"] == svd_flops(32, 6) + svd_flops(32, 32)
    assert svd_flops(32, 6) == 6 * 32 * 36 + 20 * 216
    assert "server_svd_wall_s" in method.report(new, 1, []).stats


# ----------------------------------------------------------------------------- FLoRA (stacking)


def test_stacked_product_equals_the_sum_of_client_products():
    g = torch.Generator().manual_seed(3)
    pairs = [(torch.randn(5, k, generator=g), torch.randn(k, 4, generator=g)) for k in (1, 3, 2)]
    b, a = stack(pairs)
    assert b.shape == (5, 6) and a.shape == (6, 4)
    assert torch.allclose(b @ a, sum(bi @ ai for bi, ai in pairs), atol=1e-6)


def test_flora_merges_the_weighted_average_of_products_into_the_base():
    sc, method, state = wide_setup("method.name=flora-stack")
    base = state["base"]["fc1.weight"].clone()

    def reply(k, value, n):
        t = {"fc1.lora_B": torch.full((32, k), value), "fc1.lora_A": torch.ones(k, 6),
             "fc2.lora_B": torch.zeros(32, k), "fc2.lora_A": torch.zeros(k, 32)}
        return Message(t, {"num_examples": n, "rank": k})

    new = method.aggregate(state, 1, {2: reply(1, 1.0, 1), 3: reply(2, 0.5, 3)})
    # Products s_k B A: k=1: 4 * 1 = 4; k=2: 2 * (2 * 0.5) = 2; weighted (1 * 4 + 3 * 2) / 4 = 2.5.
    assert torch.allclose(new["base"]["fc1.weight"] - base, torch.full((32, 6), 2.5))
    assert new["stats"]["stacked_rank"] == 3


def test_flora_downlink_is_the_merged_adapted_weights(tmp_path):
    h, sc, _ = wide_run("method.name=flora-stack", "rounds=1", rundir=RunDir(tmp_path / "r"))
    rows = list(csv.DictReader(open(tmp_path / "r" / "clients.csv")))
    meta = len('{"rank": 1}')
    for r in rows:
        assert int(r["bytes_down"]) == 4 * (6 * 32 + 32 * 32) + meta  # fc1 and fc2 weights, fp32, + the rank
    assert h[1]["bytes_by_kind"]["down:model"] == sum(int(r["bytes_down"]) for r in rows)


# ----------------------------------------------------------------------------- shared


@pytest.mark.parametrize("name", ["heterolora", "flexlora", "flora-stack"])
def test_client_trains_k_over_r_of_the_full_adapter_and_uploads_k_over_r(name):
    sc, method, state = wide_setup(f"method.name={name}")
    for cid in range(6):
        k = state["rank"][cid]
        reply = client_update(sc, method, state, cid)
        assert count_trainable(sc.model) == k * UNITS
        assert sum(t.numel() for t in reply.tensors.values()) == k * UNITS  # factors only, no indices
        assert reply.meta["rank"] == k


@pytest.mark.parametrize("name,pinned", [
    # Computed once with this code (wide toy, seed 3, rank 4, ratios {1/4, 1/2, 1}); pinned against drift.
    ("heterolora", [0.6302052140235901, 0.6285914778709412, 0.6273968815803528]),
    ("flexlora", [0.6302052140235901, 0.6260681748390198, 0.6034812331199646]),
    ("flora-stack", [0.6302052140235901, 0.6181480288505554, 0.6104278564453125]),
])
def test_two_round_toy_simulation_is_pinned_and_order_independent(name, pinned):
    h, _, _ = wide_run(f"method.name={name}", "rounds=2")
    assert deterministic(h) == deterministic(wide_run(f"method.name={name}", "rounds=2", order="reverse")[0])
    assert [m["eval_mse"] for m in h] == pytest.approx(pinned, abs=1e-6)


@pytest.mark.parametrize("name", METHODS)
def test_every_method_runs_from_the_fslora_preset(name):
    cfg = load_config("fslora-instruct", [f"method.name={name}"])
    assert cfg.method.name == name and cfg.lora.rank == 16
    if name != "fedit":
        assert cfg.method.ratios == (0.125, 0.25, 0.5)
