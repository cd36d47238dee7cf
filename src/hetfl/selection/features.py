"""Per-sample signals that data-selection stages compute on a client: hidden-state features and
response perplexities of a causal LM, plus the 2-D reductions FedHDS clusters in.

Everything iterates `samples` in the given order (FedHDS's released code iterated a shuffled
loader and then indexed the dataset with the feature's position; keeping one fixed order is the
fix). Each forward is counted with `ctx.compute` under a key that captures its shape, so the
selection's FLOPs reach the ledger like training FLOPs do.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import numpy as np
import torch

from hetfl.errors import ConfigError

Sample = tuple[list[int], list[int]]  # (input_ids, labels with -100 on the prompt)
PAD_MULTIPLE = 16  # pad to a multiple of this: few distinct shapes, so few FLOP measurements


def _is_token_sample(s: Any) -> bool:
    return isinstance(s, tuple) and len(s) == 2 and isinstance(s[0], list) and isinstance(s[1], list)


def _pad_batch(seqs: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (ids, mask) of shape (B, T) and each row's last real position (B,)."""
    t = max(len(s) for s in seqs)
    t += (-t) % PAD_MULTIPLE
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    last = torch.tensor([len(s) - 1 for s in seqs])
    return ids, mask, last


def _count(ctx, key: tuple, fn):
    return ctx.compute(key, fn) if ctx is not None else fn()


def prompt_part(sample: Sample) -> list[int]:
    """The prompt tokens of an encoded sample (the positions whose label is -100)."""
    ids, labels = sample
    n = next((i for i, lab in enumerate(labels) if lab != -100), len(labels))
    return ids[: max(1, n)]


@torch.no_grad()
def last_token_features(model: torch.nn.Module, samples: Sequence[Sample], pad_id: int, *,
                        prompt_only: bool = False, layers: Literal["all", "last"] = "all",
                        batch_size: int = 16, ctx=None, tag: tuple = ()) -> np.ndarray:
    """Hidden state of each sample's last real token, from every layer (embeddings included).

    Right padding plus a causal mask leaves the last real token's states unchanged, so batching
    gives the same features as the spec's batch size 1.

    Args:
        model: a causal LM (Hugging Face style: `get_decoder()` or `output_hidden_states`).
        samples: encoded (input_ids, labels) pairs, in the order the features are returned.
        pad_id: padding token id.
        prompt_only: feed only the prompt (default: prompt + response + eos, as the spec does).
        layers: "all" concatenates the L+1 hidden states (inter-layer fusion); "last" keeps the last.
        batch_size: samples per forward.
        ctx: a ClientContext whose `compute` counts the forward FLOPs (None: not counted).
        tag: prefix of the FLOP-cache key (e.g. which model runs).

    Returns:
        float32 array of shape (n, (L+1)*d) for "all", (n, d) for "last".
    """
    body = model.get_decoder() if hasattr(model, "get_decoder") else model
    was_training = model.training
    model.eval()
    rows = []
    try:
        for i in range(0, len(samples), batch_size):
            seqs = [prompt_part(s) if prompt_only else s[0] for s in samples[i: i + batch_size]]
            ids, mask, last = _pad_batch(seqs, pad_id)
            out = _count(ctx, ("features",) + tag + tuple(ids.shape),
                         lambda: body(input_ids=ids, attention_mask=mask, output_hidden_states=True))
            hs = out.hidden_states if layers == "all" else out.hidden_states[-1:]  # L+1 x (B, T, d)
            pick = torch.arange(len(seqs))
            rows.append(torch.cat([h[pick, last] for h in hs], dim=-1).float())  # (B, (L+1)*d)
    finally:
        model.train(was_training)
    return torch.cat(rows).numpy()


@torch.no_grad()
def response_nll(model: torch.nn.Module, samples: Sequence[Sample], pad_id: int, *, batch_size: int = 16,
                 ctx=None, tag: tuple = ()) -> np.ndarray:
    """Mean next-token NLL of each sample's response tokens (log perplexity), shape (n,)."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(samples), batch_size):
            chunk = samples[i: i + batch_size]
            ids, mask, _ = _pad_batch([s[0] for s in chunk], pad_id)
            labels = torch.full_like(ids, -100)
            for j, (_, lab) in enumerate(chunk):
                labels[j, : len(lab)] = torch.tensor(lab, dtype=torch.long)
            logits = _count(ctx, ("nll",) + tag + tuple(ids.shape),
                            lambda: model(input_ids=ids, attention_mask=mask).logits)  # (B, T, V)
            tgt = labels[:, 1:]  # position t predicts token t+1
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), tgt,
                                                    ignore_index=-100, reduction="none")  # (B, T-1)
            n = (tgt != -100).sum(1).clamp(min=1)
            out.append(nll.sum(1) / n)
    finally:
        model.train(was_training)
    return torch.cat(out).double().numpy()


def client_features(ctx, model: torch.nn.Module, *, prompt_only: bool, layers: str, batch_size: int,
                    tag: tuple = ()) -> np.ndarray:
    """Features of `ctx.data` (in order) under `model`.

    A task may supply its own `selection_features(model, samples) -> (n, d)` (non-LM tasks,
    tests with hand-built points); instruction tasks use the last-token hidden states.
    """
    fn = getattr(ctx.task, "selection_features", None)
    if fn is not None:
        return np.asarray(fn(model, ctx.data), dtype=np.float64)
    if not ctx.data or not _is_token_sample(ctx.data[0]):
        raise ConfigError("selection.name: this selector needs a causal-LM instruction task (token samples)")
    feats = last_token_features(model, ctx.data, getattr(ctx.task, "pad_id", 0) or 0, prompt_only=prompt_only,
                                layers=layers, batch_size=batch_size, ctx=ctx, tag=tag)
    return feats.astype(np.float64)


def one_thread():
    """Run sklearn's native code on one thread: on a small shared CPU, OpenMP oversubscription
    made a 25-point Barnes-Hut t-SNE ~6x slower than single-threaded."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1)


def reduce_2d(x: np.ndarray, method: Literal["tsne", "pca", "kpca", "none"], seed: int) -> np.ndarray:
    """Project features (n, D) to (n, 2), fitted on these samples only; "none" passes x through.

    t-SNE follows the spec (perplexity min(30, n-1), sklearn defaults) but is seeded. Fewer than
    four samples fall back to PCA (t-SNE is meaningless there), one sample maps to the origin.
    """
    n = x.shape[0]
    if method == "none":
        return x
    if n < 2:
        return np.zeros((n, 2))
    seed = seed % 2**31
    if method == "tsne" and n >= 4:
        from sklearn.manifold import TSNE

        with one_thread():
            return TSNE(n_components=2, perplexity=min(30.0, n - 1.0), random_state=seed).fit_transform(x)
    if method == "kpca":
        from sklearn.decomposition import KernelPCA

        with one_thread():
            y = KernelPCA(n_components=min(2, n), kernel="rbf", random_state=seed).fit_transform(x)
    else:
        from sklearn.decomposition import PCA

        with one_thread():
            y = PCA(n_components=min(2, n, x.shape[1]), random_state=seed).fit_transform(x)
    return np.pad(y, ((0, 0), (0, 2 - y.shape[1])))  # (n, 2) even when fewer components exist
