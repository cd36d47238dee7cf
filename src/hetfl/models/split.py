"""Cut a `SplitClassifier` into head | body | tail at a block boundary.

For a cut point ``c`` (0 <= c <= number of blocks):

    head  = stem + blocks[:c]        runs on the client (input side)
    body  = blocks[c:]               runs on the server
    tail  = final norm, pooling and the classifier (everything `tail()` uses), on the client
            (U-shaped split) or on the server (vanilla SplitFed)

``tail(body(head(batch)))`` equals ``model(batch)`` exactly. A weaker device gets a smaller
``c`` (fewer blocks on the device, more on the server); the cut can differ per client.

Which non-block parameters belong to the stem is found by running ``stem()`` once on a probe
batch and recording which modules ran, so no model has to list its parameter names by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class SplitLayout:
    """Parameter names of a model's stages (names as in ``model.named_parameters()``).

    Attributes:
        stem: parameters of the input stage.
        blocks: per block, its parameters.
        tail: every other parameter (final norm, classifier).
    """

    stem: tuple[str, ...]
    blocks: tuple[tuple[str, ...], ...]
    tail: tuple[str, ...]

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def head(self, cut: int) -> tuple[str, ...]:
        """Client-side input part for cut `cut`: the stem and the first `cut` blocks."""
        return self.stem + tuple(n for b in self.blocks[:cut] for n in b)

    def body(self, cut: int) -> tuple[str, ...]:
        """Server-side part for cut `cut`: blocks `cut..L-1`."""
        return tuple(n for b in self.blocks[cut:] for n in b)


def split_layout(model: nn.Module, probe: dict[str, Tensor]) -> SplitLayout:
    """Assign every parameter of `model` to stem, a block, or tail.

    Args:
        model: a `SplitClassifier`.
        probe: one collated batch; only used to see which modules `stem()` runs.

    Returns:
        The layout. Tied parameters are listed once, where ``named_parameters`` lists them.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    blocks = tuple(tuple(names[id(p)] for p in b.parameters() if id(p) in names) for b in model.blocks)
    ran: list[nn.Module] = []
    hooks = [m.register_forward_pre_hook(lambda mod, _args: ran.append(mod)) for m in model.modules()]
    try:
        with torch.no_grad():
            model.stem(probe)
    finally:
        for h in hooks:
            h.remove()
    in_blocks = {n for b in blocks for n in b}
    stem_ids = {id(p) for m in ran for p in m.parameters(recurse=False)}
    stem = tuple(n for n, p in model.named_parameters() if id(p) in stem_ids and n not in in_blocks)
    tail = tuple(n for n, _ in model.named_parameters() if n not in in_blocks and n not in stem)
    return SplitLayout(stem, blocks, tail)


def head_forward(model: nn.Module, batch: dict[str, Tensor], cut: int) -> tuple[Tensor, Tensor | None]:
    """Stem and blocks[:cut]: the activations at the cut, (B, T, D) or (B, ...), and the mask."""
    h, mask = model.stem(batch)
    for i in range(cut):
        h = model.run_block(i, h, mask)
    return h, mask


def body_forward(model: nn.Module, h: Tensor, mask: Tensor | None, cut: int) -> Tensor:
    """Blocks[cut:] applied to the cut activations; same shape out as in."""
    for i in range(cut, len(model.blocks)):
        h = model.run_block(i, h, mask)
    return h


def mask_to_lengths(mask: Tensor | None) -> Tensor | None:
    """(B, T) right-padded 0/1 mask -> (B,) int32 lengths: 4 bytes per sample on the wire."""
    return None if mask is None else mask.sum(1).to(torch.int32)


def lengths_to_mask(lengths: Tensor | None, tokens: int) -> Tensor | None:
    """Inverse of `mask_to_lengths` for right padding: (B,) -> (B, T) int64 0/1 mask."""
    if lengths is None:
        return None
    return (torch.arange(tokens).unsqueeze(0) < lengths.long().unsqueeze(1)).long()  # (B, T)


def count(model: nn.Module, names: tuple[str, ...]) -> int:
    """Number of elements in the named parameters."""
    params = dict(model.named_parameters())
    return sum(params[n].numel() for n in names)


def cut_problem(cut: int, depth: int, model: str = "the model") -> str | None:
    """Why `cut` is no valid cut of a `depth`-block model (the server keeps at least one block),
    or None. The one rule that config validation and the methods' cut owner both apply."""
    if 0 <= cut < depth:
        return None
    return f"cut {cut} is outside 0..{depth - 1} ({model} has {depth} block{'s' * (depth != 1)} and the server keeps at least one)"
