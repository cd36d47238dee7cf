"""Mechanics shared by the methods, as functions and one small component: local optimisation,
memory estimates, the server optimiser, FedAvg over a named set of tensors, LoRA injection, and
the byte counts of `Method.payload`.

A method calls these; none of them is a base class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal

import torch

from hetfl.config import Config, MethodConfig, ServerConfig
from hetfl.engine.api import NUM_EXAMPLES, TRAIN_LOSS, ClientContext, Message, ServerState, iter_sorted
from hetfl.engine.robust import ORDER_RULES, clip_replies, combine
from hetfl.models.lora import inject_lora
from hetfl.seeding import derive_seed

FP32 = 4  # bytes per value of a tensor sent with the lossless fp32 codec


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


# ----------------------------------------------------------------------------- local training


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


def copy_into(params: dict[str, torch.nn.Parameter], tensors: dict[str, torch.Tensor]) -> None:
    """Overwrite every named parameter with the tensor of the same name."""
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[k])


# ----------------------------------------------------------------------------- memory estimates


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


# ----------------------------------------------------------------------------- the server optimiser


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


# ----------------------------------------------------------------------------- FedAvg over named tensors


def lora_and_head(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The LoRA factors plus any parameters the model asks to train densely, in parameter order.

    A classifier lists its freshly initialised head in `head_param_names()`; the head trains in
    full and is averaged with the adapter (as the FSLoRA and FedV papers do for GLUE heads).
    """
    head = set(head_names(model))
    return {k: p for k, p in model.named_parameters() if "lora_" in k or k in head}


def head_names(model: torch.nn.Module) -> list[str]:
    """The names of a classifier's dense head parameters; empty for language models."""
    return list(getattr(model, "head_param_names", lambda: [])())


def inject_run_lora(model: torch.nn.Module, cfg: Config) -> None:
    """Inject the run's LoRA (`lora.*`) with the seeded init every LoRA method starts from."""
    lc = cfg.lora
    g = torch.Generator().manual_seed(derive_seed(cfg.seed, "lora-init"))
    inject_lora(model, rank=lc.rank, alpha=lc.alpha, targets=lc.targets, regex=lc.regex,
                exclude=lc.exclude, dropout=lc.dropout, generator=g)


def train_delta(msg: Message, ctx: ClientContext, params: dict[str, torch.nn.Parameter], cfg: Config,
                flop_tag: tuple) -> Message:
    """FedAvg's client step: start `params` from the global tensors in `msg`, train them locally,
    and return their deltas with the example count and mean loss."""
    copy_into(params, msg.tensors)
    loss = local_train(ctx, list(params.values()), cfg, flop_tag)
    delta = {k: (p.detach() - msg.tensors[k]) for k, p in params.items()}
    return Message(delta, {NUM_EXAMPLES: len(ctx.data), TRAIN_LOSS: loss}, kind="update")


def mean_delta(replies: dict[int, Message], weighting: str,
               server: ServerConfig | None = None) -> dict[str, torch.Tensor]:
    """The example-weighted (or uniform) mean of the replies' deltas, summed in client-id order.

    Args:
        replies: the round's replies, each a delta per tensor name (the same names in all).
        weighting: ``examples`` (n_i / sum n) or ``uniform``.
        server: the run's `server:` section; its `aggregator` (engine/robust.py) replaces the mean
            by a coordinate-wise median or trimmed mean, or clips each delta's norm first. None
            or ``mean``: the plain weighted mean.
    """
    rule = "mean" if server is None else server.aggregator
    if rule == "norm-clip":
        replies = clip_replies(replies, server.clip_norm)
    w = {cid: (m.meta[NUM_EXAMPLES] if weighting == "examples" else 1.0) for cid, m in replies.items()}
    total = float(sum(w.values()))
    if rule in ORDER_RULES:
        cids = sorted(replies)
        weights = torch.tensor([w[c] / total for c in cids])  # (P,)
        return {k: combine(torch.stack([replies[c].tensors[k] for c in cids]), weights, rule, server.trim_beta)
                for k in replies[cids[0]].tensors}  # (P, ...) -> (...)
    mean: dict[str, torch.Tensor] = {}
    for cid, m in iter_sorted(replies):
        for k, d in m.tensors.items():
            mean[k] = mean[k] + d * (w[cid] / total) if k in mean else d * (w[cid] / total)
    return mean


# ----------------------------------------------------------------------------- payload bytes


def fp32_nbytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of these (floating) tensors with the fp32 codec: 4 per value, whatever their dtype."""
    return sum(FP32 * t.numel() for t in tensors)


def reply_meta_nbytes(num_examples: int, **extra) -> int:
    """Bytes of a client reply's metadata: the JSON of {num_examples, train_loss, **extra}.

    The loss's JSON length depends on its digits, which are unknown before training: it is counted
    as an 18-character float (e.g. 0.6302052140235901), so the figure is exact to within the few
    characters by which the real loss's repr differs.
    """
    return Message(meta={NUM_EXAMPLES: num_examples, TRAIN_LOSS: TYPICAL_LOSS, **extra}).meta_nbytes()


TYPICAL_LOSS = 0.6302052140235901  # a float whose repr has 18 characters, like most losses


def mirrored_payload(nbytes: int, num_examples: int, **meta) -> tuple[int, int]:
    """(down, up) of a method whose reply carries the same tensors as its download (`nbytes`) plus
    the reply's metadata; a client with no data to train on (`num_examples` 0) sends nothing."""
    return nbytes, (nbytes + reply_meta_nbytes(num_examples, **meta) if num_examples else 0)


def mirrored_reply(down: Message) -> dict[str, tuple[int, ...]]:
    """`Method.expected_reply` of a method whose reply carries the same tensors as its download
    (the deltas, or the trained values, of exactly what came down): their names and shapes."""
    return {k: tuple(t.shape) for k, t in down.tensors.items()}
