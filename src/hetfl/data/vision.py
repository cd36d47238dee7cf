"""Image data: scikit-learn's digits as 32x32 tensors, concept shifts, and procedural shapes.

- `load_digits_images` turns the 1,797 8x8 digits (values 0..16, shipped inside scikit-learn)
  into (1, 32, 32) float tensors in [0, 1], upscaled bilinearly so a patch-4 ViT sees 64 patches.
- `rotate_images` and `shift_labels` are the two concept shifts FLoRAL-style clustered
  scenarios apply per cluster: the same inputs rotated by quarter turns, or the same images
  with permuted labels.
- `make_shapes` renders a seeded, labelled set of stroke and shape images (rings, bars,
  crosses, corners, ...) used to pretrain the shipped `tiny-vit`. It draws no digits.

Everything is offline and deterministic given a seed; nothing touches a global RNG.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 32  # side of every image tensor produced here

SHAPE_CLASSES: tuple[str, ...] = (
    "ring", "disc", "square", "block", "triangle", "plus", "cross", "hbar",
    "vbar", "slash", "equals", "arch", "corner", "tee", "chevron", "dots",
)


def load_digits_images(size: int = IMAGE_SIZE) -> tuple[torch.Tensor, np.ndarray]:
    """scikit-learn's digits as float images.

    Args:
        size: output side; the 8x8 originals are upscaled bilinearly (align_corners=False).

    Returns:
        ``(images, labels)``: images (1797, 1, size, size) float32 in [0, 1] (pixel / 16),
        labels (1797,) int64 in 0..9, in scikit-learn's order.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)  # (N, 1, 8, 8)
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    return x.contiguous(), d.target.astype(np.int64)


def rotate_images(x: torch.Tensor, quarter_turns: int) -> torch.Tensor:
    """Rotate images counter-clockwise by ``90 * quarter_turns`` degrees (exact, no resampling).

    Args:
        x: (..., H, W) images; H == W when the turn count is odd.
        quarter_turns: any integer; taken modulo 4.

    Returns:
        A new tensor of the same shape.
    """
    return torch.rot90(x, k=quarter_turns % 4, dims=(-2, -1)).contiguous()


def shift_labels(y, c: int, n_classes: int):
    """Label shift ``(y + c) mod n_classes`` (cluster ``c``'s relabelling).

    Args:
        y: an int, a numpy array or a tensor of class indices.
        c: the shift (cluster id); any integer.
        n_classes: number of classes.

    Returns:
        The shifted labels, same type as ``y``.
    """
    return (y + c) % n_classes


# ----------------------------------------------------------------------------- procedural shapes

def _segments(kind: str) -> list[tuple[float, float, float, float]]:
    """Line segments of a stroke shape in unit coordinates ([-1, 1]^2, y pointing down)."""
    table = {
        "plus": [(-1, 0, 1, 0), (0, -1, 0, 1)],
        "cross": [(-1, -1, 1, 1), (-1, 1, 1, -1)],
        "hbar": [(-1, 0, 1, 0)],
        "vbar": [(0, -1, 0, 1)],
        "slash": [(-0.8, 1, 0.8, -1)],
        "equals": [(-1, -0.45, 1, -0.45), (-1, 0.45, 1, 0.45)],
        "corner": [(-0.8, -1, -0.8, 1), (-0.8, 1, 0.9, 1)],
        "tee": [(-1, -1, 1, -1), (0, -1, 0, 1)],
        "chevron": [(-1, 1, 0, -1), (0, -1, 1, 1)],
        "triangle": [(-1, 0.9, 1, 0.9), (1, 0.9, 0, -0.9), (0, -0.9, -1, 0.9)],
        "square": [(-1, -1, 1, -1), (1, -1, 1, 1), (1, 1, -1, 1), (-1, 1, -1, -1)],
    }
    return table[kind]


def _seg_distance(px: np.ndarray, py: np.ndarray, seg: np.ndarray) -> np.ndarray:
    # Distance from every pixel to segment (x0, y0, x1, y1), in pixels.
    x0, y0, x1, y1 = seg
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((px - x0) * dx + (py - y0) * dy) / max(dx * dx + dy * dy, 1e-9), 0.0, 1.0)
    return np.hypot(px - (x0 + t * dx), py - (y0 + t * dy))


def _render(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """One (size, size) image of shape `kind` at a random position, scale, angle and width."""
    py, px = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    scale = rng.uniform(0.22, 0.45) * size  # half-extent in pixels
    cx, cy = rng.uniform(scale + 1, size - scale - 1, size=2)
    width = rng.uniform(1.5, 4.5)  # stroke width in pixels
    angle = rng.uniform(-0.45, 0.45)  # radians; small, so bars and slashes stay distinct
    ca, sa = math.cos(angle), math.sin(angle)
    # Pixel coordinates in the shape's unit frame (rotated, scaled); aspect varies slightly.
    aspect = rng.uniform(0.75, 1.25)
    ux = ((px - cx) * ca + (py - cy) * sa) / (scale * aspect)
    uy = (-(px - cx) * sa + (py - cy) * ca) / scale
    r = np.hypot(ux, uy) * scale  # radius in pixels (approximately, for round shapes)
    def to_px(x: float, y: float) -> tuple[float, float]:  # unit frame -> pixel coordinates
        return cx + (x * aspect * ca - y * sa) * scale, cy + (x * aspect * sa + y * ca) * scale

    def stroke(segs) -> np.ndarray:
        out = np.full_like(px, np.inf)
        for x0, y0, x1, y1 in segs:
            out = np.minimum(out, _seg_distance(px, py, np.array([*to_px(x0, y0), *to_px(x1, y1)])))
        return out

    if kind == "ring":
        d = np.abs(r - scale)
    elif kind == "arch":  # upper half of a ring standing on two legs
        d = np.minimum(np.where(uy <= 0, np.abs(r - scale), np.inf), stroke([(-1, 0, -1, 1), (1, 0, 1, 1)]))
    elif kind == "disc":
        d = np.maximum(r - scale, 0.0) * 2.0
    elif kind == "block":
        d = np.maximum(np.maximum(np.abs(ux), np.abs(uy)) - 1.0, 0.0) * scale * 2.0
    elif kind == "dots":  # 2x2 grid of dots
        d = np.full_like(px, np.inf)
        for gx in (-0.6, 0.6):
            for gy in (-0.6, 0.6):
                d = np.minimum(d, np.maximum(np.hypot(ux - gx, uy - gy) * scale - width, 0.0))
    else:
        d = stroke(_segments(kind))
    # Anti-aliased stroke: full inside width/2, a one-pixel linear edge.
    return np.clip(width / 2 + 0.5 - d, 0.0, 1.0)


def make_shapes(n: int, seed: int, size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded batch of labelled procedural shape images (no digits).

    Each image holds one of `SHAPE_CLASSES` at a random position, scale, small rotation,
    aspect and stroke width, with a random brightness; half of them are re-rendered at a low
    resolution (8..16 px, then bilinear back to `size`) so the blur resembles upscaled small
    images, and Gaussian noise is added. Classes are balanced in expectation.

    Args:
        n: number of images.
        seed: the images depend on the seed only.
        size: image side.

    Returns:
        ``(images, labels)``: (n, 1, size, size) float32 in [0, 1] and (n,) int64.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(SHAPE_CLASSES), size=n)
    imgs = np.stack([_render(SHAPE_CLASSES[k], rng, size) * rng.uniform(0.6, 1.0) for k in labels])
    x = torch.from_numpy(imgs.astype(np.float32)).unsqueeze(1)  # (n, 1, size, size)
    low = rng.random(n) < 0.5
    res = rng.integers(8, 17, size=n)
    for r in np.unique(res[low]):  # blur by down- then up-sampling, grouped by resolution
        idx = torch.from_numpy(np.flatnonzero(low & (res == r)))
        small = F.interpolate(x[idx], size=(int(r), int(r)), mode="area")
        x[idx] = F.interpolate(small, size=(size, size), mode="bilinear", align_corners=False)
    noise = torch.from_numpy(rng.normal(0.0, 1.0, size=x.shape).astype(np.float32))
    sigma = torch.from_numpy(rng.uniform(0.0, 0.08, size=(n, 1, 1, 1)).astype(np.float32))
    return (x + sigma * noise).clamp_(0.0, 1.0), torch.from_numpy(labels.astype(np.int64))
