"""The token scheduler's grouping against definitions: a partition into balanced batches, and close to
the fewest activated (layer, expert) pairs an exhaustive search finds."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from expertflow.scheduler import activated_pairs, group_by_paths, group_fifo


def pairs_of(paths: np.ndarray) -> int:
    """Distinct (layer, expert) pairs, counted from the definition with a set."""
    return len({(layer, int(e)) for path in paths for layer, experts in enumerate(path) for e in experts if e >= 0})


def random_paths(rng, num, num_layers, num_experts, k, num_topics=3):
    """Sequences drawn from a few topics (each a fixed path), a quarter of the choices replaced at random."""
    topics = [np.stack([rng.choice(num_experts, k, replace=False) for _ in range(num_layers)]) for _ in range(num_topics)]
    paths = np.stack([topics[rng.integers(num_topics)] for _ in range(num)])
    noisy = rng.random(paths.shape[:2]) < 0.25
    paths[:, :, 0] = np.where(noisy, rng.integers(0, num_experts, paths.shape[:2]), paths[:, :, 0])
    return paths


@given(st.integers(1, 40), st.integers(1, 9), st.integers(0, 2**31 - 1))
@settings(max_examples=60, deadline=None)
def test_groups_partition_the_sequences_in_balanced_batches(num, batch_size, seed):
    paths = random_paths(np.random.default_rng(seed), num, 4, 8, 2)
    groups = group_by_paths(paths, 8, batch_size)
    members = np.concatenate(groups)
    assert sorted(members.tolist()) == list(range(num))
    assert len(groups) == -(-num // batch_size)
    assert all(1 <= len(g) <= batch_size for g in groups)
    assert [g.tolist() for g in groups] == [g.tolist() for g in group_by_paths(paths, 8, batch_size)]  # deterministic


@pytest.mark.parametrize("num", [1, 7, 33])
def test_activated_pairs_counts_distinct_pairs(num):
    paths = random_paths(np.random.default_rng(num), num, 5, 6, 2)
    paths[0, 1, 1] = -1  # a layer the sequence skipped
    assert activated_pairs(paths, 6) == pairs_of(paths)


def test_fifo_is_arrival_order():
    assert [g.tolist() for g in group_fifo(7, 3)] == [[0, 1, 2], [3, 4, 5], [6]]


@pytest.mark.parametrize("seed", range(6))
def test_grouping_is_near_the_exhaustive_optimum(seed):
    """Eight sequences in two batches of four: every split is tried."""
    rng = np.random.default_rng(seed)
    paths = random_paths(rng, 8, 6, 8, 2, num_topics=2)
    best = min(pairs_of(paths[list(a)]) + pairs_of(paths[[i for i in range(8) if i not in a]])
               for a in itertools.combinations(range(8), 4))
    ours = sum(pairs_of(paths[g]) for g in group_by_paths(paths, 8, 4))
    fifo = sum(pairs_of(paths[g]) for g in group_fifo(8, 4))
    assert ours <= best * 1.1
    assert ours <= fifo


def test_clustered_sequences_are_grouped_by_cluster():
    """Sequences of four exact topics, shuffled: each batch of four is one topic."""
    rng = np.random.default_rng(0)
    topics = [np.stack([rng.choice(16, 2, replace=False) for _ in range(8)]) for _ in range(4)]
    labels = rng.permutation(np.repeat(np.arange(4), 4))
    paths = np.stack([topics[t] for t in labels])
    groups = group_by_paths(paths, 16, 4)
    assert sorted(len(set(labels[g].tolist())) for g in groups) == [1, 1, 1, 1]


def test_probabilities_group_like_their_likely_paths():
    """[R, L, E] probabilities (a predictor's) group as the paths they make likely."""
    rng = np.random.default_rng(1)
    paths = random_paths(rng, 16, 6, 8, 2, num_topics=4)
    probs = np.full((16, 6, 8), 0.01, dtype=np.float32)
    np.put_along_axis(probs, paths, 0.9, axis=2)
    by_probs = group_by_paths(probs, 8, 4)
    by_paths = group_by_paths(paths, 8, 4)
    assert sum(pairs_of(paths[g]) for g in by_probs) == sum(pairs_of(paths[g]) for g in by_paths)


def test_length_term_keeps_similar_lengths_together():
    paths = np.zeros((8, 2, 1), dtype=np.int64)  # identical routing: only length tells them apart
    lengths = np.array([5, 900, 7, 880, 6, 910, 4, 905])
    groups = group_by_paths(paths, 1, 4, lengths=lengths, length_weight=1.0)
    assert sorted(sorted(lengths[g].tolist()) for g in groups) == [[4, 5, 6, 7], [880, 900, 905, 910]]


def test_batches_run_in_an_order_where_each_shares_most_with_the_one_before():
    """Three groups over one layer of 8 experts: {0, 1}, {4, 5} and {1, 2}. After a batch that used
    {0, 1}, the group {0, 1} runs first, then {1, 2} (it shares expert 1), then {4, 5}; after {4, 5},
    that group first, then the others by a tie (no overlap) in group order and by overlap."""
    from expertflow.scheduler import _multi_hot, order_batches

    paths = np.array([[[0, 1]], [[0, 1]], [[4, 5]], [[5, 4]], [[1, 2]], [[2, 1]]])
    groups = [np.array([0, 1]), np.array([2, 3]), np.array([4, 5])]
    hot = _multi_hot(paths, 8)
    order = lambda after: [int(g[0]) for g in order_batches(groups, hot, _multi_hot(np.array(after), 8).max(axis=0))]  # noqa: E731
    assert order([[[1, 0]]]) == [0, 4, 2]
    assert order([[[4, 5]]]) == [2, 0, 4]
    assert order([[[2, 7]]]) == [4, 0, 2]
    assert [int(g[0]) for g in order_batches(groups, hot)] == [0, 4, 2]  # nothing ran before: group order, then overlap
    # group_by_paths hands its groups over in that order: the group like the last batch first.
    grouped = group_by_paths(paths, 8, 2, after=np.array([[[5, 4]]]))
    assert sorted(paths[grouped[0]].ravel().tolist()) == [4, 4, 5, 5]
