"""Real fleets: FedIT and FSLoRA on `fslora-instruct` under dropout, deadlines, byzantine clients
and stragglers, synchronous against buffered asynchronous (FedBuff) aggregation.

Rows, for each method (`method.name` on the preset; every row of a method and seed sees the same
partition, device tiers and client sampling):

- clean: no faults (dropout 0%);
- dropout-10, dropout-30: `faults.dropout` 0.1 / 0.3 (a client drops at a U(0, 1) share of its work);
- deadline: `population.deadline_s` = the median client round time (clients.csv `sim_time_s`, all
  rounds) of the clean run of the same method and seed, so about half the sampled clients are late;
- deadline+over-select: the same deadline with `population.over_select` 1.3 (7 sampled, the first
  5 valid reports aggregated);
- byzantine-{mean, median, trimmed-mean, norm-clip}: `faults.byzantine` 0.1 (2 of 20 clients, fixed
  per seed) sending sign-flipped updates times `--byz-scale` (default 4), against each
  `server.aggregator` (trimmed-mean: `server.trim_beta` 0.2, one value cut at each end of 5;
  norm-clip: `server.clip_norm` = the median L2 norm of the honest round-1 updates of the method on
  the first seed, measured by a probe before the runs);
- sync-stragglers, async-stragglers: `faults.straggler` 0.3 with `straggler_mu` 1.5 (a straggler's
  time x LogNormal(1.5, 0.5), median 4.5x); async is `server.mode: async` with concurrency
  2 x clients_per_round and buffer clients_per_round, run for `--async-factor` x rounds server
  steps, both evaluated every round/step.

Quality is the preset's primary metric (`hetfl.track.report.primary_metric`: eval_rougeL here;
`--metric` to choose another), mean ± 95% t half-width over seeds; eval_ppl is printed beside it.
Simulated time is the final `sim_clock_s` (`sim_time_s` for runs without fleet features), energy
the final `energy_j` (wasted work included), waste the sums over rounds of `wasted_bytes` (MB) and
`wasted_energy_j`, and dropped/late/rejected/aggregated the client counts summed over rounds.

`median_minus_mean_byzantine`: the final quality of byzantine-median minus byzantine-mean on the
same seed, averaged over methods and seeds (with its 95% interval). `async_over_sync_time`: per
method and seed, async's simulated clock at the first evaluation (step >= 1) whose quality reaches
sync-stragglers' final quality, divided by sync-stragglers' final clock (< 1: async is faster);
where async never reaches it the ratio of the final clocks is used and the count is printed
("not reached"); averaged over methods and seeds. The qualities of both at equal simulated time
(sync's final clock, or async's last clock when it stops earlier) are printed too.

Writes OUT/<method>/<row>/seed-<s>/ (full run folders), OUT/runs.csv, OUT/summary.csv and
OUT/faults.png (quality and perplexity against simulated time, seed means, one column per method).

    python benchmarks/faults.py --quick                     # smoke run: 2 rounds, 1 seed
    python benchmarks/faults.py --jobs 2                    # default: 4 rounds, 3 seeds (36 min on 2 shared cores)
    python benchmarks/faults.py --rounds 8 --seeds 3 --resume --out runs/faults8
Last line: `median_minus_mean_byzantine=<points> async_over_sync_time=<ratio>`.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from hetfl.config import load_config  # noqa: E402
from hetfl.errors import ConfigError  # noqa: E402
from hetfl.sweep import parse_seeds, run_batch  # noqa: E402
from hetfl.track.report import primary_metric  # noqa: E402
from hetfl.track.rundir import read_metrics  # noqa: E402
from hetfl.track.stats import higher_is_better, mean_ci  # noqa: E402

PRESET = "fslora-instruct"
METHODS = ("fedit", "fslora")
ROWS = ("clean", "dropout-10", "dropout-30", "deadline", "deadline+over-select", "byzantine-mean",
        "byzantine-median", "byzantine-trimmed-mean", "byzantine-norm-clip", "sync-stragglers", "async-stragglers")
DEADLINE_ROWS = ("deadline", "deadline+over-select")
STRAGGLERS = ["faults.straggler=0.3", "faults.straggler_mu=1.5"]


def clock(m: dict) -> float:
    """The simulated clock after a round (runs without fleet features log only `sim_time_s`)."""
    return float(m.get("sim_clock_s", m.get("sim_time_s", 0.0)))


def row_overrides(row: str, args, k: int, deadline: float | None, clip: float | None) -> list[str]:
    """The row's overrides on top of method, seed, rounds and eval.every."""
    byz = ["faults.byzantine=0.1", "faults.byzantine_mode=sign-flip", f"faults.byzantine_scale={args.byz_scale}"]
    return {
        "clean": [],
        "dropout-10": ["faults.dropout=0.1"],
        "dropout-30": ["faults.dropout=0.3"],
        "deadline": [f"population.deadline_s={deadline}"],
        "deadline+over-select": [f"population.deadline_s={deadline}", "population.over_select=1.3"],
        "byzantine-mean": [*byz, "server.aggregator=mean"],
        "byzantine-median": [*byz, "server.aggregator=median"],
        "byzantine-trimmed-mean": [*byz, "server.aggregator=trimmed-mean", "server.trim_beta=0.2"],
        "byzantine-norm-clip": [*byz, "server.aggregator=norm-clip", f"server.clip_norm={clip}"],
        "sync-stragglers": [*STRAGGLERS, "eval.every=1"],
        "async-stragglers": [*STRAGGLERS, "eval.every=1", "server.mode=async", f"server.concurrency={2 * k}",
                             f"server.buffer={k}", f"rounds={args.rounds * args.async_factor}"],
    }[row]


def probe_clip_norm(method: str, seed: int, rounds: int) -> float:
    """Median L2 norm of the honest round-1 updates (one round of the clean config, in memory)."""
    import torch

    from hetfl.engine.link import Ledger, Link
    from hetfl.engine.loop import plan_population, sample_clients
    from hetfl.engine.robust import update_norm
    from hetfl.engine.sim import SimulatedBackend
    from hetfl.runner import build_run

    torch.set_num_threads(1)
    cfg = load_config(PRESET, [f"method.name={method}", f"seed={seed}", f"rounds={rounds}"])
    sc, m = build_run(cfg)
    backend = SimulatedBackend(sc, m, Link(cfg.comm.up, cfg.comm.down, Ledger(), cfg.seed))
    state = m.setup(sc)
    knobs, mem = plan_population(m, sc)
    cids = sample_clients(cfg.seed, 1, sc.num_clients, cfg.population.clients_per_round)
    replies, _ = backend.run_round(1, m.configure(state, 1, cids), knobs, mem)
    return round(statistics.median(update_norm(r) for r in replies.values()), 3)


def median_client_time(run: Path) -> float:
    with open(run / "clients.csv") as f:
        times = [float(r["sim_time_s"]) for r in csv.DictReader(f)]
    return round(statistics.median(times), 3)


def summarize_run(d: Path, metric: str) -> dict:
    h = read_metrics(d / "metrics.jsonl")
    if not h:
        raise ConfigError(f"{d}: no metrics (the run did not finish)")
    last = h[-1]
    rounds = [m for m in h if m["round"] >= 1]
    with open(d / "clients.csv") as f:  # one row per client and round (async: per settled job), with its status
        status = [r["status"] for r in csv.DictReader(f)]
    return {
        "quality": float(last[metric]), "ppl": float(last.get("eval_ppl", math.nan)), "sim_s": clock(last),
        "energy_j": float(last["energy_j"]), "mb_up": last["bytes_up_total"] / 1e6,
        "waste_mb": sum(m.get("wasted_bytes", 0) for m in rounds) / 1e6,
        "waste_j": sum(m.get("wasted_energy_j", 0.0) for m in rounds),
        **{k: status.count(s) for k, s in (("aggregated", "ok"), ("dropped", "dropped"), ("late", "late"),
                                           ("rejected", "rejected"))},
        "staleness": statistics.mean(m["staleness_mean"] for m in rounds) if "staleness_mean" in last else math.nan,
        "curve": [(clock(m), float(m[metric]), float(m.get("eval_ppl", math.nan)), m["round"])
                  for m in h if metric in m],
    }


def fmt(xs: list[float], digits: int = 2) -> str:
    m, h = mean_ci(xs)
    return f"{m:.{digits}f}" + (f" ± {h:.{digits}f}" if len(xs) > 1 else "")


def reaches(q: float, target: float, higher: bool) -> bool:
    return q >= target - 1e-9 if higher else q <= target + 1e-9


def at_clock(curve, t: float):
    """The last evaluation at or before simulated time t: (quality, ppl, clock)."""
    pts = [p for p in curve if p[0] <= t + 1e-9]
    return (pts[-1][1], pts[-1][2], pts[-1][0]) if pts else (math.nan, math.nan, math.nan)


def plot(res, metric: str, methods, seeds, out_png: Path) -> None:
    """Quality and perplexity against simulated time: the seed mean at every evaluated round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(methods), figsize=(6.5 * len(methods), 8), squeeze=False)
    styles = {"clean": ("k", "-"), "dropout-10": ("tab:blue", "--"), "dropout-30": ("tab:blue", "-"),
              "deadline": ("tab:orange", "--"), "deadline+over-select": ("tab:orange", "-"),
              "byzantine-mean": ("tab:red", "-"), "byzantine-median": ("tab:purple", "-"),
              "byzantine-trimmed-mean": ("tab:pink", "-"), "byzantine-norm-clip": ("tab:brown", "-"),
              "sync-stragglers": ("tab:green", "--"), "async-stragglers": ("tab:green", "-")}
    for j, meth in enumerate(methods):
        for row in ROWS:
            curves = [res[meth, row, s]["curve"] for s in seeds]
            n = min(len(c) for c in curves)
            xs = [statistics.mean(c[i][0] for c in curves) for i in range(n)]
            for i, ax in ((1, axes[0][j]), (2, axes[1][j])):
                ys = [statistics.mean(c[k][i] for c in curves) for k in range(n)]
                color, ls = styles[row]
                ax.plot(xs, ys, color=color, ls=ls, marker="o", ms=2.5, lw=1.2, label=row)
        axes[0][j].set_title(f"{meth} on {PRESET}" + (f" (mean of {len(seeds)} seeds)" if len(seeds) > 1 else ""))
        axes[0][j].set_ylabel(metric.removeprefix("eval_"))
        axes[1][j].set_ylabel("ppl (log)")
        axes[1][j].set_yscale("log")
        for ax in axes[:, j]:
            ax.set_xscale("symlog", linthresh=100)
            ax.set_xlabel("simulated time (s, symlog)")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, ncol=2)
    fig.suptitle("quality against simulated time, with and without faults")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--seeds", default="3", help="count or list, as `hetfl compare --seeds`")
    ap.add_argument("--rounds", type=int, default=4,
                    help="rounds of every sync run (the preset has 8; 4 keeps a default run near 40 min on 2 "
                         "shared cores)")
    ap.add_argument("--eval-every", type=int, default=2, help="eval.every of the sync rows (straggler rows: 1)")
    ap.add_argument("--async-factor", type=int, default=3, help="async server steps = this x rounds")
    ap.add_argument("--byz-scale", type=float, default=4.0, help="faults.byzantine_scale of the sign-flip clients")
    ap.add_argument("--metric", default=None, help="quality metric (default: the preset's primary metric)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 rounds, 1 seed")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default="runs/faults")
    ap.add_argument("--resume", action="store_true", help="keep finished runs, continue killed ones")
    ap.add_argument("--force", action="store_true", help="replace the runs of an existing --out")
    ap.add_argument("--no-run", action="store_true",
                    help="only summarize the finished run folders of --out (same --rounds/--seeds/...)")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.seeds = 2, "1"
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not (args.resume or args.force or args.no_run):
        raise SystemExit(f"--out {out}: already exists; use --resume to continue it or --force to replace it")
    import torch

    torch.set_num_threads(1)
    t_start = time.time()
    base = load_config(PRESET, [f"rounds={args.rounds}"])
    seeds = parse_seeds(args.seeds, base)
    k = base.population.clients_per_round

    if args.no_run:  # the values the runs were made with, from their saved configs
        import yaml

        clip = {m: float(yaml.safe_load((out / m / "byzantine-norm-clip" / f"seed-{seeds[0]}" / "config.yaml")
                                        .read_text())["server"]["clip_norm"]) for m in args.methods}
    else:
        clip = {m: probe_clip_norm(m, seeds[0], args.rounds) for m in args.methods}
    print("norm-clip tau (median honest round-1 update norm, seed %d): %s"
          % (seeds[0], ", ".join(f"{m} {c:g}" for m, c in clip.items())), flush=True)

    def cfg_of(meth, row, s, deadline=None):
        ov = [f"method.name={meth}", f"seed={s}", f"rounds={args.rounds}", f"eval.every={args.eval_every}",
              *row_overrides(row, args, k, deadline, clip[meth])]
        return load_config(PRESET, ov)

    def folder(meth, row, s) -> Path:
        return out / meth / row / f"seed-{s}"

    # phase 1: every row but the deadline ones (the clean runs first: they fix the deadlines)
    order = ["clean"] + [r for r in ROWS if r not in DEADLINE_ROWS and r != "clean"]
    phase1 = [(cfg_of(m, r, s), folder(m, r, s), f"{m} {r} seed {s}") for r in order for m in args.methods
              for s in seeds]
    if not args.no_run:
        run_batch(phase1, force=args.force, resume=args.resume, jobs=args.jobs)
    deadline = {(m, s): median_client_time(folder(m, "clean", s)) for m in args.methods for s in seeds}
    print("deadline_s (median client round time of the clean run): "
          + ", ".join(f"{m} seed {s} {d:g}" for (m, s), d in deadline.items()), flush=True)
    phase2 = [(cfg_of(m, r, s, deadline[m, s]), folder(m, r, s), f"{m} {r} seed {s}") for r in DEADLINE_ROWS
              for m in args.methods for s in seeds]
    if not args.no_run:
        run_batch(phase2, force=args.force, resume=args.resume, jobs=args.jobs)
    wall = time.time() - t_start

    metric = args.metric or primary_metric(read_metrics(folder(args.methods[0], "clean", seeds[0]) / "metrics.jsonl"))
    higher = higher_is_better(metric)
    res = {(m, r, s): summarize_run(folder(m, r, s), metric) for m in args.methods for r in ROWS for s in seeds}
    q = metric.removeprefix("eval_")

    # ---- the table
    cols = [q, "ppl", "sim s", "J", "waste MB", "waste J", "aggregated", "dropped", "late", "rejected"]
    print(f"\n## {PRESET}: {args.rounds} rounds (async: {args.rounds * args.async_factor} steps), seeds {seeds}; "
          f"mean ± 95% interval over seeds ({q}, ppl), means otherwise; counts summed over rounds")
    print("| method | row | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    rows_csv, summary_csv = [], []
    for m in args.methods:
        for r in ROWS:
            rs = [res[m, r, s] for s in seeds]
            mean = {c: statistics.mean(x[c] for x in rs) for c in ("sim_s", "energy_j", "waste_mb", "waste_j",
                                                                     "aggregated", "dropped", "late", "rejected")}
            print(f"| {m} | {r} | {fmt([x['quality'] for x in rs])} | {fmt([x['ppl'] for x in rs], 1)} | "
                  f"{mean['sim_s']:.0f} | {mean['energy_j']:.0f} | {mean['waste_mb']:.2f} | {mean['waste_j']:.0f} | "
                  f"{mean['aggregated']:.1f} | {mean['dropped']:.1f} | {mean['late']:.1f} | {mean['rejected']:.1f} |",
                  flush=True)
            qm, qh = mean_ci([x["quality"] for x in rs])
            pm, ph = mean_ci([x["ppl"] for x in rs])
            summary_csv.append({"method": m, "row": r, "seeds": len(seeds), f"{q}_mean": qm, f"{q}_ci95": qh,
                                "ppl_mean": pm, "ppl_ci95": ph, **{f"{c}_mean": v for c, v in mean.items()}})
            for s, x in zip(seeds, rs):
                rows_csv.append({"method": m, "row": r, "seed": s, **{c: v for c, v in x.items() if c != "curve"}})
    for path, rows in ((out / "runs.csv", rows_csv), (out / "summary.csv", summary_csv)):
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    async_stale = statistics.mean(res[m, "async-stragglers", s]["staleness"] for m in args.methods for s in seeds)
    print(f"async mean staleness per step {async_stale:.2f}; deadline_s "
          + ", ".join(f"{m}/{s} {d:g}" for (m, s), d in deadline.items())
          + "; norm-clip tau " + ", ".join(f"{m} {c:g}" for m, c in clip.items()))

    # ---- byzantine: median - mean, paired by seed
    d_q = [res[m, "byzantine-median", s]["quality"] - res[m, "byzantine-mean", s]["quality"]
           for m in args.methods for s in seeds]
    d_p = [res[m, "byzantine-median", s]["ppl"] - res[m, "byzantine-mean", s]["ppl"]
           for m in args.methods for s in seeds]
    bq, bh = mean_ci(d_q)
    pq, ph = mean_ci(d_p)
    print(f"\nbyzantine (10% sign-flip x{args.byz_scale:g}): median - mean {q} {bq:+.2f} ± {bh:.2f} points, "
          f"ppl {pq:+.1f} ± {ph:.1f} (paired by seed, n={len(d_q)} = methods x seeds)")

    def vs(m: str, row: str, ref: str, key: str, digits: int = 2) -> str:
        return fmt([res[m, row, s][key] - res[m, ref, s][key] for s in seeds], digits)

    for m in args.methods:
        byz = [r for r in ROWS if r.startswith("byzantine")]
        print(f"  {m}: median - mean {q} {vs(m, 'byzantine-median', 'byzantine-mean', 'quality')}, ppl "
              f"{vs(m, 'byzantine-median', 'byzantine-mean', 'ppl', 1)}; vs clean {q}: "
              + ", ".join(f"{r.removeprefix('byzantine-')} {vs(m, r, 'clean', 'quality')}" for r in byz)
              + "; vs clean ppl: " + ", ".join(f"{r.removeprefix('byzantine-')} {vs(m, r, 'clean', 'ppl', 1)}"
                                               for r in byz))

    # ---- sync vs async at equal simulated time
    print(f"\nsync vs async under stragglers (30%, x LogNormal(1.5, 0.5)): time for async to reach sync's final {q}")
    ratios, reached, ppl_ratios = [], 0, []
    for m in args.methods:
        for s in seeds:
            sy, asy = res[m, "sync-stragglers", s], res[m, "async-stragglers", s]
            target, t_sync = sy["quality"], sy["sim_s"]
            trained = [p for p in asy["curve"] if p[3] >= 1]
            hit = next((p for p in trained if reaches(p[1], target, higher)), None)
            ratio = (hit[0] if hit else asy["sim_s"]) / t_sync
            ratios.append(ratio)
            reached += hit is not None
            phit = next((p for p in trained if p[2] <= sy["ppl"] + 1e-9), None)
            ppl_ratios.append((phit[0] if phit else asy["sim_s"]) / t_sync)
            t_eq = min(t_sync, asy["sim_s"])
            qs, ps, _ = at_clock(sy["curve"], t_eq)
            qa, pa, _ = at_clock(asy["curve"], t_eq)
            where = "sync's final clock" if t_eq == t_sync else "async's last clock (it stops before sync's end)"
            print(f"  {m} seed {s}: sync final {q} {target:.2f} (ppl {sy['ppl']:.1f}) at {t_sync:.0f} s; async "
                  + (f"reaches it at step {hit[3]}, {hit[0]:.0f} s (ratio {ratio:.3f})" if hit else
                     f"not reached in {len(trained)} steps, {asy['sim_s']:.0f} s (clock ratio {ratio:.3f})")
                  + f"; at {t_eq:.0f} s ({where}): sync {q} {qs:.2f} ppl {ps:.1f}, async {q} {qa:.2f} ppl {pa:.1f}")
    rm, rh = mean_ci(ratios)
    pm_, ph_ = mean_ci(ppl_ratios)
    note = "" if reached == len(ratios) else f" (not reached in {len(ratios) - reached} of {len(ratios)}: " \
                                              "those pairs use the ratio of final clocks, a lower bound)"
    print(f"  async/sync time to sync's final {q}: {rm:.3f} ± {rh:.3f}{note}; to sync's final ppl: "
          f"{pm_:.3f} ± {ph_:.3f}")
    sanity = max(abs(res[m, "sync-stragglers", s]["quality"] - res[m, "clean", s]["quality"])
                 for m in args.methods for s in seeds)
    print(f"  check: sync-stragglers trains exactly as clean (largest {q} difference {sanity:.3g})")

    plot(res, metric, args.methods, seeds, out / "faults.png")
    print(f"\nwrote {out / 'faults.png'}, {out / 'summary.csv'}, {out / 'runs.csv'}; "
          + ("(summarized existing runs)" if args.no_run else f"runs took {wall:.0f} s"))
    print(f"median_minus_mean_byzantine={bq:.2f} async_over_sync_time={rm:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
