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

from hetfl.engine.api import ClientContext, Message, ServerState, iter_sorted
from hetfl.methods.hetrank import RANK, HetRankConfig, HetRankLoRA, client_weights, factor_keys
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
class FlexLoRA(HetRankLoRA):
    def setup(self, scenario) -> ServerState:
        state = self.setup_ranks(scenario)
        state["global"] = {n: t.clone() for n, t in lora_state_dict(scenario.model).items()}  # B = 0: dW = 0
        state["dw"] = {}
        for mod in self.modules:
            a, b = factor_keys(mod)
            state["dw"][mod] = self.s * state["global"][b] @ state["global"][a]  # (out, in)
        state["stats"] = {}
        return state

    def b_scale(self, k: int) -> float:
        """The top-k channels (A: right singular vectors) with B rescaled so that the client's
        s_k * B_k A_k is exactly the rank-k part of the global s * B A."""
        return self.s / self.local_scale(k)

    def configure(self, state: ServerState, rnd: int, cids: list[int]) -> dict[int, Message]:
        return self.slice_messages(state, rnd, cids)

    def client_update(self, msg: Message, ctx: ClientContext) -> Message:
        factors = {n: t for n, t in msg.tensors.items() if n.endswith((".lora_A", ".lora_B"))}
        loss, trained, head_delta = self.train_factors(ctx, factors, {n: msg.tensors[n] for n in self.head})
        k = msg.tensors[factor_keys(self.modules[0])[0]].shape[0]
        return self.reply(ctx, {**trained, **head_delta}, loss, k)  # the trained factors: the server needs their product

    def aggregate(self, state: ServerState, rnd: int, replies: dict[int, Message]) -> ServerState:
        w = client_weights(replies, self.mcfg.weighting)
        delta, flops = {}, 0.0
        for mod in self.modules:
            a, b = factor_keys(mod)
            avg = torch.zeros_like(state["dw"][mod])  # (out, in)
            for cid, msg in iter_sorted(replies):
                k = int(msg.meta[RANK])
                avg += (w[cid] * self.local_scale(k)) * (msg.tensors[b] @ msg.tensors[a])  # (out, k) @ (k, in)
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
        self.aggregate_head(state, replies, w)
        self.record_ranks(state, replies)
        return state

    def eval_model(self, state: ServerState) -> torch.nn.Module:
        return self.load_global(state)
