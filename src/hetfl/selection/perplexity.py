"""Perplexity-based coreset (a FedHDS baseline): each client keeps the share of its samples with
the highest (or lowest) response perplexity under the current global model. Nothing is uploaded.

The spec leaves the direction unknown; "high" keeps what the model finds hardest (the usual
reading of perplexity filtering for fine-tuning), "low" keeps the most typical samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from hetfl.engine.api import ClientContext, Message
from hetfl.errors import ConfigError
from hetfl.registry import register_selector
from hetfl.selection.base import RatioSelectionConfig, Selector
from hetfl.selection.features import _is_token_sample, response_nll


@dataclass(frozen=True)
class PerplexityConfig(RatioSelectionConfig):
    name: str = "perplexity"
    ratio: float = 0.1  # share of local samples kept (at least one)
    direction: Literal["high", "low"] = "high"


def pick_by_score(scores: np.ndarray, ratio: float, direction: str) -> list[int]:
    """Sorted indices of the k = max(1, round(ratio*n)) highest/lowest scores; ties keep the lower index."""
    n = scores.shape[0]
    k = max(1, round(ratio * n))
    key = -scores if direction == "high" else scores
    return sorted(np.argsort(key, kind="stable")[:k].tolist())


@register_selector("perplexity", PerplexityConfig, "keep each client's highest/lowest-perplexity samples")
class PerplexitySelection(Selector):
    def __init__(self, cfg, scfg: PerplexityConfig):
        self.c = scfg

    def summarize(self, ctx: ClientContext) -> Message | None:
        return None

    def decide(self, rnd: int, summaries: dict[int, Message]) -> dict[int, Message]:
        return {}

    def apply(self, decision: Message | None, ctx: ClientContext) -> list[int]:
        if not ctx.data:
            return []
        if not _is_token_sample(ctx.data[0]):
            raise ConfigError("selection.name: perplexity needs a causal-LM instruction task (token samples)")
        # ctx.model holds the current global model here (loaded before the selection stage).
        nll = response_nll(ctx.model, ctx.data, getattr(ctx.task, "pad_id", 0) or 0, batch_size=self.c.batch_size,
                           ctx=ctx, tag=("perplexity",))
        return pick_by_score(nll, self.c.ratio, self.c.direction)  # exp is monotone: rank by NLL
