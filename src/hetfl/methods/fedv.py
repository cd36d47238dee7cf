"""FedV (Shi, Zhang et al., "Heterogeneous Federated Learning with Splited Language Model",
arXiv 2403.16050): a U-shaped split of a pretrained transformer. Each client keeps a head
(stem + first `cut` blocks) and the tail; the server runs one shared body for all clients
and backpropagates exact gradients to the cut. Heads and tails are averaged every round
(or tails stay personal with `personal_tail: true`).

Per local step and client (B samples, T tokens, width D; spec/fedv.md section 2):
    up   activations (B, T, D)       down outputs  (B, T, D)   (our tails pool every token)
    up   grad_outputs (B, T, D)      down grad_cut (B, T, D)

Server body schedule: the paper's clients run in parallel and the body takes one step per
local step on the gradient averaged over the round's clients (per sample: one big batch). With
`body_schedule: step` the method asks the backend for lockstep: every client takes local step
k against body version k, then `barrier(k)` applies the body step, exactly the synchronous
schedule. `body_schedule: round` instead takes one body step per round on the gradient
averaged over all of the round's samples (the spec's alternative; clients run one by one).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

import torch

from hetfl.engine.api import ClientContext, Message, ServerState
from hetfl.methods.common import make_optimizer
from hetfl.methods.split_common import SplitConfig, SplitMethod, per_sample_ce
from hetfl.models.split import body_forward, head_forward
from hetfl.registry import register_method


@dataclass(frozen=True)
class FedVConfig(SplitConfig):
    name: str = "fedv"
    body: Literal["train", "frozen"] = "train"  # frozen: the pretrained body never changes
    personal_tail: bool = False  # keep each client's tail on the client, never averaged
    body_schedule: Literal["step", "round"] = "step"  # one body step per local step, or one per round


@register_method("fedv", FedVConfig, "FedV: U-shaped split learning, shared server body with exact gradients")
class FedV(SplitMethod):
    @property
    def schedule(self) -> str:  # one shared body step per local step needs the clients in lockstep
        return "lockstep" if self.mcfg.body == "train" and self.mcfg.body_schedule == "step" else "parallel"

    # -- server ----------------------------------------------------------------------------
    def begin_round(self, state: ServerState, rnd: int, cids: list[int]) -> None:
        train = self.mcfg.body == "train"
        body = set().union(*(self.layout.body(self.cuts[c]) for c in cids))
        trained = []
        for n, p in self.server_model.named_parameters():
            p.requires_grad_(train and n in body)
            if train and n in body:
                trained.append(p)
        self.body_opt = make_optimizer(trained, self.cfg) if trained else None  # one per round, like a client's
        self.pending: dict[int, tuple] = {}
        self.step_of: dict[int, int] = defaultdict(int)
        self.acc: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)  # step -> name -> sum of B * grad
        self.seen: dict[int, int] = defaultdict(int)  # step -> samples that contributed

    def server_trains(self) -> bool:
        return self.mcfg.body == "train"

    def serve(self, cid: int, kind: str, msg: Message) -> Message:
        cut = self.cuts[cid]
        if kind == "activations":
            z, mask = self.received(msg)
            z.requires_grad_(True)  # the server returns dloss/dz
            u = self.meter.compute(("fedv-fwd", cut, tuple(z.shape)),
                                   lambda: body_forward(self.server_model, z, mask, cut))
            self.pending[cid] = (z, u)
            return Message({"u": u.detach()}, kind="outputs")
        if kind == "grad_outputs":
            z, u = self.pending.pop(cid)
            g = msg.tensors["g"]
            self.meter.compute(("fedv-bwd", cut, tuple(z.shape), self.mcfg.body), lambda: u.backward(g))
            k, b = self.step_of[cid], z.shape[0]
            self.step_of[cid] += 1
            for n, p in self.server_model.named_parameters():
                if p.grad is not None:  # weight by samples: the step sees one concatenated batch
                    self.acc[k][n] = self.acc[k].get(n, 0) + b * p.grad
                    p.grad = None
            self.seen[k] += b
            return Message({"g": z.grad}, kind="grad_cut")
        raise ValueError(f"fedv server: unknown message kind {kind!r}")

    def barrier(self, rnd: int, k: int) -> None:
        """Every client has finished step k: one body step on the step's sample-weighted mean."""
        if self.body_opt is not None and k in self.acc:
            self._body_step([k])

    def end_round(self, state: ServerState, rnd: int, replies: dict[int, Message]) -> None:
        if self.body_opt is not None and self.acc:  # "round": one step on every sample's mean
            self._body_step(sorted(self.acc))
        for p in self.server_model.parameters():
            p.requires_grad_(False)

    def _body_step(self, steps: list[int]) -> None:
        params = dict(self.server_model.named_parameters())
        seen = sum(self.seen[k] for k in steps)
        for n in set().union(*(self.acc[k].keys() for k in steps)):
            params[n].grad = sum(self.acc[k][n] for k in steps if n in self.acc[k]) / seen
        self.body_opt.step()
        self.body_opt.zero_grad(set_to_none=True)
        for k in steps:
            del self.acc[k]

    # -- client ----------------------------------------------------------------------------
    def client_step(self, ctx: ClientContext, cut: int, k: int, batch: dict) -> float:
        model, key = ctx.model, ctx.task.flop_key(batch)
        h, mask = ctx.compute(("fedv-head-fwd", cut, key), lambda: head_forward(model, batch, cut))
        u = ctx.server.call("activations", self.send_activations(h, mask)).tensors["u"]
        u = u.detach().requires_grad_(True)  # (B, T, D): the tail's input, a leaf on the client

        def tail_step():
            loss = per_sample_ce(model.tail(u, mask), batch["labels"]).mean()
            loss.backward()
            return loss

        loss = ctx.compute(("fedv-tail", cut, key), tail_step)
        g = ctx.server.call("grad_outputs", Message({"g": u.grad}, kind="grad_outputs")).tensors["g"]
        ctx.compute(("fedv-head-bwd", cut, key), lambda: h.backward(g))
        return float(loss.detach())

    # -- personal tails --------------------------------------------------------------------
    def client_params(self, ctx: ClientContext, reload: bool = True) -> dict[str, torch.nn.Parameter]:
        params = super().client_params(ctx)
        if reload and self.mcfg.personal_tail and "tail" in ctx.state:  # the client's own tail replaces the global one
            with torch.no_grad():
                for n, t in ctx.state["tail"].items():
                    params[n].copy_(t)
        return params

    def finish_client(self, ctx: ClientContext, params: dict) -> None:
        if self.mcfg.personal_tail:
            ctx.state["tail"] = {n: params[n].detach().clone() for n in self.layout.tail}

    def uploaded(self, cut: int) -> tuple[str, ...]:
        return self.layout.head(cut) if self.mcfg.personal_tail else self.client_names(cut)

    def client_eval_model(self, state: ServerState, cid: int, client_state: dict) -> torch.nn.Module:
        model = self.eval_model(state)
        if "tail" in client_state:
            params = dict(model.named_parameters())
            with torch.no_grad():
                for n, t in client_state["tail"].items():
                    params[n].copy_(t)
        return model
