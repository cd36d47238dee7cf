"""The data-selection stage: runs on each sampled client before local training.

A round with a selector has two extra exchanges, both through the link:
  1. client: `summarize(ctx)` -> an upload (e.g. FedHDS's cluster centroids), or None;
  2. server: `decide(rnd, summaries)` -> a per-client decision (e.g. which groups to keep);
  3. client: `apply(decision, ctx)` -> indices into its local data to train on this round.
Clients hold the current global model while summarising (the method's `load` hook puts it there),
so features can come from it. A client whose selection is empty skips training this round (with a
warning); a round in which every sampled client's selection is empty is an error (engine/sim.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from hetfl.config import SelectionConfig
from hetfl.engine.api import ClientContext, Message


@dataclass(frozen=True)
class RatioSelectionConfig(SelectionConfig):
    """Options shared by selectors that keep a share of the data scored by a model forward."""

    ratio: float = 0.1  # share of samples kept
    batch_size: int = 16  # samples per scoring forward pass

    def check(self):
        if not 0 < self.ratio <= 1:
            yield "ratio", "must be in (0, 1]"
        if self.batch_size < 1:
            yield "batch_size", "must be >= 1"


class Selector:
    """The contract of a data-selection stage; subclass it and fill in the three steps."""

    empty_hint: str = ""  # advice for a round whose coresets are all empty ("" for a generic one)

    def summarize(self, ctx: ClientContext) -> Message | None:
        """On the client: the upload the server decides from (None: nothing to send)."""
        return None

    def decide(self, rnd: int, summaries: dict[int, Message]) -> dict[int, Message]:
        """On the server: a decision per client (clients left out get None)."""
        return {}

    def apply(self, decision: Message | None, ctx: ClientContext) -> list[int]:
        """On the client: indices into `ctx.data` to train on this round."""
        raise NotImplementedError
