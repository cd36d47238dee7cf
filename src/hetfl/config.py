"""YAML in, frozen typed dataclasses out.

Every key is checked against the dataclass that owns it: unknown keys, wrong types and
impossible values raise `ConfigError` naming the dotted key path, before any model loads.
Defaults live in the dataclasses only. The `method` section is typed by the method's own
config class, looked up in the registry by `method.name`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping

import yaml

from hetfl.comm.codecs import codec_problem
from hetfl.errors import ConfigError
from hetfl.registry import METHODS, SELECTORS
from hetfl.system.wireless import WirelessConfig


@dataclass(frozen=True)
class ModelConfig:
    name: str = "tiny-llama"  # shipped name or a local Hugging Face folder

    def check(self) -> Iterator[tuple[str, str]]:
        if self.name == "smollm2-135m":  # the optional real-model tier: its package must be installed
            from hetfl.models.smollm2 import missing  # no torch import: validation stays cheap

            reason = missing()
            if reason:
                yield "name", reason


@dataclass(frozen=True)
class DataConfig:
    name: str = "synth-instruct"  # or a local Alpaca/Dolly .json/.jsonl file
    samples_per_family: int = 40  # synth-instruct: training examples generated per family
    eval_samples: int = 48  # held-out examples for global evaluation
    client_test_fraction: float = 0.0  # share of each client's data kept for per-client eval
    eval_categories: tuple[str, ...] = ()  # local files: categories held out for evaluation
    partition: Literal["iid", "dirichlet", "pathological", "task-per-client"] = "dirichlet"
    alpha: float = 0.5
    k: int = 2
    max_len: int = 96
    clusters: int = 0  # latent client clusters (client i in cluster i mod C); 0: none
    cluster_shift: Literal["none", "rotate", "label-shift"] = "none"  # the concept shift per cluster
    fraction: float = 1.0  # share of each client's training split kept (at least 10 samples)

    def check(self) -> Iterator[tuple[str, str]]:
        if self.samples_per_family < 1:
            yield "samples_per_family", "must be >= 1"
        if self.eval_samples < 1:
            yield "eval_samples", "must be >= 1"
        if not 0.0 <= self.client_test_fraction < 1.0:
            yield "client_test_fraction", "must be in [0, 1)"
        if self.alpha <= 0:
            yield "alpha", "must be > 0"
        if self.k < 1:
            yield "k", "must be >= 1"
        if self.max_len < 16:
            yield "max_len", "must be >= 16"
        if self.clusters < 0:
            yield "clusters", "must be >= 0 (0: no clusters)"
        if self.cluster_shift != "none" and self.clusters < 1:
            yield "cluster_shift", f"'{self.cluster_shift}' needs data.clusters >= 1"
        if not 0.0 < self.fraction <= 1.0:
            yield "fraction", "must be in (0, 1]"


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    regex: str | None = None
    exclude: tuple[str, ...] = ()
    dropout: float = 0.0

    def check(self) -> Iterator[tuple[str, str]]:
        if self.rank < 1:
            yield "rank", "must be >= 1"
        if self.alpha <= 0:
            yield "alpha", "must be > 0"
        if not 0.0 <= self.dropout < 1.0:
            yield "dropout", "must be in [0, 1)"


@dataclass(frozen=True)
class TrainConfig:
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    momentum: float = 0.0
    weight_decay: float = 0.0
    local_steps: int = 10
    batch_size: int = 8
    epochs: float = 0.0  # > 0: local passes over the client's (selected) data instead of local_steps

    def steps_for(self, num_samples: int) -> int:
        """Local optimiser steps for a client holding `num_samples` samples this round."""
        if self.epochs <= 0:
            return self.local_steps
        return max(1, math.ceil(self.epochs * num_samples / self.batch_size))

    def check(self) -> Iterator[tuple[str, str]]:
        if self.epochs < 0:
            yield "epochs", "must be >= 0 (0: use local_steps)"
        if self.lr <= 0:
            yield "lr", "must be > 0"
        if not 0.0 <= self.momentum < 1.0:
            yield "momentum", "must be in [0, 1)"
        if self.weight_decay < 0:
            yield "weight_decay", "must be >= 0"
        if self.local_steps < 1:
            yield "local_steps", "must be >= 1"
        if self.batch_size < 1:
            yield "batch_size", "must be >= 1"


@dataclass(frozen=True)
class PopulationConfig:
    num_clients: int = 20
    clients_per_round: int = 5
    # Share of clients per device tier (normalised); tiers come from system/devices.yaml.
    tiers: dict[str, float] = field(
        default_factory=lambda: {"phone-low": 0.3, "phone-mid": 0.3, "phone-high": 0.2, "laptop": 0.2}
    )
    devices_file: str | None = None  # a user YAML of device tiers replacing the shipped ones
    # Who is online when (fleet/availability.py): `always`, `diurnal` (per-tier hourly probabilities
    # from the device file's `diurnal:` section), or {trace: FILE} in FedScale's client_behave_trace layout.
    availability: str | dict[str, str] = "always"
    # Per-client compute speed and link rate in FedScale's client_device_capacity layout (JSON or pickle),
    # replacing the tier constants; `capacity_ref_flops` converts its ms/sample into FLOP/s.
    capacity_trace: str | None = None
    capacity_ref_flops: float = 6.0e8
    deadline_s: float | None = None  # the server closes a round at this simulated time; later clients are late
    over_select: float = 1.0  # sample ceil(over_select * clients_per_round), aggregate the first clients_per_round
    # The simulator's memory for the clients' private states (Ditto's personal models, FLoRAL's logits, a
    # personal tail): up to this many MiB stay in memory, the least recently used beyond it are spilled to
    # disk (engine/states.py). Results do not depend on it; 0: all in memory.
    state_memory_mb: float = 1024.0

    def check(self) -> Iterator[tuple[str, str]]:
        if self.num_clients < 1:
            yield "num_clients", "must be >= 1"
        if isinstance(self.availability, str) and self.availability not in ("always", "diurnal"):
            yield "availability", f"{self.availability!r} is not one of 'always', 'diurnal', or {{trace: FILE}}"
        elif isinstance(self.availability, dict) and set(self.availability) != {"trace"}:
            yield "availability", "a mapping must be {trace: FILE} (FedScale client_behave_trace layout)"
        if self.capacity_ref_flops <= 0 or not math.isfinite(self.capacity_ref_flops):
            yield "capacity_ref_flops", "must be a positive number of FLOPs per sample"
        if self.deadline_s is not None and not (self.deadline_s > 0 and math.isfinite(self.deadline_s)):
            yield "deadline_s", f"must be a positive number of seconds, got {self.deadline_s}"
        if not (self.state_memory_mb >= 0 and math.isfinite(self.state_memory_mb)):
            yield "state_memory_mb", "must be >= 0 (0: every client state in memory)"
        if not (1.0 <= self.over_select <= 10.0):
            yield "over_select", f"must be in [1, 10], got {self.over_select}"
        if self.clients_per_round < 1:
            yield "clients_per_round", "must be >= 1"
        elif self.clients_per_round > self.num_clients:
            yield "clients_per_round", (
                f"{self.clients_per_round} sampled clients per round but only "
                f"{self.num_clients} clients (population.num_clients)"
            )
        if not self.tiers:
            yield "tiers", "needs at least one device tier"


@dataclass(frozen=True)
class CommConfig:
    up: str = "fp32"  # codec for client -> server messages
    down: str = "fp32"  # codec for server -> client messages
    # message kind -> codec, overriding up/down for that kind, e.g. {activations: sq8, grad_cut: fp16}
    by_kind: dict[str, str] = field(default_factory=dict)

    def check(self) -> Iterator[tuple[str, str]]:
        named = [("up", self.up), ("down", self.down)] + [(f"by_kind.{k}", v) for k, v in self.by_kind.items()]
        for key, name in named:
            problem = codec_problem(name)
            if problem is not None:
                yield key, problem


@dataclass(frozen=True)
class EvalConfig:
    every: int = 1  # evaluate every N rounds (and always after the last)
    max_new_tokens: int = 12
    batch_size: int = 48
    at_start: bool = True  # evaluate the untouched base model as round 0
    # `test`: the held-out evaluation set; `validation`: a share (`val_fraction`) of every
    # client's training data, held out from training (what `hetfl tune` selects on)
    split: Literal["test", "validation"] = "test"
    val_fraction: float = 0.1

    def check(self) -> Iterator[tuple[str, str]]:
        if self.every < 1:
            yield "every", "must be >= 1"
        if self.max_new_tokens < 1:
            yield "max_new_tokens", "must be >= 1"
        if self.batch_size < 1:
            yield "batch_size", "must be >= 1"
        if not 0.0 < self.val_fraction < 1.0:
            yield "val_fraction", "must be in (0, 1)"


@dataclass(frozen=True)
class ServerConfig:
    """How the server combines replies (engine/robust.py) and when (synchronous rounds or FedBuff)."""

    mode: Literal["sync", "async"] = "sync"
    aggregator: Literal["mean", "median", "trimmed-mean", "norm-clip"] = "mean"
    trim_beta: float = 0.1  # trimmed-mean: share cut from each end per coordinate
    clip_norm: float = 1.0  # norm-clip: each update's L2 norm is clipped to this
    concurrency: int = 0  # async: clients training at once (0: population.clients_per_round)
    buffer: int = 0  # async: updates per server step (0: population.clients_per_round)

    def check(self) -> Iterator[tuple[str, str]]:
        if not 0.0 <= self.trim_beta < 0.5:
            yield "trim_beta", f"must be in [0, 0.5), got {self.trim_beta}"
        if not (self.clip_norm > 0 and math.isfinite(self.clip_norm)):
            yield "clip_norm", f"must be a positive number, got {self.clip_norm}"
        if self.concurrency < 0:
            yield "concurrency", "must be >= 0 (0: population.clients_per_round)"
        if self.buffer < 0:
            yield "buffer", "must be >= 0 (0: population.clients_per_round)"


@dataclass(frozen=True)
class FaultsConfig:
    """Faults injected on purpose (fleet/faults.py); every draw depends on (seed, round, client) only."""

    dropout: float = 0.0  # probability per client and round of dropping at a random point of its work
    straggler: float = 0.0  # probability per client and round of being slowed down
    straggler_mu: float = 1.0  # a straggler's time is multiplied by LogNormal(mu, sigma) (median e^mu)
    straggler_sigma: float = 0.5
    corrupt: float = 0.0  # probability per client and round of a NaN or Inf update
    byzantine: float = 0.0  # share of clients (a fixed set per seed) that send hostile updates
    byzantine_mode: Literal["sign-flip", "scale", "random"] = "sign-flip"
    byzantine_scale: float = 1.0  # sign-flip: -scale * update; scale: scale * update; random: noise of scale x its norm

    def check(self) -> Iterator[tuple[str, str]]:
        for name in ("dropout", "straggler", "corrupt", "byzantine"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                yield name, f"must be a probability in [0, 1], got {v}"
        if not (self.straggler_sigma >= 0 and math.isfinite(self.straggler_sigma)):
            yield "straggler_sigma", f"must be >= 0, got {self.straggler_sigma}"
        if not math.isfinite(self.straggler_mu):
            yield "straggler_mu", "must be finite"
        if not (self.byzantine_scale > 0 and math.isfinite(self.byzantine_scale)):
            yield "byzantine_scale", f"must be a positive number, got {self.byzantine_scale}"

    @property
    def any(self) -> bool:
        return any((self.dropout, self.straggler, self.corrupt, self.byzantine))


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's config; each method registers a subclass with its own options."""

    name: str = "fedit"


@dataclass(frozen=True)
class SelectionConfig:
    """Base of every data-selection stage's config (`selection.name`); `none` trains on all data."""

    name: str = "none"


@dataclass(frozen=True)
class Config:
    name: str = "run"
    description: str = ""
    seed: int = 0
    seeds: tuple[int, ...] = ()  # `hetfl compare` runs every method once per seed (empty: `seed` only)
    rounds: int = 10
    checkpoint_every: int = 1
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    population: PopulationConfig = field(default_factory=PopulationConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wireless: WirelessConfig = field(default_factory=WirelessConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)

    def check(self) -> Iterator[tuple[str, str]]:
        if self.rounds < 1:
            yield "rounds", "must be >= 1"
        if self.checkpoint_every < 1:
            yield "checkpoint_every", "must be >= 1"
        if self.seed < 0:
            yield "seed", "must be >= 0"
        if any(s < 0 for s in self.seeds):
            yield "seeds", "every seed must be >= 0"
        if len(set(self.seeds)) != len(self.seeds):
            yield "seeds", "seeds must be distinct"
        yield from config_rules(self)  # selection x method, aggregator x method, rank ranges x lora.rank


# ----------------------------------------------------------------------------- cross-section rules


def selection_rule(cfg: Config, supports_selection: bool) -> Iterator[tuple[str, str]]:
    """A selection stage needs a method that trains whole copies of the global model on the client's
    data (`supports_selection`: it loads its down message with `load` before selection runs)."""
    if cfg.selection.name == "none" or supports_selection:
        return
    ok = ", ".join(n for n in METHODS.names() if METHODS.get(n).factory.supports_selection)
    yield "selection.name", (f"{cfg.selection.name} cannot combine with method {cfg.method.name} (data selection "
                             f"needs a parameter-averaging method: {ok}); set selection.name=none")


def robust_rule(cfg: Config, robust_aggregation: bool) -> Iterator[tuple[str, str]]:
    """A robust `server.aggregator` needs a method that averages its updates through the helpers that
    honour it (`robust_aggregation`)."""
    if cfg.server.aggregator == "mean" or robust_aggregation:
        return
    ok = ", ".join(n for n in METHODS.names() if METHODS.get(n).factory.robust_aggregation)
    yield "server.aggregator", (f"{cfg.server.aggregator} cannot combine with method {cfg.method.name} (robust "
                                f"aggregation is implemented by: {ok}); set server.aggregator=mean")


def fleet_rules(cfg: Config, robust_aggregation: bool) -> Iterator[tuple[str, str]]:
    """Asynchronous aggregation weights and applies updates as they arrive: it needs a method whose
    replies are updates that `aggregate` averages (`robust_aggregation`), and it has no rounds for a
    deadline or over-selection to act on."""
    if cfg.server.mode != "async":
        return
    if not robust_aggregation:
        ok = ", ".join(n for n in METHODS.names() if METHODS.get(n).factory.robust_aggregation)
        yield "server.mode", (f"async cannot combine with method {cfg.method.name} (buffered asynchronous "
                              f"aggregation needs an update-averaging method: {ok}); set server.mode=sync")
    p, s = cfg.population, cfg.server
    if p.deadline_s is not None or p.over_select > 1.0:
        yield "server.mode", "async has no rounds to close: unset population.deadline_s and population.over_select"
    c, k = s.concurrency or p.clients_per_round, s.buffer or p.clients_per_round
    if c > p.num_clients:
        yield "server.concurrency", f"{c} clients in flight but only {p.num_clients} clients (population.num_clients)"
    if k > c:
        yield "server.buffer", f"{k} updates per step exceed the {c} clients in flight (server.concurrency)"


def config_rules(cfg: Config) -> Iterator[tuple[str, str]]:
    """Rules between sections that need nothing but the config (run by `Config.check`); the rules
    that need the model's facts or the backend are in hetfl/validation.py."""
    yield from selection_rule(cfg, METHODS.get(cfg.method.name).factory.supports_selection)
    yield from robust_rule(cfg, METHODS.get(cfg.method.name).factory.robust_aggregation)
    yield from fleet_rules(cfg, METHODS.get(cfg.method.name).factory.robust_aggregation)
    m, r = cfg.method, cfg.lora.rank
    rank_high = getattr(m, "rank_high", 0)  # heterogeneous-rank methods: k_i <= the global rank
    if rank_high > r:
        yield "method.rank_high", f"{rank_high} exceeds the global rank lora.rank={r}"
    rank_low = getattr(m, "rank_low", 1)
    if rank_low > r:
        yield "method.rank_low", f"{rank_low} exceeds the global rank lora.rank={r}"
    elif not rank_high and getattr(m, "rank_dist", "ratios") != "ratios" and rank_low > max(1, r // 2):
        yield "method.rank_low", (f"{rank_low} exceeds the default rank_high (half of lora.rank={r}: "
                                  f"{max(1, r // 2)}); set method.rank_high")


# ----------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it in canonical form."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return build(tp, value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {_coerce(k, args[0], key): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e-05 (no dot) as a string: take the number
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
            if not math.isfinite(value):
                raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} at {key}")  # a bug in hetfl, not user input


def build(cls: type, raw: Mapping[str, Any], prefix: str = "") -> Any:
    """Build the frozen dataclass `cls` from a raw mapping, checking every key and value.

    Args:
        cls: a dataclass type whose fields are annotated with supported types.
        raw: the mapping (from YAML).
        prefix: dotted key path of this section, used in error messages.

    Returns:
        An instance of `cls`.

    Raises:
        ConfigError: naming the dotted key of the first problem found.
    """
    dot = f"{prefix}." if prefix else ""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in names:
            raise ConfigError(f"{dot}{k}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if cls is Config and f.name in NAMED_SECTIONS:  # typed by the registered entry's own config class
            kwargs[f.name] = build_named_section(f.name, raw.get(f.name, {}))
            continue
        if f.name not in raw:
            continue
        else:
            kwargs[f.name] = _coerce(raw[f.name], hints[f.name], f"{dot}{f.name}")
    obj = cls(**kwargs)
    for key, msg in getattr(obj, "check", lambda: ())():
        raise ConfigError(f"{dot}{key}: {msg}")
    return obj


NAMED_SECTIONS = ("method", "selection")  # sections whose options depend on their `name`


def _section_registry(section: str):
    return {"method": METHODS, "selection": SELECTORS}[section]


def build_named_section(section: str, raw: Any) -> Any:
    """Build `method:` or `selection:` with the config class registered under its `name`."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{section}: expected a mapping with at least 'name'")
    default = {"method": MethodConfig.name, "selection": SelectionConfig.name}[section]
    spec = _section_registry(section).get(raw.get("name", default), f"{section}.name")
    return build(spec.config_cls, raw, section)


def set_dotted(raw: dict, dotted: str, value: Any) -> None:
    """Set `raw[a][b][c] = value` for `dotted = "a.b.c"`, creating sections as needed."""
    parts = dotted.split(".")
    node = raw
    for i, p in enumerate(parts[:-1]):
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{'.'.join(parts[: i + 1])}: is not a section, cannot set {dotted}")
        node = nxt
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one `--set key.path=value`; the value is read as YAML (so 3 is an int, [a, b] a list)."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected key.path=value")
    key, _, val = text.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text}: empty key")
    try:
        return key, yaml.safe_load(val) if val.strip() else ""
    except yaml.YAMLError:
        return key, val


def _drop_foreign_keys(raw: dict, section: str) -> None:
    """After `--set method.name=X`, forget the preset's options that X does not have."""
    reg = _section_registry(section)
    sec = raw.get(section)
    if not isinstance(sec, dict) or "name" not in sec or sec["name"] not in reg.names():
        return
    known = {f.name for f in dataclasses.fields(reg.get(sec["name"]).config_cls)}
    for k in [k for k in sec if k not in known]:
        del sec[k]


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; errors name the file (and line for syntax errors)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such config file")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: top level must be a mapping of keys")
    return raw


def load_config(source: str | Path | Mapping, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """Resolve a preset name, YAML path or raw mapping plus `--set` overrides into a Config.

    Args:
        source: a shipped preset name (see `hetfl list`), a YAML file path, or a mapping.
        overrides: strings `key.path=value`.

    Returns:
        The validated, frozen Config.

    Raises:
        ConfigError: on any unknown key, wrong type or impossible value.
    """
    if isinstance(source, Mapping):
        raw = copy.deepcopy(dict(source))
    else:
        raw = read_yaml(resolve_preset(str(source)))
    per_method = raw.pop("per_method", None)
    swapped, set_keys = set(), set()
    for text in overrides:
        key, val = parse_override(text)
        set_dotted(raw, key, val)
        set_keys.add(key)
        if key in ("method.name", "selection.name"):
            swapped.add(key.split(".")[0])
    for section in swapped:
        _drop_foreign_keys(raw, section)
    if per_method is not None:
        _apply_per_method(raw, per_method, set_keys)
    return build(Config, raw)


def _apply_per_method(raw: dict, per_method: Any, set_keys: set[str]) -> None:
    """`per_method: {fedit: {lora.rank: 4}}`: values a scenario gives one method when it runs
    (e.g. the rank that meets the others' upload budget). An explicit `--set` of a key wins."""
    if not isinstance(per_method, Mapping):
        raise ConfigError(f"per_method: expected a mapping of method names to {{key.path: value}}, got {per_method!r}")
    known = _section_registry("method").names()
    for name, values in per_method.items():
        if name not in known:
            raise ConfigError(f"per_method.{name}: unknown method (known: {', '.join(sorted(known))})")
        if not isinstance(values, Mapping):
            raise ConfigError(f"per_method.{name}: expected a mapping of key.path: value")
    method = (raw.get("method") or {}).get("name", MethodConfig.name)
    for key, val in (per_method.get(method) or {}).items():
        if key not in set_keys:
            set_dotted(raw, str(key), copy.deepcopy(val))


def resolve_preset(name_or_path: str) -> Path:
    """Map a preset name to its shipped YAML; pass file paths through."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    shipped = preset_dir() / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    names = ", ".join(preset_names())
    raise ConfigError(f"{name_or_path}: not a config file or a shipped preset (presets: {names})")


def preset_dir() -> Path:
    return Path(__file__).parent / "presets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in preset_dir().glob("*.yaml"))


def to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config (tuples become lists) for YAML dumps."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()} if not isinstance(cfg, dict) else cfg


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def read_tuned(path: str | Path) -> dict[str, dict[str, Any]]:
    """A tuned-values file, as `hetfl tune` writes it: method name -> {dotted key: value}."""
    raw = read_yaml(path)
    for method, values in raw.items():
        if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
            raise ConfigError(f"{path}: '{method}' must map dotted keys to values (e.g. train.lr: 0.001)")
    return raw


def tuned_overrides(path: str | Path, method: str) -> list[str]:
    """`--set`-style overrides for `method` (or a `compare` label) from a tuned-values file (`--set-file`)."""
    import json

    tuned = read_tuned(path)
    if method not in tuned:
        raise ConfigError(f"--set-file {path}: no values for method '{method}' (it has: {', '.join(tuned) or 'none'})")
    return [f"{k}={json.dumps(v)}" for k, v in tuned[method].items()]
