"""Flower backend vs the in-process simulator: the same config through both, wall time and equality.

Runs `cfg` with `run_experiment` (simulator) and `run_flower` (a local SuperLink + N SuperNodes),
then prints wall seconds per round for each, their ratio, and how far the per-round metrics are
apart, their wall-clock timings aside: `identical` when every number and byte count is equal, else
the largest relative difference of any numeric metric (the FLOP counter can change the last bits
on attention models; see the README's Flower section).

    python benchmarks/flower_overhead.py                                  # FedIT on the synthetic MLP, 3 rounds
    python benchmarks/flower_overhead.py --preset fedit-instruct --set rounds=2 --set population.clients_per_round=2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hetfl.config import load_config  # noqa: E402

MLP = ["method.name=fedit", "rounds=3", "population.num_clients=4", "population.clients_per_round=2",
       "data.client_test_fraction=0", "data.clusters=1", "lora.targets=[fc1]", "lora.rank=2"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="floral-synth-mlp")
    p.add_argument("--set", action="append", default=None, help="override (repeat); default: a tiny FedIT on the MLP")
    p.add_argument("--supernodes", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the Flower processes get the same)")
    return p.parse_args(argv)


def computed(rows: list[dict]) -> list[dict]:
    """The rows without their wall-clock timings (`*_wall_s`), which no two runs share."""
    from hetfl.track.walltime import without_walls

    return without_walls(rows)


def max_rel_diff(a: list[dict], b: list[dict]) -> float:
    """Largest |x - y| / max(|x|, |y|) over every numeric metric of every round (0 when equal)."""
    worst = 0.0
    for ma, mb in zip(a, b):
        for k in ma.keys() & mb.keys():
            x, y = ma[k], mb[k]
            if isinstance(x, (int, float)) and isinstance(y, (int, float)) and x != y:
                worst = max(worst, abs(x - y) / max(abs(x), abs(y)))
    return worst


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    from hetfl.flower.launch import run_flower
    from hetfl.runner import run_experiment

    torch.set_num_threads(args.threads)
    cfg = load_config(args.preset, MLP if args.set is None and args.preset == "floral-synth-mlp" else args.set or [])
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        sim = run_experiment(cfg, Path(tmp) / "sim", report=False)
        t_sim = time.perf_counter() - t0
        t0 = time.perf_counter()
        flower = run_flower(cfg, Path(tmp) / "flower", supernodes=args.supernodes, report=False)
        t_flower = time.perf_counter() - t0
    rounds = cfg.rounds
    sim, flower = computed(sim), computed(flower)
    same = flower == sim
    print(f"config {cfg.name} ({cfg.method.name}), {rounds} rounds, {cfg.population.clients_per_round} clients/round, "
          f"{args.supernodes} SuperNodes")
    print(f"simulator  {t_sim:8.1f} s  ({t_sim / rounds:.2f} s/round)")
    print(f"flower     {t_flower:8.1f} s  ({t_flower / rounds:.2f} s/round, incl. starting and stopping Flower)")
    print(f"metrics: {'identical' if same else f'max relative difference {max_rel_diff(sim, flower):.2e}'}")
    print(f"flower_over_sim_wall={t_flower / t_sim:.2f}")


if __name__ == "__main__":
    main()
