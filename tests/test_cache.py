"""ExpertCache: acquire / prefetch / release behaviour, statistics and every documented error."""

import pytest
import torch

import expertflow as ef

from conftest import make_filled_pool


def assert_expert(weights, pool, layer, expert):
    ref = pool.expert(layer, expert)
    for name, t in ref.items():
        got = weights[name]
        assert got.dtype == t.dtype and got.shape == t.shape
        assert torch.equal(got.cpu(), t), f"slot bytes differ from the pool for layer {layer} expert {expert} tensor {name}"


@pytest.mark.parametrize("policy", ef.POLICIES)
def test_acquire_returns_the_pool_bytes(backend_name, policy):
    pool = make_filled_pool(backend_name)
    with ef.ExpertCache(pool, num_slots=4, policy=policy, chunk_bytes=4096) as cache:
        assert cache.device.type == ("cuda" if backend_name == "cuda" else "cpu")
        for step in range(12):
            layer = step % 3
            experts = [(step * 5 + i) % 6 for i in range(2)]
            for weights, e in zip(cache.acquire(layer, experts), experts):
                assert_expert(weights, pool, layer, e)
            cache.release(layer, experts)
        s = cache.stats()
        assert s["hits"] + s["misses"] == s["accesses"] == 24
        assert s["bytes_copied"] == s["misses"] * pool.expert_bytes(0)


def test_hits_misses_and_lru_eviction():
    pool = make_filled_pool("host")
    with ef.ExpertCache(pool, num_slots=3, policy="lru") as cache:
        for e in (0, 1, 2):
            cache.acquire(0, [e])
            cache.release(0, [e])
        cache.acquire(0, [0])  # hit: 1 becomes least recent
        cache.release(0, [0])
        cache.acquire(0, [3])  # evicts 1
        cache.release(0, [3])
        resident = {(s["layer"], s["expert"]) for s in cache.slot_table()}
        assert resident == {(0, 0), (0, 2), (0, 3)}
        s = cache.stats()
        assert (s["hits"], s["misses"], s["evictions"]) == (1, 4, 1)


def test_pinned_slots_are_never_evicted():
    pool = make_filled_pool("host")
    with ef.ExpertCache(pool, num_slots=3, policy="lru") as cache:
        held = cache.acquire(0, [0, 1])
        cache.acquire(1, [0])
        cache.release(1, [0])
        cache.acquire(1, [1])  # must evict layer 1 expert 0, not the pinned ones
        cache.release(1, [1])
        assert_expert(held[0], pool, 0, 0)
        assert_expert(held[1], pool, 0, 1)
        with pytest.raises(ef.ExpertFlowError, match="all 3 slots are pinned; release experts"):
            cache.acquire(2, [0, 1])
        # The failed call left nothing pinned: releasing the holders frees everything.
        cache.release(0, [0, 1])
        cache.acquire(2, [0, 1, 2])
        cache.release(2, [0, 1, 2])


def test_prefetch_then_hit_counts_prefetch_hits_and_waste():
    pool = make_filled_pool("host")
    with ef.ExpertCache(pool, num_slots=4, policy="lru_with_correction") as cache:
        cache.prefetch([(0, 1, 2.0), (0, 2, 1.0), (1, 3, 1.0)])
        cache.synchronize()
        assert cache.stats()["prefetch_bytes"] == 3 * pool.expert_bytes(0)
        weights = cache.acquire(0, [1])  # layer 0's router asked for 1 only: 2 is demoted
        assert_expert(weights[0], pool, 0, 1)
        cache.release(0, [1])
        table = {(s["layer"], s["expert"]): s for s in cache.slot_table()}
        assert table[(0, 2)]["plan_priority"] == 0 and table[(1, 3)]["plan_priority"] == 1.0
        cache.acquire(2, [4, 5])  # fills the empty slot, then evicts the demoted wrong prefetch (0, 2)
        cache.release(2, [4, 5])
        s = cache.stats()
        assert (s["prefetches"], s["prefetch_hits"], s["wasted_prefetches"], s["hits"], s["misses"]) == (3, 1, 1, 1, 2)
        assert {(t["layer"], t["expert"]) for t in cache.slot_table()} == {(0, 1), (1, 3), (2, 4), (2, 5)}


def test_new_plan_cancels_queued_prefetches():
    pool = make_filled_pool("host")
    with ef.ExpertCache(pool, num_slots=4) as cache:
        cache.pause_prefetch()
        cache.prefetch([(0, 0), (0, 1), (0, 2)])
        cache.prefetch([(0, 1), (1, 1)])  # 0 and 2 are no longer wanted
        s = cache.stats()
        assert s["cancelled_prefetches"] == 2 and s["prefetch_bytes"] == 0
        cache.resume_prefetch()
        cache.synchronize()
        assert cache.stats()["prefetch_bytes"] == 2 * pool.expert_bytes(0)
        assert {(t["layer"], t["expert"]) for t in cache.slot_table() if t["layer"] >= 0} == {(0, 1), (1, 1)}


def test_acquire_promotes_a_queued_prefetch():
    pool = make_filled_pool("host")
    with ef.ExpertCache(pool, num_slots=2) as cache:
        cache.pause_prefetch()
        cache.prefetch([(2, 5)])
        (weights,) = cache.acquire(2, [5])  # the queue is paused: only promotion can land it
        assert_expert(weights, pool, 2, 5)
        s = cache.stats()
        assert (s["hits"], s["prefetch_hits"], s["demand_bytes"]) == (1, 1, pool.expert_bytes(2))


def test_prefetch_never_evicts_higher_priority():
    pool = make_filled_pool("host")
    with ef.ExpertCache(pool, num_slots=2, policy="lru") as cache:
        cache.prefetch([(0, 0, 3.0), (0, 1, 2.0), (0, 2, 1.0)])
        cache.synchronize()
        assert {(t["layer"], t["expert"]) for t in cache.slot_table()} == {(0, 0), (0, 1)}


def test_layer_quotas_steer_eviction():
    pool = make_filled_pool("host")
    with ef.ExpertCache(pool, num_slots=4, policy="lru") as cache:
        cache.set_layer_quotas([1, 3, None])
        for layer, e in [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]:
            cache.acquire(layer, [e])
            cache.release(layer, [e])
        counts = {}
        for t in cache.slot_table():
            counts[t["layer"]] = counts.get(t["layer"], 0) + 1
        # At its quota, layer 0 reloaded into its own slot; layer 1 took the empty ones.
        assert counts == {0: 1, 1: 3}
        cache.set_layer_quotas({0: 2})
        cache.acquire(0, [2])  # below its new quota: takes another layer's slot
        cache.release(0, [2])
        assert sorted(t["layer"] for t in cache.slot_table()) == [0, 0, 1, 1]
        with pytest.raises(ef.ExpertFlowError, match="quota of layer 0 is -2"):
            cache.set_layer_quotas([-2])
        with pytest.raises(ef.ExpertFlowError, match="got quotas for 4 layers but the pool has 3"):
            cache.set_layer_quotas([1, 1, 1, 1])


def test_errors_reach_python_with_file_and_line():
    pool = make_filled_pool("host")
    with pytest.raises(ef.ExpertFlowError, match="capacity of 1 slots is smaller than one layer's 2 experts per token"):
        ef.ExpertCache(pool, num_slots=1, experts_per_token=2)
    with pytest.raises(ef.ExpertFlowError, match=r"csrc/runtime.cpp:\d+: an expert of layer 0 takes \d+ bytes, more than slot_bytes=256"):
        ef.ExpertCache(pool, num_slots=4, slot_bytes=100)
    with pytest.raises(ef.ExpertFlowError, match="unknown cache policy 'fifo'"):
        ef.ExpertCache(pool, num_slots=4, policy="fifo")
    with pytest.raises(ef.ExpertFlowError, match="'belady' needs the future"):
        ef.ExpertCache(pool, num_slots=4, policy="belady")
    with pytest.raises(ef.ExpertFlowError, match="num_slots must be at least 1"):
        ef.ExpertCache(pool, num_slots=0)
    with pytest.raises(ef.ExpertFlowError, match="chunk_bytes must be at least 4096"):
        ef.ExpertCache(pool, num_slots=4, chunk_bytes=16)
    cache = ef.ExpertCache(pool, num_slots=2)
    with pytest.raises(ef.ExpertFlowError, match=r"csrc/runtime.cpp:\d+: capacity of 2 slots is smaller than the 3 experts layer 0 needs"):
        cache.acquire(0, [0, 1, 2])
    with pytest.raises(ef.ExpertFlowError, match="unknown expert 6 of layer 1"):
        cache.acquire(1, [6])
    with pytest.raises(ef.ExpertFlowError, match="unknown layer 3"):
        cache.prefetch([(3, 0, 1.0)])
    with pytest.raises(ef.ExpertFlowError, match="priorities must be finite and > 0"):
        cache.prefetch([(0, 0, 0.0)])
    with pytest.raises(ef.ExpertFlowError, match="lists an expert twice"):
        cache.acquire(0, [1, 1])
    cache.acquire(0, [1])
    cache.release(0, [1])
    with pytest.raises(ef.ExpertFlowError, match="release of layer 0 expert 1 which is not acquired"):
        cache.release(0, [1])
    with pytest.raises(ef.ExpertFlowError, match="release of layer 0 expert 4 which is not acquired"):
        cache.release(0, [4])
    cache.close()
    cache.close()  # idempotent
    for call in (lambda: cache.acquire(0, [0]), lambda: cache.release(0, [0]), lambda: cache.prefetch([]),
                 cache.stats, cache.synchronize, lambda: cache.set_layer_quotas([])):
        with pytest.raises(ef.ExpertFlowError, match="expert cache is closed"):
            call()
    with pytest.raises(ef.ExpertFlowError, match=r"csrc/runtime.cpp:\d+: the expert cache is closed"):
        cache.native.acquire(0, [0])


def test_views_outlive_close():
    pool = make_filled_pool("host")
    cache = ef.ExpertCache(pool, num_slots=2)
    (weights,) = cache.acquire(0, [3])
    cache.release(0, [3])
    cache.close()
    assert_expert(weights, pool, 0, 3)  # the arena lives while views of it exist


def test_slot_arena_allocation_failure_names_the_size(backend_name):
    pool = make_filled_pool(backend_name)
    what = "GPU" if backend_name == "cuda" else "host-backend slot arena"
    with pytest.raises(ef.ExpertFlowError, match=f"could not allocate 1099511627776000 bytes of {what} memory"):
        ef.ExpertCache(pool, num_slots=1000, slot_bytes=1 << 40)


def test_acquire_without_wait_then_wait_per_slot(backend_name):
    pool = make_filled_pool(backend_name)
    with ef.ExpertCache(pool, num_slots=4, chunk_bytes=4096) as cache:
        cache.prefetch([(1, 2, 1.0)])
        slots = cache.acquire_slots(1, [2, 5], wait=False)
        for slot, expert in sorted(zip(slots, [2, 5]), key=lambda p: not cache.slot_ready(p[0])):
            cache.wait_slot(slot)
            assert_expert(cache.slot_tensors(slot, 1), pool, 1, expert)
            assert cache.slot_ready(slot) or backend_name == "cuda"  # on the GPU, landing is asynchronous to the host
        cache.release(1, [2, 5])
        with pytest.raises(ef.ExpertFlowError, match=f"slot {slots[0]} is not acquired"):
            cache.wait_slot(slots[0])
        with pytest.raises(ef.ExpertFlowError, match="slot 9 is not acquired"):
            cache.slot_ready(9)
