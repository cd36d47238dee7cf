"""engine/flops.py: FLOPs by torch's formulas, by hand on a matmul, and a counted step equals a plain one."""

import torch

from hetfl.engine.api import ClientContext
from hetfl.engine.flops import count_flops


def test_a_matmul_step_counts_2mnk_forward_and_twice_that_backward():
    x = torch.randn(2, 3, requires_grad=True)
    w = torch.randn(3, 4, requires_grad=True)
    _, fwd = count_flops(lambda: x @ w)
    assert fwd == 2 * 2 * 3 * 4  # 48: one multiply-add per (i, k, j)
    _, step = count_flops(lambda: (x @ w).sum().backward())
    assert step == 3 * 48  # forward, dL/dx = g @ w.T and dL/dw = x.T @ g: three matmuls of the same size


def test_ops_without_a_formula_count_zero():
    x = torch.randn(5, 7)
    out, flops = count_flops(lambda: torch.relu(x).exp().sum())
    assert flops == 0.0 and torch.equal(out, torch.relu(x).exp().sum())


def test_counted_step_gives_the_plain_steps_bits_on_tiny_llama():
    """torch's FlopCounterMode changes tiny-llama's gradients in the last bits; this meter must not,
    or which worker counts a shape first would change the result."""
    from hetfl.config import load_config
    from hetfl.runner import build_run

    sc, _ = build_run(load_config("fedit-instruct", []))
    model, batch = sc.model, sc.task.collate(sc.client_data[0][:4])
    for p in model.parameters():
        p.requires_grad_(True)

    def grads(counted: bool):
        model.zero_grad(set_to_none=True)

        def step():
            loss = sc.task.loss(model, batch)
            loss.backward()
            return loss

        loss, flops = count_flops(step) if counted else (step(), None)
        return [p.grad.clone() for p in model.parameters()], loss.detach(), flops

    g0, l0, _ = grads(False)
    g1, l1, flops = grads(True)
    assert torch.equal(l0, l1) and all(torch.equal(a, b) for a, b in zip(g0, g1))
    assert flops > 0


def test_context_counts_a_key_once_and_caches_it():
    w = torch.randn(3, 4, requires_grad=True)
    x = torch.randn(2, 3)
    cache: dict = {}
    ctx = ClientContext(cid=0, rnd=1, data=[], device=None, knobs={}, state={}, seed=0, model=None, task=None,
                        _flop_cache=cache)
    for _ in range(3):
        ctx.compute(("mm", 2), lambda: (x @ w).sum().backward())
    assert cache == {("mm", 2): 96.0}  # forward 48, dL/dw 48 (x needs no gradient)
    assert ctx.flops == 3 * 96.0
