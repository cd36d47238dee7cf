"""Faults on purpose (`faults:`): clients that drop out, straggle, send corrupt or hostile updates.

Each sampled client's `Fate` for a round is drawn from its own seeded generators, one per kind of
fault, named by (seed, round, client, purpose) only (hetfl.seeding): it never depends on the
order clients are asked in, on the other fault rates, or on where a run was resumed. The
byzantine clients are a fixed set per seed (`byzantine_clients`). `tamper` applies a fate to a
reply on its way up; dropouts and slowdowns are for the round loop to apply (the work a client
did before it dropped, the time it took).

- dropout: Bernoulli(`dropout`); the share of its round's work done when it drops ~ U(0, 1);
- straggler: Bernoulli(`straggler`); its time is multiplied by exp(N(`straggler_mu`, `straggler_sigma`));
- corrupt: Bernoulli(`corrupt`); one value of its update becomes NaN or Inf (equally likely);
- byzantine: ``sign-flip`` sends -scale * update, ``scale`` scale * update, ``random`` Gaussian
  noise of `byzantine_scale` times the update's norm (Blanchard et al. 2017, "Machine Learning
  with Adversaries: Byzantine Tolerant Gradient Descent"; Fang et al. 2020, "Local Model
  Poisoning Attacks to Byzantine-Robust Federated Learning").

Like the rest of fleet/ this imports only the ground floor (seeding): it reads the `faults:`
section by duck typing and copies a reply (an engine.api.Message, not imported: the engine stands
above) with `dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from hetfl.seeding import generator

if TYPE_CHECKING:
    from hetfl.config import FaultsConfig


@dataclass(frozen=True)
class Fate:
    """What befalls one client in one round."""

    drop_at: float | None  # share of the client's round work done when it drops (None: no dropout)
    slowdown: float  # its time is multiplied by this (1.0: not a straggler)
    corrupt: str | None  # "nan" | "inf" | None
    byzantine: bool

    @property
    def tampers(self) -> bool:
        """Whether `tamper` changes this client's reply."""
        return self.corrupt is not None or self.byzantine


def byzantine_clients(fc: FaultsConfig, seed: int, num_clients: int) -> frozenset[int]:
    """The hostile clients: round(fc.byzantine * num_clients) of them (Python's round, ties to
    even), a uniform draw fixed by the seed alone."""
    m = round(fc.byzantine * num_clients)
    if m == 0:
        return frozenset()
    perm = torch.randperm(num_clients, generator=generator(seed, "faults", "byzantine"))
    return frozenset(perm[:m].tolist())


def _uniforms(seed: int, rnd: int, cid: int, purpose: str) -> list[float]:
    """Two U(0, 1) draws (float64) of client `cid` in round `rnd` for one kind of fault."""
    return torch.rand(2, generator=generator(seed, rnd, cid, "faults", purpose), dtype=torch.float64).tolist()


def fate(fc: FaultsConfig, seed: int, rnd: int, cid: int, byzantine: frozenset[int]) -> Fate:
    """Client `cid`'s fate in round `rnd`.

    Args:
        fc: the run's `faults:` section.
        seed: the run's root seed.
        rnd: the round (1-based).
        cid: the client.
        byzantine: the run's hostile clients (`byzantine_clients`).

    Returns:
        Its Fate; a fault whose rate is 0 is never drawn.
    """
    drop_at, slowdown, corrupt = None, 1.0, None
    if fc.dropout > 0:
        u, at = _uniforms(seed, rnd, cid, "dropout")
        drop_at = at if u < fc.dropout else None
    if fc.straggler > 0:
        u, _ = _uniforms(seed, rnd, cid, "straggler")
        if u < fc.straggler:
            z = torch.randn(1, generator=generator(seed, rnd, cid, "faults", "slowdown"), dtype=torch.float64)
            slowdown = math.exp(fc.straggler_mu + fc.straggler_sigma * float(z))
    if fc.corrupt > 0:
        u, kind = _uniforms(seed, rnd, cid, "corrupt")
        corrupt = ("nan" if kind < 0.5 else "inf") if u < fc.corrupt else None
    return Fate(drop_at, slowdown, corrupt, cid in byzantine)


def tamper(reply: Any, fate: Fate, fc: FaultsConfig, seed: int, rnd: int, cid: int) -> Any:
    """The reply as a client with this fate sends it: a new Message (the input's tensors are not
    changed), metadata copied.

    A byzantine client transforms every floating tensor (``byzantine_mode``); integer tensors
    (e.g. rank channel indices) pass untouched. Then a corrupt one puts NaN or Inf into one
    element (seeded) of its first non-empty floating tensor in sorted key order.

    Args:
        reply: what the client would honestly send.
        fate: its fate this round (`fate`).
        fc: the run's `faults:` section.
        seed, rnd, cid: the run's root seed, the round and the client (the noise's seeds).
    """
    tensors = dict(reply.tensors)
    floating = [k for k in sorted(tensors) if tensors[k].is_floating_point()]
    if fate.byzantine:
        tensors.update(_hostile({k: tensors[k] for k in floating}, fc, generator(seed, rnd, cid, "faults", "noise")))
    if fate.corrupt is not None:
        target = next((k for k in floating if tensors[k].numel()), None)
        if target is not None:
            t = tensors[target].clone()
            at = int(torch.randint(t.numel(), (1,), generator=generator(seed, rnd, cid, "faults", "corrupt-at")))
            t.view(-1)[at] = float("nan") if fate.corrupt == "nan" else float("inf")
            tensors[target] = t
    return dataclasses.replace(reply, tensors=tensors, meta=dict(reply.meta))


def _hostile(update: dict[str, torch.Tensor], fc: FaultsConfig, g: torch.Generator) -> dict[str, torch.Tensor]:
    """A byzantine client's replacement of its floating tensors (sorted names)."""
    s = fc.byzantine_scale
    if fc.byzantine_mode == "sign-flip":
        return {k: -s * t for k, t in update.items()}
    if fc.byzantine_mode == "scale":
        return {k: s * t for k, t in update.items()}
    # random: one noise draw per tensor in name order, rescaled to s times the update's global norm
    noise = {k: torch.randn(t.shape, generator=g, dtype=torch.float64) for k, t in update.items()}
    norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in update.values()))
    noise_norm = math.sqrt(sum(float(z.pow(2).sum()) for z in noise.values()))
    c = s * norm / noise_norm if noise_norm > 0 else 0.0
    return {k: (c * z).to(dtype=t.dtype, device=t.device) for (k, t), z in zip(update.items(), noise.values())}
