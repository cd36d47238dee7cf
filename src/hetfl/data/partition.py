"""Split a dataset's sample indices across clients.

Every function here is pure: it takes the labels (or a sample count) and an explicit
``numpy.random.Generator`` and returns one sorted ``int64`` index array per client. A sample
is given to at most one client. Nothing touches numpy's global RNG, so the same seed gives
the same partition on any backend or worker count.

Labels may be any hashable numpy dtype (ints, or strings for task names); they are mapped to
``0..L-1`` in sorted order with ``np.unique`` before splitting.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from hetfl.errors import ConfigError, DataError

# Resampling bound for `dirichlet`: if this many draws all leave some client below
# `min_size`, the setting is (practically) impossible and we say so instead of looping.
_DIRICHLET_MAX_TRIES = 1000


def iid(n_samples: int, n_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle all samples and deal them into ``n_clients`` near-equal parts.

    Part sizes differ by at most one. Every sample is assigned.

    Args:
        n_samples: Number of samples in the dataset.
        n_clients: Number of clients.
        rng: Source of randomness.

    Returns:
        One sorted index array per client.

    Raises:
        ConfigError: If ``n_clients < 1`` or there are fewer samples than clients.
    """
    _check_clients(n_clients)
    if n_samples < n_clients:
        raise ConfigError(
            f"population.num_clients: {n_clients} clients but the dataset has only "
            f"{n_samples} samples (each client needs at least one)"
        )
    perm = rng.permutation(n_samples)
    return [np.sort(p).astype(np.int64) for p in np.array_split(perm, n_clients)]


def dirichlet(
    labels: Sequence | np.ndarray,
    n_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Label-skewed split: per label, client shares are drawn from Dir(alpha).

    For each label, a proportion vector over clients is drawn from a symmetric Dirichlet with
    concentration ``alpha`` and that label's (shuffled) samples are cut accordingly (the
    scheme of Hsu et al. 2019, "Measuring the Effects of Non-Identical Data Distribution").
    Small ``alpha`` (e.g. 0.1) gives each client few labels; large ``alpha`` (e.g. 100) gives
    nearly the global label mix. If any client ends up with fewer than ``min_size`` samples,
    the whole draw is repeated, at most 1000 times. Every sample is assigned.

    Args:
        labels: One label per sample, shape ``(n_samples,)``.
        n_clients: Number of clients.
        alpha: Dirichlet concentration, > 0.
        rng: Source of randomness.
        min_size: Minimum samples per client.

    Returns:
        One sorted index array per client.

    Raises:
        ConfigError: On ``alpha <= 0``, ``n_clients < 1``, ``min_size < 0``, or when no draw
            within the retry bound gives every client ``min_size`` samples.
    """
    _check_clients(n_clients)
    _check_alpha(alpha)
    if min_size < 0:
        raise ConfigError(f"data.min_size: must be >= 0, got {min_size}")
    codes, n_labels = _encode(labels)
    n = codes.size
    if n < n_clients * min_size:
        raise ConfigError(
            f"population.num_clients: {n_clients} clients x min_size {min_size} needs "
            f"{n_clients * min_size} samples, the dataset has {n}"
        )
    by_label = [np.flatnonzero(codes == c) for c in range(n_labels)]
    for _ in range(_DIRICHLET_MAX_TRIES):
        owner = np.empty(n, dtype=np.int64)  # owner[i] = client holding sample i
        for idx in by_label:
            shares = rng.dirichlet(np.full(n_clients, float(alpha)))
            # Cut points from cumulative shares; rounding can only move a cut by one sample.
            cuts = np.round(np.cumsum(shares)[:-1] * idx.size).astype(np.int64)
            counts = np.diff(np.concatenate(([0], cuts, [idx.size])))
            owner[rng.permutation(idx)] = np.repeat(np.arange(n_clients), counts)
        sizes = np.bincount(owner, minlength=n_clients)
        if sizes.min() >= min_size:
            return [np.flatnonzero(owner == c).astype(np.int64) for c in range(n_clients)]
    raise ConfigError(
        f"data.alpha: no Dirichlet(alpha={alpha}) split in {_DIRICHLET_MAX_TRIES} draws gave "
        f"all {n_clients} clients >= {min_size} samples ({n} samples, {n_labels} labels); "
        "raise data.alpha, lower data.min_size or use fewer clients"
    )


def pathological(
    labels: Sequence | np.ndarray, n_clients: int, k: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Shard split where each client holds samples of exactly ``k`` distinct labels.

    In the spirit of McMahan et al. 2017 ("Communication-Efficient Learning of Deep Networks
    from Decentralized Data", non-IID MNIST: sort by label, give each client 2 shards). Their
    shards can straddle two labels or repeat one; here the count is exact. Labels are laid
    out in a random cyclic order and client ``i`` takes the ``k`` consecutive slots starting at
    ``i * k`` (mod the number of labels), so a client's labels are distinct whenever
    ``k <= n_labels`` and every label is used by ``floor`` or ``ceil`` of
    ``n_clients * k / n_labels`` clients. Each label's samples are shuffled and cut into
    equal shards, one per client using it; then the clients' order is shuffled. When
    ``n_clients * k < n_labels`` the unused labels' samples are left out.

    Args:
        labels: One label per sample, shape ``(n_samples,)``.
        n_clients: Number of clients.
        k: Distinct labels per client, ``1 <= k <= n_labels``.
        rng: Source of randomness.

    Returns:
        One sorted index array per client.

    Raises:
        ConfigError: On ``k < 1``, ``k`` above the number of labels, ``n_clients < 1``, or a
            label with fewer samples than the clients that must share it.
    """
    _check_clients(n_clients)
    _check_k(k)
    codes, n_labels = _encode(labels)
    if k > n_labels:
        raise ConfigError(f"data.k: {k} labels per client but the dataset has only {n_labels}")
    order = rng.permutation(n_labels)
    # slots[i, j] = j-th label of client i; k consecutive cyclic slots are distinct for k <= L.
    slots = order[(np.arange(n_clients)[:, None] * k + np.arange(k)[None, :]) % n_labels]
    parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
    for label in range(n_labels):
        holders = np.flatnonzero((slots == label).any(axis=1))
        if holders.size == 0:
            continue
        idx = np.flatnonzero(codes == label)
        if idx.size < holders.size:
            raise ConfigError(
                f"data.k: label {label} has {idx.size} samples but {holders.size} clients "
                "must each get a shard of it; lower data.k or population.num_clients"
            )
        for client, shard in zip(holders, np.array_split(rng.permutation(idx), holders.size)):
            parts[client].append(shard)
    client_order = rng.permutation(n_clients)  # decouple client id from the cyclic layout
    return [np.sort(np.concatenate(parts[c])).astype(np.int64) for c in client_order]


def task_per_client(
    labels: Sequence | np.ndarray, n_clients: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Each client holds exactly one task (label).

    Client ``i`` gets task ``i mod T`` (tasks in sorted order), so the mapping is predictable
    and personalised evaluation can look up a client's task. If there are more clients than
    tasks, the clients sharing a task split its shuffled samples into near-equal parts. If
    there are fewer clients than tasks, the tasks ``n_clients..T-1`` are left out.

    Args:
        labels: One task label per sample, shape ``(n_samples,)``.
        n_clients: Number of clients.
        rng: Source of randomness (used to split shared tasks).

    Returns:
        One sorted index array per client.

    Raises:
        ConfigError: On ``n_clients < 1`` or a task with fewer samples than its clients.
    """
    _check_clients(n_clients)
    codes, n_tasks = _encode(labels)
    task_of = np.arange(n_clients) % n_tasks
    parts: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * n_clients
    for task in range(min(n_tasks, n_clients)):
        holders = np.flatnonzero(task_of == task)
        idx = np.flatnonzero(codes == task)
        if idx.size < holders.size:
            raise ConfigError(
                f"population.num_clients: task {task} has {idx.size} samples but "
                f"{holders.size} clients share it"
            )
        for client, chunk in zip(holders, np.array_split(rng.permutation(idx), holders.size)):
            parts[client] = np.sort(chunk).astype(np.int64)
    return parts


PARTITIONS: dict[str, Callable[..., list[np.ndarray]]] = {
    "iid": iid,
    "dirichlet": dirichlet,
    "pathological": pathological,
    "task_per_client": task_per_client,
}


def partition(
    kind: str,
    labels: Sequence | np.ndarray,
    n_clients: int,
    rng: np.random.Generator,
    *,
    alpha: float = 0.5,
    k: int = 2,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Dispatch to a partition scheme by its config name.

    Args:
        kind: One of ``iid``, ``dirichlet``, ``pathological``, ``task_per_client``.
        labels: One label per sample, shape ``(n_samples,)`` (``iid`` only uses its length).
        n_clients: Number of clients.
        rng: Source of randomness.
        alpha: Dirichlet concentration (``dirichlet`` only).
        k: Labels per client (``pathological`` only).
        min_size: Minimum samples per client (``dirichlet`` only).

    Returns:
        One sorted index array per client.

    Raises:
        ConfigError: On an unknown ``kind`` or an invalid parameter for the chosen one.
    """
    if kind not in PARTITIONS:
        raise ConfigError(
            f"data.partition: unknown partition '{kind}' (choose from {', '.join(PARTITIONS)})"
        )
    if kind == "iid":
        return iid(len(labels), n_clients, rng)
    if kind == "dirichlet":
        return dirichlet(labels, n_clients, alpha, rng, min_size=min_size)
    if kind == "pathological":
        return pathological(labels, n_clients, k, rng)
    return task_per_client(labels, n_clients, rng)


def label_histogram(
    parts: Sequence[np.ndarray], labels: Sequence | np.ndarray, n_labels: int
) -> np.ndarray:
    """Count each client's samples per label.

    Args:
        parts: Index arrays, one per client (as returned by the partition functions).
        labels: Integer labels in ``[0, n_labels)``, shape ``(n_samples,)``.
        n_labels: Number of label values (columns).

    Returns:
        ``int64`` array of shape ``(n_clients, n_labels)``.

    Raises:
        ValueError: If a label lies outside ``[0, n_labels)``.
    """
    y = np.asarray(labels)
    if y.size and (y.min() < 0 or y.max() >= n_labels):
        raise ValueError(f"labels must lie in [0, {n_labels}), got [{y.min()}, {y.max()}]")
    hist = np.zeros((len(parts), n_labels), dtype=np.int64)
    for c, idx in enumerate(parts):
        hist[c] = np.bincount(y[np.asarray(idx, dtype=np.int64)], minlength=n_labels)
    return hist


def _encode(labels: Sequence | np.ndarray) -> tuple[np.ndarray, int]:
    y = np.asarray(labels)
    if y.ndim != 1 or y.size == 0:
        raise DataError(f"data: labels must be a non-empty 1-D array, got shape {y.shape}")
    uniq, codes = np.unique(y, return_inverse=True)
    return codes.reshape(-1), int(uniq.size)


def _check_clients(n_clients: int) -> None:
    if isinstance(n_clients, bool) or not isinstance(n_clients, (int, np.integer)) or n_clients < 1:
        raise ConfigError(f"population.num_clients: must be an integer >= 1, got {n_clients!r}")


def _check_alpha(alpha: float) -> None:
    if not isinstance(alpha, (int, float, np.floating, np.integer)) or not (
        math.isfinite(alpha) and alpha > 0
    ):
        raise ConfigError(f"data.alpha: must be a finite number > 0, got {alpha!r}")


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"data.k: must be an integer >= 1, got {k!r}")
