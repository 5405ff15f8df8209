"""ExpertCache: acquire / prefetch / release behaviour, statistics and every documented error."""

import numpy as np
import pytest
import torch

import expertflow as ef
from expertflow.planner import Plan

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
        cache.synchronize()  # every load landed: each is timed once (a copy's time inside the steps)
        s = cache.stats()
        assert s["hits"] + s["misses"] == s["accesses"] == 24
        assert s["bytes_copied"] == s["misses"] * pool.expert_bytes(0)
        assert s["timed_demand_bytes"] == s["demand_bytes"] == s["bytes_copied"] and s["demand_ms"] > 0


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
    with ef.ExpertCache(pool, num_slots=4, policy="lru") as cache:
        cache.prefetch([(0, 1, 0.0), (0, 2, 0.0), (1, 3, 1.0)])
        cache.synchronize()
        assert cache.stats()["prefetch_bytes"] == 3 * pool.expert_bytes(0)
        weights = cache.acquire(0, [1])  # layer 0's router asked for 1 only: 2 was a wrong guess
        assert_expert(weights[0], pool, 0, 1)
        cache.release(0, [1])
        table = {(s["layer"], s["expert"]): s for s in cache.slot_table()}
        # An acquire changes no plan: 2 stays planned, and unused.
        assert table[(0, 2)]["planned"] and table[(0, 2)]["prefetched_unused"]
        assert table[(0, 1)]["planned"] and not table[(0, 1)]["prefetched_unused"]
        cache.acquire(2, [4, 5])  # fills the empty slot, then evicts the least recent: the unused (0, 2)
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


def test_bytes_to_submit_follow_a_copy_from_queued_to_landed():
    """-1 for an expert with no slot; a queued prefetch's whole bytes (the link carries them all);
    0 once landed, and for an acquired demand miss, whose bytes are all on their way."""
    pool = make_filled_pool("host")
    with ef.ExpertCache(pool, num_slots=3) as cache:
        cache.pause_prefetch()
        cache.prefetch([(1, 2), (1, 4)])
        assert cache.bytes_to_submit(1, [2, 4, 5]) == [pool.expert_bytes(1), pool.expert_bytes(1), -1]
        cache.acquire(1, [5])  # a demand miss: submitted at once
        assert cache.bytes_to_submit(1, [5]) == [0]
        cache.release(1, [5])
        cache.resume_prefetch()
        cache.synchronize()
        assert cache.bytes_to_submit(1, [2, 4, 5, 0]) == [0, 0, 0, -1]


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_recency_prefetch_evicts_only_unplanned_experts(policy):
    pool = make_filled_pool("host")
    with ef.ExpertCache(pool, num_slots=2, policy=policy) as cache:
        cache.acquire(1, [5])
        cache.release(1, [5])
        # (0, 0) takes the empty slot, (0, 1) evicts the unplanned (1, 5), and (0, 2) finds every
        # slot named by the plan: a plan never evicts its own experts under lru and lfu.
        cache.prefetch([(0, 0, 1.0), (0, 1, 2.0), (0, 2, 3.0)])
        cache.synchronize()
        assert {(t["layer"], t["expert"]) for t in cache.slot_table()} == {(0, 0), (0, 1)}
        s = cache.stats()
        assert (s["prefetches"], s["evictions"]) == (2, 1)


def test_expertflow_prefetch_evicts_only_what_is_not_needed_before_it():
    """Conservative admission (cache.h): a prefetch due at t evicts the expert whose next use, as seen
    from t, is farthest, and only when that expert is not needed before t."""
    pool = make_filled_pool("host")
    a, b, c = 0, 1, 2  # experts of layer 0

    def plan(c_due: float) -> Plan:
        next_use = np.full((pool.num_layers, 6), np.inf)
        following_use = np.full_like(next_use, np.inf)
        next_use[0, a] = 5.0
        next_use[0, b], following_use[0, b] = 3.0, 4.0
        next_use[0, c] = c_due
        return Plan(np.array([0], np.int32), np.array([c], np.int32), np.array([c_due]), next_use, following_use)

    with ef.ExpertCache(pool, num_slots=2, policy="expertflow") as cache:
        cache.pause_prefetch()  # C's copy stays queued: no copy races the checks below
        for e in (a, b):
            cache.acquire(0, [e])
            cache.release(0, [e])
        cache.apply(plan(6.0))  # A (at 5) and B (at 3 and 4) are both needed before 6: refused
        table = cache.slot_table()
        assert [(t["layer"], t["expert"], t["next_use"]) for t in table] == [(0, a, 5.0), (0, b, 3.0)]
        assert cache.stats()["prefetches"] == 0
        cache.apply(plan(4.0))  # seen from 4, A (at 5) comes last and after C: A makes room
        table = cache.slot_table()
        assert [(t["layer"], t["expert"], t["planned"], t["prefetched_unused"]) for t in table] == [
            (0, c, True, True),
            (0, b, False, False),
        ]
        s = cache.stats()
        assert (s["prefetches"], s["evictions"], s["cancelled_prefetches"]) == (1, 1, 0)
        cache.resume_prefetch()
        cache.synchronize()
        (weights,) = cache.acquire(0, [c])
        assert_expert(weights, pool, 0, c)
        cache.release(0, [c])
        assert cache.stats()["prefetch_hits"] == 1


@pytest.mark.parametrize("backend_name", ["host", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_plan_may_evict_what_it_loaded(backend_name):
    """Entries out of due order: the last one evicts an expert the same plan loaded; that copy, queued
    at once, is cancelled, never queued twice into one slot (found by the state machine)."""
    pool = make_filled_pool(backend_name)
    with ef.ExpertCache(pool, num_slots=2, policy="expertflow") as cache:
        cache.pause_prefetch()
        cache.prefetch([(0, 0, 1.0), (0, 1, 1.0), (0, 2, 0.0)])
        s = cache.stats()
        assert s["prefetches"] == 3 and s["cancelled_prefetches"] == 1
        cache.resume_prefetch()
        (w,) = cache.acquire(0, [2])
        assert torch.equal(w["w1"].cpu(), pool.expert(0, 2)["w1"])
        cache.release(0, [2])


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
    with pytest.raises(ef.ExpertFlowError, match="the due position of layer 0 expert 0 is NaN"):
        cache.prefetch([(0, 0, float("nan"))])
    no_entries = (np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0))
    with pytest.raises(ef.ExpertFlowError, match="next-use tables have rows of 5 experts but a layer has 6"):
        cache.apply(Plan(*no_entries, np.zeros((3, 5)), np.zeros((3, 5))))
    with pytest.raises(ef.ExpertFlowError, match="give both next-use tables or neither"):
        cache.apply(Plan(*no_entries, np.zeros((3, 6))))
    with pytest.raises(ef.ExpertFlowError, match="lists an expert twice"):
        cache.acquire(0, [1, 1])
    with pytest.raises(ef.ExpertFlowError, match="backfill of layer 0 lists an expert twice"):
        cache.backfill(0, [2, 2])
    with pytest.raises(ef.ExpertFlowError, match="acquire of layer 0 lists expert 2 both to acquire and to spare"):
        cache.acquire(0, [1, 2], spare=[2])
    with pytest.raises(ef.ExpertFlowError, match="acquire's spare of layer 0 lists an expert twice"):
        cache.acquire_slots(0, [1], spare=[3, 3])
    with pytest.raises(ef.ExpertFlowError, match="unknown expert 6 of layer 1"):
        cache.acquire(1, [0], spare=[6])
    assert cache.stats()["accesses"] == 0  # each refused before any change
    with pytest.raises(ef.ExpertFlowError, match="unknown expert 6 of layer 1"):
        cache.backfill(1, [6])
    with pytest.raises(ef.ExpertFlowError, match="unknown expert 6 of layer 1"):
        cache.landed(1, [6])
    with pytest.raises(ef.ExpertFlowError, match="unknown expert 6 of layer 1"):
        cache.bytes_to_submit(1, [6])
    cache.acquire(0, [1])
    cache.release(0, [1])
    with pytest.raises(ef.ExpertFlowError, match="release of layer 0 expert 1 which is not acquired"):
        cache.release(0, [1])
    with pytest.raises(ef.ExpertFlowError, match="release of layer 0 expert 4 which is not acquired"):
        cache.release(0, [4])
    cache.close()
    cache.close()  # idempotent
    for call in (lambda: cache.acquire(0, [0]), lambda: cache.release(0, [0]), lambda: cache.prefetch([]),
                 lambda: cache.apply(Plan(*no_entries)), cache.stats, cache.synchronize, lambda: cache.set_layer_quotas([]),
                 lambda: cache.backfill(0, [0]), lambda: cache.landed(0, [0]), lambda: cache.bytes_to_submit(0, [0])):
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
    with pytest.raises(ef.ExpertFlowError, match=f"could not allocate 4503599627370496 bytes of {what} memory"):
        ef.ExpertCache(pool, num_slots=4, slot_bytes=1 << 50)


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


def test_stream_handles_are_never_taken_as_addresses():
    """Host backend: an integer or a duck-typed object is not a stream; before, it was dereferenced."""

    class Bogus:
        cuda_stream = 12345

    pool = make_filled_pool("host")
    with ef.ExpertCache(pool, 4) as cache:
        for stream in (1, 12345, Bogus()):
            with pytest.raises(ef.ExpertFlowError, match="host backend computes on the calling thread"):
                cache.acquire(0, [1], stream=stream)
        cache.acquire(0, [1])
        with pytest.raises(ef.ExpertFlowError, match="host backend computes on the calling thread"):
            cache.release(0, [1], stream=12345)
        with pytest.raises(ef.ExpertFlowError, match="pass stream=None \\(0\\), not a stream handle"):
            cache.native.release(0, [1], 12345)  # the native binding checks too
        cache.release(0, [1])
        assert cache.stats()["accesses"] == 1


def test_no_raw_address_reaches_the_pool():
    pool = make_filled_pool("host")
    assert not hasattr(pool.native, "write_from_address")
    t = torch.randn(33, 65)
    pool.write_tensor(0, 0, "w1", t)  # torch tensors go through the buffer protocol, bounds-checked
    assert torch.equal(pool.expert(0, 0)["w1"], t)
    with pytest.raises(ef.ExpertFlowError, match="overruns"):
        pool.native.write(0, 0, 0, memoryview(bytearray(33 * 65 * 4 + 1)), 0)
