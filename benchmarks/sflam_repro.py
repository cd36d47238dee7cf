"""SFLAM on `sflam-vision`: accuracy vs activation bits, latency and energy against fixed
allocations and unquantized split baselines, and the latency-energy trade-off over lambda.

Every run uses the wireless cost model (`wireless.enabled: true` in the preset), so all
methods are costed alike: Shannon uplink rates from bandwidth, power and each device's channel,
server compute shared per edge server, measured bytes and FLOPs.

1. accuracy vs bits: sflam with every device at q bits (`wireless.mode=fixed-bits`), q in --bits.
2. per-round latency and energy: sflam (optimised: bits, bandwidth, power, device-server
   matching) against sflam with equal bandwidth, with maximum power, with fixed bits, the
   fully fixed allocation (equal bandwidth, maximum power, 32 bits), unquantized SplitFed V1/V2,
   vanilla split learning and FedAvg (whole model on the device).
3. the trade-off: the allocation alone (no training) for round 1's devices at each lambda.

Prints the tables and writes `tradeoff.png` and `accuracy_vs_bits.png` to --out. Last line:
`sflam_energy_ratio_vs_fixed=<ratio>`: the optimised run's energy per round over the fully fixed
allocation's, with both accuracies printed (the ratio is reported whatever they are; the table
says whether they are within 1 point).

    python benchmarks/sflam_repro.py                        # 5 rounds per run, ~30 min on 2 cores
    python benchmarks/sflam_repro.py --rounds 4 --bits 4 8 32
"""

from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hetfl.config import load_config  # noqa: E402
from hetfl.runner import build_method, run_on_copy  # noqa: E402
from hetfl.scenario import build_scenario  # noqa: E402
from hetfl.track.report import plot_tradeoff, plot_xy  # noqa: E402

PRESET = "sflam-vision"
FIXED = ["wireless.mode=fixed", "wireless.fixed_bits=32"]
RUNS = {  # label -> overrides
    "sflam (optimised)": [],
    "sflam equal-bandwidth": ["wireless.mode=equal-bandwidth"],
    "sflam max-power": ["wireless.mode=max-power"],
    "sflam fixed-bits 8": ["wireless.mode=fixed-bits", "wireless.fixed_bits=8"],
    "sflam fixed (all)": FIXED,
    "splitfed-v1": ["method.name=splitfed-v1"],
    "splitfed-v2": ["method.name=splitfed-v2"],
    "sl-vanilla": ["method.name=sl-vanilla"],
    "fedavg-full": ["method.name=fedavg-full"],
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="rounds per run (0: the preset's 10)")
    p.add_argument("--bits", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    p.add_argument("--runs", nargs="+", default=list(RUNS), help="which of the comparison runs")
    p.add_argument("--lams", type=float, nargs="+", default=[0.0, 0.01, 0.05, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99, 1.0])
    p.add_argument("--set", nargs="*", default=[], help="extra overrides for every run, key=value")
    p.add_argument("--out", default="runs/sflam_repro")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


_CACHE: dict[tuple, dict] = {}


def run(base, overrides: list[str], args) -> dict:
    """One training run of the preset with `overrides` (runs with the same overrides are shared)."""
    if tuple(overrides) in _CACHE:
        return _CACHE[tuple(overrides)]
    over = list(overrides) + ([f"rounds={args.rounds}"] if args.rounds else []) + ["eval.at_start=false", *args.set]
    cfg = load_config(PRESET, over)
    hist, wall = run_on_copy(base, cfg)
    last = hist[-1]
    n = len(hist)
    _CACHE[tuple(overrides)] = {
        "acc": last.get("eval_accuracy", float("nan")), "acc_client": last.get("eval_client_accuracy_mean", float("nan")),
        "latency": sum(r["round_time_s"] for r in hist) / n, "energy": sum(r["round_energy_j"] for r in hist) / n,
        "mb_up": sum(r["bytes_up"] for r in hist) / n / 1e6, "bits": last.get("bits_mean", 32.0),
        "wall": wall,
    }
    return _CACHE[tuple(overrides)]


def tradeoff(base, lams: list[float]) -> list[tuple[float, float, float]]:
    """(lambda, T, E) of the allocation for round 1's devices, no training."""
    from hetfl.engine.loop import plan_population, sample_clients

    cfg = base.cfg
    method = build_method(cfg)
    sc = copy.deepcopy(base)
    method.setup(sc)
    plan_population(method, sc)
    return method.tradeoff(sample_clients(cfg.seed, 1, sc.num_clients, cfg.population.clients_per_round), lams)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = build_scenario(load_config(PRESET, list(args.set)))

    print("# 1. accuracy vs activation bits (every device at q bits)", flush=True)
    bits_rows = []
    for q in args.bits:
        r = run(base, ["wireless.mode=fixed-bits", f"wireless.fixed_bits={q}"], args)
        bits_rows.append((q, r))
        print(f"# bits {q}: acc {r['acc']:.1f}, wall {r['wall']:.0f}s", flush=True)
    print(f"{'bits':>5}{'acc %':>8}{'client acc %':>14}{'MB up/round':>13}{'latency s/round':>17}{'energy J/round':>16}")
    for q, r in bits_rows:
        print(f"{q:>5}{r['acc']:>8.1f}{r['acc_client']:>14.1f}{r['mb_up']:>13.2f}{r['latency']:>17.3f}{r['energy']:>16.3f}")
    plot_xy([q for q, _ in bits_rows], [r["acc"] for _, r in bits_rows], out / "accuracy_vs_bits.png",
            "activation bits", "test accuracy (%)", log2x=True)

    print("\n# 2. latency and energy per round", flush=True)
    rows = {}
    for label in args.runs:
        rows[label] = run(base, RUNS[label], args)
        print(f"# {label}: acc {rows[label]['acc']:.1f}, wall {rows[label]['wall']:.0f}s", flush=True)
    print(f"{'run':<24}{'acc %':>7}{'client acc %':>14}{'mean bits':>11}{'MB up/round':>13}{'latency s/round':>17}"
          f"{'energy J/round':>16}")
    for label, r in rows.items():
        print(f"{label:<24}{r['acc']:>7.1f}{r['acc_client']:>14.1f}{r['bits']:>11.1f}{r['mb_up']:>13.2f}"
              f"{r['latency']:>17.3f}{r['energy']:>16.3f}")

    print("\n# 3. latency-energy trade-off of the allocation (round 1's devices)", flush=True)
    curve = tradeoff(base, args.lams)
    print(f"{'lambda':>7}{'T s':>10}{'E J':>10}")
    for lam, t, e in curve:
        print(f"{lam:>7.2f}{t:>10.4f}{e:>10.4f}")
    plot_tradeoff(curve, out / "tradeoff.png")
    ts, es = np.array([t for _, t, _ in curve]), np.array([e for _, _, e in curve])
    print(f"# lambda=1 has the lowest T: {bool(ts[-1] <= ts.min() * (1 + 1e-6))}; "
          f"lambda=0 the lowest E: {bool(es[0] <= es.min() * (1 + 1e-6))}")

    opt, fixed = rows.get("sflam (optimised)"), rows.get("sflam fixed (all)")
    if opt and fixed:
        gap = opt["acc"] - fixed["acc"]
        print(f"# optimised acc {opt['acc']:.1f} vs fixed {fixed['acc']:.1f} ({gap:+.1f} points, "
              f"{'within' if abs(gap) <= 1 else 'NOT within'} 1 point)")
        print(f"sflam_energy_ratio_vs_fixed={opt['energy'] / fixed['energy']:.4f}")


if __name__ == "__main__":
    main()
