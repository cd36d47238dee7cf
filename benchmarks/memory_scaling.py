"""Peak memory against population size: short FedIT and Ditto runs with 10, 1,000 and 10,000 clients.

All runs share one data pool (synth-instruct, 300 samples per family: 10,500 samples, enough for
10,000 clients with an iid split) and one recipe (2 rounds, 1 local step, a 4-token evaluation at
the end). Two cohorts:

- the same cohort at every size (10 clients per round, all a 10-client population can give): the
  population grows, the work per round does not, so peak RSS should barely move; the ratio
  RSS(10,000) / RSS(10) is the population's own cost (target <= 1.2);
- the target cohort (100 clients per round) at 1,000 and 10,000 clients: peak RSS at 10,000
  (target < 4 GiB). Ditto keeps a personal copy of every weight per client (~15 MB with
  tiny-llama); the state store (engine/states.py, `population.state_memory_mb`) holds them in
  memory up to its budget and spills the rest to disk.

Each run is a fresh subprocess (ru_maxrss is a process-lifetime peak). Prints a table and, last,
`rss_ratio_10k=<max over methods of RSS(10,000)/RSS(10), same cohort> rss_10k_gib=<max over
methods of peak RSS at 10,000 clients, 100 per round>`.

    python benchmarks/memory_scaling.py [--methods fedit,ditto] [--state-memory-mb 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

SIZES = (10, 1000, 10000)
SAME_COHORT = 10  # clients per round at every size: the 10-client population's whole fleet
TARGET_COHORT = 100  # the cohort, at the sizes that can give it
MIB, GIB = 2**20, 2**30


def overrides(method: str, n_clients: int, per_round: int, state_mb: int | None) -> list[str]:
    out = [f"method.name={method}", f"population.num_clients={n_clients}",
           f"population.clients_per_round={per_round}", "rounds=2", "data.partition=iid",
           "data.samples_per_family=300", "train.local_steps=1", "eval.every=100", "eval.at_start=false",
           "eval.max_new_tokens=4", "data.eval_samples=8"]
    if method == "ditto":
        out.append("method.personal_steps=1")
    if state_mb is not None:
        out.append(f"population.state_memory_mb={state_mb}")
    return out


def child(method: str, n_clients: int, per_round: int, state_mb: int | None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from hetfl.config import load_config
    from hetfl.runner import run_experiment

    t0 = time.perf_counter()
    cfg = load_config("fedit-instruct", overrides(method, n_clients, per_round, state_mb))
    run_experiment(cfg, None, report=False)
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"peak_rss_mb": rss_kb * 1024 / MIB, "wall_s": time.perf_counter() - t0}))


def measure(method: str, n: int, k: int, state_mb: int | None) -> dict:
    cmd = [sys.executable, __file__, "--child", method, str(n), str(k)]
    if state_mb is not None:
        cmd.append(str(state_mb))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) >= 5 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]) if len(sys.argv) > 5 else None)
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="fedit,ditto")
    ap.add_argument("--state-memory-mb", type=int, default=None, help="population.state_memory_mb (default: the config's)")
    args = ap.parse_args()
    methods = args.methods.split(",")
    runs = [(n, SAME_COHORT) for n in SIZES] + [(n, TARGET_COHORT) for n in SIZES if n >= TARGET_COHORT]
    peak: dict[tuple[str, int, int], float] = {}
    print(f"{'method':<7} {'clients':>8} {'per_round':>9} {'peak_rss_mb':>11} {'wall_s':>7}", flush=True)
    for m in methods:
        for n, k in runs:
            row = measure(m, n, k, args.state_memory_mb)
            peak[m, n, k] = row["peak_rss_mb"]
            print(f"{m:<7} {n:>8} {k:>9} {row['peak_rss_mb']:>11.1f} {row['wall_s']:>7.1f}", flush=True)
    ratio = max(peak[m, SIZES[-1], SAME_COHORT] / peak[m, SIZES[0], SAME_COHORT] for m in methods)
    gib = max(peak[m, SIZES[-1], TARGET_COHORT] for m in methods) * MIB / GIB
    print(f"rss_ratio_10k={ratio:.3f} rss_10k_gib={gib:.2f}")


if __name__ == "__main__":
    main()
