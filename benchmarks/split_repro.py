"""Split learning vs full-model FL on hetfl's split presets: FedV, FedVZ, SplitFed V1/V2,
FedAvg (full model) and Ditto on `split-vision` (tiny-vit, digits, Dirichlet 0.3) and
`split-text` (MiniLM, BBC News, Dirichlet 0.3), with per-tier cut points from the presets.

Prints one table: global accuracy and mean per-client accuracy after the last round, the
largest number of parameters a client holds, peak client training memory (estimate, MiB),
client and server GFLOPs (per run), MB per round (up + down, measured on the link) and
simulated seconds. Each preset's scenario is built once and copied per run. Last line:
`fedv_minus_fedavg=<accuracy points>` (global accuracy on split-vision).

    python benchmarks/split_repro.py                          # default: 6 methods x 2 presets, ~16 min
    python benchmarks/split_repro.py --rounds 20 --presets split-vision --set train.lr=0.002
"""

from __future__ import annotations

import argparse
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hetfl.config import load_config  # noqa: E402
from hetfl.runner import run_on_copy  # noqa: E402
from hetfl.scenario import build_scenario  # noqa: E402

PRESETS = ["split-vision", "split-text"]
METHODS = ["fedv", "fedvz", "splitfed-v1", "splitfed-v2", "fedavg-full", "ditto"]
ROUNDS = {"split-vision": 6, "split-text": 2}  # default sizes: ~8 min per preset on 2 shared cores


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=PRESETS)
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--rounds", type=int, default=0, help="rounds per run (0: per-preset default)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", nargs="*", default=[], help="extra overrides for every run, key=value")
    return p.parse_args(argv)


def client_params_held(method: str, model: torch.nn.Module, last: dict) -> int:
    """Parameters the largest client keeps: its split part, the whole model, or two (Ditto: w and v)."""
    if "client_params_max" in last:
        return int(last["client_params_max"])
    n = sum(p.numel() for p in model.parameters())
    return 2 * n if method == "ditto" else n


def run_one(base, preset: str, method: str, args) -> dict:
    rounds = args.rounds or ROUNDS.get(preset, 5)
    cfg = load_config(preset, [f"method.name={method}", f"rounds={rounds}", "eval.at_start=false", *args.set])
    hist, wall = run_on_copy(base, cfg)
    last = hist[-1]
    return {
        "preset": preset, "method": method,
        "acc": last.get("eval_accuracy", float("nan")),
        "acc_client": last.get("eval_client_accuracy_mean", float("nan")),
        "params": client_params_held(method, base.model, last),
        "mem_mb": max(r["client_mem_peak_mb"] for r in hist),
        "client_gflops": sum(r["client_flops"] for r in hist) / 1e9,
        "server_gflops": sum(r.get("server_flops", 0.0) for r in hist) / 1e9,
        "mb_round": sum(r["bytes_up"] + r["bytes_down"] for r in hist) / len(hist) / 1e6,
        "sim_s": last["sim_time_s"], "wall_s": wall,
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for preset in args.presets:
        base = build_scenario(load_config(preset, list(args.set)))
        for method in args.methods:
            rows.append(run_one(base, preset, method, args))
            r = rows[-1]
            print(f"# {preset} {method}: acc {r['acc']:.1f}, wall {r['wall_s']:.0f}s", flush=True)
    head = (f"{'preset':<13}{'method':<13}{'acc %':>7}{'client acc %':>14}{'client params':>15}{'client MiB':>12}"
            f"{'client GFLOP':>14}{'server GFLOP':>14}{'MB/round':>10}{'sim s':>9}{'wall s':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['preset']:<13}{r['method']:<13}{r['acc']:>7.1f}{r['acc_client']:>14.1f}{r['params']:>15,}"
              f"{r['mem_mb']:>12.1f}{r['client_gflops']:>14.2f}{r['server_gflops']:>14.2f}{r['mb_round']:>10.2f}"
              f"{r['sim_s']:>9.1f}{r['wall_s']:>8.0f}")
    acc = {(r["preset"], r["method"]): r["acc"] for r in rows}
    diff = acc.get(("split-vision", "fedv"), float("nan")) - acc.get(("split-vision", "fedavg-full"), float("nan"))
    print(f"fedv_minus_fedavg={diff:.2f}")


if __name__ == "__main__":
    main()
