"""The data-selection stage: runs on each sampled client before local training.

A round with a selector has two extra exchanges, both through the link:
  1. client: `summarize(ctx)` -> an upload (e.g. FedHDS's cluster centroids), or None;
  2. server: `decide(rnd, summaries)` -> a per-client decision (e.g. which groups to keep);
  3. client: `apply(decision, ctx)` -> indices into its local data to train on this round.
Clients hold the current global model while summarising (the method's `load` hook puts it there),
so features can come from it. A client whose selection is empty skips training this round.
"""

from __future__ import annotations

from typing import Protocol

from hetfl.engine.api import ClientContext, Message


class Selector(Protocol):
    def summarize(self, ctx: ClientContext) -> Message | None: ...

    def decide(self, rnd: int, summaries: dict[int, Message]) -> dict[int, Message]: ...

    def apply(self, decision: Message | None, ctx: ClientContext) -> list[int]: ...
