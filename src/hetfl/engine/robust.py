"""A server that survives bad updates: reply checks and robust ways to combine the round's updates.

`check_reply` says why a reply must be rejected before aggregation (non-finite values, tensors
that are not the ones the method expects). `combine`, `clip_scales` and `clip_replies` are the
robust aggregators of `server.aggregator` that the parameter-averaging helpers
(methods/common.py `mean_delta`, methods/hetrank.py `scatter_mean` and `aggregate_head`) call:

- ``mean``: the weighted mean (the default; those helpers then run their plain summation);
- ``median``: the coordinate-wise median over the clients (Yin et al. 2018, "Byzantine-Robust
  Distributed Learning: Towards Optimal Statistical Rates");
- ``trimmed-mean``: per coordinate, drop the floor(beta * n) smallest and largest values and
  average the rest (same paper);
- ``norm-clip``: scale every client's update to an L2 norm of at most tau, then the weighted mean
  (Sun et al. 2019, "Can You Really Backdoor Federated Learning?").

Median and trimmed mean are unweighted: an order statistic has no example weights.
"""

from __future__ import annotations

import math
from numbers import Real

import torch

from hetfl.engine.api import NUM_EXAMPLES, Message

ORDER_RULES = ("median", "trimmed-mean")  # aggregators that stack the clients' updates and sort them


def check_reply(reply: Message, expected: dict[str, tuple[int, ...]] | None) -> str | None:
    """The reason a client's reply must be rejected, or None when it may be aggregated.

    Every floating tensor must be finite and the reply's `num_examples` (when it carries one) a
    finite number >= 0; its train loss is not checked (a NaN loss can be legitimate, e.g. a
    batch without a scored token). With `expected` (`Method.expected_reply`), the tensors must
    have exactly those names and shapes.

    Args:
        reply: the reply as the server received it.
        expected: name -> shape of the tensors the reply must carry; None: no key or shape check.

    Returns:
        A one-line reason ("non-finite values in <key>", "keys differ: ...", "<key> has shape
        ... not ...", "num_examples is ..."), or None.
    """
    if expected is not None:
        missing, unexpected = sorted(set(expected) - set(reply.tensors)), sorted(set(reply.tensors) - set(expected))
        if missing or unexpected:
            return f"keys differ: missing [{', '.join(missing)}], unexpected [{', '.join(unexpected)}]"
    for key in sorted(reply.tensors):
        t = reply.tensors[key]
        if expected is not None and tuple(t.shape) != tuple(expected[key]):
            return f"{key} has shape {tuple(t.shape)} not {tuple(expected[key])}"
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            return f"non-finite values in {key}"
    n = reply.meta.get(NUM_EXAMPLES)
    if n is not None and (isinstance(n, bool) or not isinstance(n, Real) or not math.isfinite(n) or n < 0):
        return f"{NUM_EXAMPLES} is {n!r}, not a finite number >= 0"
    return None


def combine(stack: torch.Tensor, weights: torch.Tensor, rule: str, beta: float) -> torch.Tensor:
    """Combine the clients' values of one tensor over dim 0.

    Args:
        stack: (n, ...) one row per client (n >= 1).
        weights: (n,) the clients' aggregation weights, summing to 1 (used by ``mean`` only).
        rule: ``mean`` (the weighted sum), ``median`` (coordinate-wise; for an even n the mean of
            the two middle values, not torch.median's lower one, so the result is symmetric in
            the clients) or ``trimmed-mean`` (per coordinate, the unweighted mean of the values
            left after dropping the floor(beta * n) smallest and the as many largest).
        beta: ``trimmed-mean``: the share cut from each end, in [0, 0.5).

    Returns:
        (...) the combined tensor.

    Raises:
        ValueError: an unknown rule.
    """
    n = stack.shape[0]
    if rule == "mean":
        return (weights.to(stack.dtype).view(n, *([1] * (stack.dim() - 1))) * stack).sum(0)
    if rule not in ORDER_RULES:
        raise ValueError(f"unknown aggregation rule {rule!r} (choose from: mean, {', '.join(ORDER_RULES)})")
    ranked = stack.sort(dim=0).values  # (n, ...) ascending per coordinate
    if rule == "median":
        lo, hi = (n - 1) // 2, n // 2  # the same row for odd n
        return ranked[lo] if lo == hi else (ranked[lo] + ranked[hi]) / 2
    cut = math.floor(beta * n)  # beta < 0.5, so at least one row is left
    return ranked[cut:n - cut].mean(0)


def update_norm(msg: Message) -> float:
    """The global L2 norm of a message's floating tensors (all keys together; integer tensors,
    e.g. rank channel indices, left out)."""
    sq = sum(float(t.double().pow(2).sum()) for t in msg.tensors.values() if t.is_floating_point())
    return math.sqrt(sq)


def clip_scales(replies: dict[int, Message], tau: float) -> dict[int, float]:
    """Per client, the factor min(1, tau / ||update||) that clips its update to norm tau.

    The norm is `update_norm`: over every floating tensor of the reply at once, so a reply's
    tensors keep their ratios. A zero update keeps scale 1.
    """
    scales = {}
    for cid in sorted(replies):
        norm = update_norm(replies[cid])
        scales[cid] = min(1.0, tau / norm) if norm > 0 else 1.0
    return scales


def clip_replies(replies: dict[int, Message], tau: float) -> dict[int, Message]:
    """Copies of the replies with every floating tensor scaled by its client's `clip_scales`
    factor (integer tensors and metadata as they were; x * 1.0 is exact, so an update already
    within tau is unchanged bit for bit)."""
    scales = clip_scales(replies, tau)
    return {cid: Message({k: t * scales[cid] if t.is_floating_point() else t for k, t in m.tensors.items()},
                         dict(m.meta), m.kind) for cid, m in replies.items()}
