"""Do CPU experts and host-to-device copies compete? Both read the experts from host memory.

A missed expert either crosses the link (the DMA engine reads its bytes from pinned host memory) or
is computed on the CPU (the cores read the same bytes). If the host's memory bandwidth cannot feed
both at once, the "second pipe" of CPU experts slows the first. On the H200 machine a Mixtral
expert took 5.8 ms on the CPU alone and 9-12 ms inside decode steps (docs/cpu_experts.md); this
separates the causes. ``--num-experts`` experts take turns, so that every call reads its expert from
memory, as a step does, not from a last-level cache that one expert nearly fits (300 MB there).
Each measurement is a median over ``--reps``, for each ``--kernels``: torch's ``F.linear`` (``torch``),
the native ``HostLinear`` product by product (``native``), and the native whole-expert call that the
engine's CPU experts run (``whole``: ``HostLinear.gated_silu``, both products and the SiLU in one call):

1. ``cpu_alone_ms``: one expert (``x [tokens, H] @ gate_up.T``, SwiGLU, ``@ down.T``, bf16) from
   pinned memory, for each of ``--tokens``;
2. ``copy_alone_gbps`` (GPU only): an expert's bytes, pinned memory to the device;
3. ``beside_copy`` (GPU only): the CPU expert in a loop on a worker thread while the main thread
   copies, each measured (``copy_gbps``, ``cpu_ms``);
4. ``beside_launches`` (GPU only): 600 small kernels launched back to back, as a batch-1 decode step
   does, alone and beside the CPU expert's loop;
5. ``read_gbps``: what torch's integer max reads over the experts' bytes, in turn: a floor of the
   host's read bandwidth (the native kernel reads faster);
6. ``by_threads``: 1 and 3 again for each of ``--threads`` CPU thread counts (fewer threads leave
   cores to the launching thread and the copy engine's dispatcher).

    python benchmarks/cpu_link_contention.py --out benchmarks/results/cpu-link-contention-h200.json
    python benchmarks/cpu_link_contention.py --tokens 1 --threads 8,12,15 \
        --out benchmarks/results/cpu-link-contention-threads-h200.json
    python benchmarks/cpu_link_contention.py --tokens 64 --contention-tokens 64 --kernels torch --threads 12,14,15,16 \
        --out benchmarks/results/cpu-link-contention-64-tokens-h200.json
    python benchmarks/cpu_link_contention.py --tokens 1,2,3,4,8 --contention-tokens 4 --kernels whole,native \
        --out benchmarks/results/cpu-link-contention-whole-4-tokens-h200.json   # batch 16's 4-token experts
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F

from expertflow.cpu_experts import HostLinear
from expertflow.timing import median_ms


def _int_list(text: str, what: str, p: argparse.ArgumentParser) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        p.error(f"{what} takes comma-separated integers, got '{text}'")
    if any(v < 1 for v in values):
        p.error(f"{what} values must be at least 1")
    return values


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=4096, help="Mixtral-8x7B's")
    p.add_argument("--ffn", type=int, default=14336)
    p.add_argument("--num-experts", type=int, default=4, help="experts taking turns (4 of Mixtral's: 1.4 GB)")
    p.add_argument("--tokens", default="1,4,16", help="comma-separated token counts for cpu_alone_ms")
    p.add_argument("--kernels", default="torch,native", help="comma-separated: torch, native, whole")
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--threads", default="", help="comma-separated CPU thread counts to sweep (default: none)")
    p.add_argument("--contention-tokens", type=int, default=1,
                   help="tokens of the CPU expert in 3, 4 and 6 (1: decode's; 64: a batch's prompt pass)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if min(args.hidden, args.ffn, args.num_experts, args.reps, args.contention_tokens) < 1:
        p.error("--hidden, --ffn, --num-experts, --reps and --contention-tokens must be at least 1")
    token_counts = _int_list(args.tokens, "--tokens", p) or [1]
    sweep = _int_list(args.threads, "--threads", p)
    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    if not kernels or set(kernels) - {"torch", "native", "whole"}:
        p.error(f"--kernels takes torch, native and whole, got '{args.kernels}'")
    gpu = torch.cuda.is_available()
    experts = []
    for _ in range(args.num_experts):
        gate_up = torch.randn(2 * args.ffn, args.hidden, dtype=torch.bfloat16) * 0.02
        down = torch.randn(args.hidden, args.ffn, dtype=torch.bfloat16) * 0.02
        experts.append((gate_up.pin_memory(), down.pin_memory()) if gpu else (gate_up, down))  # pinning needs CUDA
    expert_bytes = sum(t.numel() * 2 for t in experts[0])
    threads_default = torch.get_num_threads()

    def expert_fn(kernel: str, num_tokens: int, threads: int) -> tuple[Callable[[], None], Callable[[], None]]:
        """(one expert on the CPU, the next expert each call; its close)."""
        linear = HostLinear(threads) if kernel != "torch" else None
        product = linear if linear is not None else F.linear
        x = torch.randn(num_tokens, args.hidden, dtype=torch.bfloat16)
        turn = itertools.cycle(experts)

        def run() -> None:
            gate_up, down = next(turn)
            if kernel == "whole":
                if cast(HostLinear, linear).gated_silu(x, gate_up, down) is None:
                    raise RuntimeError("the native kernel does not take this expert whole")
                return
            g, u = product(x, gate_up).chunk(2, dim=-1)
            product(F.silu(g) * u, down)

        return run, (linear.close if linear is not None else lambda: None)

    result: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": threads_default,
                                "device": torch.cuda.get_device_name() if gpu else None, "torch": torch.__version__,
                                "native_isa": HostLinear(1).isa},
                    "expert_bytes": expert_bytes, "num_experts": args.num_experts, "reps": args.reps}
    words = itertools.cycle([gate_up.view(torch.int32) for gate_up, _ in experts])
    read_ms = median_ms(lambda: next(words).max(), args.reps)
    result["read_gbps"] = experts[0][0].numel() * 2 / read_ms / 1e6
    print(f"host memory read by the cores: {result['read_gbps']:.1f} GB/s", flush=True)

    result["cpu_alone_ms"] = {}
    for kernel in kernels:
        for n in token_counts:
            run, close = expert_fn(kernel, n, threads_default)
            ms = median_ms(run, args.reps)
            close()
            result["cpu_alone_ms"][f"{kernel} {n}"] = ms
            print(f"CPU expert alone, {kernel}, {n} tokens: {ms:.2f} ms ({expert_bytes / ms / 1e6:.1f} GB/s read)",
                  flush=True)
    if gpu:
        targets = [torch.empty_like(t, device="cuda") for t in experts[0]]
        sources = itertools.cycle(experts)

        def copy() -> None:
            for src, dst in zip(next(sources), targets):
                dst.copy_(src, non_blocking=True)

        copy_ms = median_ms(copy, args.reps, torch.cuda.synchronize)
        result["copy_alone_gbps"] = expert_bytes / copy_ms / 1e6
        print(f"copy alone: {copy_ms:.2f} ms, {result['copy_alone_gbps']:.1f} GB/s", flush=True)
        small = torch.zeros(64, device="cuda")

        def launches() -> None:  # about a decode step's worth of small kernels, then its sync
            for _ in range(600):
                small.add_(1)
            torch.cuda.synchronize()

        result["launches_alone_ms"] = median_ms(launches, args.reps)

    def beside(work: Callable[[], None], measure_main: Callable[[], float]) -> tuple[float, float | None]:
        """``work`` loops on a thread while the main thread measures ``measure_main``: (main's ms, the
        thread's median ms over its runs wholly beside the measurement)."""
        stop, measuring, times = threading.Event(), threading.Event(), []

        def loop() -> None:
            while not stop.is_set():
                inside = measuring.is_set()
                start = time.perf_counter()
                work()
                if inside and measuring.is_set():
                    times.append((time.perf_counter() - start) * 1e3)

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        time.sleep(0.05)
        measuring.set()
        try:
            main_ms = measure_main()
        finally:
            measuring.clear()
            stop.set()
            thread.join()
        return main_ms, statistics.median(times) if times else None

    def contention(kernel: str, threads: int) -> dict:
        row: dict = {"kernel": kernel, "threads": threads, "tokens": args.contention_tokens}
        run, close = expert_fn(kernel, args.contention_tokens, threads)
        try:
            row["cpu_alone_ms"] = median_ms(run, args.reps)
            if gpu:
                main_ms, row["cpu_beside_copy_ms"] = beside(run, lambda: median_ms(copy, args.reps, torch.cuda.synchronize))
                row["copy_beside_cpu_gbps"] = expert_bytes / main_ms / 1e6
                row["launches_beside_cpu_ms"], row["cpu_beside_launches_ms"] = beside(
                    run, lambda: median_ms(launches, args.reps))
        finally:
            close()
        print(row, flush=True)
        return row

    if gpu:
        result["contention"] = [contention(kernel, threads_default) for kernel in kernels]
    result["by_threads"] = []
    for threads in sweep:
        for kernel in kernels:
            torch.set_num_threads(threads if kernel == "torch" else threads_default)
            result["by_threads"].append(contention(kernel, threads))
    torch.set_num_threads(threads_default)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
