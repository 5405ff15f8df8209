"""Property tests: random prefetch / plan / acquire / release / quota sequences against a reference.

The exact machine pauses the prefetch queue so every decision is deterministic and compares each
slot and counter with tests/reference_cache.py. The async machine lets copies race freely and checks
the invariants that must hold under any timing.
"""

from __future__ import annotations

import math
import random

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import expertflow as ef
from expertflow.planner import Plan

from conftest import cuda_usable, make_filled_pool
from reference_cache import ReferenceCache, ReferenceError_

NUM_LAYERS, NUM_EXPERTS = 3, 6
LAYERS = st.integers(0, NUM_LAYERS - 1)
EXPERTS = st.integers(0, NUM_EXPERTS - 1)
# Few distinct positions, so dues, next uses and `now` often tie and the tie-breaks get exercised.
POSITIONS = st.sampled_from([float(p) for p in range(9)])
NEXT_USES = st.one_of(POSITIONS, st.just(math.inf))
TABLE = st.lists(NEXT_USES, min_size=NUM_LAYERS * NUM_EXPERTS, max_size=NUM_LAYERS * NUM_EXPERTS).map(
    lambda v: np.array(v, dtype=np.float64).reshape(NUM_LAYERS, NUM_EXPERTS)
)
SLOT_KEYS = ("layer", "expert", "pin_count", "planned", "prefetched_unused", "next_use", "following_use", "last_use",
             "use_count")
SETTINGS = settings(max_examples=100, stateful_step_count=50, deadline=None, suppress_health_check=list(HealthCheck))


def checksum(t: torch.Tensor) -> int:
    b = t.contiguous().reshape(-1).view(torch.uint8).to(torch.int64)
    return int((b * torch.arange(1, b.numel() + 1, device=b.device)).sum())


class CacheMachine(RuleBasedStateMachine):
    backend = "host"
    exact = True

    def __init__(self) -> None:
        super().__init__()
        self.pool = None
        self.cache = None

    @initialize(num_slots=st.integers(2, 7), policy=st.sampled_from(ef.POLICIES), chunk_kb=st.sampled_from([4, 8]))
    def setup(self, num_slots, policy, chunk_kb):
        if self.pool is None:
            type(self).shared_pool = getattr(type(self), "shared_pool", None) or make_filled_pool(self.backend, NUM_LAYERS, NUM_EXPERTS)
            self.pool = type(self).shared_pool
            self.sums = {
                (l, e): {n: checksum(t) for n, t in self.pool.expert(l, e).items()} for l in range(NUM_LAYERS) for e in range(NUM_EXPERTS)
            }
        self.cache = ef.ExpertCache(self.pool, num_slots, policy=policy, chunk_bytes=chunk_kb << 10)
        self.ref = ReferenceCache(num_slots, policy)
        self.held: list[tuple[int, list[int]]] = []
        if self.exact:
            self.cache.pause_prefetch()

    def teardown(self) -> None:
        if self.cache is not None:
            self.cache.close()

    @rule(entries=st.lists(st.tuples(LAYERS, EXPERTS, POSITIONS), max_size=6))
    def prefetch(self, entries):
        self.cache.prefetch(entries)
        self.ref.prefetch(entries)

    @rule(
        entries=st.lists(st.tuples(LAYERS, EXPERTS, POSITIONS, st.booleans()), max_size=6, unique_by=lambda t: t[:2]),
        next_use=TABLE,
        following_use=TABLE,
        now=st.one_of(st.just(-math.inf), POSITIONS),
    )
    def apply(self, entries, next_use, following_use, now):
        # Any order and any tables: a plan may even evict an expert it loaded itself (its copy, queued
        # at once, is cancelled).
        layers, experts, dues, sure = zip(*entries) if entries else ((), (), (), ())
        plan = Plan(np.array(layers, dtype=np.int32), np.array(experts, dtype=np.int32), np.array(dues, dtype=np.float64),
                    next_use, following_use, now, np.array(sure, dtype=bool))
        if self.exact:
            # Guesses load only while the link is idle, and the engine counts a demand copy in flight
            # as traffic; on the GPU one may still be in flight after acquire() returns. Paused,
            # synchronize() lands exactly those copies, so idle means "no prefetch queued", as in the
            # reference.
            self.cache.synchronize()
        self.cache.apply(plan)
        self.ref.apply(entries, next_use, following_use, now)

    @rule(layer=LAYERS, experts=st.sets(EXPERTS, min_size=1, max_size=4))
    def acquire(self, layer, experts):
        experts = sorted(experts, key=lambda e: (e * 7919) % 13)  # router order, not sorted
        ref_error = None
        try:
            self.ref.acquire(layer, experts)
        except ReferenceError_ as e:
            ref_error = str(e)
        try:
            weights = self.cache.acquire(layer, experts)
        except ef.ExpertFlowError as e:
            assert ref_error is not None, f"runtime raised but the reference did not: {e}"
            assert ("capacity" in str(e)) == (ref_error == "capacity")
            return
        assert ref_error is None, f"reference raised {ref_error} but the runtime did not"
        for w, e in zip(weights, experts):
            got = {n: checksum(t) for n, t in w.items()}
            assert got == self.sums[(layer, e)], f"slot bytes of layer {layer} expert {e} differ from the pool"
        self.held.append((layer, experts))

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def release(self, data):
        layer, experts = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        self.cache.release(layer, experts)
        self.ref.release(layer, experts)

    @rule(quotas=st.lists(st.one_of(st.none(), st.integers(0, 4)), max_size=NUM_LAYERS))
    def set_quotas(self, quotas):
        self.cache.set_layer_quotas(quotas)
        self.ref.quotas = [-1 if q is None else q for q in quotas]

    @rule()
    def land_prefetches(self):
        self.cache.resume_prefetch()
        self.cache.synchronize()
        self.ref.land_all()
        if self.exact:
            self.cache.pause_prefetch()

    @invariant()
    def consistent(self):
        if self.cache is None:
            return
        table = self.cache.slot_table()
        resident = [(s["layer"], s["expert"]) for s in table if s["layer"] >= 0]
        assert len(resident) == len(set(resident)), "an expert sits in two slots"
        pins: dict[tuple[int, int], int] = {}
        for layer, experts in self.held:
            for e in experts:
                pins[(layer, e)] = pins.get((layer, e), 0) + 1
        slot_of = {(s["layer"], s["expert"]): s for s in table}
        for key, count in pins.items():
            assert key in slot_of, f"pinned expert {key} was evicted"
            assert slot_of[key]["pin_count"] == count
            assert not slot_of[key]["prefetched_unused"], f"acquired expert {key} still counts as an unused prefetch"
        stats = self.cache.stats()
        assert stats["hits"] + stats["misses"] == stats["accesses"]
        if self.exact:
            for i, (got, want) in enumerate(zip(table, self.ref.slots)):
                for key in SLOT_KEYS:
                    assert got[key] == getattr(want, key), f"slot {i} {key}: runtime {got} vs reference {want}"
            for key, value in self.ref.stats.items():
                assert stats[key] == value, f"{key}: runtime {stats[key]} vs reference {value}"


class ExactHostMachine(CacheMachine):
    backend, exact = "host", True


class AsyncHostMachine(CacheMachine):
    backend, exact = "host", False


class ExactCudaMachine(CacheMachine):
    backend, exact = "cuda", True


class AsyncCudaMachine(CacheMachine):
    backend, exact = "cuda", False


def _run(machine):
    random.seed(0)
    machine.TestCase.settings = SETTINGS
    machine.TestCase().runTest()


def test_exact_host():
    _run(ExactHostMachine)


def test_async_host():
    _run(AsyncHostMachine)


@pytest.mark.gpu
def test_exact_cuda():
    assert cuda_usable()
    _run(ExactCudaMachine)


@pytest.mark.gpu
def test_async_cuda():
    assert cuda_usable()
    _run(AsyncCudaMachine)
