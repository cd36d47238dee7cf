"""FedHDS: hierarchical selection on hand-built 2-D clusters (order invariance, ledger bytes,
privacy noise, aggregation weights, data fraction) and its features on tiny-llama."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from toy import ToyTask, toy_config, toy_scenario

from hetfl.engine.api import NUM_EXAMPLES, ClientContext, Message
from hetfl.engine.link import Ledger, Link
from hetfl.engine.loop import run_rounds, sample_clients
from hetfl.engine.sim import SimulatedBackend
from hetfl.runner import build_method
from hetfl.selection.fedhds import STASH, FedHDS, FedHDSConfig, server_select

OFFSETS = np.array([[0.0, 0.0], [0.31, 0.12], [-0.22, 0.27], [0.13, -0.33], [0.05, 0.04]])  # 5 pts, asymmetric
CENTERS = {"a": (0.0, 0.0), "b": (9.0, 0.7), "c": (1.3, 8.1), "d": (10.4, 11.2)}  # irregular: no distance ties
# Which skills each client holds (shared skills are redundant across clients), plus a stray point.
# Clients 0-2 share a, b, c (jittered along a line, so client 1's centroid is the middle one and
# no server cluster is a 2-way tie); d is held by client 2 alone.
CLIENT_SKILLS = [("a", "b", "c"), ("c", "a", "b"), ("b", "c", "d", "a"), ("a",), ("d", "b"), ("c",)]


@dataclasses.dataclass
class PointTask(ToyTask):
    """Toy task whose selection features are the first two input coordinates (no reduction needed)."""

    def selection_features(self, model, samples):
        return torch.stack([s[0][:2] for s in samples]).numpy()


def client_points(c: int) -> np.ndarray:
    """(n, 2): 5 points per skill, jittered per client, plus one far stray point (HDBSCAN noise)."""
    pts = [np.array(CENTERS[s]) + OFFSETS * (1 + 0.1 * c) + 0.05 * c for s in CLIENT_SKILLS[c]]
    return np.concatenate(pts + [np.array([[30.0 + c, -20.0]])])


def point_samples(pts: np.ndarray) -> list:
    x = torch.zeros(len(pts), 6)
    x[:, :2] = torch.as_tensor(pts, dtype=torch.float32)
    return [(x[i], torch.zeros(3)) for i in range(len(pts))]


def point_scenario(*overrides):
    cfg = toy_config("selection.name=fedhds", "selection.reduction=none", "selection.min_cluster_size=3", *overrides)
    sc = toy_scenario(cfg)
    sc.client_data = [point_samples(client_points(c)) for c in range(6)]
    sc.task = PointTask(sc.task.eval_x, sc.task.eval_y)
    return cfg, sc


def ctx_for(cid, data, task, rnd=1):
    return ClientContext(cid=cid, rnd=rnd, data=data, device=None, knobs={}, state={}, seed=3,
                         model=torch.nn.Linear(1, 1), task=task)


def sk_centroids(pts, mcs):
    """Independent reference: sklearn's own probability-weighted cluster centroids."""
    from sklearn.cluster import HDBSCAN

    h = HDBSCAN(min_cluster_size=mcs, store_centers="centroid", copy=True).fit(pts)
    return h.centroids_


def run_selection(sel, cids, datas, task):
    ctxs = {c: ctx_for(c, datas[c], task) for c in cids}
    decisions = sel.decide(1, {c: sel.summarize(ctxs[c]) for c in cids})
    return {c: sel.apply(decisions[c], ctxs[c]) for c in cids}


# ----------------------------------------------------------------------------- selection rule


def test_selects_real_samples_nearest_kept_centroids_in_any_data_order():
    task = PointTask(torch.zeros(1, 6), torch.zeros(1, 3))
    sel = FedHDS(None, FedHDSConfig(reduction="none", min_cluster_size=3))
    cids = [0, 1, 2]
    pts = {c: client_points(c) for c in cids}
    # Expected, from sklearn's centroids: per server cluster, the client centroid nearest its centre;
    # then that client's real point nearest the centroid.
    cents = [(c, cen) for c in cids for cen in sk_centroids(pts[c], 3)]
    allc = np.stack([cen for _, cen in cents])
    centres = sk_centroids(allc, 2)
    assert len(centres) == 3  # a, b, c; d is held by client 2 alone: server noise, dropped
    expected = set()
    for centre in centres:
        c, cen = cents[int(np.argmin(np.linalg.norm(allc - centre, axis=1)))]
        expected.add((c, tuple(pts[c][int(np.argmin(np.linalg.norm(pts[c] - cen, axis=1)))])))
    assert len(expected) == 3

    def chosen(perms):
        datas = {c: point_samples(pts[c][perms[c]]) for c in cids}
        picked = run_selection(sel, cids, datas, task)
        return {(c, tuple(pts[c][perms[c]][i])) for c in cids for i in picked[c]}

    ident = {c: np.arange(len(pts[c])) for c in cids}
    assert chosen(ident) == expected
    rng = np.random.default_rng(0)
    for _ in range(3):
        assert chosen({c: rng.permutation(len(pts[c])) for c in cids}) == expected


def test_server_keeps_the_middle_centroid_per_cluster_and_drops_or_keeps_noise():
    entries = [(0, 0, np.array([0.0, 0.0])), (1, 0, np.array([1.0, 0.0])), (2, 0, np.array([2.0, 0.0])),
               (0, 1, np.array([10.0, 10.0])), (2, 1, np.array([11.0, 10.0])), (1, 1, np.array([12.0, 10.0])),
               (2, 2, np.array([50.0, -40.0]))]  # the last is alone: server noise
    # Symmetric clusters: the weighted centre is the middle member (client 1 in the first, 2 in the second).
    assert server_select(entries, 2, "drop") == {0: [], 1: [0], 2: [1]}
    assert server_select(entries, 2, "keep") == {0: [], 1: [0], 2: [1, 2]}
    assert server_select(list(reversed(entries)), 2, "drop") == {0: [], 1: [0], 2: [1]}  # arrival order


def test_client_noise_points_are_never_representatives_unless_singleton():
    task = PointTask(torch.zeros(1, 6), torch.zeros(1, 3))
    pts = client_points(0)  # 3 skills x 5 clustered points + 1 stray
    data = point_samples(pts)
    for noise, n_groups in (("drop", 3), ("singleton", 4)):
        sel = FedHDS(None, FedHDSConfig(reduction="none", min_cluster_size=3, client_noise=noise))
        ctx = ctx_for(0, data, task)
        up = sel.summarize(ctx)
        assert up.tensors["centroids"].shape == (n_groups, 2)
        assert up.tensors["group_ids"].tolist() == list(range(n_groups))
        keep_all = Message({"keep": up.tensors["group_ids"]})
        picked = sel.apply(keep_all, ctx)
        assert (len(pts) - 1 in picked) == (noise == "singleton")


# ----------------------------------------------------------------------------- privacy


@pytest.mark.parametrize("squash,std", [(False, 0.0), (True, 0.0), (False, 0.5), (True, 0.2)])
def test_uploaded_centroids_squash_and_noise(squash, std):
    grid = np.array([[12.0 * i, 12.0 * j] for i in range(15) for j in range(15)])  # 225 clusters
    pts = np.concatenate([g + OFFSETS[:3] for g in grid]) / 60  # within +-2.8: tanh does not round to 1
    task = PointTask(torch.zeros(1, 6), torch.zeros(1, 3))
    sel = FedHDS(None, FedHDSConfig(reduction="none", min_cluster_size=3, squash=squash, noise_std=std))
    ctx = ctx_for(0, point_samples(pts), task)
    up = sel.summarize(ctx).tensors["centroids"]
    clean = torch.as_tensor(ctx.state[STASH][2], dtype=torch.float32)
    assert up.shape == (225, 2)
    ref = torch.tanh(clean) if squash else clean
    if std == 0 and not squash:
        assert torch.equal(up, clean)
    elif std == 0:
        assert up.abs().max() < 1 and torch.allclose(up, ref)
    else:
        assert float((up - ref).std()) == pytest.approx(std, rel=0.12)
        assert abs(float((up - ref).mean())) < 3 * std / 450 ** 0.5


# ----------------------------------------------------------------------------- through the engine


def test_only_centroids_and_group_ids_cross_the_link_and_fraction_is_exact():
    cfg, sc = point_scenario("rounds=2")  # round 3 keeps no group at all: an error (test_selection_methods.py)
    h = run_rounds(sc, build_method(cfg))
    for m in h[1:]:
        cids = sample_clients(cfg.seed, m["round"], 6, 3)
        groups = {c: len(sk_centroids(client_points(c), 3)) for c in cids}
        kinds = set(m["bytes_by_kind"])
        assert kinds <= {"down:model", "up:update", "up:centroids", "down:selection"}
        assert m["bytes_by_kind"]["up:centroids"] == sum(g * 2 * 4 + g * 4 for g in groups.values())
        # One real sample per server cluster; 4 bytes (int32) per kept group id on the way down.
        assert m["bytes_by_kind"]["down:selection"] == 4 * m["coreset_size"]
        total = sum(len(sc.client_data[c]) for c in cids)
        assert m["data_fraction"] == pytest.approx(m["coreset_size"] / total)
        allc = np.stack([cen for c in cids for cen in sk_centroids(client_points(c), 3)])
        assert m["coreset_size"] == len(sk_centroids(allc, 2))  # = number of server clusters


def test_aggregation_weights_are_coreset_sizes_and_empty_clients_contribute_nothing():
    cfg, sc = point_scenario()
    method = build_method(cfg)
    state = method.setup(sc)
    sel = FedHDS(cfg, cfg.selection)
    backend = SimulatedBackend(sc, method, Link("fp32", "fp32", Ledger(), cfg.seed), selector=sel)
    # Client 3 holds only skill "a", shared with 0 and 1: the server keeps one "a" group, never all.
    cids = [0, 1, 3]
    knobs, mem = {c: {} for c in cids}, {c: 0 for c in cids}
    old = {k: v.clone() for k, v in state["global"].items()}
    replies, ctxs = backend.run_round(1, method.configure(state, 1, cids), knobs, mem)
    sizes = {c: len(ctxs[c].data) for c in cids}
    assert 0 in sizes.values() and sum(sizes.values()) == 3  # skills a, b, c: one sample each
    assert set(replies) == {c for c in cids if sizes[c] > 0}
    assert all(replies[c].meta[NUM_EXAMPLES] == sizes[c] for c in replies)
    state = method.aggregate(state, 1, replies)
    total = sum(sizes.values())
    for k in old:
        want = old[k] + sum(replies[c].tensors[k] * sizes[c] / total for c in sorted(replies))
        assert torch.allclose(state["global"][k], want, atol=1e-7)


# ----------------------------------------------------------------------------- tiny-llama features


@pytest.fixture(scope="module")
def llama():
    from hetfl.data.instruct import encode_examples, make_synth_instruct
    from hetfl.models.builders import load_causal_lm
    from hetfl.models.lora import inject_lora

    model, tok = load_causal_lm("tiny-llama")
    inject_lora(model, rank=2, alpha=4, targets=("q_proj", "v_proj"), generator=torch.Generator().manual_seed(0))
    samples = encode_examples(tok, make_synth_instruct(2, 0, ("add", "uppercase", "list_max")), 64)
    return model, tok, samples


def test_features_fuse_all_layers_batch_invariant_and_counted(llama):
    from hetfl.selection.features import last_token_features

    model, tok, samples = llama
    c = model.config
    one = last_token_features(model, samples, tok.pad_token_id, batch_size=1)
    many = last_token_features(model, samples, tok.pad_token_id, batch_size=6)
    assert one.shape == (6, (c.num_hidden_layers + 1) * c.hidden_size)
    np.testing.assert_allclose(one, many, atol=1e-4)  # right padding never reaches the last real token
    prompt = last_token_features(model, samples, tok.pad_token_id, prompt_only=True, batch_size=6)
    assert not np.allclose(prompt, many)
    ctx = ctx_for(0, samples, None)
    last_token_features(model, samples, tok.pad_token_id, batch_size=6, ctx=ctx)
    assert ctx.flops > 0


def test_turbo_features_ignore_the_current_adapter(llama):
    from hetfl.selection.features import client_features
    from hetfl.selection.fedhds import FedHDSTurboConfig

    model, tok, samples = llama
    task = type("T", (), {"pad_id": tok.pad_token_id, "tokenizer": tok})()
    ctx = ctx_for(0, samples, task)
    ctx.model = model
    turbo = FedHDS(None, FedHDSTurboConfig())
    kw = dict(prompt_only=False, layers="all", batch_size=6)
    g0, p0 = client_features(ctx, model, **kw), turbo._features(ctx)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.5)
    g1, p1 = client_features(ctx, model, **kw), turbo._features(ctx)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.sub_(0.5)
    assert not np.allclose(g0, g1)  # FedHDS: features follow the global adapter
    np.testing.assert_array_equal(p0, p1)  # Turbo: the frozen proxy does not
