"""Does the shipped tiny-vit checkpoint help on digits? Pretrained vs from scratch, centralised.

Both models get the same fresh 10-class head (same seed), the same batches and the same
optimiser; only the body's starting weights differ. Two regimes:
- full fine-tuning for `--steps` AdamW steps;
- a linear probe: frozen body, mean-pooled features, the head trained alone (full batch).
Prints held-out accuracies (stratified 300-image test set, seed 0) as JSON.

    .venv/bin/python scripts/vit_transfer_check.py --steps 150
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from hetfl.data.vision import load_digits_images
from hetfl.models.classifiers import TinyViT, build_image_classifier
from hetfl.tasks.classify import stratified_split


def digits_split(n_test: int = 300, seed: int = 0):
    x, y = load_digits_images()
    tr, te = stratified_split(y, n_test, np.random.default_rng(seed))
    y = torch.from_numpy(y)
    return x[tr], y[tr], x[te], y[te]


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    pred = torch.cat([model({"pixel_values": x[i:i + 150]}).argmax(-1) for i in range(0, len(x), 150)])
    return 100.0 * float((pred == y).float().mean())


def finetune(name: str, steps: int, batch_size: int = 32, lr: float = 1e-3, seed: int = 0, n_eval: int = 300) -> float:
    """Held-out accuracy (on the first `n_eval` test images) after full fine-tuning `name` for `steps` steps."""
    xtr, ytr, xte, yte = digits_split()
    xte, yte = xte[:n_eval], yte[:n_eval]
    model = build_image_classifier(name, 10, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(xtr), (batch_size,), generator=g)
        loss = F.cross_entropy(model({"pixel_values": xtr[idx]}), ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return accuracy(model, xte, yte)


@torch.no_grad()
def features(model: TinyViT, x: torch.Tensor) -> torch.Tensor:
    """Mean-pooled, normed tokens (what the head sees), (N, D)."""
    model.eval()
    out = []
    for i in range(0, len(x), 200):
        h, mask = model.stem({"pixel_values": x[i:i + 200]})
        for b in range(len(model.blocks)):
            h = model.run_block(b, h, mask)
        out.append(model.norm(h).mean(1))
    return torch.cat(out)


def linear_probe(name: str, n_train: int = 1497, steps: int = 300, lr: float = 1e-2, seed: int = 0) -> float:
    """Held-out accuracy of a head trained alone on frozen features of `name`."""
    xtr, ytr, xte, yte = digits_split()
    model = build_image_classifier(name, 10, seed)
    ftr, fte = features(model, xtr[:n_train]), features(model, xte)
    head = model.classifier
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(steps):
        loss = F.cross_entropy(head(ftr), ytr[:n_train])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return 100.0 * float((head(fte).argmax(-1) == yte).float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=150)
    a = p.parse_args()
    out, t0 = {}, time.perf_counter()
    for name in ("tiny-vit", "tiny-vit-random"):
        out[name] = {"finetune_acc": round(finetune(name, a.steps), 2), "linear_probe_acc": round(linear_probe(name), 2)}
    out["steps"], out["wall_s"] = a.steps, round(time.perf_counter() - t0, 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
