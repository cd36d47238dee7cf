"""hetfl run PRESET_OR_YAML [--set k=v ...] [--out DIR] [--force] | hetfl run --resume DIR"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run one experiment (a preset name or a YAML file)")
    p.add_argument("config", nargs="?", help="preset name (see `hetfl list`) or YAML path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key by dotted path, e.g. --set rounds=3 --set method.name=fedavg-full")
    p.add_argument("--out", help="run directory (default runs/<name>)")
    p.add_argument("--force", action="store_true", help="replace an existing run directory")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hetfl.config import load_config
    from hetfl.errors import ConfigError
    from hetfl.runner import run_experiment
    from hetfl.track.progress import round_progress
    from hetfl.track.summary import print_run_summary

    if args.resume:
        if args.config or args.overrides:
            raise ConfigError("--resume DIR takes no config or --set (the run's own config.yaml is used)")
        cfg_path = Path(args.resume) / "config.yaml"
        if not cfg_path.is_file():
            raise ConfigError(f"--resume {args.resume}: no config.yaml in that folder")
        cfg, out = load_config(cfg_path), Path(args.resume)
    else:
        if not args.config:
            raise ConfigError("run: give a preset name or a YAML file (or --resume DIR)")
        cfg = load_config(args.config, args.overrides)
        out = Path(args.out) if args.out else Path("runs") / cfg.name
    with round_progress(f"{cfg.name} [{cfg.method.name}]", cfg.rounds) as on_round:
        history = run_experiment(cfg, out, force=args.force, resume=bool(args.resume), on_round=on_round)
    print_run_summary(cfg, history, out)
    return 0
