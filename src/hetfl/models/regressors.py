"""Small regressors by name, trained from a seed (FLoRAL's synthetic tasks).

A model takes the batch dict ``{"x": (B, d)}`` of tasks/regression.py and returns (B, d_out).

Names (``model.name``): ``linear`` = Linear(d, d_out); ``mlp`` = Linear(d, 20)-ReLU-Linear(20, d_out).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hetfl.errors import ConfigError

REGRESSOR_HIDDEN: dict[str, int] = {"linear": 0, "mlp": 20}  # model.name -> hidden width (0: none)


class Regressor(nn.Module):
    """Linear(d, d_out), or Linear(d, hidden)-ReLU-Linear(hidden, d_out) when hidden > 0."""

    def __init__(self, d_in: int, d_out: int, hidden: int = 0):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden or d_out)
        self.fc2 = nn.Linear(hidden, d_out) if hidden else None

    def forward(self, batch: dict[str, Tensor]) -> Tensor:  # {"x": (B, d)} -> (B, d_out)
        h = self.fc1(batch["x"])
        return h if self.fc2 is None else self.fc2(torch.relu(h))


def build_regressor(name: str, d_in: int, d_out: int, seed: int) -> Regressor:
    """A freshly initialised regressor by name, in eval mode; the global torch RNG is left untouched.

    Args:
        name: a key of `REGRESSOR_HIDDEN` (``linear`` or ``mlp``).
        d_in: input size.
        d_out: output size.
        seed: initialisation seed.

    Raises:
        ConfigError: unknown name.
    """
    if name not in REGRESSOR_HIDDEN:
        raise ConfigError(f"model.name: unknown regressor '{name}' (choose from: {', '.join(REGRESSOR_HIDDEN)})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Regressor(d_in, d_out, REGRESSOR_HIDDEN[name])
    model.eval()
    return model
