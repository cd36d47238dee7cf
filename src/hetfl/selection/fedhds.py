"""FedHDS: hierarchical coreset selection for federated instruction tuning (Qin et al., arXiv
2410.10926, ACL Findings 2025; spec in shared/spec/fedhds.md).

Every round, each sampled client
  1. takes the last token's hidden state from every layer of the current global model (FedHDS)
     or of a small frozen proxy (FedHDS-Turbo), concatenated ("inter-layer fusion");
  2. reduces them to 2-D with its own seeded t-SNE (or PCA / kernel PCA);
  3. clusters the 2-D points with HDBSCAN and uploads only the probability-weighted group
     centroids and their group ids (optionally tanh-squashed plus Gaussian noise).
The server clusters all centroids of the round with HDBSCAN(min_cluster_size=2) and keeps, per
server cluster, the client group whose centroid is nearest the cluster's weighted centroid. Each
client then trains on one real sample per kept group: the member nearest the group's (clean)
centroid. Coreset sizes are therefore decided by the data, not by a ratio.

Unlike the released code, features are computed in the fixed order of the client's data and the
uploaded centroid j is paired with group id j (the two index bugs listed in the spec, section 2).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from hetfl.config import SelectionConfig
from hetfl.engine.api import ClientContext, Message
from hetfl.seeding import derive_seed
from hetfl.registry import register_selector
from hetfl.selection.features import client_features, one_thread, prompt_part, reduce_2d
from hetfl.selection.base import Selector

STASH = "fedhds.round"  # client-private: the round's 2-D points and groups, popped by `apply`


@dataclass(frozen=True)
class FedHDSConfig(SelectionConfig):
    name: str = "fedhds"
    feature_model: Literal["global", "proxy"] = "global"  # current global model (FedHDS) or frozen proxy (Turbo)
    proxy_model: str = "tiny-llama"  # the frozen proxy for feature_model: proxy (no LoRA)
    feature_text: Literal["full", "prompt"] = "full"  # spec: prompt + response + eos
    layers: Literal["all", "last"] = "all"  # "last" is the paper's last-layer-only ablation
    reduction: Literal["tsne", "pca", "kpca", "none"] = "tsne"  # "none": cluster the raw features
    min_cluster_size: int = 5  # client HDBSCAN; the paper uses 5 on NI, 2 on Dolly
    client_noise: Literal["drop", "singleton"] = "drop"  # spec/code: client noise points form no group
    server_min_cluster_size: int = 2  # fixed to 2 in the released code
    server_noise: Literal["drop", "keep"] = "drop"  # code drops server-noise centroids (paper: unknown)
    squash: bool = False  # privacy: c <- tanh(c) before upload
    noise_std: float = 0.0  # privacy: + N(0, noise_std^2) per uploaded coordinate
    batch_size: int = 16  # samples per feature forward

    def check(self):
        if self.min_cluster_size < 2:
            yield "min_cluster_size", "must be >= 2"
        if self.server_min_cluster_size < 2:
            yield "server_min_cluster_size", "must be >= 2"
        if self.noise_std < 0:
            yield "noise_std", "must be >= 0"
        if self.batch_size < 1:
            yield "batch_size", "must be >= 1"


@dataclass(frozen=True)
class FedHDSTurboConfig(FedHDSConfig):
    name: str = "fedhds-turbo"
    feature_model: Literal["global", "proxy"] = "proxy"


# --------------------------------------------------------------------------- clustering steps


def _hdbscan(points: np.ndarray, min_cluster_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels, membership probabilities); too few points for any cluster -> all noise."""
    n = points.shape[0]
    if n < max(2, min_cluster_size):
        return np.full(n, -1), np.zeros(n)
    from sklearn.cluster import HDBSCAN

    with one_thread():
        h = HDBSCAN(min_cluster_size=min_cluster_size, allow_single_cluster=False, copy=True).fit(points)
    return h.labels_, h.probabilities_


def _weighted_centroid(points: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return np.average(points, axis=0, weights=weights) if weights.sum() > 0 else points.mean(axis=0)


def client_groups(points: np.ndarray, min_cluster_size: int, noise: str = "drop"
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cluster one client's 2-D points.

    Args:
        points: (n, 2) reduced features.
        min_cluster_size: HDBSCAN's min_cluster_size (min_samples keeps its default, equal to it).
        noise: "drop" (noise points belong to no group) or "singleton" (each is its own group).

    Returns:
        (group of each point, -1 for none, shape (n,); centroids (G, 2); group ids (G,)).
    """
    labels, prob = _hdbscan(points, min_cluster_size)
    labels = labels.copy()
    k = int(labels.max()) + 1 if labels.size else 0
    if noise == "singleton":
        for j, i in enumerate(np.flatnonzero(labels == -1)):
            labels[i], prob[i] = k + j, 1.0
        k = int(labels.max()) + 1 if labels.size else 0
    cents = [_weighted_centroid(points[labels == g], prob[labels == g]) for g in range(k)]
    return labels, np.array(cents).reshape(k, points.shape[1]), np.arange(k)


def server_select(entries: list[tuple[int, int, np.ndarray]], min_cluster_size: int = 2,
                  noise: str = "drop") -> dict[int, list[int]]:
    """Inter-client step: one client group per server cluster.

    Args:
        entries: (client id, group id, centroid (2,)) for every uploaded centroid of the round.
        min_cluster_size: server HDBSCAN min_cluster_size.
        noise: "drop" (server-noise centroids are not selected, as in the code) or "keep".

    Returns:
        client id -> sorted kept group ids (clients with nothing kept map to []).
    """
    entries = sorted(entries, key=lambda e: (e[0], e[1]))  # ties resolve the same on any arrival order
    keep: dict[int, list[int]] = {cid: [] for cid, _, _ in entries}
    if not entries:
        return keep
    pts = np.stack([c for _, _, c in entries])  # (M, 2)
    labels, prob = _hdbscan(pts, min_cluster_size)
    for g in range(int(labels.max()) + 1):
        idx = np.flatnonzero(labels == g)
        center = _weighted_centroid(pts[idx], prob[idx])
        best = idx[int(np.argmin(np.linalg.norm(pts[idx] - center, axis=1)))]
        keep[entries[best][0]].append(entries[best][1])
    if noise == "keep":
        for i in np.flatnonzero(labels == -1):
            keep[entries[i][0]].append(entries[i][1])
    return {cid: sorted(g) for cid, g in keep.items()}


def nearest_members(points: np.ndarray, labels: np.ndarray, centroids: np.ndarray, gids: np.ndarray,
                    kept: list[int]) -> list[int]:
    """For each kept group, the index of its member nearest its centroid (sorted, distinct)."""
    row = {int(g): j for j, g in enumerate(gids)}
    out = []
    for g in kept:
        members = np.flatnonzero(labels == g)
        if g not in row or members.size == 0:
            continue  # an id this client never uploaded: ignore rather than guess
        d = np.linalg.norm(points[members] - centroids[row[g]], axis=1)
        out.append(int(members[int(np.argmin(d))]))
    return sorted(set(out))


def privatize(c: np.ndarray, squash: bool, noise_std: float, gen: torch.Generator) -> torch.Tensor:
    """What leaves the client: optionally tanh(c), plus N(0, noise_std^2) per coordinate; (G, 2) fp32."""
    t = torch.as_tensor(c, dtype=torch.float32)
    if squash:
        t = torch.tanh(t)  # bounds each coordinate, so the noise scale is meaningful (spec Theorem 1)
    if noise_std > 0:
        t = t + noise_std * torch.randn(t.shape, generator=gen)
    return t


# --------------------------------------------------------------------------- proxy model (Turbo)


@functools.lru_cache(maxsize=2)
def proxy_model(name: str):
    """The frozen proxy (model, tokenizer), built once per process and never trained."""
    from hetfl.models.builders import load_causal_lm

    model, tok = load_causal_lm(name)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), tok


def _same_vocab(a, b) -> bool:
    return a is b or (a is not None and b is not None and a.get_vocab() == b.get_vocab())


def retokenize(samples, src_tok, dst_tok) -> list[tuple[list[int], list[int]]]:
    """Re-encode samples for a proxy with another tokenizer, keeping the prompt/response split."""
    out = []
    for ids, labels in samples:
        p = prompt_part((ids, labels))
        prompt = dst_tok(src_tok.decode(p, skip_special_tokens=True))["input_ids"]
        resp = dst_tok(src_tok.decode(ids[len(p):], skip_special_tokens=True), add_special_tokens=False)["input_ids"]
        resp = list(resp) + ([dst_tok.eos_token_id] if dst_tok.eos_token_id is not None else [])
        out.append((list(prompt) + resp, [-100] * len(prompt) + resp))
    return out


# --------------------------------------------------------------------------- the stage


class FedHDS(Selector):
    """The selection stage; one object serves both sides in simulation (they share no state
    except the client-private `ctx.state[STASH]`, which never crosses the link)."""

    # What to change when a round's server clustering keeps no group at all (engine/sim.py).
    empty_hint = ("raise population.clients_per_round (more centroids per server clustering), set "
                  "selection.server_noise=keep, or lower selection.min_cluster_size")

    def __init__(self, cfg, scfg: FedHDSConfig):
        self.c = scfg

    def _features(self, ctx: ClientContext) -> np.ndarray:
        c = self.c
        kw = dict(prompt_only=c.feature_text == "prompt", layers=c.layers, batch_size=c.batch_size)
        if c.feature_model == "global":  # the engine loaded the current global adapter into ctx.model
            return client_features(ctx, ctx.model, tag=("global",), **kw)
        model, tok = proxy_model(c.proxy_model)
        task_tok = getattr(ctx.task, "tokenizer", None)
        if getattr(ctx.task, "selection_features", None) is None and not _same_vocab(task_tok, tok):
            view = _TaskView(ctx, retokenize(ctx.data, task_tok, tok), tok.pad_token_id)
            return client_features(view, model, tag=("proxy", c.proxy_model), **kw)
        return client_features(ctx, model, tag=("proxy", c.proxy_model), **kw)

    def summarize(self, ctx: ClientContext) -> Message | None:
        x = self._features(ctx)  # (n, D)
        y = reduce_2d(x, self.c.reduction, derive_seed(ctx.seed, ctx.rnd, ctx.cid, "fedhds-reduce"))
        labels, cents, gids = client_groups(y, self.c.min_cluster_size, self.c.client_noise)
        ctx.state[STASH] = (y, labels, cents, gids)
        up = privatize(cents, self.c.squash, self.c.noise_std, ctx.generator("fedhds-dp"))
        return Message({"centroids": up, "group_ids": torch.as_tensor(gids, dtype=torch.int32)}, kind="centroids")

    def decide(self, rnd: int, summaries: dict[int, Message]) -> dict[int, Message]:
        entries = [(cid, int(g), c.numpy().astype(np.float64))
                   for cid, m in summaries.items()
                   for g, c in zip(m.tensors["group_ids"].tolist(), m.tensors["centroids"])]
        keep = server_select(entries, self.c.server_min_cluster_size, self.c.server_noise)
        return {cid: Message({"keep": torch.tensor(keep.get(cid, []), dtype=torch.int32)}, kind="selection")
                for cid in summaries}

    def apply(self, decision: Message | None, ctx: ClientContext) -> list[int]:
        stash = ctx.state.pop(STASH, None)
        if decision is None or stash is None:
            return []
        y, labels, cents, gids = stash
        return nearest_members(y, labels, cents, gids, decision.tensors["keep"].tolist())


class _TaskView:
    """A ClientContext look-alike whose data are the proxy-tokenised samples (FLOPs still counted)."""

    def __init__(self, ctx, data, pad_id):
        self._ctx, self.data = ctx, data
        self.task = type("ProxyTask", (), {"pad_id": pad_id})()

    def compute(self, key, fn):
        return self._ctx.compute(key, fn)


register_selector("fedhds", FedHDSConfig, "FedHDS: hierarchical HDBSCAN coresets on global-model features")(FedHDS)
register_selector("fedhds-turbo", FedHDSTurboConfig, "FedHDS-Turbo: FedHDS with features from a frozen proxy")(
    FedHDS)
