"""FSLoRA against the heterogeneous-rank LoRA baselines, on fslora-instruct and fslora-news.

Prints three tables and, last, `fslora_minus_best_baseline=<points>` on fslora-news (FSLoRA's
final accuracy minus the best of heterolora, flexlora, flora-stack and fedit):
  1. every method on both presets (mean and std over seeds): final quality, MB up/down,
     simulated seconds, client joules, client peak memory, server FLOPs/seconds;
  2. the equal-upload-budget ablation: FSLoRA (sketching) against FSLoRA with every k_i = r
     (no sketching) given the same cumulative upload, i.e. the unsketched run gets as many rounds
     as its per-round upload allows within the sketched run's total;
  3. a sketch-ratio sweep (every client at the same k/r).

    python benchmarks/fslora_repro.py                      # the issue's sizes (about an hour here)
    python benchmarks/fslora_repro.py --rounds 4 --news-rounds 3 --seeds 0 1 2   # a shorter run
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from hetfl.config import load_config  # noqa: E402
from hetfl.runner import run_experiment  # noqa: E402
from hetfl.track.summary import summarize  # noqa: E402

METHODS = ["fslora", "heterolora", "flexlora", "flora-stack", "fedit"]


def run(preset: str, overrides: list[str]) -> dict:
    cfg = load_config(preset, overrides)
    t0 = time.perf_counter()
    hist = run_experiment(cfg, None, report=False)
    s = summarize(hist)
    s["server_gflops"] = sum(m.get("server_flops", 0.0) for m in hist) / 1e9
    s["wall_s"] = time.perf_counter() - t0
    s["per_round_mb_up"] = hist[-1]["bytes_up_total"] / 1e6 / max(1, hist[-1]["round"])
    return s


def fmt(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.2f}" + (f" ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else "")


def method_table(preset: str, rounds: int, seeds: list[int]) -> dict[str, float]:
    print(f"\n## {preset}: {rounds} rounds, seeds {seeds}")
    print("| method | quality | MB up | MB down | sim s | J | client MiB | server GFLOP |")
    print("|---|---|---|---|---|---|---|---|")
    finals = {}
    for m in METHODS:
        rows = [run(preset, [f"method.name={m}", f"rounds={rounds}", f"seed={s}", "eval.at_start=false"])
                for s in seeds]
        q = [r["final_quality"] for r in rows]
        finals[m] = statistics.mean(q)
        r0 = rows[0]
        print(f"| {m} | {fmt(q)} | {r0['mb_up']:.2f} | {r0['mb_down']:.2f} | {fmt([r['sim_time_s'] for r in rows])} | "
              f"{fmt([r['energy_j'] for r in rows])} | {r0['client_mem_peak_mb']:.1f} | {r0['server_gflops']:.2f} |",
              flush=True)
    return finals


def equal_upload(preset: str, rounds: int) -> None:
    sk = run(preset, [f"rounds={rounds}", "eval.at_start=false"])
    probe = run(preset, ["rounds=1", "method.ratios=[1.0]", "eval.at_start=false"])
    r_full = max(1, int(sk["mb_up"] // probe["per_round_mb_up"]))
    full = run(preset, [f"rounds={r_full}", "method.ratios=[1.0]", "eval.at_start=false"])
    print(f"\n## equal upload budget on {preset} ({sk['mb_up']:.2f} MB up)")
    print("| variant | rounds | MB up | quality |\n|---|---|---|---|")
    print(f"| sketching (k_i/r in 1/8, 1/4, 1/2) | {rounds} | {sk['mb_up']:.2f} | {sk['final_quality']:.2f} |")
    print(f"| no sketching (k_i = r) | {r_full} | {full['mb_up']:.2f} | {full['final_quality']:.2f} |", flush=True)


def ratio_sweep(preset: str, rounds: int) -> None:
    print(f"\n## sketch-ratio sweep on {preset} ({rounds} rounds, every client at the same k/r)")
    print("| k/r | MB up | quality |\n|---|---|---|")
    for ratio in (0.125, 0.25, 0.5, 1.0):
        r = run(preset, [f"rounds={rounds}", f"method.ratios=[{ratio}]", "eval.at_start=false"])
        print(f"| {ratio} | {r['mb_up']:.2f} | {r['final_quality']:.2f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=8, help="rounds on fslora-instruct")
    ap.add_argument("--news-rounds", type=int, default=5, help="rounds on fslora-news")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds on fslora-instruct")
    args = ap.parse_args()
    method_table("fslora-instruct", args.rounds, args.seeds)
    news = method_table("fslora-news", args.news_rounds, [0])
    equal_upload("fslora-news", args.news_rounds)
    ratio_sweep("fslora-news", args.news_rounds)
    best = max(v for k, v in news.items() if k != "fslora")
    print(f"fslora_minus_best_baseline={news['fslora'] - best:.2f}")


if __name__ == "__main__":
    main()
