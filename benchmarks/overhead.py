"""Simulator overhead: the same FedIT workload through hetfl and through a bare PyTorch loop.

Both sides train the same LoRA-wrapped tiny-llama on the same client batches (same samples,
same order, same local steps, same optimiser) and average the same deltas; evaluation is left
out of both. hetfl additionally runs the link (codec + ledger), FLOP counting, the cost model
and metric bookkeeping. Prints per-side seconds (best of --repeats) and, last,
`overhead_ratio=<hetfl/bare>` (target <= 1.05).

    python benchmarks/overhead.py [--rounds 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hetfl.config import load_config  # noqa: E402
from hetfl.seeding import generator  # noqa: E402
from hetfl.engine.loop import run_rounds, sample_clients  # noqa: E402
from hetfl.methods.common import make_optimizer  # noqa: E402
from hetfl.runner import build_method  # noqa: E402
from hetfl.scenario import build_scenario  # noqa: E402

OVERRIDES = ["eval.at_start=false", "population.num_clients=10", "population.clients_per_round=4",
             "train.local_steps=8", "train.batch_size=8"]


class NoEval:
    """Wraps a task so that evaluation costs nothing on either side."""

    def __init__(self, task):
        self._task = task

    def __getattr__(self, name):
        return getattr(self._task, name)

    def evaluate(self, model, samples=None):
        return {}


def hetfl_run(cfg) -> float:
    sc = build_scenario(cfg)
    sc.task = NoEval(sc.task)
    method = build_method(cfg)
    t0 = time.perf_counter()
    run_rounds(sc, method)
    return time.perf_counter() - t0


def bare_run(cfg) -> float:
    """FedAvg over LoRA written directly: no link, no ledger, no FLOP counter, no cost model."""
    sc = build_scenario(cfg)
    method = build_method(cfg)
    state = method.setup(sc)  # same LoRA injection and init as hetfl
    model, task = sc.model, sc.task
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    glob = {k: v.clone() for k, v in state["global"].items()}
    t0 = time.perf_counter()
    for rnd in range(1, cfg.rounds + 1):
        cids = sample_clients(cfg.seed, rnd, sc.num_clients, cfg.population.clients_per_round)
        total = sum(len(sc.client_data[c]) for c in cids)
        acc = {k: torch.zeros_like(v) for k, v in glob.items()}
        for cid in cids:
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(glob[k])
            opt = make_optimizer(params.values(), cfg)
            model.train()
            gen = generator(cfg.seed, rnd, cid, "batches")
            for batch in task.batches(sc.client_data[cid], cfg.train.local_steps, cfg.train.batch_size, gen):
                opt.zero_grad(set_to_none=True)
                task.loss(model, batch).backward()
                opt.step()
            w = len(sc.client_data[cid]) / total
            for k, p in params.items():
                acc[k] += (p.detach() - glob[k]) * w
        glob = {k: glob[k] + acc[k] for k in glob}
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = load_config("fedit-instruct", [*OVERRIDES, f"rounds={args.rounds}"])
    hetfl_t, bare_t = [], []
    for i in range(args.repeats):  # interleave so machine noise hits both sides alike
        bare_t.append(bare_run(cfg))
        hetfl_t.append(hetfl_run(cfg))
        print(f"repeat {i}: bare {bare_t[-1]:.2f} s, hetfl {hetfl_t[-1]:.2f} s", flush=True)
    b, h = min(bare_t), min(hetfl_t)
    print(f"workload: {args.rounds} rounds x {cfg.population.clients_per_round} clients x "
          f"{cfg.train.local_steps} steps (batch {cfg.train.batch_size}), tiny-llama + LoRA r={cfg.lora.rank}")
    print(f"bare_s={b:.3f} hetfl_s={h:.3f} (best of {args.repeats})")
    print(f"overhead_ratio={h / b:.3f}")


if __name__ == "__main__":
    main()
