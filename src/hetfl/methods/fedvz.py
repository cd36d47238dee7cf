"""FedVZ (arXiv 2403.16050): FedV with a forward-only server. The server body is frozen and
runs under `torch.no_grad` (a black box that returns outputs and nothing else); the client
estimates the gradient at the cut from per-sample loss differences of perturbed activations
(zeroth order, spec/fedv.md section 3). No gradient ever leaves the client.

Per local step, with q perturbations (B samples, T tokens, width D):
    forward difference:  up activations ((q+1)B, T, D) = [z, z + eps u_1, ..., z + eps u_q]
    central difference:  up activations ((2q+1)B, T, D) = [z, z + eps u_1, z - eps u_1, ...]
    down outputs of the same shape. eps = mu * RMS(z), so `mu` is relative to the activations.
The tail trains on the exact gradient of the clean copy's loss (local, no server help):

    g_hat_b = (1/B) * mean_j [(l_b(z + eps u_j) - l_b(z)) / eps] * u_j      (forward)
    g_hat_b = (1/B) * mean_j [(l_b(z + eps u_j) - l_b(z - eps u_j)) / (2 eps)] * u_j   (central)

(1/B: the training loss is the batch mean.) u_j is Gaussian or uniform on the sphere of
radius sqrt(d) per sample (d = elements per sample), so E[u u^T] = I either way. All fp32, with
int32 lengths beside each text copy; per round the client part (head and tail) goes down as
values and comes up as deltas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from hetfl.config import Config
from hetfl.engine.api import NUM_EXAMPLES, TRAIN_LOSS, ClientContext, Message, Method, RoundReport, ServerState
from hetfl.methods.split_common import (FP32, CutPoints, SplitConfig, SplitExchange, load_part, local_steps,
                                        per_sample_ce, run_to_end, step_sizes, trainable)
from hetfl.models.split import body_forward, head_forward
from hetfl.registry import register_method


@dataclass(frozen=True)
class FedVZConfig(SplitConfig):
    name: str = "fedvz"
    q: int = 1  # perturbations per step ("one extra forward" in the paper: q = 1)
    mu: float = 1e-3  # perturbation radius relative to the RMS of the cut activations
    directions: Literal["gaussian", "sphere"] = "gaussian"
    difference: Literal["forward", "central"] = "forward"

    def check(self):
        yield from super().check()
        if self.q < 1:
            yield "q", "must be >= 1"
        if self.mu <= 0:
            yield "mu", "must be > 0"


def draw_directions(shape: tuple[int, ...], q: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    """(q, B, ...) perturbation directions with E[u u^T] = I per sample."""
    u = torch.randn((q, *shape), generator=gen)
    if kind == "sphere":  # rescale each sample's direction to norm sqrt(d)
        d = math.prod(shape[1:])
        norms = u.flatten(2).norm(dim=2).view(q, shape[0], *[1] * (len(shape) - 1))
        u = u / norms * math.sqrt(d)
    return u


def perturb(h: torch.Tensor, u: torch.Tensor, eps: float, difference: str) -> torch.Tensor:
    """Stack [h, h + eps u_1, (h - eps u_1,) ...] along the batch: ((q+1)B or (2q+1)B, ...)."""
    parts = [h]
    for j in range(u.shape[0]):
        parts.append(h + eps * u[j])
        if difference == "central":
            parts.append(h - eps * u[j])
    return torch.cat(parts)


def zo_gradient(losses: torch.Tensor, u: torch.Tensor, eps: float, difference: str) -> torch.Tensor:
    """Zeroth-order estimate of d(sum_b l_b)/dh from the per-sample losses of `perturb`'s stack.

    Args:
        losses: ((q+1)B,) or ((2q+1)B,) per-sample losses in `perturb`'s order.
        u: (q, B, ...) the directions used.
        eps: the perturbation radius used.
        difference: "forward" or "central".

    Returns:
        (B, ...) the estimate (average over the q directions).
    """
    q, b = u.shape[0], u.shape[1]
    l0, rest = losses[:b], losses[b:].view(-1, b)  # (B,), (q or 2q, B)
    if difference == "central":
        coef = (rest[0::2] - rest[1::2]) / (2 * eps)  # (q, B)
    else:
        coef = (rest - l0) / eps  # (q, B)
    return (coef.view(q, b, *[1] * (u.dim() - 2)) * u).mean(0)


@register_method("fedvz", FedVZConfig, "FedVZ: forward-only server body, zeroth-order gradient at the cut")
class FedVZ(Method):
    calls_server = True

    def __init__(self, cfg: Config, mcfg: FedVZConfig):
        self.cfg, self.mcfg = cfg, mcfg
        self.split = SplitExchange(cfg, mcfg.name, tail_on_client=True)
        self.reps = 1 + mcfg.q * (2 if mcfg.difference == "central" else 1)  # copies of each sample per step

    def setup(self, scenario) -> ServerState:
        state = self.split.setup(scenario)
        self.cuts = CutPoints(self.mcfg, self.split.layout.num_blocks, self.split.client_memory)
        return state

    def plan(self, cid: int, device) -> tuple[dict, int]:
        knobs, mem = self.cuts.knobs(cid, device)
        extra = (self.reps - 1) * self.cfg.train.batch_size * self.split.cut_elems[knobs["cut"]] * 4 * 2  # stacks out and back
        return knobs, mem + extra

    # -- server: a black-box forward ----------------------------------------------------------
    def configure(self, state: ServerState, rnd: int, cids: list[int]) -> dict[int, Message]:
        self.split.begin_round(state, cids, train=False)  # no dropout noise in the loss differences
        return self.split.model_messages(state, cids, self.cuts)

    def server_call(self, rnd: int):
        return self.split.handler(self.serve)

    def serve(self, cid: int, kind: str, msg: Message) -> Message:
        if kind != "activations":
            raise ValueError(f"fedvz server: only forward passes are served, got {kind!r}")
        cut, model = self.cuts.of(cid), self.split.server_model
        z, mask = self.split.received(msg)
        with torch.no_grad():  # no autograd graph on the server, ever
            u = self.split.meter.compute(("fedvz-fwd", cut, tuple(z.shape)), lambda: body_forward(model, z, mask, cut))
        return Message({"u": u}, kind="outputs")

    # -- client: zeroth-order gradient at the cut ----------------------------------------------
    def client_update(self, msg: Message, ctx: ClientContext) -> Message:
        load_part(ctx.model, msg.tensors)
        cut = self.cuts.on_client(msg, ctx)
        params = trainable(ctx.model, self.split.client_names(cut))
        loss = run_to_end(local_steps(ctx, self.cfg, params, lambda k, batch: self.client_step(ctx, cut, k, batch)))
        up = {n: p.detach() - msg.tensors[n] for n, p in params.items()}
        return Message(up, {NUM_EXAMPLES: len(ctx.data), TRAIN_LOSS: loss})

    def client_step(self, ctx: ClientContext, cut: int, k: int, batch: dict) -> float:
        m, model, key = self.mcfg, ctx.model, ctx.task.flop_key(batch)
        labels = batch["labels"]
        h, mask = ctx.compute(("fedvz-head-fwd", cut, key), lambda: head_forward(model, batch, cut))
        hd = h.detach()
        b = hd.shape[0]
        gen = ctx.generator(f"zo-directions-{k}")  # one stream per (round, client, step)
        u = draw_directions(tuple(hd.shape), m.q, m.directions, gen)  # (q, B, ...)
        eps = m.mu * float(hd.pow(2).mean().sqrt().clamp_min(1e-12))
        stack = perturb(hd, u, eps, m.difference)
        reps = stack.shape[0] // b
        lengths_mask = None if mask is None else mask.repeat(reps, 1)
        out = ctx.server.call("activations", self.split.send_activations(stack, lengths_mask)).tensors["u"]
        clean = out[:b].detach().requires_grad_(True)

        def tail_step():
            per = per_sample_ce(model.tail(clean, mask), labels)  # (B,)
            per.mean().backward()  # exact tail gradient from the clean copy
            with torch.no_grad():  # ((reps-1)B,) losses of the perturbed copies
                rest = per_sample_ce(model.tail(out[b:], None if mask is None else lengths_mask[b:]),
                                     labels.repeat(reps - 1))
            return torch.cat([per.detach(), rest])

        losses = ctx.compute(("fedvz-tail", cut, key, reps), tail_step)
        g = zo_gradient(losses, u, eps, m.difference) / b  # (B, ...): gradient of the batch-mean loss
        ctx.compute(("fedvz-head-bwd", cut, key), lambda: h.backward(g))
        return float(losses[:b].mean())

    # -- aggregation: FedAvg of the client parts; the frozen body never changes -------------------
    def aggregate(self, state: ServerState, rnd: int, replies: dict[int, Message]) -> ServerState:
        if not replies:
            return state
        return self.split.aggregate(state, replies, self.mcfg.weighting, lambda cid, n: None)

    def report(self, state: ServerState, rnd: int, cids: list[int]) -> RoundReport:
        return self.split.report(self.cuts)

    def eval_model(self, state: ServerState) -> torch.nn.Module:
        return self.split.eval_model(state)

    def payload(self, state: ServerState, rnd: int, cid: int, num_examples: int) -> tuple[int, int]:
        """The client part down, its deltas up; per step `reps` stacked copies of the activations
        up and of the body's outputs down (module docstring)."""
        cut = self.cuts.of(cid)
        names = self.split.client_names(cut)
        down, up = self.split.model_bytes(self.cuts, cid), self.split.update_bytes(cid, names, num_examples)
        for b in step_sizes(self.cfg, num_examples):
            down += self.reps * FP32 * self.split.cut_elems[cut] * b
            up += self.split.act_bytes(cut, self.reps * b)
        return down, up
