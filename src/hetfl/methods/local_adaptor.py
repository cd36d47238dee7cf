"""Local Adaptor (FLoRAL's baseline `floral_locallora`, spec section 4): FLoRAL with K = 1 whose
adaptor never leaves the client. Only the base model is federated (FedAvg weighted by n_i, then
the server optimiser); each client keeps one low-rank adaptor plus a bias per layer (rank rule
rho, 1% by default) in its private state and is evaluated with it merged into the base. A client
that has not trained yet holds the shared seeded initial adaptor. With K = 1 there is no mixture
to learn: the single weight is 1 and no logits travel or persist."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hetfl.engine.api import (NUM_EXAMPLES, TRAIN_LOSS, ClientContext, Message, Method, RoundReport, ServerState,
                             iter_sorted)
from hetfl.methods.common import ServerOptimizer, estimate_memory, fp32_nbytes, reply_meta_nbytes
from hetfl.methods.floral import ADAPTORS, FloralConfig, adaptor_groups, build_floral, preconditioner
from hetfl.methods.mixture import client_weights, train_mixture
from hetfl.models.floral import merge_into
from hetfl.registry import register_method


@dataclass(frozen=True)
class LocalAdaptorConfig(FloralConfig):
    name: str = "local-adaptor"
    num_adaptors: int = 1

    def check(self):
        yield from super().check()
        if self.num_adaptors != 1:
            yield "num_adaptors", "local-adaptor keeps exactly one adaptor per client (1)"
        if self.state != "stateful":
            yield "state", "local-adaptor keeps its adaptor on the client: only 'stateful'"
        if self.router != "learned":
            yield "router", "local-adaptor has no mixture to fix: only 'learned'"


def base_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The federated part: the base model (everything outside ``floral``)."""
    return {n: p for n, p in model.named_parameters() if not n.startswith("floral.")}


def adaptor_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The client's private part: its adaptor's factors and biases."""
    return {n: p for n, p in model.named_parameters() if n.startswith(ADAPTORS)}


@register_method("local-adaptor", LocalAdaptorConfig, "Local Adaptor: FedAvg base + one private adaptor per client")
class LocalAdaptor(Method):
    supports_selection = True  # `load` puts the base and the client's own adaptor in place

    def __init__(self, cfg, mcfg: LocalAdaptorConfig):
        self.cfg, self.mcfg = cfg, mcfg
        self.server_opt = ServerOptimizer(mcfg)

    # -- server state: the base model only ---------------------------------------------------
    def setup(self, scenario) -> ServerState:
        self.scenario = scenario
        self.base_count = sum(p.numel() for p in scenario.model.parameters())
        self.model = scenario.model
        self.plain, self.floral = build_floral(self.model, 1, self.mcfg, self.cfg.seed)
        self.floral.mixture.logits.requires_grad_(False)  # K = 1: the weight is 1, nothing to learn
        self.init_adaptor = {n: p.detach().clone() for n, p in adaptor_params(self.model).items()}
        return {"global": {n: p.detach().clone() for n, p in base_params(self.model).items()}}

    def plan(self, cid: int, device) -> tuple[dict, int]:
        clusters = self.scenario.client_clusters
        knobs = {"cluster": clusters[cid]} if clusters else {}
        n = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return knobs, estimate_memory(self.model, n, self.cfg)

    def configure(self, state: ServerState, rnd: int, cids: list[int]) -> dict[int, Message]:
        return {cid: Message(dict(state["global"])) for cid in cids}

    # -- client step: base and own adaptor, only the base goes up ----------------------------
    def _put(self, model: torch.nn.Module, base: dict[str, torch.Tensor], adaptor: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, p in base_params(model).items():
                p.copy_(base[n])
            for n, p in adaptor_params(model).items():
                p.copy_(adaptor[n])

    def load(self, msg: Message, ctx: ClientContext) -> None:
        self._put(ctx.model, msg.tensors, ctx.state.get("private", self.init_adaptor))

    def client_update(self, msg: Message, ctx: ClientContext) -> Message:
        self.load(msg, ctx)
        loss = train_mixture(ctx, adaptor_groups(ctx.model, self.mcfg, self.cfg), self.cfg,
                             (type(self).__name__, 1), before_step=preconditioner(ctx.model.floral, self.mcfg))
        ctx.state["private"] = {n: p.detach().clone() for n, p in adaptor_params(ctx.model).items()}
        tensors = {n: p.detach() - msg.tensors[n] for n, p in base_params(ctx.model).items()}
        return Message(tensors, {NUM_EXAMPLES: len(ctx.data), TRAIN_LOSS: loss})

    def expected_reply(self, down: Message, knobs: dict) -> dict[str, tuple[int, ...]]:
        """The base's deltas (the adaptor stays on the client)."""
        return {n: tuple(t.shape) for n, t in down.tensors.items()}

    # -- aggregation: FedAvg of the base -----------------------------------------------------
    def aggregate(self, state: ServerState, rnd: int, replies: dict[int, Message]) -> ServerState:
        if not replies:
            return state
        p = client_weights(replies, self.mcfg.weighting)
        mean: dict[str, torch.Tensor] = {}
        for cid, m in iter_sorted(replies):
            for n, d in m.tensors.items():
                mean[n] = mean[n] + p[cid] * d if n in mean else p[cid] * d
        self.server_opt.step(state, "global", mean)
        return state

    def report(self, state: ServerState, rnd: int, cids: list[int]) -> RoundReport:
        extra = self.floral.adaptor_params()
        return RoundReport(stats={"adaptor_params": extra, "param_overhead_pct": 100.0 * extra / self.base_count,
                                  "pi_max_mean": 1.0})

    def payload(self, state: ServerState, rnd: int, cid: int, num_examples: int) -> tuple[int, int]:
        """Down: the base; up: its delta (the adaptor stays on the client)."""
        n = fp32_nbytes(state["global"].values())
        return n, n + reply_meta_nbytes(num_examples)

    # -- evaluation: the base with the client's adaptor merged in ----------------------------
    def _merged(self, state: ServerState, adaptor: dict[str, torch.Tensor]) -> torch.nn.Module:
        self._put(self.model, state["global"], adaptor)
        return merge_into(self.plain, self.model, torch.zeros(1))  # K = 1: weight 1 (above the floor)

    def eval_model(self, state: ServerState) -> torch.nn.Module:
        """A newcomer's model: the base with the initial adaptor."""
        return self._merged(state, self.init_adaptor)

    def client_eval_model(self, state: ServerState, cid: int, client_state: dict) -> torch.nn.Module:
        return self._merged(state, client_state.get("private", self.init_adaptor))
