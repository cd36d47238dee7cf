"""Pieces shared by the heterogeneous-rank LoRA methods (fslora, heterolora, flexlora, flora-stack).

Every client i trains a LoRA of its own rank k_i <= r, where r = `lora.rank` is the global rank.
This module chooses k_i, estimates what a client needs at rank k (memory, FLOPs, bytes, time),
and loads rank-k factors into the one shared model. How k_i is chosen (`method.sketch`):

- ``fixed``: drawn once per client from `method.rank_dist` (seeded; the FSLoRA paper's setup).
- ``policy``: the largest k whose estimated memory fits the client's device and whose estimated
  round time (compute + upload + download on its tier) meets `method.deadline_s`.
- ``adaptive``: starts like ``fixed``; after each round the loop reports every sampled client's
  measured cost to `observe`, which rescales that client's k by deadline / observed time.

All mutable method state (each client's current k) lives in the server state under "rank", so it
is checkpointed; the method object only keeps values derived once from the config and scenario.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import nn

from hetfl.engine.api import (NUM_EXAMPLES, TRAIN_LOSS, ClientContext, Message, Method, RoundReport, ServerState,
                             iter_sorted)
from hetfl.seeding import derive_seed, generator
from hetfl.methods.common import AvgConfig, ServerOptimizer, estimate_memory, local_train, tokens_per_sample
from hetfl.models.lora import inject_lora, load_lora_state_dict, lora_modules, lora_state_dict
from hetfl.system.cost import client_cost
from hetfl.system.memory import fits

RANK = "rank"  # reply metadata: the rank the client trained at (clients.csv's rank column)
FP32 = 4  # bytes per value of an fp32 tensor


@dataclass(frozen=True)
class HetRankConfig(AvgConfig):
    """How each client's rank (sketch size) k_i is chosen; shared by the heterogeneous-rank methods."""

    sketch: Literal["fixed", "policy", "adaptive"] = "fixed"
    rank_dist: Literal["ratios", "normal", "uniform", "heavy_tail_low"] = "ratios"
    ratios: tuple[float, ...] = (0.125, 0.25, 0.5)  # rank_dist=ratios: k_i / r drawn from these (paper v1)
    rank_low: int = 1  # normal / uniform / heavy_tail_low: k_i in [rank_low, rank_high]
    rank_high: int = 0  # 0: half the global rank (the paper's [1, 32] at r = 64)
    deadline_s: float = 0.0  # policy / adaptive: round-time budget per client in simulated seconds

    def check(self):
        yield from super().check()
        if not self.ratios or any(not 0 < x <= 1 for x in self.ratios):
            yield "ratios", "needs at least one ratio, each in (0, 1]"
        if self.rank_low < 1:
            yield "rank_low", "must be >= 1"
        if self.rank_high and self.rank_high < self.rank_low:
            yield "rank_high", f"must be 0 or >= rank_low ({self.rank_low})"
        if self.deadline_s < 0:
            yield "deadline_s", "must be >= 0"
        if self.sketch == "adaptive" and self.deadline_s <= 0:
            yield "deadline_s", "sketch=adaptive needs a deadline > 0 (simulated seconds per round)"


def draw_ranks(mcfg: HetRankConfig, r: int, n: int, seed: int) -> list[int]:
    """k_i for each of `n` clients, drawn once per run from `mcfg.rank_dist` and clipped to [1, r].

    ``normal`` is N((lo+hi)/2, ((hi-lo)/6)^2) rounded, as in the paper's v3 scripts; ``uniform`` is
    uniform on the integers [lo, hi]; ``heavy_tail_low`` min-max rescales LogNormal(0, 1) draws to
    [lo, hi], so most clients get a low rank and a few a high one (a reconstruction of the
    paper's "inverse lognormal rescaled to [1, 32]").
    """
    lo, hi = mcfg.rank_low, mcfg.rank_high or max(1, r // 2)
    g = generator(seed, "ranks", mcfg.rank_dist)
    if mcfg.rank_dist == "ratios":
        pick = torch.randint(len(mcfg.ratios), (n,), generator=g)
        ks = torch.tensor([r * mcfg.ratios[i] for i in pick.tolist()], dtype=torch.float64)
    elif mcfg.rank_dist == "normal":
        ks = (lo + hi) / 2 + (hi - lo) / 6 * torch.randn(n, generator=g, dtype=torch.float64)
    elif mcfg.rank_dist == "uniform":
        ks = torch.randint(lo, hi + 1, (n,), generator=g).double()
    else:
        x = torch.randn(n, generator=g, dtype=torch.float64).exp()
        ks = lo + (x - x.min()) / (x.max() - x.min()).clamp_min(1e-12) * (hi - lo)
    if mcfg.rank_dist != "ratios":
        ks = ks.clamp(lo, hi)
    return [min(r, max(1, int(k))) for k in ks.round().tolist()]


def adapt_rank(k: int, time_s: float, deadline_s: float, k_max: int) -> int:
    """Next round's rank: k * deadline / observed time, clipped to [1, k_max].

    A client that missed the deadline always gets a strictly smaller k (if it can), so a client
    slightly over the budget does not stay there because of rounding.
    """
    new = round(k * deadline_s / time_s) if time_s > 0 else k_max
    if time_s > deadline_s:
        new = min(new, k - 1)
    return max(1, min(k_max, new))


def client_weights(replies: dict[int, Message], weighting: str) -> dict[int, float]:
    """Aggregation weight per replying client: 1/P (uniform) or n_i / sum_j n_j (examples)."""
    n = {c: float(m.meta[NUM_EXAMPLES]) if weighting == "examples" else 1.0 for c, m in replies.items()}
    total = sum(n.values())
    return {c: v / total for c, v in n.items()}


def index_dtype(r: int) -> torch.dtype:
    """The narrowest integer type that holds channel indices 0..r-1 (indices travel on the link)."""
    return torch.uint8 if r <= 256 else torch.int16 if r <= 2**15 else torch.int32


def index_key(mod: str) -> str:
    return f"{mod}.index"


def factor_keys(mod: str) -> tuple[str, str]:
    return f"{mod}.lora_A", f"{mod}.lora_B"


def load_factors(model: nn.Module, tensors: dict[str, torch.Tensor], scale: Callable[[int], float]) -> None:
    """Give every LoRA layer the factors in `tensors` ("<module>.lora_A" (k, in), "<module>.lora_B"
    (out, k)), re-allocating it at rank k when needed, and set its scaling to `scale(k)`.

    `set_rank` resets the scaling to alpha / k, so the scaling is set again afterwards.
    """
    load_lora_state_dict(model, {n: t for n, t in tensors.items() if n.endswith((".lora_A", ".lora_B"))})
    for m in lora_modules(model).values():
        m.scaling = scale(m.rank)


class HetRankLoRA(Method):
    """Base of the heterogeneous-rank LoRA methods: rank choice, plans, adaptive budgets, local training.

    Subclasses implement `setup` (calling `setup_ranks`), `configure`, `client_update`,
    `aggregate` and `eval_model`.
    """

    supports_selection = True  # `load` puts the client's rank-k model in place: data selection can run

    def __init__(self, cfg, mcfg: HetRankConfig):
        self.cfg, self.mcfg = cfg, mcfg
        self.r = cfg.lora.rank
        self.server_opt = ServerOptimizer(mcfg)

    # -- scales ---------------------------------------------------------------------
    @property
    def s(self) -> float:
        """The global adapter's scaling alpha / r (used for evaluation)."""
        return self.cfg.lora.alpha / self.r

    def local_scale(self, k: int) -> float:
        """Scaling of a rank-k client adapter: s * r / k (FSLoRA's unbiased sketch scale), which
        with s = alpha / r is also standard LoRA scaling alpha / k at rank k."""
        return self.s * self.r / k

    # -- setup and plans --------------------------------------------------------------
    def setup_ranks(self, scenario) -> ServerState:
        """Inject the global rank-r LoRA (same init as fedit) and choose every client's first rank."""
        self.scenario = scenario
        lc = self.cfg.lora
        g = torch.Generator().manual_seed(derive_seed(self.cfg.seed, "lora-init"))
        inject_lora(scenario.model, rank=lc.rank, alpha=lc.alpha, targets=lc.targets, regex=lc.regex,
                    exclude=lc.exclude, dropout=lc.dropout, generator=g)
        mods = lora_modules(scenario.model)
        self.modules = list(mods)  # names, fixed for the run
        self.units = sum(m.in_features + m.out_features for m in mods.values())  # LoRA params per unit of rank
        # A classifier's freshly initialised head trains densely on every client (whatever its rank)
        # and is averaged like FedIT does it; language models have none.
        self.head = list(getattr(scenario.model, "head_param_names", lambda: [])())
        params = dict(scenario.model.named_parameters())
        for n in self.head:
            params[n].requires_grad_(True)
        pop = scenario.population
        return {"rank": {cid: self.initial_rank(cid, pop.device(cid)) for cid in range(len(pop))}, "round_rank": {},
                "head": {n: params[n].detach().clone() for n in self.head}}

    # -- downlink: each client's rank-k slice of the global factors --------------------
    send_indices = False  # whether the chosen channel indices travel with the factors

    def indices(self, rnd: int, cid: int, mod: str, k: int) -> torch.Tensor:
        """The global channels client `cid` gets in module `mod`: the first k by default."""
        return torch.arange(k)

    def b_scale(self, k: int) -> float:
        """Factor applied to the sliced B on the way down (1: send the global values)."""
        return 1.0

    def slice_messages(self, state: ServerState, rnd: int, cids: list[int]) -> dict[int, Message]:
        """Per client: A[I, :] (k, in) and B[:, I] (out, k) of every module for its channels I (one
        index set for both factors of a module), the indices if `send_indices`, and the head."""
        g, out = state["global"], {}
        for cid in cids:
            k, tensors = state["rank"][cid], {}
            for mod in self.modules:
                a, b = factor_keys(mod)
                idx = self.indices(rnd, cid, mod, k)
                tensors[a] = g[a][idx]  # (r, in) -> (k, in)
                tensors[b] = g[b][:, idx] * self.b_scale(k)  # (out, r) -> (out, k); x * 1.0 is exact
                if self.send_indices:
                    tensors[index_key(mod)] = idx.to(index_dtype(self.r))
            out[cid] = Message(tensors, kind="model")
        return self.with_head(state, out)

    # -- the dense classification head (empty for language models) --------------------
    def with_head(self, state: ServerState, msgs: dict[int, Message]) -> dict[int, Message]:
        """Add the global head to every downlink message."""
        for msg in msgs.values():
            msg.tensors.update(state["head"])
        return msgs

    def aggregate_head(self, state: ServerState, replies: dict[int, Message], w: dict[int, float]) -> None:
        """Weighted mean of the clients' head deltas, applied by the server optimiser."""
        if not self.head:
            return
        mean = {n: sum(w[c] * m.tensors[n] for c, m in iter_sorted(replies)) for n in self.head}
        self.server_opt.step(state, "head", mean)

    def load_head(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n in self.head:
                params[n].copy_(tensors[n])

    def initial_rank(self, cid: int, device) -> int:
        """Client `cid`'s rank before any adaptation: the policy's choice, or its seeded draw."""
        if self.mcfg.sketch == "policy":
            return self.policy_rank(device)
        return draw_ranks(self.mcfg, self.r, len(self.scenario.population), self.cfg.seed)[cid]

    def plan(self, cid: int, device) -> tuple[dict, int]:
        """Knobs {"rank": k_i} and the estimated training memory at that rank."""
        k = self.initial_rank(cid, device)
        return {RANK: k}, self.memory(k)

    def policy_rank(self, device) -> int:
        """The largest k <= r that fits the device's memory and meets `deadline_s` (0: no deadline); 1 if none."""
        for k in range(self.r, 0, -1):
            if fits(self.memory(k), device) and (self.mcfg.deadline_s <= 0 or self.estimate_time(k, device)
                                                 <= self.mcfg.deadline_s):
                return k
        return 1  # nothing meets the budget; the loop refuses the client if even k=1 does not fit

    def max_rank(self, device) -> int:
        """The largest k <= r whose estimated memory fits the device (1 if none)."""
        return next((k for k in range(self.r, 0, -1) if fits(self.memory(k), device)), 1)

    def memory(self, k: int) -> int:
        """Peak training memory (bytes) of a client holding a rank-k adapter."""
        model = self.scenario.model
        held = sum(m.lora_A.numel() + m.lora_B.numel() for m in lora_modules(model).values())
        # estimate_memory counts every weight the model holds now (an adapter of some other
        # rank); a rank-k client holds only its own k * units adapter values.
        return estimate_memory(model, k * self.units, self.cfg) - FP32 * (held - k * self.units)

    def estimate_flops(self, k: int) -> float:
        """FLOPs of one round of local training at rank k.

        Per token, a frozen matmul weight costs 4 FLOPs (2 forward, 2 for the input gradient) and a
        trained one 6 (plus its weight gradient): the 6N-per-token rule of Kaplan et al. 2020
        ("Scaling Laws for Neural Language Models", sec. 2.1). Attention scores are left out.
        """
        model = self.scenario.model
        frozen = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
        per_sample = tokens_per_sample(model, self.cfg) if hasattr(getattr(model, "config", None), "hidden_size") else 1
        tokens = self.cfg.train.local_steps * self.cfg.train.batch_size * per_sample
        return float(tokens * (4 * frozen + 6 * k * self.units))

    def estimate_bytes(self, k: int) -> tuple[int, int]:
        """(up, down) bytes at rank k: the fp32 rank-k factors each way (a codec only shrinks them)."""
        n = FP32 * k * self.units
        return n, n

    def estimate_time(self, k: int, device) -> float:
        up, down = self.estimate_bytes(k)
        return client_cost(device, self.estimate_flops(k), up, down).time_s

    # -- hooks the loop calls if present ----------------------------------------------
    def observe(self, state: ServerState, rnd: int, costs: dict) -> None:
        """sketch=adaptive: rescale each sampled client's k toward `deadline_s` for later rounds."""
        if self.mcfg.sketch != "adaptive":
            return
        pop = self.scenario.population
        for cid in sorted(costs):
            k_max = self.max_rank(pop.device(cid))
            state["rank"][cid] = adapt_rank(state["rank"][cid], costs[cid].time_s, self.mcfg.deadline_s, k_max)

    def report(self, state: ServerState, rnd: int, cids: list[int]) -> RoundReport:
        ks = list(state["round_rank"].values())
        out = {"rank_mean": sum(ks) / len(ks), "rank_min": min(ks), "rank_max": max(ks)} if ks else {}
        return RoundReport(stats={**out, **state.get("stats", {})})

    # -- client side ------------------------------------------------------------------
    def load(self, msg: Message, ctx: ClientContext) -> None:
        """Put the model the client starts from into `ctx.model`: its rank-k factors from `msg` at
        scaling `local_scale(k)`, and the global head (data selection runs on this model)."""
        load_factors(ctx.model, msg.tensors, self.local_scale)
        self.load_head(ctx.model, msg.tensors)

    def train_factors(self, ctx: ClientContext, start: dict[str, torch.Tensor],
                      head: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Load the rank-k factors `start` with scaling `local_scale(k)` (and the global `head`),
        train them locally, and return (mean loss, the trained factors, the head's deltas)."""
        model = ctx.model
        load_factors(model, start, self.local_scale)
        self.load_head(model, head)
        ranks = tuple(m.rank for m in lora_modules(model).values())
        ctx.mem_bytes = self.memory(ranks[0])  # this round's rank, which `sketch=adaptive` may have changed
        params = [p for n, p in model.named_parameters() if "lora_" in n or n in self.head]
        loss = local_train(ctx, params, self.cfg, (type(self).__name__, ranks))
        named = dict(model.named_parameters())
        head_delta = {n: named[n].detach() - head[n] for n in self.head}
        return loss, {n: t.clone() for n, t in lora_state_dict(model).items()}, head_delta

    def reply(self, ctx: ClientContext, tensors: dict[str, torch.Tensor], loss: float, k: int) -> Message:
        return Message(tensors, {NUM_EXAMPLES: len(ctx.data), TRAIN_LOSS: loss, RANK: k}, kind="update")

    def record_ranks(self, state: ServerState, replies: dict[int, Message]) -> None:
        state["round_rank"] = {cid: int(replies[cid].meta[RANK]) for cid in sorted(replies)}

    def load_global(self, state: ServerState) -> nn.Module:
        """The scenario model carrying the global rank-r factors in state["global"] at scaling s."""
        load_factors(self.scenario.model, state["global"], lambda k: self.s)
        self.load_head(self.scenario.model, state["head"])
        return self.scenario.model
