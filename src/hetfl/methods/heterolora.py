"""HeteroLoRA (HetLoRA; Cho et al., EMNLP 2024), as implemented in the FSLoRA authors' baseline
code (spec: shared/spec/fslora.md, section 4).

Client i receives the FIRST k_i rank channels of the global rank-r LoRA: B[:, :k_i] (out, k_i)
and A[:k_i, :] (k_i, in), trains them at standard LoRA scaling for its rank (alpha / k_i, the same
number as FSLoRA's s * r / k_i), and sends their deltas. The server zero-pads every delta to
global rank r, averages over the P sampled clients and applies the server optimiser.

So HeteroLoRA is FSLoRA with deterministic truncation instead of a random sketch: the index set
is 0..k_i-1 and is implied by k_i, so no indices cross the link. High channels are trained only by
the clients with large k_i (a biased estimate, unlike the sketch). The original paper's rank
self-pruning and sparsity-weighted aggregation are not implemented (the baseline code does not
use them either).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from hetfl.engine.api import ClientContext, Message, Method, RoundReport, ServerState
from hetfl.methods.common import ServerOptimizer, fp32_nbytes, mirrored_payload, mirrored_reply
from hetfl.methods.hetrank import (RANK, HetRankConfig, RankBudget, aggregate_head, client_weights, factor_keys,
                                   factor_nbytes, head_state, inject_global_lora, load_factors, load_global,
                                   load_head, local_scale, rank_reply, rank_report, record_ranks, scatter_mean,
                                   slice_factors, train_factors)
from hetfl.models.lora import lora_state_dict
from hetfl.registry import register_method


@dataclass(frozen=True)
class HeteroLoRAConfig(HetRankConfig):
    name: str = "heterolora"
    # Divide the zero-padded sum by P, as the FSLoRA baseline code does.
    weighting: Literal["examples", "uniform"] = "uniform"


@register_method("heterolora", HeteroLoRAConfig, "HeteroLoRA: first-k_i truncation of a rank-r LoRA, zero-padded average")
class HeteroLoRA(Method):
    supports_selection = True  # `load` puts the client's rank-k model in place: data selection can run
    robust_aggregation = True  # `aggregate` averages through scatter_mean / aggregate_head (server.aggregator)

    def __init__(self, cfg, mcfg: HeteroLoRAConfig):
        self.cfg, self.mcfg = cfg, mcfg
        self.r = cfg.lora.rank
        self.s = cfg.lora.alpha / self.r  # the global adapter's scaling (used for evaluation)
        self.server_opt = ServerOptimizer(mcfg)

    def scale(self, k: int) -> float:
        return local_scale(self.s, self.r, k)

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
        """Per client: the first k of the global channels, A[:k, :] and B[:, :k], and the head."""
        down = {}
        for cid in cids:
            first_k = torch.arange(state["rank"][cid])  # (k,): channels 0..k-1, every round
            down[cid] = Message(slice_factors(state["global"], self.modules, lambda mod: first_k), kind="model")
        for msg in down.values():
            msg.tensors.update(state["head"])
        return down

    def expected_reply(self, down: Message, knobs: dict) -> dict[str, tuple[int, ...]]:
        """The deltas of the rank-k factors and the head that came down."""
        return mirrored_reply(down)

    def aggregate(self, state: ServerState, rnd: int, replies: dict[int, Message]) -> ServerState:
        w = client_weights(replies, self.mcfg.weighting)  # 1/P each by default
        # With no indices in the replies, each delta lands on channels 0..k-1: zero-padding.
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
        """The rank-k factors and the head each way; the rank with the reply."""
        k = state["rank"][cid]
        n = factor_nbytes(k, self.units) + fp32_nbytes(state["head"].values())
        return mirrored_payload(n, num_examples, **{RANK: k})

    # -- client -------------------------------------------------------------------------
    def load(self, msg: Message, ctx: ClientContext) -> None:
        """The client's rank-k factors at scaling alpha / k, and the global head."""
        load_factors(ctx.model, msg.tensors, self.scale)
        load_head(ctx.model, self.head, msg.tensors)

    def client_update(self, msg: Message, ctx: ClientContext) -> Message:
        start = {n: t for n, t in msg.tensors.items() if n.endswith((".lora_A", ".lora_B"))}
        head = {n: msg.tensors[n] for n in self.head}
        loss, trained, head_delta = train_factors(ctx, self.cfg, self.budget, start, self.head, head, self.scale,
                                                  "HeteroLoRA")
        up = {n: trained[n] - start[n] for n in start}  # deltas (k, in) and (out, k)
        up.update(head_delta)
        k = start[factor_keys(self.modules[0])[0]].shape[0]
        return rank_reply(ctx, up, loss, k)
