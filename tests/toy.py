"""A toy scenario for engine tests: a 2-layer MLP regression task, no language model needed."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hetfl.config import load_config
from hetfl.seeding import derive_seed
from hetfl.scenario import Scenario, build_population
from hetfl.tasks.base import batch_indices


class ToyNet(nn.Module):
    def __init__(self, d_in: int = 6, d_hidden: int = 8, d_out: int = 3):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


@dataclass
class ToyTask:
    eval_x: torch.Tensor
    eval_y: torch.Tensor
    primary_metric: str = "eval_mse"

    def batches(self, samples, steps, batch_size, gen):
        for idx in batch_indices(len(samples), steps, batch_size, gen):
            yield {"x": torch.stack([samples[i][0] for i in idx]), "y": torch.stack([samples[i][1] for i in idx])}

    def loss(self, model, batch):
        return ((model(batch["x"]) - batch["y"]) ** 2).mean()

    def flop_key(self, batch):
        return tuple(batch["x"].shape)

    @torch.no_grad()
    def evaluate(self, model, samples=None):
        x, y = (self.eval_x, self.eval_y) if samples is None else (torch.stack([s[0] for s in samples]),
                                                                    torch.stack([s[1] for s in samples]))
        return {"eval_mse": float(((model(x) - y) ** 2).mean())}


TOY_CONFIG = {
    "name": "toy", "seed": 3, "rounds": 3,
    "lora": {"rank": 2, "alpha": 4, "targets": ["fc1", "fc2"]},
    "train": {"optimizer": "sgd", "lr": 0.05, "local_steps": 3, "batch_size": 4},
    "method": {"name": "fedit"},
    "population": {"num_clients": 6, "clients_per_round": 3, "tiers": {"phone-low": 1, "laptop": 1}},
    "eval": {"every": 1},
}


def toy_config(*overrides: str):
    return load_config(TOY_CONFIG, list(overrides))


def toy_scenario(cfg) -> Scenario:
    """Six clients with 5-9 samples of y = tanh(W x) + client-specific shift (non-IID)."""
    g = torch.Generator().manual_seed(derive_seed(cfg.seed, "toy"))
    w = torch.randn(3, 6, generator=g)
    data = []
    for c in range(cfg.population.num_clients):
        n = 5 + c % 5
        x = torch.randn(n, 6, generator=g)
        y = torch.tanh(x @ w.T) + 0.1 * c
        data.append([(x[i], y[i]) for i in range(n)])
    ex = torch.randn(16, 6, generator=g)
    torch.manual_seed(derive_seed(cfg.seed, "toy-model"))
    model = ToyNet()
    for p in model.parameters():
        p.requires_grad_(False)
    return Scenario(cfg, model, None, ToyTask(ex, torch.tanh(ex @ w.T)), data, [[0] * len(d) for d in data], ["toy"],
                    build_population(cfg))
