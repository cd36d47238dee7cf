"""Config -> model, task, client data partitions and device population.

The only place that wires data/, models/ and system/ together before a run. The server side
of a run receives the scenario's model, task (with the server's own held-out evaluation set)
and population, but client data only ever reaches `ClientContext.data`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hetfl.config import Config
from hetfl.engine.api import derive_seed
from hetfl.errors import ConfigError


@dataclass
class Population:
    """Who the clients are: one device tier per client and the tier profiles."""

    tiers: list[str]  # tier name per client id
    profiles: dict[str, Any]  # tier name -> DeviceProfile

    def device(self, cid: int):
        return self.profiles[self.tiers[cid]]

    def __len__(self) -> int:
        return len(self.tiers)


@dataclass
class Scenario:
    cfg: Config
    model: torch.nn.Module  # the one model object (frozen base); methods add their trainable parts
    tokenizer: Any
    task: Any
    client_data: list[list]  # per client: encoded local samples (client side only)
    client_labels: list[list[int]]  # per client: category index of each sample (for reports)
    categories: list[str]
    population: Population

    @property
    def num_clients(self) -> int:
        return len(self.client_data)


def build_population(cfg: Config) -> Population:
    from hetfl.system.devices import assign_tiers, load_tiers

    profiles = load_tiers(cfg.population.devices_file)
    rng = np.random.default_rng(derive_seed(cfg.seed, "population"))
    tiers = assign_tiers(cfg.population.num_clients, cfg.population.tiers, profiles, rng)
    return Population(tiers, profiles)


def _instruction_data(cfg: Config):
    """(train examples, eval examples) for synth-instruct or a local instruction file."""
    from hetfl.data import instruct

    d = cfg.data
    if d.name == "synth-instruct":
        train = instruct.make_synth_instruct(d.samples_per_family, derive_seed(cfg.seed, "data", "train"),
                                             instruct.TRAIN_FAMILIES)
        per_family = -(-d.eval_samples // len(instruct.HELDOUT_FAMILIES))
        held = instruct.make_synth_instruct(per_family, derive_seed(cfg.seed, "data", "eval"),
                                            instruct.HELDOUT_FAMILIES)
        rng = np.random.default_rng(derive_seed(cfg.seed, "data", "eval-pick"))
        held = [held[i] for i in sorted(rng.permutation(len(held))[: d.eval_samples])]
        return train, held
    if Path(d.name).suffix in (".json", ".jsonl"):
        rows = instruct.load_instruction_file(d.name)
        if d.eval_categories:
            missing = set(d.eval_categories) - {r.category for r in rows}
            if missing:
                raise ConfigError(f"data.eval_categories: {sorted(missing)} not found in {d.name}")
            held = [r for r in rows if r.category in d.eval_categories][: d.eval_samples]
            train = [r for r in rows if r.category not in d.eval_categories]
        else:
            rng = np.random.default_rng(derive_seed(cfg.seed, "data", "eval-pick"))
            perm = rng.permutation(len(rows))
            n_eval = min(d.eval_samples, max(1, len(rows) // 5))
            held = [rows[i] for i in sorted(perm[:n_eval])]
            train = [rows[i] for i in sorted(perm[n_eval:])]
        if not train or not held:
            raise ConfigError(f"data.name: {d.name} has too few rows for a train and an eval split")
        return train, held
    raise ConfigError(f"data.name: unknown dataset {d.name!r} (synth-instruct, or a local .json/.jsonl file)")


def build_scenario(cfg: Config) -> Scenario:
    """Build everything a run needs from a validated config."""
    from hetfl.data.partition import partition
    from hetfl.models.builders import load_causal_lm
    from hetfl.tasks.instruct import InstructTask

    population = build_population(cfg)  # cheap checks first: bad tiers fail before the model loads
    train, held = _instruction_data(cfg)
    model, tok = load_causal_lm(cfg.model.name, seed=derive_seed(cfg.seed, "model-init") % 2**31)
    for p in model.parameters():
        p.requires_grad_(False)
    task = InstructTask(tok, cfg.data.max_len, held, cfg.eval.max_new_tokens, cfg.eval.batch_size)

    categories = sorted({e.category for e in train})
    labels = np.array([categories.index(e.category) for e in train])
    rng = np.random.default_rng(derive_seed(cfg.seed, "partition"))
    parts = partition(cfg.data.partition.replace("-", "_"), labels, cfg.population.num_clients, rng,
                      alpha=cfg.data.alpha, k=cfg.data.k)
    encoded = task.encode(train)
    client_data = [[encoded[i] for i in idx] for idx in parts]
    client_labels = [[int(labels[i]) for i in idx] for idx in parts]
    empty = [c for c, d in enumerate(client_data) if not d]
    if empty:
        raise ConfigError(f"data.partition: clients {empty[:5]} received no data; use fewer clients or more samples")
    return Scenario(cfg, model, tok, task, client_data, client_labels, categories, population)
