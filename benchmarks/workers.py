"""Wall time per round with 1 and 2 worker processes, and the identical-results check.

Each preset runs for a few rounds into a fresh folder, once with `workers=1` (every client in
this process, one torch thread per client update) and once with `workers=2` (engine/workers.py).
Per-round wall time is the median of `round_wall_s` over the rounds after the first (round 1 also
starts the pool: its cost is shown separately as the first round's extra time). The check compares
metrics.jsonl without wall-clock keys and clients.csv byte for byte.

Split methods (FedV in split-vision: lockstep and per-batch server calls) stay in the main
process, so their speedup is about 1 by design.

    python benchmarks/workers.py [--rounds 4] [--presets fedit-instruct,...]

Last line: `speedup_2_workers=<geometric mean over the presets of wall per round, 1 over 2 workers>`.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

PRESETS = ("fedit-instruct", "fslora-instruct", "split-vision", "floral-digits-labelshift")


def measured(path: Path) -> tuple[list[dict], bytes]:
    from hetfl.track.rundir import read_metrics
    from hetfl.track.walltime import without_walls

    return without_walls(read_metrics(path / "metrics.jsonl")), (path / "clients.csv").read_bytes()


def one(preset: str, workers: int, rounds: int, out: Path) -> dict:
    from hetfl.config import load_config
    from hetfl.runner import run_experiment

    cfg = load_config(preset, [f"rounds={rounds}", "eval.at_start=false", f"eval.every={rounds}"])
    t0 = time.perf_counter()
    hist = run_experiment(cfg, out, force=True, report=False, workers=workers)
    walls = [m["round_wall_s"] for m in hist]
    return {"run_s": time.perf_counter() - t0, "round_s": statistics.median(walls[1:-1] or walls[1:]),
            "first_s": walls[0], "compute_s": statistics.median(m["compute_wall_s"] for m in hist[1:])}


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--presets", default=",".join(PRESETS))
    args = ap.parse_args()
    import hetfl.builtins  # noqa: F401

    print(f"{'preset':<26} {'N':>2} {'round_s':>8} {'compute_s':>9} {'round1_s':>8} {'run_s':>7}  identical", flush=True)
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets.split(","):
            res = {}
            for n in (1, 2):
                res[n] = one(preset, n, args.rounds, Path(tmp) / f"{preset}-{n}")
            same = measured(Path(tmp) / f"{preset}-1") == measured(Path(tmp) / f"{preset}-2")
            for n in (1, 2):
                r = res[n]
                print(f"{preset:<26} {n:>2} {r['round_s']:>8.2f} {r['compute_s']:>9.2f} {r['first_s']:>8.2f} "
                      f"{r['run_s']:>7.1f}  {same if n == 2 else ''}", flush=True)
            if not same:
                sys.exit(f"{preset}: results with 2 workers differ from 1 worker")
            ratios.append(res[1]["round_s"] / res[2]["round_s"])
    gm = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    print(f"speedup_2_workers={gm:.3f}")


if __name__ == "__main__":
    main()
