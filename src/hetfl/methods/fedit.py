"""FedIT: FedAvg over a homogeneous-rank LoRA adapter (Zhang et al., "Towards Building the
Federated GPT: Federated Instruction Tuning", 2024). The base model stays frozen; only the
LoRA factors travel and are averaged."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hetfl.seeding import derive_seed
from hetfl.methods.common import AvgConfig, ParamAveraging
from hetfl.registry import register_method


def lora_and_dense(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The LoRA factors plus any parameters the model asks to train densely.

    A classifier lists its freshly initialised head in `head_param_names()`; the head trains in
    full and is averaged with the adapter (as the FSLoRA and FedV papers do for GLUE heads).
    """
    head = set(getattr(model, "head_param_names", lambda: [])())
    return {k: p for k, p in model.named_parameters() if "lora_" in k or k in head}


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
        for p in self.trainable(model).values():
            p.requires_grad_(True)

    def trainable(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        return lora_and_dense(model)

    def plan(self, cid, device):
        knobs, mem = super().plan(cid, device)
        return {"rank": self.cfg.lora.rank, **knobs}, mem

    def export(self, state, out_dir) -> None:
        """Write the final adapter to OUT/adapter in PEFT's format."""
        from hetfl.models.lora import save_peft_adapter

        save_peft_adapter(self.eval_model(state), f"{out_dir}/adapter", base_model_name_or_path=self.cfg.model.name,
                          alpha=self.cfg.lora.alpha)
