"""FLoRA / FedStackLoRA (Wang et al., NeurIPS 2024; spec: shared/spec/fslora.md, section 4).

Every round each sampled client trains a FRESH LoRA of its rank k_i (standard init, seeded by
(seed, round, client)) on top of the current merged model, and sends the trained factors. The
server stacks them, B = [w_1 s_1 B_1, ..., w_P s_P B_P] (out, sum k_i) and A = [A_1; ...; A_P]
(sum k_i, in), so that B @ A = sum_i w_i s_i B_i A_i (the weighted average of the client
products, with no cross terms), and merges that into the base weights of the adapted modules.

The next round starts from the merged model, so the downlink is what FLoRA really needs: the
merged base weights of every adapted module (out x in each), sent in the message and counted
by the link. Weights w_i follow `method.weighting` (data size by default, as in the paper).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hetfl.engine.api import ClientContext, Message, ServerState, iter_sorted
from hetfl.methods.hetrank import FP32, RANK, HetRankConfig, HetRankLoRA, client_weights, factor_keys
from hetfl.models.lora import lora_modules, lora_state_dict
from hetfl.registry import register_method


@dataclass(frozen=True)
class FloraStackConfig(HetRankConfig):
    name: str = "flora-stack"


def stack(factors: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack client factors [(B_i (out, k_i), A_i (k_i, in))] into (B (out, sum k), A (sum k, in))."""
    return torch.cat([b for b, _ in factors], dim=1), torch.cat([a for _, a in factors], dim=0)


def weight_key(mod: str) -> str:
    return f"{mod}.weight"


@register_method("flora-stack", FloraStackConfig, "FLoRA: stack client LoRAs, merge into the base every round")
class FloraStack(HetRankLoRA):
    def setup(self, scenario) -> ServerState:
        state = self.setup_ranks(scenario)
        state["base"] = {weight_key(n): m.base.weight.detach().clone() for n, m in lora_modules(scenario.model).items()}
        state["stats"] = {}
        return state

    def estimate_bytes(self, k: int) -> tuple[int, int]:
        up, _ = super().estimate_bytes(k)
        mods = lora_modules(self.scenario.model).values()
        return up, FP32 * sum(m.in_features * m.out_features for m in mods)  # merged weights come down

    def configure(self, state: ServerState, rnd: int, cids: list[int]) -> dict[int, Message]:
        return self.with_head(state, {cid: Message(dict(state["base"]), {RANK: state["rank"][cid]}, kind="model")
                                      for cid in cids})

    def _load_base(self, model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, m in lora_modules(model).items():
                m.base.weight.copy_(weights[weight_key(n)])

    def load(self, msg: Message, ctx: ClientContext) -> None:
        """The merged global weights plus a fresh rank-k adapter (A Kaiming-uniform, B = 0) and the head."""
        self._load_base(ctx.model, msg.tensors)  # the merged weights of the adapted modules
        g = ctx.generator("lora-init")
        for m in lora_modules(ctx.model).values():
            m.set_rank(int(msg.meta[RANK]), g)
        self.load_head(ctx.model, msg.tensors)

    def client_update(self, msg: Message, ctx: ClientContext) -> Message:
        k = int(msg.meta[RANK])
        self.load(msg, ctx)
        start = {n: t.clone() for n, t in lora_state_dict(ctx.model).items()}
        loss, trained, head_delta = self.train_factors(ctx, start, {n: msg.tensors[n] for n in self.head})
        return self.reply(ctx, {**trained, **head_delta}, loss, k)

    def aggregate(self, state: ServerState, rnd: int, replies: dict[int, Message]) -> ServerState:
        w = client_weights(replies, self.mcfg.weighting)
        merge, flops = {}, 0.0
        for mod in self.modules:
            a, b = factor_keys(mod)
            sb, sa = stack([((w[c] * self.local_scale(int(m.meta[RANK]))) * m.tensors[b], m.tensors[a])
                            for c, m in iter_sorted(replies)])
            merge[weight_key(mod)] = sb @ sa  # (out, sum k) @ (sum k, in)
            flops += 2.0 * sb.shape[0] * sb.shape[1] * sa.shape[1]
        self.server_opt.step(state, "base", merge)
        state["stats"] = {"server_flops": flops, "stacked_rank": sum(int(m.meta[RANK]) for m in replies.values())}
        self.aggregate_head(state, replies, w)
        self.record_ranks(state, replies)
        return state

    def eval_model(self, state: ServerState) -> torch.nn.Module:
        model = self.scenario.model
        self._load_base(model, state["base"])
        for m in lora_modules(model).values():
            m.set_rank(1)  # B = 0: the adapter adds nothing; everything learned is merged in the base
        self.load_head(model, state["head"])
        return model
