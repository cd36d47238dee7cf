"""Device profiles (data, loaded from YAML) and the assignment of tiers to clients.

The shipped tiers live in ``devices.yaml`` next to this file, each number with a comment
saying where it comes from. A user file of the same shape replaces them:

    tiers:
      my-board:
        flops_per_s: 5.0e+9
        mem_mb: 512
        up_mbps: 2
        down_mbps: 10
        tx_power_w: 0.2
        cpu_hz: 1.2e+9
        kappa: 1.0e-28
    server:               # optional; without it the shipped server entry applies
      flops_per_s: 2.5e+12
    diurnal:              # optional; P(online) per hour 0..23, for `population.availability: diurnal`
      my-board: [0.9, 0.9, ...]   # 24 values in [0, 1]; tiers without one fall back to the shipped curve

The ``server`` entry is the (edge) server that runs split methods' server side; a client's
wait for it is ``server_flops * n / flops_per_s`` with ``n`` clients served at once
(system/cost.py).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import yaml

from hetfl.errors import ConfigError


@dataclass(frozen=True)
class DeviceProfile:
    """One device tier. Units: FLOP/s, MiB, Mbit/s (1e6 bit/s), W, Hz, and kappa such that
    computing energy is ``kappa * cpu_hz**2`` joules per cycle."""

    name: str
    flops_per_s: float
    mem_mb: float
    up_mbps: float
    down_mbps: float
    tx_power_w: float
    cpu_hz: float
    kappa: float


@dataclass(frozen=True)
class ServerProfile:
    """The server of split methods: the FLOP/s its training steps sustain."""

    name: str
    flops_per_s: float


_FIELDS = tuple(f.name for f in dataclasses.fields(DeviceProfile) if f.name != "name")
_SERVER_FIELDS = ("flops_per_s",)
# Fields that divide something (time = work / rate) must be strictly positive; the two energy
# coefficients may be zero to switch an energy term off.
_MAY_BE_ZERO = frozenset({"tx_power_w", "kappa"})
_PACKAGED = "devices.yaml"


def load_tiers(path: str | None = None) -> dict[str, DeviceProfile]:
    """Load device tiers from YAML.

    Args:
        path: A YAML file with a top-level ``tiers:`` mapping of tier name to fields (and
            optionally a ``server:`` entry, see `load_server`). ``None`` loads the packaged
            ``hetfl/system/devices.yaml``.

    Returns:
        Tier name -> profile, in file order.

    Raises:
        ConfigError: If the file is missing or not valid YAML, or a tier has an unknown,
            missing, non-numeric, non-finite or negative field. The message starts with
            ``<file>: <tier>.<field>``.
    """
    label, doc = _read(path)
    if not doc["tiers"]:
        raise ConfigError(f"{label}: tiers: no device tiers defined")
    return {str(name): _parse_tier(label, str(name), spec) for name, spec in doc["tiers"].items()}


def load_server(path: str | None = None) -> ServerProfile:
    """Load the ``server:`` entry of a device file; a user file without one gets the packaged one.

    Args:
        path: A device YAML (as for `load_tiers`); ``None`` loads the packaged one.

    Returns:
        The server profile.

    Raises:
        ConfigError: As `load_tiers`, for the file and for the entry's fields
            (``<file>: server.<field>``).
    """
    label, doc = _read(path)
    if "server" not in doc:
        if path is None:
            raise ConfigError(f"{label}: server: missing entry")
        return load_server(None)
    spec = doc["server"]
    if not isinstance(spec, dict):
        raise ConfigError(f"{label}: server: expected a mapping of fields ({', '.join(_SERVER_FIELDS)})")
    unknown = sorted(set(map(str, spec)) - set(_SERVER_FIELDS))
    if unknown:
        raise ConfigError(f"{label}: server.{unknown[0]}: unknown field (known: {', '.join(_SERVER_FIELDS)})")
    if "flops_per_s" not in spec:
        raise ConfigError(f"{label}: server.flops_per_s: missing field")
    return ServerProfile("server", _number(label, "server", "flops_per_s", spec["flops_per_s"]))


def _read(path: str | None) -> tuple[str, dict]:
    """(label for messages, parsed document with a `tiers:` mapping and maybe `server:`)."""
    if path is None:
        label = f"{_PACKAGED} (packaged)"
        text = resources.files("hetfl.system").joinpath(_PACKAGED).read_text(encoding="utf-8")
    else:
        label = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"{label}: cannot read device file ({e.strerror})") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{label}:{mark.line + 1}" if mark is not None else label
        raise ConfigError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None

    if (not isinstance(doc, dict) or "tiers" not in doc or not set(doc) <= {"tiers", "server", "diurnal"}
            or not isinstance(doc["tiers"], dict)):
        raise ConfigError(f"{label}: expected a top-level 'tiers:' mapping (and optionally 'server:', 'diurnal:')")
    return label, doc


def load_diurnal(path: str | None = None) -> dict[str, tuple[float, ...]]:
    """Load the ``diurnal:`` curves of a device file: tier -> P(online) for hours 0..23.

    A tier of a user file without its own curve gets the packaged curve of the same name, if
    there is one; tiers with neither are absent from the result.

    Args:
        path: A device YAML (as for `load_tiers`); ``None`` loads the packaged one.

    Returns:
        Tier name -> 24 probabilities, for the file's tiers that have a curve.

    Raises:
        ConfigError: As `load_tiers` for the file, or ``<file>: diurnal.<tier>: ...`` for a
            curve of an unknown tier, one without 24 values, or a value outside [0, 1].
    """
    label, doc = _read(path)
    spec = doc.get("diurnal", {})
    if not isinstance(spec, dict):
        raise ConfigError(f"{label}: diurnal: expected a mapping of tier -> 24 probabilities (hour 0..23)")
    curves = {str(tier): _parse_curve(label, str(tier), raw, doc["tiers"]) for tier, raw in spec.items()}
    if path is not None:
        shipped = load_diurnal(None)
        curves.update({t: shipped[t] for t in map(str, doc["tiers"]) if t not in curves and t in shipped})
    return curves


def _parse_curve(label: str, tier: str, raw: object, tiers: dict) -> tuple[float, ...]:
    key = f"{label}: diurnal.{tier}"
    if tier not in map(str, tiers):
        raise ConfigError(f"{key}: unknown tier (known: {', '.join(map(str, tiers))})")
    if not isinstance(raw, list) or len(raw) != 24:
        got = f"{len(raw)} values" if isinstance(raw, list) else repr(raw)
        raise ConfigError(f"{key}: expected a list of 24 probabilities (hour 0..23), got {got}")
    values = []
    for hour, p in enumerate(raw):
        try:
            value = float(p) if not isinstance(p, bool) else math.nan
        except (TypeError, ValueError):
            value = math.nan
        if not 0.0 <= value <= 1.0:  # NaN fails too
            raise ConfigError(f"{key}: hour {hour}: expected a probability in [0, 1], got {p!r}")
        values.append(value)
    return tuple(values)


def _parse_tier(label: str, name: str, spec: object) -> DeviceProfile:
    if not isinstance(spec, dict):
        raise ConfigError(f"{label}: {name}: expected a mapping of fields ({', '.join(_FIELDS)})")
    unknown = sorted(set(map(str, spec)) - set(_FIELDS))
    if unknown:
        raise ConfigError(
            f"{label}: {name}.{unknown[0]}: unknown field (known: {', '.join(_FIELDS)})"
        )
    values: dict[str, float] = {}
    for field in _FIELDS:
        if field not in spec:
            raise ConfigError(f"{label}: {name}.{field}: missing field")
        values[field] = _number(label, name, field, spec[field])
    return DeviceProfile(name=name, **values)


def _number(label: str, name: str, field: str, raw: object) -> float:
    key = f"{label}: {name}.{field}"
    if isinstance(raw, bool):
        raise ConfigError(f"{key}: expected a number, got {raw!r}")
    # PyYAML (YAML 1.1) reads `1e9` or `1.0e9` as a string, only `1.0e+9` as a float, so
    # numeric-looking strings are accepted to spare users that trap.
    try:
        value = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{key}: must be finite, got {raw!r}")
    if value < 0 or (value == 0 and field not in _MAY_BE_ZERO):
        bound = ">= 0" if field in _MAY_BE_ZERO else "> 0"
        raise ConfigError(f"{key}: must be {bound}, got {raw!r}")
    return value


def assign_tiers(
    n_clients: int,
    mix: Mapping[str, float],
    tiers: Mapping[str, DeviceProfile],
    rng: np.random.Generator,
) -> list[str]:
    """Give each client a device tier so that tier counts match ``mix`` as closely as possible.

    Proportions are normalised to sum to 1, turned into exact integer counts by
    largest-remainder (Hamilton) rounding, ties going to the tier listed first in ``mix``, and
    the resulting list is shuffled with ``rng``.

    Args:
        n_clients: Number of clients.
        mix: Tier name -> non-negative weight (need not sum to 1).
        tiers: Known tiers, e.g. from `load_tiers`.
        rng: Source of randomness for the shuffle.

    Returns:
        Tier name per client, length ``n_clients``.

    Raises:
        ConfigError: On ``n_clients < 1``, an unknown tier name, or weights that are negative,
            non-finite, or all zero.
    """
    if isinstance(n_clients, bool) or not isinstance(n_clients, (int, np.integer)) or n_clients < 1:
        raise ConfigError(f"population.num_clients: must be an integer >= 1, got {n_clients!r}")
    if not mix:
        raise ConfigError("population.tiers: empty tier mix")
    for name, w in mix.items():
        if name not in tiers:
            raise ConfigError(
                f"population.tiers: unknown device tier '{name}' (known: {', '.join(tiers)})"
            )
        if isinstance(w, bool) or not isinstance(w, (int, float, np.integer, np.floating)):
            raise ConfigError(f"population.tiers.{name}: expected a number, got {w!r}")
        if not math.isfinite(w) or w < 0:
            raise ConfigError(f"population.tiers.{name}: proportion must be >= 0, got {w!r}")
    names = list(mix)
    weights = np.array([float(mix[n]) for n in names])
    if weights.sum() <= 0:
        raise ConfigError("population.tiers: all proportions are zero")
    quotas = weights / weights.sum() * n_clients
    counts = np.floor(quotas).astype(np.int64)
    # Leftover clients go to the largest fractional parts; the stable sort breaks ties by mix order.
    leftover = n_clients - int(counts.sum())
    counts[np.argsort(-(quotas - counts), kind="stable")[:leftover]] += 1
    assigned = np.repeat(np.array(names, dtype=object), counts)
    return [str(t) for t in assigned[rng.permutation(n_clients)]]
