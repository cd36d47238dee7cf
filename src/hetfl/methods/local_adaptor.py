"""Local Adaptor (FLoRAL's baseline `floral_locallora`, spec section 4): FLoRAL with K = 1 whose
adaptor never leaves the client. Only the base model is federated (FedAvg weighted by n_i); each
client keeps one low-rank adaptor plus a bias per layer (rank rule rho, 1% by default) in its
private state and is evaluated with it merged into the base. A client that has not trained yet
holds the shared seeded initial adaptor."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hetfl.methods.floral import FloralConfig, FloralMethod
from hetfl.registry import register_method


@dataclass(frozen=True)
class LocalAdaptorConfig(FloralConfig):
    name: str = "local-adaptor"
    num_adaptors: int = 1

    def check(self):
        yield from super().check()
        if self.num_adaptors != 1:
            yield "num_adaptors", "local-adaptor keeps exactly one adaptor per client (1)"
        if self.state != "stateful":
            yield "state", "local-adaptor keeps its adaptor on the client: only 'stateful'"
        if self.router != "learned":
            yield "router", "local-adaptor has no mixture to fix: only 'learned'"


@register_method("local-adaptor", LocalAdaptorConfig, "Local Adaptor: FedAvg base + one private adaptor per client")
class LocalAdaptor(FloralMethod):
    def shared(self, model) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in model.named_parameters() if not n.startswith("floral.")}

    def private(self, model) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in model.named_parameters() if n.startswith("floral.adaptors.")}

    def param_groups(self, model) -> list[dict]:
        return super().param_groups(model) + [{"params": list(self.private(model).values()),
                                               "lr": self.mcfg.adaptor_lr or self.cfg.train.lr}]
