"""Cross-section config rules, in one place: what one section's value means for another's.

Every section checks its own keys as the config loads (config.py). The rules here relate the
sections to each other, to the model the config names and to the backend a run goes to:

- `config.config_rules(cfg)`: rules that need the config only (a selection stage needs a method
  that supports it; heterogeneous ranks stay within `lora.rank`). They live in config.py because
  `Config.check` runs them, so no loaded config breaks them.
- `model_rules(cfg)`: the dataset and model names, LoRA ranks against the targeted layers'
  shapes, split cut points against the model's depth. Model sizes come from
  `hetfl.models.facts` (config.json or declared sizes): nothing is built or loaded.
- `method_rules(cfg, method)`: what the method object (built cheaply from its factory, no
  scenario) declares it can do (`schedule`, `calls_server`, `supports_selection`).
- `backend_rules(cfg, method, backend)`: what `--backend flower` cannot carry.

`validate(cfg, backend)` runs them all (after the device population, which is config too) and
raises `ConfigError` for the first problem, one line naming its key. `hetfl validate` and
`hetfl run` call it before any model loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from hetfl.config import selection_rule
from hetfl.errors import ConfigError

if TYPE_CHECKING:
    from hetfl.config import Config
    from hetfl.models.facts import ModelFacts

Problem = tuple[str, str]  # (dotted key, message)
BACKENDS = ("sim", "flower")


# ----------------------------------------------------------------------------- data and model


def data_rules(cfg: "Config") -> Iterator[Problem]:
    """`data.name` is a registered dataset or an existing local instruction file or folder."""
    from hetfl.registry import DATASETS
    from hetfl.scenario import dataset_kind

    name, kind = cfg.data.name, dataset_kind(cfg.data.name)
    if kind == "instruct-file":
        if not Path(name).expanduser().exists():
            yield "data.name", (f"{name}: no such file or folder (an Alpaca/Dolly .json/.jsonl file or a folder "
                                "of Natural Instructions task files)")
        return
    if kind not in DATASETS:
        known = ", ".join(n for n in DATASETS.names() if n != "instruct-file")
        yield "data.name", (f"unknown dataset '{name}' (choose from: {known}; or a local Alpaca/Dolly .json/.jsonl "
                            "file or a folder of Natural Instructions task files)")
        return
    from hetfl.tasks.regression import SYNTH_MODELS

    if kind in SYNTH_MODELS:  # clustered by construction: the clusters are the teachers
        if cfg.data.clusters < 1:
            yield "data.clusters", f"{kind} needs data.clusters >= 1 (the spec: 2 for linear, 4 for MLP)"
        if cfg.data.cluster_shift != "none":
            yield "data.cluster_shift", f"{kind} defines its own clusters; leave it at 'none'"


def facts_of(cfg: "Config") -> "ModelFacts | None":
    """The facts of the model `cfg` names (None: a dataset hetfl does not know decides).

    Raises:
        ConfigError: `model.name` is nothing `data.name` can train.
    """
    from hetfl.models.facts import UnknownModel, model_facts
    from hetfl.scenario import dataset_kind

    try:
        return model_facts(cfg.model.name, dataset_kind(cfg.data.name), cfg.data.name)
    except UnknownModel as e:
        raise ConfigError(f"model.name: {e}") from None


def lora_rules(cfg: "Config", facts: "ModelFacts") -> Iterator[Problem]:
    """`lora.rank` fits every linear the LoRA targets select (rank <= min(in, out))."""
    lc = cfg.lora
    hit = facts.targeted(lc.targets, lc.regex, lc.exclude)
    if not hit:  # nothing to adapt here (a method without LoRA, or targets for another model)
        return
    layer, (n_in, n_out) = min(hit.items(), key=lambda kv: min(kv[1]))
    bound = min(n_in, n_out)
    if lc.rank > bound:
        yield "lora.rank", (f"rank {lc.rank} is larger than layer {layer} ({n_in} x {n_out}) of model "
                            f"{facts.name} (hidden {facts.hidden}); use <= {bound}")


def split_rules(cfg: "Config", facts: "ModelFacts") -> Iterator[Problem]:
    """A split method's model is a staged classifier, and every cut leaves the server a block."""
    m = cfg.method
    if not facts.staged:
        yield "method.name", (f"{m.name} splits the model between client and server, which needs a staged "
                              f"classifier (tiny-vit, tiny-vit-random, minilm, mlp, cnn); model {facts.name} is a "
                              f"{facts.kind}")
        return
    from hetfl.models.split import cut_problem

    depth = facts.depth

    def outside(c: int) -> str | None:
        return cut_problem(c, depth, f"model {facts.name}")

    cut = getattr(m, "cut", "auto")
    if isinstance(cut, int) and outside(cut):
        yield "method.cut", outside(cut)
    tiers = getattr(m, "cut_by_tier", {})
    if tiers:
        from hetfl.system.devices import load_tiers

        known = load_tiers(cfg.population.devices_file)
        for tier, c in tiers.items():
            if tier not in known:
                yield f"method.cut_by_tier.{tier}", f"no device tier '{tier}' (tiers: {', '.join(known)})"
            elif outside(c):
                yield f"method.cut_by_tier.{tier}", outside(c)
    for c in cfg.wireless.cuts:
        if outside(c):
            yield "wireless.cuts", outside(c)
            break
    if getattr(m, "server_tune", None) == "last-k" and m.last_k >= depth:
        yield "method.last_k", f"{m.last_k} must be below the {depth} blocks of model {facts.name}"


def model_rules(cfg: "Config", calls_server: bool = False) -> Iterator[Problem]:
    """Data and model names, LoRA ranks and (for a method that `calls_server`) split cut points."""
    problems = list(data_rules(cfg))
    yield from problems
    if problems:
        return
    facts = facts_of(cfg)
    if facts is None:
        return
    yield from lora_rules(cfg, facts)
    if calls_server:
        yield from split_rules(cfg, facts)


# ----------------------------------------------------------------------------- method and backend


def build_method(cfg: "Config") -> Any:
    """The method object from its registered factory: its declared capabilities, no scenario."""
    from hetfl.registry import METHODS

    return METHODS.get(cfg.method.name, "method.name").factory(cfg, cfg.method)


def method_rules(cfg: "Config", method: Any) -> Iterator[Problem]:
    """What the method declares (`supports_selection`) and what its options need of the data."""
    yield from selection_rule(cfg, method.supports_selection)
    m = cfg.method
    if getattr(m, "num_adaptors", None) == 0 and cfg.data.clusters < 1:
        yield "method.num_adaptors", "0 means data.clusters, which is 0; set method.num_adaptors >= 1 or data.clusters"
    if getattr(m, "router", None) == "oracle" and cfg.data.clusters < 1:
        yield "method.router", "'oracle' needs the true clusters (data.clusters >= 1)"


def backend_rules(cfg: "Config", method: Any, backend: str = "sim") -> Iterator[Problem]:
    """What plain Flower rounds (one message down, one reply up per client) cannot carry: per-batch
    server calls, clients that step together or in turn, data selection, per-client evaluation."""
    if backend != "flower":
        return
    name = cfg.method.name
    if getattr(method, "calls_server", False):
        yield "method.name", (f"{name} makes per-batch server calls (split learning), which plain Flower rounds "
                              "cannot carry; run it with --backend sim")
    elif getattr(method, "schedule", "parallel") != "parallel":
        yield "method.name", (f"{name} needs clients to step together or in a fixed order within a round, which "
                              "plain Flower rounds cannot carry; run it with --backend sim")
    if cfg.selection.name != "none":
        yield "selection.name", (f"{cfg.selection.name}: data selection (two extra exchanges per round) is not "
                                 "supported on Flower yet; run it with --backend sim or set selection.name=none")
    if cfg.data.client_test_fraction > 0:
        yield "data.client_test_fraction", ("per-client evaluation reads each client's test split and private state, "
                                            "which stay on the SuperNodes; run it with --backend sim or set it to 0")
    p = cfg.population
    simulated = [("population.availability", p.availability != "always"), ("population.deadline_s", p.deadline_s),
                 ("population.over_select", p.over_select > 1.0), ("faults", cfg.faults.any),
                 ("server.mode", cfg.server.mode == "async")]
    for key, on in simulated:
        if on:
            yield key, ("a simulated fleet (availability, deadlines, injected faults, asynchronous steps on the "
                        "simulated clock) runs in the simulator only: a dropped client's private state stays on its "
                        "SuperNode; run it with --backend sim")
            break


# ----------------------------------------------------------------------------- all of them


def problems(cfg: "Config", backend: str = "sim", method: Any = None) -> Iterator[Problem]:
    """Every cross-section problem of `cfg` for a run on `backend`, in the order a user fixes them.

    Args:
        cfg: a loaded config (its sections' own checks and `config_rules` passed).
        backend: ``"sim"`` or ``"flower"``.
        method: the method object if one is built already; else one is made from its factory.

    Raises:
        ConfigError: `model.name` is nothing the dataset can train, or the method factory refuses
            its options (each a one-line message naming the key).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")  # a caller's bug: the CLI offers the choices
    method = build_method(cfg) if method is None else method
    yield from model_rules(cfg, calls_server=getattr(method, "calls_server", False))
    yield from method_rules(cfg, method)
    yield from backend_rules(cfg, method, backend)


def validate(cfg: "Config", backend: str = "sim") -> None:
    """Check everything about `cfg` that can be checked without loading a model or data.

    The device population (tiers and their files) first, then every cross-section rule.

    Raises:
        ConfigError: for the first problem, naming its dotted key.
    """
    from hetfl.scenario import build_population

    try:
        population = build_population(cfg)
    except ConfigError as e:
        if cfg.population.capacity_trace is not None and str(e).startswith(str(cfg.population.capacity_trace)):
            raise ConfigError(f"population.capacity_trace: {e}") from None
        raise
    if cfg.population.availability != "always":  # a trace file is read (and checked) before any model loads
        from hetfl.fleet.availability import build_availability

        try:
            build_availability(cfg, population)
        except ConfigError as e:
            msg = str(e)
            raise ConfigError(msg if msg.startswith("population.") else f"population.availability: {msg}") from None
    for key, msg in problems(cfg, backend):
        raise ConfigError(f"{key}: {msg}")
