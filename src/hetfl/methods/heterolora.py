"""HeteroLoRA (HetLoRA; Cho et al., EMNLP 2024), as implemented in the FSLoRA authors' baseline
code (spec: shared/spec/fslora.md, section 4).

Client i receives the FIRST k_i rank channels of the global rank-r LoRA: B[:, :k_i] (out, k_i)
and A[:k_i, :] (k_i, in), trains them at standard LoRA scaling for its rank (alpha / k_i, the same
number as FSLoRA's s * r / k_i), and sends their deltas. The server zero-pads every delta to
global rank r, averages over the P sampled clients and applies the server optimiser.

So HeteroLoRA is FSLoRA with deterministic truncation instead of a random sketch: the index set
is 0..k_i-1 and is implied by k_i, so no indices cross the link. High channels are trained only by
the clients with large k_i (a biased estimate, unlike the sketch). The original paper's rank
self-pruning and sparsity-weighted aggregation are not implemented (the baseline code does not
use them either).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hetfl.methods.fslora import FSLoRA, FSLoRAConfig
from hetfl.methods.hetrank import HetRankLoRA
from hetfl.registry import register_method


@dataclass(frozen=True)
class HeteroLoRAConfig(FSLoRAConfig):
    name: str = "heterolora"


@register_method("heterolora", HeteroLoRAConfig, "HeteroLoRA: first-k_i truncation of a rank-r LoRA, zero-padded average")
class HeteroLoRA(FSLoRA):
    send_indices = False  # the first k channels: k alone says which

    def indices(self, rnd: int, cid: int, mod: str, k: int) -> torch.Tensor:
        return HetRankLoRA.indices(self, rnd, cid, mod, k)  # (k,): channels 0..k-1, every round
