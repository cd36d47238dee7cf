"""Peak memory against population size: a short FedIT run with 10 vs 1000 clients.

The cohort per round is the same (4 clients); only the population grows. The simulator keeps
one model and per-client data only, so peak RSS should barely move. Each size runs in a fresh
subprocess (ru_maxrss is a process-lifetime peak). Last line: `rss_ratio=<1000/10>` (target <= 1.2).

    python benchmarks/memory_scaling.py
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

SIZES = (10, 1000)


def child(n_clients: int) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from hetfl.config import load_config
    from hetfl.runner import run_experiment

    cfg = load_config("fedit-instruct", [
        f"population.num_clients={n_clients}", "population.clients_per_round=4", "rounds=3",
        "data.partition=iid", "data.samples_per_family=40", "train.local_steps=4", "eval.every=100",
        "eval.at_start=false", "eval.max_new_tokens=4", "data.eval_samples=8",
    ])
    run_experiment(cfg, None, report=False)
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"clients": n_clients, "peak_rss_mb": rss_kb / 1024}))


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(int(sys.argv[2]))
        return
    peaks = {}
    for n in SIZES:
        out = subprocess.run([sys.executable, __file__, "--child", str(n)], check=True, capture_output=True, text=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        peaks[n] = row["peak_rss_mb"]
        print(f"clients={n} peak_rss_mb={peaks[n]:.1f}", flush=True)
    print(f"rss_ratio={peaks[SIZES[1]] / peaks[SIZES[0]]:.3f}")


if __name__ == "__main__":
    main()
