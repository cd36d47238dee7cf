"""End-of-run summaries: one run's headline numbers, and the `hetfl compare` table."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.table import Table

from hetfl.track.report import primary_metric
from hetfl.track.rundir import read_metrics
from hetfl.track.walltime import AGGREGATE_WALL, COMPUTE_WALL, EVALUATE_WALL, ROUND_WALL


def summarize(history: Sequence[dict[str, Any]]) -> dict[str, Any]:
    metric = primary_metric(history)
    evals = [m for m in history if metric and metric in m]
    last = history[-1] if history else {}
    trained = [m for m in history if m.get("round", 0) > 0]
    return {
        "final_quality_metric": metric or "",
        "final_quality": round(evals[-1][metric], 4) if evals else "",
        "base_quality": round(evals[0][metric], 4) if evals and evals[0]["round"] == 0 else "",
        "mb_up": round(last.get("bytes_up_total", 0) / 1e6, 4),
        "mb_down": round(last.get("bytes_down_total", 0) / 1e6, 4),
        "sim_time_s": round(last.get("sim_time_s", 0.0), 3),
        "energy_j": round(last.get("energy_j", 0.0), 3),
        # a round lasts as long as its slowest client; its energy is summed over its clients
        "latency_s_per_round": round(sum(m.get("round_time_s", 0.0) for m in trained) / max(1, len(trained)), 4),
        "energy_j_per_round": round(sum(m.get("round_energy_j", 0.0) for m in trained) / max(1, len(trained)), 4),
        "client_mem_peak_mb": round(max((m.get("client_mem_peak_mb", 0) for m in history), default=0), 2),
        "client_gflops": round(last.get("flops_total", 0.0) / 1e9, 2),
        "rounds": last.get("round", 0),
    }


def wall_split(history: Sequence[dict[str, Any]]) -> dict[str, float] | None:
    """Mean wall seconds per trained round, whole and by part, over the rounds that measured them.

    Args:
        history: metrics.jsonl's rows.

    Returns:
        `rounds` (how many were averaged), `round_s`, `compute_s`, `aggregate_s`, `evaluate_s` and
        `other_s` (the rest: sampling, configure, logging); None when no round has the timings
        (round 0 only, or a run written before they were measured).
    """
    rows = [m for m in history if m.get("round", 0) > 0 and ROUND_WALL in m]
    if not rows:
        return None
    mean = {k: sum(m.get(key, 0.0) for m in rows) / len(rows)
            for k, key in (("round_s", ROUND_WALL), ("compute_s", COMPUTE_WALL), ("aggregate_s", AGGREGATE_WALL),
                           ("evaluate_s", EVALUATE_WALL))}
    other = max(0.0, mean["round_s"] - mean["compute_s"] - mean["aggregate_s"] - mean["evaluate_s"])
    return {"rounds": len(rows), **mean, "other_s": other}


def format_wall_split(split: dict[str, float]) -> str:
    """One line: the mean round's wall time and its parts, each with its share of the round."""
    total = split["round_s"]

    def part(name: str, key: str) -> str:
        share = split[key] / total if total > 0 else 0.0
        return f"{name} {_fmt(split[key])} s ({share:.0%})"

    n = int(split["rounds"])
    return (f"wall time per round (mean of {n} round{'s' if n != 1 else ''}): {_fmt(total)} s = "
            f"{part('compute', 'compute_s')} + {part('aggregation', 'aggregate_s')} + "
            f"{part('evaluation', 'evaluate_s')} + {part('other', 'other_s')}")


def print_run_summary(cfg, history, out: Path) -> None:
    s = summarize(history)
    con = Console()
    q = s["final_quality_metric"].removeprefix("eval_")
    con.print(f"[bold]{cfg.name}[/] ({cfg.method.name}): {q} {s['base_quality']} -> {s['final_quality']}, "
              f"up {s['mb_up']} MB, down {s['mb_down']} MB, simulated {s['sim_time_s']} s, {s['energy_j']} J, "
              f"client peak memory {s['client_mem_peak_mb']} MB")
    split = wall_split(history)
    if split is not None:
        con.print(format_wall_split(split), highlight=False, soft_wrap=True)  # one line, in logs too
    con.print(f"outputs in {out}/ (report.md, metrics.jsonl, clients.csv)")


def run_row(d: Path) -> dict[str, Any]:
    """One finished run's summary plus every numeric metric of its last evaluation."""
    import yaml

    cfg = yaml.safe_load((d / "config.yaml").read_text())
    history = read_metrics(d / "metrics.jsonl")
    row = {"run": d.name, "method": cfg["method"]["name"], "seed": cfg["seed"], **summarize(history)}
    last_eval = next((m for m in reversed(history) if any(k.startswith("eval_") for k in m)), {})
    for k, v in last_eval.items():
        if k.startswith("eval_") and _is_number(v):
            row[k] = v
    return row


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


NOT_METRICS = ("seed", "rounds")


def aggregate(groups: dict[str, list[dict[str, Any]]], baseline: str | None = None) -> list[dict[str, Any]]:
    """One row per compared label from its runs (one per seed): `seeds`, and for every numeric
    final metric `<metric>_mean` and `<metric>_ci95` (half-width of the 95% t-interval; 0 for one
    seed). With `baseline` (a label), `vs_<baseline>` is the paired test's verdict on the primary
    metric over the seeds both share, with the mean difference and its interval."""
    from hetfl.track.stats import higher_is_better, mean_ci, paired_test

    out = []
    for label, runs in groups.items():
        metric = runs[0]["final_quality_metric"]
        row: dict[str, Any] = {"run": label, "method": runs[0]["method"], "seeds": len(runs),
                               "seed_list": " ".join(str(r["seed"]) for r in runs), "final_quality_metric": metric}
        if baseline is not None:
            base = {r["seed"]: r for r in groups[baseline]}
            pairs = [(r["final_quality"], base[r["seed"]]["final_quality"]) for r in runs
                     if r["seed"] in base and _is_number(r["final_quality"])
                     and _is_number(base[r["seed"]]["final_quality"])]
            if label == baseline or not pairs:
                row[f"vs_{baseline}"], row["diff"], row["diff_ci95"] = "-", "", ""
            else:
                t = paired_test([a for a, _ in pairs], [b for _, b in pairs], higher_is_better(metric or "eval_"))
                row[f"vs_{baseline}"], row["diff"], row["diff_ci95"] = t.verdict, round(t.diff_mean, 4), round(
                    t.diff_ci95, 4)
        keys = [k for k in runs[0] if k not in NOT_METRICS and _is_number(runs[0][k])]
        keys += sorted({k for r in runs for k in r if k not in keys and k not in NOT_METRICS and _is_number(r[k])})
        for k in keys:
            vals = [r[k] for r in runs if _is_number(r.get(k))]
            if len(vals) < len(runs):
                continue  # a metric some seeds lack is not comparable
            m, h = mean_ci(vals)
            row[f"{k}_mean"], row[f"{k}_ci95"] = round(m, 6), round(h, 6)
        row["rounds"] = runs[0].get("rounds", "")
        out.append(row)
    return out


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rows with possibly different keys: the header is their union in first-seen order."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, restval="")
        w.writeheader()
        w.writerows(rows)


def write_compare(root: Path, summary: list[dict[str, Any]], runs: list[dict[str, Any]],
                  histories: dict[str, list[list[dict]]]) -> None:
    """summary.csv (one row per label), runs.csv (one row per run) and compare.png (seed bands)."""
    from hetfl.track.report import plot_groups

    root.mkdir(parents=True, exist_ok=True)
    write_csv(root / "summary.csv", summary)
    write_csv(root / "runs.csv", runs)
    plot_groups(list(histories.items()), root / "compare.png")


def _fmt(v: Any) -> str:
    if not _is_number(v):
        return str(v)
    a = abs(v)
    return f"{v:.0f}" if a >= 1000 else f"{v:.1f}" if a >= 10 else f"{v:.3g}" if a >= 0.001 or a == 0 else f"{v:.1e}"


def print_compare(rows: list[dict[str, Any]], root: Path, baseline: str | None = None, width: int = 100) -> None:
    """The comparison as one table that fits `width` columns: mean ± 95% interval over seeds."""
    metric = rows[0]["final_quality_metric"] if rows else ""
    q = metric.removeprefix("eval_") or "quality"
    t = Table(title=f"hetfl compare ({root})", title_justify="left")
    t.add_column("method", no_wrap=True)
    t.add_column("n", justify="right")
    t.add_column(f"{q} (base)", justify="right", no_wrap=True)
    if baseline is not None:
        t.add_column(f"vs {baseline}", no_wrap=True)
    for h in ("MB up", "sim s", "J", "MiB"):
        t.add_column(h, justify="right")
    for r in rows:
        def pm(k: str) -> str:
            m, h = r.get(f"{k}_mean", ""), r.get(f"{k}_ci95", 0)
            return _fmt(m) if not h else f"{_fmt(m)}±{_fmt(h)}"

        cells = [r["run"], str(r["seeds"]), f"{pm('final_quality')} ({_fmt(r.get('base_quality_mean', ''))})"]
        if baseline is not None:
            v = r.get(f"vs_{baseline}", "")
            cells.append(v if v in ("-", "") else f"{v} {_fmt(r['diff'])}±{_fmt(r['diff_ci95'])}")
        cells += [pm("mb_up"), pm("sim_time_s"), pm("energy_j"), pm("client_mem_peak_mb")]
        t.add_row(*cells)
    con = Console(width=width)
    con.print(t)
    if rows:
        con.print(f"{q}: mean ± half-width of the 95% t-interval over seeds; verdicts from a paired t-test "
                  f"across seeds. Tables: {root}/summary.csv, {root}/runs.csv; plot: {root}/compare.png",
                  highlight=False)


def same_scenario_warnings(cfgs) -> list[str]:
    """Differences between configs in what defines the scenario (compare assumes one scenario).

    The method, its training hyper-parameters and its adapter are what is compared; the model,
    data, population, links, rounds, evaluation and seed must match.
    """
    out = []
    base = cfgs[0]
    for c in cfgs[1:]:
        for f in ("seed", "rounds", "model", "data", "population", "comm", "eval"):
            if getattr(base, f) != getattr(c, f):
                out.append(f"{c.name}: '{f}' differs from {base.name}'s; the comparison is not like for like")
    return out
