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
from hetfl.engine.client import client_context, one_thread, train_client  # noqa: F401  (also imported from here)
from hetfl.engine.link import DOWN, UP, Link
from hetfl.engine.states import MIB, ClientStates
from hetfl.errors import ConfigError, HetflWarning
from hetfl.seeding import derive_seed


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
        workers: processes that train a `parallel` method's clients (engine/workers.py), started
            at the first round that has two clients to train; 1: all in this process. Results do
            not depend on it.
        build: `build(cfg)` -> (scenario, method), how each worker builds the run
            (`hetfl.runner.build_run`); needed when `workers` > 1.
        pool: `pool(cfg, workers, build)` -> the workers, elsewhere than in local processes
            (engine/ray_pool.py `RayPool`); they then train every round's clients, even one.
            None: `WorkerPool`, local processes, when `workers` > 1.
    """

    def __init__(self, scenario, method, link: Link, order: Literal["sorted", "reverse"] = "sorted",
                 selector=None, on_client: Callable[[int, int, int], None] | None = None, workers: int = 1,
                 build: Callable | None = None, pool: Callable | None = None):
        self.scenario, self.method, self.link, self.order = scenario, method, link, order
        self.selector = selector  # optional data-selection stage (selection/base.py)
        self.on_client = on_client
        self.workers, self.build, self.pool_factory = workers, build, pool
        self.pool = None  # the workers, once started
        self.coresets: dict[int, list[int]] = {}  # this round's selection: client -> kept sample indices
        self.client_states = {}  # private per-client state (stateful methods): the setter makes it a ClientStates
        self.flop_cache: dict = {}  # FLOPs per (method, shape) key, measured once per worker

    @property
    def pooled(self) -> bool:
        """Whether this method's clients train in the workers: `parallel` methods that make no
        per-batch server calls. Split methods stay here: their server step and their clients'
        steps share this process's one model object, and what a client reads of it between
        calls (as the methods are written) differs when the client runs elsewhere (measured on
        SFLAM: other losses from round 1 on)."""
        return self.method.schedule == "parallel" and not self.method.calls_server

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
        remote = self.pool_factory is not None
        if self.pooled and active and (remote or (self.workers > 1 and len(active) > 1)):
            replies = self.run_pool(rnd, active, msgs, ctxs)
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

    def run_pool(self, rnd: int, cids: list[int], msgs: dict[int, Message],
                 ctxs: dict[int, ClientContext]) -> dict[int, Message]:
        """Train `cids` in the workers; replies go up the link in `cids` order."""
        from hetfl.engine.workers import WorkerPool, apply_counters

        if self.pool is None:
            if self.build is None:
                raise ValueError("SimulatedBackend: workers need build (hetfl.runner.build_run)")
            self.pool = (self.pool_factory or WorkerPool)(self.scenario.cfg, self.workers, self.build)
        out: dict[int, Message] = {}

        def job(cid: int) -> tuple:
            ctx = ctxs[cid]
            coreset = None
            if self.selector is not None:
                coreset = (self.coresets[cid], ctx.local_total, ctx.selection_flops, ctx.flops)
            return rnd, cid, ctx.knobs, ctx.mem_bytes, msgs[cid], self.client_states[cid], coreset  # sent: a copy

        def done(cid: int, reply: Message, state: dict, counters: dict) -> None:
            self.client_states[cid] = state
            self.client_states.release(cid)
            apply_counters(ctxs[cid], counters)
            out[cid] = reply
            self._progress(rnd, len(out), len(cids))

        self.pool.train(rnd, cids, job, done)
        return {cid: self.link.send(UP, rnd, cid, out[cid].kind or "update", out[cid]) for cid in cids}

    def close(self) -> None:
        """Stop the worker processes (the round loop calls this when the run ends)."""
        if self.pool is not None:
            self.pool.close()
            self.pool = None

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
            self.coresets[cid] = list(keep)
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
