"""Parallel workers (engine/workers.py): a round's clients trained in N processes give the results of one.

Every registered method runs the method table's tiny scenario of its family (test_method_table)
with 3 clients per round, once in this process and once with 2 worker processes; metrics.jsonl
(wall-clock timings aside), clients.csv and the final checkpoint must be identical. `parallel`
methods train in the workers (split methods' per-batch server calls come back to this process);
`lockstep` and `sequential` ones must not start any. One method also runs with 3 workers, one
with a selection stage, one with an asynchronous server and faults, and a killed worker is
reported by client and round and the run continues with resume.
"""

from __future__ import annotations

import os
import signal

import pytest

from test_method_table import INSTRUCT, NAMES, SELECTOR_SETS, assert_identical, measured, table_config

from hetfl.config import load_config
from hetfl.engine.loop import run_rounds
from hetfl.engine.sim import SimulatedBackend
from hetfl.engine.workers import WorkerError
from hetfl.registry import METHODS
from hetfl.runner import build_run, run_experiment
from hetfl.track.rundir import RunDir, read_metrics

THREE = ["population.clients_per_round=3"]


def outputs(path) -> tuple[list[dict], bytes, dict]:
    return (measured(read_metrics(path / "metrics.jsonl")), (path / "clients.csv").read_bytes(),
            RunDir(path, mode="resume").checkpoint_payload())


def run(cfg, path, workers: int, **kw):
    return run_experiment(cfg, path, report=False, workers=workers, **kw)


def assert_same_run(a, b) -> None:
    ma, ca, ka = outputs(a)
    mb, cb, kb = outputs(b)
    assert ma == mb
    assert ca == cb
    assert_identical(ka["state"], kb["state"])
    assert_identical(dict(ka["client_states"]), dict(kb["client_states"]))


class CountingBackend(SimulatedBackend):
    """The simulator, recording whether it started a pool."""

    started: list[int] = []

    def run_pool(self, rnd, cids, msgs, ctxs):
        CountingBackend.started.append(rnd)
        return super().run_pool(rnd, cids, msgs, ctxs)


@pytest.mark.parametrize("name", NAMES)
def test_two_workers_give_the_one_process_results(name, tmp_path):
    cfg = table_config(name, *THREE)
    run(cfg, tmp_path / "one", 1)
    sc, method = build_run(cfg)
    CountingBackend.started = []
    run_rounds(sc, method, RunDir(tmp_path / "two"),
               backend=lambda s, m, link, sel: CountingBackend(s, m, link, selector=sel, workers=2, build=build_run))
    assert_same_run(tmp_path / "one", tmp_path / "two")
    spec = METHODS.get(name).factory
    pooled = spec.schedule == "parallel" and not spec.calls_server
    assert CountingBackend.started == ([1, 2] if pooled else [])  # split, lockstep, sequential: this process


def test_three_workers_and_more_workers_than_clients(tmp_path):
    cfg = table_config("fslora", *THREE)
    run(cfg, tmp_path / "one", 1)
    run(cfg, tmp_path / "three", 3)
    run(cfg, tmp_path / "five", 5)  # two of them idle
    assert_same_run(tmp_path / "one", tmp_path / "three")
    assert_same_run(tmp_path / "one", tmp_path / "five")


def test_selection_stage_runs_here_and_the_coresets_train_in_the_workers(tmp_path):
    cfg = load_config(INSTRUCT, ["method.name=fedit", "selection.name=fedhds", *SELECTOR_SETS["fedhds"],
                                 "rounds=2", "checkpoint_every=1"])
    run(cfg, tmp_path / "one", 1)
    run(cfg, tmp_path / "two", 2)
    assert_same_run(tmp_path / "one", tmp_path / "two")
    rows = read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert all(0 < r["data_fraction"] < 1 for r in rows)  # the coresets were strict subsets


def test_async_server_with_faults_and_median_gives_the_one_process_results(tmp_path):
    cfg = table_config("fedit", "population.num_clients=6", "population.clients_per_round=4", "rounds=3",
                       "server.mode=async", "server.concurrency=4", "server.buffer=2", "server.aggregator=median",
                       "faults.dropout=0.2", "faults.straggler=0.5", "faults.corrupt=0.2")
    run(cfg, tmp_path / "one", 1)
    run(cfg, tmp_path / "two", 2)
    assert_same_run(tmp_path / "one", tmp_path / "two")


def test_a_killed_worker_names_client_and_round_and_the_run_resumes(tmp_path):
    cfg = table_config("ditto", *THREE, "rounds=3")
    run(cfg, tmp_path / "ref", 1)
    sc, method = build_run(cfg)
    backend: list[SimulatedBackend] = []

    def make(s, m, link, sel):
        backend.append(SimulatedBackend(s, m, link, selector=sel, workers=2, build=build_run))
        return backend[0]

    procs = []

    def kill_in_round_2(rnd, done, total):
        if rnd == 2 and done == 0:
            procs.extend(backend[0].pool.procs)
            os.kill(procs[0].pid, signal.SIGKILL)
            procs[0].join()

    out = tmp_path / "killed"
    with pytest.raises(WorkerError, match=r"worker 0 \(pid \d+\) died while training client \d+ in round 2 "
                                          r"\(exit code -9\).*--resume"):
        run_rounds(sc, method, RunDir(out), backend=make, on_client=kill_in_round_2)
    assert not any(p.is_alive() for p in procs)  # the other worker was stopped too
    assert [m["round"] for m in read_metrics(out / "metrics.jsonl")] == [1]
    run(cfg, out, 2, resume=True)
    assert_same_run(tmp_path / "ref", out)


def test_an_error_in_a_worker_is_raised_here_as_it_was(tmp_path):
    """A worker builds the run from the config; what fails there fails as it would here."""
    from hetfl.engine.workers import WorkerPool
    from hetfl.errors import DataError

    cfg = table_config("fedit", f"data.name={tmp_path / 'missing.jsonl'}")
    with pytest.raises(DataError) as here:
        build_run(cfg)
    with pytest.raises(DataError) as there:
        WorkerPool(cfg, 2, build_run)
    assert str(there.value) == str(here.value) == f"{tmp_path / 'missing.jsonl'}: instruction file not found"


def test_cli_workers_flag_is_checked(tmp_path, capsys):
    from hetfl.cli.main import main

    assert main(["run", "fedit-instruct", "--workers", "0", "--out", str(tmp_path / "x")]) == 2
    assert "--workers: must be >= 1" in capsys.readouterr().err
    assert main(["run", "fedit-instruct", "--workers", "2", "--backend", "flower", "--out", str(tmp_path / "y")]) == 2
    assert "--workers applies to --backend sim" in capsys.readouterr().err
    assert main(["run", "fedit-instruct", "--address", "auto", "--out", str(tmp_path / "z")]) == 2
    assert "--address needs --backend ray" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


def test_ray_backend_without_ray_is_one_line_naming_the_setup(monkeypatch):
    import sys

    from hetfl.engine.ray_pool import RayPool
    from hetfl.errors import ConfigError

    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"--backend ray needs the ray package: make setup-ray"):
        RayPool(table_config("fedit"), 2, build_run)
