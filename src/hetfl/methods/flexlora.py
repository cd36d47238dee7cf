"""FlexLoRA (Bai et al., NeurIPS 2024; spec: shared/spec/fslora.md, section 4).

The server keeps a dense update dW (out, in) per adapted module and its truncated SVD
dW = U S Vh. Client i receives the best rank-k_i approximation of dW as LoRA factors
B_i = U[:, :k] S[:k] / s_k (out, k) and A_i = Vh[:k] (k, in), where s_k = alpha / k is its
local scaling, trains them, and sends them back. The server averages the clients' products
s_k B_i A_i (weighted by data size, as in the FlexLoRA paper; `method.weighting`), applies the
server optimiser to dW, and re-factorises with one SVD per module per round. Its FLOPs and wall
time are reported per round (`server_svd_flops`, `server_svd_wall_s`).

The global model is the rank-r truncation of dW (r = lora.rank >= every k_i), stored as the
factors of the rank-r LoRA: B = U[:, :r] S[:r] / s (out, r), A = Vh[:r] (r, in). A client's
factors are therefore the first k columns/rows of those, with B rescaled by s / s_k.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from hetfl.engine.api import ClientContext, Message, Method, RoundReport, ServerState, iter_sorted
from hetfl.methods.common import ServerOptimizer, fp32_nbytes, mirrored_payload, mirrored_reply
from hetfl.methods.hetrank import (RANK, HetRankConfig, RankBudget, aggregate_head, client_weights, factor_keys,
                                   factor_nbytes, head_state, inject_global_lora, load_factors, load_global,
                                   load_head, local_scale, rank_reply, rank_report, record_ranks, slice_factors,
                                   train_factors)
from hetfl.models.lora import lora_state_dict
from hetfl.registry import register_method


@dataclass(frozen=True)
class FlexLoRAConfig(HetRankConfig):
    name: str = "flexlora"


def svd_flops(m: int, n: int) -> float:
    """FLOPs of a thin SVD (U1, S, V) of an m x n matrix by R-SVD: 6 p q^2 + 20 q^3 with
    p = max(m, n), q = min(m, n) (Golub & Van Loan, Matrix Computations, 4th ed., Fig. 8.6.1)."""
    p, q = max(m, n), min(m, n)
    return 6.0 * p * q * q + 20.0 * q**3


def truncate(dw: torch.Tensor, k: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors (B (out, k), A (k, in)) with scale * B @ A = the best rank-k approximation of dw."""
    u, s, vh = torch.linalg.svd(dw, full_matrices=False)  # (out, q), (q,), (q, in)
    return u[:, :k] * (s[:k] / scale), vh[:k].contiguous()


@register_method("flexlora", FlexLoRAConfig, "FlexLoRA: SVD redistribution of the averaged dense LoRA products")
class FlexLoRA(Method):
    supports_selection = True  # `load` puts the client's rank-k model in place: data selection can run

    def __init__(self, cfg, mcfg: FlexLoRAConfig):
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
        state = {"rank": self.budget.initial_ranks(), "round_rank": {}, "head": head_state(scenario.model, self.head),
                 "global": {n: t.clone() for n, t in lora_state_dict(scenario.model).items()}, "dw": {}}
        for mod in self.modules:  # B = 0: dW = 0
            a, b = factor_keys(mod)
            state["dw"][mod] = self.s * state["global"][b] @ state["global"][a]  # (out, in)
        state["stats"] = {}
        return state

    def plan(self, cid: int, device) -> tuple[dict, int]:
        return self.budget.plan(cid, device)

    def configure(self, state: ServerState, rnd: int, cids: list[int]) -> dict[int, Message]:
        """Per client: the top-k channels (A: right singular vectors) with B rescaled by s / s_k, so
        that the client's s_k * B_k A_k is exactly the rank-k part of the global s * B A; the head."""
        down = {}
        for cid in cids:
            k = state["rank"][cid]
            first_k = torch.arange(k)
            tensors = slice_factors(state["global"], self.modules, lambda mod: first_k, b_scale=self.s / self.scale(k))
            down[cid] = Message(tensors, kind="model")
        for msg in down.values():
            msg.tensors.update(state["head"])
        return down

    def expected_reply(self, down: Message, knobs: dict) -> dict[str, tuple[int, ...]]:
        """The trained rank-k factors (the shapes that came down) and the head's deltas."""
        return mirrored_reply(down)

    def aggregate(self, state: ServerState, rnd: int, replies: dict[int, Message]) -> ServerState:
        w = client_weights(replies, self.mcfg.weighting)
        delta, flops = {}, 0.0
        for mod in self.modules:
            a, b = factor_keys(mod)
            avg = torch.zeros_like(state["dw"][mod])  # (out, in)
            for cid, msg in iter_sorted(replies):
                k = int(msg.meta[RANK])
                avg += (w[cid] * self.scale(k)) * (msg.tensors[b] @ msg.tensors[a])  # (out, k) @ (k, in)
                flops += 2.0 * avg.numel() * k
            delta[mod] = avg - state["dw"][mod]  # plain averaging with server_lr 1 sets dW = avg
        self.server_opt.step(state, "dw", delta)
        t0, svd = time.perf_counter(), 0.0
        for mod in self.modules:
            a, b = factor_keys(mod)
            state["global"][b], state["global"][a] = truncate(state["dw"][mod], self.r, self.s)
            svd += svd_flops(*state["dw"][mod].shape)
        state["stats"] = {"server_svd_flops": svd, "server_flops": svd + flops,
                          "server_svd_wall_s": time.perf_counter() - t0}
        aggregate_head(state, replies, w, self.head, self.server_opt)
        record_ranks(state, replies)
        return state

    def report(self, state: ServerState, rnd: int, cids: list[int]) -> RoundReport:
        return rank_report(state)

    def observe(self, state: ServerState, rnd: int, costs: dict) -> None:
        self.budget.observe(state, costs)

    def eval_model(self, state: ServerState) -> torch.nn.Module:
        return load_global(self.scenario.model, state["global"], self.head, state["head"], self.s)

    def payload(self, state: ServerState, rnd: int, cid: int, num_examples: int) -> tuple[int, int]:
        """The rank-k factors and the head each way (trained factors, not deltas, go up); the rank
        with the reply."""
        k = state["rank"][cid]
        n = factor_nbytes(k, self.units) + fp32_nbytes(state["head"].values())
        return mirrored_payload(n, num_examples, **{RANK: k})

    # -- client -------------------------------------------------------------------------
    def load(self, msg: Message, ctx: ClientContext) -> None:
        """The client's rank-k factors at scaling s_k, and the global head."""
        load_factors(ctx.model, msg.tensors, self.scale)
        load_head(ctx.model, self.head, msg.tensors)

    def client_update(self, msg: Message, ctx: ClientContext) -> Message:
        factors = {n: t for n, t in msg.tensors.items() if n.endswith((".lora_A", ".lora_B"))}
        loss, trained, head_delta = train_factors(ctx, self.cfg, self.budget, factors, self.head,
                                                  {n: msg.tensors[n] for n in self.head}, self.scale, "FlexLoRA")
        k = msg.tensors[factor_keys(self.modules[0])[0]].shape[0]
        return rank_reply(ctx, {**trained, **head_delta}, loss, k)  # the trained factors: the server needs their product
