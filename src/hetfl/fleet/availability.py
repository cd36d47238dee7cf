"""Who is online when: always, a per-tier diurnal curve, or a FedScale behave trace.

`population.availability` picks the model (`build_availability`):

- ``always``: every client is online at every simulated second (the default).
- ``diurnal``: simulated time t = 0 is local midnight for every client. In each hour slot
  ``s = floor(t / 3600)`` a client of tier k is online for the whole hour with probability
  ``p[k][s % 24]``, the device file's ``diurnal:`` curve (system/devices.yaml). The draw is a
  hash of (seed, "diurnal", client, slot), so an answer never depends on the order of queries.
- ``{trace: FILE}``: each client follows one client of a FedScale ``client_behave_trace``
  (fleet/traces.py), mapped by the run's seed, and is online exactly in its intervals.

All three answer the same three questions, so the engine needs no case for each: is ``cid``
online at ``t``; when does it next go offline (a client that drops mid-round fails); when does
the first of some clients come online (a server with nobody to sample waits until then).
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from hetfl.errors import ConfigError
from hetfl.fleet.traces import BehaveTrace, load_behave_trace, map_clients
from hetfl.seeding import derive_seed

HOUR_S = 3600.0
HORIZON_S = 30 * 86400.0  # how far ahead Diurnal looks before answering "never" (30 simulated days)


class Availability:
    """Every client online at every time; the base of the other models."""

    def online(self, cid: int, t: float) -> bool:
        """Whether client ``cid`` is online at simulated time ``t`` (s)."""
        return True

    def offline_at(self, cid: int, t: float) -> float:
        """The first time >= ``t`` at which ``cid`` is offline: ``t`` if it is offline at ``t``,
        ``math.inf`` if it never goes offline."""
        return math.inf

    def next_online(self, t: float, cids: Iterable[int]) -> float:
        """The earliest time >= ``t`` at which one of ``cids`` is online; ``math.inf`` if none
        comes online (within `HORIZON_S` for `Diurnal`)."""
        return t if any(True for _ in cids) else math.inf


@functools.lru_cache(maxsize=1 << 16)
def _uniform(seed: int, cid: int, slot: int) -> float:
    # The 63-bit hash itself is the uniform draw in [0, 1): no generator to build per query.
    return derive_seed(seed, "diurnal", cid, slot) / 2.0**63


class Diurnal(Availability):
    """Per-tier hourly online probabilities, drawn independently per client and hour.

    Args:
        tiers: Tier name per client.
        curves: Tier name -> 24 probabilities (hour 0..23); every tier in ``tiers`` needs one.
        seed: The run's root seed.
    """

    def __init__(self, tiers: Sequence[str], curves: Mapping[str, Sequence[float]], seed: int):
        missing = sorted(set(tiers) - set(curves))
        if missing:
            raise ValueError(f"no diurnal curve for tier(s) {', '.join(missing)}")
        self._curves = [tuple(float(p) for p in curves[t]) for t in tiers]  # per client: 24 probabilities
        self._seed = int(seed)

    def _online_slot(self, cid: int, slot: int) -> bool:
        return _uniform(self._seed, cid, slot) < self._curves[cid][slot % 24]

    def online(self, cid: int, t: float) -> bool:
        return self._online_slot(int(cid), math.floor(t / HOUR_S))

    def offline_at(self, cid: int, t: float) -> float:
        cid, slot = int(cid), math.floor(t / HOUR_S)
        if not self._online_slot(cid, slot):
            return t
        if min(self._curves[cid]) >= 1.0:
            return math.inf
        for s in range(slot + 1, slot + 1 + int(HORIZON_S // HOUR_S)):
            if not self._online_slot(cid, s):
                return s * HOUR_S
        return math.inf

    def next_online(self, t: float, cids: Iterable[int]) -> float:
        slot = math.floor(t / HOUR_S)
        cids = [int(c) for c in cids if max(self._curves[int(c)]) > 0.0]  # p = 0 all day: never online
        if any(self._online_slot(c, slot) for c in cids):
            return t
        for s in range(slot + 1, slot + 1 + int(HORIZON_S // HOUR_S)) if cids else ():
            if any(self._online_slot(c, s) for c in cids):
                return s * HOUR_S
        return math.inf


class _Cycle:
    """One behave trace with adjacent intervals merged: online in [starts[i], ends[i]) mod period."""

    def __init__(self, trace: BehaveTrace):
        starts: list[float] = []
        ends: list[float] = []
        for a, b in zip(trace.active, trace.inactive):
            if ends and a == ends[-1]:  # [.., a) then [a, ..): one interval
                ends[-1] = b
            else:
                starts.append(a)
                ends.append(b)
        self.period = trace.finish_time
        self.starts, self.ends = starts, ends
        self.always = starts == [0.0] and ends == [self.period]
        # Online until the cycle's end and again from its start: the client stays on across the wrap.
        self.wraps = bool(starts) and starts[0] == 0.0 and ends[-1] == self.period

    def index(self, x: float) -> int:
        """The interval holding cycle time x, or -1."""
        i = bisect.bisect_right(self.starts, x) - 1
        return i if i >= 0 and x < self.ends[i] else -1


class TraceAvailability(Availability):
    """Each client online exactly in the intervals of its behave trace, repeated every cycle.

    Args:
        traces: The trace each client follows, per client (`map_clients` chooses them).
    """

    def __init__(self, traces: Sequence[BehaveTrace]):
        self._cycles = [_Cycle(tr) for tr in traces]

    def online(self, cid: int, t: float) -> bool:
        c = self._cycles[int(cid)]
        return c.index(t % c.period) >= 0

    def offline_at(self, cid: int, t: float) -> float:
        c = self._cycles[int(cid)]
        x = t % c.period
        i = c.index(x)
        if i < 0:
            return t
        if c.always:
            return math.inf
        base = t - x  # the current cycle's start
        if c.ends[i] < c.period or not c.wraps:
            return base + c.ends[i]  # ends[i] == period without wrap: offline at the next cycle's start
        return base + c.period + c.ends[0]  # runs on into the next cycle's first interval

    def next_online(self, t: float, cids: Iterable[int]) -> float:
        best = math.inf
        for cid in cids:
            c = self._cycles[int(cid)]
            if not c.starts:
                continue  # never online
            x = t % c.period
            if c.index(x) >= 0:
                return t
            j = bisect.bisect_right(c.starts, x)  # the first interval starting after x
            base = t - x
            best = min(best, base + c.starts[j] if j < len(c.starts) else base + c.period + c.starts[0])
        return best


def build_availability(cfg: Any, population: Any) -> Availability:
    """The availability model of ``cfg.population.availability``.

    Args:
        cfg: The run's `hetfl.config.Config`.
        population: Its `hetfl.scenario.Population` (tier per client).

    Returns:
        `Availability` (``always``), `Diurnal` or `TraceAvailability`.

    Raises:
        ConfigError: If a tier of the population has no diurnal curve (``diurnal``), or the
            trace file is missing or malformed (``{trace: FILE}``).
    """
    mode = cfg.population.availability
    if mode == "always":
        return Availability()
    if mode == "diurnal":
        from hetfl.system.devices import load_diurnal

        devices_file = cfg.population.devices_file
        curves = load_diurnal(devices_file)
        missing = [t for t in dict.fromkeys(population.tiers) if t not in curves]
        if missing:
            where = devices_file or "the packaged devices.yaml"
            raise ConfigError(f"population.availability: diurnal: tier '{missing[0]}' has no diurnal curve "
                              f"(add diurnal.{missing[0]}: [24 probabilities, hour 0..23] to {where})")
        return Diurnal(population.tiers, curves, cfg.seed)
    traces = load_behave_trace(mode["trace"])
    ids = map_clients(list(traces), len(population), cfg.seed)
    return TraceAvailability([traces[i] for i in ids])
