"""Ensemble of K full models (FLoRAL's baseline `ensemble` + EnsembleAvg, spec section 4):
output = sum_c pi_c f_c(x) with the same private noisy mixture as FLoRAL (no floor; members with
pi_c < `skip_below` are not run). All K models travel both ways; the server averages model c with
p(i|c). With `router: oracle` it is clustered FL with known clusters (an IFCA upper bound).
Member 0 keeps the scenario's initialisation; the others are re-initialised from their own seeds
so the members do not start identical."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from hetfl.seeding import derive_seed
from hetfl.methods.floral import MixtureMethod, RouterConfig
from hetfl.models.floral import Mixture
from hetfl.registry import register_method


@dataclass(frozen=True)
class EnsembleConfig(RouterConfig):
    name: str = "ensemble"
    skip_below: float = 1e-3  # members weighted below this are skipped (as the official code)

    def check(self):
        yield from super().check()
        if not 0.0 <= self.skip_below < 1.0:
            yield "skip_below", "must be in [0, 1)"


class EnsembleModel(nn.Module):
    """K models mixed at the output by one `Mixture`: forward(batch) = sum_c pi_c members[c](batch)."""

    def __init__(self, members: list[nn.Module], mixture: Mixture, skip_below: float):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.mixture = mixture
        self.skip_below = skip_below

    def forward(self, batch):
        pi = self.mixture.weights()  # (K,), one draw per forward pass
        out = None
        for c, member in enumerate(self.members):
            if pi[c] < self.skip_below:
                continue
            y = pi[c] * member(batch)
            out = y if out is None else out + y
        return out


def reinit(model: nn.Module, seed: int) -> nn.Module:
    """Reset every layer with `reset_parameters` from `seed` (the global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in model.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    return model


@register_method("ensemble", EnsembleConfig, "Ensemble of K full models mixed by a private router")
class Ensemble(MixtureMethod):
    def build(self, model: nn.Module) -> nn.Module:
        members = [model] + [reinit(copy.deepcopy(model), derive_seed(self.cfg.seed, "ensemble", c) % 2**31)
                             for c in range(1, self.k)]
        ens = EnsembleModel(members, Mixture(self.k, self.mcfg.noise, self.mcfg.temperature, floor=0.0),
                            self.mcfg.skip_below)
        for p in ens.parameters():
            p.requires_grad_(True)
        return ens

    def shared(self, model) -> dict[str, nn.Parameter]:
        return {n: p for n, p in model.named_parameters() if n.startswith("members.")}

    def slot(self, name: str) -> int:
        return int(name.split(".")[1])  # members.<c>.<param>

    def extra_params(self) -> int:
        return (self.k - 1) * self.base_params
