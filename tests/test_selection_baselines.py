"""Baseline selectors: perplexity (top/bottom by hand-computed perplexity on a bigram LM) and
the non-private coreset-central reference (uploads all features, keeps samples nearest k-means centres)."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from toy import ToyTask, toy_config, toy_scenario

from hetfl.config import load_config
from hetfl.engine.api import ClientContext, Message
from hetfl.engine.loop import run_rounds, sample_clients
from hetfl.runner import build_method
from hetfl.selection.coreset_central import CoresetCentral
from hetfl.selection.perplexity import PerplexityConfig, PerplexitySelection


class BigramLM(torch.nn.Module):
    """logits[t] = table[token_t]: a causal LM whose perplexities are easy to compute by hand."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table, requires_grad=False)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table[input_ids])  # (B, T, V)


def hand_ppl(table, ids, labels):
    logp = torch.log_softmax(table, dim=-1)
    terms = [-float(logp[ids[t - 1], ids[t]]) for t in range(1, len(ids)) if labels[t] != -100]
    return math.exp(sum(terms) / len(terms))


def ctx_for(data, model, task, cid=0):
    return ClientContext(cid=cid, rnd=1, data=data, device=None, knobs={}, state={}, seed=0, model=model, task=task)


@pytest.mark.parametrize("direction", ["high", "low"])
def test_perplexity_keeps_top_or_bottom_by_hand_computed_perplexity(direction):
    g = torch.Generator().manual_seed(0)
    table = torch.randn(7, 7, generator=g) * 2
    data = []
    for i in range(10):  # prompt of 2-4 tokens (-100), response of 1-3 tokens; pad id 0 unused
        ids = torch.randint(1, 7, (2 + i % 3 + 1 + i % 3,), generator=g).tolist()
        n_prompt = 2 + i % 3
        data.append((ids, [-100] * n_prompt + ids[n_prompt:]))
    ppl = np.array([hand_ppl(table, ids, lab) for ids, lab in data])
    sel = PerplexitySelection(None, PerplexityConfig(ratio=0.3, direction=direction, batch_size=4))
    ctx = ctx_for(data, BigramLM(table), SimpleNamespace(pad_id=0))
    picked = sel.apply(None, ctx)
    order = np.argsort(-ppl if direction == "high" else ppl)
    assert picked == sorted(order[:3].tolist())
    assert len(set(np.round(ppl, 6))) == 10  # no ties, so the expected set is unambiguous


@dataclasses.dataclass
class PointTask(ToyTask):
    def selection_features(self, model, samples):
        return torch.stack([s[0][:2] for s in samples]).numpy()


def test_coreset_central_picks_samples_nearest_kmeans_centres():
    # Two clients; pooled points form 3 tight, well-separated clusters, so k-means (k = 0.2 x 15 = 3)
    # recovers them and its centres are the cluster means.
    rng = np.random.default_rng(1)
    centres = np.array([[0.0, 0.0], [20.0, 3.0], [4.0, 25.0]])
    pts = {0: np.concatenate([centres[0] + rng.normal(0, 0.5, (4, 2)), centres[1] + rng.normal(0, 0.5, (3, 2))]),
           1: np.concatenate([centres[2] + rng.normal(0, 0.5, (5, 2)), centres[1] + rng.normal(0, 0.5, (3, 2))])}
    summaries = {c: Message({"features": torch.as_tensor(p, dtype=torch.float32)}, kind="features")
                 for c, p in pts.items()}
    cfg = load_config({"seed": 5, "selection": {"name": "coreset-central", "ratio": 0.2}})
    with pytest.warns(UserWarning, match="non-private"):
        sel = CoresetCentral(cfg, cfg.selection)
    dec = sel.decide(1, summaries)
    pooled = [(c, i, p) for c in (0, 1) for i, p in enumerate(pts[c])]
    members = [[(c, i, p) for c, i, p in pooled if np.linalg.norm(p - m) < 5] for m in centres]
    expected = set()
    for mem in members:
        mean = np.mean([p for _, _, p in mem], axis=0)
        c, i, _ = min(mem, key=lambda e: np.linalg.norm(e[2] - mean))
        expected.add((c, i))
    got = {(c, i) for c, d in dec.items() for i in d.tensors["keep"].tolist()}
    assert got == expected
    assert all(d.meta["non_private"] == 1 for d in dec.values())


def test_coreset_central_uploads_every_feature_through_the_ledger():
    cfg = toy_config("selection.name=coreset-central", "selection.ratio=0.25")
    sc = toy_scenario(cfg)
    sc.task = PointTask(sc.task.eval_x, sc.task.eval_y)
    with pytest.warns(UserWarning, match="non-private"):
        h = run_rounds(sc, build_method(cfg))
    for m in h[1:]:
        cids = sample_clients(cfg.seed, m["round"], 6, 3)
        n = sum(len(sc.client_data[c]) for c in cids)
        assert m["bytes_by_kind"]["up:features"] == n * 2 * 4  # all n samples x 2 dims x fp32
        assert m["coreset_size"] == math.ceil(0.25 * n)  # toy points are distinct: k distinct nearest rows
        assert m["data_fraction"] == pytest.approx(math.ceil(0.25 * n) / n)
