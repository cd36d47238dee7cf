"""The in-process simulated backend: runs a round's clients one after another on one model.

One model object serves every client (parameters are copied in from each client's message),
so memory does not grow with the population. Client randomness is derived from
(seed, round, client), so the execution order never changes a result.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from hetfl.engine.api import ClientContext, Message, derive_seed
from hetfl.engine.link import DOWN, UP, Link


class SimulatedBackend:
    """Runs `client_update` for each sampled client, with every message crossing the link.

    Args:
        scenario: the built scenario (its model is the one shared worker model).
        method: the method whose hooks run.
        link: the measured link.
        order: client execution order; "sorted" by default. Any order gives identical results.
    """

    def __init__(self, scenario, method, link: Link, order: Literal["sorted", "reverse"] = "sorted"):
        self.scenario, self.method, self.link, self.order = scenario, method, link, order
        self.client_states: dict[int, dict[str, Any]] = {}  # private per-client state (stateful methods)
        self.flop_cache: dict = {}  # FLOPs per (method, shape) key, measured once per worker

    def run_round(self, rnd: int, down: dict[int, Message], knobs: dict[int, dict],
                  mem: dict[int, int]) -> tuple[dict[int, Message], dict[int, ClientContext]]:
        cids = sorted(down, reverse=self.order == "reverse")
        replies, ctxs = {}, {}
        for cid in cids:
            ctx = self.context(rnd, cid, knobs[cid], mem[cid])
            msg = self.link.send(DOWN, rnd, cid, down[cid].kind or "model", down[cid])
            torch.manual_seed(derive_seed(self.scenario.cfg.seed, rnd, cid, "torch"))  # dropout etc.
            reply = self.method.client_update(msg, ctx)
            replies[cid] = self.link.send(UP, rnd, cid, reply.kind or "update", reply)
            ctxs[cid] = ctx
        return replies, ctxs

    def context(self, rnd: int, cid: int, knobs: dict, mem: int) -> ClientContext:
        sc = self.scenario
        return ClientContext(
            cid=cid, rnd=rnd, data=sc.client_data[cid], device=sc.population.device(cid), knobs=dict(knobs),
            state=self.client_states.setdefault(cid, {}), seed=sc.cfg.seed, model=sc.model, task=sc.task,
            mem_bytes=mem, _flop_cache=self.flop_cache,
        )
