"""Slot reuse under long-running compute, on the GPU.

Compute reads an expert's slot while the compute stream is held back (torch.cuda._sleep), releases
it, and the host at once prefetches or demand-loads other experts into the same slots. Copies must
wait for the compute stream to pass the release point: results must equal the reference computed
from the pool's bytes.
"""

import pytest
import torch

import expertflow as ef

pytestmark = pytest.mark.gpu

HIDDEN = 1024


def make_pool(num_experts: int) -> ef.ExpertPool:
    pool = ef.ExpertPool.uniform(1, num_experts, [ef.TensorSpec("w", torch.float32, (HIDDEN, HIDDEN))], backend="cuda")
    g = torch.Generator().manual_seed(0)
    for e in range(num_experts):
        pool.write_tensor(0, e, "w", torch.randn(HIDDEN, HIDDEN, generator=g) / HIDDEN**0.5)
    return pool


@pytest.mark.parametrize("reload", ["prefetch", "demand"])
def test_slot_reuse_waits_for_compute(reload):
    num_experts, num_slots, rounds = 8, 2, 12
    pool = make_pool(num_experts)
    x = torch.randn(33, HIDDEN, device="cuda")
    with ef.ExpertCache(pool, num_slots=num_slots, policy="lru", chunk_bytes=1 << 20) as cache:
        outputs = []
        for r in range(rounds):
            experts = [(2 * r) % num_experts, (2 * r + 1) % num_experts]
            weights = cache.acquire(0, experts)
            torch.cuda._sleep(20_000_000)  # ≈10 ms: the copies below are queued long before compute runs
            y = x
            for w in weights:
                y = y @ w["w"]  # reads both slots
            outputs.append((experts, y))
            cache.release(0, experts)
            nxt = [(2 * r + 2) % num_experts, (2 * r + 3) % num_experts]
            if reload == "prefetch":
                cache.prefetch([(0, e, 1.0) for e in nxt])  # overwrites the slots just released
            else:
                cache.acquire(0, nxt[:1])  # a demand miss into a released slot
                cache.release(0, nxt[:1])
        torch.cuda.synchronize()
        for experts, y in outputs:
            ref = x.cpu().double()
            for e in experts:
                ref = ref @ pool.expert(0, e)["w"].double()
            err = (y.cpu().double() - ref).norm() / ref.norm()
            assert err < 5e-3, f"experts {experts}: relative error {err:.2e}: a slot was overwritten while read"
        stats = cache.stats()
        assert stats["evictions"] > 0


def test_compute_stream_waits_for_inflight_copies():
    pool = make_pool(4)
    x = torch.randn(7, HIDDEN, device="cuda")
    with ef.ExpertCache(pool, num_slots=4, chunk_bytes=1 << 20) as cache:
        cache.prefetch([(0, e, 1.0) for e in range(4)])
        ys = []
        for e in range(4):  # acquire right away, while prefetches are still streaming
            (w,) = cache.acquire(0, [e])
            ys.append(x @ w["w"])
            cache.release(0, [e])
        torch.cuda.synchronize()
        for e, y in enumerate(ys):
            ref = x.cpu().double() @ pool.expert(0, e)["w"].double()
            assert (y.cpu().double() - ref).norm() / ref.norm() < 5e-3
        assert cache.stats()["hits"] == 4
