"""A wider toy for the heterogeneous-rank LoRA tests: the toy regression data of toy.py on an
MLP whose adapted layers (fc1 6->32, fc2 32->32) take ranks up to 6, so that rank-k sketches of
a rank-4 global adapter are meaningful and index bytes are small next to the factors."""

from __future__ import annotations

import torch
from toy import toy_config, toy_scenario
from torch import nn

from hetfl.seeding import derive_seed
from hetfl.engine.loop import run_rounds
from hetfl.runner import build_method

# LoRA values per unit of rank: fc1 (6 + 32) + fc2 (32 + 32).
UNITS = (6 + 32) + (32 + 32)
WIDE = ("lora.rank=4", "method.ratios=[0.25, 0.5, 1.0]")


class WideNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(6, 32), nn.Linear(32, 32), nn.Linear(32, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def wide_config(*overrides: str):
    return toy_config(*WIDE, *overrides)


def wide_scenario(cfg):
    sc = toy_scenario(cfg)
    torch.manual_seed(derive_seed(cfg.seed, "wide-model"))
    sc.model = WideNet().requires_grad_(False)
    return sc


def wide_setup(*overrides: str):
    """(scenario, method, initial server state) for the wide toy."""
    cfg = wide_config(*overrides)
    sc = wide_scenario(cfg)
    method = build_method(cfg)
    return sc, method, method.setup(sc)


def wide_run(*overrides: str, rundir=None, order: str = "sorted"):
    """Run the wide toy; returns (history, scenario, method). The scenario's model ends up holding
    the final global model (the loop evaluates after the last round)."""
    cfg = wide_config(*overrides)
    sc = wide_scenario(cfg)
    method = build_method(cfg)
    return run_rounds(sc, method, rundir, order=order), sc, method
