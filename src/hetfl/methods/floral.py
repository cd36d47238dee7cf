"""FLoRAL (Almansoori, Horvath, Takac, "Collaborative and Efficient Personalization with Mixtures
of Adaptors", CPAL 2025; spec: shared/spec/floral.md): a shared base model plus K shared low-rank
adaptors per layer (models/floral.py); each client keeps only K mixture logits.

Round (spec section 2): down go the base and the K adaptors (plus, for stateless clients in the
`server` option, the client's last logits); the client trains base, adaptors and logits jointly
(separate learning rates; adaptor gradients optionally preconditioned); up go the deltas and the
logits. The server averages the base with p(i) = n_i / sum n and adaptor c's factors with
p(i|c) = p(i) pi_ic / sum_j p(j) pi_jc (pi = plain softmax of the logits), then applies the server
optimiser to that mean delta. `MixtureMethod` is the part shared with the Ensemble baseline
(methods/ensemble.py) and Local Adaptor (methods/local_adaptor.py).

Where the mixture logits live (`state`, `stateless_logits`):
- stateful: in the client's private state between rounds (K floats);
- stateless + server: the server keeps each client's last logits and returns them with the model;
- stateless + uniform: nobody keeps them; the client restarts from w = 0 and re-learns them.
`router: oracle` fixes w one-hot at the client's true cluster (-100 elsewhere) and never trains it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from hetfl.engine.api import (NUM_EXAMPLES, TRAIN_LOSS, ClientContext, Message, Method, RoundReport, ServerState,
                             iter_sorted)
from hetfl.seeding import derive_seed
from hetfl.errors import ConfigError
from hetfl.methods.common import AvgConfig, ServerOptimizer, estimate_memory, make_optimizer
from hetfl.models.floral import ORACLE_OFF, attach_floral, merge_into
from hetfl.registry import register_method

LOGITS = "router.logits"  # wire name of a client's mixture logits
STACKED = "stacked"  # slot of a tensor holding all K adaptors on dim 0


@dataclass(frozen=True)
class RouterConfig(AvgConfig):
    """Options of every method with a private mixture over K shared components."""

    num_adaptors: int = 0  # K; 0: data.clusters (the true number of clusters)
    router: Literal["learned", "oracle"] = "learned"
    router_lr: float = 0.1  # SGD lr of the logits (spec: 0.1; 0.3 on the 5%-data tasks)
    state: Literal["stateful", "stateless"] = "stateful"
    stateless_logits: Literal["server", "uniform"] = "server"  # stateless: who restores the logits
    noise: float = 1.0  # sigma of the uniform noise on the logits in training
    temperature: float = 1.0
    entropy_weight: float = 0.0  # lambda of + lambda * H(pi) in the loss (spec default 0)

    def check(self):
        yield from super().check()
        if self.num_adaptors < 0:
            yield "num_adaptors", "must be >= 0 (0: data.clusters)"
        if self.router_lr < 0:
            yield "router_lr", "must be >= 0"
        if self.noise < 0:
            yield "noise", "must be >= 0"
        if self.temperature <= 0:
            yield "temperature", "must be > 0"


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


def mixture_weights(replies: dict[int, Message], weighting: str, k: int) -> tuple[dict[int, float], dict[int, torch.Tensor]]:
    """p(i) and p(i|c) (K,) for the replying clients (float64; spec section 2, step 5).

    A reply without logits (Local Adaptor, K = 1) counts as a uniform mixture.
    """
    n = {cid: float(m.meta[NUM_EXAMPLES]) if weighting == "examples" else 1.0 for cid, m in replies.items()}
    total = sum(n.values())
    p = {cid: v / total for cid, v in n.items()}
    joint = {cid: p[cid] * (torch.softmax(m.tensors[LOGITS].double(), 0) if LOGITS in m.tensors
                            else torch.full((k,), 1.0 / k, dtype=torch.float64)) for cid, m in replies.items()}
    p_c = sum(joint[cid] for cid in sorted(joint))  # (K,)
    return p, {cid: j / p_c for cid, j in joint.items()}


def mixture_average(replies: dict[int, Message], p: dict[int, float], p_given_c: dict[int, torch.Tensor],
                    slot) -> dict[str, torch.Tensor]:
    """Mean delta per tensor: base tensors by p(i), component c's tensors by p(i|c).

    `slot(name)` is None for a base tensor, an int c for a tensor of component c, or `STACKED`
    for a tensor holding all K components on dim 0 (each averaged factor-wise with its own weights).
    """
    mean: dict[str, torch.Tensor] = {}
    for cid, m in iter_sorted(replies):
        for name, d in m.tensors.items():
            if name == LOGITS:
                continue
            s = slot(name)
            if s is None:
                w = p[cid]
            elif s == STACKED:
                w = p_given_c[cid].to(d.dtype).view(-1, *([1] * (d.dim() - 1)))  # (K, 1, ...)
            else:
                w = float(p_given_c[cid][s])
            mean[name] = mean[name] + w * d if name in mean else w * d
    return mean


class MixtureMethod(Method):
    """A private mixture over K shared components; subclasses say what the components are."""

    supports_selection = True  # `load` puts the client's whole model (shared + private) in place

    def __init__(self, cfg, mcfg: RouterConfig):
        self.cfg, self.mcfg = cfg, mcfg
        self.server_opt = ServerOptimizer(mcfg)

    # -- subclass hooks -------------------------------------------------------------
    def build(self, model: torch.nn.Module) -> torch.nn.Module:
        raise NotImplementedError

    def shared(self, model) -> dict[str, torch.nn.Parameter]:
        raise NotImplementedError

    def slot(self, name: str):
        return None

    def private(self, model) -> dict[str, torch.nn.Parameter]:
        return {}

    def param_groups(self, model) -> list[dict]:
        return [{"params": list(self.shared(model).values())}]

    def before_step(self, model) -> None:
        """Adjust gradients between backward and the optimiser step (preconditioning)."""

    def mixture_of(self, model):
        """The model's `Mixture` (the private logits)."""
        return model.mixture

    def personal(self, logits: torch.Tensor) -> torch.nn.Module:
        """The model a client evaluates with, given the global tensors already loaded."""
        self.mixture_of(self.model).logits.data.copy_(logits)
        return self.model

    def extra_params(self) -> int:
        raise NotImplementedError

    # -- contract -------------------------------------------------------------------
    def setup(self, scenario) -> ServerState:
        self.scenario = scenario
        self.k = self.mcfg.num_adaptors or scenario.cfg.data.clusters
        if self.k < 1:
            raise ConfigError("method.num_adaptors: set it >= 1 (or data.clusters, which it defaults to)")
        if self.mcfg.router == "oracle" and not scenario.client_clusters:
            raise ConfigError("method.router: 'oracle' needs the true clusters (data.clusters >= 1)")
        self.base_params = sum(p.numel() for p in scenario.model.parameters())
        self.model = scenario.model = self.build(scenario.model)
        self.learn_router = self.mcfg.router == "learned" and self.mcfg.router_lr > 0 and self.k > 1
        self.mixture_of(self.model).logits.requires_grad_(self.learn_router)
        self.init_private = {k: p.detach().clone() for k, p in self.private(self.model).items()}
        state: ServerState = {"global": {k: p.detach().clone() for k, p in self.shared(self.model).items()}}
        if self.keeps_logits_on_server:
            state["logits"] = {}
        return state

    @property
    def keeps_logits_on_server(self) -> bool:
        return self.mcfg.state == "stateless" and self.mcfg.stateless_logits == "server"

    def plan(self, cid: int, device) -> tuple[dict, int]:
        clusters = self.scenario.client_clusters
        knobs = {"cluster": clusters[cid]} if clusters else {}  # the client knows its own cluster id
        n = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return knobs, estimate_memory(self.model, n, self.cfg)

    def configure(self, state: ServerState, rnd: int, cids: list[int]) -> dict[int, Message]:
        out = {}
        for cid in cids:
            tensors = dict(state["global"])
            if self.keeps_logits_on_server:  # never-seen clients get the uniform w = 0
                tensors[LOGITS] = state["logits"].get(cid, torch.zeros(self.k))
            out[cid] = Message(tensors)
        return out

    def held_logits(self, cluster: int | None, client_state: dict, server_logits: torch.Tensor | None) -> torch.Tensor:
        """The logits a client holds at the start of a round (and evaluates with)."""
        if self.mcfg.router == "oracle":
            w = torch.full((self.k,), ORACLE_OFF)
            w[(cluster or 0) % self.k] = 0.0
            return w
        if self.mcfg.state == "stateful":
            return client_state.get("logits", torch.zeros(self.k)).clone()
        if server_logits is not None:
            return server_logits.clone()
        return torch.zeros(self.k)  # stateless, uniform restart

    def load(self, msg: Message, ctx: ClientContext) -> None:
        with torch.no_grad():
            for k, p in self.shared(ctx.model).items():
                p.copy_(msg.tensors[k])
            for k, p in self.private(ctx.model).items():
                p.copy_(ctx.state.get("private", self.init_private)[k])
            w = self.held_logits(ctx.knobs.get("cluster"), ctx.state, msg.tensors.get(LOGITS))
            self.mixture_of(ctx.model).logits.copy_(w)

    def client_update(self, msg: Message, ctx: ClientContext) -> Message:
        self.load(msg, ctx)
        model, t, mixture = ctx.model, self.cfg.train, self.mixture_of(ctx.model)
        groups = self.param_groups(model)
        if self.learn_router:
            groups.append({"params": [mixture.logits], "lr": self.mcfg.router_lr})
        model.train()
        opt = make_optimizer(groups, self.cfg)
        tag, losses = (type(self).__name__, self.k), []
        for batch in ctx.task.batches(ctx.data, t.steps_for(len(ctx.data)), t.batch_size, ctx.generator("batches")):
            def step():
                loss = ctx.task.loss(model, batch)
                if self.mcfg.entropy_weight > 0:
                    pi = torch.softmax(mixture.logits / self.mcfg.temperature, 0)
                    loss = loss - self.mcfg.entropy_weight * (pi * pi.clamp_min(1e-12).log()).sum()
                loss.backward()
                return loss

            opt.zero_grad(set_to_none=True)
            losses.append(float(ctx.compute(tag + ctx.task.flop_key(batch), step).detach()))
            self.before_step(model)
            opt.step()
        opt.zero_grad(set_to_none=True)
        tensors = {k: p.detach() - msg.tensors[k] for k, p in self.shared(model).items()}
        if self.k > 1:  # the server needs pi_i to weight the components
            tensors[LOGITS] = mixture.logits.detach().clone()
        if self.mcfg.state == "stateful" and self.mcfg.router == "learned":
            ctx.state["logits"] = mixture.logits.detach().clone()
        if self.init_private:
            ctx.state["private"] = {k: p.detach().clone() for k, p in self.private(model).items()}
        return Message(tensors, {NUM_EXAMPLES: len(ctx.data), TRAIN_LOSS: sum(losses) / len(losses)})

    def aggregate(self, state: ServerState, rnd: int, replies: dict[int, Message]) -> ServerState:
        if not replies:
            return state
        p, p_given_c = mixture_weights(replies, self.mcfg.weighting, self.k)
        self.server_opt.step(state, "global", mixture_average(replies, p, p_given_c, self.slot))
        pis = [torch.softmax(m.tensors[LOGITS], 0) for _, m in iter_sorted(replies) if LOGITS in m.tensors]
        state["pi_max_mean"] = float(torch.stack(pis).max(1).values.mean()) if pis else 1.0
        if self.keeps_logits_on_server:
            for cid, m in replies.items():
                state["logits"][cid] = m.tensors[LOGITS].clone()
        return state

    def _load_global(self, state: ServerState, private: dict | None) -> None:
        with torch.no_grad():
            for k, p in self.shared(self.model).items():
                p.copy_(state["global"][k])
            for k, p in self.private(self.model).items():
                p.copy_((private or self.init_private)[k])

    def eval_model(self, state: ServerState) -> torch.nn.Module:
        """A newcomer's model: uniform mixture (oracle: cluster 0, the server test set's view)."""
        self._load_global(state, None)
        return self.personal(self.held_logits(0, {}, None))

    def client_eval_model(self, state: ServerState, cid: int, client_state: dict) -> torch.nn.Module:
        """What client `cid` holds: its own logits (kept by itself or the server, or uniform)."""
        clusters = self.scenario.client_clusters
        self._load_global(state, client_state.get("private"))
        server = state.get("logits", {}).get(cid)
        return self.personal(self.held_logits(clusters[cid] if clusters else None, client_state, server))

    def report(self, state: ServerState, rnd: int, cids: list[int]) -> RoundReport:
        extra = self.extra_params()
        return RoundReport(stats={"adaptor_params": extra, "param_overhead_pct": 100.0 * extra / self.base_params,
                                  "pi_max_mean": state.get("pi_max_mean", 1.0)})


@register_method("floral", FloralConfig, "FLoRAL: shared base + K shared low-rank adaptors, private mixture")
class FloralMethod(MixtureMethod):
    def build(self, model: torch.nn.Module) -> torch.nn.Module:
        import copy

        m = self.mcfg
        self.plain = copy.deepcopy(model)  # hook-free copy: clients evaluate their merged weights in it
        g = torch.Generator().manual_seed(derive_seed(self.cfg.seed, "floral-init"))
        self.floral = attach_floral(model, self.k, m.rho, bias=m.adaptive_bias, conv=m.conv, noise=m.noise,
                                    temperature=m.temperature, floor=m.floor, generator=g)
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def mixture_of(self, model):
        return model.floral.mixture

    def _adaptor_names(self, model) -> set[str]:
        return {n for n, _ in model.named_parameters() if n.startswith("floral.adaptors.")}

    def shared(self, model) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in model.named_parameters() if not n.startswith("floral.mixture.")}

    def slot(self, name: str):
        return STACKED if name.startswith("floral.adaptors.") else None

    def param_groups(self, model) -> list[dict]:
        ad = self._adaptor_names(model)
        named = self.shared(model)
        lr = self.mcfg.adaptor_lr or self.cfg.train.lr
        groups = [{"params": [p for n, p in named.items() if n not in ad]}]
        adaptors = [p for n, p in named.items() if n in ad and p.requires_grad]
        return groups + ([{"params": adaptors, "lr": lr}] if adaptors else [])

    def before_step(self, model) -> None:
        if self.mcfg.precondition:
            for ad in model.floral.adaptors.values():
                ad.precondition(self.mcfg.eps)

    def personal(self, logits: torch.Tensor) -> torch.nn.Module:
        return merge_into(self.plain, self.model, logits)  # no adaptor cost at inference

    def extra_params(self) -> int:
        return self.floral.adaptor_params()
