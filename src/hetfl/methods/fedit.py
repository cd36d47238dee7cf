"""FedIT: FedAvg over a homogeneous-rank LoRA adapter (Zhang et al., "Towards Building the
Federated GPT: Federated Instruction Tuning", 2024). The base model stays frozen; only the
LoRA factors travel and are averaged."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hetfl.engine.api import derive_seed
from hetfl.methods.common import AvgConfig, ParamAveraging
from hetfl.registry import register_method


@dataclass(frozen=True)
class FedITConfig(AvgConfig):
    name: str = "fedit"


@register_method("fedit", FedITConfig, "FedAvg over a homogeneous LoRA adapter (FedIT)")
class FedIT(ParamAveraging):
    def prepare(self, model: torch.nn.Module) -> None:
        from hetfl.models.lora import inject_lora

        lc = self.cfg.lora
        g = torch.Generator().manual_seed(derive_seed(self.cfg.seed, "lora-init"))
        inject_lora(model, rank=lc.rank, alpha=lc.alpha, targets=lc.targets, regex=lc.regex,
                    exclude=lc.exclude, dropout=lc.dropout, generator=g)

    def trainable(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        return {k: p for k, p in model.named_parameters() if "lora_" in k}

    def plan(self, cid, device):
        knobs, mem = super().plan(cid, device)
        return {"rank": self.cfg.lora.rank, **knobs}, mem
