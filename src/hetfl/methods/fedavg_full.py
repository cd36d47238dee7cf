"""FedAvg full fine-tuning (McMahan et al., 2017): every weight is trained on every client and
travels both ways each round. The heavy baseline the parameter-efficient methods are measured
against.

Down: every global weight (kind "model"). Up: the client's deltas (kind "update"). Server: the
example-weighted (or uniform) mean of the deltas, then plain averaging or FedAdam.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hetfl.engine.api import ClientContext, Message, Method, ServerState
from hetfl.methods.common import (AvgConfig, ServerOptimizer, copy_into, estimate_memory, fp32_nbytes, mean_delta,
                                  mirrored_payload, mirrored_reply, train_delta)
from hetfl.registry import register_method


@dataclass(frozen=True)
class FedAvgFullConfig(AvgConfig):
    name: str = "fedavg-full"


def all_weights(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    # named_parameters() lists a tied embedding/lm_head weight once, as it is one tensor.
    return dict(model.named_parameters())


@register_method("fedavg-full", FedAvgFullConfig, "FedAvg full fine-tuning (every weight trains and travels)")
class FedAvgFull(Method):
    supports_selection = True  # `load` puts the whole global model on the client: data selection can run
    robust_aggregation = True  # `aggregate` averages through mean_delta, which honours server.aggregator

    def __init__(self, cfg, mcfg: FedAvgFullConfig):
        self.cfg, self.mcfg = cfg, mcfg
        self.server_opt = ServerOptimizer(mcfg)

    # -- server -------------------------------------------------------------------------
    def setup(self, scenario) -> ServerState:
        self.scenario = scenario
        for p in scenario.model.parameters():
            p.requires_grad_(True)
        return {"global": {k: p.detach().clone() for k, p in all_weights(scenario.model).items()}}

    def plan(self, cid: int, device) -> tuple[dict, int]:
        n = sum(p.numel() for p in all_weights(self.scenario.model).values())
        return {}, estimate_memory(self.scenario.model, n, self.cfg)

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
        copy_into(all_weights(self.scenario.model), state["global"])
        return self.scenario.model

    def payload(self, state: ServerState, rnd: int, cid: int, num_examples: int) -> tuple[int, int]:
        """Every weight in fp32 each way, plus the reply's metadata."""
        n = fp32_nbytes(all_weights(self.scenario.model).values())
        return mirrored_payload(n, num_examples)

    # -- client -------------------------------------------------------------------------
    def load(self, msg: Message, ctx: ClientContext) -> None:
        copy_into(all_weights(ctx.model), msg.tensors)

    def client_update(self, msg: Message, ctx: ClientContext) -> Message:
        return train_delta(msg, ctx, all_weights(ctx.model), self.cfg, ("FedAvgFull",))

    def export(self, state: ServerState, out_dir) -> None:
        """Write the final full model to OUT/model (Hugging Face format when the model has one)."""
        model = self.eval_model(state)
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(f"{out_dir}/model")
