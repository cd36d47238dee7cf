"""Pieces shared by methods: local optimisation, server optimisers, memory estimates.

`ParamAveraging` is FedAvg over a named set of trainable tensors (deltas up, weighted mean,
server optimiser). FedIT (LoRA) and full fine-tuning differ only in which tensors those are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal

import torch

from hetfl.config import Config, MethodConfig
from hetfl.engine.api import NUM_EXAMPLES, TRAIN_LOSS, ClientContext, Message, Method, ServerState, iter_sorted


@dataclass(frozen=True)
class AvgConfig(MethodConfig):
    """Options shared by FedAvg-style methods."""

    server_opt: Literal["avg", "fedadam"] = "avg"
    server_lr: float = 1.0  # 1.0 with "avg" is plain FedAvg
    beta1: float = 0.9  # FedAdam (Reddi et al. 2021) moments
    beta2: float = 0.99
    tau: float = 1e-3  # FedAdam adaptivity floor
    weighting: Literal["examples", "uniform"] = "examples"

    def check(self):
        if self.server_lr <= 0:
            yield "server_lr", "must be > 0"
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            yield "beta1", "betas must be in [0, 1)"
        if self.tau <= 0:
            yield "tau", "must be > 0"


def make_optimizer(params: Iterable[torch.nn.Parameter], cfg: Config) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)


def local_train(ctx: ClientContext, params: list[torch.nn.Parameter], cfg: Config, flop_tag: tuple = ()) -> float:
    """Run `train.local_steps` optimiser steps (or `train.epochs` passes) of the task loss on the client's data.

    The optimiser is created fresh each round (no optimiser state leaves or persists).
    Returns the mean training loss over the steps.
    """
    model, task = ctx.model, ctx.task
    model.train()
    opt = make_optimizer(params, cfg)
    losses = []
    for batch in task.batches(ctx.data, cfg.train.steps_for(len(ctx.data)), cfg.train.batch_size, ctx.generator("batches")):
        def step():
            loss = task.loss(model, batch)
            loss.backward()
            return loss

        opt.zero_grad(set_to_none=True)
        loss = ctx.compute(flop_tag + task.flop_key(batch), step)
        opt.step()
        losses.append(float(loss.detach()))
    opt.zero_grad(set_to_none=True)
    return sum(losses) / len(losses)


def optimizer_state_factor(cfg: Config) -> int:
    """Extra fp32 tensors per trainable parameter kept by the local optimiser."""
    if cfg.train.optimizer == "adamw":
        return 2
    return 1 if cfg.train.momentum > 0 else 0


def tokens_per_sample(model: torch.nn.Module, cfg: Config) -> int:
    """Tokens a transformer block sees per sample: the model config's `num_tokens` when it has
    one (tiny-vit: its patches), else text's `data.max_len`."""
    return int(getattr(getattr(model, "config", None), "num_tokens", cfg.data.max_len))


def estimate_memory(model: torch.nn.Module, trainable: int, cfg: Config) -> int:
    """Peak training memory (bytes) of a client holding `model` and training `trainable` params."""
    from hetfl.system.memory import estimate_training_memory, transformer_activation_bytes

    total = sum(p.numel() for p in model.parameters())
    c = getattr(model, "config", None)
    act = 0  # models without a transformer config (toy nets) have negligible activations
    if c is not None and hasattr(c, "hidden_size"):
        act = transformer_activation_bytes(cfg.train.batch_size, tokens_per_sample(model, cfg), c.hidden_size,
                                           c.num_hidden_layers, intermediate=getattr(c, "intermediate_size", None))
    opt = "adamw" if cfg.train.optimizer == "adamw" else ("sgd_momentum" if cfg.train.momentum > 0 else "sgd")
    return estimate_training_memory(total - trainable, trainable, optimizer=opt, activation_bytes=act)


class ServerOptimizer:
    """Applies the round's mean client delta to the global tensors: plain averaging or FedAdam.

    The moments live in the server state (keys `opt.m.*`, `opt.v.*`) so they are checkpointed.
    """

    def __init__(self, mcfg: AvgConfig):
        self.c = mcfg

    def step(self, state: ServerState, key: str, delta: dict[str, torch.Tensor]) -> None:
        g = state[key]
        for name, d in delta.items():
            if self.c.server_opt == "avg":
                g[name] = g[name] + self.c.server_lr * d
                continue
            m = state.setdefault("opt.m", {}).get(name, torch.zeros_like(d))
            v = state.setdefault("opt.v", {}).get(name, torch.zeros_like(d))
            m = self.c.beta1 * m + (1 - self.c.beta1) * d
            v = self.c.beta2 * v + (1 - self.c.beta2) * d * d
            state["opt.m"][name], state["opt.v"][name] = m, v
            g[name] = g[name] + self.c.server_lr * m / (v.sqrt() + self.c.tau)


class ParamAveraging(Method):
    """FedAvg over the tensors returned by `trainable(model)`; subclasses choose them.

    Down: the current global tensors (kind "model"). Up: the client's deltas (kind "update").
    Aggregate: example-weighted (or uniform) mean of deltas, then the server optimiser.
    """

    supports_selection = True  # `load` puts the whole global model on the client: data selection can run

    def __init__(self, cfg: Config, mcfg: AvgConfig):
        self.cfg, self.mcfg = cfg, mcfg
        self.server_opt = ServerOptimizer(mcfg)

    # -- subclass hooks -------------------------------------------------------------
    def prepare(self, model: torch.nn.Module) -> None:
        """Make the model's trainable part exist (e.g. inject LoRA)."""

    def trainable(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        raise NotImplementedError

    # -- contract -------------------------------------------------------------------
    def setup(self, scenario) -> ServerState:
        self.scenario = scenario
        self.prepare(scenario.model)
        return {"global": {k: p.detach().clone() for k, p in self.trainable(scenario.model).items()}}

    def plan(self, cid: int, device) -> tuple[dict, int]:
        n = sum(p.numel() for p in self.trainable(self.scenario.model).values())
        return {}, estimate_memory(self.scenario.model, n, self.cfg)

    def configure(self, state: ServerState, rnd: int, cids: list[int]) -> dict[int, Message]:
        return {cid: Message(dict(state["global"])) for cid in cids}

    def load(self, msg: Message, ctx: ClientContext) -> None:
        with torch.no_grad():
            for k, p in self.trainable(ctx.model).items():
                p.copy_(msg.tensors[k])

    def client_update(self, msg: Message, ctx: ClientContext) -> Message:
        self.load(msg, ctx)
        params = self.trainable(ctx.model)
        loss = local_train(ctx, list(params.values()), self.cfg, self.flop_tag(ctx))
        delta = {k: (p.detach() - msg.tensors[k]) for k, p in params.items()}
        return Message(delta, {NUM_EXAMPLES: len(ctx.data), TRAIN_LOSS: loss})

    def flop_tag(self, ctx: ClientContext) -> tuple:
        return (type(self).__name__,)

    def aggregate(self, state: ServerState, rnd: int, replies: dict[int, Message]) -> ServerState:
        if not replies:  # every sampled client skipped (e.g. empty coresets)
            return state
        w = {cid: (m.meta[NUM_EXAMPLES] if self.mcfg.weighting == "examples" else 1.0) for cid, m in replies.items()}
        total = float(sum(w.values()))
        mean: dict[str, torch.Tensor] = {}
        for cid, m in iter_sorted(replies):
            for k, d in m.tensors.items():
                mean[k] = mean[k] + d * (w[cid] / total) if k in mean else d * (w[cid] / total)
        self.server_opt.step(state, "global", mean)
        return state

    def eval_model(self, state: ServerState) -> torch.nn.Module:
        model = self.scenario.model
        with torch.no_grad():
            for k, p in self.trainable(model).items():
                p.copy_(state["global"][k])
        return model
