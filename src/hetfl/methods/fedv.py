"""FedV (Shi, Zhang et al., "Heterogeneous Federated Learning with Splited Language Model",
arXiv 2403.16050): a U-shaped split of a pretrained transformer. Each client keeps a head
(stem + first `cut` blocks) and the tail; the server runs one shared body for all clients
and backpropagates exact gradients to the cut. Heads and tails are averaged every round
(or tails stay personal with `personal_tail: true`).

Per local step and client (B samples, T tokens, width D; spec/fedv.md section 2):
    up   activations (B, T, D)       down outputs  (B, T, D)   (our tails pool every token)
    up   grad_outputs (B, T, D)      down grad_cut (B, T, D)
All fp32, with (B,) int32 lengths beside text activations; per round the client part goes
down as values and comes up as deltas (the head only with personal tails).

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

from hetfl.config import Config
from hetfl.engine.api import NUM_EXAMPLES, TRAIN_LOSS, ClientContext, Message, Method, RoundReport, ServerState
from hetfl.methods.common import make_optimizer
from hetfl.methods.split_common import (FP32, CutPoints, SplitConfig, SplitExchange, load_part, local_steps,
                                        per_sample_ce, run_to_end, step_sizes, trainable)
from hetfl.models.split import body_forward, head_forward
from hetfl.registry import register_method


@dataclass(frozen=True)
class FedVConfig(SplitConfig):
    name: str = "fedv"
    body: Literal["train", "frozen"] = "train"  # frozen: the pretrained body never changes
    personal_tail: bool = False  # keep each client's tail on the client, never averaged
    body_schedule: Literal["step", "round"] = "step"  # one body step per local step, or one per round


@register_method("fedv", FedVConfig, "FedV: U-shaped split learning, shared server body with exact gradients")
class FedV(Method):
    calls_server = True

    def __init__(self, cfg: Config, mcfg: FedVConfig):
        self.cfg, self.mcfg = cfg, mcfg
        self.split = SplitExchange(cfg, mcfg.name, tail_on_client=True)

    @property
    def schedule(self) -> str:  # one shared body step per local step needs the clients in lockstep
        return "lockstep" if self.mcfg.body == "train" and self.mcfg.body_schedule == "step" else "parallel"

    def setup(self, scenario) -> ServerState:
        state = self.split.setup(scenario)
        self.cuts = CutPoints(self.mcfg, self.split.layout.num_blocks, self.split.client_memory)
        return state

    def plan(self, cid: int, device) -> tuple[dict, int]:
        return self.cuts.knobs(cid, device)

    def uploaded(self, cut: int) -> tuple[str, ...]:
        """What a client sends up: its whole part, or its head only when tails are personal."""
        return self.split.layout.head(cut) if self.mcfg.personal_tail else self.split.client_names(cut)

    # -- server: one shared body -----------------------------------------------------------
    def configure(self, state: ServerState, rnd: int, cids: list[int]) -> dict[int, Message]:
        train = self.mcfg.body == "train"
        self.split.begin_round(state, cids, train)
        body = set().union(*(self.split.layout.body(self.cuts.of(c)) for c in cids))
        trained = trainable(self.split.server_model, body if train else ())
        self.body_opt = make_optimizer(list(trained.values()), self.cfg) if trained else None  # one per round
        self.pending: dict[int, tuple] = {}  # cid -> (cut activations, body output) awaiting the backward
        self.step_of: dict[int, int] = defaultdict(int)  # cid -> its local steps so far
        self.acc: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)  # step -> name -> sum of B * grad
        self.seen: dict[int, int] = defaultdict(int)  # step -> samples that contributed
        return self.split.model_messages(state, cids, self.cuts)

    def server_call(self, rnd: int):
        return self.split.handler(self.serve)

    def serve(self, cid: int, kind: str, msg: Message) -> Message:
        cut, model, meter = self.cuts.of(cid), self.split.server_model, self.split.meter
        if kind == "activations":
            z, mask = self.split.received(msg)
            z.requires_grad_(True)  # the server returns dloss/dz
            u = meter.compute(("fedv-fwd", cut, tuple(z.shape)), lambda: body_forward(model, z, mask, cut))
            self.pending[cid] = (z, u)
            return Message({"u": u.detach()}, kind="outputs")
        if kind == "grad_outputs":
            z, u = self.pending.pop(cid)
            g = msg.tensors["g"]
            meter.compute(("fedv-bwd", cut, tuple(z.shape), self.mcfg.body), lambda: u.backward(g))
            k, b = self.step_of[cid], z.shape[0]
            self.step_of[cid] += 1
            for n, p in model.named_parameters():
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

    def _body_step(self, steps: list[int]) -> None:
        params = dict(self.split.server_model.named_parameters())
        seen = sum(self.seen[k] for k in steps)
        for n in set().union(*(self.acc[k].keys() for k in steps)):
            params[n].grad = sum(self.acc[k][n] for k in steps if n in self.acc[k]) / seen
        self.body_opt.step()
        self.body_opt.zero_grad(set_to_none=True)
        for k in steps:
            del self.acc[k]

    # -- client: head and tail around the server's body ------------------------------------------
    def client_update(self, msg: Message, ctx: ClientContext) -> Message:
        return run_to_end(self.client_steps(msg, ctx))

    def client_steps(self, msg: Message, ctx: ClientContext):
        load_part(ctx.model, msg.tensors)
        cut = self.cuts.on_client(msg, ctx)
        params = trainable(ctx.model, self.split.client_names(cut))
        if self.mcfg.personal_tail and "tail" in ctx.state:  # the client's own tail replaces the global one
            load_part(ctx.model, ctx.state["tail"])
        model = ctx.model

        def step(k: int, batch: dict) -> float:
            key = ctx.task.flop_key(batch)
            h, mask = ctx.compute(("fedv-head-fwd", cut, key), lambda: head_forward(model, batch, cut))
            u = ctx.server.call("activations", self.split.send_activations(h, mask)).tensors["u"]
            u = u.detach().requires_grad_(True)  # (B, T, D): the tail's input, a leaf on the client

            def tail_step():
                loss = per_sample_ce(model.tail(u, mask), batch["labels"]).mean()
                loss.backward()
                return loss

            loss = ctx.compute(("fedv-tail", cut, key), tail_step)
            g = ctx.server.call("grad_outputs", Message({"g": u.grad}, kind="grad_outputs")).tensors["g"]
            ctx.compute(("fedv-head-bwd", cut, key), lambda: h.backward(g))
            return float(loss.detach())

        loss = yield from local_steps(ctx, self.cfg, params, step, lockstep=self.schedule == "lockstep")
        if self.mcfg.personal_tail:
            ctx.state["tail"] = {n: params[n].detach().clone() for n in self.split.layout.tail}
        sent = self.uploaded(cut)
        up = {n: p.detach() - msg.tensors[n] for n, p in params.items() if n in sent}
        return Message(up, {NUM_EXAMPLES: len(ctx.data), TRAIN_LOSS: loss})

    # -- aggregation: client parts by FedAvg, the body as the server trained it -----------------
    def aggregate(self, state: ServerState, rnd: int, replies: dict[int, Message]) -> ServerState:
        if not replies:
            return state
        if self.body_opt is not None and self.acc:  # "round": one step on every sample's mean
            self._body_step(sorted(self.acc))
        for p in self.split.server_model.parameters():
            p.requires_grad_(False)
        server = dict(self.split.server_model.named_parameters())
        body = {cid: set(self.split.server_names(self.cuts.of(cid))) for cid in replies}
        return self.split.aggregate(state, replies, self.mcfg.weighting,
                                    lambda cid, n: server[n].detach() if n in body[cid] else None)

    def report(self, state: ServerState, rnd: int, cids: list[int]) -> RoundReport:
        return self.split.report(self.cuts)

    def eval_model(self, state: ServerState) -> torch.nn.Module:
        return self.split.eval_model(state)

    def client_eval_model(self, state: ServerState, cid: int, client_state: dict) -> torch.nn.Module:
        model = self.eval_model(state)
        if "tail" in client_state:
            load_part(model, client_state["tail"])
        return model

    def payload(self, state: ServerState, rnd: int, cid: int, num_examples: int) -> tuple[int, int]:
        """The client part down, its deltas up; per step activations and the tail's gradient up,
        the body's outputs and the cut gradient down (module docstring)."""
        cut = self.cuts.of(cid)
        down = self.split.model_bytes(self.cuts, cid)
        up = self.split.update_bytes(cid, self.uploaded(cut), num_examples)
        for b in step_sizes(self.cfg, num_examples):
            act = FP32 * self.split.cut_elems[cut] * b
            down += 2 * act  # outputs, grad_cut
            up += self.split.act_bytes(cut, b) + act  # activations (+ lengths), grad_outputs
        return down, up
