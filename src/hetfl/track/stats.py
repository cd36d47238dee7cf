"""Statistics for repeated runs: t-intervals over seeds and a paired test between two methods.

A comparison over seeds pairs runs by seed: with the same seed, two methods see the same
partition, device tiers and client sampling, so the per-seed difference removes the scenario's
own variance and a paired test is the right one (Student's t on the differences).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Verdict = Literal["better", "worse", "tie"]

# Metrics where a smaller value is better; every other quality metric is higher-is-better.
LOWER_IS_BETTER = ("loss", "ppl", "mse", "mae", "error")


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of `metric` (e.g. `eval_rougeL`, `eval_mse`) is the better one."""
    name = metric.removeprefix("eval_").removeprefix("client_").lower()
    return not any(name == k or name.startswith(k + "_") or name.endswith("_" + k) for k in LOWER_IS_BETTER)


def t_quantile(df: int, level: float = 0.95) -> float:
    """Two-sided Student-t critical value: P(|T| <= t) = level for T ~ t(df)."""
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, df))


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of the t-interval) of `values`; the half-width is 0 for one value.

    half-width = t_{(1+level)/2, n-1} * s / sqrt(n), with s the sample standard deviation (n-1).
    """
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci needs at least one value")
    mean = math.fsum(values) / n
    if n == 1:
        return mean, 0.0
    s = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t_quantile(n - 1, level) * s / math.sqrt(n)


@dataclass(frozen=True)
class Paired:
    """A paired comparison of method A against baseline B over the same seeds."""

    diff_mean: float  # mean of A - B
    diff_ci95: float  # half-width of the t-interval of the mean difference
    n: int
    verdict: Verdict


def paired_test(a: Sequence[float], b: Sequence[float], higher_better: bool = True, level: float = 0.95) -> Paired:
    """Paired t-test of `a` against `b` (index i of each is the same seed).

    The verdict is `better` or `worse` when the interval of the mean difference excludes 0
    (at `level`), by the metric's direction; otherwise `tie`. One pair can never decide: `tie`.
    """
    if len(a) != len(b):
        raise ValueError(f"paired_test needs pairs: got {len(a)} and {len(b)} values")
    d = [x - y for x, y in zip(a, b)]
    mean, half = mean_ci(d, level)
    verdict: Verdict = "tie"
    if len(d) >= 2 and abs(mean) > half:
        verdict = "better" if (mean > 0) == higher_better else "worse"
    return Paired(mean, half, len(d), verdict)
