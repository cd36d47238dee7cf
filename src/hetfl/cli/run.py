"""hetfl run PRESET_OR_YAML [--set k=v ...] [--out DIR] [--force] [--workers N] [--backend sim|ray|flower
[--address HOST:PORT] [--supernodes N] [--superlink HOST:PORT]] | hetfl run --resume DIR [--backend ray]"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run one experiment (a preset name or a YAML file)")
    p.add_argument("config", nargs="?", help="preset name (see `hetfl list`) or YAML path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key by dotted path, e.g. --set rounds=3 --set method.name=fedavg-full")
    p.add_argument("--set-file", metavar="YAML", help="the run's method's values from a tuned-values file (`hetfl tune`)")
    p.add_argument("--out", help="run directory (default runs/<name>)")
    p.add_argument("--force", action="store_true", help="replace an existing run directory")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    p.add_argument("--workers", type=int, metavar="N",
                   help="--backend sim: processes that train a round's clients, one torch thread each (default: "
                        "one per core); --backend ray: actors (default: one per cluster CPU); results do not "
                        "depend on it")
    p.add_argument("--backend", choices=("sim", "flower", "ray"), default="sim",
                   help="sim: the simulator (default); ray: its workers as Ray actors, on this machine or a "
                        "cluster (--address); flower: clients on Flower SuperNodes")
    p.add_argument("--address", metavar="auto|HOST:PORT",
                   help="--backend ray: join this running Ray cluster (default: start one on this machine)")
    p.add_argument("--supernodes", type=int, default=2, metavar="N",
                   help="--backend flower: SuperNodes to start locally (or to wait for with --superlink)")
    p.add_argument("--superlink", metavar="HOST:PORT",
                   help="--backend flower: submit to this running SuperLink instead of starting one locally")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hetfl.config import load_config
    from hetfl.errors import ConfigError
    from hetfl.runner import run_experiment
    from hetfl.track.progress import round_progress
    from hetfl.track.summary import print_run_summary

    if args.backend != "flower" and args.superlink:
        raise ConfigError("--superlink needs --backend flower")
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers: must be >= 1, got {args.workers}")
    if args.workers is not None and args.backend == "flower":
        raise ConfigError("--workers applies to --backend sim or ray (on Flower, each SuperNode is a worker: "
                          "--supernodes)")
    if args.address and args.backend != "ray":
        raise ConfigError("--address needs --backend ray")
    if args.resume:
        if args.backend == "flower":
            raise ConfigError("--resume: resuming runs only on --backend sim (Flower clients keep their state on "
                              "their SuperNodes)")
        if args.config or args.overrides or args.set_file:
            raise ConfigError("--resume DIR takes no config or --set (the run's own config.yaml is used)")
        cfg_path = Path(args.resume) / "config.yaml"
        if not cfg_path.is_file():
            raise ConfigError(f"--resume {args.resume}: no config.yaml in that folder")
        cfg, out = load_config(cfg_path), Path(args.resume)
    else:
        if not args.config:
            raise ConfigError("run: give a preset name or a YAML file (or --resume DIR)")
        cfg = load_config(args.config, args.overrides)
        if args.set_file:  # the tuned values of the method this run uses; explicit --set still wins
            from hetfl.config import tuned_overrides

            cfg = load_config(args.config, [*tuned_overrides(args.set_file, cfg.method.name), *args.overrides])
        out = Path(args.out) if args.out else Path("runs") / cfg.name
    from hetfl.validation import validate

    validate(cfg, backend="flower" if args.backend == "flower" else "sim")  # every rule, before any model loads
    label = f"{cfg.name} [{cfg.method.name}{'' if args.backend == 'sim' else ', ' + args.backend}]"
    with round_progress(label, cfg.rounds) as bar:
        if args.backend == "flower":  # the clients train in other processes: the bar counts rounds only
            from hetfl.flower.launch import run_flower

            history = run_flower(cfg, out, supernodes=args.supernodes, superlink=args.superlink, force=args.force,
                                 on_round=bar)
        else:
            from hetfl.engine.workers import default_workers

            ray = (args.address or "local") if args.backend == "ray" else None
            workers = args.workers or (0 if ray else default_workers())
            history = run_experiment(cfg, out, force=args.force, resume=bool(args.resume), on_round=bar,
                                     on_client=bar.on_client, workers=workers, ray=ray)
    print_run_summary(cfg, history, out)
    return 0
