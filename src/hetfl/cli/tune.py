"""hetfl tune PRESET --method M --grid train.lr=[..] [--grid key=[..]] [--seeds N] --out DIR:
choose a method's settings on a validation split of the clients' training data."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="choose a method's settings on a validation split (never the evaluation set)")
    p.add_argument("config", help="preset name or YAML path")
    p.add_argument("--method", help="method to tune (default: the config's)")
    p.add_argument("--grid", action="append", default=[], required=True, metavar="KEY=[V1,V2,..]",
                   help="values to try for one key (repeatable: the grid is their product)")
    p.add_argument("--seeds", metavar="N|S1,S2,..", help="seeds per grid point (default: the config's seed)")
    p.add_argument("--metric", help="validation metric to select on (default: the task's primary one, e.g. eval_ppl)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="runs at once, in N worker processes of one torch thread each (default 1)")
    p.add_argument("--out", required=True, help="folder for the grid's runs; the choice goes to OUT/tuned.yaml")
    p.add_argument("--write", metavar="YAML", help="also add the choice to this tuned-values file (for --set-file)")
    p.add_argument("--force", action="store_true", help="replace existing run folders")
    p.add_argument("--resume", action="store_true", help="continue a killed tune: keep finished runs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hetfl.errors import ConfigError
    from hetfl.sweep import Entry, parse_grid, parse_seeds, print_tune, tune, write_tuned

    if args.force and args.resume:
        raise ConfigError("--force and --resume: choose one")
    if args.jobs < 1:
        raise ConfigError("--jobs: must be >= 1")
    extra = [f"method.name={args.method}"] if args.method else []
    entry = Entry(args.method or "run", args.config, [*args.overrides, *extra])
    seeds = parse_seeds(args.seeds, entry.config())
    out = Path(args.out)
    res = tune(entry, parse_grid(args.grid), seeds, out, force=args.force, resume=args.resume, metric=args.metric,
               jobs=args.jobs)
    print_tune(res)
    for path in [out / "tuned.yaml", *([Path(args.write)] if args.write else [])]:
        write_tuned(path, res.method, res.best)
    print(f"chosen for {res.method}: {res.best} -> {out / 'tuned.yaml'} (use: hetfl run/compare ... --set-file "
          f"{out / 'tuned.yaml'})")
    return 0
