"""Live progress for long runs: a rich progress bar with the latest round's key metrics."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def _summary(m: dict[str, Any]) -> str:
    parts = []
    if "train_loss" in m:
        parts.append(f"loss {m['train_loss']:.3f}")
    for k, v in m.items():
        if k.startswith("eval_") and isinstance(v, (int, float)):
            parts.append(f"{'eval loss' if k == 'eval_loss' else k[5:]} {v:.2f}" if isinstance(v, float)
                         else f"{k[5:]} {v}")  # counts (eval_n) print as integers
    parts.append(f"up {m.get('bytes_up_total', 0) / 1e6:.2f} MB")
    parts.append(f"sim {m.get('sim_time_s', 0):.0f} s")
    parts.append(f"{m.get('energy_j', 0):.0f} J")
    return "  ".join(parts)


@contextlib.contextmanager
def round_progress(label: str, rounds: int, console: Console | None = None) -> Iterator[Callable[[dict], None]]:
    """Yield an `on_round(metrics)` callback that advances a bar over `rounds` rounds.

    Round 0 (the base-model evaluation) updates the text without advancing the bar.
    """
    console = console or Console(stderr=True)
    with Progress(TextColumn("[bold]{task.fields[label]}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[info]}"), console=console, transient=False,
                  disable=not console.is_terminal) as prog:
        task = prog.add_task("run", total=rounds, label=label, info="evaluating base model")

        def on_round(m: dict[str, Any]) -> None:
            prog.update(task, completed=m["round"], info=_summary(m))
            if not console.is_terminal:
                console.print(f"{label} round {m['round']}/{rounds}: {_summary(m)}", highlight=False)

        yield on_round
