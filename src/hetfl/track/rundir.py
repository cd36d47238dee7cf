"""A run directory: resolved config, per-round metrics, per-client costs, atomic checkpoints.

Layout:
    config.yaml        the resolved config
    metrics.jsonl      one JSON object per round (round 0 = the base model before training)
    clients.csv        one row per sampled client per round
    checkpoints/last.pt  the latest round's resumable state (written atomically)
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

from hetfl.errors import ConfigError

CLIENT_COLUMNS = [
    "round", "client", "tier", "rank", "num_examples", "train_loss", "bytes_up", "bytes_down", "flops",
    "t_comp_s", "t_up_s", "t_down_s", "t_server_s", "sim_time_s", "energy_j", "mem_mb",
    "status", "reason",  # ok | dropped | late | rejected (engine/fleet.py), and why a reply was rejected
    "staleness",  # server.mode async: server steps since the client started
    "server", "bits", "bandwidth_hz", "power_w",  # radio allocation (wireless model), when a method sets one
]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl; a torn last line (killed mid-write) is ignored."""
    rows = []
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


class RunDir:
    """Owns one run's output folder.

    Args:
        path: the folder.
        mode: "new" (must not exist unless `force`), or "resume" (must hold a checkpoint).
        force: allow replacing an existing folder in "new" mode.
    """

    def __init__(self, path: str | Path, mode: str = "new", force: bool = False):
        self.path = Path(path)
        self.ckpt_dir = self.path / "checkpoints"
        self.mode, self.force = mode, force
        if mode == "new":
            if self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())) and not force:
                raise ConfigError(f"--out {self.path}: already exists; use --force to replace it "
                                  f"or --resume {self.path} to continue it")
        elif not (self.ckpt_dir / "last.pt").exists():
            raise ConfigError(f"--resume {self.path}: no checkpoint found (expected {self.ckpt_dir / 'last.pt'})")

    def open(self) -> None:
        """Create (or, with force, replace) the folder. Called only once the run is known to start,
        so a config error found while building the run never touches an existing folder."""
        if self.mode != "new":
            return
        if self.path.exists() and self.force:
            shutil.rmtree(self.path) if self.path.is_dir() else self.path.unlink()
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def clients_path(self) -> Path:
        return self.path / "clients.csv"

    def write_config(self, text: str) -> None:
        atomic_write_text(self.path / "config.yaml", text)

    def read_config(self) -> dict:
        return yaml.safe_load((self.path / "config.yaml").read_text())

    def log_round(self, metrics: dict[str, Any], clients: list[dict[str, Any]]) -> None:
        with open(self.clients_path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CLIENT_COLUMNS, extrasaction="ignore")
            if f.tell() == 0:
                w.writeheader()
            w.writerows(clients)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(metrics, sort_keys=False) + "\n")

    def save_checkpoint(self, payload: dict[str, Any]) -> None:
        buf = io.BytesIO()
        torch.save(payload, buf)
        atomic_write_bytes(self.ckpt_dir / "last.pt", buf.getvalue())

    def checkpoint_payload(self) -> dict[str, Any]:
        """The last checkpoint, read only (no files touched)."""
        return torch.load(self.ckpt_dir / "last.pt", weights_only=False)

    def load_checkpoint(self) -> dict[str, Any]:
        """Load the last checkpoint and cut metrics/clients back to the checkpointed round."""
        payload = self.checkpoint_payload()
        last = payload["round"]
        rows = [r for r in read_metrics(self.metrics_path) if r["round"] <= last]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
        if self.clients_path.exists():
            with open(self.clients_path, newline="") as f:
                kept = [r for r in csv.DictReader(f)
                        if None not in r.values() and r["round"].isdigit() and int(r["round"]) <= last]
            out = io.StringIO()
            w = csv.DictWriter(out, fieldnames=CLIENT_COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(kept)
            atomic_write_text(self.clients_path, out.getvalue())
        return payload
