"""The private mixture that FLoRAL (methods/floral.py) and the Ensemble baseline
(methods/ensemble.py) share, as components each method calls (spec: shared/spec/floral.md).

Every client holds K mixture logits w over K shared components (adaptors, or whole models).
`Router` decides where w lives between rounds and how it trains; `mixture_weights` and
`mixture_average` are the server's p(i) / p(i|c) weighted mean of the round's deltas;
`train_mixture` is the local loop (parameter groups with their own learning rates, an optional
gradient hook between backward and the step).

Where the logits live (`state`, `stateless_logits`):
- stateful: in the client's private state between rounds (K floats);
- stateless + server: the server keeps each client's last logits and returns them with the model;
- stateless + uniform: nobody keeps them; the client restarts from w = 0 and re-learns them.
`router: oracle` fixes w one-hot at the client's true cluster (-100 elsewhere) and never trains it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

from hetfl.engine.api import NUM_EXAMPLES, ClientContext, Message, ServerState, iter_sorted
from hetfl.errors import ConfigError
from hetfl.methods.common import AvgConfig, make_optimizer
from hetfl.models.floral import ORACLE_OFF

LOGITS = "router.logits"  # wire name of a client's mixture logits
STACKED = "stacked"  # slot of a tensor holding all K components on dim 0


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


def num_components(mcfg: RouterConfig, scenario) -> int:
    """K: `num_adaptors`, or the scenario's number of clusters when it is 0.

    Raises:
        ConfigError: K < 1, or an oracle router on a scenario without true clusters.
    """
    k = mcfg.num_adaptors or scenario.cfg.data.clusters
    if k < 1:
        raise ConfigError("method.num_adaptors: set it >= 1 (or data.clusters, which it defaults to)")
    if mcfg.router == "oracle" and not scenario.client_clusters:
        raise ConfigError("method.router: 'oracle' needs the true clusters (data.clusters >= 1)")
    return k


class Router:
    """A client's K mixture logits: what it starts a round with, how they train, who keeps them.

    Args:
        mcfg: the method's router options.
        k: number of components.
    """

    def __init__(self, mcfg: RouterConfig, k: int):
        self.c, self.k = mcfg, k
        self.learned = mcfg.router == "learned" and mcfg.router_lr > 0 and k > 1  # the logits get gradients
        self.on_server = mcfg.state == "stateless" and mcfg.stateless_logits == "server"

    def init_state(self, state: ServerState) -> ServerState:
        """Add the server's table of each client's last logits (stateless + server only)."""
        if self.on_server:
            state["logits"] = {}
        return state

    def down(self, state: ServerState, cid: int) -> dict[str, torch.Tensor]:
        """What the server sends besides the model: client `cid`'s last logits (never-seen: w = 0)."""
        return {LOGITS: state["logits"].get(cid, torch.zeros(self.k))} if self.on_server else {}

    def held(self, cluster: int | None, client_state: dict, server_logits: torch.Tensor | None) -> torch.Tensor:
        """The logits a client holds at the start of a round (and evaluates with)."""
        if self.c.router == "oracle":
            w = torch.full((self.k,), ORACLE_OFF)
            w[(cluster or 0) % self.k] = 0.0
            return w
        if self.c.state == "stateful":
            return client_state.get("logits", torch.zeros(self.k)).clone()
        if server_logits is not None:
            return server_logits.clone()
        return torch.zeros(self.k)  # stateless, uniform restart

    def group(self, logits: torch.nn.Parameter) -> list[dict]:
        """The optimiser's parameter group for the logits (none when they do not train)."""
        return [{"params": [logits], "lr": self.c.router_lr}] if self.learned else []

    def penalty(self, logits: torch.Tensor) -> Callable[[], torch.Tensor] | None:
        """lambda * sum_c pi_c log pi_c, subtracted from the loss (+ lambda H(pi)); None at lambda = 0."""
        if self.c.entropy_weight <= 0:
            return None

        def term() -> torch.Tensor:
            pi = torch.softmax(logits / self.c.temperature, 0)
            return self.c.entropy_weight * (pi * pi.clamp_min(1e-12).log()).sum()

        return term

    def finish(self, client_state: dict, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """After local training: keep learned logits on a stateful client; return what goes up
        (the logits whenever K > 1: the server needs pi_i to weight the components)."""
        if self.c.state == "stateful" and self.c.router == "learned":
            client_state["logits"] = logits.detach().clone()
        return {LOGITS: logits.detach().clone()} if self.k > 1 else {}

    def absorb(self, state: ServerState, replies: dict[int, Message]) -> None:
        """Server side after aggregation: the mean max-weight (how decided the mixtures are) and,
        stateless + server, each replying client's logits for its next round."""
        pis = [torch.softmax(m.tensors[LOGITS], 0) for _, m in iter_sorted(replies) if LOGITS in m.tensors]
        state["pi_max_mean"] = float(torch.stack(pis).max(1).values.mean()) if pis else 1.0
        if self.on_server:
            for cid, m in replies.items():
                state["logits"][cid] = m.tensors[LOGITS].clone()

    def payload_floats(self) -> tuple[int, int]:
        """Floats of logits in a client's (down, up) messages."""
        return (self.k if self.on_server else 0), (self.k if self.k > 1 else 0)


def client_weights(replies: dict[int, Message], weighting: str) -> dict[int, float]:
    """p(i) = n_i / sum_j n_j (or uniform) over the replying clients."""
    n = {cid: float(m.meta[NUM_EXAMPLES]) if weighting == "examples" else 1.0 for cid, m in replies.items()}
    total = sum(n.values())
    return {cid: v / total for cid, v in n.items()}


def mixture_weights(replies: dict[int, Message], weighting: str, k: int) -> tuple[dict[int, float], dict[int, torch.Tensor]]:
    """p(i) and p(i|c) (K,) for the replying clients (float64; spec section 2, step 5).

    p(i|c) = p(i) pi_ic / sum_j p(j) pi_jc, pi = the plain softmax of the sent logits; a reply
    without logits (K = 1) counts as a uniform mixture.
    """
    p = client_weights(replies, weighting)
    joint = {cid: p[cid] * (torch.softmax(m.tensors[LOGITS].double(), 0) if LOGITS in m.tensors
                            else torch.full((k,), 1.0 / k, dtype=torch.float64)) for cid, m in replies.items()}
    p_c = sum(joint[cid] for cid in sorted(joint))  # (K,)
    return p, {cid: j / p_c for cid, j in joint.items()}


def mixture_average(replies: dict[int, Message], p: dict[int, float], p_given_c: dict[int, torch.Tensor],
                    slot: Callable[[str], int | str | None]) -> dict[str, torch.Tensor]:
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


def train_mixture(ctx: ClientContext, groups: list[dict], cfg, flop_tag: tuple, *,
                  penalty: Callable[[], torch.Tensor] | None = None,
                  before_step: Callable[[], None] | None = None) -> float:
    """Local training of `ctx.model` on the client's data; returns the mean loss over the steps.

    Args:
        ctx: the client's context.
        groups: the optimiser's parameter groups (each may carry its own lr).
        cfg: the run's config (`train.*`).
        flop_tag: prefix of the FLOP-cache key (the method and K).
        penalty: a term subtracted from each step's loss (the router's entropy term).
        before_step: runs between backward and the optimiser step (gradient preconditioning).
    """
    model, t = ctx.model, cfg.train
    model.train()
    opt = make_optimizer(groups, cfg)
    losses = []
    for batch in ctx.task.batches(ctx.data, t.steps_for(len(ctx.data)), t.batch_size, ctx.generator("batches")):
        def step():
            loss = ctx.task.loss(model, batch)
            if penalty is not None:
                loss = loss - penalty()
            loss.backward()
            return loss

        opt.zero_grad(set_to_none=True)
        losses.append(float(ctx.compute(flop_tag + ctx.task.flop_key(batch), step).detach()))
        if before_step is not None:
            before_step()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return sum(losses) / len(losses)
