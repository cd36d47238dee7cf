"""What runs on a client, in whichever process holds it: its context and its update.

The simulator (engine/sim.py), its worker processes (engine/workers.py) and Flower's ClientApp
(flower/apps.py) all build a client's context and run its update with these functions, so the
three agree bit for bit.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch

from hetfl.engine.api import ClientContext, Message
from hetfl.seeding import derive_seed


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
    """Run `method.client_update` with torch's global RNG (dropout etc.) seeded by (seed, round, client),
    on one torch thread.

    One thread, wherever it runs: torch's kernels can sum in another order with another thread
    count (measured: FLoRAL on the digits MLP ends in other last bits with 2 threads than with 1),
    so a client's update must not depend on how many threads its process has. Parallelism comes
    from running clients side by side (engine/workers.py), not from threads inside one update.
    """
    torch.manual_seed(derive_seed(ctx.seed, ctx.rnd, ctx.cid, "torch"))
    with one_thread():
        return method.client_update(msg, ctx)


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the block on one torch thread (a client's update)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
