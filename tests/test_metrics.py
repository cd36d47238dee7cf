"""Rouge-L, exact match, accuracy and perplexity against hand-computed values."""

import math

import numpy as np
import pytest

from hetfl.eval.metrics import accuracy, exact_match, mean_rouge_l, perplexity_from_nll, rouge_l_f1


@pytest.mark.parametrize(
    ("pred", "ref", "expected"),
    [
        # LCS "the cat" = 2; P = 2/3, R = 2/5, F = 2 * (4/15) / (16/15) = 0.5.
        ("the cat sat", "the cat on the mat", 0.5),
        # Case and punctuation are not tokens.
        ("The cat, sat!", "the cat sat", 1.0),
        # LCS "b d" = 2; P = 2/4, R = 2/3, F = 4/7.
        ("a b c d", "b d e", 4 / 7),
        # LCS is order-sensitive: "y" or "x" alone, 1; P = R = 1/2.
        ("x y", "y x", 0.5),
        ("alpha beta", "gamma delta", 0.0),
        ("", "", 1.0),
        ("!!! ...", "", 1.0),  # no tokens on either side
        ("", "something", 0.0),
        ("something", "", 0.0),
    ],
)
def test_rouge_l_hand_examples(pred, ref, expected):
    assert rouge_l_f1(pred, ref) == pytest.approx(expected)


def test_mean_rouge_l():
    assert mean_rouge_l(["the cat sat", "x"], ["the cat on the mat", "x"]) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        mean_rouge_l(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        mean_rouge_l([], [])


@pytest.mark.parametrize(
    ("pred", "ref", "expected"),
    [
        ("  Paris. ", "paris", 1.0),
        ("New   York!", "new york", 1.0),
        ("new\tyork", "New York", 1.0),
        ("42?!", "42", 1.0),
        ("U.S.A.", "usa", 0.0),  # only trailing punctuation is stripped
        ("paris", "parish", 0.0),
        ("new york", "newyork", 0.0),
    ],
)
def test_exact_match_normalisation(pred, ref, expected):
    assert exact_match(pred, ref) == expected


def test_accuracy_from_logits_and_from_ids():
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])  # argmax 1, 0, 1
    assert accuracy(logits, [1, 1, 1]) == pytest.approx(2 / 3)
    assert accuracy([1, 2, 3, 4], [1, 2, 0, 4]) == pytest.approx(0.75)
    # (batch=1, seq=2, vocab=3) logits against (1, 2) targets.
    assert accuracy(np.array([[[0, 5, 0], [9, 0, 0]]]), np.array([[1, 2]])) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        accuracy([1, 2], [1, 2, 3])
    with pytest.raises(ValueError):
        accuracy([], [])


def test_accuracy_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0]], requires_grad=True)
    assert accuracy(logits, torch.tensor([0, 0])) == pytest.approx(0.5)


def test_perplexity_from_nll():
    assert perplexity_from_nll(10 * math.log(4.0), 10) == pytest.approx(4.0)
    assert perplexity_from_nll(0.0, 3) == 1.0
    assert perplexity_from_nll(1e6, 1) == math.inf
    with pytest.raises(ValueError):
        perplexity_from_nll(1.0, 0)
