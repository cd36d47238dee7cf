"""Programmatic entry points: build a method, run one experiment into a run directory.

Importing this module registers the built-ins (hetfl.builtins), so a script that imports it can
name any shipped method, codec or dataset in its config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

import hetfl.builtins  # noqa: F401  (registers the shipped methods, codecs and datasets)
from hetfl.config import Config
from hetfl.registry import METHODS


def build_method(cfg: Config):
    """Instantiate the method named by `cfg.method.name` with its typed options."""
    return METHODS.get(cfg.method.name, "method.name").factory(cfg, cfg.method)


def build_run(cfg: Config):
    """(scenario, method) for `cfg`, built the same way in every process that takes part in a run
    (the simulator, or a Flower ServerApp and each ClientApp), so all hold the same model."""
    from hetfl.scenario import build_scenario

    torch.manual_seed(cfg.seed)
    return build_scenario(cfg), build_method(cfg)


def run_experiment(cfg: Config, out: str | Path | None, *, force: bool = False, resume: bool = False,
                   on_round: Callable[[dict], None] | None = None, report: bool = True,
                   backend: Callable | None = None,
                   on_client: Callable[[int, int, int], None] | None = None, workers: int = 1,
                   ray: str | None = None) -> list[dict[str, Any]]:
    """Build the scenario and run `cfg` to completion, writing outputs under `out`.

    Args:
        cfg: validated config.
        out: run directory (None: keep everything in memory).
        force: replace an existing run directory.
        resume: continue the run in `out` from its last checkpoint.
        on_round: per-round metrics callback.
        report: write report.md with plots at the end.
        backend: the round loop's backend factory (see `run_rounds`); None: the simulator.
        on_client: `on_client(rnd, done, total)` per client update within a round (see `run_rounds`).
        workers: simulator worker processes (engine/workers.py); results do not depend on it.
        ray: run the workers as Ray actors on this cluster address ("local", "auto", "HOST:PORT";
            engine/ray_pool.py), `workers` of them (0: one per cluster CPU); None: local processes.

    Returns:
        The per-round metrics.
    """
    from hetfl.engine.loop import run_rounds
    from hetfl.track.rundir import RunDir

    rundir = None
    if out is not None:
        rundir = RunDir(out, mode="resume" if resume else "new", force=force)
    scenario, method = build_run(cfg)
    pool = None
    if ray is not None:
        from functools import partial

        from hetfl.engine.ray_pool import RayPool

        pool = partial(RayPool, address=ray)
    history = run_rounds(scenario, method, rundir, on_round=on_round, resume=resume, backend=backend,
                         on_client=on_client, workers=workers, build=build_run, pool=pool)
    if rundir is not None and report:
        from hetfl.track.report import write_report

        write_report(rundir.path)
    return history


def run_on_copy(base, cfg: Config) -> tuple[list[dict], float]:
    """Run `cfg` in memory on a deep copy of an already built scenario `base` (same data, model
    and population; benchmarks build each scenario once). Returns (per-round metrics, wall seconds)."""
    import copy
    import time

    from hetfl.engine.loop import run_rounds

    sc = copy.deepcopy(base)
    sc.cfg = cfg
    t0 = time.time()
    history = run_rounds(sc, build_method(cfg))
    return history, time.time() - t0


def run_or_resume(cfg: Config, out: str | Path, *, force: bool = False, resume: bool = False,
                  on_round: Callable[[dict], None] | None = None) -> str:
    """Run `cfg` into `out` as one run of a batch (compare, tune): with `resume`, a finished run is
    kept, a killed one continues from its checkpoint and one that never checkpointed restarts.

    Returns what happened: "done" (kept), "resumed" or "ran".

    Raises:
        ConfigError: `out` holds a different config (with `resume`), or exists (without `force`).
    """
    from hetfl.config import dump_config
    from hetfl.errors import ConfigError
    from hetfl.track.rundir import read_metrics

    d = Path(out)
    if resume and d.exists():
        saved = d / "config.yaml"
        if saved.is_file() and saved.read_text() != dump_config(cfg):
            raise ConfigError(f"--resume: {d} holds a run of another config; use another --out or --force")
        rows = read_metrics(d / "metrics.jsonl")
        if saved.is_file() and rows and rows[-1].get("round") == cfg.rounds and (d / "report.md").is_file():
            return "done"  # finished: its last round is logged and its report written
        if (d / "checkpoints" / "last.pt").is_file():
            run_experiment(cfg, d, resume=True, on_round=on_round)
            return "resumed"
        force = True  # killed before its first checkpoint: nothing to keep
    run_experiment(cfg, d, force=force, on_round=on_round)
    return "ran"
