"""Codecs: what a tensor becomes on the wire, and how many bytes that costs.

A codec's `roundtrip` returns the tensor the receiver reconstructs plus the exact payload size
and the distortion it introduced, so the `Link` can count bytes without the method's help.
Codecs are named in YAML (`comm.up: fp16`); stochastic codecs take the link's seeded generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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


CODECS.add("fp32", lambda: CastCodec(torch.float32))
CODECS.add("fp16", lambda: CastCodec(torch.float16))
CODECS.add("bf16", lambda: CastCodec(torch.bfloat16))


def make_codec(name: str, key: str = "comm"):
    """Instantiate a registered codec by name (`ConfigError` naming `key` if unknown)."""
    return CODECS.get(name, key)()
