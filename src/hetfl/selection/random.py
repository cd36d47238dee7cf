"""Random coreset: each client keeps a uniform random subset of its data each round (no upload)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hetfl.config import SelectionConfig
from hetfl.engine.api import ClientContext, Message
from hetfl.registry import register_selector
from hetfl.selection.base import Selector


@dataclass(frozen=True)
class RandomSelectionConfig(SelectionConfig):
    name: str = "random"
    ratio: float = 0.1  # share of local samples kept (at least one)

    def check(self):
        if not 0 < self.ratio <= 1:
            yield "ratio", "must be in (0, 1]"


@register_selector("random", RandomSelectionConfig, "uniform random subset of each client's data per round")
class RandomSelection(Selector):
    def __init__(self, cfg, scfg: RandomSelectionConfig):
        self.ratio = scfg.ratio

    def summarize(self, ctx: ClientContext) -> Message | None:
        return None

    def decide(self, rnd: int, summaries: dict[int, Message]) -> dict[int, Message]:
        return {}

    def apply(self, decision: Message | None, ctx: ClientContext) -> list[int]:
        n = len(ctx.data)
        k = max(1, round(self.ratio * n))
        return sorted(torch.randperm(n, generator=ctx.generator("select"))[:k].tolist())
