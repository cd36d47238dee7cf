"""Functions and one component shared by the heterogeneous-rank LoRA methods (fslora, heterolora,
flexlora, flora-stack); none of them is a base class.

Every client i trains a LoRA of its own rank k_i <= r, where r = `lora.rank` is the global rank.
`RankBudget` chooses k_i and estimates what a client needs at rank k (memory, FLOPs, bytes,
time); the functions below slice rank-k factors out of the global ones, scatter them back, load
them into the one shared model, train them, and handle a classifier's dense head. How k_i is
chosen (`method.sketch`):

- ``fixed``: drawn once per client from `method.rank_dist` (seeded; the FSLoRA paper's setup).
- ``policy``: the largest k whose estimated memory fits the client's device and whose estimated
  round time (compute + upload + download on its tier) meets `method.deadline_s`.
- ``adaptive``: starts like ``fixed``; after each round the loop reports every sampled client's
  measured cost to `observe`, which rescales that client's k by deadline / observed time.

All mutable method state (each client's current k) lives in the server state under "rank", so it
is checkpointed; a method object only keeps values derived once from the config and scenario.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import nn

from hetfl.config import Config, ServerConfig
from hetfl.engine.api import NUM_EXAMPLES, TRAIN_LOSS, ClientContext, Message, RoundReport, ServerState, iter_sorted
from hetfl.engine.robust import ORDER_RULES, clip_replies, combine
from hetfl.methods.common import (FP32, AvgConfig, ServerOptimizer, copy_into, estimate_memory, head_names,
                                  inject_run_lora, local_train, lora_and_head, tokens_per_sample)
from hetfl.models.lora import load_lora_state_dict, lora_modules, lora_state_dict
from hetfl.seeding import generator
from hetfl.system.cost import client_cost
from hetfl.system.memory import fits

RANK = "rank"  # reply metadata: the rank the client trained at (clients.csv's rank column)


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


# ----------------------------------------------------------------------------- choosing k_i


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


class RankBudget:
    """Each client's rank k_i and what training at rank k costs it (memory, FLOPs, bytes, time).

    Args:
        cfg: the run's config.
        mcfg: the method's rank options.
        scenario: the built scenario, its model already carrying the global rank-r LoRA.
        units: LoRA values per unit of rank, sum over modules of (in + out).
        down_nbytes: bytes a rank-k client downloads; None: its fp32 rank-k factors.
    """

    def __init__(self, cfg: Config, mcfg: HetRankConfig, scenario, units: int,
                 down_nbytes: Callable[[int], int] | None = None):
        self.cfg, self.mcfg, self.scenario, self.units = cfg, mcfg, scenario, units
        self.r = cfg.lora.rank
        self.down_nbytes = down_nbytes

    def initial_ranks(self) -> dict[int, int]:
        """Every client's first rank (the server state's "rank")."""
        pop = self.scenario.population
        return {cid: self.initial_rank(cid, pop.device(cid)) for cid in range(len(pop))}

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
        """(up, down) bytes at rank k: the fp32 rank-k factors each way (a codec only shrinks them),
        unless the method downloads something else (`down_nbytes`)."""
        n = factor_nbytes(k, self.units)
        return n, n if self.down_nbytes is None else self.down_nbytes(k)

    def estimate_time(self, k: int, device) -> float:
        up, down = self.estimate_bytes(k)
        return client_cost(device, self.estimate_flops(k), up, down).time_s

    def observe(self, state: ServerState, costs: dict) -> None:
        """sketch=adaptive: rescale each sampled client's k toward `deadline_s` for later rounds."""
        if self.mcfg.sketch != "adaptive":
            return
        pop = self.scenario.population
        for cid in sorted(costs):
            k_max = self.max_rank(pop.device(cid))
            state["rank"][cid] = adapt_rank(state["rank"][cid], costs[cid].time_s, self.mcfg.deadline_s, k_max)


# ----------------------------------------------------------------------------- the global LoRA and the head


def index_dtype(r: int) -> torch.dtype:
    """The narrowest integer type that holds channel indices 0..r-1 (indices travel on the link)."""
    return torch.uint8 if r <= 256 else torch.int16 if r <= 2**15 else torch.int32


def index_key(mod: str) -> str:
    return f"{mod}.index"


def factor_keys(mod: str) -> tuple[str, str]:
    return f"{mod}.lora_A", f"{mod}.lora_B"


def local_scale(s: float, r: int, k: int) -> float:
    """Scaling of a rank-k client adapter: s * r / k (FSLoRA's unbiased sketch scale), which with
    the global scaling s = alpha / r is also standard LoRA scaling alpha / k at rank k."""
    return s * r / k


def factor_nbytes(k: int, units: int) -> int:
    """fp32 bytes of a rank-k adapter: k * (in + out) values per module."""
    return FP32 * k * units


def inject_global_lora(model: nn.Module, cfg: Config) -> tuple[list[str], int, list[str]]:
    """Inject the global rank-r LoRA (same init as fedit) and make a classifier's head trainable.

    A classifier's freshly initialised head trains densely on every client (whatever its rank)
    and is averaged like FedIT does it; language models have none.

    Returns:
        The adapted module names (fixed for the run), the LoRA values per unit of rank
        (sum of in + out), and the head's parameter names.
    """
    inject_run_lora(model, cfg)
    mods = lora_modules(model)
    head = head_names(model)
    params = dict(model.named_parameters())
    for n in head:
        params[n].requires_grad_(True)
    return list(mods), sum(m.in_features + m.out_features for m in mods.values()), head


def head_state(model: nn.Module, head: list[str]) -> dict[str, torch.Tensor]:
    """Copies of the model's current head tensors (the server's global head)."""
    params = dict(model.named_parameters())
    return {n: params[n].detach().clone() for n in head}


def load_head(model: nn.Module, head: list[str], tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    copy_into({n: params[n] for n in head}, tensors)


def aggregate_head(state: ServerState, replies: dict[int, Message], w: dict[int, float], head: list[str],
                   server_opt: ServerOptimizer, server: ServerConfig | None = None) -> None:
    """Weighted mean of the clients' head deltas, applied by the server optimiser.

    `server.aggregator` (None: ``mean``) as in `scatter_mean`: ``norm-clip`` scales each reply
    by its factor over the whole reply (factors and head together), ``median`` /
    ``trimmed-mean`` combine the clients' head deltas coordinate-wise.
    """
    if not head:
        return
    rule = "mean" if server is None else server.aggregator
    if rule == "norm-clip":
        replies = clip_replies(replies, server.clip_norm)
    if rule in ORDER_RULES:
        cids = sorted(replies)
        weights = torch.tensor([w[c] for c in cids])  # (P,)
        mean = {n: combine(torch.stack([replies[c].tensors[n] for c in cids]), weights, rule, server.trim_beta)
                for n in head}
    else:
        mean = {n: sum(w[c] * m.tensors[n] for c, m in iter_sorted(replies)) for n in head}
    server_opt.step(state, "head", mean)


def load_factors(model: nn.Module, tensors: dict[str, torch.Tensor], scale: Callable[[int], float]) -> None:
    """Give every LoRA layer the factors in `tensors` ("<module>.lora_A" (k, in), "<module>.lora_B"
    (out, k)), re-allocating it at rank k when needed, and set its scaling to `scale(k)`.

    `set_rank` resets the scaling to alpha / k, so the scaling is set again afterwards.
    """
    load_lora_state_dict(model, {n: t for n, t in tensors.items() if n.endswith((".lora_A", ".lora_B"))})
    for m in lora_modules(model).values():
        m.scaling = scale(m.rank)


def load_global(model: nn.Module, factors: dict[str, torch.Tensor], head: list[str],
                head_tensors: dict[str, torch.Tensor], s: float) -> nn.Module:
    """`model` carrying the global rank-r factors at scaling s, and the global head."""
    load_factors(model, factors, lambda k: s)
    load_head(model, head, head_tensors)
    return model


# ----------------------------------------------------------------------------- slicing and scattering


def slice_factors(g: dict[str, torch.Tensor], modules: list[str], indices: Callable[[str], torch.Tensor],
                  b_scale: float = 1.0, index: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """One client's A[I, :] (k, in) and B[:, I] * b_scale (out, k) of every module, for its
    channels I = indices(module) (one index set for both factors of a module); the indices too,
    as `index` integers, when they must travel."""
    tensors = {}
    for mod in modules:
        a, b = factor_keys(mod)
        idx = indices(mod)
        tensors[a] = g[a][idx]  # (r, in) -> (k, in)
        tensors[b] = g[b][:, idx] * b_scale  # (out, r) -> (out, k); x * 1.0 is exact
        if index is not None:
            tensors[index_key(mod)] = idx.to(index)
    return tensors


def reply_indices(msg: Message, mod: str) -> torch.Tensor:
    """Which global channels a reply's factors belong to: its indices, else the first k (int64)."""
    idx = msg.tensors.get(index_key(mod))
    if idx is not None:
        return idx.long()  # a uint8 tensor would index as a boolean mask
    return torch.arange(msg.tensors[factor_keys(mod)[0]].shape[0])


def scatter_mean(g: dict[str, torch.Tensor], modules: list[str], replies: dict[int, Message],
                 w: dict[int, float], server: ServerConfig | None = None) -> dict[str, torch.Tensor]:
    """The weighted sum of the replies' rank-k deltas, each scattered into zeros of global size.

    Args:
        g: the global factors, "<module>.lora_A" (r, in) and "<module>.lora_B" (out, r).
        modules: the adapted modules.
        replies: the round's replies: rank-k deltas, and their channel indices when they travel.
        w: each replying client's weight (summing to 1).
        server: the run's `server:` section (engine/robust.py); None or ``mean``: the weighted
            sum. ``norm-clip``: each reply scaled to norm <= `clip_norm` first. ``median`` /
            ``trimmed-mean``: over all P replies per coordinate, a client counting as 0 on the
            channels it did not train (the same zero-filling as the mean's).
    """
    rule = "mean" if server is None else server.aggregator
    if rule == "norm-clip":
        replies = clip_replies(replies, server.clip_norm)
    if rule in ORDER_RULES:
        return scatter_combine(g, modules, replies, w, rule, server.trim_beta)
    mean = {n: torch.zeros_like(t) for n, t in g.items()}
    for cid, msg in iter_sorted(replies):
        for mod in modules:
            a, b = factor_keys(mod)
            idx = reply_indices(msg, mod)
            mean[a][idx] += w[cid] * msg.tensors[a]  # scatter rows: (k, in) into (r, in)
            mean[b][:, idx] += w[cid] * msg.tensors[b]  # scatter columns: (out, k) into (out, r)
    return mean


def scatter_combine(g: dict[str, torch.Tensor], modules: list[str], replies: dict[int, Message],
                    w: dict[int, float], rule: str, beta: float) -> dict[str, torch.Tensor]:
    """`scatter_mean` under an order-statistic rule, per rank channel: the rule over the clients that
    trained the channel, times the share of clients that did (n_j / P).

    The mean rule is (1/P) * sum over the n_j clients covering channel j, i.e. (n_j / P) times their
    mean; the robust rules replace that mean by their estimate over the same clients. Counting the
    clients that did not train a channel as zeros instead would make the median of a channel most
    clients skip zero, and stall FSLoRA's sketched training (measured in benchmarks/faults.py)."""
    cids = sorted(replies)
    p = len(cids)
    out = {n: torch.zeros_like(t) for n, t in g.items()}
    for mod in modules:
        a, b = factor_keys(mod)
        idx = {c: reply_indices(replies[c], mod).tolist() for c in cids}
        for j in range(g[a].shape[0]):
            rows, cols = [], []  # channel j's row of A and column of B from every client that trained it
            for c in cids:
                if j in idx[c]:
                    pos = idx[c].index(j)
                    rows.append(replies[c].tensors[a][pos])
                    cols.append(replies[c].tensors[b][:, pos])
            if not rows:
                continue
            ones = torch.full((len(rows),), 1.0 / len(rows))
            share = len(rows) / p
            out[a][j] = combine(torch.stack(rows), ones, rule, beta) * share
            out[b][:, j] = combine(torch.stack(cols), ones, rule, beta) * share
    return out


def client_weights(replies: dict[int, Message], weighting: str) -> dict[int, float]:
    """Aggregation weight per replying client: 1/P (uniform) or n_i / sum_j n_j (examples)."""
    n = {c: float(m.meta[NUM_EXAMPLES]) if weighting == "examples" else 1.0 for c, m in replies.items()}
    total = sum(n.values())
    return {c: v / total for c, v in n.items()}


# ----------------------------------------------------------------------------- the client step


def train_factors(ctx: ClientContext, cfg: Config, budget: RankBudget, start: dict[str, torch.Tensor],
                  head: list[str], head_tensors: dict[str, torch.Tensor], scale: Callable[[int], float],
                  tag: str) -> tuple[float, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Load the rank-k factors `start` at scaling `scale(k)` and the global head, train them
    locally, and return (mean loss, the trained factors, the head's deltas)."""
    model = ctx.model
    load_factors(model, start, scale)
    load_head(model, head, head_tensors)
    ranks = tuple(m.rank for m in lora_modules(model).values())
    ctx.mem_bytes = budget.memory(ranks[0])  # this round's rank, which `sketch=adaptive` may have changed
    loss = local_train(ctx, list(lora_and_head(model).values()), cfg, (tag, ranks))
    named = dict(model.named_parameters())
    head_delta = {n: named[n].detach() - head_tensors[n] for n in head}
    return loss, {n: t.clone() for n, t in lora_state_dict(model).items()}, head_delta


def rank_reply(ctx: ClientContext, tensors: dict[str, torch.Tensor], loss: float, k: int) -> Message:
    return Message(tensors, {NUM_EXAMPLES: len(ctx.data), TRAIN_LOSS: loss, RANK: k}, kind="update")


# ----------------------------------------------------------------------------- the round's report


def record_ranks(state: ServerState, replies: dict[int, Message]) -> None:
    state["round_rank"] = {cid: int(replies[cid].meta[RANK]) for cid in sorted(replies)}


def rank_report(state: ServerState) -> RoundReport:
    """The round's rank statistics plus the method's own numbers in state["stats"]."""
    ks = list(state["round_rank"].values())
    out = {"rank_mean": sum(ks) / len(ks), "rank_min": min(ks), "rank_max": max(ks)} if ks else {}
    return RoundReport(stats={**out, **state.get("stats", {})})
