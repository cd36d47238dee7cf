"""FSLoRA: unbiased sketches, equivalence with FedIT at k = r, measured bytes and trainable
parameters that scale with k_i / r, scatter-and-divide-by-P aggregation, index sharing and
seeding, rank distributions, the resource policy and the adaptive budget controller."""

import csv
import itertools
import json

import pytest
import torch
from test_method_table import measured
from wide_toy import UNITS, wide_config, wide_run, wide_scenario, wide_setup

from hetfl.engine.api import Message
from hetfl.engine.link import Ledger, Link
from hetfl.engine.loop import run_rounds
from hetfl.engine.sim import SimulatedBackend
from hetfl.errors import ConfigError
from hetfl.methods.hetrank import HetRankConfig, adapt_rank, draw_ranks
from hetfl.models.lora import count_trainable, lora_modules, lora_state_dict
from hetfl.runner import build_method
from hetfl.system.cost import Cost
from hetfl.track.rundir import RunDir


def client_ctx(sc, method, cid, rnd=1):
    backend = SimulatedBackend(sc, method, Link("fp32", "fp32", Ledger(), sc.cfg.seed))
    knobs, mem = method.plan(cid, sc.population.device(cid))
    return backend.context(rnd, cid, knobs, mem)


# ----------------------------------------------------------------------------- the sketch


def test_sketch_is_unbiased_exactly_and_by_monte_carlo():
    g = torch.Generator().manual_seed(0)
    r, k = 4, 2
    b, a = torch.randn(5, r, generator=g), torch.randn(r, 7, generator=g)  # (out, r), (r, in)
    # Exact: the mean over all C(4, 2) = 6 index sets of (r/k) B[:, I] A[I, :] is B A, since every
    # channel lies in 3 of the 6 sets and (r/k) * 3/6 = 1.
    sets = [list(s) for s in itertools.combinations(range(r), k)]
    exact = sum((r / k) * b[:, s] @ a[s, :] for s in sets) / len(sets)
    assert torch.allclose(exact, b @ a, atol=1e-6)
    # Monte Carlo through the method's own sampler (a fresh set per round).
    _, method, _ = wide_setup("method.name=fslora")
    draws = 4000
    mc = sum((r / k) * b[:, i] @ a[i, :] for i in (method.indices(t, 0, "fc1", k) for t in range(draws))) / draws
    # Each entry's MC standard error is about |entry| / sqrt(draws); 5 sigma of the largest.
    assert (mc - b @ a).abs().max() < 5 * (b.abs() @ a.abs()).max() / draws**0.5


def test_indices_are_shared_by_b_and_a_fresh_per_round_and_client_and_seeded():
    sc, method, state = wide_setup("method.name=fslora")
    # Recognisable global factors: A[j, :] = j, B[:, j] = 10 j.
    for mod in method.modules:
        state["global"][f"{mod}.lora_A"] = torch.arange(4.0)[:, None].expand(-1, lora_modules(sc.model)[mod].in_features).clone()
        state["global"][f"{mod}.lora_B"] = 10 * torch.arange(4.0)[None, :].expand(lora_modules(sc.model)[mod].out_features, -1).clone()
    cids = list(range(6))
    down = method.configure(state, 1, cids)
    for cid in cids:
        k = state["rank"][cid]
        for mod in method.modules:
            idx = down[cid].tensors[f"{mod}.index"]
            assert idx.dtype == torch.uint8 and idx.shape == (k,) and len(set(idx.tolist())) == k
            assert down[cid].tensors[f"{mod}.lora_A"][:, 0].tolist() == idx.float().tolist()
            assert down[cid].tensors[f"{mod}.lora_B"][0, :].tolist() == (10 * idx.float()).tolist()
    # Same seed, same sets, whatever else is sampled; other rounds and clients draw other sets.
    assert method.configure(state, 1, [3])[3].tensors["fc2.index"].tolist() == down[3].tensors["fc2.index"].tolist()
    by_round = {tuple(method.indices(t, 0, "fc1", 2).tolist()) for t in range(1, 30)}
    by_client = {tuple(method.indices(1, c, "fc1", 2).tolist()) for c in range(30)}
    assert len(by_round) > 1 and len(by_client) > 1
    _, other_seed, _ = wide_setup("method.name=fslora", "seed=4")
    assert [other_seed.indices(t, 0, "fc1", 2).tolist() for t in range(1, 10)] != \
        [method.indices(t, 0, "fc1", 2).tolist() for t in range(1, 10)]


# ----------------------------------------------------------------------------- equivalence with FedIT


@pytest.mark.parametrize("opt", ["avg", "fedadam"])
def test_k_equal_r_gives_fedit_at_rank_r(opt):
    # fslora divides by P (uniform weights), so it matches fedit with method.weighting=uniform.
    h1, s1, _ = wide_run("method.name=fslora", "method.ratios=[1.0]", f"method.server_opt={opt}", "method.server_lr=0.5")
    h2, s2, _ = wide_run("method.name=fedit", "method.weighting=uniform", f"method.server_opt={opt}", "method.server_lr=0.5")
    a, b = lora_state_dict(s1.model), lora_state_dict(s2.model)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    assert [m["eval_mse"] for m in h1] == pytest.approx([m["eval_mse"] for m in h2], abs=1e-6)


def test_k_equal_r_with_example_weights_gives_fedit_default():
    _, s1, _ = wide_run("method.name=fslora", "method.ratios=[1.0]", "method.weighting=examples")
    _, s2, _ = wide_run("method.name=fedit")
    a, b = lora_state_dict(s1.model), lora_state_dict(s2.model)
    assert all(torch.allclose(a[key], b[key], atol=1e-6) for key in a)


# ----------------------------------------------------------------------------- aggregation


def test_aggregate_scatters_deltas_and_divides_by_p():
    sc, method, state = wide_setup("method.name=fslora")
    before = {n: t.clone() for n, t in state["global"].items()}

    def reply(idx, value, n):
        t = {}
        for mod, m in lora_modules(sc.model).items():
            t[f"{mod}.lora_A"] = torch.full((len(idx), m.in_features), value if mod == "fc1" else 0.0)
            t[f"{mod}.lora_B"] = torch.full((m.out_features, len(idx)), -value if mod == "fc1" else 0.0)
            t[f"{mod}.index"] = torch.tensor(idx, dtype=torch.uint8)
        return Message(t, {"num_examples": n, "rank": len(idx)})

    # Client 5 touches channels {0, 2} with +1, client 2 touches {2, 3} with +2 (B gets the negatives).
    new = method.aggregate(state, 1, {5: reply([0, 2], 1.0, 9), 2: reply([2, 3], 2.0, 1)})
    # Divide by P = 2 (not by how many clients touched a channel), whatever the example counts:
    # channel 0: 1/2, channel 1: 0, channel 2: (1 + 2)/2, channel 3: 2/2.
    want = torch.tensor([0.5, 0.0, 1.5, 1.0])
    assert torch.allclose(new["global"]["fc1.lora_A"] - before["fc1.lora_A"], want[:, None].expand(4, 6))
    assert torch.allclose(new["global"]["fc1.lora_B"] - before["fc1.lora_B"], -want[None, :].expand(32, 4))
    assert torch.equal(new["global"]["fc2.lora_A"], before["fc2.lora_A"])
    assert new["round_rank"] == {2: 2, 5: 2}


# ----------------------------------------------------------------------------- cost scales with k


def test_trainable_params_and_local_scale_follow_k():
    sc, method, state = wide_setup("method.name=fslora")
    full = count_trainable(sc.model)
    assert full == 4 * UNITS  # rank 4 over fc1 and fc2
    for cid in range(6):
        k = state["rank"][cid]
        ctx = client_ctx(sc, method, cid)
        reply = method.client_update(method.configure(state, 1, [cid])[cid], ctx)
        assert reply.meta["rank"] == k
        assert count_trainable(sc.model) == k * UNITS == full * k // 4
        # local scale s * r / k with s = alpha / r = 4 / 4
        assert all(m.scaling == pytest.approx(1.0 * 4 / k) for m in lora_modules(sc.model).values())
    model = method.eval_model(state)  # evaluation restores rank r and scale s
    assert count_trainable(model) == full and all(m.scaling == 1.0 for m in lora_modules(model).values())


def test_measured_bytes_are_k_over_r_of_full_lora_plus_small_index_overhead(tmp_path):
    h, sc, method = wide_run("method.name=fslora", rundir=RunDir(tmp_path / "r"))
    rows = list(csv.DictReader(open(tmp_path / "r" / "clients.csv")))
    full_bytes = 4 * 4 * UNITS  # fp32 rank-4 adapter
    ks = set()
    for r in rows:
        k = int(r["rank"])
        ks.add(k)
        tensor_bytes = full_bytes * k // 4
        index_bytes = 2 * k  # one uint8 per chosen channel in each of the 2 modules
        assert index_bytes <= 0.01 * tensor_bytes
        assert int(r["bytes_down"]) == tensor_bytes + index_bytes  # no metadata goes down
        meta = json.dumps({"num_examples": int(r["num_examples"]), "rank": k, "train_loss": 0.0})
        # up = deltas + indices + JSON metadata (its length depends on the loss digits)
        assert int(r["bytes_up"]) - tensor_bytes - index_bytes == pytest.approx(len(meta) + 15, abs=15)
    assert len(ks) > 1  # clients of different ranks took part
    assert [m["rank_mean"] for m in h[1:]] == [
        sum(int(r["rank"]) for r in rows if int(r["round"]) == rnd) / 3 for rnd in (1, 2, 3)]


# ----------------------------------------------------------------------------- choosing k_i


def test_rank_distributions():
    cfg = HetRankConfig()
    ratios = draw_ranks(cfg, 64, 50, seed=0)
    assert set(ratios) <= {8, 16, 32} and len(set(ratios)) == 3
    assert ratios == draw_ranks(cfg, 64, 50, seed=0) != draw_ranks(cfg, 64, 50, seed=1)
    means = {}
    for dist in ("normal", "uniform", "heavy_tail_low"):
        ks = draw_ranks(HetRankConfig(rank_dist=dist), 64, 200, seed=0)
        assert min(ks) >= 1 and max(ks) <= 32  # rank_high 0: r/2, the paper's [1, 32] at r = 64
        means[dist] = sum(ks) / len(ks)
    assert means["normal"] == pytest.approx(16.5, abs=1.5)  # N(16.5, (31/6)^2)
    assert means["uniform"] == pytest.approx(16.5, abs=1.5)  # integers 1..32
    assert means["heavy_tail_low"] < 10  # most clients low, a few high
    assert draw_ranks(HetRankConfig(rank_dist="uniform", rank_low=3, rank_high=5), 64, 40, 0) != [3] * 40
    assert set(draw_ranks(HetRankConfig(rank_dist="uniform", rank_low=3, rank_high=5), 64, 40, 0)) == {3, 4, 5}


def test_policy_picks_largest_rank_meeting_deadline_and_memory():
    sc, method, _ = wide_setup("method.name=fslora")
    dev = sc.population.device(0)
    # SGD without momentum: each extra unit of rank adds its weights and gradients, 8 bytes per value.
    assert method.budget.memory(3) - method.budget.memory(2) == 8 * UNITS
    # Estimated time is affine in k; a deadline just above t(2) admits k = 2, not 3.
    deadline = method.budget.estimate_time(2, dev) * (1 + 1e-9)
    assert method.budget.estimate_time(3, dev) > deadline
    _, pol, state = wide_setup("method.name=fslora", "method.sketch=policy", f"method.deadline_s={deadline}")
    assert pol.plan(0, dev) == ({"rank": 2}, pol.budget.memory(2))
    assert state["rank"][0] == 2
    _, nodl, _ = wide_setup("method.name=fslora", "method.sketch=policy")  # memory only: full rank fits
    assert nodl.plan(0, dev)[0] == {"rank": 4}


def test_adaptive_rank_controller():
    # Late clients shrink (strictly, even when only slightly late), fast ones grow, within [1, k_max].
    assert adapt_rank(8, time_s=20.0, deadline_s=10.0, k_max=16) == 4
    assert adapt_rank(8, time_s=10.5, deadline_s=10.0, k_max=16) == 7
    assert adapt_rank(1, time_s=50.0, deadline_s=10.0, k_max=16) == 1
    assert adapt_rank(4, time_s=5.0, deadline_s=10.0, k_max=16) == 8
    assert adapt_rank(4, time_s=1.0, deadline_s=10.0, k_max=16) == 16
    assert adapt_rank(4, time_s=9.9, deadline_s=10.0, k_max=16) == 4


def test_adaptive_observe_updates_state_from_observed_costs():
    sc, method, state = wide_setup("method.name=fslora", "method.sketch=adaptive", "method.deadline_s=1.0",
                                   "method.ratios=[0.5]")
    assert set(state["rank"].values()) == {2}
    method.observe(state, 1, {0: Cost(t_comp=3.0), 1: Cost(t_comp=0.2, t_up=0.05), 2: Cost(t_comp=0.01)})
    assert state["rank"][0] == 1  # 3x over the deadline -> smaller
    assert state["rank"][1] == 4  # well under -> larger, bounded by r = 4
    assert state["rank"][2] == 4
    assert state["rank"][3] == 2  # not sampled: unchanged
    # The next round's sketches follow the new ranks.
    down = method.configure(state, 2, [0, 1])
    assert down[0].tensors["fc1.lora_A"].shape == (1, 6) and down[1].tensors["fc1.lora_A"].shape == (4, 6)


def test_adaptive_run_reports_changing_ranks(tmp_path):
    h, _, _ = wide_run("method.name=fslora", "method.sketch=adaptive", "method.deadline_s=0.0001",
                       "rounds=4", rundir=RunDir(tmp_path / "r"))
    rows = list(csv.DictReader(open(tmp_path / "r" / "clients.csv")))
    first = {}
    for r in rows:  # a client over the deadline never trains at a larger rank later
        c, k = int(r["client"]), int(r["rank"])
        if c in first:
            assert k <= first[c]
        first[c] = k
    assert h[-1]["rank_mean"] < h[1]["rank_mean"]


def test_resume_keeps_adapted_ranks_and_server_moments(tmp_path):
    run = ("method.name=fslora", "method.sketch=adaptive", "method.deadline_s=0.0001", "method.server_opt=fedadam",
           "method.server_lr=0.1")
    full, _, _ = wide_run(*run, "rounds=3")
    wide_run(*run, "rounds=2", rundir=RunDir(tmp_path / "r"))
    cfg = wide_config(*run, "rounds=3")
    sc = wide_scenario(cfg)
    resumed = run_rounds(sc, build_method(cfg), RunDir(tmp_path / "r", mode="resume"), resume=True)
    assert measured(resumed) == measured(full)


def test_adaptive_needs_a_deadline():
    with pytest.raises(ConfigError, match="method.deadline_s"):
        wide_config("method.name=fslora", "method.sketch=adaptive")


# ----------------------------------------------------------------------------- end to end


def test_two_round_toy_simulation_is_pinned_and_order_independent():
    h, _, _ = wide_run("method.name=fslora", "rounds=2")
    h_rev, _, _ = wide_run("method.name=fslora", "rounds=2", order="reverse")
    assert measured(h) == measured(h_rev)
    # Computed once with this code (seed 3, rank 4, ratios {1/4, 1/2, 1}); pinned against drift.
    assert [m["eval_mse"] for m in h] == pytest.approx(PINNED_FSLORA, abs=1e-6)
    assert h[-1]["eval_mse"] < h[0]["eval_mse"]


PINNED_FSLORA = [0.6302052140235901, 0.6278433203697205, 0.6247068047523499]


@pytest.mark.parametrize("name", ["fslora", "heterolora", "flexlora", "flora-stack"])
def test_classifier_head_trains_densely_and_travels(name):
    """On a classifier, every heterogeneous-rank method also trains and averages the dense head."""
    from hetfl.config import load_config
    from hetfl.engine.loop import run_rounds
    from hetfl.runner import build_method
    from hetfl.scenario import build_scenario

    cfg = load_config({
        "seed": 2, "rounds": 1, "model": {"name": "mlp"},
        "data": {"name": "digits", "samples_per_family": 8, "eval_samples": 100, "partition": "iid"},
        "lora": {"rank": 4, "alpha": 4, "targets": ["fc"]},
        "train": {"optimizer": "sgd", "lr": 0.1, "local_steps": 2, "batch_size": 4},
        "method": {"name": name, "ratios": [0.5]},
        "population": {"num_clients": 4, "clients_per_round": 2, "tiers": {"laptop": 1}},
        "eval": {"at_start": False},
    })
    sc = build_scenario(cfg)
    head0 = {n: p.detach().clone() for n, p in sc.model.named_parameters() if n in sc.model.head_param_names()}
    method = build_method(cfg)
    hist = run_rounds(sc, method)
    n_head = sum(t.numel() for t in head0.values())
    assert set(method.head) == set(head0) and n_head > 0
    model = sc.model  # the loop's final evaluation loaded the global head into it
    moved = [not torch.equal(dict(model.named_parameters())[n], t) for n, t in head0.items()]
    assert all(moved)
    # the head crosses both ways for each of the two clients: at least its fp32 bytes per direction
    assert hist[-1]["bytes_down"] >= 2 * 4 * n_head and hist[-1]["bytes_up"] >= 2 * 4 * n_head
