"""A server that survives bad updates, and faults on purpose: reply checks, the robust aggregators
(median, trimmed mean, norm clipping) in the averaging helpers, the default mean path unchanged
bit for bit, the aggregator x method rule, each method's expected reply against the real one, and
the seeded fates (dropout, stragglers, corruption, byzantine clients) and how they tamper."""

from __future__ import annotations

import math
import random

import pytest
import torch
from test_method_table import table_config

from hetfl.config import FaultsConfig, ServerConfig
from hetfl.engine.api import NUM_EXAMPLES, TRAIN_LOSS, Message
from hetfl.engine.loop import run_rounds
from hetfl.engine.robust import check_reply, clip_scales, combine
from hetfl.engine.sim import SimulatedBackend
from hetfl.errors import ConfigError
from hetfl.fleet.faults import Fate, byzantine_clients, fate, tamper
from hetfl.methods.common import AvgConfig, ServerOptimizer, mean_delta
from hetfl.methods.hetrank import aggregate_head, scatter_mean
from hetfl.registry import METHODS
from hetfl.runner import build_run

ROBUST = {"fedit", "fedavg-full", "ditto", "fslora", "heterolora"}
EXPECTED = sorted(ROBUST | {"flexlora", "flora-stack", "floral", "ensemble", "local-adaptor"})


def reply(tensors: dict[str, torch.Tensor], n: int = 10) -> Message:
    return Message(tensors, {NUM_EXAMPLES: n, TRAIN_LOSS: 0.5}, kind="update")


# ----------------------------------------------------------------------------- combine


def test_median_of_an_odd_stack_is_the_middle_value():
    stack = torch.tensor([[1.0, 5.0], [3.0, 2.0], [2.0, 9.0]])  # (3 clients, 2)
    assert torch.equal(combine(stack, torch.full((3,), 1 / 3), "median", 0.0), torch.tensor([2.0, 5.0]))


def test_median_of_an_even_stack_is_the_mean_of_the_two_middle_values():
    stack = torch.tensor([[1.0, 4.0], [3.0, 2.0], [2.0, 8.0], [10.0, 0.0]])  # (4, 2)
    # sorted columns: 1 2 3 10 -> (2 + 3) / 2; 0 2 4 8 -> (2 + 4) / 2 (torch.median would say 2 and 2)
    assert torch.equal(combine(stack, torch.full((4,), 0.25), "median", 0.0), torch.tensor([2.5, 3.0]))


def test_trimmed_mean_drops_floor_beta_n_values_at_each_end():
    stack = torch.tensor([[1.0, -50.0], [2.0, 0.0], [100.0, 3.0], [3.0, 1.0], [4.0, 2.0]])  # (5, 2)
    w = torch.full((5,), 0.2)
    assert torch.equal(combine(stack, w, "trimmed-mean", 0.2), torch.tensor([3.0, 1.0]))  # mean of 2 3 4 / 0 1 2
    assert torch.allclose(combine(stack, w, "trimmed-mean", 0.1), stack.mean(0))  # floor(0.5) = 0: nothing cut


def test_mean_is_the_weighted_sum():
    stack = torch.tensor([[4.0], [8.0]])
    assert torch.equal(combine(stack, torch.tensor([0.25, 0.75]), "mean", 0.0), torch.tensor([7.0]))
    with pytest.raises(ValueError, match="unknown aggregation rule 'mode'"):
        combine(stack, torch.tensor([0.5, 0.5]), "mode", 0.0)


# ----------------------------------------------------------------------------- norm clipping


def test_clip_scales_use_the_global_norm_over_every_floating_tensor():
    replies = {
        0: reply({"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[4.0]]),
                  "m.index": torch.tensor([7], dtype=torch.uint8)}),
        1: reply({"a": torch.tensor([0.0, 0.0]), "b": torch.tensor([[0.5]])}),
        2: reply({"a": torch.zeros(2), "b": torch.zeros(1, 1)}),
    }
    # client 0: ||(3, 0, 4)|| = 5 (the index left out); client 1: 0.5; client 2: a zero update
    assert clip_scales(replies, 1.0) == {0: 0.2, 1: 1.0, 2: 1.0}
    assert clip_scales(replies, 10.0) == {0: 1.0, 1: 1.0, 2: 1.0}


def test_norm_clip_scales_each_delta_before_the_mean():
    replies = {0: reply({"a": torch.tensor([3.0, 4.0])}), 1: reply({"a": torch.tensor([0.6, 0.8])})}
    out = mean_delta(replies, "uniform", ServerConfig(aggregator="norm-clip", clip_norm=1.0))
    assert torch.allclose(out["a"], torch.tensor([0.6, 0.8]))  # (0.6, 0.8) twice
    assert torch.equal(replies[0].tensors["a"], torch.tensor([3.0, 4.0]))  # the replies are not changed


# ----------------------------------------------------------------------------- check_reply


def test_check_reply_rejects_non_finite_tensors_but_not_a_nan_loss():
    good = reply({"a": torch.ones(2), "i": torch.tensor([1, 2])})
    good.meta[TRAIN_LOSS] = float("nan")  # a batch without a scored token: legitimate
    assert check_reply(good, None) is None
    assert check_reply(reply({"a": torch.tensor([1.0, float("nan")])}), None) == "non-finite values in a"
    assert check_reply(reply({"b": torch.tensor([float("-inf")])}), None) == "non-finite values in b"


def test_check_reply_rejects_wrong_keys_and_shapes():
    expected = {"a": (2,), "b": (1, 3)}
    assert check_reply(reply({"a": torch.ones(2), "b": torch.ones(1, 3)}), expected) is None
    assert (check_reply(reply({"a": torch.ones(2), "c": torch.ones(1)}), expected)
            == "keys differ: missing [b], unexpected [c]")
    assert check_reply(reply({"a": torch.ones(3), "b": torch.ones(1, 3)}), expected) == "a has shape (3,) not (2,)"


@pytest.mark.parametrize("n", [-1, float("nan"), float("inf"), "12", True])
def test_check_reply_rejects_a_bad_example_count(n):
    assert check_reply(reply({"a": torch.ones(1)}, n=n), None).startswith("num_examples is ")


# ----------------------------------------------------------------------------- the mean path stays as it was


def random_replies(shapes: dict[str, tuple[int, ...]], n: int = 3) -> dict[int, Message]:
    g = torch.Generator().manual_seed(0)
    return {cid: reply({k: torch.randn(s, generator=g) for k, s in shapes.items()}, n=7 + 3 * cid)
            for cid in (4, 1, 9)[:n]}


def old_mean_delta(replies, weighting):  # the summation before server.aggregator existed
    w = {cid: (m.meta[NUM_EXAMPLES] if weighting == "examples" else 1.0) for cid, m in replies.items()}
    total = float(sum(w.values()))
    mean = {}
    for cid in sorted(replies):
        for k, d in replies[cid].tensors.items():
            mean[k] = mean[k] + d * (w[cid] / total) if k in mean else d * (w[cid] / total)
    return mean


@pytest.mark.parametrize("weighting", ["examples", "uniform"])
def test_mean_delta_with_the_default_server_is_bit_identical(weighting):
    replies = random_replies({"x": (5, 3), "y": (4,)})
    ref = old_mean_delta(replies, weighting)
    big_clip = ServerConfig(aggregator="norm-clip", clip_norm=1e6)  # nothing to clip: x * 1.0 is exact
    for server in (None, ServerConfig(), big_clip):
        out = mean_delta(replies, weighting, server)
        assert out.keys() == ref.keys() and all(torch.equal(out[k], ref[k]) for k in ref)


def test_scatter_mean_with_the_default_server_is_bit_identical():
    g = {"m.lora_A": torch.zeros(4, 3), "m.lora_B": torch.zeros(2, 4)}
    gen = torch.Generator().manual_seed(1)
    replies = {cid: reply({"m.lora_A": torch.randn(k, 3, generator=gen), "m.lora_B": torch.randn(2, k, generator=gen)})
               for cid, k in ((0, 2), (3, 4), (5, 1))}  # first-k channels, as HeteroLoRA sends them
    w = {0: 0.2, 3: 0.5, 5: 0.3}
    ref = scatter_mean(g, ["m"], replies, w)
    for server in (ServerConfig(), ServerConfig(aggregator="norm-clip", clip_norm=1e6)):
        out = scatter_mean(g, ["m"], replies, w, server)
        assert all(torch.equal(out[k], ref[k]) for k in ref)


def three_sketches() -> dict[int, Message]:
    """Three clients' rank-2 deltas of one module (r = 4, in = 1, out = 1) on different channels."""
    u8 = torch.uint8
    return {
        0: reply({"m.lora_A": torch.tensor([[1.0], [2.0]]), "m.lora_B": torch.tensor([[10.0, 20.0]]),
                  "m.index": torch.tensor([0, 1], dtype=u8)}),
        1: reply({"m.lora_A": torch.tensor([[4.0], [6.0]]), "m.lora_B": torch.tensor([[30.0, 40.0]]),
                  "m.index": torch.tensor([1, 2], dtype=u8)}),
        2: reply({"m.lora_A": torch.tensor([[3.0], [8.0]]), "m.lora_B": torch.tensor([[5.0, 60.0]]),
                  "m.index": torch.tensor([0, 3], dtype=u8)}),
    }


def test_scatter_mean_median_is_per_channel_over_the_clients_that_trained_it():
    g = {"m.lora_A": torch.zeros(4, 1), "m.lora_B": torch.zeros(1, 4)}
    w = {c: 1 / 3 for c in range(3)}
    # channels trained: client 0 {0, 1}: A (1, 2), B (10, 20); client 1 {1, 2}: A (4, 6), B (30, 40);
    # client 2 {0, 3}: A (3, 8), B (5, 60). Per channel the median over its trainers times n_j / 3:
    # A: ch0 med(1, 3)=2 -> 4/3, ch1 med(2, 4)=3 -> 2, ch2 6 -> 2, ch3 8 -> 8/3
    # B: ch0 med(10, 5)=7.5 -> 5, ch1 med(20, 30)=25 -> 50/3, ch2 40 -> 40/3, ch3 60 -> 20
    out = scatter_mean(g, ["m"], three_sketches(), w, ServerConfig(aggregator="median"))
    assert torch.allclose(out["m.lora_A"], torch.tensor([[4 / 3], [2.0], [2.0], [8 / 3]]))
    assert torch.allclose(out["m.lora_B"], torch.tensor([[5.0, 50 / 3, 40 / 3, 20.0]]))
    # with two or fewer trainers per channel the median is their mean: the plain mean rule's result
    mean = scatter_mean(g, ["m"], three_sketches(), w)
    assert torch.allclose(mean["m.lora_A"], out["m.lora_A"]) and torch.allclose(mean["m.lora_B"], out["m.lora_B"])
    trimmed = scatter_mean(g, ["m"], three_sketches(), w, ServerConfig(aggregator="trimmed-mean", trim_beta=0.4))
    assert all(torch.allclose(trimmed[k], out[k]) for k in out)  # floor(0.4 * 2) = 0 cut: the mean


def test_scatter_median_outvotes_a_hostile_trainer_of_a_channel():
    g = {"m.lora_A": torch.zeros(2, 1), "m.lora_B": torch.zeros(1, 2)}
    replies = {c: reply({"m.lora_A": torch.tensor([[v]]), "m.lora_B": torch.tensor([[v]]),
                         "m.index": torch.tensor([0], dtype=torch.uint8)}) for c, v in enumerate([1.0, 2.0, -90.0])}
    out = scatter_mean(g, ["m"], replies, {c: 1 / 3 for c in range(3)}, ServerConfig(aggregator="median"))
    assert torch.equal(out["m.lora_A"], torch.tensor([[1.0], [0.0]]))  # median 1 of (1, 2, -90), all 3 trained it


def test_aggregate_head_takes_the_median_of_the_head_deltas():
    replies = {c: reply({"h": torch.tensor(v)}) for c, v in enumerate([[1.0, 0.0], [2.0, 10.0], [9.0, 1.0]])}
    state = {"head": {"h": torch.zeros(2)}}
    aggregate_head(state, replies, {c: 1 / 3 for c in range(3)}, ["h"], ServerOptimizer(AvgConfig()),
                   ServerConfig(aggregator="median"))
    assert torch.equal(state["head"]["h"], torch.tensor([2.0, 1.0]))


# ----------------------------------------------------------------------------- the aggregator x method rule


def test_robust_aggregation_is_declared_by_the_averaging_methods():
    assert {n for n in METHODS.names() if METHODS.get(n).factory.robust_aggregation} == ROBUST


def test_a_robust_aggregator_needs_a_method_that_supports_it():
    assert table_config("fslora", "server.aggregator=median").server.aggregator == "median"
    assert table_config("flexlora").server.aggregator == "mean"
    with pytest.raises(ConfigError) as e:
        table_config("flexlora", "server.aggregator=trimmed-mean")
    msg = str(e.value)
    assert msg.startswith("server.aggregator: trimmed-mean cannot combine with method flexlora")
    assert "\n" not in msg and all(n in msg for n in ROBUST) and "set server.aggregator=mean" in msg


# ----------------------------------------------------------------------------- end to end


def one_round(name: str, *more: str):
    """One round of `name` on its method-table scenario: (down, knobs, replies) per client, the metrics."""
    sc, method = build_run(table_config(name, "rounds=1", *more))
    seen = {}

    def backend(scenario, m, link, selector):
        sim = SimulatedBackend(scenario, m, link, selector=selector)
        run_round = sim.run_round

        def record(rnd, down, knobs, mem):
            replies, ctxs = run_round(rnd, down, knobs, mem)
            seen.update({cid: (down[cid], knobs[cid], replies[cid]) for cid in replies})
            return replies, ctxs

        sim.run_round = record
        return sim

    history = run_rounds(sc, method, backend=backend)
    return method, seen, history


@pytest.mark.parametrize("name", EXPECTED)
def test_expected_reply_matches_the_real_reply(name):
    method, seen, _ = one_round(name)
    assert seen
    for cid, (down, knobs, up) in seen.items():
        expected = method.expected_reply(down, knobs)
        assert expected == {k: tuple(t.shape) for k, t in up.tensors.items()}, cid
        assert check_reply(up, expected) is None


@pytest.mark.parametrize("name", sorted(ROBUST))
@pytest.mark.parametrize("rule", ["median", "trimmed-mean", "norm-clip"])
def test_robust_methods_train_under_every_aggregator(name, rule):
    _, _, history = one_round(name, f"server.aggregator={rule}", "server.trim_beta=0.25", "server.clip_norm=0.5")
    assert math.isfinite(history[-1]["train_loss"]) and math.isfinite(history[-1]["eval_loss"])


# ----------------------------------------------------------------------------- fates


def test_a_fate_depends_on_seed_round_and_client_only():
    fc = FaultsConfig(dropout=0.3, straggler=0.3, corrupt=0.3, byzantine=0.2)
    byz = byzantine_clients(fc, 5, 40)
    keys = [(rnd, cid) for rnd in (1, 2, 3) for cid in range(40)]
    forward = {k: fate(fc, 5, *k, byz) for k in keys}
    shuffled = keys[:]
    random.Random(0).shuffle(shuffled)
    assert {k: fate(fc, 5, *k, byz) for k in shuffled} == forward
    assert {k: fate(fc, 6, *k, byz) for k in keys} != forward
    # each fault has its own draws: another straggler rate leaves the dropouts as they were
    other = FaultsConfig(dropout=0.3, straggler=0.9)
    assert all(fate(other, 5, *k, byz).drop_at == forward[k].drop_at for k in keys)


def test_no_faults_give_the_benign_fate():
    assert fate(FaultsConfig(), 0, 1, 3, frozenset()) == Fate(None, 1.0, None, False)
    assert not Fate(0.5, 3.0, None, False).tampers and Fate(None, 1.0, "inf", False).tampers


def binomial_ok(k: int, n: int, p: float) -> bool:
    return abs(k - n * p) <= 4.5 * math.sqrt(n * p * (1 - p))


def test_fault_rates_follow_their_probabilities():
    fc = FaultsConfig(dropout=0.3, straggler=0.2, straggler_mu=1.0, straggler_sigma=0.5, corrupt=0.1)
    fates = [fate(fc, 0, rnd, cid, frozenset()) for rnd in range(1, 21) for cid in range(100)]  # 2000 draws
    drops = [f.drop_at for f in fates if f.drop_at is not None]
    slow = [f.slowdown for f in fates if f.slowdown != 1.0]
    corrupt = [f.corrupt for f in fates if f.corrupt is not None]
    assert binomial_ok(len(drops), 2000, 0.3) and all(0.0 <= d < 1.0 for d in drops)
    assert binomial_ok(len(slow), 2000, 0.2) and all(s > 0 for s in slow)
    assert abs(sorted(slow)[len(slow) // 2] - math.e) < 0.5  # median slowdown e^mu
    assert binomial_ok(len(corrupt), 2000, 0.1) and set(corrupt) == {"nan", "inf"}
    assert binomial_ok(corrupt.count("nan"), len(corrupt), 0.5)


def test_byzantine_clients_are_a_fixed_set_of_the_right_size():
    fc = FaultsConfig(byzantine=0.3)
    byz = byzantine_clients(fc, 3, 20)
    assert len(byz) == 6 and byz <= set(range(20)) and byzantine_clients(fc, 3, 20) == byz
    assert byzantine_clients(FaultsConfig(), 3, 20) == frozenset()
    assert len(byzantine_clients(FaultsConfig(byzantine=1.0), 3, 7)) == 7
    assert {cid for cid in range(20) if fate(fc, 3, 1, cid, byz).byzantine} == byz


# ----------------------------------------------------------------------------- tamper


def honest() -> Message:
    return reply({"a.lora_A": torch.tensor([[1.0, -2.0]]), "a.index": torch.tensor([3], dtype=torch.uint8),
                  "b": torch.tensor([2.0])})


HOSTILE = Fate(None, 1.0, None, True)


@pytest.mark.parametrize("mode, factor", [("sign-flip", -2.0), ("scale", 2.0)])
def test_tamper_flips_or_scales_the_floating_tensors(mode, factor):
    msg = honest()
    out = tamper(msg, HOSTILE, FaultsConfig(byzantine=0.5, byzantine_mode=mode, byzantine_scale=2.0), 0, 1, 2)
    assert torch.equal(out.tensors["a.lora_A"], factor * msg.tensors["a.lora_A"])
    assert torch.equal(out.tensors["b"], factor * msg.tensors["b"])
    assert out.tensors["a.index"] is msg.tensors["a.index"]  # integer tensors untouched
    assert out.meta == msg.meta and out.meta is not msg.meta and out.kind == "update"
    assert torch.equal(msg.tensors["b"], torch.tensor([2.0]))  # the input is not changed


def test_tamper_random_sends_seeded_noise_of_scale_times_the_norm():
    fc = FaultsConfig(byzantine=0.5, byzantine_mode="random", byzantine_scale=3.0)
    out = tamper(honest(), HOSTILE, fc, 0, 1, 2)
    norm = math.sqrt(sum(float(t.pow(2).sum()) for k, t in out.tensors.items() if k != "a.index"))
    assert math.isclose(norm, 3.0 * 3.0, rel_tol=1e-5)  # ||(1, -2, 2)|| = 3
    assert all(torch.equal(out.tensors[k], t) for k, t in tamper(honest(), HOSTILE, fc, 0, 1, 2).tensors.items())
    assert not torch.equal(tamper(honest(), HOSTILE, fc, 0, 2, 2).tensors["b"], out.tensors["b"])
    assert torch.equal(out.tensors["a.index"], torch.tensor([3], dtype=torch.uint8))


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_tamper_corrupts_one_value_of_the_first_floating_tensor(kind):
    msg = honest()
    out = tamper(msg, Fate(None, 1.0, kind, False), FaultsConfig(corrupt=0.5), 0, 1, 2)
    bad = ~torch.isfinite(out.tensors["a.lora_A"])  # "a.index" sorts first but is an integer tensor
    assert int(bad.sum()) == 1 and (out.tensors["a.lora_A"][bad].isnan().all() if kind == "nan"
                                    else out.tensors["a.lora_A"][bad].isinf().all())
    assert torch.equal(out.tensors["b"], msg.tensors["b"]) and torch.isfinite(msg.tensors["a.lora_A"]).all()
    assert check_reply(out, None) == "non-finite values in a.lora_A"


def test_tamper_without_a_fault_returns_an_equal_copy():
    msg = honest()
    out = tamper(msg, Fate(0.5, 2.0, None, False), FaultsConfig(dropout=0.5), 0, 1, 2)
    assert out is not msg and out.tensors.keys() == msg.tensors.keys() and out.meta == msg.meta
    assert all(out.tensors[k] is t for k, t in msg.tensors.items())
