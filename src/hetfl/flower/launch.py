"""Run an experiment on Flower's Deployment Engine (`hetfl run ... --backend flower`).

Locally (default): starts one `flower-superlink` and N `flower-supernode` processes on loopback
ports (insecure mode, no network, no Ray), submits the run with `flwr run`, follows its progress
through the run directory's metrics.jsonl, and stops the processes it started. With `superlink`
set, it submits to that already running SuperLink instead, whose SuperNodes may be on other
machines.

The submitted Flower app is a generated folder holding only a pyproject.toml: its components
point at `hetfl.flower.apps` (hetfl must be installed wherever a SuperLink or SuperNode runs) and
its `[tool.flwr.app.config]` carries the resolved YAML config, so every node builds the same run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hetfl.config import Config, dump_config
from hetfl.errors import ConfigError, HetflError
from hetfl.flower import check_supported, require_flwr

START_TIMEOUT_S = 120.0  # a SuperLink importing its dependencies on a busy 2-core machine is slow
CONNECTION = "hetfl"  # name of the SuperLink connection in the generated Flower config


class FlowerError(HetflError):
    """A Flower run failed outside hetfl's own checks; the message says where its logs are."""


def run_flower(cfg: Config, out: str | Path, *, supernodes: int = 2, superlink: str | None = None,
               force: bool = False, report: bool = True,
               on_round: Callable[[dict], None] | None = None) -> list[dict[str, Any]]:
    """Run `cfg` on Flower and return the per-round metrics, written to `out` like a simulator run.

    Args:
        cfg: validated config.
        out: run directory (written by the ServerApp; it must be reachable from the SuperLink's host).
        supernodes: how many SuperNodes to start locally, or (with `superlink`) to wait for.
        superlink: HOST:PORT of a running SuperLink (started with --insecure); None: start one locally.
        force: replace an existing run directory.
        report: write report.md with plots at the end.
        on_round: per-round metrics callback (progress display).

    Raises:
        ConfigError: before anything starts, for a config Flower rounds cannot run, or if flwr is missing.
        FlowerError: if the Flower processes or the run fail (the message names the logs).
    """
    from hetfl.runner import build_method
    from hetfl.track.rundir import RunDir, read_metrics

    require_flwr()
    check_supported(cfg, build_method(cfg))
    if supernodes < 1:
        raise ConfigError(f"--supernodes {supernodes}: must be >= 1")
    out = Path(out).resolve()
    RunDir(out, mode="new", force=force)  # fail now, not inside the ServerApp
    work = Path(tempfile.mkdtemp(prefix="hetfl-flower-"))
    logs, status = work / "logs", work / "status.json"
    logs.mkdir()
    env = flower_env()
    procs: list[subprocess.Popen] = []
    local = superlink is None
    try:
        if local:
            port = free_port()
            superlink = f"127.0.0.1:{port}"
            procs.append(start(["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(port),
                                "--disable-runtime-dependency-installation"], env, work / "superlink", logs))
            for i in range(supernodes):
                procs.append(start(["flower-supernode", "--insecure", "--superlink", superlink, "--host", "127.0.0.1",
                                    "--port", str(free_port())], env, work / f"supernode{i}", logs))
            wait_healthy(superlink, procs[0], logs)
        app = write_app(work / "app", cfg, out, {"supernodes": supernodes, "force": force, "report": report,
                                                 "status": status})
        write_connection(work / "cli", superlink)
        with open(logs / "flwr-run.log", "wb") as log:
            run = subprocess.Popen([tool("flwr"), "run", str(app), CONNECTION, "--stream"], stdout=log,
                                   stderr=subprocess.STDOUT, env={**env, "FLWR_HOME": str(work / "cli")})
            procs.append(run)
            seen, started = 0, time.time()
            while run.poll() is None and not status.exists():  # the ServerApp writes status.json when done
                time.sleep(0.5)
                seen = report_new_rounds(out / "metrics.jsonl", started, seen, on_round)
            report_new_rounds(out / "metrics.jsonl", started, seen, on_round)
    finally:
        stop(procs)
    history = read_metrics(out / "metrics.jsonl")
    if status.exists() or local:
        result = json.loads(status.read_text()) if status.exists() else {
            "ok": False, "user_error": False, "error": "the ServerApp ended without a result"}
    else:  # a ServerApp on another host cannot write here: judge by `flwr run` and the metrics
        done = run.returncode == 0 and (not out.exists() or (history and history[-1]["round"] == cfg.rounds))
        result = {"ok": True} if done else {"ok": False, "user_error": False, "error": "no result from the ServerApp"}
    if not result["ok"]:
        if result["user_error"]:  # a config or data error, same as the simulator's: the logs add nothing
            shutil.rmtree(work, ignore_errors=True)
            raise HetflError(result["error"])
        first = (result["error"] or "unknown error").splitlines()[0]
        raise FlowerError(f"the Flower run failed ({first}); logs in {logs}")
    if out.is_dir():
        shutil.copytree(logs, out / "flower-logs", dirs_exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    return history


def report_new_rounds(metrics: Path, started: float, seen: int, on_round) -> int:
    """Pass the rows of `metrics` after the first `seen` to `on_round`; returns how many are seen.
    A file older than `started` is the replaced run's (--force), not yet this one's."""
    from hetfl.track.rundir import read_metrics

    if on_round is None or not metrics.exists() or metrics.stat().st_mtime < started:
        return seen
    rows = read_metrics(metrics)
    for m in rows[seen:]:
        on_round(m)
    return max(seen, len(rows))


def flower_env() -> dict[str, str]:
    """The environment of every Flower process: this Python's tools first, no calls home."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # superexec is found by name
    env.update(FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", HF_HUB_OFFLINE="1")
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")  # start each app process within 0.1 s, not 1 s
    return env


def tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else (shutil.which(name) or name)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], env: dict, home: Path, logs: Path) -> subprocess.Popen:
    """Start a Flower process in its own session (so stopping it also stops the apps it spawned),
    with its own FLWR_HOME (installed apps, state)."""
    home.mkdir(parents=True)
    with open(logs / f"{home.name}.log", "wb") as log:
        p = subprocess.Popen([tool(cmd[0]), *cmd[1:]], stdout=log, stderr=subprocess.STDOUT,
                             env={**env, "FLWR_HOME": str(home)}, start_new_session=True)
    p.own_group = True
    return p


def wait_healthy(address: str, proc: subprocess.Popen, logs: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FlowerError(f"flower-superlink exited with code {proc.returncode}; see {logs / 'superlink.log'}")
        try:
            with urllib.request.urlopen(f"http://{address}/health", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise FlowerError(f"flower-superlink did not answer on {address} within {START_TIMEOUT_S:g} s; see {logs}")


def stop(procs: list[subprocess.Popen]) -> None:
    """Stop the processes this launcher started (newest first). Each one `start` made leads its own
    process group, so the group signal also reaches the SuperExec and app processes it spawned."""
    for p in reversed(procs):
        _signal(p, signal.SIGTERM)
    for p in reversed(procs):
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            _signal(p, signal.SIGKILL)
            p.wait()
        _signal(p, signal.SIGKILL)  # whatever its group still holds


def _signal(p: subprocess.Popen, sig: int) -> None:
    try:
        if getattr(p, "own_group", False):
            os.killpg(p.pid, sig)  # the group id is the leader's pid, valid while any member lives
        elif p.poll() is None:
            p.send_signal(sig)
    except (ProcessLookupError, PermissionError):
        pass


def write_app(folder: Path, cfg: Config, out: Path, opts: dict[str, Any]) -> Path:
    """The Flower app folder `flwr run` packages: a pyproject.toml naming hetfl's apps and the run config."""
    import tomli_w

    from hetfl.flower.wire import RC_CONFIG, RC_FORCE, RC_NODES, RC_OUT, RC_REPORT, RC_STATUS

    folder.mkdir(parents=True)
    run_config = {RC_CONFIG: dump_config(cfg), RC_OUT: str(out), RC_FORCE: opts["force"], RC_REPORT: opts["report"],
                  RC_NODES: opts["supernodes"], RC_STATUS: str(opts["status"])}
    project = {
        "project": {"name": "hetfl-run", "version": "1.0.0", "description": f"hetfl run {cfg.name}",
                    "license": "Apache-2.0", "dependencies": []},
        "tool": {"flwr": {"app": {
            "publisher": "hetfl",
            "components": {"serverapp": "hetfl.flower.apps:server_app", "clientapp": "hetfl.flower.apps:client_app"},
            "config": run_config,
        }}},
    }
    (folder / "pyproject.toml").write_text(tomli_w.dumps(project))
    return folder


def write_connection(home: Path, address: str) -> None:
    """A Flower CLI config (FLWR_HOME/config.toml) whose default connection is the SuperLink at `address`."""
    import tomli_w

    home.mkdir(parents=True)
    conf = {"superlink": {"default": CONNECTION, CONNECTION: {"address": address, "insecure": True}}}
    (home / "config.toml").write_text(tomli_w.dumps(conf))
