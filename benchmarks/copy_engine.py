"""Copy engine on a GPU: pinned ceiling, achieved bandwidth per expert size, demand latency under load.

Measures in one run (CUDA backend; the host backend has no bandwidth worth reporting):

1. the raw ``cudaMemcpyAsync`` pinned host-to-device ceiling (torch pinned tensor -> device copies);
2. the CopyEngine's achieved bandwidth: prefetch plans of experts of 4, 16, 64 and 336 MB (a
   Mixtral-8x7B expert in bf16), from ``prefetch()`` until every byte has landed, for several chunk
   sizes;
3. how long a 64 MB demand load takes while a 1 GB prefetch is in flight, beside the same load on an
   idle engine and beside the naive alternative (the 1 GB on a low-priority stream, the 64 MB on a
   high-priority one).

Writes JSON (and a PNG plot next to it) and prints a table. Medians over ``--reps`` runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import expertflow as ef

MB = 1 << 20


def median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        times.append(fn())
    return statistics.median(times)


def raw_ceiling(size: int, reps: int) -> float:
    """GB/s of back-to-back pinned->device copies of ``size`` bytes (≈2 GB per timing)."""
    count = max(1, (2048 * MB) // size)
    src = torch.empty(size, dtype=torch.uint8, pin_memory=True).random_(0, 255)
    dst = [torch.empty(size, dtype=torch.uint8, device="cuda") for _ in range(min(count, 8))]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def once() -> float:
        start.record()
        for i in range(count):
            dst[i % len(dst)].copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    once()
    return count * size / (median_ms(once, reps) / 1e3) / 1e9


def make_pool(num_experts: int, size: int) -> ef.ExpertPool:
    pool = ef.ExpertPool.uniform(1, num_experts, [ef.TensorSpec("w", torch.uint8, (size,))], backend="cuda")
    for e in range(num_experts):
        pool.expert_bytes_view(0, e).fill_(e % 251 + 1)
    return pool


def engine_bandwidth(size: int, chunk: int, max_in_flight: int, reps: int) -> float:
    """GB/s of prefetch plans of ≈2 GB of ``size``-byte experts, prefetch() to last byte landed."""
    n = max(2, (2048 * MB) // size)
    pool = make_pool(2 * n, size)
    with ef.ExpertCache(pool, num_slots=n, chunk_bytes=chunk, max_chunks_in_flight=max_in_flight) as cache:
        plans = [[(0, e, 1.0) for e in range(n)], [(0, e, 1.0) for e in range(n, 2 * n)]]
        rep = [0]

        def once() -> float:
            plan = plans[rep[0] % 2]
            rep[0] += 1
            t0 = time.perf_counter()
            cache.prefetch(plan)
            cache.synchronize()
            return (time.perf_counter() - t0) * 1e3

        once()
        ms = median_ms(once, reps)
        # Every slot holds what the last plan asked for, byte for byte.
        last = plans[(rep[0] - 1) % 2]
        for layer, e, _ in last[:: max(1, len(last) // 4)]:
            (w,) = cache.acquire(layer, [e])
            assert torch.equal(w["w"][:: size // 64].cpu(), pool.expert(0, e)["w"][:: size // 64])
            cache.release(layer, [e])
    return n * size / (ms / 1e3) / 1e9


def demand_under_load(chunk: int, max_in_flight: int, reps: int, prefetch_mb: int = 1024, expert_mb: int = 64) -> dict:
    """Wall time of acquire() of a 64 MB miss (until the compute stream could use it)."""
    size = expert_mb * MB
    n_prefetch = prefetch_mb // expert_mb
    n_demand = reps + 1
    pool = make_pool(2 * n_prefetch + 2 * n_demand, size)
    stream = torch.cuda.current_stream()
    loaded, alone = [], []
    with ef.ExpertCache(pool, num_slots=n_prefetch + 1, chunk_bytes=chunk, max_chunks_in_flight=max_in_flight) as cache:
        demand_ids = iter(range(2 * n_prefetch, 2 * n_prefetch + 2 * n_demand))

        def timed_miss() -> float:
            e = next(demand_ids)
            t0 = time.perf_counter()
            cache.acquire(0, [e])
            stream.synchronize()
            ms = (time.perf_counter() - t0) * 1e3
            cache.release(0, [e])
            return ms

        for rep in range(reps + 1):
            base = (rep % 2) * n_prefetch
            cache.prefetch([(0, e, 1.0) for e in range(base, base + n_prefetch)])
            time.sleep(0.001)  # the prefetch is now streaming
            t_loaded = timed_miss()
            cache.synchronize()
            t_alone = timed_miss()
            if rep:  # the first round warms up
                loaded.append(t_loaded)
                alone.append(t_alone)
        stats = cache.stats()
    return {
        "chunk_mb": chunk / MB,
        "max_chunks_in_flight": max_in_flight,
        "demand_with_prefetch_ms": statistics.median(loaded),
        "demand_alone_ms": statistics.median(alone),
        "stall_ms_total": stats["stall_ms"],
    }


def naive_two_streams(reps: int, prefetch_mb: int = 1024, expert_mb: int = 64) -> float:
    """1 GB on a low-priority stream, then 64 MB on a high-priority one: ms until the 64 MB landed."""
    big = torch.empty(prefetch_mb * MB, dtype=torch.uint8, pin_memory=True).random_(0, 255)
    small = torch.empty(expert_mb * MB, dtype=torch.uint8, pin_memory=True).random_(0, 255)
    big_dst = torch.empty_like(big, device="cuda")
    small_dst = torch.empty_like(small, device="cuda")
    low, high = torch.cuda.Stream(priority=0), torch.cuda.Stream(priority=-1)

    def once() -> float:
        torch.cuda.synchronize()
        with torch.cuda.stream(low):
            for i in range(0, big.numel(), 4 * MB):
                big_dst[i : i + 4 * MB].copy_(big[i : i + 4 * MB], non_blocking=True)
        t0 = time.perf_counter()
        with torch.cuda.stream(high):
            small_dst.copy_(small, non_blocking=True)
        high.synchronize()
        return (time.perf_counter() - t0) * 1e3

    once()
    return median_ms(once, reps)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    sizes = sorted({r["expert_mb"] for r in result["bandwidth"]})
    for chunk, in_flight in sorted({(r["chunk_mb"], r["max_chunks_in_flight"]) for r in result["bandwidth"]}):
        rows = [r for r in result["bandwidth"] if (r["chunk_mb"], r["max_chunks_in_flight"]) == (chunk, in_flight)]
        ax.plot([r["expert_mb"] for r in rows], [r["engine_gbps"] for r in rows], marker="o",
                linestyle="-" if in_flight == 2 else ":", label=f"engine, {chunk:g} MB chunks x {in_flight}")
    ax.plot(sizes, [result["raw_gbps"][str(s)] for s in sizes], marker="s", color="black", label="raw cudaMemcpyAsync")
    ax.axhline(0.95 * result["ceiling_gbps"], color="gray", linestyle="--", label="95% of ceiling")
    ax.set_xscale("log")
    ax.set_xticks(sizes, [f"{s:g}" for s in sizes])
    ax.set_xlabel("expert size (MB)")
    ax.set_ylabel("host-to-device GB/s")
    ax.set_title(f"ExpertFlow copy engine, {result['device']}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/copy_engine_h200.json")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--sizes-mb", default="4,16,64,336")
    parser.add_argument("--chunks-mb", default="2,4,8,16")
    args = parser.parse_args()
    if not torch.cuda.is_available() or ef.get_backend().name != "cuda":
        raise SystemExit("benchmarks/copy_engine.py needs a CUDA GPU and expertflow's CUDA backend")
    sizes = [int(s) for s in args.sizes_mb.split(",")]
    chunks = [float(c) for c in args.chunks_mb.split(",")]
    result: dict = {
        "device": torch.cuda.get_device_name(),
        "host": platform.node(),
        "torch": torch.__version__,
        "reps": args.reps,
        "raw_gbps": {str(s): raw_ceiling(s * MB, args.reps) for s in sorted(set(sizes + [4, 16]))},
    }
    result["ceiling_gbps"] = max(result["raw_gbps"].values())
    result["bandwidth"] = []
    for chunk in chunks:
        for in_flight in (1, 2):
            for s in sizes:
                gbps = engine_bandwidth(s * MB, int(chunk * MB), in_flight, args.reps)
                result["bandwidth"].append({
                    "expert_mb": s, "chunk_mb": chunk, "max_chunks_in_flight": in_flight,
                    "engine_gbps": gbps, "share_of_ceiling": gbps / result["ceiling_gbps"],
                })
    result["demand"] = []
    for chunk in chunks:
        for in_flight in (1, 2):
            row = demand_under_load(int(chunk * MB), in_flight, args.reps)
            chunk_ms = chunk * MB / (result["ceiling_gbps"] * 1e9) * 1e3
            row["bound_ms"] = row["demand_alone_ms"] + chunk_ms
            row["within_bound"] = row["demand_with_prefetch_ms"] <= row["bound_ms"]
            result["demand"].append(row)
    result["naive_two_streams_ms"] = naive_two_streams(args.reps)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))

    print(f"{result['device']}: pinned ceiling {result['ceiling_gbps']:.1f} GB/s; raw by size " +
          ", ".join(f"{k} MB {v:.1f}" for k, v in result["raw_gbps"].items()))
    print(f"{'expert MB':>9} {'chunk MB':>8} {'in flight':>9} {'GB/s':>6} {'of ceiling':>10}")
    for r in result["bandwidth"]:
        print(f"{r['expert_mb']:>9} {r['chunk_mb']:>8g} {r['max_chunks_in_flight']:>9} {r['engine_gbps']:>6.1f} "
              f"{r['share_of_ceiling']:>10.1%}")
    print(f"{'chunk MB':>8} {'in flight':>9} {'64MB alone ms':>13} {'under 1GB prefetch ms':>21} {'bound ms':>8}")
    for r in result["demand"]:
        print(f"{r['chunk_mb']:>8g} {r['max_chunks_in_flight']:>9} {r['demand_alone_ms']:>13.2f} "
              f"{r['demand_with_prefetch_ms']:>21.2f} {r['bound_ms']:>8.2f}")
    print(f"naive: 64 MB on a high-priority stream behind 1 GB on a low-priority one: {result['naive_two_streams_ms']:.2f} ms")


if __name__ == "__main__":
    main()
