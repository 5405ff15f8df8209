"""A CPU expert beside a busy Python thread: one gated SiLU expert (bf16, ``--hidden`` x ``--inter``),
computed as the engine's composition (the native kernel's two products, torch's silu and product
between them: Python takes its lock back after every step) and as one native call
(``HostLinear.gated_silu``), alone, beside a thread running pure Python, and beside a thread issuing
small torch ops (which let the lock go). The thread that launches a GPU's work is such a neighbour:
it runs the model's Python while the CPU computes its experts. Medians of ``--reps`` calls, each on
the next of a few experts (so that weights come from memory, as in a step), with ``--threads``
kernel threads. Writes JSON.

    python benchmarks/cpu_experts_gil.py --out benchmarks/results/cpu-experts-gil-cpu.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import bench_cli
import torch
import torch.nn.functional as F

from expertflow.cpu_experts import HostLinear


def neighbour(kind: str, stop: threading.Event) -> None:
    """Keeps a thread busy until ``stop``: pure Python, or small torch ops."""
    if kind == "python":
        while not stop.is_set():
            sum(i * i for i in range(1000))
    else:
        a = torch.ones(64)
        while not stop.is_set():
            a = a * 1.0001 + 0.5


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--inter", type=int, default=14336)
    p.add_argument("--experts", type=int, default=3, help="distinct experts, taken in turn")
    p.add_argument("--tokens", type=int, default=1)
    p.add_argument("--threads", type=int, default=max(1, torch.get_num_threads() - 1))
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--switch-intervals", default=str(sys.getswitchinterval()),
                   help="comma-separated seconds: Python's switch interval (sys.setswitchinterval), each in turn")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    try:
        intervals = [float(s) for s in args.switch_intervals.split(",")]
    except ValueError:
        intervals = []
    if not intervals or min(intervals) <= 0:
        p.error(f"--switch-intervals takes positive seconds, comma-separated; got '{args.switch_intervals}'")
    g = torch.Generator().manual_seed(0)
    experts = [((torch.randn(2 * args.inter, args.hidden, generator=g) * 0.02).bfloat16(),
                (torch.randn(args.hidden, args.inter, generator=g) * 0.02).bfloat16()) for _ in range(args.experts)]
    x = torch.randn(args.tokens, args.hidden, generator=g).bfloat16()
    linear = HostLinear(args.threads)
    torch.set_num_threads(args.threads)

    def composed(gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        gate, up = linear(x, gate_up).chunk(2, dim=-1)
        return linear(F.silu(gate) * up, down)

    def native(gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        y = linear.gated_silu(x, gate_up, down)
        assert y is not None, "the native kernel did not take the expert"
        return y

    rows = []
    switch_interval = sys.getswitchinterval()
    try:
        with torch.no_grad():
            assert torch.equal(composed(*experts[0]), native(*experts[0]))
            for interval, beside in itertools.product(intervals, ("nothing", "python", "torch ops")):
                sys.setswitchinterval(interval)
                stop = threading.Event()
                thread = None if beside == "nothing" else threading.Thread(
                    target=neighbour, args=("python" if beside == "python" else "torch", stop), daemon=True)
                if thread is not None:
                    thread.start()
                try:
                    for name, fn in (("composed", composed), ("native", native)):
                        turn = itertools.cycle(experts)
                        fn(*next(turn))  # warm-up
                        times = []
                        for _ in range(args.reps):
                            start = time.perf_counter()
                            fn(*next(turn))
                            times.append((time.perf_counter() - start) * 1e3)
                        rows.append({"switch_interval_s": interval, "beside": beside, "path": name,
                                     "ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)})
                        print(f"switch {interval * 1e3:5.2f} ms {beside:10s} {name:9s} {rows[-1]['ms']:8.2f} ms "
                              f"(median of {args.reps})")
                finally:
                    stop.set()
                    if thread is not None:
                        thread.join()
    finally:
        sys.setswitchinterval(switch_interval)
        linear.close()
    args.out.write_text(json.dumps({
        "command": bench_cli.command(__file__, args),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "isa": linear.isa}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
