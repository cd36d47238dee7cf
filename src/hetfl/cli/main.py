"""`hetfl` command line: one short module per subcommand; this file only dispatches."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from hetfl.errors import HetflError, HetflWarning

SUBCOMMANDS = ("run", "compare", "tune", "report", "validate", "list", "export")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="hetfl", description="Federated fine-tuning on heterogeneous edge devices, "
                                     "with every byte, FLOP, simulated second and joule counted.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"hetfl.cli.{name}").add_parser(sub)
    return parser


def _format_warning(message, category, filename, lineno, line=None, _default=warnings.formatwarning) -> str:
    """hetfl's own warnings as one `hetfl: warning: ...` line; others as Python prints them."""
    if issubclass(category, HetflWarning):
        return f"hetfl: warning: {message}\n"
    return _default(message, category, filename, lineno, line)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: everything is local
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # our own progress bar is the one to watch
    args = build_parser().parse_args(argv)
    import hetfl.builtins  # noqa: F401  (after parsing, so --help stays fast: registers what ships)

    warnings.formatwarning = _format_warning
    try:
        return int(args.func(args) or 0)
    except HetflError as e:
        print(f"hetfl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hetfl: interrupted (resume with --resume DIR)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
