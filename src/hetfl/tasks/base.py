"""What every task shares: what a dataset builder returns, and seeded local batch order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch


@dataclass
class TaskData:
    """What a dataset builder returns: the model, the task, and the pool of training samples.

    `labels` (one int per sample: class or task family) drive the partitioner.
    """

    model: torch.nn.Module
    tokenizer: Any
    task: Any
    samples: list
    labels: np.ndarray
    categories: list[str]
    cluster_transform: Any = None  # (samples, cluster) -> samples: a dataset's own per-cluster map


def batch_indices(n: int, steps: int, batch_size: int, gen: torch.Generator) -> Iterator[list[int]]:
    """`steps` index batches drawn epoch-wise (without replacement within an epoch).

    A client with fewer than `batch_size` samples uses all of them in every batch.
    """
    size = min(batch_size, n)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < size:
            order += torch.randperm(n, generator=gen).tolist()
        idx, order = order[:size], order[size:]
        yield idx
