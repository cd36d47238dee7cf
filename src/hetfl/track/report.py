"""report.md with plots: quality against round, cumulative bytes, simulated time and energy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from hetfl.track.rundir import read_metrics

AXES = [  # (x key, x label, scale)
    ("round", "round", 1.0),
    ("mb_total", "cumulative MB (up + down)", 1.0),
    ("sim_time_s", "simulated time (s)", 1.0),
    ("energy_j", "client energy (J)", 1.0),
]


def primary_metric(history: Sequence[dict[str, Any]]) -> str | None:
    """The quality metric to plot: Rouge-L or accuracy if present, else the first eval_* key."""
    keys = [k for m in history for k in m if k.startswith("eval_")]
    for k in ("eval_rougeL", "eval_accuracy", "eval_client_accuracy_mean", "eval_mse"):
        if k in keys:
            return k
    return keys[0] if keys else None


def _points(history, metric, xkey):
    xs, ys = [], []
    for m in history:
        if metric in m:
            x = (m.get("bytes_up_total", 0) + m.get("bytes_down_total", 0)) / 1e6 if xkey == "mb_total" else m.get(xkey, 0)
            xs.append(x)
            ys.append(m[metric])
    return xs, ys


def plot_runs(runs: Sequence[tuple[str, Sequence[dict]]], out_png: Path, title: str = "") -> str | None:
    """Draw one 2x2 figure of quality vs round/bytes/time/energy for one or more runs."""
    return plot_groups([(label, [h]) for label, h in runs], out_png, title)


def plot_groups(groups: Sequence[tuple[str, Sequence[Sequence[dict]]]], out_png: Path, title: str = "") -> str | None:
    """Like `plot_runs`, one curve per method over several seeds: the mean across seeds, with a
    band of the 95% t-interval of the mean at every evaluated round (no band for one seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hetfl.track.stats import mean_ci

    metric = next((primary_metric(h) for _, hs in groups for h in hs if primary_metric(h)), None)
    if metric is None:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (xkey, xlabel, _) in zip(axes.flat, AXES):
        for label, hs in groups:
            series = [_points(h, metric, xkey) for h in hs]
            n = min(len(xs) for xs, _ in series)  # rounds every seed has evaluated
            if n == 0:
                continue
            xs = [mean_ci([s[0][i] for s in series])[0] for i in range(n)]
            stats = [mean_ci([s[1][i] for s in series]) for i in range(n)]
            ys = [m for m, _ in stats]
            line, = ax.plot(xs, ys, marker="o", ms=3, label=f"{label} (n={len(hs)})" if len(hs) > 1 else label)
            if len(hs) > 1:
                ax.fill_between(xs, [m - h for m, h in stats], [m + h for m, h in stats], color=line.get_color(),
                                alpha=0.2, linewidth=0)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric.removeprefix("eval_"))
        if xkey == "mb_total":
            ax.set_xscale("symlog", linthresh=0.1)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    several = any(len(hs) > 1 for _, hs in groups)
    fig.suptitle(title or f"{metric.removeprefix('eval_')} against cost" + (" (mean over seeds, 95% interval)"
                                                                          if several else ""))
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return metric


def _table(history: Sequence[dict]) -> str:
    # Scalar eval_* metrics only: per-family dicts (eval_rougeL_by_family) do not fit a table cell.
    cols = ["round", "train_loss"] + sorted({k for m in history for k, v in m.items()
                                             if k.startswith("eval_") and not isinstance(v, dict)}) + [
        "bytes_up_total", "bytes_down_total", "sim_time_s", "energy_j", "client_mem_peak_mb"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for m in history:
        cells = []
        for c in cols:
            v = m.get(c, "")
            if c.startswith("bytes"):
                v = f"{v / 1e6:.3f} MB" if v != "" else ""
            elif isinstance(v, float):
                v = f"{v:.4g}"
            cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_xy(xs: Sequence[float], ys: Sequence[float], out_png: Path, xlabel: str, ylabel: str, title: str = "",
            labels: Sequence[str] = (), log2x: bool = False) -> None:
    """One line of points, optionally labelled (e.g. lambda on a trade-off curve)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(xs, ys, "o-")
    for x, y, t in zip(xs, ys, labels):
        ax.annotate(t, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if log2x:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def plot_tradeoff(curve: Sequence[tuple[float, float, float]], out_png: Path) -> None:
    """Round latency against device energy, one point per (lambda, T, E), labelled by lambda."""
    plot_xy([t for _, t, _ in curve], [e for _, _, e in curve], out_png, "round latency T (s)",
            "device energy, sum over devices (J)", "lambda sweep: lambda*T + (1-lambda)*E",
            [f"{lam:g}" for lam, _, _ in curve])


def write_report(run_dir: str | Path) -> Path:
    """Write run_dir/report.md and run_dir/quality.png from its metrics.jsonl; return the report path."""
    d = Path(run_dir)
    history = read_metrics(d / "metrics.jsonl")
    cfg_text = (d / "config.yaml").read_text() if (d / "config.yaml").exists() else ""
    import yaml

    cfg = yaml.safe_load(cfg_text) if cfg_text else {}
    title = f"{cfg.get('name', d.name)} [{cfg.get('method', {}).get('name', '?')}]" if cfg else d.name
    metric = plot_runs([(title, history)], d / "quality.png", title=title)
    last = history[-1] if history else {}
    kinds = last.get("bytes_by_kind", {})
    parts = [f"# Run report: {title}", "", f"Run folder: `{d}`.", ""]
    if metric:
        parts += [f"Final {metric}: **{last.get(metric, float('nan')):.3f}** after round {last.get('round')}.", "",
                  "![quality against cost](quality.png)", ""]
    parts += ["## Per round", "", _table(history), ""]
    fams = next((m["eval_rougeL_by_family"] for m in reversed(history) if "eval_rougeL_by_family" in m), None)
    if fams:  # instruction tasks: the last evaluation's score per held-out task family
        counts = next(m.get("eval_n_by_family", {}) for m in reversed(history) if "eval_rougeL_by_family" in m)
        parts += ["## Rouge-L per task family (last evaluation)", "", "| family | rougeL | items |", "|---|---|---|",
                  *(f"| {f} | {v:.2f} | {counts.get(f, '')} |" for f, v in fams.items()), ""]
    if kinds:
        parts += ["## Bytes by message kind (last round)", "", "```", json.dumps(kinds, indent=1), "```", ""]
    if (d / "tradeoff.csv").exists():  # methods that allocate radio resources (sflam)
        curve = [tuple(map(float, line.split(","))) for line in (d / "tradeoff.csv").read_text().splitlines()[1:]]
        plot_tradeoff(curve, d / "tradeoff.png")
        parts += ["## Latency-energy trade-off", "",
                  "The allocation for the last round's devices at each latency weight lambda (`tradeoff.csv`).", "",
                  "![latency against energy](tradeoff.png)", ""]
    parts += ["Per-client costs per round: `clients.csv`.", "", "## Config", "", "```yaml", cfg_text.rstrip(), "```", ""]
    path = d / "report.md"
    path.write_text("\n".join(parts))
    return path
