"""hetfl report DIR: (re)write DIR/report.md with plots from a run's metrics."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write report.md and plots for a run directory")
    p.add_argument("run_dir")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hetfl.errors import ConfigError
    from hetfl.track.report import write_report

    d = Path(args.run_dir)
    if not (d / "metrics.jsonl").is_file():
        raise ConfigError(f"{d}: not a run directory (no metrics.jsonl)")
    print(write_report(d))
    return 0
