"""Host wall-clock timing, shared by the calibration (``cpu_experts.py``) and the benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

__all__ = ["median_ms"]


def median_ms(fn: Callable[[], Any], reps: int, sync: Callable[[], None] | None = None, warmup: int = 2) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` calls, after ``warmup`` untimed ones (thread pools,
    first touches). ``sync`` runs after every call, inside its timing, so work ``fn`` queued on a
    device counts."""
    for _ in range(warmup):
        fn()
    if sync is not None:
        sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
