"""Do CPU experts and host-to-device copies compete? Both read the experts from host memory.

A missed expert either crosses the link (the DMA engine reads its bytes from pinned host memory) or
is computed on the CPU (the cores read the same bytes). If the host's memory bandwidth cannot feed
both at once, the "second pipe" of CPU experts slows the first. On the H200 machine a Mixtral
expert took 5.8 ms on the CPU alone and 9-12 ms inside decode steps (docs/cpu_experts.md); this
separates the causes. Each measurement is a median over ``--reps``:

1. ``cpu_alone_ms``: one expert (``x [tokens, H] @ gate_up.T``, SwiGLU, ``@ down.T``, bf16, torch's
   CPU kernels, ``torch.get_num_threads()`` threads) from pinned memory;
2. ``copy_alone_gbps`` (GPU only): the same expert's bytes, pinned memory to the device;
3. ``copy_beside_cpu_expert`` (GPU only): the CPU expert in a loop on a worker thread while the main
   thread copies, each measured (``copy_gbps``, ``thread_ms``);
4. ``launches_beside_cpu_expert`` (GPU only): 600 small kernels launched back to back, as a batch-1
   decode step does, alone and beside the CPU expert's loop.

    python benchmarks/cpu_link_contention.py --out benchmarks/results/cpu-link-contention-h200.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from expertflow.timing import median_ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=4096, help="Mixtral-8x7B's")
    p.add_argument("--ffn", type=int, default=14336)
    p.add_argument("--tokens", type=int, default=1)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if min(args.hidden, args.ffn, args.tokens, args.reps) < 1:
        p.error("--hidden, --ffn, --tokens and --reps must be at least 1")
    gpu = torch.cuda.is_available()
    pin = gpu  # pinned memory needs a CUDA driver
    gate_up = torch.randn(2 * args.ffn, args.hidden, dtype=torch.bfloat16) * 0.02
    down = torch.randn(args.hidden, args.ffn, dtype=torch.bfloat16) * 0.02
    if pin:
        gate_up, down = gate_up.pin_memory(), down.pin_memory()
    x = torch.randn(args.tokens, args.hidden, dtype=torch.bfloat16)
    expert_bytes = (gate_up.numel() + down.numel()) * 2

    def cpu_expert() -> None:
        g, u = F.linear(x, gate_up).chunk(2, dim=-1)
        F.linear(F.silu(g) * u, down)

    result: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                                "device": torch.cuda.get_device_name() if gpu else None, "torch": torch.__version__},
                    "expert_bytes": expert_bytes, "tokens": args.tokens, "reps": args.reps}
    result["cpu_alone_ms"] = median_ms(cpu_expert, args.reps)
    print(f"CPU expert alone: {result['cpu_alone_ms']:.2f} ms ({expert_bytes / result['cpu_alone_ms'] / 1e6:.1f} GB/s read)",
          flush=True)
    if gpu:
        targets = (torch.empty_like(gate_up, device="cuda"), torch.empty_like(down, device="cuda"))

        def copy() -> None:
            targets[0].copy_(gate_up, non_blocking=True)
            targets[1].copy_(down, non_blocking=True)

        copy_ms = median_ms(copy, args.reps, torch.cuda.synchronize)
        result["copy_alone_gbps"] = expert_bytes / copy_ms / 1e6
        print(f"copy alone: {copy_ms:.2f} ms, {result['copy_alone_gbps']:.1f} GB/s", flush=True)

        def beside(work, measure_main, label: str) -> None:
            """``work`` loops on a thread while the main thread measures ``measure_main``; the
            thread's own times come back too."""
            stop, measuring, times = threading.Event(), threading.Event(), []

            def loop() -> None:
                while not stop.is_set():
                    inside = measuring.is_set()
                    start = time.perf_counter()
                    work()
                    if inside and measuring.is_set():  # only runs wholly beside the measurement
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
            result[label] = {"main_ms": main_ms, "thread_ms": statistics.median(times) if times else None}

        beside(cpu_expert, lambda: median_ms(copy, args.reps, torch.cuda.synchronize), "copy_beside_cpu_expert")
        r = result["copy_beside_cpu_expert"]
        r["copy_gbps"] = expert_bytes / r["main_ms"] / 1e6
        print(f"both: copy {r['copy_gbps']:.1f} GB/s, CPU expert {r['thread_ms']:.2f} ms", flush=True)

        small = torch.zeros(64, device="cuda")

        def launches() -> None:  # about a decode step's worth of small kernels, then its sync
            for _ in range(600):
                small.add_(1)
            torch.cuda.synchronize()

        alone = median_ms(launches, args.reps)
        beside(cpu_expert, lambda: median_ms(launches, args.reps), "launches_beside_cpu_expert")
        r = result["launches_beside_cpu_expert"]
        r["launches_alone_ms"] = alone
        print(f"600 launches: {alone:.2f} ms alone, {r['main_ms']:.2f} ms beside the CPU expert "
              f"(which then took {r['thread_ms']:.2f} ms)", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
