"""Slot reuse on the GPU, with each race provoked deterministically.

The copy engine orders copies and compute with two events per slot (copy_engine.h):

- the *free* event, recorded on the reader's stream at ``release``: a copy into the slot waits for it,
  so a reload never overwrites weights that queued compute has yet to read (write after read);
- the *ready* event, recorded after a copy's last chunk: ``acquire`` makes the reader's stream wait
  for it, so compute never reads a slot before its bytes land (read after write).

Each test holds one stream with ``torch.cuda._sleep`` (a spin kernel: everything queued behind it on
that stream runs only after it) and issues the conflicting operation while the hold lasts. It checks
that the hold was still running when that operation was issued, so the race window was really open,
and the results are compared bit for bit with the tensors written into the pool. A control test does
the same conflicting operation without the engine's synchronisation and sees the stale or overwritten
bytes: proof that the hold provokes the race the engine must prevent. Nothing asserts a duration.
"""

import time

import pytest
import torch

import expertflow as ef

pytestmark = pytest.mark.gpu

ROWS, COLS = 1024, 1031  # odd: the expert is not a whole number of chunks
CHUNK = 1 << 20          # 4 chunks per expert: prefetches go out chunk by chunk
#: About half a second on an H200 (1.98 GHz): far longer than the host needs for the few calls made
#: while a stream is held (each test checks the hold was still running after them).
HOLD_CYCLES = 1_000_000_000


def make_pool(num_experts: int) -> tuple[ef.ExpertPool, list[torch.Tensor]]:
    """A one-layer pool of random experts, and the tensors written into it (the reference)."""
    pool = ef.ExpertPool.uniform(1, num_experts, [ef.TensorSpec("w", torch.float32, (ROWS, COLS))], backend="cuda")
    g = torch.Generator().manual_seed(0)
    written = [torch.randn(ROWS, COLS, generator=g) for _ in range(num_experts)]
    for e, w in enumerate(written):
        pool.write_tensor(0, e, "w", w)
    return pool, written


def hold(stream: torch.cuda.Stream) -> None:
    with torch.cuda.stream(stream):
        torch.cuda._sleep(HOLD_CYCLES)


def wait_for(condition, what: str, timeout_s: float = 30.0) -> None:
    """Polls the host-side condition (a liveness bound, not a timing check)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(1e-4)


def read_slot(cache: ef.ExpertCache, slot: int, stream: torch.cuda.Stream) -> torch.Tensor:
    """A copy of the slot's bytes, taken on ``stream`` (in its order)."""
    with torch.cuda.stream(stream):
        return cache.slot_tensors(slot, 0)["w"].clone()


def reader_held_then_released(cache: ef.ExpertCache, compute: torch.cuda.Stream) -> tuple[int, torch.Tensor]:
    """Expert 0 in the cache's only slot, read on ``compute`` behind a hold and released there: the
    read is still queued when this returns."""
    (slot,) = cache.acquire_slots(0, [0], stream=compute)
    torch.cuda.synchronize()  # expert 0 has landed; nothing else is in flight
    hold(compute)
    seen = read_slot(cache, slot, compute)
    cache.release(0, [0], stream=compute)
    return slot, seen


# How expert 1 comes into the slot: (chunk_bytes, prefetch paused, prefetched, then acquired). A
# prefetch of one chunk is fully submitted (on the prefetch stream) at once; one of several chunks is
# started: the dispatcher submits two and then waits for the first, which the hold keeps back.
LOADS = {
    "demand": (CHUNK, False, False, True),
    "prefetch_one_chunk": (8 * CHUNK, False, True, False),
    "prefetch_chunked": (CHUNK, False, True, False),
    "queued_then_promoted": (CHUNK, True, True, True),
    "started_then_promoted": (CHUNK, False, True, True),
}


def start_loading_expert_1(cache: ef.ExpertCache, pool: ef.ExpertPool, load: str) -> None:
    """Issues the load of expert 1 into the cache's only slot, and for prefetches waits until the
    dispatcher has submitted the chunks it will submit (all of a one-chunk prefetch)."""
    chunk_bytes, paused, prefetched, _ = LOADS[load]
    if paused:
        cache.pause_prefetch()
    if prefetched:
        cache.prefetch([(0, 1, 1.0)])
    if prefetched and not paused:
        want = min(chunk_bytes, pool.expert_bytes(0))
        wait_for(lambda: cache.stats()["prefetch_bytes"] >= want, "the dispatcher to submit the prefetch")


# -- write after read: a reload into a released slot waits for the reader --------------------------------

@pytest.mark.parametrize("load", LOADS)
def test_a_reload_waits_until_the_reader_is_done(load):
    chunk_bytes, _, _, acquired = LOADS[load]
    pool, written = make_pool(2)
    compute = torch.cuda.Stream()
    with ef.ExpertCache(pool, num_slots=1, chunk_bytes=chunk_bytes) as cache:
        slot, seen = reader_held_then_released(cache, compute)
        # Expert 1 replaces expert 0 in the slot while the read of expert 0 is still queued.
        start_loading_expert_1(cache, pool, load)
        if acquired:
            assert cache.acquire_slots(0, [1], wait=False) == [slot]  # a demand load, or the prefetch promoted
            assert not cache.slot_ready(slot), "expert 1 landed while the reader of expert 0 was held"
            cache.release(0, [1])
        assert not compute.query(), "the hold ended before the reload was issued: the race was not provoked"
        cache.resume_prefetch()
        torch.cuda.synchronize()
        assert torch.equal(seen.cpu(), written[0]), "the slot was overwritten before its reader read it"
        # The reload itself landed whole once the reader was done.
        assert cache.acquire_slots(0, [1], stream=compute) == [slot]
        after = read_slot(cache, slot, compute)
        cache.release(0, [1], stream=compute)
        torch.cuda.synchronize()
        assert torch.equal(after.cpu(), written[1])
        assert cache.stats()["evictions"] == 1


def test_control_an_unsynchronised_reload_overwrites_the_slot_under_its_reader():
    """The race the free event prevents is real: bytes written into the slot without waiting for it,
    while the reader is held, are what the reader then sees."""
    pool, written = make_pool(2)
    compute, other = torch.cuda.Stream(), torch.cuda.Stream()
    with ef.ExpertCache(pool, num_slots=1, chunk_bytes=CHUNK) as cache:
        slot, seen = reader_held_then_released(cache, compute)
        with torch.cuda.stream(other):  # no wait on the free event
            cache.slot_tensors(slot, 0)["w"].copy_(pool.expert(0, 1)["w"], non_blocking=True)
        other.synchronize()  # that write has landed ...
        assert not compute.query()  # ... and the read is still queued behind the hold
        torch.cuda.synchronize()
        assert torch.equal(seen.cpu(), written[1])
        assert not torch.equal(seen.cpu(), written[0])


# -- read after write: a reader waits until the copy into its slot lands ----------------------------------

def copy_held_back(cache: ef.ExpertCache, holder: torch.cuda.Stream) -> int:
    """The cache's only slot, released on ``holder`` behind a hold: any copy into it waits for the hold."""
    (slot,) = cache.acquire_slots(0, [0], stream=holder)
    torch.cuda.synchronize()
    hold(holder)
    cache.release(0, [0], stream=holder)
    return slot


@pytest.mark.parametrize("load", [load for load in LOADS if load != "prefetch_chunked"])  # acquired: it is started_then_promoted
def test_a_reader_waits_until_the_copy_lands(load):
    chunk_bytes, _, _, _ = LOADS[load]
    pool, written = make_pool(2)
    holder, compute = torch.cuda.Stream(), torch.cuda.Stream()
    with ef.ExpertCache(pool, num_slots=1, chunk_bytes=chunk_bytes) as cache:
        slot = copy_held_back(cache, holder)
        start_loading_expert_1(cache, pool, load)
        # The copy of expert 1 cannot land before the hold ends; compute reads at once unless made to wait.
        assert cache.acquire_slots(0, [1], stream=compute) == [slot]
        seen = read_slot(cache, slot, compute)
        cache.release(0, [1], stream=compute)
        assert not holder.query(), "the hold ended before the read was queued: the race was not provoked"
        cache.resume_prefetch()
        torch.cuda.synchronize()
        assert torch.equal(seen.cpu(), written[1]), "compute read the slot before expert 1 landed"
        s = cache.stats()
        assert s["stalls"] >= 1  # compute had to wait for the copy
        assert (s["hits"], s["misses"]) == ((0, 2) if load == "demand" else (1, 1))


def test_control_a_read_without_waiting_sees_the_old_expert():
    """The race the ready event prevents is real: a read queued without waiting on the slot sees the
    expert that was there before."""
    pool, written = make_pool(2)
    holder, compute = torch.cuda.Stream(), torch.cuda.Stream()
    with ef.ExpertCache(pool, num_slots=1, chunk_bytes=CHUNK) as cache:
        slot = copy_held_back(cache, holder)
        assert cache.acquire_slots(0, [1], stream=compute, wait=False) == [slot]
        early = read_slot(cache, slot, compute)  # no wait_slot: unsynchronised
        compute.synchronize()  # that read is done ...
        assert not holder.query()  # ... while the copy is still held back
        cache.wait_slot(slot, compute)
        late = read_slot(cache, slot, compute)
        cache.release(0, [1], stream=compute)
        torch.cuda.synchronize()
        assert torch.equal(early.cpu(), written[0]) and not torch.equal(early.cpu(), written[1])
        assert torch.equal(late.cpu(), written[1])
