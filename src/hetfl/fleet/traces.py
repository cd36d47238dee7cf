"""FedScale's device traces: when each client is online, and how fast it computes and talks.

Two layouts, both a mapping keyed by client id, in JSON (``.json``) or a pickle (FedScale ships
``.pkl`` files; anything that is not JSON is read as one):

``client_behave_trace`` (`load_behave_trace`)::

    {client_id: {"active": [t0, t2, ...], "inactive": [t1, t3, ...],
                 "finish_time": cycle length s, "duration": s, "model": str (ignored)}}

    The client is online in [active[i], inactive[i]) of a cycle of ``finish_time`` seconds that
    repeats: simulated time t is read as t mod finish_time.

``client_device_capacity`` (`load_capacity_trace`)::

    {client_id: {"computation": ms per sample, "communication": kbit/s}}

Units. FedScale's ``computation`` is the milliseconds one sample of *inference* takes on the
device (the model it was measured with is not named; FedScale's simulator charges a training
sample about 3x that). hetfl counts a training step's FLOPs, also about 3x a forward pass, so the
3 cancels and the device sustains

    flops_per_s = capacity_ref_flops * 1000 / computation_ms

where ``capacity_ref_flops`` (``population.capacity_ref_flops``, default 6e8, about one
MobileNetV2 forward at 224x224) is the forward FLOPs per sample of the model the trace was
measured on; set it when you know better. ``communication`` in kbit/s becomes
``communication / 1000`` Mbit/s, used for both the up- and the downlink (FedScale has one rate).

Trace clients are mapped onto hetfl's clients by `map_clients`, seeded by the run's seed, so a
behave trace and a capacity trace with the same client ids (as FedScale's are) give every hetfl
client both traces of the same device.

A trace file is untrusted input: pickles go through an unpickler that refuses every global
(class, function), so only plain containers, numbers and strings load. A small synthetic trace
in both layouts ships with the package (``scripts/make_traces.py`` writes it); pass
``packaged:behave_trace.json`` or ``packaged:capacity_trace.json`` instead of a path to use it
(the files live in ``src/hetfl/fleet/assets/``). Relative paths are taken relative to the
current working directory.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import pickle
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from hetfl.errors import ConfigError
from hetfl.seeding import derive_seed

PACKAGED_PREFIX = "packaged:"


@dataclass(frozen=True)
class BehaveTrace:
    """One client's on/off cycle: online in [active[i], inactive[i]) of every ``finish_time`` s."""

    active: tuple[float, ...]
    inactive: tuple[float, ...]
    finish_time: float  # cycle length, s
    duration: float  # FedScale's total online time, s (kept as read; not used for timing)


@dataclass(frozen=True)
class Capacity:
    """One device's measured speed: ms per sample of inference, and link rate in kbit/s."""

    computation_ms: float
    communication_kbps: float


class _RefusedGlobal(Exception):
    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.module, self.name = module, name


class _PlainUnpickler(pickle.Unpickler):
    """Loads only what needs no global: dicts, lists, tuples, numbers, strings, None, bools."""

    def find_class(self, module: str, name: str) -> Any:
        raise _RefusedGlobal(module, name)


def _read_bytes(path: str | Path) -> tuple[str, bytes, bool]:
    """(label for messages, file contents, whether the name says JSON)."""
    text = str(path)
    if text.startswith(PACKAGED_PREFIX):
        name = text[len(PACKAGED_PREFIX):]
        asset = resources.files("hetfl.fleet").joinpath("assets", name)
        try:
            return text, asset.read_bytes(), name.endswith(".json")
        except OSError:
            raise ConfigError(f"{text}: no such packaged trace (shipped: packaged:behave_trace.json, "
                              "packaged:capacity_trace.json)") from None
    try:
        return text, Path(path).read_bytes(), Path(path).suffix.lower() == ".json"
    except OSError as e:
        raise ConfigError(f"{text}: cannot read trace file ({e.strerror})") from None


def load_trace(path: str | Path) -> dict:
    """Read a trace file: JSON, or a pickle through an unpickler that refuses every global.

    Args:
        path: A ``.json`` file, a pickle (any other name; content starting with ``{`` is read as
            JSON too), or ``packaged:<name>`` for a shipped asset.

    Returns:
        The top-level mapping, as stored (keys not converted).

    Raises:
        ConfigError: One line starting with the file name, if the file is missing or unreadable,
            is invalid JSON (with the line), is a pickle that refers to a global or is corrupt, or
            its top level is not a mapping.
    """
    label, data, is_json = _read_bytes(path)
    if is_json or data.lstrip()[:1] == b"{":
        try:
            doc = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(f"{label}: invalid JSON (not UTF-8 at byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{label}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
    else:
        try:
            doc = _PlainUnpickler(io.BytesIO(data)).load()
        except _RefusedGlobal as e:
            raise ConfigError(f"{label}: pickle refers to {e.module}.{e.name}; "
                              "only plain containers and numbers are allowed") from None
        except Exception as e:  # corrupt or truncated pickles raise many types; all mean "not a trace"
            raise ConfigError(f"{label}: not a valid pickle or JSON file ({type(e).__name__}: {e})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{label}: top level must be a mapping of client id -> entry, got {type(doc).__name__}")
    if not doc:
        raise ConfigError(f"{label}: no clients in the trace")
    return doc


def _number(where: str, key: str, raw: object) -> float:
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise ConfigError(f"{where}: {key}: expected a number, got {raw!r}")
    value = float(raw)
    if not math.isfinite(value):
        raise ConfigError(f"{where}: {key}: must be finite, got {raw!r}")
    return value


def _entry(label: str, cid: str, spec: object, keys: tuple[str, ...]) -> tuple[str, dict]:
    where = f"{label}: client {cid}"
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a mapping with {', '.join(keys)}, got {type(spec).__name__}")
    for key in keys:
        if key not in spec:
            raise ConfigError(f"{where}: missing key '{key}'")
    return where, spec


def _times(where: str, key: str, raw: object) -> tuple[float, ...]:
    if not isinstance(raw, (list, tuple)):
        raise ConfigError(f"{where}: {key}: expected a list of times in s, got {type(raw).__name__}")
    values = tuple(_number(where, f"{key}[{i}]", x) for i, x in enumerate(raw))
    for i, v in enumerate(values):
        if v < 0:
            raise ConfigError(f"{where}: {key}[{i}]: must be >= 0 s, got {raw[i]!r}")
    return values


def _parse_behave(where: str, spec: dict) -> BehaveTrace:
    active, inactive = _times(where, "active", spec["active"]), _times(where, "inactive", spec["inactive"])
    finish, duration = _number(where, "finish_time", spec["finish_time"]), _number(where, "duration", spec["duration"])
    if finish <= 0:
        raise ConfigError(f"{where}: finish_time must be > 0 s, got {spec['finish_time']!r}")
    if duration < 0:
        raise ConfigError(f"{where}: duration must be >= 0 s, got {spec['duration']!r}")
    if len(active) != len(inactive):
        raise ConfigError(f"{where}: {len(active)} active times but {len(inactive)} inactive times")
    for i, (a, b) in enumerate(zip(active, inactive)):
        if b <= a:
            raise ConfigError(f"{where}: interval {i} [{a:g}, {b:g}) is empty (inactive must be > active)")
        if i > 0 and a < inactive[i - 1]:
            raise ConfigError(f"{where}: interval {i} [{a:g}, {b:g}) starts before interval {i - 1} ends "
                              f"({inactive[i - 1]:g}); intervals must be increasing and not overlap")
        if b > finish:
            raise ConfigError(f"{where}: interval {i} [{a:g}, {b:g}) runs past finish_time {finish:g}")
    return BehaveTrace(active, inactive, finish, duration)


def load_behave_trace(path: str | Path) -> dict[str, BehaveTrace]:
    """Load and check a trace in FedScale's ``client_behave_trace`` layout.

    Args:
        path: As for `load_trace`.

    Returns:
        Client id (as a string) -> its cycle, in file order.

    Raises:
        ConfigError: As `load_trace`, or ``<file>: client <id>: <problem>`` for a missing key, a
            non-number, a negative time, unequal numbers of active and inactive times, an empty
            interval, intervals that are not increasing or overlap, an interval past finish_time,
            or finish_time <= 0.
    """
    label = str(path)
    keys = ("active", "inactive", "finish_time", "duration")
    return {str(cid): _parse_behave(*_entry(label, str(cid), spec, keys)) for cid, spec in load_trace(path).items()}


def _parse_capacity(where: str, spec: dict) -> Capacity:
    values = {}
    for key, unit in (("computation", "ms/sample"), ("communication", "kbit/s")):
        v = _number(where, key, spec[key])
        if v <= 0:
            raise ConfigError(f"{where}: {key} must be > 0 {unit}, got {spec[key]!r}")
        values[key] = v
    return Capacity(values["computation"], values["communication"])


def load_capacity_trace(path: str | Path) -> dict[str, Capacity]:
    """Load and check a trace in FedScale's ``client_device_capacity`` layout.

    Args:
        path: As for `load_trace`.

    Returns:
        Client id (as a string) -> its capacity, in file order.

    Raises:
        ConfigError: As `load_trace`, or ``<file>: client <id>: <problem>`` for a missing key, a
            non-number, or a zero, negative or non-finite rate.
    """
    label = str(path)
    keys = ("computation", "communication")
    return {str(cid): _parse_capacity(*_entry(label, str(cid), spec, keys)) for cid, spec in load_trace(path).items()}


def _sorted_ids(trace_ids: list[str]) -> list[str]:
    ids = sorted({str(i) for i in trace_ids})
    try:
        return sorted(ids, key=lambda i: (int(i), i))  # numeric; the string breaks ties such as "01" vs "1"
    except ValueError:
        return ids


def map_clients(trace_ids: list[str], num_clients: int, seed: int) -> list[str]:
    """Which trace client each hetfl client follows.

    The ids are sorted first (numerically when all are integers, else as strings), so the file's
    order does not matter; then ``num_clients`` of them are drawn without replacement when the
    trace has enough clients, with replacement otherwise.

    Args:
        trace_ids: The trace's client ids.
        num_clients: Number of hetfl clients.
        seed: The run's root seed (the draw uses ``derive_seed(seed, "trace-map")``).

    Returns:
        Trace client id per hetfl client, length ``num_clients``.

    Raises:
        ConfigError: If the trace has no clients.
    """
    ids = _sorted_ids(trace_ids)
    if not ids:
        raise ConfigError("population: the trace has no clients")
    rng = np.random.default_rng(derive_seed(seed, "trace-map"))
    picks = rng.choice(len(ids), size=num_clients, replace=len(ids) < num_clients)
    return [ids[int(i)] for i in picks]


def capacity_profile(profile: Any, cap: Capacity, ref_flops: float) -> Any:
    """A device profile with the trace's compute speed and link rate (units: module docstring).

    Args:
        profile: The client's tier profile (`hetfl.system.devices.DeviceProfile`); its other
            fields (memory, radio power, clock, kappa) are kept.
        cap: The client's measured capacity.
        ref_flops: Forward FLOPs per sample of the model the trace was measured on.

    Returns:
        ``profile`` with ``flops_per_s = ref_flops * 1000 / computation_ms`` and
        ``up_mbps = down_mbps = communication_kbps / 1000``.
    """
    mbps = cap.communication_kbps / 1000.0
    return dataclasses.replace(profile, flops_per_s=ref_flops * 1000.0 / cap.computation_ms,
                               up_mbps=mbps, down_mbps=mbps)


def capacity_overrides(path: str | Path, tiers: list[str], profiles: dict[str, Any], ref_flops: float,
                       seed: int) -> dict[int, Any]:
    """Per-client device profiles from a capacity trace (`population.capacity_trace`).

    Args:
        path: The trace, as for `load_trace`.
        tiers: Tier name per hetfl client.
        profiles: Tier name -> profile.
        ref_flops: ``population.capacity_ref_flops``.
        seed: The run's root seed (`map_clients`).

    Returns:
        Client id -> its `capacity_profile`, for every client.
    """
    caps = load_capacity_trace(path)
    ids = map_clients(list(caps), len(tiers), seed)
    return {cid: capacity_profile(profiles[tier], caps[ids[cid]], ref_flops) for cid, tier in enumerate(tiers)}
