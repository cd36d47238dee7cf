"""Live progress for long runs: a rich progress bar with the round and client in progress, the
pace (rounds per minute, ETA, from this process's wall time so far) and the latest round's key metrics."""

from __future__ import annotations

import contextlib
import datetime
import time
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text


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


def pace(done: float, elapsed_s: float, remaining: float) -> str:
    """"R rounds/min · ETA h:mm:ss" from `done` rounds (fractions count) in `elapsed_s` wall seconds,
    `remaining` rounds to go; "" until there is a measurement."""
    if done <= 0 or elapsed_s <= 0:
        return ""
    per_s = done / elapsed_s
    eta = datetime.timedelta(seconds=round(max(remaining, 0.0) / per_s))
    return f"{60 * per_s:.3g} rounds/min · ETA {eta}"


class RoundBar:
    """The callbacks of one run's display: `bar(metrics)` after each round (the loop's `on_round`),
    `bar.on_client(rnd, done, total)` within one (the backend's `on_client`).

    The pace counts only the rounds this process runs (not a resumed run's earlier ones, not the
    model loading or the base-model evaluation): it starts when the first round starts, or, when
    no client reports arrive (Flower), at the first round's metrics.

    Args:
        label: the run's name on the bar.
        rounds: the run's rounds.
        clock: wall clock in seconds (tests pass a fake one).
    """

    def __init__(self, label: str, rounds: int, clock: Callable[[], float] = time.monotonic):
        self.label, self.rounds, self.clock = label, rounds, clock
        self.last = 0  # the last finished round
        self.frac = 0.0  # share of round last + 1's clients done
        self.clients = ""  # "clients k/K" of the round in progress
        self.start: tuple[float, int] | None = None  # (wall time, round) where the pace is measured from
        self.end: float | None = None  # when the last round finished: the pace stops there
        self.info = "evaluating base model"
        self.on_change: Callable[[], None] = lambda: None  # the display's redraw

    def where(self) -> str:
        """"round r/R · clients k/K" while round r runs, "round r/R" once it is done."""
        if self.clients:
            return f"round {self.last + 1}/{self.rounds} · {self.clients}"
        return f"round {self.last}/{self.rounds}"

    def completed(self) -> float:
        """Rounds done, the running round's share of clients done included."""
        return self.last + self.frac

    def pace(self) -> str:
        """Rounds per minute and ETA since the pace's start (frozen once the last round is done)."""
        if self.start is None:
            return ""
        t0, r0 = self.start
        now = self.clock() if self.end is None else self.end
        return pace(self.completed() - (r0 - 1), now - t0, self.rounds - self.completed())

    def on_client(self, rnd: int, done: int, total: int) -> None:
        """Round `rnd` has `done` of its `total` client updates (0 as it starts)."""
        if self.start is None:
            self.start = (self.clock(), rnd)
        self.last = rnd - 1
        self.frac = done / total if total else 0.0
        self.clients = f"clients {done}/{total}"
        self.on_change()

    def __call__(self, m: dict[str, Any]) -> None:
        self.last, self.frac, self.clients = m["round"], 0.0, ""
        if self.start is None:
            self.start = (self.clock(), self.last + 1)  # the next round starts now
        if self.last >= self.rounds:
            self.end = self.clock()
        self.info = _summary(m)
        self.on_change()

    def line(self) -> str:
        """The whole state as one line (for a log that is not a terminal)."""
        p = self.pace()
        return f"{self.label} {self.where()}: {self.info}" + (f"  ({p})" if p else "")


class _Live(ProgressColumn):
    """A column whose text is asked for at every refresh (the ETA counts down between events)."""

    def __init__(self, text: Callable[[], str]):
        super().__init__()
        self.text = text

    def render(self, task) -> Text:
        return Text(self.text(), style="progress.remaining")


@contextlib.contextmanager
def round_progress(label: str, rounds: int, console: Console | None = None) -> Iterator[RoundBar]:
    """Yield a `RoundBar` over `rounds` rounds: call it with each round's metrics (`on_round`),
    give its `on_client` to the backend for the clients done within a round.

    Round 0 (the base-model evaluation) updates the text without advancing the bar. On a console
    that is not a terminal, each round prints one line instead (client reports print nothing).
    """
    console = console or Console(stderr=True)
    bar = RoundBar(label, rounds)
    columns = (TextColumn("[bold]{task.fields[label]}"), BarColumn(), _Live(bar.where), TimeElapsedColumn(),
               _Live(bar.pace), TextColumn("{task.fields[info]}", markup=False))
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as prog:
        task = prog.add_task("run", total=rounds, label=escape(label), info=bar.info)  # "[fedit]" is no markup

        def redraw() -> None:
            prog.update(task, completed=bar.completed(), info=bar.info)
            if not console.is_terminal and not bar.clients:  # a finished round, not a client report
                console.print(bar.line(), highlight=False, markup=False, soft_wrap=True)  # one line per round

        bar.on_change = redraw
        yield bar
