"""Write the small synthetic device traces shipped in `hetfl/fleet/assets/`, in FedScale's layouts.

Synthetic, not measured: a stand-in with the right shape for trying `population.availability:
{trace: packaged:behave_trace.json}` and `population.capacity_trace: packaged:capacity_trace.json`
without downloading FedScale's traces. Deterministic from `--seed`:

- `behave_trace.json` (client_behave_trace): a daily cycle (finish_time 86400 s) per client with
  1-4 online windows of 20 min to 3 h, their centres drawn around 02:00 (sd 2.5 h) so clients are
  online mostly at night; a window across midnight is split into [a, 86400) and [0, b).
  `duration` is the total online time.
- `capacity_trace.json` (client_device_capacity): `computation` lognormal around 60 ms/sample
  (clipped to 10-400), `communication` lognormal around 5000 kbit/s (clipped to 200-100000).

Every number is rounded to 0.1. Client ids are "1".."N", like FedScale's integer ids.

    .venv/bin/python scripts/make_traces.py                       # the shipped files
    .venv/bin/python scripts/make_traces.py --out /tmp/traces --clients 1000 --seed 3
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

DAY_S = 86400.0
ASSETS = Path(__file__).resolve().parents[1] / "src" / "hetfl" / "fleet" / "assets"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ASSETS)
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _windows(rng: np.random.Generator) -> list[tuple[float, float]]:
    """1-4 night-time windows of one day as sorted, disjoint [a, b) segments of [0, DAY_S]."""
    segments = []
    for _ in range(int(rng.integers(1, 5))):
        centre = rng.normal(2 * 3600.0, 2.5 * 3600.0) % DAY_S
        half = rng.uniform(20 * 60.0, 3 * 3600.0) / 2
        a, b = round(centre - half, 1), round(centre + half, 1)
        if a < 0:  # across midnight: the day's end and its start
            segments += [(round(a + DAY_S, 1), DAY_S), (0.0, b)]
        elif b > DAY_S:
            segments += [(a, DAY_S), (0.0, round(b - DAY_S, 1))]
        else:
            segments.append((a, b))
    merged: list[list[float]] = []
    for a, b in sorted(s for s in segments if s[1] > s[0]):
        if merged and a <= merged[-1][1]:  # overlapping or touching windows: one window
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def behave_trace(n: int, rng: np.random.Generator) -> dict[str, dict]:
    trace = {}
    for cid in range(1, n + 1):
        w = _windows(rng)
        trace[str(cid)] = {"active": [a for a, _ in w], "inactive": [b for _, b in w],
                           "finish_time": DAY_S, "duration": round(sum(b - a for a, b in w), 1)}
    return trace


def capacity_trace(n: int, rng: np.random.Generator) -> dict[str, dict]:
    comp = np.clip(rng.lognormal(math.log(60.0), 0.8, n), 10.0, 400.0)  # ms per sample (inference)
    comm = np.clip(rng.lognormal(math.log(5000.0), 1.2, n), 200.0, 100000.0)  # kbit/s
    return {str(cid): {"computation": round(float(c), 1), "communication": round(float(m), 1)}
            for cid, c, m in zip(range(1, n + 1), comp, comm)}


def dumps(trace: dict[str, dict]) -> str:
    """One client per line: small, and a diff shows which clients changed."""
    lines = [f"{json.dumps(cid)}: {json.dumps(entry)}" for cid, entry in trace.items()]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    rng = np.random.default_rng(a.seed)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "behave_trace.json").write_text(dumps(behave_trace(a.clients, rng)), encoding="utf-8")
    (a.out / "capacity_trace.json").write_text(dumps(capacity_trace(a.clients, rng)), encoding="utf-8")
    print(f"wrote {a.out / 'behave_trace.json'} and {a.out / 'capacity_trace.json'} ({a.clients} clients)")


if __name__ == "__main__":
    main()
