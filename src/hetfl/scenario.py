"""Config -> model, task, client data partitions and device population.

The only place that wires data/, models/ and system/ together before a run. The server side
of a run receives the scenario's model, task (with the server's own held-out evaluation set)
and population, but client data only ever reaches `ClientContext.data`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hetfl.config import Config
from hetfl.errors import ConfigError
from hetfl.registry import DATASETS
from hetfl.seeding import derive_seed
from hetfl.tasks.base import TaskData


def _shipped_server():
    from hetfl.system.devices import load_server

    return load_server()


@dataclass
class Population:
    """Who the clients are: one device tier per client, the tier profiles, and per-client
    profiles that replace the tier's (`population.capacity_trace`)."""

    tiers: list[str]  # tier name per client id
    profiles: dict[str, Any]  # tier name -> DeviceProfile
    server: Any = field(default_factory=_shipped_server)  # ServerProfile: the server of split methods
    overrides: dict[int, Any] = field(default_factory=dict)  # client id -> its own DeviceProfile

    def device(self, cid: int):
        if cid in self.overrides:
            return self.overrides[cid]
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
    client_labels: list[list[int]]  # per client: label/category index of each sample (for reports)
    categories: list[str]
    population: Population
    client_test: list[list] | None = None  # per client: local test samples (per-client evaluation; with
    # eval.split = validation, the client's validation share instead)
    client_clusters: list[int] | None = None  # per client: latent cluster id (data.clusters > 0)
    validation: list | None = None  # eval.split = validation: samples held out of the clients' training data
    channels: Any = None  # wireless.enabled: the clients' channel gains to the edge servers, drawn once per run

    @property
    def num_clients(self) -> int:
        return len(self.client_data)


def build_population(cfg: Config) -> Population:
    from hetfl.system.devices import assign_tiers, load_server, load_tiers

    profiles = load_tiers(cfg.population.devices_file)
    rng = np.random.default_rng(derive_seed(cfg.seed, "population"))
    tiers = assign_tiers(cfg.population.num_clients, cfg.population.tiers, profiles, rng)
    overrides = {}
    if cfg.population.capacity_trace is not None:  # measured speeds and link rates replace the tier constants
        from hetfl.fleet.traces import capacity_overrides

        overrides = capacity_overrides(cfg.population.capacity_trace, tiers, profiles,
                                       cfg.population.capacity_ref_flops, cfg.seed)
    return Population(tiers, profiles, load_server(cfg.population.devices_file), overrides)


def dataset_kind(name: str) -> str:
    """Registry key for `data.name`: local instruction files (Alpaca/Dolly .json/.jsonl, or a
    folder of Natural Instructions task files) share one builder."""
    p = Path(name)
    return "instruct-file" if p.suffix in (".json", ".jsonl") or p.is_dir() else name


def build_scenario(cfg: Config) -> Scenario:
    """Build everything a run needs from a validated config."""
    from hetfl.data.partition import partition

    population = build_population(cfg)  # cheap checks first: bad tiers fail before the model loads
    td: TaskData = DATASETS.get(dataset_kind(cfg.data.name), "data.name")(cfg)
    for p in td.model.parameters():
        p.requires_grad_(False)
    rng = np.random.default_rng(derive_seed(cfg.seed, "partition"))
    parts = partition(cfg.data.partition.replace("-", "_"), td.labels, cfg.population.num_clients, rng,
                      alpha=cfg.data.alpha, k=cfg.data.k)
    client_test = None
    if cfg.data.client_test_fraction > 0:  # a test split per client, with the client's own label mix
        split_rng = np.random.default_rng(derive_seed(cfg.seed, "client-test"))
        train_parts, client_test = [], []
        for idx in parts:
            idx = split_rng.permutation(idx)
            n_test = int(round(len(idx) * cfg.data.client_test_fraction))
            client_test.append([td.samples[i] for i in sorted(idx[:n_test])])
            train_parts.append(np.sort(idx[n_test:]))
        parts = train_parts
    if cfg.data.fraction < 1.0:  # reduced-data variants: keep a share of each training split
        from hetfl.data.clusters import keep_fraction

        frac_rng = np.random.default_rng(derive_seed(cfg.seed, "data-fraction"))
        parts = [keep_fraction(idx, cfg.data.fraction, frac_rng) for idx in parts]
    client_data = [[td.samples[i] for i in idx] for idx in parts]
    client_labels = [[int(td.labels[i]) for i in idx] for idx in parts]
    empty = [c for c, d in enumerate(client_data) if not d]
    if empty:
        raise ConfigError(f"data.partition: clients {empty[:5]} received no data; use fewer clients or more samples")
    clusters = None
    if cfg.data.clusters > 0 or td.cluster_transform is not None:
        client_data, client_test, clusters = _apply_clusters(cfg, td, client_data, client_test)
    validation = None
    if cfg.eval.split == "validation":  # tuning: evaluate on held-out training data, never on a test set
        client_data, client_labels, validation = carve_validation(client_data, client_labels, cfg.eval.val_fraction,
                                                                  derive_seed(cfg.seed, "validation"))
        if client_test is not None:  # personalised scenarios: each client's own validation share
            client_test = validation
        validation = [x for v in validation for x in v]
    channels = None
    if cfg.wireless.enabled:  # one draw, which the cost model and a method's radio allocation share
        from hetfl.system.wireless import draw_channels

        channels = draw_channels(cfg.wireless, len(client_data), seed=cfg.seed)
    return Scenario(cfg, td.model, td.tokenizer, td.task, client_data, client_labels, td.categories, population,
                    client_test, clusters, validation, channels)


def carve_validation(client_data: list[list], client_labels: list[list[int]], fraction: float, seed: int):
    """Hold out `fraction` of every client's training samples (at least one, never its last) as a
    validation set, so settings are chosen without touching the evaluation set.

    The pooled set stands for what the clients would evaluate locally and report as numbers
    (for mean metrics such as accuracy the pooled value equals the example-weighted mean of
    theirs). Returns (client_data, client_labels, validation), the first two without the
    held-out samples, the last one list of held-out samples per client.
    """
    rng = np.random.default_rng(seed)
    data, labels, val = [], [], []
    for d, lab in zip(client_data, client_labels):
        n_val = min(max(1, int(round(len(d) * fraction))), len(d) - 1)
        held = set(rng.permutation(len(d))[:n_val].tolist())
        val.append([d[i] for i in sorted(held)])
        data.append([x for i, x in enumerate(d) if i not in held])
        labels.append([x for i, x in enumerate(lab) if i not in held])
    if not any(val):
        raise ConfigError("eval.split: validation needs clients with at least 2 training samples")
    return data, labels, val


def _apply_clusters(cfg: Config, td: TaskData, client_data, client_test):
    """Map every client's train and test samples through its cluster's concept shift."""
    from hetfl.data.clusters import apply_clusters, cluster_of, shift_transform

    if cfg.data.clusters < 1:
        raise ConfigError(f"data.clusters: {cfg.data.name} is a clustered dataset; set data.clusters >= 1")
    if td.cluster_transform is not None and cfg.data.cluster_shift != "none":
        raise ConfigError(f"data.cluster_shift: {cfg.data.name} defines its own clusters; leave it at 'none'")
    transform = td.cluster_transform or shift_transform(cfg.data.cluster_shift, len(td.categories))
    if transform is not None:
        client_data = apply_clusters(client_data, cfg.data.clusters, transform)
        if client_test is not None:
            client_test = apply_clusters(client_test, cfg.data.clusters, transform)
    return client_data, client_test, [cluster_of(c, cfg.data.clusters) for c in range(len(client_data))]
