"""Quality metrics: Rouge-L, exact match, accuracy, perplexity. Pure functions.

Text metrics work on tokens from `_tokens`: lowercase, then maximal runs of word characters
(``\\w+``), so whitespace and punctuation both separate tokens and are themselves dropped.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence

import numpy as np

# Metric names shared by every task and the loop: the items one evaluation scored (the server's
# held-out set), and the items of all clients' own test splits together (per-client evaluation).
EVAL_N = "eval_n"
EVAL_CLIENT_N = "eval_client_n"

_TOKEN = re.compile(r"\w+")
_SPACES = re.compile(r"\s+")


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def _lcs_len(a: list[str], b: list[str]) -> int:
    # Classic O(len(a) * len(b)) dynamic programme, one row at a time.
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_f1(pred: str, ref: str) -> float:
    """Rouge-L F1 (beta = 1) between a prediction and one reference.

    ``P = LCS / len(pred)``, ``R = LCS / len(ref)``, ``F = 2PR / (P + R)`` over tokens
    (Lin 2004, "ROUGE: A Package for Automatic Evaluation of Summaries", Sec. 3.1). Example:
    "the cat sat" vs "the cat on the mat": LCS 2, P 2/3, R 2/5, F 0.5.

    Args:
        pred: Generated text.
        ref: Reference text.

    Returns:
        F1 in [0, 1]; 1.0 if both have no tokens, 0.0 if exactly one has none.
    """
    p, r = _tokens(pred), _tokens(ref)
    if not p and not r:
        return 1.0
    if not p or not r:
        return 0.0
    lcs = _lcs_len(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def mean_rouge_l(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Mean of `rouge_l_f1` over aligned pairs.

    Raises:
        ValueError: If the sequences differ in length or are empty.
    """
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references")
    if not preds:
        raise ValueError("no predictions to score")
    return sum(rouge_l_f1(p, r) for p, r in zip(preds, refs)) / len(preds)


def _normalise(text: str) -> str:
    text = _SPACES.sub(" ", text.lower()).strip()
    return text.rstrip(string.punctuation).rstrip()


def exact_match(pred: str, ref: str) -> float:
    """1.0 if the texts are equal after normalisation, else 0.0.

    Normalisation: lowercase, collapse runs of whitespace to one space, strip both ends, and
    strip trailing ASCII punctuation (so "Paris." matches "paris"). Inner punctuation counts.

    Args:
        pred: Generated text.
        ref: Reference text.

    Returns:
        1.0 or 0.0.
    """
    return 1.0 if _normalise(pred) == _normalise(ref) else 0.0


def _to_numpy(x: object) -> np.ndarray:
    # Accept torch tensors without importing torch here.
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()  # type: ignore[union-attr]
    return np.asarray(x)


def accuracy(logits_or_preds: object, labels: object) -> float:
    """Fraction of correct predictions.

    Args:
        logits_or_preds: Either class scores of shape ``(..., n_classes)`` (argmax over the last
            axis is taken) or predicted class ids with the same shape as ``labels``. Numpy
            arrays, sequences and torch tensors are accepted.
        labels: True class ids, shape ``(...)``.

    Returns:
        Accuracy in [0, 1].

    Raises:
        ValueError: If shapes do not line up or there are no labels.
    """
    x, y = _to_numpy(logits_or_preds), _to_numpy(labels)
    if x.ndim == y.ndim + 1:
        x = x.argmax(axis=-1)
    if x.shape != y.shape:
        raise ValueError(f"predictions of shape {x.shape} do not match labels of shape {y.shape}")
    if y.size == 0:
        raise ValueError("no labels to score")
    return float((x == y).mean())


def perplexity_from_nll(total_nll: float, n_tokens: int) -> float:
    """``exp(total_nll / n_tokens)``, with ``total_nll`` the summed natural-log NLL.

    Returns ``inf`` when the exponent overflows.

    Raises:
        ValueError: If ``n_tokens <= 0``.
    """
    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be > 0, got {n_tokens}")
    try:
        return math.exp(total_nll / n_tokens)
    except OverflowError:
        return math.inf
