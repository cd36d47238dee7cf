"""Partition schemes: coverage, disjointness, label structure, determinism, errors."""

import numpy as np
import pytest

from hetfl.data.partition import (
    dirichlet,
    iid,
    label_histogram,
    partition,
    pathological,
    task_per_client,
)
from hetfl.errors import ConfigError

# 10 labels x 100 samples, interleaved so that index order says nothing about the label.
LABELS = np.tile(np.arange(10), 100)
KINDS = ["iid", "dirichlet", "pathological", "task_per_client"]


def _rng(seed=0):
    return np.random.default_rng(seed)


def _mean_tv_to_global(parts, labels, n_labels):
    """Mean total-variation distance between each client's label mix and the global one."""
    hist = label_histogram(parts, labels, n_labels).astype(float)
    local = hist / hist.sum(axis=1, keepdims=True)
    glob = np.bincount(labels, minlength=n_labels) / labels.size
    return float(0.5 * np.abs(local - glob).sum(axis=1).mean())


@pytest.mark.parametrize("kind", KINDS)
def test_parts_are_sorted_disjoint_int_arrays_and_deterministic(kind):
    parts = partition(kind, LABELS, 20, _rng(1), alpha=0.5, k=2)
    assert len(parts) == 20
    flat = np.concatenate(parts)
    assert flat.dtype == np.int64
    assert np.unique(flat).size == flat.size  # each sample at most once
    assert all(np.array_equal(p, np.sort(p)) and p.size > 0 for p in parts)
    again = partition(kind, LABELS, 20, _rng(1), alpha=0.5, k=2)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition(kind, LABELS, 20, _rng(2), alpha=0.5, k=2)
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other))


@pytest.mark.parametrize("kind", KINDS)
def test_every_sample_is_used_when_all_labels_are_covered(kind):
    # 20 clients x k=2 covers all 10 labels; 20 clients >= 10 tasks covers every task.
    parts = partition(kind, LABELS, 20, _rng(0), alpha=0.5, k=2)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(LABELS.size))


def test_iid_sizes_differ_by_at_most_one():
    parts = iid(103, 10, _rng(0))
    assert sorted(len(p) for p in parts) == [10] * 7 + [11] * 3


def test_pathological_gives_exactly_k_labels_and_equal_shards():
    # 4 labels x 10 samples, 4 clients, k=2: 8 slots, each label shared by exactly 2 clients,
    # so every client gets two shards of 5 samples.
    labels = np.repeat(np.arange(4), 10)
    parts = pathological(labels, 4, 2, _rng(3))
    hist = label_histogram(parts, labels, 4)
    assert (np.count_nonzero(hist, axis=1) == 2).all()
    assert set(hist[hist > 0].tolist()) == {5}
    assert (np.count_nonzero(hist, axis=0) == 2).all()


@pytest.mark.parametrize("k", [1, 2, 3, 10])
def test_pathological_k_labels_at_scale(k):
    parts = pathological(LABELS, 30, k, _rng(0))
    hist = label_histogram(parts, LABELS, 10)
    assert (np.count_nonzero(hist, axis=1) == k).all()


def test_pathological_leaves_out_unused_labels():
    # 2 clients x k=1 use 2 of the 10 labels: 2 x 100 samples assigned.
    parts = pathological(LABELS, 2, 1, _rng(0))
    assert sum(p.size for p in parts) == 200


def test_task_per_client_round_robin_and_split():
    # 3 tasks x 6 samples, 5 clients: clients 0,3 share task 0; 1,4 task 1; client 2 task 2.
    labels = np.repeat(np.array(["qa", "sum", "trans"]), 6)
    parts = task_per_client(labels, 5, _rng(0))
    tasks = [set(labels[p].tolist()) for p in parts]
    assert tasks == [{"qa"}, {"sum"}, {"trans"}, {"qa"}, {"sum"}]
    assert [p.size for p in parts] == [3, 3, 6, 3, 3]


def test_task_per_client_fewer_clients_than_tasks():
    parts = task_per_client(LABELS, 3, _rng(0))
    assert [set(LABELS[p].tolist()) for p in parts] == [{0}, {1}, {2}]
    assert [p.size for p in parts] == [100, 100, 100]


def test_dirichlet_alpha_controls_skew():
    # Mean TV distance to the global label mix: ~0 for large alpha, large for small alpha.
    near_iid = _mean_tv_to_global(dirichlet(LABELS, 10, 1000.0, _rng(0)), LABELS, 10)
    skewed = _mean_tv_to_global(dirichlet(LABELS, 10, 0.05, _rng(0)), LABELS, 10)
    assert near_iid < 0.1
    assert skewed > 0.6


def test_dirichlet_respects_min_size():
    parts = dirichlet(LABELS, 20, 0.3, _rng(0), min_size=10)
    assert min(p.size for p in parts) >= 10


def test_dirichlet_impossible_min_size_is_config_error():
    with pytest.raises(ConfigError, match="population.num_clients"):
        dirichlet(LABELS, 20, 0.5, _rng(0), min_size=51)  # 20 x 51 > 1000 samples
    with pytest.raises(ConfigError, match=r"data\.alpha: no Dirichlet"):
        # 200 clients, 2 labels, alpha tiny: some client always ends up empty.
        dirichlet(np.repeat([0, 1], 300), 200, 0.001, _rng(0), min_size=1)


def test_label_histogram_hand_example():
    labels = np.array([0, 1, 1, 2, 2, 2])
    hist = label_histogram([np.array([0, 1]), np.array([2, 3, 4, 5])], labels, 4)
    assert hist.tolist() == [[1, 1, 0, 0], [0, 1, 3, 0]]
    with pytest.raises(ValueError):
        label_histogram([np.array([0])], labels, 2)


@pytest.mark.parametrize(
    ("call", "key"),
    [
        (
            lambda: partition("shards", LABELS, 5, _rng()),
            "data.partition: unknown partition 'shards'",
        ),
        (lambda: partition("dirichlet", LABELS, 5, _rng(), alpha=0.0), "data.alpha"),
        (lambda: partition("dirichlet", LABELS, 5, _rng(), alpha=-1.0), "data.alpha"),
        (lambda: partition("dirichlet", LABELS, 5, _rng(), alpha=float("nan")), "data.alpha"),
        (lambda: partition("pathological", LABELS, 5, _rng(), k=0), "data.k"),
        (lambda: partition("pathological", LABELS, 5, _rng(), k=11), "data.k"),
        (lambda: partition("iid", LABELS, 0, _rng()), "population.num_clients"),
        (lambda: partition("task_per_client", LABELS, 0, _rng()), "population.num_clients"),
        (lambda: iid(3, 4, _rng()), "population.num_clients"),
        # Label 0 has 2 samples but 3 clients would need a shard of it.
        (lambda: pathological(np.array([0, 0, 1, 1, 1, 1]), 3, 2, _rng()), "data.k"),
    ],
)
def test_errors_name_the_config_key(call, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        call()


def test_unknown_partition_lists_choices():
    with pytest.raises(ConfigError) as err:
        partition("nope", LABELS, 5, _rng())
    assert "(choose from iid, dirichlet, pathological, task_per_client)" in str(err.value)


def test_global_rng_is_untouched():
    np.random.seed(123)
    before = np.random.random()
    np.random.seed(123)
    for kind in KINDS:
        partition(kind, LABELS, 20, _rng(0))
    assert np.random.random() == before
