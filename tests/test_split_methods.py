"""The split-learning methods against hand computations: FedVZ's forward-only server and its
zeroth-order cut gradient, SplitFed V1's weighted average of server copies, FedV with a frozen
body as centralised head+tail training, personal tails, Ditto, and the shipped split presets."""

import copy

import pytest
import torch
from test_split import B, one_round, split_cfg

import hetfl.methods.fedvz as fedvz_mod
from hetfl.config import load_config
from hetfl.seeding import generator
from hetfl.engine.link import UP
from hetfl.methods.fedvz import draw_directions, perturb, zo_gradient
from hetfl.models.classifiers import build_image_classifier

torch.set_num_threads(1)

# ----------------------------------------------------------------------------- FedVZ


def test_fedvz_server_builds_no_graph_and_no_gradient_goes_up(monkeypatch):
    seen = []
    real = fedvz_mod.body_forward

    def spy(model, h, mask, cut):
        out = real(model, h, mask, cut)
        seen.append((torch.is_grad_enabled(), h.requires_grad, out.requires_grad, out.grad_fn))
        return out

    monkeypatch.setattr(fedvz_mod, "body_forward", spy)
    ledger, m, *_ = one_round(split_cfg("mlp", {"name": "fedvz", "q": 2}))
    assert len(seen) == 2 * 2 and all(s == (False, False, False, None) for s in seen)
    assert not any(p.requires_grad for p in m.split.server_model.parameters())
    up_kinds = {k for d, k in ledger.by_kind() if d == UP}
    assert up_kinds == {"activations", "update"} and not any("grad" in k for k in up_kinds)


@pytest.mark.parametrize("directions,difference", [("gaussian", "central"), ("sphere", "forward")])
def test_zo_cut_gradient_correlates_with_the_true_gradient(directions, difference):
    """mlp cut 0 (128 numbers per sample): with mu small and q >> d the estimate of
    d(sum_b loss_b)/dh points the same way as autograd's (cosine ~ sqrt(q / (q + d)))."""
    model = build_image_classifier("mlp", 10, seed=0)
    g = torch.Generator().manual_seed(0)
    batch = {"pixel_values": torch.rand(2, 1, 32, 32, generator=g), "labels": torch.tensor([3, 7])}

    def losses(h):  # per-sample losses of the server body + client tail, batch repeated as stacked
        reps = h.shape[0] // 2
        logits = model.tail(model.run_block(0, h, None), None)
        return torch.nn.functional.cross_entropy(logits, batch["labels"].repeat(reps), reduction="none")

    with torch.no_grad():
        h, _ = model.stem(batch)  # (2, 128)
    hg = h.clone().requires_grad_(True)
    losses(hg).sum().backward()
    u = draw_directions(tuple(h.shape), 3000, directions, g)
    eps = 1e-3 * float(h.pow(2).mean().sqrt())
    with torch.no_grad():
        est = zo_gradient(losses(perturb(h, u, eps, difference)), u, eps, difference)
    cos = torch.nn.functional.cosine_similarity(est.flatten(), hg.grad.flatten(), dim=0)
    assert cos > 0.9


def test_zo_gradient_by_hand():
    """q = 1, B = 2, d = 2: forward difference coefficients (l+ - l0)/eps times the direction."""
    u = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # (q=1, B=2, 2)
    losses = torch.tensor([1.0, 2.0, 1.5, 1.0])  # clean l0 = (1, 2); perturbed (1.5, 1.0)
    est = zo_gradient(losses, u, 0.5, "forward")
    assert torch.allclose(est, torch.tensor([[1.0, 0.0], [0.0, -4.0]]))  # (0.5/0.5)*u0, (-1/0.5)*u1
    central = zo_gradient(torch.tensor([0.0, 0.0, 3.0, 1.0, 2.0, 2.0]), u, 0.5, "central")
    # stack order [clean, +u, -u]: l+ = (3, 1), l- = (2, 2) -> coefficients (3-2)/1 = 1 and (1-2)/1 = -1
    assert torch.allclose(central, torch.tensor([[1.0, 0.0], [0.0, -2.0]]))


# ----------------------------------------------------------------------------- SplitFed


def test_splitfed_v1_aggregate_is_the_weighted_average_of_server_copies():
    cfg = load_config({
        "seed": 4, "rounds": 1, "model": {"name": "mlp"},
        "data": {"name": "digits", "samples_per_family": 6, "eval_samples": 20, "partition": "dirichlet", "alpha": 0.5},
        "train": {"optimizer": "sgd", "lr": 0.1, "local_steps": 2, "batch_size": 4},
        "method": {"name": "splitfed-v1"},
        "population": {"num_clients": 3, "clients_per_round": 3, "tiers": {"laptop": 1}},
    })
    _, m, state, replies, ctxs, _ = one_round(cfg)
    n = {c: len(ctxs[c].data) for c in ctxs}
    assert len(set(n.values())) > 1  # unequal data sizes: the weights matter
    server = m.split.server_names(0)
    assert server == ("blocks.0.fc.weight", "blocks.0.fc.bias", "classifier.weight", "classifier.bias")
    for name in server:
        copies = [m.copies.trained[c][name] for c in sorted(n)]
        assert not torch.equal(copies[0], copies[1])  # distinct copies
        expected = sum(n[c] * m.copies.trained[c][name] for c in sorted(n)) / sum(n.values())
        assert torch.allclose(state["global"][name], expected, atol=1e-7)


def test_splitfed_v1_with_sgd_equals_fedavg_full():
    """Per-client server copies trained by the same SGD steps and averaged with the same weights
    are FedAvg over the whole model, split or not."""
    _, _, split_state, *_ = one_round(split_cfg("mlp", {"name": "splitfed-v1"}))
    _, full, full_state, *_ = one_round(split_cfg("mlp", {"name": "fedavg-full"}))
    for name, t in full_state["global"].items():
        assert torch.allclose(split_state["global"][name], t, atol=1e-6), name


def test_splitfed_v2_serves_clients_in_turn_with_one_server_model():
    _, m, state, replies, _, _ = one_round(split_cfg("mlp", {"name": "splitfed-v2"}))
    assert m.order == m.client_order(1, [0, 1]) and sorted(m.order) == [0, 1]  # the seeded service order
    assert m.client_order(1, [0, 1]) == m.client_order(1, [0, 1])
    for name in m.split.server_names(0):  # no averaging: the global server part is the one trained model
        assert torch.equal(state["global"][name], dict(m.split.server_model.named_parameters())[name])


# ----------------------------------------------------------------------------- FedV


def test_fedv_frozen_body_one_client_one_step_is_centralised_head_and_tail_training():
    cfg = load_config({
        "seed": 5, "rounds": 1, "model": {"name": "tiny-vit-random"},
        "data": {"name": "digits", "samples_per_family": 6, "eval_samples": 20, "partition": "iid"},
        "train": {"optimizer": "sgd", "lr": 0.5, "local_steps": 1, "batch_size": 8},
        "method": {"name": "fedv", "body": "frozen", "cut": 1},
        "population": {"num_clients": 1, "clients_per_round": 1, "tiers": {"laptop": 1}},
    })
    from hetfl.scenario import build_scenario

    ref = copy.deepcopy(build_scenario(cfg).model)  # the same initial model
    _, m, state, _, ctxs, sc = one_round(cfg)
    batch = next(sc.task.batches(ctxs[0].data, 1, 8, generator(cfg.seed, 1, 0, "batches")))
    trained = set(m.split.client_names(1))
    params = [p for n, p in ref.named_parameters() if n in trained]
    for n, p in ref.named_parameters():
        p.requires_grad_(n in trained)
    torch.nn.functional.cross_entropy(ref(batch), batch["labels"]).backward()
    with torch.no_grad():
        for p in params:
            p -= 0.5 * p.grad
    for n, p in ref.named_parameters():
        assert torch.allclose(state["global"][n], p, atol=1e-6, rtol=0), n
    assert any(not torch.equal(state["global"][n], p0) for n, p0 in build_scenario(cfg).model.named_parameters()
               if n in trained)  # something trained


def test_fedv_trained_body_moves_and_personal_tails_stay_home():
    ledger, m, state, replies, ctxs, sc = one_round(split_cfg("mlp", {"name": "fedv", "personal_tail": True}))
    from hetfl.scenario import build_scenario

    init = {n: p.detach().clone() for n, p in build_scenario(split_cfg("mlp")).model.named_parameters()}
    for c, ctx in ctxs.items():
        assert set(ctx.state["tail"]) == {"classifier.weight", "classifier.bias"}
        assert not set(replies[c].tensors) & set(ctx.state["tail"])  # tails never go up
    assert torch.equal(state["global"]["classifier.weight"], init["classifier.weight"])  # global tail untouched
    personal = m.client_eval_model(state, 0, ctxs[0].state)
    assert torch.equal(personal.classifier.weight, ctxs[0].state["tail"]["classifier.weight"])
    assert not torch.equal(state["global"]["blocks.0.fc.weight"], init["blocks.0.fc.weight"])  # body trained


def test_fedv_body_step_uses_gradients_averaged_over_clients():
    """One local step, two clients: the body moves by -lr times the per-sample mean of both
    clients' body gradients (one big batch), which we recompute by hand with autograd."""
    cfg = split_cfg("mlp", {"name": "fedv"}, local_steps=1)
    from hetfl.scenario import build_scenario

    ref = copy.deepcopy(build_scenario(cfg).model)
    _, m, state, _, ctxs, sc = one_round(cfg)
    grads = []
    for cid in sorted(ctxs):
        batch = next(sc.task.batches(ctxs[cid].data, 1, B, generator(cfg.seed, 1, cid, "batches")))
        w = ref.blocks[0].fc.weight.detach().clone().requires_grad_(True)
        with torch.no_grad():
            h, _ = ref.stem(batch)
        out = torch.relu(h @ w.T + ref.blocks[0].fc.bias)
        torch.nn.functional.cross_entropy(ref.tail(out, None), batch["labels"]).backward()
        grads.append(w.grad)
    expected = ref.blocks[0].fc.weight - 0.05 * (grads[0] + grads[1]) / 2
    assert torch.allclose(state["global"]["blocks.0.fc.weight"], expected, atol=1e-6)


# ----------------------------------------------------------------------------- Ditto


def test_ditto_global_is_fedavg_and_personal_models_stay_on_clients():
    ledger, m, state, replies, ctxs, _ = one_round(split_cfg("mlp", {"name": "ditto", "lam": 0.1}))
    _, _, full_state, *_ = one_round(split_cfg("mlp", {"name": "fedavg-full"}))
    for n, t in full_state["global"].items():
        assert torch.equal(state["global"][n], t)
    for c, ctx in ctxs.items():
        v = ctx.state["personal"]
        assert not torch.equal(v["classifier.weight"], state["global"]["classifier.weight"])
        model = m.client_eval_model(state, c, ctx.state)
        assert torch.equal(model.classifier.weight, v["classifier.weight"])
    assert {k for _, k in ledger.by_kind()} == {"model", "update"}


def test_ditto_lambda_pulls_the_personal_model_towards_the_global_one():
    _, _, state, _, ctxs, _ = one_round(split_cfg("mlp", {"name": "ditto", "lam": 0.0}))
    _, _, state_b, _, ctxs_b, _ = one_round(split_cfg("mlp", {"name": "ditto", "lam": 1.0}, lr=0.05))
    d0 = (ctxs[0].state["personal"]["blocks.0.fc.weight"] - state["global"]["blocks.0.fc.weight"]).norm()
    d1 = (ctxs_b[0].state["personal"]["blocks.0.fc.weight"] - state_b["global"]["blocks.0.fc.weight"]).norm()
    assert d1 < d0


# ----------------------------------------------------------------------------- presets

METHODS = ["fedv", "fedvz", "splitfed-v1", "splitfed-v2", "fedavg-full", "ditto"]


@pytest.mark.parametrize("preset", ["split-vision", "split-vision-path", "split-text"])
@pytest.mark.parametrize("method", METHODS)
def test_split_presets_load_with_every_method(preset, method):
    cfg = load_config(preset, [f"method.name={method}"])
    assert cfg.method.name == method and cfg.data.client_test_fraction > 0
    assert cfg.data.partition == ("pathological" if preset.endswith("path") else "dirichlet")


@pytest.mark.parametrize("method", METHODS)
def test_split_vision_runs_one_small_round_per_method(method):
    from hetfl.engine.loop import run_rounds
    from hetfl.runner import build_method
    from hetfl.scenario import build_scenario

    cfg = load_config("split-vision", [
        f"method.name={method}", "rounds=1", "train.local_steps=1", "train.batch_size=2", "eval.at_start=false",
        "population.num_clients=4", "population.clients_per_round=2", "data.samples_per_family=10",
        "data.eval_samples=30"])
    hist = run_rounds(build_scenario(cfg), build_method(cfg))
    assert "eval_client_accuracy_mean" in hist[-1] and hist[-1]["bytes_up"] > 0
    assert ("server_flops" in hist[-1]) == (method not in ("fedavg-full", "ditto"))


@pytest.mark.parametrize("schedule", ["step", "round"])
def test_fedv_body_schedules_against_a_parallel_reference(schedule):
    """Two clients, two SGD steps. 'step' runs in lockstep: step k of both clients sees body
    version k, and the body takes one step per local step on the mean of both clients' body
    gradients. 'round': the body stays at its round-start value during the round and then takes
    one step on the mean of all four gradients. Recomputed here with each client's own copy
    of its part and one shared body."""
    from torch.func import functional_call

    from hetfl.scenario import build_scenario

    cfg = split_cfg("mlp", {"name": "fedv", "body_schedule": schedule})
    ref = build_scenario(cfg).model
    _, m, state, replies, ctxs, sc = one_round(cfg)
    assert (m.schedule == "lockstep") == (schedule == "step")
    init = {n: p.detach().clone() for n, p in ref.named_parameters()}
    client_names, lr = set(m.split.client_names(0)), 0.05
    body = {n: t for n, t in init.items() if n not in client_names}
    mine = {c: {n: t.clone() for n, t in init.items() if n in client_names} for c in ctxs}
    batches = {c: list(sc.task.batches(ctxs[c].data, 2, B, generator(cfg.seed, 1, c, "batches"))) for c in ctxs}
    body_grads = []
    for k in range(2):
        for c in sorted(ctxs):
            params = {n: t.clone().requires_grad_(True) for n, t in {**body, **mine[c]}.items()}
            loss = torch.nn.functional.cross_entropy(functional_call(ref, params, (batches[c][k],)),
                                                     batches[c][k]["labels"])
            loss.backward()
            mine[c] = {n: (params[n] - lr * params[n].grad).detach() for n in mine[c]}
            body_grads.append({n: params[n].grad for n in body})
        if schedule == "step":
            body = {n: body[n] - lr * sum(g[n] for g in body_grads) / len(body_grads) for n in body}
            body_grads = []
    if schedule == "round":
        body = {n: body[n] - lr * sum(g[n] for g in body_grads) / len(body_grads) for n in body}
    w = {c: replies[c].meta["num_examples"] for c in ctxs}
    for n, t in state["global"].items():
        expected = body[n] if n in body else sum(mine[c][n] * w[c] for c in ctxs) / sum(w.values())
        assert torch.allclose(t, expected, atol=1e-6), n
    assert not torch.equal(state["global"]["blocks.0.fc.weight"], init["blocks.0.fc.weight"])
