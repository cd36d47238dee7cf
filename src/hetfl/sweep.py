"""Batches of runs: one scenario's methods over several seeds (`hetfl compare`), and a grid of
settings chosen on a validation split (`hetfl tune`).

Run folders: `OUT/<label>/seed-<s>/` for a comparison, `OUT/<point>/seed-<s>/` for a tuning
grid. Every batch is resumable: with `resume`, finished runs are kept and killed ones continue.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import hetfl.builtins  # noqa: F401  (registers the shipped methods, codecs and datasets)
from hetfl.config import Config, load_config, read_tuned, tuned_overrides
from hetfl.errors import ConfigError


def parse_seeds(text: str | None, cfg: Config) -> list[int]:
    """`--seeds N` (N seeds from the config's `seed` upwards) or `--seeds 0,1,2`; absent: the
    config's `seeds` list, else its one `seed`."""
    if text is None:
        return list(cfg.seeds) or [cfg.seed]
    try:
        if "," in text:
            seeds = [int(s) for s in text.split(",") if s.strip()]
        else:
            n = int(text)
            if n < 1:
                raise ConfigError(f"--seeds {text}: need at least 1 seed")
            seeds = [cfg.seed + i for i in range(n)]
    except ValueError:
        raise ConfigError(f"--seeds {text}: expected a count (3) or a list of seeds (0,1,2)") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text}: seeds must be distinct integers >= 0")
    return seeds


def parse_grid(items: list[str], flag: str = "--grid") -> list[tuple[str, list[Any]]]:
    """`--grid train.lr=[1e-4,1e-3]` (repeatable) -> [(key, values)]."""
    out = []
    for text in items:
        key, sep, val = text.partition("=")
        try:
            values = yaml.safe_load(val) if sep else None
        except yaml.YAMLError:
            values = None
        if not key.strip() or not isinstance(values, list) or not values:
            raise ConfigError(f"{flag} {text}: expected key.path=[v1, v2, ...]")
        out.append((key.strip(), values))
    return out


def point_overrides(point: dict[str, Any]) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in point.items()]


def point_label(point: dict[str, Any]) -> str:
    return ",".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in point.items()).replace("/", "_")


@dataclass
class Entry:
    """One compared configuration: a label (its folder), its source and overrides."""

    label: str
    source: str
    overrides: list[str] = field(default_factory=list)

    def config(self, *extra: str) -> Config:
        return load_config(self.source, [*self.overrides, *extra])


def _progress_run(cfg: Config, out: Path, label: str, *, force: bool, resume: bool) -> str:
    from hetfl.runner import run_or_resume
    from hetfl.track.progress import round_progress

    with round_progress(label, cfg.rounds) as on_round:
        return run_or_resume(cfg, out, force=force, resume=resume, on_round=on_round)


def _job(cfg_text: str, out: str, force: bool, resume: bool) -> str:
    """One run in a worker process (one torch thread: the workers share the cores)."""
    import torch

    from hetfl.runner import run_or_resume

    torch.set_num_threads(1)
    return run_or_resume(load_config(yaml.safe_load(cfg_text)), Path(out), force=force, resume=resume)


def run_batch(runs: list[tuple[Config, Path, str]], *, force: bool, resume: bool, jobs: int = 1) -> None:
    """Run every (config, folder, label); `jobs` > 1 runs that many at once in worker processes.

    Runs are independent, so the order and the number of workers change no result, except that
    a worker computes with one torch thread (kernels may then differ in the last float bits).
    Every config is validated (hetfl/validation.py) before the first run starts.
    """
    from hetfl.validation import validate

    for cfg, _, _ in runs:
        validate(cfg)
    if jobs <= 1 or len(runs) <= 1:
        for i, (cfg, d, label) in enumerate(runs, 1):
            _progress_run(cfg, d, f"{label} ({i}/{len(runs)})", force=force, resume=resume)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from hetfl.config import dump_config

    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        futs = {pool.submit(_job, dump_config(cfg), str(d), force, resume): label for cfg, d, label in runs}
        for i, f in enumerate(as_completed(futs), 1):
            what = f.result()  # a worker's ConfigError propagates with its one-line message
            print(f"[{i}/{len(runs)}] {futs[f]}: {'kept (finished)' if what == 'done' else 'done'}", flush=True)


def _check_out(out: Path, force: bool, resume: bool) -> None:
    if out.exists() and any(out.iterdir()) and not (force or resume):
        raise ConfigError(f"--out {out}: already exists; use --resume to continue it or --force to replace it")


# ----------------------------------------------------------------------------- tuning


@dataclass
class TuneResult:
    method: str
    metric: str
    best: dict[str, Any]
    table: list[dict[str, Any]]  # one row per grid point: the point, validation mean and interval


def tune(entry: Entry, grid: list[tuple[str, list[Any]]], seeds: list[int], out: Path, *, force: bool = False,
         resume: bool = False, metric: str | None = None, jobs: int = 1) -> TuneResult:
    """Run every grid point of `entry` on each seed with evaluation on the validation split
    (`eval.split: validation`, a share of the clients' training data), and pick the point with
    the best mean final value of the primary metric (or `metric`). The evaluation set is never
    evaluated, so nothing about it can leak into the choice."""
    from hetfl.track.report import primary_metric
    from hetfl.track.rundir import read_metrics
    from hetfl.track.stats import higher_is_better, mean_ci

    _check_out(out, force, resume)
    points = [dict(zip([k for k, _ in grid], vals)) for vals in itertools.product(*[v for _, v in grid])]
    base = entry.config()
    cfgs = {}
    for p in points:  # every point is validated before anything runs
        for s in seeds:
            cfgs[point_label(p), s] = entry.config(*point_overrides(p), f"seed={s}", "eval.split=validation",
                                                   f"eval.every={base.rounds}", "eval.at_start=false")
    run_batch([(cfg, out / label / f"seed-{s}", f"tune {base.method.name} {label} seed {s}")
               for (label, s), cfg in cfgs.items()], force=force, resume=resume, jobs=jobs)
    finals: dict[str, list[float]] = {}
    for (label, s), cfg in cfgs.items():
        history = read_metrics(out / label / f"seed-{s}" / "metrics.jsonl")
        metric = metric or primary_metric(history)
        if metric is None or metric not in history[-1]:
            raise ConfigError(f"tune: the validation runs report no metric '{metric}'")
        finals.setdefault(label, []).append(float(history[-1][metric]))
    sign = 1.0 if higher_is_better(metric) else -1.0
    table = []
    for p in points:
        m, h = mean_ci(finals[point_label(p)])
        table.append({**p, f"val_{metric.removeprefix('eval_')}_mean": round(m, 6),
                      f"val_{metric.removeprefix('eval_')}_ci95": round(h, 6), "seeds": len(seeds)})
    best_i = max(range(len(points)), key=lambda j: (sign * mean_ci(finals[point_label(points[j])])[0], -j))
    from hetfl.track.summary import write_csv

    write_csv(out / "tune.csv", table)
    best = points[best_i]
    for key, values in grid:  # a best value at the grid's edge may not be the best value
        numeric = len(values) > 2 and all(isinstance(v, (int, float)) for v in values)
        if numeric and best[key] in (min(values), max(values)):
            print(f"hetfl: warning: tune {base.method.name}: the best {key} ({best[key]}) is at the edge of the grid "
                  f"{values}; extend the grid to check", flush=True)
    return TuneResult(base.method.name, metric, best, table)


def write_tuned(path: Path, method: str, best: dict[str, Any]) -> None:
    """Add (or replace) `method`'s chosen values in a tuned-values file, keeping other methods'."""
    tuned = read_tuned(path) if path.is_file() else {}
    tuned[method] = best
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# chosen by `hetfl tune` on a validation split of the clients' training data;\n"
                    "# use with `hetfl run/compare --set-file " + path.name + "`\n" + yaml.safe_dump(tuned, sort_keys=False))


def print_tune(res: TuneResult, width: int = 100) -> None:
    from rich.console import Console
    from rich.table import Table

    q = res.metric.removeprefix("eval_")
    t = Table(title=f"hetfl tune {res.method}: validation {q} (mean ± 95% interval over seeds)", title_justify="left")
    keys = list(res.best)
    for k in keys:
        t.add_column(k, no_wrap=True)
    t.add_column(f"val {q}", justify="right")
    t.add_column("", no_wrap=True)
    for row in res.table:
        m, h = row[f"val_{q}_mean"], row[f"val_{q}_ci95"]
        chosen = all(row[k] == res.best[k] for k in keys)
        t.add_row(*(str(row[k]) for k in keys), f"{m:.4g}" + (f"±{h:.2g}" if h else ""), "chosen" if chosen else "")
    Console(width=width).print(t)


# ----------------------------------------------------------------------------- comparison


def compare(entries: list[Entry], out: Path, *, seeds_arg: str | None = None, baseline: str | None = None,
            force: bool = False, resume: bool = False, set_file: str | None = None,
            tune_grid: list[tuple[str, list[Any]]] | None = None, tune_seeds: int = 1, tune_metric: str | None = None,
            jobs: int = 1, warn=print) -> list[dict[str, Any]]:
    """Run every (entry, seed) pair into `out/<label>/seed-<s>/`, then write summary.csv (one row
    per entry: mean and 95% interval over seeds of every numeric final metric, and the paired
    verdict against `baseline`), runs.csv and compare.png. Returns the summary rows."""
    from hetfl.track.rundir import read_metrics
    from hetfl.track.summary import aggregate, run_row, same_scenario_warnings, write_compare

    _check_out(out, force, resume)
    labels = [e.label for e in entries]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"compare: two runs would share the folder name ({', '.join(labels)})")
    if baseline is not None and baseline not in labels:
        raise ConfigError(f"--baseline: '{baseline}' is not one of the compared runs ({', '.join(labels)})")
    bases = [e.config() for e in entries]  # every config is validated before anything runs
    seeds = parse_seeds(seeds_arg, bases[0])
    for w in same_scenario_warnings(bases):
        warn(f"hetfl: warning: {w}")
    if set_file is not None:
        tuned = read_tuned(set_file)
        for e, c in zip(entries, bases):  # an entry's own label first (compare --tune writes those), else its method
            key = e.label if e.label in tuned else c.method.name
            if key in tuned:
                e.overrides = [*tuned_overrides(set_file, key), *e.overrides]
            else:
                warn(f"hetfl: warning: --set-file {set_file} has no values for '{c.method.name}'; "
                     f"{e.label} runs at its config's values")
    if tune_grid:
        for e in entries:  # validate every grid point of every method first
            for vals in itertools.product(*[v for _, v in tune_grid]):
                e.config(*point_overrides(dict(zip([k for k, _ in tune_grid], vals))))
        tuned_path = out / "tuned.yaml"
        for e in entries:
            res = tune(e, tune_grid, seeds[:tune_seeds], out / "tune" / e.label, force=force, resume=resume,
                       metric=tune_metric, jobs=jobs)
            print_tune(res)
            write_tuned(tuned_path, e.label, res.best)  # by label: two entries may share a method
            e.overrides = [*e.overrides, *point_overrides(res.best)]
    cfgs = {(e.label, s): e.config(f"seed={s}") for e in entries for s in seeds}
    run_batch([(cfg, out / label / f"seed-{s}", f"{label} seed {s}") for (label, s), cfg in cfgs.items()],
              force=force, resume=resume, jobs=jobs)
    runs = {e.label: [run_row(out / e.label / f"seed-{s}") for s in seeds] for e in entries}
    for label, rs in runs.items():
        for r in rs:
            r["run"] = label
    summary = aggregate(runs, baseline)
    histories = {e.label: [read_metrics(out / e.label / f"seed-{s}" / "metrics.jsonl") for s in seeds]
                 for e in entries}
    write_compare(out, summary, [r for rs in runs.values() for r in rs], histories)
    return summary
