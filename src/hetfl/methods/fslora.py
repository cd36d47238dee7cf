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

from hetfl.engine.api import ClientContext, Message, ServerState, iter_sorted
from hetfl.seeding import generator
from hetfl.methods.hetrank import HetRankConfig, HetRankLoRA, client_weights, factor_keys, index_key
from hetfl.models.lora import lora_state_dict
from hetfl.registry import register_method


@dataclass(frozen=True)
class FSLoRAConfig(HetRankConfig):
    name: str = "fslora"
    # The paper divides the scattered sum by P; "examples" weights by n_i / sum n (still unbiased).
    weighting: Literal["examples", "uniform"] = "uniform"


@register_method("fslora", FSLoRAConfig, "FSLoRA: random-k sketches of a high-rank global LoRA (heterogeneous k_i)")
class FSLoRA(HetRankLoRA):
    send_indices = True  # the index sets cross the link both ways (HeteroLoRA needs none)

    def setup(self, scenario) -> ServerState:
        state = self.setup_ranks(scenario)
        state["global"] = {n: t.clone() for n, t in lora_state_dict(scenario.model).items()}
        return state

    def indices(self, rnd: int, cid: int, mod: str, k: int) -> torch.Tensor:
        """The k channels client `cid` trains in module `mod` in round `rnd`: a uniform k-subset of
        0..r-1, seeded by (seed, round, client, module) only, sorted (so k = r keeps channel order)."""
        perm = torch.randperm(self.r, generator=generator(self.cfg.seed, rnd, cid, "sketch", mod))
        return perm[:k].sort().values  # (k,) int64

    def configure(self, state: ServerState, rnd: int, cids: list[int]) -> dict[int, Message]:
        return self.slice_messages(state, rnd, cids)

    def client_update(self, msg: Message, ctx: ClientContext) -> Message:
        start = {n: t for n, t in msg.tensors.items() if n.endswith((".lora_A", ".lora_B"))}
        head = {n: msg.tensors[n] for n in self.head}
        loss, trained, head_delta = self.train_factors(ctx, start, head)  # local scaling s * r / k
        up = {n: trained[n] - start[n] for n in start}  # deltas (k, in) and (out, k)
        up.update(head_delta)
        up.update({n: t for n, t in msg.tensors.items() if n.endswith(".index")})
        k = start[factor_keys(self.modules[0])[0]].shape[0]
        return self.reply(ctx, up, loss, k)

    def reply_indices(self, msg: Message, mod: str) -> torch.Tensor:
        """Which global channels a reply's factors belong to (int64 for indexing)."""
        idx = msg.tensors.get(index_key(mod))
        if idx is not None:
            return idx.long()  # a uint8 tensor would index as a boolean mask
        return torch.arange(msg.tensors[factor_keys(mod)[0]].shape[0])

    def aggregate(self, state: ServerState, rnd: int, replies: dict[int, Message]) -> ServerState:
        w = client_weights(replies, self.mcfg.weighting)  # 1/P each by default
        mean = {n: torch.zeros_like(t) for n, t in state["global"].items()}
        for cid, msg in iter_sorted(replies):
            for mod in self.modules:
                a, b = factor_keys(mod)
                idx = self.reply_indices(msg, mod)
                mean[a][idx] += w[cid] * msg.tensors[a]  # scatter rows: (k, in) into (r, in)
                mean[b][:, idx] += w[cid] * msg.tensors[b]  # scatter columns: (out, k) into (out, r)
        self.server_opt.step(state, "global", mean)
        self.aggregate_head(state, replies, w)
        self.record_ranks(state, replies)
        return state

    def eval_model(self, state: ServerState) -> torch.nn.Module:
        return self.load_global(state)
