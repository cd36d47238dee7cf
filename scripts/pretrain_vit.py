"""Pretrain the shipped `tiny-vit` on procedurally generated shapes (no digits), on CPU.

Every batch is rendered fresh by `hetfl.data.vision.make_shapes` from a seed derived from
(seed, step), and the model is initialised from `seed`, so a run is reproducible step by step:
`--max-steps 10` repeats the first ten logged losses of the full run (the learning-rate
schedule still follows `--steps`). Writes `config.json`, `model.safetensors` (16-class head,
which downstream users replace) and `pretrain_log.json` (args, per-step losses, held-out shape
accuracy, wall time) to `--out`.

    .venv/bin/python scripts/pretrain_vit.py                 # the shipped checkpoint
    .venv/bin/python scripts/pretrain_vit.py --max-steps 10 --out /tmp/vit
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hetfl.data.vision import SHAPE_CLASSES, make_shapes
from hetfl.seeding import derive_seed
from hetfl.models.classifiers import TINY_VIT_DIR, TinyViT, TinyViTConfig, num_params, save_tiny_vit


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=TINY_VIT_DIR)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=600, help="schedule length")
    p.add_argument("--max-steps", type=int, default=None, help="stop early (for reproducibility checks)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--mlp", type=int, default=256)
    p.add_argument("--val-size", type=int, default=512)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: leave as is)")
    return p.parse_args(argv)


def lr_at(step: int, a: argparse.Namespace) -> float:
    """Linear warmup then cosine decay to 5% of the peak, over `a.steps`."""
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    t = (step - a.warmup) / max(1, a.steps - a.warmup)
    return a.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


@torch.no_grad()
def accuracy(model: TinyViT, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    pred = torch.cat([model({"pixel_values": x[i:i + 256]}).argmax(-1) for i in range(0, len(x), 256)])
    model.train()
    return 100.0 * float((pred == y).float().mean())


def main(argv: list[str] | None = None) -> dict:
    """Run the pretraining; returns the log that is also written to ``out/pretrain_log.json``."""
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    config = TinyViTConfig(hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=a.heads,
                           intermediate_size=a.mlp, num_labels=len(SHAPE_CLASSES))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(a.seed)
        model = TinyViT(config)
    # No weight decay on biases, norms and position embeddings (the usual ViT recipe).
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and not n.endswith("pos")]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and not n.endswith("pos"))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=a.lr)
    val_x, val_y = make_shapes(a.val_size, derive_seed(a.seed, "shapes", "val"))
    steps = a.steps if a.max_steps is None else min(a.steps, a.max_steps)
    losses, evals = [], []
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        x, y = make_shapes(a.batch_size, derive_seed(a.seed, "shapes", step))
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a)
        loss = F.cross_entropy(model({"pixel_values": x}), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(round(float(loss.detach()), 6))
        if (step + 1) % 100 == 0 or step + 1 == steps:
            evals.append({"step": step + 1, "val_accuracy": round(accuracy(model, val_x, val_y), 2)})
            print(f"step {step + 1}/{steps} loss {losses[-1]:.4f} val_acc {evals[-1]['val_accuracy']:.1f}% "
                  f"{time.perf_counter() - t0:.0f}s", flush=True)
    log = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(vars(a).items()) if k != "out"},
        "classes": list(SHAPE_CLASSES),
        "num_params": num_params(model),
        "steps_run": steps,
        "losses": losses,
        "evals": evals,
        "wall_time_s": round(time.perf_counter() - t0, 1),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    save_tiny_vit(model, a.out)
    (Path(a.out) / "pretrain_log.json").write_text(json.dumps(log, indent=1) + "\n")
    return log


if __name__ == "__main__":
    main()
