"""hetfl validate YAML [--set k=v ...] [--backend sim|flower]: check a config without loading any model."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check a config file (unknown keys, types, values, and how sections fit "
                                        "together and fit the model) without loading a model")
    p.add_argument("config", help="preset name or YAML path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--backend", choices=("sim", "flower"), default="sim",
                   help="also check what this backend cannot run (default sim)")
    p.add_argument("--print", action="store_true", help="print the resolved config")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hetfl.config import dump_config, load_config
    from hetfl.validation import validate

    cfg = load_config(args.config, args.overrides)
    validate(cfg, backend=args.backend)  # device tiers, data and model names, ranks, cuts, method x backend
    if args.print:
        print(dump_config(cfg), end="")
    print(f"ok: {args.config} ({cfg.method.name}, {cfg.rounds} rounds, {cfg.population.num_clients} clients)")
    return 0
