"""Parallel client workers: a round's clients trained in N processes, with the results of one.

`WorkerPool` starts N processes (spawned: a fresh interpreter each, so no thread pool or lock of
the parent is inherited), each with one torch thread. Each builds the run's scenario and method
once, from the config, exactly as the simulator and Flower's ClientApp build them
(`runner.build_run`, which the caller passes in), and keeps them for the whole run. The simulator (engine/sim.py) sends a
worker one job per client: the round, the client, its knobs and memory estimate, the message as
the link delivered it, the client's private state and, after a selection stage, the coreset. The
worker trains the client (`client_context` + `train_client`, the same code as in one process) and
returns the reply, the new state and the context's counters. Everything else stays in the main
process: the link and its ledger, the client states (engine/states.py), the selection stage,
aggregation and evaluation.

Results do not depend on N, because a client's work depends only on its job: its randomness is
derived from (seed, round, client), its state travels with the job, and counting a step's FLOPs
does not change its numbers (engine/flops.py), so a worker's own FLOP cache only saves time.
Replies are sent up the link in the round's client order once all are in; the link's codec draws
are keyed by (round, client, direction, kind, call), so their order does not matter either.

Only `parallel` methods without per-batch server calls use the pool. `lockstep` ones (a server
barrier after every local step) and `sequential` ones (one client after another) run in the main
process, as do split methods (`calls_server`): their clients and their server step share the main
process's one model object, and measured on SFLAM a client run elsewhere ends in other losses from
round 1 on, so they stay where their semantics are the tested ones.

A worker that dies (killed, out of memory) stops the run with a `WorkerError` naming the worker,
the client and the round; the run's folder keeps its last checkpoint, so `--resume` continues it.
An error raised inside a client's update (a config problem, say) is raised again in the main
process as it was.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import traceback
import weakref
from multiprocessing.connection import Connection, wait
from typing import Any, Callable

from hetfl.engine.api import ClientContext, Message
from hetfl.errors import HetflError


class WorkerError(HetflError):
    """A worker process died while training a client."""


class ClientWorker:
    """One worker's copy of the run: built once from the config, then one client per `train` call.

    A process worker (`WorkerPool`) and a Ray actor (engine/ray_pool.py) both hold one.

    Args:
        cfg: the run's config.
        build: `build(cfg)` -> (scenario, method), e.g. `hetfl.runner.build_run`.
    """

    def __init__(self, cfg, build: Callable):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch

        torch.set_num_threads(1)
        # `build` arrives by name (hetfl.runner.build_run): importing it registered the built-ins.
        self.scenario, self.method = build(cfg)
        self.method.setup(self.scenario)
        self.flop_cache: dict = {}

    def ready(self) -> bool:
        return True

    def train(self, job: tuple) -> tuple[Message, dict, dict[str, Any]]:
        """Train one client: `job` is (round, client, knobs, memory estimate, message, state,
        coreset or None); returns (reply, the client's new state, the context's counters)."""
        from hetfl.engine.client import client_context, train_client

        rnd, cid, knobs, mem, msg, state, coreset = job
        ctx = client_context(self.scenario, rnd, cid, knobs, mem, state, self.flop_cache)
        if coreset is not None:  # the main process ran the selection stage
            keep, ctx.local_total, ctx.selection_flops, ctx.flops = coreset
            ctx.data = [ctx.data[i] for i in keep]
        reply = train_client(self.method, msg, ctx)
        return reply, state, {"flops": ctx.flops, "mem_bytes": ctx.mem_bytes, "knobs": ctx.knobs}


def _serve(conn: Connection, cfg, build) -> None:
    """A worker process's life: build the run once, then train one client per job until told to stop."""
    try:
        worker = ClientWorker(cfg, build)
    except BaseException as e:  # noqa: BLE001 (reported to the main process, which raises it)
        conn.send(("error", _portable(e)))
        return
    conn.send(("ready",))
    while (job := conn.recv()) is not None:
        try:
            conn.send(("done", *worker.train(job)))
        except BaseException as e:  # noqa: BLE001
            conn.send(("error", _portable(e)))


def _portable(e: BaseException) -> BaseException:
    """`e` if it pickles (and unpickles), else a RuntimeError carrying its traceback."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001
        return RuntimeError("".join(traceback.format_exception(e)))


def _stop(procs: list, conns: list) -> None:
    for c in conns:
        try:
            c.send(None)
        except (OSError, BrokenPipeError):
            pass
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join()


class WorkerPool:
    """N worker processes holding the run `cfg`'s scenario and method.

    Args:
        cfg: the run's config (each worker builds the run from it).
        n: number of processes.
        build: `build(cfg)` -> (scenario, method), a module-level function (workers are spawned,
            so it travels by name): `hetfl.runner.build_run`.
    """

    def __init__(self, cfg, n: int, build: Callable):
        ctx = mp.get_context("spawn")
        self.n = n
        self.conns: list[Connection] = []
        self.procs = []
        for _ in range(n):
            here, there = ctx.Pipe()
            p = ctx.Process(target=_serve, args=(there, cfg, build), daemon=True)
            p.start()
            there.close()
            self.conns.append(here)
            self.procs.append(p)
        self._finalizer = weakref.finalize(self, _stop, self.procs, self.conns)
        for i in range(n):  # every worker has built the run (they build it at the same time)
            self._expect(i, "ready", None, None)

    def close(self) -> None:
        self._finalizer()

    def _recv(self, i: int, rnd: int | None, cid: int | None) -> tuple:
        try:
            return self.conns[i].recv()
        except (EOFError, ConnectionResetError, OSError):
            self.procs[i].join(timeout=5)
            code = self.procs[i].exitcode
            self.close()
            what = "while building the run" if cid is None else f"while training client {cid} in round {rnd}"
            raise WorkerError(f"worker {i} (pid {self.procs[i].pid}) died {what} (exit code {code}); "
                              "the run folder keeps its last checkpoint: continue with --resume") from None

    def _expect(self, i: int, kind: str, rnd, cid) -> tuple:
        msg = self._recv(i, rnd, cid)
        if msg[0] == "error":
            self.close()
            raise msg[1]
        assert msg[0] == kind, msg[0]
        return msg

    def train(self, rnd: int, cids: list[int], jobs: Callable[[int], tuple],
              done: Callable[[int, Message, dict, dict], None]) -> None:
        """Train `cids` (in this order, as workers come free).

        Args:
            rnd: the round.
            cids: the clients to train.
            jobs: `jobs(cid)` -> one client's job, as `ClientWorker.train` takes it.
            done: `done(cid, reply, state, counters)` as each client finishes.
        """
        pending = list(cids)
        busy: dict[int, int] = {}  # worker -> client
        free = list(range(self.n))
        while pending or busy:
            while pending and free:
                i, cid = free.pop(0), pending.pop(0)
                try:
                    self.conns[i].send(jobs(cid))
                except (BrokenPipeError, ConnectionResetError, OSError):  # it died between two jobs
                    self._recv(i, rnd, cid)
                busy[i] = cid
            ready = wait([self.conns[i] for i in busy] + [self.procs[i].sentinel for i in busy])
            for i in sorted(busy):
                if self.conns[i] not in ready and self.procs[i].sentinel not in ready:
                    continue
                cid = busy[i]
                msg = self._recv(i, rnd, cid)
                if msg[0] == "done":
                    del busy[i]
                    free.append(i)
                    done(cid, msg[1], msg[2], msg[3])
                else:  # "error": the client's update raised
                    self.close()
                    raise msg[1]


def default_workers() -> int:
    """The CLI's `--workers` default: one per core this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def apply_counters(ctx: ClientContext, counters: dict[str, Any]) -> None:
    """Copy a worker's context counters onto the main process's context of the same client."""
    ctx.flops, ctx.mem_bytes, ctx.knobs = counters["flops"], counters["mem_bytes"], counters["knobs"]
