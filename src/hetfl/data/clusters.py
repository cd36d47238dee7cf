"""Latent client clusters with a concept shift each (FLoRAL-style scenarios, spec section 5).

Client i belongs to cluster ``i mod C``. After partitioning, each client's samples (train and
local test) are mapped by its cluster's transform: images rotated by ``c`` quarter turns, labels
shifted ``y -> (y + c) mod n_classes``, or a dataset's own per-cluster map (the synthetic
regression teachers of tasks/regression.py). Everything here is a pure function of its inputs.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from hetfl.data.vision import rotate_images, shift_labels

# A cluster transform maps (samples, cluster id) -> the samples as that cluster sees them.
ClusterTransform = Callable[[list, int], list]


def cluster_of(cid: int, num_clusters: int) -> int:
    """The latent cluster of client `cid` (``cid mod C``)."""
    return cid % num_clusters


def rotate_cluster(samples: Sequence[tuple], c: int) -> list[tuple]:
    """Samples ``(image (C, H, W), y)`` with each image rotated by ``90 * c`` degrees."""
    return [(rotate_images(x, c), y) for x, y in samples]


def label_shift_cluster(samples: Sequence[tuple], c: int, n_classes: int) -> list[tuple]:
    """Samples ``(x, y)`` with labels ``(y + c) mod n_classes`` (a cyclic permutation per cluster)."""
    return [(x, int(shift_labels(int(y), c, n_classes))) for x, y in samples]


def shift_transform(kind: str, n_classes: int) -> ClusterTransform | None:
    """The transform for ``data.cluster_shift`` (None for ``none``)."""
    if kind == "rotate":
        return rotate_cluster
    if kind == "label-shift":
        return lambda samples, c: label_shift_cluster(samples, c, n_classes)
    return None


def apply_clusters(parts: list[list], num_clusters: int, transform: ClusterTransform) -> list[list]:
    """Each client's samples as its cluster sees them (the list order is the client id)."""
    return [transform(list(s), cluster_of(cid, num_clusters)) for cid, s in enumerate(parts)]


def keep_fraction(idx: np.ndarray, fraction: float, rng: np.random.Generator, minimum: int = 10) -> np.ndarray:
    """A random ``round(fraction * n)`` of a client's training indices, at least ``min(n, minimum)``.

    The "(5%)" tasks of the FLoRAL paper keep 5% of each client's training set, and at least 10
    samples. Returns the kept indices sorted.
    """
    n = len(idx)
    keep = min(n, max(minimum, int(round(fraction * n))))
    return np.sort(rng.permutation(idx)[:keep])
