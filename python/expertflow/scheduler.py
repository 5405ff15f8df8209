"""The token scheduler: which sequences decode together.

When more sequences are ready than one batch holds, the batches of a round are formed so that each
activates few distinct (layer, expert) pairs: every pair a batch activates is a slot it needs, and at
batch sizes where decoding is bound by the link, a copy for each one missing. Sequences whose next
tokens are predicted to take similar routing paths go together.

The method is the paper's: balanced k-medoids over the predicted paths, with distance the normalised
Hamming distance between their (layer, expert) sets (``1 - similarity``), optionally plus a length term
that keeps sequences of similar length together (their KV caches pad less when gathered). Every ready
sequence runs exactly once per round, so none waits more than the round's other batches.

No torch: numpy over ``[R, L, k]`` paths, a few milliseconds for 64 sequences.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SCHEDULES", "group_fifo", "group_by_paths", "activated_pairs"]

SCHEDULES = ("expertflow", "fifo")


def group_fifo(num_ready: int, batch_size: int) -> list[np.ndarray]:
    """Consecutive chunks of at most ``batch_size`` in arrival order."""
    order = np.arange(num_ready)
    return [order[i : i + batch_size] for i in range(0, num_ready, batch_size)]


def _multi_hot(paths: np.ndarray, num_experts: int) -> np.ndarray:
    """``paths [R, L, k]`` expert ids (-1: none) -> ``[R, L * E]`` float32 membership."""
    num, num_layers, _ = paths.shape
    hot = np.zeros((num, num_layers, num_experts + 1), dtype=np.float32)
    rows = np.arange(num)[:, None, None]
    layers = np.arange(num_layers)[None, :, None]
    hot[rows, layers, np.where(paths < 0, num_experts, paths)] = 1.0
    return hot[:, :, :num_experts].reshape(num, -1)


def activated_pairs(paths: np.ndarray, num_experts: int) -> int:
    """Distinct (layer, expert) pairs that ``paths [R, L, k]`` activate together."""
    return int(_multi_hot(paths, num_experts).max(axis=0).sum()) if len(paths) else 0


def group_by_paths(
    paths: np.ndarray,
    num_experts: int,
    batch_size: int,
    lengths: np.ndarray | None = None,
    length_weight: float = 0.0,
    max_iterations: int = 8,
) -> list[np.ndarray]:
    """Balanced k-medoids: ``ceil(R / batch_size)`` groups of at most ``batch_size`` sequences.

    ``paths [R, L, k]`` int: each sequence's predicted experts per layer (-1: none), or ``[R, L, E]``
    float: each (layer, expert)'s predicted use (e.g. a decayed count of the sequence's recent paths);
    ``lengths [R]``: sequence lengths for the optional length term. Returns index arrays in ascending
    order of their first member (deterministic), each sorted.
    """
    num = len(paths)
    if num <= batch_size:
        return [np.arange(num)] if num else []
    num_groups = -(-num // batch_size)
    hot = paths.reshape(num, -1).astype(np.float32) if paths.dtype.kind == "f" else _multi_hot(paths, num_experts)
    # Normalised Hamming distance between the pair sets, |a xor b| / |a or b| (for weights, the
    # weighted form: 1 - sum(min) / sum(max)).
    lower = np.minimum(hot[:, None, :], hot[None, :, :]).sum(-1)
    upper = np.maximum(hot[:, None, :], hot[None, :, :]).sum(-1)
    distance = np.where(upper > 0, 1.0 - lower / np.maximum(upper, 1e-12), 0.0)
    if lengths is not None and length_weight > 0:
        lengths = np.asarray(lengths, dtype=np.float64)
        distance = distance + length_weight * np.abs(lengths[:, None] - lengths[None, :]) / max(lengths.max(), 1.0)
    # Farthest-first seeds: the sequence with the largest total distance, then each next the one
    # farthest from the seeds chosen so far.
    medoids = [int(np.argmax(distance.sum(axis=1)))]
    while len(medoids) < num_groups:
        medoids.append(int(np.argmax(distance[:, medoids].min(axis=1))))
    assignment = np.full(num, -1)
    for _ in range(max_iterations):
        assignment = _balanced_assign(distance[:, medoids], batch_size)
        updated = []
        for g in range(num_groups):
            members = np.flatnonzero(assignment == g)
            within = distance[np.ix_(members, members)].sum(axis=1)
            updated.append(int(members[np.argmin(within)]))
        if updated == medoids:
            break
        medoids = updated
    groups = [np.flatnonzero(assignment == g) for g in range(num_groups)]
    return sorted((g for g in groups if len(g)), key=lambda g: int(g[0]))


def _balanced_assign(cost: np.ndarray, capacity: int) -> np.ndarray:
    """Each row to a column, at most ``capacity`` rows per column: greedily by ascending cost (a
    sequence whose nearest medoid is full takes its next nearest)."""
    num, num_groups = cost.shape
    assignment = np.full(num, -1)
    load = np.zeros(num_groups, dtype=np.int64)
    for flat in np.argsort(cost, axis=None, kind="stable"):
        row, col = divmod(int(flat), num_groups)
        if assignment[row] < 0 and load[col] < capacity:
            assignment[row] = col
            load[col] += 1
    return assignment
