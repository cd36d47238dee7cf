"""FSLoRA: federated sketching LoRA (Fang et al., arXiv 2501.19389; spec: shared/spec/fslora.md).

The server keeps a rank-r LoRA (B, A) per adapted module. Each round, every sampled client i
gets a fresh random index set I of k_i of the r rank channels per module (uniform, without
replacement; the SAME I for the module's B and A), receives only B[:, I] (out, k_i), A[I, :]
(k_i, in) and I, trains them with local scaling s * r / k_i, and sends back their deltas and I.

Why r / k_i: with the diagonal sketch S = (r/k) sum_{j in I} e_j e_j^T, E[S] = I_r, so the
client's adapter s * B S A = s * (r/k) B[:, I] A[I, :] is an unbiased estimate of s * B A.

Server: scatter every client's deltas into zero matrices of global size and divide by the number
of sampled clients P (not by how many clients touched an index: that keeps the estimate unbiased
and works with secure aggregation), then plain averaging or FedAdam on that pseudo-gradient.
Evaluation uses the full global module with scaling s (no r / k factor). With k_i = r for every
client this is exactly FedIT with uniform client weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from hetfl.engine.api import ClientContext, Message, Method, RoundReport, ServerState
from hetfl.methods.common import ServerOptimizer, fp32_nbytes, mirrored_payload, mirrored_reply
from hetfl.methods.hetrank import (RANK, HetRankConfig, RankBudget, aggregate_head, client_weights, factor_keys,
                                   factor_nbytes, head_state, index_dtype, inject_global_lora, load_factors,
                                   load_global, load_head, local_scale, rank_reply, rank_report, record_ranks,
                                   scatter_mean, slice_factors, train_factors)
from hetfl.models.lora import lora_state_dict
from hetfl.registry import register_method
from hetfl.seeding import generator


@dataclass(frozen=True)
class FSLoRAConfig(HetRankConfig):
    name: str = "fslora"
    # The paper divides the scattered sum by P; "examples" weights by n_i / sum n (still unbiased).
    weighting: Literal["examples", "uniform"] = "uniform"


@register_method("fslora", FSLoRAConfig, "FSLoRA: random-k sketches of a high-rank global LoRA (heterogeneous k_i)")
class FSLoRA(Method):
    supports_selection = True  # `load` puts the client's rank-k model in place: data selection can run
    robust_aggregation = True  # `aggregate` averages through scatter_mean / aggregate_head (server.aggregator)

    def __init__(self, cfg, mcfg: FSLoRAConfig):
        self.cfg, self.mcfg = cfg, mcfg
        self.r = cfg.lora.rank
        self.s = cfg.lora.alpha / self.r  # the global adapter's scaling (used for evaluation)
        self.server_opt = ServerOptimizer(mcfg)

    def scale(self, k: int) -> float:
        return local_scale(self.s, self.r, k)

    def indices(self, rnd: int, cid: int, mod: str, k: int) -> torch.Tensor:
        """The k channels client `cid` trains in module `mod` in round `rnd`: a uniform k-subset of
        0..r-1, seeded by (seed, round, client, module) only, sorted (so k = r keeps channel order)."""
        perm = torch.randperm(self.r, generator=generator(self.cfg.seed, rnd, cid, "sketch", mod))
        return perm[:k].sort().values  # (k,) int64

    # -- server -------------------------------------------------------------------------
    def setup(self, scenario) -> ServerState:
        self.scenario = scenario
        self.modules, self.units, self.head = inject_global_lora(scenario.model, self.cfg)
        self.budget = RankBudget(self.cfg, self.mcfg, scenario, self.units)
        return {"rank": self.budget.initial_ranks(), "round_rank": {}, "head": head_state(scenario.model, self.head),
                "global": {n: t.clone() for n, t in lora_state_dict(scenario.model).items()}}

    def plan(self, cid: int, device) -> tuple[dict, int]:
        return self.budget.plan(cid, device)

    def configure(self, state: ServerState, rnd: int, cids: list[int]) -> dict[int, Message]:
        """Per client: its sketch I of every module, the global A[I, :] and B[:, I], and the head."""
        down = {}
        for cid in cids:
            k = state["rank"][cid]
            tensors = slice_factors(state["global"], self.modules, lambda mod: self.indices(rnd, cid, mod, k),
                                    index=index_dtype(self.r))
            down[cid] = Message(tensors, kind="model")
        for msg in down.values():
            msg.tensors.update(state["head"])
        return down

    def expected_reply(self, down: Message, knobs: dict) -> dict[str, tuple[int, ...]]:
        """The deltas of the rank-k factors and the head that came down, and the channel indices."""
        return mirrored_reply(down)

    def aggregate(self, state: ServerState, rnd: int, replies: dict[int, Message]) -> ServerState:
        w = client_weights(replies, self.mcfg.weighting)  # 1/P each by default
        self.server_opt.step(state, "global", scatter_mean(state["global"], self.modules, replies, w, self.cfg.server))
        aggregate_head(state, replies, w, self.head, self.server_opt, self.cfg.server)
        record_ranks(state, replies)
        return state

    def report(self, state: ServerState, rnd: int, cids: list[int]) -> RoundReport:
        return rank_report(state)

    def observe(self, state: ServerState, rnd: int, costs: dict) -> None:
        self.budget.observe(state, costs)

    def eval_model(self, state: ServerState) -> torch.nn.Module:
        return load_global(self.scenario.model, state["global"], self.head, state["head"], self.s)

    def payload(self, state: ServerState, rnd: int, cid: int, num_examples: int) -> tuple[int, int]:
        """The rank-k factors, their channel indices and the head each way; the rank with the reply."""
        k = state["rank"][cid]
        index = len(self.modules) * k * index_dtype(self.r).itemsize
        n = factor_nbytes(k, self.units) + index + fp32_nbytes(state["head"].values())
        return mirrored_payload(n, num_examples, **{RANK: k})

    # -- client -------------------------------------------------------------------------
    def load(self, msg: Message, ctx: ClientContext) -> None:
        """The client's rank-k factors at scaling s * r / k, and the global head."""
        load_factors(ctx.model, msg.tensors, self.scale)
        load_head(ctx.model, self.head, msg.tensors)

    def client_update(self, msg: Message, ctx: ClientContext) -> Message:
        start = {n: t for n, t in msg.tensors.items() if n.endswith((".lora_A", ".lora_B"))}
        head = {n: msg.tensors[n] for n in self.head}
        loss, trained, head_delta = train_factors(ctx, self.cfg, self.budget, start, self.head, head, self.scale,
                                                  "FSLoRA")
        up = {n: trained[n] - start[n] for n in start}  # deltas (k, in) and (out, k)
        up.update(head_delta)
        up.update({n: t for n, t in msg.tensors.items() if n.endswith(".index")})  # which channels they are
        k = start[factor_keys(self.modules[0])[0]].shape[0]
        return rank_reply(ctx, up, loss, k)
