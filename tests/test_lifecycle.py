"""Closing pools and caches: the pinned memory goes back, and every later use is a clear error."""

from __future__ import annotations

import gc

import pytest
import torch

import expertflow as ef
from expertflow.runtime import ExpertPool, TensorSpec


def resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def filled_pool(mib: int) -> ExpertPool:
    """A host-backend pool of ``mib`` MiB whose every page has been written (so it is resident)."""
    num_experts, floats = 8, mib * 2**20 // 4 // 8 // 2
    pool = ExpertPool.uniform(2, num_experts, [TensorSpec("w", torch.float32, (floats,))], backend="host")
    for layer in range(2):
        for expert in range(num_experts):
            pool.write_tensor(layer, expert, "w", torch.full((floats,), float(expert)))
    return pool


def test_close_releases_the_pinned_memory():
    before = resident_mib()
    pool = filled_pool(256)
    cache = ef.ExpertCache(pool, 4)
    cache.acquire(0, [1])
    filled = resident_mib()
    assert filled - before > 200
    pool.close()  # closes the cache first: its copies read the pool
    gc.collect()
    assert filled - resident_mib() > 200  # the 256 MiB arena is gone (the allocator may keep a little else)


def test_use_after_close_is_an_error():
    pool = filled_pool(1)
    cache = ef.ExpertCache(pool, 4)
    pool.close()
    pool.close()  # idempotent
    for use in (lambda: pool.expert(0, 1), lambda: pool.write_tensor(0, 1, "w", torch.zeros(1)),
                lambda: pool.total_bytes, lambda: pool.expert_bytes(0), lambda: pool.native,
                lambda: ef.ExpertCache(pool, 4)):
        with pytest.raises(ef.ExpertFlowError, match="the expert pool is closed"):
            use()
    with pytest.raises(ef.ExpertFlowError, match="the expert cache is closed"):
        cache.acquire(0, [1])


def test_views_handed_out_stay_valid_after_close():
    """A view of an expert keeps its memory alive: reading it after close is safe, not a use-after-free."""
    pool = filled_pool(1)
    view = pool.expert(1, 5)["w"]
    pool.close()
    gc.collect()
    assert torch.equal(view, torch.full_like(view, 5.0))


def test_more_slots_than_experts_are_refused_before_allocating():
    pool = filled_pool(1)
    with pytest.raises(ef.ExpertFlowError, match=r"num_slots=1073741824 asks for 70368744177664 bytes of slots, more than the pool's 16 experts need"):
        ef.ExpertCache(pool, 2**30)
    pool.close()

