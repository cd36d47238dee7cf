"""FLoRAL: mixture forward vs merged weights, rank rule and overhead, p(i|c) aggregation by hand,
oracle router, stateful/stateless clients and what crosses the link, baselines on a toy model."""

import copy
import json
import math

import pytest
import torch
from toy import toy_config, toy_scenario
from torch import nn

from hetfl.engine.api import NUM_EXAMPLES, TRAIN_LOSS, Message
from hetfl.engine.link import Ledger, Link
from hetfl.engine.loop import run_rounds
from hetfl.engine.sim import SimulatedBackend
from hetfl.errors import ConfigError
from hetfl.methods.common import TYPICAL_LOSS
from hetfl.methods.ensemble import member_of
from hetfl.methods.mixture import LOGITS, STACKED, mixture_average, mixture_weights
from hetfl.models.floral import attach_floral, merge_into, resolve_rank
from hetfl.runner import build_method

FLORAL = ("method.name=floral", "data.clusters=2", "population.num_clients=6", "population.clients_per_round=3")


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 5, 3, padding=1, stride=2)
        self.c2 = nn.Conv2d(5, 4, (3, 2), padding=(1, 0), dilation=(1, 2))  # non-square, dilated
        self.fc = nn.Linear(4 * 4 * 2, 6)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).flatten(1))


def _randomised(model, k, rho, seed=0):
    """Attach FLoRAL in float64 and give every adaptor (incl. B) non-zero random values."""
    plain = copy.deepcopy(model).double()
    model = model.double()
    floral = attach_floral(model, k, rho, generator=torch.Generator().manual_seed(seed))
    model.double()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in floral.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model, plain, floral


# ----------------------------------------------------------------------------- parameterization


@pytest.mark.parametrize("logits", [[0.0, 0.0, 0.0], [2.0, -1.0, 0.5], [0.0, -9.0, 3.0]])  # last: floor active
def test_mixture_forward_equals_merged_weights_linear_and_conv(logits):
    torch.manual_seed(0)
    model, plain, floral = _randomised(ConvNet(), 3, 0.5)
    floral.mixture.logits.data.copy_(torch.tensor(logits))
    model.eval()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    y = model(x)
    merge_into(plain, model, floral.mixture.logits.detach())
    assert torch.allclose(plain(x), y, atol=1e-6, rtol=0)
    # and by hand for the linear layer: W + sum_c max(pi_c, 0.01) (B_c A_c), b + sum_c max(pi_c, 0.01) b_c
    pi = torch.softmax(torch.tensor(logits, dtype=torch.float64), 0).clamp(min=0.01)
    ad = floral.adaptors["fc"]
    w = model.fc.weight + sum(pi[c] * ad.lora_B[c] @ ad.lora_A[c] for c in range(3))
    assert torch.allclose(plain.fc.weight, w, atol=1e-12)
    assert torch.allclose(plain.fc.bias, model.fc.bias + pi @ ad.lora_bias, atol=1e-12)


def test_conv_adaptor_is_two_factor_1xk_then_kx1():
    model, _, floral = _randomised(ConvNet(), 2, 0.5)
    r1 = resolve_rank(0.5, 3 * 3, 5 * 3)  # d_in = C_in k, d_out = C_out k
    assert floral.adaptors["c1"].lora_A.shape == (2, r1, 3, 1, 3)
    assert floral.adaptors["c1"].lora_B.shape == (2, 5, r1, 3, 1)
    assert floral.adaptors["c2"].lora_A.shape[-2:] == (1, 2) and floral.adaptors["c2"].lora_B.shape[-2:] == (3, 1)


def test_training_forward_draws_uniform_noise_and_keeps_the_floor():
    model, _, floral = _randomised(nn.Sequential(nn.Linear(4, 3)), 2, 0.5)
    floral.mixture.logits.data.copy_(torch.tensor([0.0, -50.0]))
    model.train()
    torch.manual_seed(5)
    u = torch.rand(2, dtype=torch.float64)  # the draw the forward pass will make
    torch.manual_seed(5)
    floral.mixture.begin()
    expect = torch.softmax(torch.tensor([0.0, -50.0], dtype=torch.float64) + u, 0).clamp(min=0.01)
    assert torch.allclose(floral.mixture.weights(), expect)
    assert float(floral.mixture.weights()[1].detach()) == pytest.approx(0.01)  # floor, not renormalised
    floral.mixture.end()


def test_deep_copied_model_hooks_its_own_adaptors():
    model, _, floral = _randomised(nn.Sequential(nn.Linear(4, 3)), 2, 0.5)
    twin = copy.deepcopy(model)
    x = torch.randn(2, 4, dtype=torch.float64)
    model.eval(), twin.eval()
    y = model(x)
    with torch.no_grad():
        twin.floral.adaptors["0"].lora_B.zero_()
        twin.floral.adaptors["0"].lora_bias.zero_()
    assert torch.equal(model(x), y) and torch.allclose(twin(x), twin[0](x))


def test_rank_rule_and_overhead_match_the_spec_table():
    # MNIST MLP 784-200-10, K = 4: A = 1,404 (rho 1%) and 15,180 (rho 10%); P = 159,010.
    for rho, ranks, a in [(0.01, (1, 1), 1404), (0.1, (15, 1), 15180)]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(784, 200), nn.ReLU(), nn.Linear(200, 10))
        assert sum(p.numel() for p in model.parameters()) == 159010
        floral = attach_floral(model, 4, rho)
        assert (floral.adaptors["0"].lora_A.shape[1], floral.adaptors["2"].lora_A.shape[1]) == ranks
        assert floral.adaptor_params() == 4 * a
    assert resolve_rank(3.0, 100, 100) == 3 and resolve_rank(0.001, 10, 10) == 1


# ----------------------------------------------------------------------------- aggregation


def test_aggregation_by_hand_base_by_data_size_adaptors_by_p_i_given_c():
    # Client 0: n = 1, pi = (1/2, 1/2); client 1: n = 3, pi = (1/4, 3/4).
    # p(i) = (1/4, 3/4); p(i, c) = [[1/8, 1/8], [3/16, 9/16]]; p(c) = (5/16, 11/16)
    # p(i | 0) = (2/5, 3/5); p(i | 1) = (2/11, 9/11).
    d0 = {"w": torch.tensor([4.0]), "floral.adaptors.fc.lora_A": torch.tensor([[1.0, 2.0], [3.0, 4.0]])}
    d1 = {"w": torch.tensor([8.0]), "floral.adaptors.fc.lora_A": torch.tensor([[6.0, 2.0], [-8.0, 15.0]])}
    replies = {
        0: Message({**d0, LOGITS: torch.tensor([0.0, 0.0])}, {NUM_EXAMPLES: 1}),
        1: Message({**d1, LOGITS: torch.tensor([0.0, math.log(3.0)])}, {NUM_EXAMPLES: 3}),
    }
    p, pc = mixture_weights(replies, "examples", 2)
    assert p == {0: 0.25, 1: 0.75}
    assert torch.allclose(pc[0], torch.tensor([0.4, 2 / 11], dtype=torch.float64))
    mean = mixture_average(replies, p, pc, lambda n: STACKED if n.startswith("floral.adaptors.") else None)
    assert mean["w"].item() == pytest.approx(0.25 * 4 + 0.75 * 8)
    expect = torch.tensor([[0.4 * 1 + 0.6 * 6, 0.4 * 2 + 0.6 * 2],
                           [2 / 11 * 3 - 9 / 11 * 8, 2 / 11 * 4 + 9 / 11 * 15]])
    assert torch.allclose(mean["floral.adaptors.fc.lora_A"], expect, atol=1e-6)
    assert LOGITS not in mean


def test_server_applies_the_p_i_given_c_mean_to_the_global_adaptors():
    cfg = toy_config(*FLORAL)
    sc = toy_scenario(cfg)
    method = build_method(cfg)
    state = method.setup(sc)
    before = {k: v.clone() for k, v in state["global"].items()}
    a = "floral.adaptors.fc1.lora_A"
    deltas = {0: torch.ones_like(before[a]), 1: -torch.ones_like(before[a])}
    replies = {cid: Message({**{k: torch.zeros_like(v) for k, v in before.items()}, a: deltas[cid],
                             LOGITS: torch.tensor([0.0, math.log(3.0)]) if cid else torch.zeros(2)},
                            {NUM_EXAMPLES: 1 + 2 * cid}) for cid in (0, 1)}
    state = method.aggregate(state, 1, replies)
    step = torch.tensor([0.4 - 0.6, 2 / 11 - 9 / 11]).view(2, 1, 1)  # p(0|c) - p(1|c)
    assert torch.allclose(state["global"][a] - before[a], step.expand_as(before[a]), atol=1e-6)
    assert torch.equal(state["global"]["fc1.weight"], before["fc1.weight"])


# ----------------------------------------------------------------------------- runs on the toy model


def _run(*overrides, clusters=True):
    cfg = toy_config(*FLORAL, *overrides)
    sc = toy_scenario(cfg)
    if clusters:
        sc.client_clusters = [c % 2 for c in range(sc.num_clients)]
    method = build_method(cfg)
    ledger = Ledger()
    backend = SimulatedBackend(sc, method, Link("fp32", "fp32", ledger, cfg.seed))
    state = method.setup(sc)
    knobs = {c: method.plan(c, None)[0] for c in range(sc.num_clients)}
    return sc, method, backend, state, knobs, ledger


def _round(method, backend, state, knobs, rnd, cids):
    replies, _ = backend.run_round(rnd, method.configure(state, rnd, cids), knobs, {c: 0 for c in cids})
    return method.aggregate(state, rnd, replies), replies


def test_oracle_router_is_one_hot_and_never_changes(monkeypatch):
    sc, method, backend, state, knobs, _ = _run("method.router=oracle")
    for rnd in (1, 2):
        state, replies = _round(method, backend, state, knobs, rnd, [0, 1, 3])
        for cid, m in replies.items():
            pi = torch.softmax(m.tensors[LOGITS], 0)
            assert torch.equal(m.tensors[LOGITS], torch.tensor([0.0, -100.0] if cid % 2 == 0 else [-100.0, 0.0]))
            assert pi[cid % 2] == 1.0 and pi.sum() == 1.0
    assert not sc.model.floral.mixture.logits.requires_grad
    assert all(not s for s in backend.client_states.values())  # nothing to keep: the cluster is known
    logits = []
    import hetfl.methods.floral as floral

    orig = floral.merge_into
    monkeypatch.setattr(floral, "merge_into", lambda plain, model, w: logits.append(w) or orig(plain, model, w))
    method.client_eval_model(state, 5, {})
    assert torch.equal(logits[0], torch.tensor([-100.0, 0.0]))


def test_stateful_clients_keep_only_their_logits():
    sc, method, backend, state, knobs, _ = _run()
    state, replies = _round(method, backend, state, knobs, 1, [0, 2])
    assert set(backend.client_states[0]) == {"logits"} and backend.client_states[0]["logits"].shape == (2,)
    assert torch.equal(backend.client_states[2]["logits"], replies[2].tensors[LOGITS])
    assert "logits" not in state  # the server keeps none


@pytest.mark.parametrize("option", ["server", "uniform"])
def test_stateless_clients_carry_nothing_and_the_ledger_shows_the_logits(option):
    k = 2
    sc, method, backend, state, knobs, ledger = _run("method.state=stateless", f"method.stateless_logits={option}")
    n_floats = sum(v.numel() for v in state["global"].values())
    for rnd in (1, 2, 3):
        payload = {cid: method.payload(state, rnd, cid, len(sc.client_data[cid])) for cid in (0, 1, 2)}
        state, replies = _round(method, backend, state, knobs, rnd, [0, 1, 2])
        assert all(not s for s in backend.client_states.values())
        for cid in (0, 1, 2):
            down = ledger.bytes(rnd=rnd, cid=cid, direction="down")
            up = ledger.bytes(rnd=rnd, cid=cid, direction="up")
            assert down == 4 * (n_floats + (k if option == "server" else 0))  # fp32; logits only from the server
            assert up == 4 * (n_floats + k) + replies[cid].meta_nbytes()  # logits always go up (for p(i|c))
            # the analytic payload, its loss counted at TYPICAL_LOSS's length
            loss_chars = len(json.dumps(replies[cid].meta[TRAIN_LOSS])) - len(json.dumps(TYPICAL_LOSS))
            assert payload[cid] == (down, up - loss_chars)
    if option == "server":
        assert set(state["logits"]) == {0, 1, 2}
        # what came down in round 3 is what went up in round 2
        assert torch.equal(method.configure(state, 4, [1])[1].tensors[LOGITS], replies[1].tensors[LOGITS])
    else:
        assert "logits" not in state


def test_stateless_run_completes_with_empty_client_states():
    cfg = toy_config(*FLORAL, "method.state=stateless", "method.stateless_logits=uniform", "rounds=2")
    sc = toy_scenario(cfg)
    hist = run_rounds(sc, build_method(cfg))
    assert len(hist) == 3 and math.isfinite(hist[-1]["train_loss"])


def test_run_reports_parameter_overhead_k_times_adaptor_size():
    cfg = toy_config(*FLORAL, "rounds=1", "method.rho=0.01")
    hist = run_rounds(toy_scenario(cfg), build_method(cfg))
    # ToyNet 6-8-3: P = 83; rank 1 each: A = (6 + 8) + 8 + (8 + 3) + 3 = 36; K = 2.
    assert hist[-1]["adaptor_params"] == 2 * 36
    assert hist[-1]["param_overhead_pct"] == pytest.approx(100 * 72 / 83)


def test_floral_toy_run_pinned_and_order_independent():
    cfg = toy_config(*FLORAL, "rounds=2")
    hist = run_rounds(toy_scenario(cfg), build_method(cfg))
    assert [round(m["train_loss"], 4) for m in hist[1:]] == [1.1682, 0.7866]
    rev = run_rounds(toy_scenario(cfg), build_method(cfg), order="reverse")
    assert [m["train_loss"] for m in rev[1:]] == [m["train_loss"] for m in hist[1:]]


def test_local_adaptor_keeps_its_adaptor_private_and_sends_only_the_base():
    sc, method, backend, state, knobs, _ = _run("method.name=local-adaptor")
    assert sc.model.floral.mixture.logits.shape == (1,) and not any(k.startswith("floral.") for k in state["global"])
    state, replies = _round(method, backend, state, knobs, 1, [0, 1])
    assert set(replies[0].tensors) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert set(backend.client_states[0]) == {"private"}  # K = 1: no logits to keep
    private = backend.client_states[0]["private"]
    assert set(private) == {f"floral.adaptors.{n}" for n in
                            ("fc1.lora_A", "fc1.lora_B", "fc1.lora_bias", "fc2.lora_A", "fc2.lora_B", "fc2.lora_bias")}
    assert not torch.equal(private["floral.adaptors.fc1.lora_B"], backend.client_states[1]["private"]["floral.adaptors.fc1.lora_B"])
    assert method.report(state, 1, []).stats["adaptor_params"] == 36


def test_ensemble_averages_member_c_with_p_i_given_c_and_reports_overhead():
    sc, method, backend, state, knobs, _ = _run("method.name=ensemble")
    assert member_of("members.1.fc2.bias") == 1
    assert not torch.equal(state["global"]["members.0.fc1.weight"], state["global"]["members.1.fc1.weight"])
    state, replies = _round(method, backend, state, knobs, 1, [0, 1])
    assert method.report(state, 1, []).stats["param_overhead_pct"] == pytest.approx(100.0)


# ----------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("override, key", [
    ("method.rho=0", "method.rho"),
    ("method.router=magic", "method.router"),
    ("method.state=forgetful", "method.state"),
    ("method.stateless_logits=client", "method.stateless_logits"),
    ("method.router_lr=-1", "method.router_lr"),
    ("method.floor=1.5", "method.floor"),
    ("method.num_adaptors=-2", "method.num_adaptors"),
    ("data.clusters=-1", "data.clusters"),
    ("data.fraction=0", "data.fraction"),
    ("data.fraction=1.5", "data.fraction"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}:"):
        toy_config(*FLORAL, override)


def test_bad_combinations_name_the_key():
    with pytest.raises(ConfigError, match=r"^data.cluster_shift:"):
        toy_config("data.cluster_shift=rotate")
    with pytest.raises(ConfigError, match=r"^method.num_adaptors:"):
        toy_config(*FLORAL, "method.name=local-adaptor", "method.num_adaptors=3")
    with pytest.raises(ConfigError, match=r"^method.num_adaptors:"):  # no clusters to default to
        cfg = toy_config("method.name=floral")
        build_method(cfg).setup(toy_scenario(cfg))
    with pytest.raises(ConfigError, match=r"^method.router:"):  # oracle without true clusters
        cfg = toy_config(*FLORAL, "method.router=oracle")
        build_method(cfg).setup(toy_scenario(cfg))
