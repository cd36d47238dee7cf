"""One root seed for all randomness: every draw derives its own seed from (root, parts...).

This module sits on the ground floor (it imports nothing of hetfl), so the scenario, the system
models, the methods and the engine all seed the same way.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch


def derive_seed(root: int, *parts: Any) -> int:
    """A 63-bit seed for (root, parts...), e.g. (seed, round, client, "batches").

    Hash-derived, so a client's randomness depends only on who/when/what it is for, never
    on the order clients run in, the backend, the worker count or the resume point.
    """
    h = hashlib.blake2b(repr((root, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


def generator(root: int, *parts: Any) -> torch.Generator:
    """A torch.Generator seeded by `derive_seed(root, *parts)`."""
    g = torch.Generator()
    g.manual_seed(derive_seed(root, *parts))
    return g
