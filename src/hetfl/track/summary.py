"""End-of-run summaries: one run's headline numbers, and the `hetfl compare` table."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.table import Table

from hetfl.track.report import plot_runs, primary_metric
from hetfl.track.rundir import read_metrics

SUMMARY_COLUMNS = ["run", "method", "final_quality_metric", "final_quality", "base_quality", "mb_up", "mb_down",
                   "sim_time_s", "energy_j", "latency_s_per_round", "energy_j_per_round", "client_mem_peak_mb",
                   "client_gflops", "rounds"]


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


def print_run_summary(cfg, history, out: Path) -> None:
    s = summarize(history)
    con = Console()
    q = s["final_quality_metric"].removeprefix("eval_")
    con.print(f"[bold]{cfg.name}[/] ({cfg.method.name}): {q} {s['base_quality']} -> {s['final_quality']}, "
              f"up {s['mb_up']} MB, down {s['mb_down']} MB, simulated {s['sim_time_s']} s, {s['energy_j']} J, "
              f"client peak memory {s['client_mem_peak_mb']} MB")
    con.print(f"outputs in {out}/ (report.md, metrics.jsonl, clients.csv)")


def compare_rows(dirs: Sequence[Path]) -> list[dict[str, Any]]:
    import yaml

    rows = []
    for d in dirs:
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        rows.append({"run": d.name, "method": cfg["method"]["name"], **summarize(read_metrics(d / "metrics.jsonl"))})
    return rows


def write_compare(root: Path, rows: list[dict[str, Any]], dirs: Sequence[Path]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    plot_runs([(d.name, read_metrics(d / "metrics.jsonl")) for d in dirs], root / "compare.png", "methods compared")


def print_compare(rows: list[dict[str, Any]], root: Path) -> None:
    t = Table(title=f"hetfl compare ({root})")
    heads = ["run", "method", "final_quality", "base_quality", "mb_up", "mb_down", "latency_s_per_round",
             "energy_j_per_round", "sim_time_s", "energy_j", "client_mem_peak_mb", "client_gflops"]
    for h in heads:
        t.add_column(h.replace("_", " "), justify="right" if h not in ("run", "method") else "left")
    for r in rows:
        t.add_row(*(str(r[h]) for h in heads))
    con = Console(width=160)
    con.print(t)
    if rows:
        con.print(f"quality metric: {rows[0]['final_quality_metric']}; table in {root}/summary.csv, plot in {root}/compare.png")


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
