"""Coreset-Cent (a FedHDS reference, after Chen et al. 2023): NOT PRIVATE.

Every sampled client uploads the features of ALL its samples (kind "features", counted by the
ledger); the server pools them, runs k-means with k = ratio x (pooled samples) and keeps, per
centre, the real sample nearest to it. It breaks federated privacy and is shown only as the
centralized upper reference of the paper's Table 2; a warning says so when it is built.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from hetfl.engine.api import ClientContext, Message
from hetfl.seeding import derive_seed
from hetfl.registry import register_selector
from hetfl.selection.base import RatioSelectionConfig, Selector
from hetfl.selection.features import client_features, one_thread

NON_PRIVATE_WARNING = "selection coreset-central is a non-private reference: clients upload all sample features"


@dataclass(frozen=True)
class CoresetCentralConfig(RatioSelectionConfig):
    name: str = "coreset-central"
    ratio: float = 0.05  # k = ceil(ratio x pooled samples of the round's clients)
    layers: Literal["all", "last"] = "last"  # spec: k-means on last-layer features
    feature_text: Literal["full", "prompt"] = "full"


def kmeans_nearest(feats: np.ndarray, k: int, seed: int) -> list[int]:
    """Rows of `feats` (N, D) nearest each of k k-means centres (sorted, distinct)."""
    from sklearn.cluster import KMeans

    k = min(k, feats.shape[0])
    with one_thread():
        km = KMeans(n_clusters=k, n_init=3, random_state=seed % 2**31).fit(feats)
    d = ((feats[:, None, :] - km.cluster_centers_[None]) ** 2).sum(-1)  # (N, k)
    return sorted(set(int(i) for i in d.argmin(0)))


@register_selector("coreset-central", CoresetCentralConfig, "NON-PRIVATE reference: server k-means on all features")
class CoresetCentral(Selector):
    non_private = True  # read by reports/benchmarks to flag the row

    def __init__(self, cfg, scfg: CoresetCentralConfig):
        self.c, self.seed = scfg, cfg.seed
        warnings.warn(NON_PRIVATE_WARNING, stacklevel=2)

    def summarize(self, ctx: ClientContext) -> Message | None:
        x = client_features(ctx, ctx.model, prompt_only=self.c.feature_text == "prompt", layers=self.c.layers,
                            batch_size=self.c.batch_size, tag=("coreset-central",))
        return Message({"features": torch.as_tensor(x, dtype=torch.float32)}, kind="features")  # (n, D)

    def decide(self, rnd: int, summaries: dict[int, Message]) -> dict[int, Message]:
        cids = sorted(summaries)
        if not cids:
            return {}
        blocks = [summaries[c].tensors["features"].double().numpy() for c in cids]
        owner = np.concatenate([np.full(len(b), c) for c, b in zip(cids, blocks)])  # pooled row -> client
        local = np.concatenate([np.arange(len(b)) for b in blocks])  # pooled row -> local index
        pooled = np.concatenate(blocks)  # (N, D)
        k = max(1, math.ceil(self.c.ratio * pooled.shape[0]))
        rows = kmeans_nearest(pooled, k, derive_seed(self.seed, rnd, "coreset-central"))
        return {c: Message({"keep": torch.tensor(sorted(int(local[r]) for r in rows if owner[r] == c),
                                                 dtype=torch.int32)}, {"non_private": 1}, kind="selection")
                for c in cids}

    def apply(self, decision: Message | None, ctx: ClientContext) -> list[int]:
        return [] if decision is None else sorted(decision.tensors["keep"].tolist())
