"""Ensemble of K full models (FLoRAL's baseline `ensemble` + EnsembleAvg, spec section 4):
output = sum_c pi_c f_c(x) with the same private noisy mixture as FLoRAL (methods/mixture.py; no
floor; members with pi_c < `skip_below` are not run). All K models travel both ways (plus the
logits as FLoRAL sends them); the server averages model c with p(i|c). With `router: oracle` it is
clustered FL with known clusters (an IFCA upper bound). Member 0 keeps the scenario's
initialisation; the others are re-initialised from their own seeds so the members do not start
identical."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from hetfl.engine.api import NUM_EXAMPLES, TRAIN_LOSS, ClientContext, Message, Method, RoundReport, ServerState
from hetfl.methods.common import FP32, ServerOptimizer, estimate_memory, fp32_nbytes, reply_meta_nbytes
from hetfl.methods.mixture import (LOGITS, Router, RouterConfig, mixture_average, mixture_weights,
                                   num_components, train_mixture)
from hetfl.models.floral import Mixture
from hetfl.registry import register_method
from hetfl.seeding import derive_seed


@dataclass(frozen=True)
class EnsembleConfig(RouterConfig):
    name: str = "ensemble"
    skip_below: float = 1e-3  # members weighted below this are skipped (as the official code)

    def check(self):
        yield from super().check()
        if not 0.0 <= self.skip_below < 1.0:
            yield "skip_below", "must be in [0, 1)"


class EnsembleModel(nn.Module):
    """K models mixed at the output by one `Mixture`: forward(batch) = sum_c pi_c members[c](batch)."""

    def __init__(self, members: list[nn.Module], mixture: Mixture, skip_below: float):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.mixture = mixture
        self.skip_below = skip_below

    def forward(self, batch):
        pi = self.mixture.weights()  # (K,), one draw per forward pass
        out = None
        for c, member in enumerate(self.members):
            if pi[c] < self.skip_below:
                continue
            y = pi[c] * member(batch)
            out = y if out is None else out + y
        return out


def reinit(model: nn.Module, seed: int) -> nn.Module:
    """Reset every layer with `reset_parameters` from `seed` (the global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in model.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    return model


def member_params(model: EnsembleModel) -> dict[str, nn.Parameter]:
    """What the server holds and averages: every member's parameters (``members.<c>.<name>``)."""
    return {n: p for n, p in model.named_parameters() if n.startswith("members.")}


def member_of(name: str) -> int:
    """The member c a parameter ``members.<c>.<name>`` belongs to: its slot in the average."""
    return int(name.split(".")[1])


@register_method("ensemble", EnsembleConfig, "Ensemble of K full models mixed by a private router")
class Ensemble(Method):
    # No data selection: the selection stages score with a language model, which EnsembleModel does not wrap.

    def __init__(self, cfg, mcfg: EnsembleConfig):
        self.cfg, self.mcfg = cfg, mcfg
        self.server_opt = ServerOptimizer(mcfg)

    # -- server state: the K member models ---------------------------------------------------
    def setup(self, scenario) -> ServerState:
        self.scenario = scenario
        self.k = num_components(self.mcfg, scenario)
        self.base_params = sum(p.numel() for p in scenario.model.parameters())
        base = scenario.model
        members = [base] + [reinit(copy.deepcopy(base), derive_seed(self.cfg.seed, "ensemble", c) % 2**31)
                            for c in range(1, self.k)]
        self.model = scenario.model = EnsembleModel(
            members, Mixture(self.k, self.mcfg.noise, self.mcfg.temperature, floor=0.0), self.mcfg.skip_below)
        for p in self.model.parameters():
            p.requires_grad_(True)
        self.router = Router(self.mcfg, self.k)
        self.model.mixture.logits.requires_grad_(self.router.learned)
        return self.router.init_state({"global": {n: p.detach().clone() for n, p in member_params(self.model).items()}})

    def plan(self, cid: int, device) -> tuple[dict, int]:
        clusters = self.scenario.client_clusters
        knobs = {"cluster": clusters[cid]} if clusters else {}  # the client knows its own cluster id
        n = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return knobs, estimate_memory(self.model, n, self.cfg)

    def configure(self, state: ServerState, rnd: int, cids: list[int]) -> dict[int, Message]:
        return {cid: Message({**state["global"], **self.router.down(state, cid)}) for cid in cids}

    # -- client step: all K members and the logits ------------------------------------------
    def load(self, msg: Message, ctx: ClientContext) -> None:
        with torch.no_grad():
            for n, p in member_params(ctx.model).items():
                p.copy_(msg.tensors[n])
            ctx.model.mixture.logits.copy_(self.router.held(ctx.knobs.get("cluster"), ctx.state,
                                                            msg.tensors.get(LOGITS)))

    def client_update(self, msg: Message, ctx: ClientContext) -> Message:
        self.load(msg, ctx)
        logits = ctx.model.mixture.logits
        groups = [{"params": list(member_params(ctx.model).values())}] + self.router.group(logits)
        loss = train_mixture(ctx, groups, self.cfg, (type(self).__name__, self.k), penalty=self.router.penalty(logits))
        tensors = {n: p.detach() - msg.tensors[n] for n, p in member_params(ctx.model).items()}
        tensors.update(self.router.finish(ctx.state, logits))
        return Message(tensors, {NUM_EXAMPLES: len(ctx.data), TRAIN_LOSS: loss})

    def expected_reply(self, down: Message, knobs: dict) -> dict[str, tuple[int, ...]]:
        """The deltas of the K members that came down; the K logits when K > 1."""
        shapes = {n: tuple(t.shape) for n, t in down.tensors.items() if n != LOGITS}
        return {**shapes, LOGITS: (self.k,)} if self.k > 1 else shapes

    # -- aggregation: member c by p(i|c) -----------------------------------------------------
    def aggregate(self, state: ServerState, rnd: int, replies: dict[int, Message]) -> ServerState:
        if not replies:
            return state
        p, p_given_c = mixture_weights(replies, self.mcfg.weighting, self.k)
        self.server_opt.step(state, "global", mixture_average(replies, p, p_given_c, member_of))
        self.router.absorb(state, replies)
        return state

    def report(self, state: ServerState, rnd: int, cids: list[int]) -> RoundReport:
        extra = (self.k - 1) * self.base_params
        return RoundReport(stats={"adaptor_params": extra, "param_overhead_pct": 100.0 * extra / self.base_params,
                                  "pi_max_mean": state.get("pi_max_mean", 1.0)})

    def payload(self, state: ServerState, rnd: int, cid: int, num_examples: int) -> tuple[int, int]:
        """Down: the K members (+ K logits from the server); up: their deltas + K logits."""
        logits_down, logits_up = self.router.payload_floats()
        tensors = fp32_nbytes(state["global"].values())
        return tensors + FP32 * logits_down, tensors + FP32 * logits_up + reply_meta_nbytes(num_examples)

    # -- evaluation: the members mixed by the client's logits --------------------------------
    def _personal(self, state: ServerState, logits: torch.Tensor) -> nn.Module:
        with torch.no_grad():
            for n, p in member_params(self.model).items():
                p.copy_(state["global"][n])
            self.model.mixture.logits.copy_(logits)
        return self.model

    def eval_model(self, state: ServerState) -> nn.Module:
        """A newcomer's model: uniform mixture (oracle: cluster 0, the server test set's view)."""
        return self._personal(state, self.router.held(0, {}, None))

    def client_eval_model(self, state: ServerState, cid: int, client_state: dict) -> nn.Module:
        """What client `cid` holds: its own logits (kept by itself or the server, or uniform)."""
        clusters = self.scenario.client_clusters
        server = state.get("logits", {}).get(cid)
        return self._personal(state, self.router.held(clusters[cid] if clusters else None, client_state, server))
