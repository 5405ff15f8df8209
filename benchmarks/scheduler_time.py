"""Time of one scheduling round: 64 sequences of a 32-layer x 8-expert model into batches of 8.

Run on one core: OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 taskset -c 0 python benchmarks/scheduler_time.py
The median and max of 50 rounds, for paths (history) and probabilities (a predictor's), each ordered
after a last batch as the engine does; printed and written to benchmarks/results/scheduler-time-cpu.json.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np

from expertflow.scheduler import group_by_paths


def main() -> None:
    rng = np.random.default_rng(0)
    inputs = {"paths [64, 32, 2]": rng.integers(0, 8, (64, 32, 2)),
              "probabilities [64, 32, 8]": rng.random((64, 32, 8)).astype(np.float32)}
    last_batch = rng.integers(0, 8, (8, 32, 2))
    out = {}
    for name, x in inputs.items():
        times = []
        for _ in range(50):
            start = time.perf_counter()
            group_by_paths(x, 8, 8, after=last_batch)
            times.append((time.perf_counter() - start) * 1e3)
        out[name] = {"median_ms": statistics.median(times), "max_ms": max(times)}
    text = json.dumps(out, indent=1)
    print(text)
    (Path(__file__).resolve().parent / "results" / "scheduler-time-cpu.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
