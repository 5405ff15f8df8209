"""The token scheduler: which sequences decode together.

When more sequences are ready than one batch holds, the batches of a round are formed so that each
activates few distinct (layer, expert) pairs: every pair a batch activates is a slot it needs, and at
batch sizes where decoding is bound by the link, a copy for each one missing. Sequences whose next
tokens are predicted to take similar routing paths go together.

The method is the paper's: balanced k-medoids over the predicted paths, with distance the normalised
Hamming distance between their (layer, expert) sets (``1 - similarity``), optionally plus a length term
that keeps sequences of similar length together (their KV caches pad less when gathered). Every ready
sequence runs exactly once per round, so none waits more than the round's other batches.

Numpy over ``[R, L, k]`` paths, a few milliseconds for 64 sequences. The one matrix product runs in
torch: numpy's BLAS keeps its own threads spinning after a product, and on a CPU the model shares they
slowed every expert matmul after a round was planned (tokens/s 0.52x fifo on 2 cores, against 0.93x
with the product in torch's thread pool, which the model's own kernels use).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["SCHEDULES", "group_fifo", "group_by_paths", "order_batches", "activated_pairs"]

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
    after: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Balanced k-medoids: ``ceil(R / batch_size)`` groups of at most ``batch_size`` sequences.

    ``paths [R, L, k]`` int: each sequence's predicted experts per layer (-1: none), or ``[R, L, E]``
    float: each (layer, expert)'s predicted use (e.g. a decayed count of the sequence's recent paths);
    ``lengths [R]``: sequence lengths for the optional length term; ``after [n, L, k]``: the paths of
    the batch that ran last. Returns index arrays, each sorted, in the order they should run
    (:func:`order_batches`; deterministic).
    """
    num = len(paths)
    if num <= batch_size:
        return [np.arange(num)] if num else []
    num_groups = -(-num // batch_size)
    hot = paths.reshape(num, -1).astype(np.float32) if paths.dtype.kind == "f" else _multi_hot(paths, num_experts)
    # Normalised Hamming distance between the pair sets, |a xor b| / |a or b| = 1 - |a and b| / |a or b|;
    # for probabilities the same with expected counts (the Tanimoto form), one matrix product.
    with torch.no_grad():
        shared = (torch.from_numpy(hot) @ torch.from_numpy(hot).T).numpy()
    size = np.diag(shared) if paths.dtype.kind != "f" else (hot * hot).sum(axis=1)
    union = size[:, None] + size[None, :] - shared
    distance = np.where(union > 0, 1.0 - shared / np.maximum(union, 1e-12), 0.0)
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
    groups = _refine_by_swaps([g for g in groups if len(g)], hot)
    groups = sorted((np.sort(g) for g in groups), key=lambda g: int(g[0]))
    return order_batches(groups, hot, None if after is None else _multi_hot(after, num_experts).max(axis=0))


def order_batches(groups: list[np.ndarray], hot: np.ndarray, after: np.ndarray | None = None) -> list[np.ndarray]:
    """The groups in a running order where each shares the most expected pairs with the one before:
    what one batch loaded, the next can hit while it is still cached. Grouping makes batches unlike
    each other, so run in any order they would hit less than arrival-order batches do.

    ``hot [R, D]``: each sequence's (layer, expert) use probabilities; ``after [D]``: the pairs of the
    batch that ran last (None: the first group goes first). Greedy: each next batch is the one whose
    expected pairs ``1 - prod (1 - p)`` overlap the previous batch's most (ties: the earlier group)."""
    union = [1.0 - np.exp(np.log1p(-np.clip(hot[g], 0.0, 1.0 - 1e-6)).sum(axis=0)) for g in groups]
    left = list(range(len(groups)))
    previous = after
    order = []
    while left:
        if previous is None:
            pick = left[0]
        else:
            overlaps = [float((union[i] * previous).sum()) for i in left]
            pick = left[int(np.argmax(overlaps))]
        order.append(pick)
        left.remove(pick)
        previous = union[pick]
    return [groups[i] for i in order]


def _refine_by_swaps(groups: list[np.ndarray], hot: np.ndarray, max_passes: int = 2) -> list[np.ndarray]:
    """Swaps sequences between groups while a swap lowers the expected number of distinct pairs the
    groups activate, ``sum_g sum_pair (1 - prod_{i in g} (1 - p_i,pair))`` (exact for 0/1 paths).

    Medoids optimise distances to one representative; this optimises the union itself. Each pass
    tries every pair of groups and applies the best swap between them (one array op per pair)."""
    logs = np.log1p(-np.clip(hot, 0.0, 1.0 - 1e-6)).astype(np.float32)  # [R, D]
    sums = [logs[g].sum(axis=0) for g in groups]  # [D] per group: log prod (1 - p)
    # A pair of groups is tried again only once one of them has changed since it was last tried.
    changed = [0] * len(groups)
    tried: dict[tuple[int, int], int] = {}
    version = 0

    def cost(log_sum: np.ndarray) -> np.ndarray:
        return log_sum.shape[-1] - np.exp(log_sum).sum(axis=-1)

    costs = [float(cost(s)) for s in sums]

    for _ in range(max_passes):
        improved = False
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                if tried.get((a, b), -1) >= max(changed[a], changed[b]):
                    continue
                tried[(a, b)] = version
                ga, gb = groups[a], groups[b]
                # Swap i of a with j of b: a loses i, gains j; b the reverse. [|a|, |b|] cost changes.
                new_a = sums[a][None, None, :] - logs[ga][:, None, :] + logs[gb][None, :, :]
                new_b = sums[b][None, None, :] - logs[gb][None, :, :] + logs[ga][:, None, :]
                cost_a, cost_b = cost(new_a), cost(new_b)
                delta = cost_a + cost_b - costs[a] - costs[b]
                i, j = np.unravel_index(int(np.argmin(delta)), delta.shape)
                if delta[i, j] < -1e-4:
                    sums[a], sums[b] = new_a[i, j], new_b[i, j]
                    costs[a], costs[b] = float(cost_a[i, j]), float(cost_b[i, j])
                    groups[a], groups[b] = ga.copy(), gb.copy()
                    groups[a][i], groups[b][j] = gb[j], ga[i]
                    version += 1
                    changed[a] = changed[b] = version
                    improved = True
        if not improved:
            break
    return groups


def _balanced_assign(cost: np.ndarray, capacity: int) -> np.ndarray:
    """Each row to a column, at most ``capacity`` rows per column: rows in ascending order of their
    nearest column's cost each take their nearest column with room."""
    num, num_groups = cost.shape
    assignment = np.full(num, -1)
    load = np.zeros(num_groups, dtype=np.int64)
    for row in np.argsort(cost.min(axis=1), kind="stable"):
        col = int(np.argmin(np.where(load < capacity, cost[row], np.inf)))
        assignment[row] = col
        load[col] += 1
    return assignment
