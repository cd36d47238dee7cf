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

from hetfl.engine.api import ClientContext, Message, Method, RoundReport, ServerState, iter_sorted
from hetfl.methods.common import ServerOptimizer, fp32_nbytes, reply_meta_nbytes
from hetfl.methods.hetrank import (RANK, HetRankConfig, RankBudget, aggregate_head, client_weights, factor_keys,
                                   factor_nbytes, head_state, inject_global_lora, load_head, local_scale, rank_reply,
                                   rank_report, record_ranks, train_factors)
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


def load_base(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy the merged weights into the base layers of the adapted modules."""
    with torch.no_grad():
        for n, m in lora_modules(model).items():
            m.base.weight.copy_(weights[weight_key(n)])


@register_method("flora-stack", FloraStackConfig, "FLoRA: stack client LoRAs, merge into the base every round")
class FloraStack(Method):
    supports_selection = True  # `load` puts the client's rank-k model in place: data selection can run

    def __init__(self, cfg, mcfg: FloraStackConfig):
        self.cfg, self.mcfg = cfg, mcfg
        self.r = cfg.lora.rank
        self.s = cfg.lora.alpha / self.r
        self.server_opt = ServerOptimizer(mcfg)

    def scale(self, k: int) -> float:
        """A fresh rank-k adapter's scaling s * r / k = alpha / k (what `set_rank` gives it anyway)."""
        return local_scale(self.s, self.r, k)

    # -- server -------------------------------------------------------------------------
    def setup(self, scenario) -> ServerState:
        self.scenario = scenario
        self.modules, self.units, self.head = inject_global_lora(scenario.model, self.cfg)
        mods = lora_modules(scenario.model)
        self.base_nbytes = fp32_nbytes(m.base.weight for m in mods.values())
        # the merged weights come down, whatever the rank
        self.budget = RankBudget(self.cfg, self.mcfg, scenario, self.units, down_nbytes=lambda k: self.base_nbytes)
        return {"rank": self.budget.initial_ranks(), "round_rank": {}, "head": head_state(scenario.model, self.head),
                "base": {weight_key(n): m.base.weight.detach().clone() for n, m in mods.items()}, "stats": {}}

    def plan(self, cid: int, device) -> tuple[dict, int]:
        return self.budget.plan(cid, device)

    def configure(self, state: ServerState, rnd: int, cids: list[int]) -> dict[int, Message]:
        """Per client: the merged weights of the adapted modules, its rank, and the head."""
        down = {cid: Message(dict(state["base"]), {RANK: state["rank"][cid]}, kind="model") for cid in cids}
        for msg in down.values():
            msg.tensors.update(state["head"])
        return down

    def expected_reply(self, down: Message, knobs: dict) -> dict[str, tuple[int, ...]]:
        """Per adapted module (whose merged weight (out, in) came down) the trained rank-k factors
        A (k, in) and B (out, k), k the rank sent with the model; the head's deltas."""
        k = int(down.meta[RANK])
        shapes = {n: tuple(down.tensors[n].shape) for n in self.head}
        for mod in self.modules:
            out, inp = down.tensors[weight_key(mod)].shape
            a, b = factor_keys(mod)
            shapes[a], shapes[b] = (k, inp), (out, k)
        return shapes

    def aggregate(self, state: ServerState, rnd: int, replies: dict[int, Message]) -> ServerState:
        w = client_weights(replies, self.mcfg.weighting)
        merge, flops = {}, 0.0
        for mod in self.modules:
            a, b = factor_keys(mod)
            sb, sa = stack([((w[c] * self.scale(int(m.meta[RANK]))) * m.tensors[b], m.tensors[a])
                            for c, m in iter_sorted(replies)])
            merge[weight_key(mod)] = sb @ sa  # (out, sum k) @ (sum k, in)
            flops += 2.0 * sb.shape[0] * sb.shape[1] * sa.shape[1]
        self.server_opt.step(state, "base", merge)
        state["stats"] = {"server_flops": flops, "stacked_rank": sum(int(m.meta[RANK]) for m in replies.values())}
        aggregate_head(state, replies, w, self.head, self.server_opt)
        record_ranks(state, replies)
        return state

    def report(self, state: ServerState, rnd: int, cids: list[int]) -> RoundReport:
        return rank_report(state)

    def observe(self, state: ServerState, rnd: int, costs: dict) -> None:
        self.budget.observe(state, costs)

    def eval_model(self, state: ServerState) -> torch.nn.Module:
        model = self.scenario.model
        load_base(model, state["base"])
        for m in lora_modules(model).values():
            m.set_rank(1)  # B = 0: the adapter adds nothing; everything learned is merged in the base
        load_head(model, self.head, state["head"])
        return model

    def payload(self, state: ServerState, rnd: int, cid: int, num_examples: int) -> tuple[int, int]:
        """Down: the merged weights, the head and the rank; up: the trained rank-k factors, the
        head's deltas and the reply's metadata."""
        k = state["rank"][cid]
        head = fp32_nbytes(state["head"].values())
        down = self.base_nbytes + head + Message(meta={RANK: k}).meta_nbytes()
        up = factor_nbytes(k, self.units) + head + reply_meta_nbytes(num_examples, **{RANK: k})
        return down, (up if num_examples else 0)

    # -- client -------------------------------------------------------------------------
    def load(self, msg: Message, ctx: ClientContext) -> None:
        """The merged global weights plus a fresh rank-k adapter (A Kaiming-uniform, B = 0) and the head."""
        load_base(ctx.model, msg.tensors)
        g = ctx.generator("lora-init")
        for m in lora_modules(ctx.model).values():
            m.set_rank(int(msg.meta[RANK]), g)
        load_head(ctx.model, self.head, msg.tensors)

    def client_update(self, msg: Message, ctx: ClientContext) -> Message:
        k = int(msg.meta[RANK])
        self.load(msg, ctx)
        start = {n: t.clone() for n, t in lora_state_dict(ctx.model).items()}
        loss, trained, head_delta = train_factors(ctx, self.cfg, self.budget, start, self.head,
                                                  {n: msg.tensors[n] for n in self.head}, self.scale, "FloraStack")
        return rank_reply(ctx, {**trained, **head_delta}, loss, k)
