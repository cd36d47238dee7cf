"""FedIT: FedAvg over a homogeneous-rank LoRA adapter (Zhang et al., "Towards Building the
Federated GPT: Federated Instruction Tuning", 2024). The base model stays frozen; only the
LoRA factors (and a classifier's dense head) travel and are averaged.

Down: the global factors (kind "model"). Up: the client's deltas (kind "update"). Server: the
example-weighted (or uniform) mean of the deltas, then plain averaging or FedAdam.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hetfl.engine.api import ClientContext, Message, Method, ServerState
from hetfl.methods.common import (AvgConfig, ServerOptimizer, copy_into, estimate_memory, fp32_nbytes,
                                  inject_run_lora, lora_and_head, mean_delta, mirrored_payload, mirrored_reply,
                                  train_delta)
from hetfl.registry import register_method


@dataclass(frozen=True)
class FedITConfig(AvgConfig):
    name: str = "fedit"


@register_method("fedit", FedITConfig, "FedAvg over a homogeneous LoRA adapter (FedIT)")
class FedIT(Method):
    supports_selection = True  # `load` puts the whole global model on the client: data selection can run
    robust_aggregation = True  # `aggregate` averages through mean_delta, which honours server.aggregator

    def __init__(self, cfg, mcfg: FedITConfig):
        self.cfg, self.mcfg = cfg, mcfg
        self.server_opt = ServerOptimizer(mcfg)

    def trainable(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        """The LoRA factors plus a classifier's dense head: what trains and travels."""
        return lora_and_head(model)

    # -- server -------------------------------------------------------------------------
    def setup(self, scenario) -> ServerState:
        self.scenario = scenario
        inject_run_lora(scenario.model, self.cfg)
        for p in self.trainable(scenario.model).values():
            p.requires_grad_(True)
        return {"global": {k: p.detach().clone() for k, p in self.trainable(scenario.model).items()}}

    def plan(self, cid: int, device) -> tuple[dict, int]:
        n = sum(p.numel() for p in self.trainable(self.scenario.model).values())
        return {"rank": self.cfg.lora.rank}, estimate_memory(self.scenario.model, n, self.cfg)

    def configure(self, state: ServerState, rnd: int, cids: list[int]) -> dict[int, Message]:
        return {cid: Message(dict(state["global"]), kind="model") for cid in cids}

    def expected_reply(self, down: Message, knobs: dict) -> dict[str, tuple[int, ...]]:
        """A delta of every tensor that came down."""
        return mirrored_reply(down)

    def aggregate(self, state: ServerState, rnd: int, replies: dict[int, Message]) -> ServerState:
        if replies:  # else every sampled client skipped (e.g. empty coresets)
            self.server_opt.step(state, "global", mean_delta(replies, self.mcfg.weighting, self.cfg.server))
        return state

    def eval_model(self, state: ServerState) -> torch.nn.Module:
        copy_into(self.trainable(self.scenario.model), state["global"])
        return self.scenario.model

    def payload(self, state: ServerState, rnd: int, cid: int, num_examples: int) -> tuple[int, int]:
        """The fp32 adapter (and head) each way, plus the reply's metadata."""
        n = fp32_nbytes(self.trainable(self.scenario.model).values())
        return mirrored_payload(n, num_examples)

    # -- client -------------------------------------------------------------------------
    def load(self, msg: Message, ctx: ClientContext) -> None:
        copy_into(self.trainable(ctx.model), msg.tensors)

    def client_update(self, msg: Message, ctx: ClientContext) -> Message:
        return train_delta(msg, ctx, self.trainable(ctx.model), self.cfg, ("FedIT",))

    def export(self, state: ServerState, out_dir) -> None:
        """Write the final adapter to OUT/adapter in PEFT's format."""
        from hetfl.models.lora import save_peft_adapter

        save_peft_adapter(self.eval_model(state), f"{out_dir}/adapter", base_model_name_or_path=self.cfg.model.name,
                          alpha=self.cfg.lora.alpha)
