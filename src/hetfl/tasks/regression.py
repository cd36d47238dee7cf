"""Regression as a task (mean squared error), and FLoRAL's synthetic clustered regression data.

A sample is ``(x, y)``: ``x`` a (d,) float tensor, ``y`` a (d_out,) float tensor. Batches are
``{"x": (B, d), "y": (B, d_out)}``; models take the batch dict and return (B, d_out).

Datasets (``data.name``; hetfl.builtins registers them), from the FLoRAL spec (shared/spec/floral.md
section 5), d = 10 inputs, clusters given by ``data.clusters`` (client i in cluster i mod C):
- ``synth-linear``: y = (x W_c + b)[:, :3] with W_c = W + 2 u_c v_c (a rank-1 shift per
  cluster); model ``linear`` = Linear(10, 3) (models/regressors.py).
- ``synth-mlp``: y = ReLU(x W_c + b) W_out; model ``mlp`` = Linear(10, 20)-ReLU-Linear(20, 1).

W ~ N(0, 1/d), u_c ~ N(0, 1/d) (d x 1), v_c ~ N(0, 1) (1 x d), b ~ N(0, 1/d), W_out ~ N(0, 1/d)
(d x 1), x ~ N(0, I), no label noise. ``data.samples_per_family`` is the number of samples per
client (the spec: 8 for linear, 120 for MLP); ``data.eval_samples`` the server's held-out set,
labelled by cluster 0's teacher. The pool is drawn cluster-free; each client's targets come from
its cluster's teacher after partitioning (`TaskData.cluster_transform`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from hetfl.errors import ConfigError
from hetfl.eval.metrics import EVAL_N
from hetfl.models.regressors import build_regressor
from hetfl.seeding import derive_seed
from hetfl.tasks.base import TaskData, batch_indices

SYNTH_DIM = 10  # input size of the synthetic tasks
SYNTH_MODELS = {"synth-linear": "linear", "synth-mlp": "mlp"}  # dataset -> its model name


@dataclass
class RegressionTask:
    """Vector regression scored by mean squared error (lower is better).

    Args:
        eval_samples: the server's held-out samples, scored by `evaluate()`.
        eval_batch_size: samples per forward pass during evaluation.
    """

    eval_samples: Sequence[tuple]
    eval_batch_size: int = 512
    primary_metric: str = "eval_mse"

    def batches(self, samples: Sequence[tuple], steps: int, batch_size: int,
                gen: torch.Generator) -> Iterator[dict[str, Tensor]]:
        """`steps` collated batches in a seeded epoch-wise order."""
        for idx in batch_indices(len(samples), steps, batch_size, gen):
            yield self.collate([samples[i] for i in idx])

    def collate(self, samples: Sequence[tuple]) -> dict[str, Tensor]:
        return {"x": torch.stack([x for x, _ in samples]), "y": torch.stack([y for _, y in samples])}  # (B, d), (B, d_out)

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """Mean squared error over samples and outputs."""
        return ((model(batch).float() - batch["y"]) ** 2).mean()

    def flop_key(self, batch: dict[str, Tensor]) -> tuple:
        return tuple(batch["x"].shape)

    def num_tokens(self, batch: dict[str, Tensor]) -> int:
        return int(batch["y"].shape[0])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, samples: Sequence[tuple] | None = None) -> dict[str, float]:
        """MSE and item count `eval_n` on the held-out set, or on `samples` (a client's own test split)."""
        samples = list(self.eval_samples if samples is None else samples)
        if not samples:
            return {}
        was_training = model.training
        model.eval()
        sq, n = 0.0, 0
        for i in range(0, len(samples), self.eval_batch_size):
            batch = self.collate(samples[i:i + self.eval_batch_size])
            sq += float(((model(batch).float() - batch["y"]) ** 2).mean(dim=1).sum())
            n += batch["y"].shape[0]
        model.train(was_training)
        return {"eval_mse": sq / n, EVAL_N: n}


@dataclass(frozen=True)
class SynthTeachers:
    """The generator's draws; `targets(x, c)` labels inputs as cluster c does."""

    w: Tensor  # (d, d)
    u: Tensor  # (C, d, 1)
    v: Tensor  # (C, 1, d)
    b: Tensor  # (d,)
    w_out: Tensor | None  # (d, 1) for the MLP teacher, None for the linear one
    d_out: int

    def targets(self, x: Tensor, c: int) -> Tensor:  # (N, d) -> (N, d_out)
        h = x @ (self.w + 2.0 * self.u[c] @ self.v[c]) + self.b  # (N, d)
        return h[:, :self.d_out] if self.w_out is None else torch.relu(h) @ self.w_out

    def cluster_transform(self, samples: list, c: int) -> list:
        if not samples:
            return []
        x = torch.stack([s[0] for s in samples])
        return list(zip(x, self.targets(x, c)))


def draw_teachers(kind: str, clusters: int, gen: torch.Generator, d: int = SYNTH_DIM) -> SynthTeachers:
    """Draw W, u_c, v_c, b (and W_out for the MLP task) in that order from `gen`."""
    s = d ** -0.5  # std of N(0, 1/d)
    w = torch.randn(d, d, generator=gen) * s
    u = torch.randn(clusters, d, 1, generator=gen) * s
    v = torch.randn(clusters, 1, d, generator=gen)
    b = torch.randn(d, generator=gen) * s
    w_out = torch.randn(d, 1, generator=gen) * s if kind == "synth-mlp" else None
    return SynthTeachers(w, u, v, b, w_out, 3 if w_out is None else 1)


def build_synth(cfg):
    """TaskData for `synth-linear` / `synth-mlp` (see the module docstring)."""
    kind = cfg.data.name
    if cfg.model.name != SYNTH_MODELS[kind]:
        raise ConfigError(f"model.name: {kind} trains the '{SYNTH_MODELS[kind]}' regressor, not '{cfg.model.name}'")
    if cfg.data.clusters < 1:
        raise ConfigError(f"data.clusters: {kind} needs data.clusters >= 1 (the spec: 2 for linear, 4 for MLP)")
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "data", kind))
    teachers = draw_teachers(kind, cfg.data.clusters, gen)
    n = cfg.population.num_clients * cfg.data.samples_per_family
    x = torch.randn(n, SYNTH_DIM, generator=gen)
    ex = torch.randn(cfg.data.eval_samples, SYNTH_DIM, generator=gen)
    model = build_regressor(cfg.model.name, SYNTH_DIM, teachers.d_out, derive_seed(cfg.seed, "model-init") % 2**31)
    placeholder = torch.zeros(teachers.d_out)  # targets are written per cluster after partitioning
    task = RegressionTask(list(zip(ex, teachers.targets(ex, 0))), eval_batch_size=cfg.eval.batch_size)
    return TaskData(model, None, task, [(x[i], placeholder) for i in range(n)], np.zeros(n, dtype=np.int64),
                    ["all"], cluster_transform=teachers.cluster_transform)

