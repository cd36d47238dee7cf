"""What every task shares: seeded local batch order."""

from __future__ import annotations

from typing import Iterator

import torch


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
