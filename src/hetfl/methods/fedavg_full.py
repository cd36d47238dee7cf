"""FedAvg full fine-tuning (McMahan et al., 2017): every weight is trained on every client and
travels both ways each round. The heavy baseline the parameter-efficient methods are measured
against."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hetfl.methods.common import AvgConfig, ParamAveraging
from hetfl.registry import register_method


@dataclass(frozen=True)
class FedAvgFullConfig(AvgConfig):
    name: str = "fedavg-full"


@register_method("fedavg-full", FedAvgFullConfig, "FedAvg full fine-tuning (every weight trains and travels)")
class FedAvgFull(ParamAveraging):
    def prepare(self, model: torch.nn.Module) -> None:
        for p in model.parameters():
            p.requires_grad_(True)

    def trainable(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        # named_parameters() lists a tied embedding/lm_head weight once, as it is one tensor.
        return dict(model.named_parameters())

    def export(self, state, out_dir) -> None:
        """Write the final full model to OUT/model (Hugging Face format when the model has one)."""
        model = self.eval_model(state)
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(f"{out_dir}/model")
