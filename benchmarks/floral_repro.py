"""FLoRAL against its baselines on the floral-* presets (the spec's main table, at our scale).

Methods: FedAvg (full model), Local Adaptor, Ensemble and FLoRAL at rho = 1% and 10%, the last
two with a learned router and with the oracle router pi* (one-hot at the true cluster). Each
(preset, seed) scenario is built once and deep-copied per method. Prints one table: mean
per-client accuracy (%) or MSE on the clients' own test splits after the last round (mean ± std
over seeds), the spread across clients (std, averaged over seeds), parameter overhead over the
base model (%), and MB per round (up + down, measured on the link). Last line:
`floral_minus_fedavg_labelshift=<points>`: FLoRAL(1%, learned) minus FedAvg on
floral-digits-labelshift (mean per-client accuracy).

    python benchmarks/floral_repro.py                                   # every preset, preset rounds
    python benchmarks/floral_repro.py --rounds 20 --seeds 0 --presets floral-digits-labelshift
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hetfl.config import load_config  # noqa: E402
from hetfl.runner import run_on_copy  # noqa: E402
from hetfl.scenario import build_scenario  # noqa: E402

PRESETS = ["floral-digits-rotate", "floral-digits-labelshift", "floral-news-labelshift", "floral-synth-linear",
           "floral-synth-mlp", "floral-digits-rotate-5pct", "floral-digits-labelshift-5pct"]
LARGE = {"floral-news-labelshift"}  # run with the first seed only
VARIANTS = {  # label -> overrides
    "fedavg-full": ["method.name=fedavg-full"],
    "local-adaptor": ["method.name=local-adaptor"],
    "ensemble": ["method.name=ensemble"],
    "ensemble pi*": ["method.name=ensemble", "method.router=oracle"],
    "floral 1%": ["method.name=floral", "method.rho=0.01"],
    "floral 1% pi*": ["method.name=floral", "method.rho=0.01", "method.router=oracle"],
    "floral 10%": ["method.name=floral", "method.rho=0.1"],
    "floral 10% pi*": ["method.name=floral", "method.rho=0.1", "method.router=oracle"],
}


def fmt(xs: list[float]) -> str:
    """Mean ± std over seeds, 4 significant digits (MSEs are small, accuracies are not)."""
    return f"{statistics.mean(xs):.4g}" + (f" ± {statistics.stdev(xs):.2g}" if len(xs) > 1 else "")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=PRESETS)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="VARIANT")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=0, help="rounds per run (0: the preset's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", nargs="*", default=[], help="extra overrides for every run, key=value")
    return p.parse_args(argv)


def run_one(base, preset: str, seed: int, variant: str, args) -> dict:
    extra = [f"seed={seed}", "eval.at_start=false", *([f"rounds={args.rounds}"] if args.rounds else []), *args.set]
    cfg = load_config(preset, [*VARIANTS[variant], *extra])
    torch.manual_seed(cfg.seed)
    hist, wall = run_on_copy(base, cfg)
    last = hist[-1]
    metric = "mse" if "eval_client_mse_mean" in last else "accuracy"
    return {"metric": metric, "q": last[f"eval_client_{metric}_mean"], "spread": last[f"eval_client_{metric}_std"],
            "overhead": last.get("param_overhead_pct", 0.0),
            "mb_round": sum(r["bytes_up"] + r["bytes_down"] for r in hist) / len(hist) / 1e6, "wall_s": wall}


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    results: dict[tuple[str, str], list[dict]] = {}
    for preset in args.presets:
        for seed in (args.seeds[:1] if preset in LARGE else args.seeds):
            base = build_scenario(load_config(preset, [f"seed={seed}", *args.set]))
            for variant in args.variants:
                r = run_one(base, preset, seed, variant, args)
                results.setdefault((preset, variant), []).append(r)
                print(f"# {preset} seed {seed} {variant}: {r['metric']} {r['q']:.4g}, wall {r['wall_s']:.0f}s", flush=True)
    head = "| preset | method | per-client quality | across clients (std) | overhead % | MB/round | seeds |"
    print(head + "\n|---|---|---|---|---|---|---|")
    for (preset, variant), rows in results.items():
        q = [r["q"] for r in rows]
        unit = "MSE" if rows[0]["metric"] == "mse" else "acc %"
        print(f"| {preset} | {variant} | {unit} {fmt(q)} | {statistics.mean(r['spread'] for r in rows):.3g} | "
              f"{rows[0]['overhead']:.1f} | {rows[0]['mb_round']:.3g} | {len(rows)} |")
    q = {k: statistics.mean(r["q"] for r in v) for k, v in results.items()}
    ls = "floral-digits-labelshift"
    diff = q.get((ls, "floral 1%"), float("nan")) - q.get((ls, "fedavg-full"), float("nan"))
    print(f"floral_minus_fedavg_labelshift={diff:.2f}")


if __name__ == "__main__":
    main()
