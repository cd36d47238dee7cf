"""Codecs: what a tensor becomes on the wire, and how many bytes that costs.

A codec's `roundtrip` returns the tensor the receiver reconstructs plus the exact payload size
and the distortion it introduced, so the `Link` can count bytes without the method's help.
Codecs are named in YAML (`comm.up: fp16`); stochastic codecs take the link's seeded generator.

Names:
    fp32, fp16, bf16      cast floating tensors (fp32 is lossless); `CastCodec`s in the registry's
                          CODECS table (hetfl.builtins adds them), where other codecs can be added.
    sq<b>, sq<b>g<G>      unbiased stochastic uniform quantizer with b bits (1 <= b <= 16), one
                          [min, max] range per tensor, or per group of G consecutive elements of
                          the flattened tensor (spec/sflam.md section 3).
    rq<b>, rq<b>g<G>      the same grid with deterministic round-to-nearest (biased, error <= D/2).
    sq32, rq32 (+g<G>)    aliases of lossless fp32, so a bit-width of 32 can be named uniformly.
Integer and bool tensors (labels, lengths) always pass through unquantized at their own size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from hetfl.errors import ConfigError
from hetfl.registry import CODECS


@dataclass(frozen=True)
class Encoded:
    tensor: torch.Tensor  # what the receiver reconstructs (same shape and dtype as the input)
    nbytes: int  # payload bytes on the wire
    sq_error: float  # ||decoded - original||^2, the codec's distortion


class CastCodec:
    """Send floating tensors in a narrower float type (fp32 is lossless); integers pass as they are."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.name = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]

    def roundtrip(self, t: torch.Tensor, generator: torch.Generator | None = None) -> Encoded:
        if not t.is_floating_point():
            return Encoded(t, t.numel() * t.element_size(), 0.0)
        if t.dtype == self.dtype or (self.dtype == torch.float32 and t.dtype == torch.float64):
            # Same width (or fp64 carried as fp32 is not something we send): lossless, no copy.
            wire = t if t.dtype == self.dtype else t.to(self.dtype)
            out = t if wire is t else wire.to(t.dtype)
        else:
            wire = t.to(self.dtype)
            out = wire.to(t.dtype)
        err = 0.0 if out is t else float((out - t).float().pow(2).sum())
        return Encoded(out, t.numel() * wire.element_size(), err)


@dataclass(frozen=True)
class Quant:
    """A typed codec choice for b-bit uniform quantization, as a method or the allocation picks it
    per client (`Method.codecs`): never a name that is parsed back.

    Attributes:
        bits: bits per element, 1..16, or 32 for the lossless fp32 wire format.
        group: elements per quantization group (0: one [min, max] range per tensor).
        stochastic: unbiased stochastic rounding (True) or round-to-nearest (False).
    """

    bits: int
    group: int = 0
    stochastic: bool = True

    def __post_init__(self):
        if not (1 <= self.bits <= 16 or self.bits == 32):
            raise ValueError(f"Quant: bits must be in 1..16 or 32, got {self.bits}")
        if self.group < 0:
            raise ValueError(f"Quant: group must be >= 0, got {self.group}")

    @property
    def name(self) -> str:
        """The equivalent codec name, as the ledger labels messages (fp32 for 32 bits)."""
        if self.bits == 32:
            return "fp32"
        return f"{'sq' if self.stochastic else 'rq'}{self.bits}" + (f"g{self.group}" if self.group else "")


HEADER_BYTES = 8  # per quantization group: its min and max as two fp32 numbers


def quant_nbytes(numel: int, bits: int, group: int | None = None) -> int:
    """Wire size of a quantized tensor: ceil(d*b/8) packed codes + 8 bytes (fp32 min, max) per group.

    Args:
        numel: elements d of the tensor.
        bits: bits per element b.
        group: elements per group G, or None for one group per tensor.

    Returns:
        Payload bytes; 0 for an empty tensor.
    """
    if numel == 0:
        return 0
    groups = 1 if group is None else -(-numel // group)
    return -(-numel * bits // 8) + HEADER_BYTES * groups


class UniformQuantizer:
    """Uniform b-bit quantizer on [m, M] per tensor or per group (spec/sflam.md section 3).

    With step D = (M - m) / (2^b - 1) and l = floor((x - m) / D), the stochastic mode sends
    m + (l+1) D with probability (x - m)/D - l and m + l D otherwise, so E[Q(x)] = x and
    Var[Q(x)] <= D^2/4; the deterministic mode sends the nearest grid point (error <= D/2).
    A constant group (M == m) is sent exactly (its codes carry no information).

    Args:
        bits: bits per element, 1..16.
        group: elements per group of the flattened tensor, or None for one range per tensor.
        stochastic: unbiased stochastic rounding (True) or round-to-nearest (False).
    """

    def __init__(self, bits: int, group: int | None = None, stochastic: bool = True):
        if not 1 <= bits <= 16:
            raise ValueError(f"bits must be in 1..16, got {bits}")
        if group is not None and group < 1:
            raise ValueError(f"group must be >= 1, got {group}")
        self.bits, self.group, self.stochastic = bits, group, stochastic
        self.name = f"{'sq' if stochastic else 'rq'}{bits}" + (f"g{group}" if group is not None else "")

    def roundtrip(self, t: torch.Tensor, generator: torch.Generator | None = None) -> Encoded:
        """Quantize and dequantize `t`.

        Args:
            t: any tensor; non-floating tensors pass through at their own size.
            generator: source of the stochastic rounding draws (the Link passes one seeded by
                (seed, round, client, direction, kind, call)). None: a fresh generator seeded
                with 0, so a call without one is still deterministic.

        Returns:
            The reconstruction (same shape and dtype), `quant_nbytes` bytes and ||Q(t) - t||^2.
        """
        if not t.is_floating_point():
            return Encoded(t, t.numel() * t.element_size(), 0.0)
        d = t.numel()
        if d == 0:
            return Encoded(t, 0, 0.0)
        work = torch.float64 if t.dtype == torch.float64 else torch.float32  # fp16/bf16 computed in fp32
        g = d if self.group is None else min(self.group, d)
        n_groups = -(-d // g)
        with torch.no_grad():
            x = t.detach().reshape(-1).to(work)  # (d,)
            pad = n_groups * g - d
            if pad:
                # Repeat the last element: it already belongs to the last group, so its min/max stay.
                x = torch.cat([x, x[-1:].expand(pad)])
            xg = x.view(n_groups, g)  # (n_groups, G)
            lo = xg.amin(dim=1, keepdim=True)  # (n_groups, 1)
            hi = xg.amax(dim=1, keepdim=True)
            levels = 2**self.bits - 1
            step = (hi - lo) / levels  # D per group
            # A constant group has D = 0: divide by 1 instead, its positions are all 0 -> sent exactly.
            u = ((xg - lo) / torch.where(step > 0, step, torch.ones_like(step))).clamp_(0, levels)
            if self.stochastic:
                low = u.floor().clamp_(max=levels - 1)  # l; at x = M, l = levels-1 with frac 1 -> M
                if generator is None:
                    generator = torch.Generator().manual_seed(0)
                draw = torch.rand(u.shape, generator=generator, dtype=work)  # (n_groups, G)
                code = low + (draw < (u - low)).to(work)
            else:
                code = u.round()
            y = (lo + code * step).reshape(-1)[:d].view(t.shape)
            out = y.to(t.dtype)
            err = float((out.to(torch.float64) - t.detach().to(torch.float64)).pow(2).sum())
        return Encoded(out, quant_nbytes(d, self.bits, self.group), err)


_QUANT = re.compile(r"(sq|rq)(\d+)(?:g(\d+))?")
QUANT_NAMES = "sq<b>, sq<b>g<G>, rq<b>, rq<b>g<G> (b in 1..16 or 32)"  # for help texts and errors


def parse_quantizer(name: str) -> tuple[bool, int, int | None] | None:
    """Parse a quantizer name into (stochastic, bits, group); None if `name` is no quantizer name.

    Raises:
        ValueError: the name has the quantizer form but impossible numbers (e.g. sq0, sq20, sq8g0).
    """
    m = _QUANT.fullmatch(name)
    if m is None:
        return None
    bits, group = int(m.group(2)), (int(m.group(3)) if m.group(3) is not None else None)
    if not (1 <= bits <= 16 or bits == 32):
        raise ValueError(f"quantizer {name!r}: bits must be in 1..16 (or 32 for lossless fp32), got {bits}")
    if group is not None and group < 1:
        raise ValueError(f"quantizer {name!r}: group size must be >= 1, got {group}")
    return m.group(1) == "sq", bits, group


def codec_problem(name: object) -> str | None:
    """Why `name` is not a valid codec name, or None if it is (used by config validation)."""
    if not isinstance(name, str):
        return f"expected a codec name, got {name!r}"
    try:
        if parse_quantizer(name) is not None or name in CODECS:
            return None
    except ValueError as e:
        return str(e)
    return f"unknown codec {name!r} (choose from: {', '.join(CODECS.names())}, {QUANT_NAMES})"


def make_codec(name: "str | Quant", key: str = "comm"):
    """Instantiate a codec by name (a registered one: fp32, fp16, bf16; or a quantizer name from
    a config) or from a typed `Quant` choice.

    Args:
        name: codec name, e.g. "fp16", "sq8", "sq4g64", "rq8", or a `Quant`.
        key: the config key the name came from, named in errors.

    Returns:
        An object with `name` and `roundtrip(tensor, generator) -> Encoded`.

    Raises:
        ConfigError: naming `key` if the name is unknown or its numbers are invalid.
    """
    if isinstance(name, Quant):
        return CastCodec(torch.float32) if name.bits == 32 else UniformQuantizer(name.bits, name.group or None,
                                                                                  name.stochastic)
    problem = codec_problem(name)
    if problem is not None:
        raise ConfigError(f"{key}: {problem}")
    parsed = parse_quantizer(name)
    if parsed is None:
        return CODECS.get(name, key)()
    stochastic, bits, group = parsed
    if bits == 32:
        return CastCodec(torch.float32)  # 32 bits: the fp32 wire format itself, lossless
    return UniformQuantizer(bits, group, stochastic)


def quant_error_bound(numel: int, value_range: float, bits: int) -> float:
    """Variance bound of the stochastic quantizer on one group: d (M - m)^2 / (4 (2^b - 1)^2).

    E||Q(v) - v||^2 <= this for a d-element group of range M - m (0 for 32-bit, lossless).
    """
    if bits >= 32:
        return 0.0
    return numel * value_range**2 / (4.0 * (2**bits - 1) ** 2)

