"""Ditto (Li et al., "Ditto: Fair and Robust Federated Learning Through Personalization", ICML
2021): the global model is trained by FedAvg over every weight; each client also keeps a
personal model v_i and, every round it is sampled, runs local steps on

    f_i(v_i) + (lam / 2) * ||v_i - w||^2

where w is the global model it just received. Only the global update travels; v_i never leaves
the client and is what the client is evaluated with (`client_eval_model`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hetfl.engine.api import ClientContext, Message, ServerState
from hetfl.methods.common import AvgConfig, ParamAveraging, estimate_memory, make_optimizer
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


@register_method("ditto", DittoConfig, "Ditto: FedAvg global model + proximal personal models")
class Ditto(ParamAveraging):
    def prepare(self, model: torch.nn.Module) -> None:
        for p in model.parameters():
            p.requires_grad_(True)

    def trainable(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        return dict(model.named_parameters())

    def plan(self, cid: int, device) -> tuple[dict, int]:
        n = sum(p.numel() for p in self.scenario.model.parameters())
        return {}, estimate_memory(self.scenario.model, n, self.cfg) + 4 * n  # + the kept global copy w

    def client_update(self, msg: Message, ctx: ClientContext) -> Message:
        reply = super().client_update(msg, ctx)  # the global model's local steps -> delta up
        w = msg.tensors
        personal = ctx.state.get("personal") or {k: t.clone() for k, t in w.items()}
        params = self.trainable(ctx.model)
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(personal[k])
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
        model = self.scenario.model
        with torch.no_grad():
            for k, p in self.trainable(model).items():
                p.copy_(client_state["personal"][k])
        return model
