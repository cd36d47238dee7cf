"""hetfl compare A.yaml B.yaml ... --out DIR: run several configs of one scenario, one table."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="run several methods on one scenario and print one table")
    p.add_argument("configs", nargs="+", help="presets or YAML files (same scenario, different methods)")
    p.add_argument("--methods", help="comma-separated methods to run on the first config instead, e.g. fedit,fedavg-full")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override applied to every config")
    p.add_argument("--out", required=True, help="folder; each run goes to OUT/<method or config name>")
    p.add_argument("--force", action="store_true", help="replace existing run folders")
    p.set_defaults(func=run)


def resolve_configs(args: argparse.Namespace):
    from hetfl.config import load_config
    from hetfl.errors import ConfigError

    if args.methods:
        if len(args.configs) != 1:
            raise ConfigError("--methods takes exactly one config to run them on")
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        return [(m, load_config(args.configs[0], [*args.overrides, f"method.name={m}"])) for m in methods]
    out = []
    for c in args.configs:
        cfg = load_config(c, args.overrides)
        out.append((Path(c).stem if c.endswith((".yaml", ".yml")) else c, cfg))
    return out


def run(args: argparse.Namespace) -> int:
    from hetfl.runner import run_experiment
    from hetfl.track.progress import round_progress
    from hetfl.track.summary import compare_rows, print_compare, same_scenario_warnings, write_compare

    runs = resolve_configs(args)  # every config is validated before anything runs
    for w in same_scenario_warnings([c for _, c in runs]):
        print(f"hetfl: warning: {w}")
    root = Path(args.out)
    dirs = []
    for label, cfg in runs:
        d = root / label
        with round_progress(f"{label}", cfg.rounds) as on_round:
            run_experiment(cfg, d, force=args.force, on_round=on_round)
        dirs.append(d)
    rows = compare_rows(dirs)
    write_compare(root, rows, dirs)
    print_compare(rows, root)
    return 0
