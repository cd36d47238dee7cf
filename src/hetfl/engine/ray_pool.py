"""The simulator's workers as Ray actors, on one machine or a Ray cluster (`hetfl run --backend ray`).

`RayPool` has `WorkerPool`'s interface (engine/workers.py) and runs the same `ClientWorker` in each
actor: built once from the config, one client per call. Each actor asks Ray for one CPU, so a
cluster runs as many at once as it has CPUs (`ray start --num-cpus N` sets a machine's share). The main process keeps the link,
the client states, selection, aggregation and evaluation, exactly as with local workers, so the
results are those of the local simulator.

`address`: None or "local" starts a Ray instance on this machine (stopped at the end); "auto" or
"HOST:PORT" joins a running cluster (`ray start --head` on one machine, `ray start
--address=HOST:PORT` on the others; every machine needs hetfl installed in the same environment).
`ray` is an optional dependency (`make setup-ray`).
"""

from __future__ import annotations

from typing import Callable

from hetfl.engine.api import Message
from hetfl.engine.workers import ClientWorker, WorkerError
from hetfl.errors import ConfigError


def _ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("--backend ray needs the ray package: make setup-ray "
                          "(pip install 'hetfl[ray]')") from None
    return ray


class RayPool:
    """`n` Ray actors holding the run `cfg`'s scenario and method.

    Args:
        cfg: the run's config.
        n: actors; 0: one per CPU of the cluster.
        build: `build(cfg)` -> (scenario, method), a module-level function (`hetfl.runner.build_run`).
        address: the cluster (None / "local": a new local instance; "auto"; "HOST:PORT").
    """

    def __init__(self, cfg, n: int, build: Callable, address: str | None = None):
        ray = _ray()
        self.started = not ray.is_initialized()
        if self.started:
            local = address in (None, "local")
            try:
                ray.init(address=None if local else address, include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
            except ConnectionError as e:
                raise ConfigError(f"--address {address}: no Ray cluster there ({e})") from None
        self.n = n or max(1, int(ray.cluster_resources().get("CPU", 1)))
        actor = ray.remote(num_cpus=1)(ClientWorker)
        self.actors = [actor.remote(cfg, build) for _ in range(self.n)]
        try:
            ray.get([a.ready.remote() for a in self.actors])
        except ray.exceptions.RayTaskError as e:  # the build failed: raise what it raised
            self.close()
            raise e.as_instanceof_cause() from None

    def train(self, rnd: int, cids: list[int], jobs: Callable[[int], tuple],
              done: Callable[[int, Message, dict, dict], None]) -> None:
        """Train `cids` (in this order, as actors come free); see `WorkerPool.train`."""
        ray = _ray()
        pending, running, free = list(cids), {}, list(range(self.n))
        while pending or running:
            while pending and free:
                i, cid = free.pop(0), pending.pop(0)
                running[self.actors[i].train.remote(jobs(cid))] = (i, cid)
            ready, _ = ray.wait(list(running), num_returns=1)
            i, cid = running.pop(ready[0])
            try:
                reply, state, counters = ray.get(ready[0])
            except ray.exceptions.RayActorError as e:
                self.close()
                raise WorkerError(f"Ray worker {i} died while training client {cid} in round {rnd} ({type(e).__name__}); "
                                  "the run folder keeps its last checkpoint: continue with --resume") from None
            except ray.exceptions.RayTaskError as e:  # the client's update raised
                self.close()
                raise e.as_instanceof_cause() from None
            free.append(i)
            done(cid, reply, state, counters)

    def close(self) -> None:
        ray = _ray()
        for a in getattr(self, "actors", []):
            ray.kill(a)
        self.actors = []
        if self.started and ray.is_initialized():
            ray.shutdown()
            self.started = False
