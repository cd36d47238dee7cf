"""FLoRAL (Almansoori, Horvath, Takac, "Collaborative and Efficient Personalization with Mixtures
of Adaptors", CPAL 2025; spec: shared/spec/floral.md): a shared base model plus K shared low-rank
adaptors per layer (models/floral.py); each client keeps only K mixture logits.

Round (spec section 2): down go the base and the K adaptors (plus, for stateless clients in the
`server` option, the client's last logits; methods/mixture.py says where the logits live); the
client trains base, adaptors and logits jointly (separate learning rates; adaptor gradients
optionally preconditioned); up go the deltas and the logits. The server averages the base with
p(i) = n_i / sum n and adaptor c's factors with p(i|c) = p(i) pi_ic / sum_j p(j) pi_jc (pi = plain
softmax of the logits), then applies the server optimiser to that mean delta. A client evaluates
with its mixture merged into the base weights (no adaptor cost at inference).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from hetfl.engine.api import NUM_EXAMPLES, TRAIN_LOSS, ClientContext, Message, Method, RoundReport, ServerState
from hetfl.methods.common import FP32, ServerOptimizer, estimate_memory, fp32_nbytes, reply_meta_nbytes
from hetfl.methods.mixture import (LOGITS, STACKED, Router, RouterConfig, mixture_average, mixture_weights,
                                   num_components, train_mixture)
from hetfl.models.floral import Floral, attach_floral, merge_into
from hetfl.registry import register_method
from hetfl.seeding import derive_seed

ADAPTORS = "floral.adaptors."  # name prefix of every adaptor factor and bias
MIXTURE = "floral.mixture."  # name prefix of the mixture logits


@dataclass(frozen=True)
class FloralConfig(RouterConfig):
    name: str = "floral"
    rho: float = 0.01  # rank budget per adaptor: 0.01 = FLoRAL(1%), 0.1 = FLoRAL(10%); >= 1: the rank
    adaptor_lr: float = 0.0  # lr of the adaptor factors and biases; 0: train.lr
    floor: float = 0.01  # clamp(pi, min=floor) in the forward pass (not in aggregation)
    precondition: bool = True  # scaled-GD preconditioning of the adaptor gradients (spec section 2)
    eps: float = 1e-5  # preconditioner damping
    conv: bool = True  # adapt Conv2d layers (two-factor 1xk / kx1 form)
    adaptive_bias: bool = True  # a bias per adaptor on layers that have one

    def check(self):
        yield from super().check()
        if self.rho <= 0:
            yield "rho", "must be > 0"
        if self.adaptor_lr < 0:
            yield "adaptor_lr", "must be >= 0 (0: train.lr)"
        if not 0.0 <= self.floor < 1.0:
            yield "floor", "must be in [0, 1)"
        if self.eps <= 0:
            yield "eps", "must be > 0"


def build_floral(model: torch.nn.Module, k: int, mcfg: FloralConfig, seed: int) -> tuple[torch.nn.Module, Floral]:
    """Attach K seeded adaptors per layer to `model` in place and make everything trainable.

    Returns:
        (a hook-free copy of the base model, in which clients evaluate their merged weights;
        the attached `Floral` container, ``model.floral``).
    """
    plain = copy.deepcopy(model)
    g = torch.Generator().manual_seed(derive_seed(seed, "floral-init"))
    floral = attach_floral(model, k, mcfg.rho, bias=mcfg.adaptive_bias, conv=mcfg.conv, noise=mcfg.noise,
                           temperature=mcfg.temperature, floor=mcfg.floor, generator=g)
    for p in model.parameters():
        p.requires_grad_(True)
    return plain, floral


def shared_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """What the server holds and averages: everything but the private logits."""
    return {n: p for n, p in model.named_parameters() if not n.startswith(MIXTURE)}


def adaptor_groups(model: torch.nn.Module, mcfg: FloralConfig, cfg) -> list[dict]:
    """Parameter groups: the base model at train.lr, the adaptors at `adaptor_lr` (0: train.lr)."""
    named = dict(model.named_parameters())
    base = [p for n, p in named.items() if not n.startswith("floral.")]
    adaptors = [p for n, p in named.items() if n.startswith(ADAPTORS) and p.requires_grad]
    return [{"params": base}] + ([{"params": adaptors, "lr": mcfg.adaptor_lr or cfg.train.lr}] if adaptors else [])


def slot(name: str) -> str | None:
    """How `mixture_average` weights a tensor: the K stacked adaptors factor-wise by p(i|c), the
    base by p(i)."""
    return STACKED if name.startswith(ADAPTORS) else None


def preconditioner(floral: Floral, mcfg: FloralConfig):
    """The gradient hook that preconditions every adaptor (scaled GD), or None when disabled."""
    if not mcfg.precondition:
        return None

    def step() -> None:
        for ad in floral.adaptors.values():
            ad.precondition(mcfg.eps)

    return step


@register_method("floral", FloralConfig, "FLoRAL: shared base + K shared low-rank adaptors, private mixture")
class FloralMethod(Method):
    supports_selection = True  # `load` puts the client's whole model (base, adaptors, logits) in place

    def __init__(self, cfg, mcfg: FloralConfig):
        self.cfg, self.mcfg = cfg, mcfg
        self.server_opt = ServerOptimizer(mcfg)

    # -- server state: the base and the K adaptors of every layer ------------------------------
    def setup(self, scenario) -> ServerState:
        self.scenario = scenario
        self.k = num_components(self.mcfg, scenario)
        self.base_params = sum(p.numel() for p in scenario.model.parameters())
        self.model = scenario.model
        self.plain, self.floral = build_floral(self.model, self.k, self.mcfg, self.cfg.seed)
        self.router = Router(self.mcfg, self.k)
        self.floral.mixture.logits.requires_grad_(self.router.learned)
        return self.router.init_state({"global": {n: p.detach().clone() for n, p in shared_params(self.model).items()}})

    def plan(self, cid: int, device) -> tuple[dict, int]:
        clusters = self.scenario.client_clusters
        knobs = {"cluster": clusters[cid]} if clusters else {}  # the client knows its own cluster id
        n = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return knobs, estimate_memory(self.model, n, self.cfg)

    def configure(self, state: ServerState, rnd: int, cids: list[int]) -> dict[int, Message]:
        return {cid: Message({**state["global"], **self.router.down(state, cid)}) for cid in cids}

    # -- client step -------------------------------------------------------------------------
    def load(self, msg: Message, ctx: ClientContext) -> None:
        with torch.no_grad():
            for n, p in shared_params(ctx.model).items():
                p.copy_(msg.tensors[n])
            ctx.model.floral.mixture.logits.copy_(self.router.held(ctx.knobs.get("cluster"), ctx.state,
                                                                   msg.tensors.get(LOGITS)))

    def client_update(self, msg: Message, ctx: ClientContext) -> Message:
        self.load(msg, ctx)
        floral = ctx.model.floral
        logits = floral.mixture.logits
        groups = adaptor_groups(ctx.model, self.mcfg, self.cfg) + self.router.group(logits)
        loss = train_mixture(ctx, groups, self.cfg, (type(self).__name__, self.k),
                             penalty=self.router.penalty(logits), before_step=preconditioner(floral, self.mcfg))
        tensors = {n: p.detach() - msg.tensors[n] for n, p in shared_params(ctx.model).items()}
        tensors.update(self.router.finish(ctx.state, logits))
        return Message(tensors, {NUM_EXAMPLES: len(ctx.data), TRAIN_LOSS: loss})

    def expected_reply(self, down: Message, knobs: dict) -> dict[str, tuple[int, ...]]:
        """The deltas of the base and the K adaptors that came down; the K logits when K > 1."""
        shapes = {n: tuple(t.shape) for n, t in down.tensors.items() if n != LOGITS}
        return {**shapes, LOGITS: (self.k,)} if self.k > 1 else shapes

    # -- aggregation -------------------------------------------------------------------------
    def aggregate(self, state: ServerState, rnd: int, replies: dict[int, Message]) -> ServerState:
        if not replies:
            return state
        p, p_given_c = mixture_weights(replies, self.mcfg.weighting, self.k)
        self.server_opt.step(state, "global", mixture_average(replies, p, p_given_c, slot))
        self.router.absorb(state, replies)
        return state

    def report(self, state: ServerState, rnd: int, cids: list[int]) -> RoundReport:
        extra = self.floral.adaptor_params()
        return RoundReport(stats={"adaptor_params": extra, "param_overhead_pct": 100.0 * extra / self.base_params,
                                  "pi_max_mean": state.get("pi_max_mean", 1.0)})

    def payload(self, state: ServerState, rnd: int, cid: int, num_examples: int) -> tuple[int, int]:
        """Down: base + K adaptors (+ K logits from the server); up: their deltas + K logits."""
        logits_down, logits_up = self.router.payload_floats()
        tensors = fp32_nbytes(state["global"].values())
        return tensors + FP32 * logits_down, tensors + FP32 * logits_up + reply_meta_nbytes(num_examples)

    # -- evaluation --------------------------------------------------------------------------
    def _personal(self, state: ServerState, logits: torch.Tensor) -> torch.nn.Module:
        with torch.no_grad():
            for n, p in shared_params(self.model).items():
                p.copy_(state["global"][n])
        return merge_into(self.plain, self.model, logits)

    def eval_model(self, state: ServerState) -> torch.nn.Module:
        """A newcomer's model: uniform mixture (oracle: cluster 0, the server test set's view)."""
        return self._personal(state, self.router.held(0, {}, None))

    def client_eval_model(self, state: ServerState, cid: int, client_state: dict) -> torch.nn.Module:
        """What client `cid` holds: its own logits (kept by itself or the server, or uniform)."""
        clusters = self.scenario.client_clusters
        server = state.get("logits", {}).get(cid)
        return self._personal(state, self.router.held(clusters[cid] if clusters else None, client_state, server))
