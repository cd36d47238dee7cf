"""Ditto (Li et al., "Ditto: Fair and Robust Federated Learning Through Personalization", ICML
2021): the global model is trained by FedAvg over every weight; each client also keeps a
personal model v_i and, every round it is sampled, runs local steps on

    f_i(v_i) + (lam / 2) * ||v_i - w||^2

where w is the global model it just received. Only the global update travels; v_i never leaves
the client and is what the client is evaluated with (`client_eval_model`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hetfl.engine.api import ClientContext, Message, Method, ServerState
from hetfl.methods.common import (FP32, AvgConfig, ServerOptimizer, copy_into, estimate_memory, fp32_nbytes,
                                  make_optimizer, mean_delta, mirrored_payload, mirrored_reply, train_delta)
from hetfl.registry import register_method


@dataclass(frozen=True)
class DittoConfig(AvgConfig):
    name: str = "ditto"
    lam: float = 0.5  # proximal weight pulling v_i towards the global model (paper: 0.1-1 typical)
    personal_steps: int = 0  # local steps on v_i per round; 0: train.local_steps

    def check(self):
        yield from super().check()
        if self.lam < 0:
            yield "lam", "must be >= 0"
        if self.personal_steps < 0:
            yield "personal_steps", "must be >= 0"


def all_weights(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return dict(model.named_parameters())


@register_method("ditto", DittoConfig, "Ditto: FedAvg global model + proximal personal models")
class Ditto(Method):
    supports_selection = True  # `load` puts the whole global model on the client: data selection can run
    robust_aggregation = True  # `aggregate` averages through mean_delta, which honours server.aggregator

    def __init__(self, cfg, mcfg: DittoConfig):
        self.cfg, self.mcfg = cfg, mcfg
        self.server_opt = ServerOptimizer(mcfg)

    # -- server: FedAvg of the global model ---------------------------------------------
    def setup(self, scenario) -> ServerState:
        self.scenario = scenario
        for p in scenario.model.parameters():
            p.requires_grad_(True)
        return {"global": {k: p.detach().clone() for k, p in all_weights(scenario.model).items()}}

    def plan(self, cid: int, device) -> tuple[dict, int]:
        n = sum(p.numel() for p in self.scenario.model.parameters())
        return {}, estimate_memory(self.scenario.model, n, self.cfg) + FP32 * n  # + the kept global copy w

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
        """Every weight in fp32 each way (the personal model stays home), plus the reply's metadata."""
        n = fp32_nbytes(all_weights(self.scenario.model).values())
        return mirrored_payload(n, num_examples)

    # -- client: the global model's local steps, then the personal model's ----------------
    def load(self, msg: Message, ctx: ClientContext) -> None:
        copy_into(all_weights(ctx.model), msg.tensors)

    def client_update(self, msg: Message, ctx: ClientContext) -> Message:
        reply = train_delta(msg, ctx, all_weights(ctx.model), self.cfg, ("Ditto",))  # the delta goes up
        w = msg.tensors
        personal = ctx.state.get("personal") or {k: t.clone() for k, t in w.items()}
        params = all_weights(ctx.model)
        copy_into(params, personal)
        opt = make_optimizer(list(params.values()), self.cfg)
        t, lam = self.cfg.train, self.mcfg.lam
        steps = self.mcfg.personal_steps or t.steps_for(len(ctx.data))
        for batch in ctx.task.batches(ctx.data, steps, t.batch_size, ctx.generator("ditto-personal")):
            def step():
                prox = sum(((p - w[k]) ** 2).sum() for k, p in params.items())
                loss = ctx.task.loss(ctx.model, batch) + 0.5 * lam * prox
                loss.backward()

            opt.zero_grad(set_to_none=True)
            ctx.compute(("ditto-personal", *ctx.task.flop_key(batch)), step)
            opt.step()
        opt.zero_grad(set_to_none=True)
        ctx.state["personal"] = {k: p.detach().clone() for k, p in params.items()}
        return reply

    def client_eval_model(self, state: ServerState, cid: int, client_state: dict) -> torch.nn.Module:
        if "personal" not in client_state:  # never sampled: the global model
            return self.eval_model(state)
        copy_into(all_weights(self.scenario.model), client_state["personal"])
        return self.scenario.model
