"""hetfl compare PRESET --methods a,b [--seeds N] [--baseline a] [--tune key=[..]] --out DIR:
several methods on one scenario, every one on the same seeds, one table with intervals."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="run several methods on one scenario over seeds and print one table")
    p.add_argument("configs", nargs="+", help="presets or YAML files (same scenario, different methods)")
    p.add_argument("--methods", help="comma-separated methods to run on the first config instead, e.g. fedit,fedavg-full")
    p.add_argument("--seeds", metavar="N|S1,S2,..",
                   help="run every method on N seeds (the config's seed upwards) or on the listed seeds; "
                        "default: the config's `seeds` list, else its `seed`")
    p.add_argument("--baseline", metavar="LABEL",
                   help="add vs_<LABEL>: better/worse/tie from a paired t-test across seeds (95%%) on the primary metric")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override applied to every config")
    p.add_argument("--set-file", metavar="YAML", help="per-method values, as `hetfl tune` writes them")
    p.add_argument("--tune", action="append", default=[], metavar="KEY=[V1,V2,..]",
                   help="tune each method on a validation split first (repeatable; see `hetfl tune`)")
    p.add_argument("--tune-seeds", type=int, default=1, metavar="N", help="seeds per tuning grid point (default 1)")
    p.add_argument("--tune-metric", metavar="METRIC", help="validation metric to tune on (default: the primary one)")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="runs at once, in N worker processes of one torch thread each (default 1)")
    p.add_argument("--out", required=True, help="folder; each run goes to OUT/<method or config name>/seed-<s>")
    p.add_argument("--force", action="store_true", help="replace existing run folders")
    p.add_argument("--resume", action="store_true", help="continue a killed compare: keep finished runs")
    p.set_defaults(func=run)


def entries(args: argparse.Namespace):
    from hetfl.config import load_config
    from hetfl.errors import ConfigError
    from hetfl.sweep import Entry

    if args.methods:
        if len(args.configs) != 1:
            raise ConfigError("--methods takes exactly one config to run them on")
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        return [Entry(m, args.configs[0], [*args.overrides, f"method.name={m}"]) for m in methods]
    out = []
    for c in args.configs:
        load_config(c, args.overrides)
        out.append(Entry(Path(c).stem if c.endswith((".yaml", ".yml")) else c, c, list(args.overrides)))
    return out


def run(args: argparse.Namespace) -> int:
    from hetfl.errors import ConfigError
    from hetfl.sweep import compare, parse_grid
    from hetfl.track.summary import print_compare

    if args.force and args.resume:
        raise ConfigError("--force and --resume: choose one (replace the runs, or keep the finished ones)")
    if args.jobs < 1:
        raise ConfigError("--jobs: must be >= 1")
    if args.tune_seeds < 1:
        raise ConfigError("--tune-seeds: must be >= 1")
    root = Path(args.out)
    summary = compare(entries(args), root, seeds_arg=args.seeds, baseline=args.baseline, force=args.force,
                      resume=args.resume, set_file=args.set_file, tune_grid=parse_grid(args.tune, "--tune"),
                      tune_seeds=args.tune_seeds, tune_metric=args.tune_metric,
                      jobs=args.jobs)
    print_compare(summary, root, args.baseline)
    return 0
