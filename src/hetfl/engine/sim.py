"""The in-process simulated backend: runs a round's clients one after another on one model.

One model object serves every client (parameters are copied in from each client's message),
so memory does not grow with the population. Client randomness is derived from
(seed, round, client), so the execution order never changes a result. The clients' private
states live in a `ClientStates` store (engine/states.py): in memory up to
`population.state_memory_mb`, on disk beyond it; a client's state is held in memory while it works.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Literal

import torch

from hetfl.engine.api import ClientContext, Message
from hetfl.seeding import derive_seed
from hetfl.engine.link import DOWN, UP, Link
from hetfl.engine.states import MIB, ClientStates
from hetfl.errors import ConfigError, HetflWarning


class SimulatedBackend:
    """Runs `client_update` for each sampled client, with every message crossing the link.

    Args:
        scenario: the built scenario (its model is the one shared worker model).
        method: the method whose hooks run.
        link: the measured link.
        order: client execution order; "sorted" by default. Any order gives identical results.
        selector: the data-selection stage, or None.
        on_client: `on_client(rnd, done, total)` as a round's training starts (done 0) and after
            each client's update (progress display); None: no reports.
    """

    def __init__(self, scenario, method, link: Link, order: Literal["sorted", "reverse"] = "sorted",
                 selector=None, on_client: Callable[[int, int, int], None] | None = None):
        self.scenario, self.method, self.link, self.order = scenario, method, link, order
        self.selector = selector  # optional data-selection stage (selection/base.py)
        self.on_client = on_client
        self.client_states = {}  # private per-client state (stateful methods): the setter makes it a ClientStates
        self.flop_cache: dict = {}  # FLOPs per (method, shape) key, measured once per worker

    @property
    def client_states(self) -> ClientStates:
        return self._states

    @client_states.setter
    def client_states(self, states) -> None:
        """Replace the private states (on resume: the checkpoint's dict); they are moved into a store
        with this run's budget (`population.state_memory_mb`), leaving `states` empty."""
        self._states = ClientStates.moved_from(states, int(self.scenario.cfg.population.state_memory_mb * MIB))

    def run_round(self, rnd: int, down: dict[int, Message], knobs: dict[int, dict],
                  mem: dict[int, int]) -> tuple[dict[int, Message], dict[int, ClientContext]]:
        cids = sorted(down, reverse=self.order == "reverse")
        if self.method.schedule == "sequential":  # the method fixes the order (SplitFed V2: seeded)
            cids = self.method.client_order(rnd, sorted(cids))
        ctxs = {cid: self.context(rnd, cid, knobs[cid], mem[cid]) for cid in cids}
        msgs = {cid: self.link.send(DOWN, rnd, cid, down[cid].kind or "model", down[cid]) for cid in cids}
        if self.selector is not None:
            self.select(rnd, cids, ctxs, msgs)
        active = [cid for cid in cids if ctxs[cid].data]  # an empty coreset: the client skips training
        self._progress(rnd, 0, len(active))
        if self.method.schedule == "lockstep":
            replies = self.run_lockstep(rnd, active, msgs, ctxs)
            self.client_states.release(*cids)
            return replies, ctxs
        replies = {}
        for cid in active:
            reply = train_client(self.method, msgs[cid], ctxs[cid])
            self.client_states.release(cid)  # its work is done: its state may spill
            replies[cid] = self.link.send(UP, rnd, cid, reply.kind or "update", reply)
            self._progress(rnd, len(replies), len(active))
        self.client_states.release(*cids)  # and those that skipped the round (empty coreset)
        return replies, ctxs

    def _progress(self, rnd: int, done: int, total: int) -> None:
        if self.on_client is not None:
            self.on_client(rnd, done, total)

    def run_lockstep(self, rnd: int, cids: list[int], msgs: dict[int, Message],
                     ctxs: dict[int, ClientContext]) -> dict[int, Message]:
        """Synchronous local steps: every client takes step k, then the server's barrier(k) runs.

        For methods whose server updates a shared part once per step on all clients' gradients
        (FedV's body): `client_steps` is a generator yielding after each local step, so the
        clients advance together as they would in parallel on separate devices.
        """
        steps = {cid: self.method.client_steps(msgs[cid], ctxs[cid]) for cid in cids}
        replies, k = {}, 0
        while steps:
            for cid in list(steps):
                torch.manual_seed(derive_seed(self.scenario.cfg.seed, rnd, cid, "torch", k))
                try:
                    next(steps[cid])
                except StopIteration as done:
                    replies[cid] = self.link.send(UP, rnd, cid, done.value.kind or "update", done.value)
                    del steps[cid]
                    self._progress(rnd, len(replies), len(cids))
            if steps:
                self.method.barrier(rnd, k)
            k += 1
        return replies

    def select(self, rnd: int, cids: list[int], ctxs: dict[int, ClientContext], msgs: dict[int, Message]) -> None:
        """Run the selection stage: summaries up, decisions down, each client's data cut to its coreset."""
        summaries = {}
        for cid in cids:
            self.method.load(msgs[cid], ctxs[cid])  # the client holds the current global model
            s = self.selector.summarize(ctxs[cid])
            if s is not None:
                summaries[cid] = self.link.send(UP, rnd, cid, s.kind or "selection", s)
        decisions = self.selector.decide(rnd, summaries)
        for cid in cids:
            ctx, d = ctxs[cid], decisions.get(cid)
            if d is not None:
                d = self.link.send(DOWN, rnd, cid, d.kind or "selection", d)
            keep = self.selector.apply(d, ctx)
            ctx.local_total, ctx.selection_flops = len(ctx.data), ctx.flops
            ctx.data = [ctx.data[i] for i in keep]
        check_coresets(rnd, {cid: len(ctxs[cid].data) for cid in cids}, self.scenario.cfg,
                       self.selector.empty_hint)

    def context(self, rnd: int, cid: int, knobs: dict, mem: int) -> ClientContext:
        server = None
        if self.method.calls_server:  # split methods: per-batch calls cross the link
            from hetfl.engine.split import LinkedServer

            server = LinkedServer(self.link, rnd, cid, self.method.server_call(rnd))
        return client_context(self.scenario, rnd, cid, knobs, mem, self.client_states.hold(cid),
                              self.flop_cache, server)


def check_coresets(rnd: int, sizes: dict[int, int], cfg, hint: str = "") -> None:
    """Clients whose coreset is empty are dropped from the round (as in FedHDS), with a one-line
    warning; a round in which no sampled client has data left is a scenario error.

    Args:
        rnd: the round.
        sizes: coreset size per sampled client.
        cfg: the run's config (named in the messages).
        hint: the selector's advice for getting non-empty coresets ("" for a generic one).

    Raises:
        ConfigError: when every sampled client's coreset is empty.
    """
    empty = sorted(c for c, n in sizes.items() if n == 0)
    if not empty:
        return
    name = cfg.selection.name
    if len(empty) == len(sizes):
        raise ConfigError(f"selection: round {rnd} trained no client (every coreset of the {len(sizes)} sampled "
                          f"clients empty under selection.name={name}); "
                          f"{hint or 'raise population.clients_per_round'}")
    warnings.warn(f"selection: round {rnd}: {len(empty)} of {len(sizes)} sampled clients have an empty coreset "
                  f"under selection.name={name} and skip the round (clients {', '.join(map(str, empty))})",
                  HetflWarning, stacklevel=2)


def client_context(scenario, rnd: int, cid: int, knobs: dict, mem: int, state: dict[str, Any], flop_cache: dict,
                   server=None) -> ClientContext:
    """The context client `cid` trains in during round `rnd`; every backend builds it here.

    Args:
        scenario: the scenario as the client's worker built it (its model is the worker model).
        rnd: the current round.
        cid: the client.
        knobs: the client's settings from the resource policy (`Method.plan`).
        mem: the method's estimate of the client's peak training memory (bytes).
        state: the client's private state, kept by the worker between rounds.
        flop_cache: FLOPs per step shape already measured by this worker.
        server: per-batch server handle (split methods), else None.
    """
    return ClientContext(
        cid=cid, rnd=rnd, data=scenario.client_data[cid], device=scenario.population.device(cid), knobs=dict(knobs),
        state=state, seed=scenario.cfg.seed, model=scenario.model, task=scenario.task, server=server,
        mem_bytes=mem, _flop_cache=flop_cache,
    )


def train_client(method, msg: Message, ctx: ClientContext) -> Message:
    """Run `method.client_update` with torch's global RNG (dropout etc.) seeded by (seed, round, client)."""
    torch.manual_seed(derive_seed(ctx.seed, ctx.rnd, ctx.cid, "torch"))
    return method.client_update(msg, ctx)
