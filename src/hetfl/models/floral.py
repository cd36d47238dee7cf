"""FLoRAL parameterization: K shared low-rank adaptors per layer mixed by one private vector.

Every adapted layer computes (Almansoori et al., "Collaborative and Efficient Personalization
with Mixtures of Adaptors", CPAL 2025; spec: shared/spec/floral.md section 1)

    y = base(x) + sum_c pi~_c (B_c A_c x + b_c),     pi~ = clamp(pi, min=floor)

with pi = softmax((w + sigma * u) / T), u ~ U[0, 1)^K drawn once per forward pass in training
mode only (eval: pi = softmax(w / T)). The output is linear in x, so a client's layer merges into
one personalised weight W + sum_c pi~_c B_c A_c and bias b + sum_c pi~_c b_c (`merge_into`).

Adaptors are attached in place (forward hooks on the base layers, as the official code does) and
live under the submodule ``floral`` of the model; their parameters carry a ``lora_`` prefix and the
mixture logits are ``floral.mixture.logits``. The K adaptors of a layer are stacked on dim 0
(``lora_A``: (K, r, d_in)), so aggregation per adaptor is an index along that dim.

Convolutions use the two-factor "balanced_2d" form: a (1, k_w) conv C_in -> r (width stride,
padding, dilation) then a (k_h, 1) conv r -> C_out (height ones, plus the bias). Composed, they
are one (k_h, k_w) conv with the base layer's stride/padding/dilation, so merging is exact.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ORACLE_OFF = -100.0  # logit of the adaptors an oracle router switches off (as the official code)


def resolve_rank(rho: float, d_in: int, d_out: int) -> int:
    """Adaptor rank from the budget rule: each adaptor holds about rho x (base weight count).

    Args:
        rho: below 1, a fraction of the layer's weights; from 1 up, the rank itself (rounded).
        d_in: input size (C_in * k for a convolution).
        d_out: output size (C_out * k for a convolution).

    Returns:
        ``max(1, floor(rho * d_in * d_out / (d_in + d_out)))`` for rho < 1, else ``round(rho)``.
    """
    if rho >= 1:
        return int(round(rho))
    return max(1, math.floor(rho * d_in * d_out / (d_in + d_out)))


class Mixture(nn.Module):
    """The client's mixture logits w (K,) and the weights the adaptors use in a forward pass.

    Args:
        k: number of adaptors.
        noise: sigma of the uniform training noise on the logits (0: none).
        temperature: softmax temperature T.
        floor: lower clamp on each weight in the forward pass (0: none); not renormalised.
    """

    def __init__(self, k: int, noise: float = 1.0, temperature: float = 1.0, floor: float = 0.01):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(k))  # w = 0: a uniform mixture
        self.noise, self.temperature, self.floor = noise, temperature, floor
        self._pi: Tensor | None = None  # weights of the forward pass under way

    def probs(self) -> Tensor:
        """pi (K,): noisy in training mode, plain softmax in eval mode (no floor)."""
        w = self.logits
        if self.training and self.noise > 0:
            w = w + self.noise * torch.rand_like(w)  # uniform, not Gaussian, noise (as the code)
        return torch.softmax(w / self.temperature, dim=0)

    def weights(self) -> Tensor:
        """pi~ (K,) used by the adaptors; one draw per root forward pass."""
        if self._pi is not None:
            return self._pi
        pi = self.probs()
        return pi.clamp(min=self.floor) if self.floor > 0 else pi

    def begin(self, *_) -> None:
        self._pi = None
        self._pi = self.weights()

    def end(self, *_) -> None:
        self._pi = None


class _AdaptorMixin:
    """The forward hook, a bound method so that a deep-copied model hooks its own copies."""

    def bind(self, mixture: Mixture) -> None:
        object.__setattr__(self, "_mixture", mixture)  # a reference, not a second submodule

    def hook(self, module: nn.Module, inputs: tuple, out: Tensor) -> Tensor:
        return out + self.delta(inputs[0], self._mixture.weights())


class LinearAdaptors(_AdaptorMixin, nn.Module):
    """K low-rank adaptors (A_c, B_c, b_c) beside one nn.Linear.

    Args:
        base: the adapted layer (its shapes and whether it has a bias).
        k: number of adaptors.
        rank: r.
        bias: add a per-adaptor bias (only if the base layer has one).
        generator: seeds A (Kaiming-uniform, fan_in = d_in) and b (U(+-1/sqrt(r)), torch's default).
    """

    def __init__(self, base: nn.Linear, k: int, rank: int, bias: bool, generator: torch.Generator):
        super().__init__()
        d_in, d_out = base.in_features, base.out_features
        bound = math.sqrt(6.0 / d_in)
        self.lora_A = nn.Parameter((torch.rand(k, rank, d_in, generator=generator) * 2 - 1) * bound)
        self.lora_B = nn.Parameter(torch.zeros(k, d_out, rank))  # B = 0: every delta starts at 0
        self.lora_bias = None
        if bias and base.bias is not None:
            b = 1.0 / math.sqrt(rank)
            self.lora_bias = nn.Parameter((torch.rand(k, d_out, generator=generator) * 2 - 1) * b)

    def size(self) -> int:
        """Parameters of one adaptor: r (d_in + d_out) (+ d_out)."""
        return sum(p[0].numel() for p in self.parameters())

    def delta(self, x: Tensor, pi: Tensor) -> Tensor:  # x (..., d_in), pi (K,) -> (..., d_out)
        k, r, d_in = self.lora_A.shape
        # All K adaptors as two matmuls (faster than per-adaptor einsums on CPU).
        h = F.linear(x, self.lora_A.reshape(k * r, d_in)) * pi.repeat_interleave(r)  # (..., K r)
        b = self.lora_B.transpose(0, 1).reshape(-1, k * r)  # (d_out, K r)
        return F.linear(h, b, None if self.lora_bias is None else pi @ self.lora_bias)

    def merged_delta(self, pi: Tensor) -> tuple[Tensor, Tensor | None]:
        """(sum_c pi_c B_c A_c (d_out, d_in), sum_c pi_c b_c (d_out,) or None)."""
        dw = torch.einsum("k,kor,kri->oi", pi, self.lora_B, self.lora_A)
        return dw, None if self.lora_bias is None else pi @ self.lora_bias

    def precondition(self, eps: float) -> None:
        """Scaled-GD step direction: g_A <- (B^T B + eps I)^-1 g_A, g_B <- g_B (A A^T + eps I)^-1."""
        a, b = self.lora_A, self.lora_B
        eye = eps * torch.eye(a.shape[1], dtype=a.dtype)
        with torch.no_grad():
            ga, gb = a.grad, b.grad
            if ga is not None:
                ga.copy_(torch.linalg.solve(b.transpose(1, 2) @ b + eye, ga))  # (K, r, d_in)
            if gb is not None:  # g_B M^-1 = (M^-1 g_B^T)^T, M symmetric
                gb.copy_(torch.linalg.solve(a @ a.transpose(1, 2) + eye, gb.transpose(1, 2)).transpose(1, 2))


class ConvAdaptors(_AdaptorMixin, nn.Module):
    """K two-factor conv adaptors: (1, k_w) conv C_in -> r, then (k_h, 1) conv r -> C_out.

    ``lora_A`` is (K, r, C_in, 1, k_w) and ``lora_B`` (K, C_out, r, k_h, 1); bias (K, C_out).
    The rank rule sees d_in = C_in * k_w and d_out = C_out * k_h (C * k for square kernels).
    """

    def __init__(self, base: nn.Conv2d, k: int, rank: int, bias: bool, generator: torch.Generator):
        super().__init__()
        if base.groups != 1 or base.padding_mode != "zeros" or isinstance(base.padding, str):
            raise ValueError("FLoRAL conv adaptors need groups=1, zero padding given as numbers")
        c_in, c_out = base.in_channels, base.out_channels
        kh, kw = base.kernel_size
        bound = math.sqrt(6.0 / (c_in * kw))
        self.lora_A = nn.Parameter((torch.rand(k, rank, c_in, 1, kw, generator=generator) * 2 - 1) * bound)
        self.lora_B = nn.Parameter(torch.zeros(k, c_out, rank, kh, 1))
        self.lora_bias = None
        if bias and base.bias is not None:
            b = 1.0 / math.sqrt(rank * kh)  # torch's default for a Conv2d(r, C_out, (k_h, 1)) bias
            self.lora_bias = nn.Parameter((torch.rand(k, c_out, generator=generator) * 2 - 1) * b)
        (sh, sw), (ph, pw), (dh, dw) = base.stride, base.padding, base.dilation
        self._in = {"stride": (1, sw), "padding": (0, pw), "dilation": (1, dw)}
        self._out = {"stride": (sh, 1), "padding": (ph, 0), "dilation": (dh, 1)}

    def size(self) -> int:
        return sum(p[0].numel() for p in self.parameters())

    def delta(self, x: Tensor, pi: Tensor) -> Tensor:  # x (B, C_in, H, W) -> (B, C_out, H', W')
        k, r = self.lora_A.shape[:2]
        a = self.lora_A.flatten(0, 1)  # (K r, C_in, 1, k_w): all K first factors as one conv
        h = F.conv2d(x, a, **self._in) * pi.repeat_interleave(r)[None, :, None, None]  # (B, K r, H, W')
        b = self.lora_B.transpose(0, 1).flatten(1, 2)  # (C_out, K r, k_h, 1)
        out = F.conv2d(h, b, **self._out)
        return out if self.lora_bias is None else out + (pi @ self.lora_bias)[None, :, None, None]

    def merged_delta(self, pi: Tensor) -> tuple[Tensor, Tensor | None]:
        """The single (C_out, C_in, k_h, k_w) kernel the two factors compose to, mixed by pi."""
        dw = torch.einsum("k,korh,krix->oihx", pi, self.lora_B[..., 0], self.lora_A[:, :, :, 0])
        return dw, None if self.lora_bias is None else pi @ self.lora_bias

    def precondition(self, eps: float) -> None:
        """g_in /= ||Gram(W_out)||_F + eps, g_out /= ||Gram(W_in)||_F + eps, per adaptor; the
        Gram matrices are over the rank dimension at each kernel position."""
        a, b = self.lora_A, self.lora_B
        with torch.no_grad():
            g_out = torch.einsum("korh,kosh->khrs", b[..., 0], b[..., 0])  # (K, k_h, r, r)
            g_in = torch.einsum("krix,ksix->kxrs", a[:, :, :, 0], a[:, :, :, 0])  # (K, k_w, r, r)
            if a.grad is not None:
                a.grad.div_(g_out.flatten(1).norm(dim=1).add(eps).view(-1, 1, 1, 1, 1))
            if b.grad is not None:
                b.grad.div_(g_in.flatten(1).norm(dim=1).add(eps).view(-1, 1, 1, 1, 1))


class Floral(nn.Module):
    """The container attached to a model as ``model.floral``: the mixture and every layer's adaptors."""

    def __init__(self, mixture: Mixture):
        super().__init__()
        self.mixture = mixture
        self.adaptors = nn.ModuleDict()
        self.targets: dict[str, str] = {}  # adaptor key -> base layer name in the model

    def forward(self, x):
        return x  # identity: a root nn.Sequential runs its children in order, this one included

    def adaptor_params(self) -> int:
        """K x A: every adaptor of every layer (the mixture logits are not counted)."""
        return sum(p.numel() for n, p in self.named_parameters() if "lora_" in n)


def attach_floral(model: nn.Module, k: int, rho: float, *, bias: bool = True, conv: bool = True,
                  noise: float = 1.0, temperature: float = 1.0, floor: float = 0.01,
                  exclude: tuple[str, ...] = (), generator: torch.Generator | None = None) -> Floral:
    """Add K adaptors to every nn.Linear (and nn.Conv2d) of `model`, in place.

    Args:
        model: the base model; its own parameters are left as they are.
        k: adaptors per layer (K).
        rho: rank budget (see `resolve_rank`).
        bias: per-adaptor biases on layers that have a bias.
        conv: adapt nn.Conv2d layers too.
        noise, temperature, floor: see `Mixture`.
        exclude: base layer names (as in ``named_modules``) left without adaptors.
        generator: seeds the adaptor initialisation.

    Returns:
        The attached `Floral` container (also ``model.floral``).
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    floral = Floral(Mixture(k, noise, temperature, floor))
    kinds = (nn.Linear, nn.Conv2d) if conv else (nn.Linear,)
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, kinds) or name in exclude:
            continue
        if isinstance(mod, nn.Linear):
            ad = LinearAdaptors(mod, k, resolve_rank(rho, mod.in_features, mod.out_features), bias, gen)
        else:
            kh, kw = mod.kernel_size
            ad = ConvAdaptors(mod, k, resolve_rank(rho, mod.in_channels * kw, mod.out_channels * kh), bias, gen)
        key = name.replace(".", "__")
        floral.adaptors[key] = ad
        floral.targets[key] = name
        ad.bind(floral.mixture)
        mod.register_forward_hook(ad.hook)
    model.add_module("floral", floral)
    # One mixture draw per forward pass of the whole model, shared by every layer.
    model.register_forward_pre_hook(floral.mixture.begin)
    model.register_forward_hook(floral.mixture.end)
    return floral


def base_state(model: nn.Module) -> dict[str, Tensor]:
    """The model's own parameters and buffers (everything outside ``floral``)."""
    return {n: t for n, t in model.state_dict().items() if not n.startswith("floral.")}


@torch.no_grad()
def merge_into(plain: nn.Module, model: nn.Module, logits: Tensor) -> nn.Module:
    """Write the personalised weights for mixture `logits` into `plain` (a hook-free copy of the base).

    Uses the eval-mode mixture (no noise) with the forward pass's floor, so ``plain(x)`` equals
    the adapted model's eval forward with these logits, at the base model's cost.

    Args:
        plain: a model with the base architecture and no adaptors.
        model: the model carrying ``floral`` (base weights + adaptors).
        logits: the client's mixture logits (K,).

    Returns:
        `plain`, updated in place.
    """
    floral: Floral = model.floral
    m = floral.mixture
    pi = torch.softmax(logits / m.temperature, dim=0)
    pi = pi.clamp(min=m.floor) if m.floor > 0 else pi
    state = base_state(model)
    for key, ad in floral.adaptors.items():
        name = floral.targets[key]
        dw, db = ad.merged_delta(pi)
        state[f"{name}.weight"] = state[f"{name}.weight"] + dw
        if db is not None:
            state[f"{name}.bias"] = state[f"{name}.bias"] + db
    plain.load_state_dict(state)
    return plain
