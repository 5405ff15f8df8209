"""Where the host time of a decode step goes, per policy: cProfile of a measured generation.

Builds the trace-forced Mixtral-8x7B-shaped model of the real-shape benchmark (``--layers`` layers),
attaches each policy in turn at ``--slots``, warms up, then profiles ``--new-tokens`` tokens and prints
ms/token and the functions that took the most host time. Used to find the planning overhead:
``python3 benchmarks/profile_overhead.py --trace TRACE``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch

from expertflow.bench.harness import BenchConfig, TraceForcing, _Model, _policy, _sync
from expertflow.loader import attach
from expertflow.oracles import TraceSchedule
from expertflow.runtime import get_backend
from expertflow.traces import read_trace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", required=True)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--configs", default="all_gpu:-:100%,lru:-:100%,expertflow:history:100%,expertflow:oracle:100%,"
                                         "lru:-:25%,expertflow:history:25%")
    ap.add_argument("--top", type=int, default=18)
    args = ap.parse_args()
    cfg = BenchConfig(arch="mixtral-8x7b", layers=args.layers, routing=f"trace:{args.trace}", transformers=False,
                      new_tokens=args.new_tokens, progress=False)
    backend = get_backend()
    device = torch.device("cuda" if backend.is_gpu else "cpu")
    m = _Model(cfg, device, backend)
    prompt = torch.randint(1, 1000, (1, 16), device=device)
    schedule = TraceSchedule(read_trace(args.trace), m.num_layers, args.new_tokens, [0], 16)
    forcing = TraceForcing(schedule, device)
    forcing.attach(m.model, m.arch)
    total = m.num_layers * m.num_experts
    for item in args.configs.split(","):
        name, spec, share = item.split(":")
        policy, label = _policy(name, None if spec == "-" else spec, cfg, schedule)
        slots = round(float(share[:-1]) / 100 * total)
        engine = attach(m.model, m.arch, m.pool, slots, policy, owns_pool=False)
        run = lambda: m.model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,  # noqa: E731
                                       do_sample=False, pad_token_id=0)
        with torch.no_grad():
            forcing.reset()
            run()
            forcing.reset()
            _sync(device)
            t0 = time.perf_counter()
            run()
            _sync(device)
            plain = (time.perf_counter() - t0) / args.new_tokens * 1e3
            forcing.reset()
            prof = cProfile.Profile()
            prof.enable()
            run()
            _sync(device)
            prof.disable()
        engine.close()
        out = io.StringIO()
        stats = pstats.Stats(prof, stream=out).sort_stats("tottime")
        stats.print_stats(args.top)
        print(f"=== {name} {label} {share}: {plain:.2f} ms/token (mean, unprofiled)")
        print("\n".join(line for line in out.getvalue().splitlines()[6:] if line.strip()))
    micro(m, schedule)
    m.pool.close()


def micro(m, schedule) -> None:
    """Microseconds per call of the per-layer pieces, outside any model."""
    import numpy as np

    from expertflow.planner import Plan
    from expertflow.policies import EngineInfo, Expertflow, StepContext
    from expertflow.runtime import ExpertCache

    L, E = m.num_layers, m.num_experts
    policy = Expertflow(None, None)
    policy.attach(EngineInfo(L, E, L * E, 2))
    experts = np.array([[1, 2]])

    def timed(fn, n=2000) -> float:
        t0 = time.perf_counter()
        for i in range(n):
            fn(i)
        return (time.perf_counter() - t0) / n * 1e6

    def layer(i):
        if i % L == 0:
            policy.on_step(StepContext(step=i // L))
        return policy.on_layer(i % L, experts, None)

    plan = layer(0)
    with ExpertCache(m.pool, L * E, policy="expertflow") as cache:
        cache.pause_prefetch()
        results = {
            "policy.on_layer (planner, numpy)": timed(layer),
            "cache.apply(plan)": timed(lambda i: cache.apply(plan)),
            "Plan.prefetch_only(2 entries) + apply": timed(lambda i: cache.apply(Plan.prefetch_only([(0, 1, 1.0), (0, 2, 1.0)]))),
            "acquire_slots + release (hits)": timed(lambda i: (cache.acquire_slots(0, [1, 2], wait=False), cache.release(0, [1, 2]))),
            "stream_handle": timed(lambda i: cache.stream_handle()),
            "numpy zeros+bincount": timed(lambda i: np.bincount(experts.ravel(), minlength=E + 1)),
        }
    for k, v in results.items():
        print(f"{k:45s} {v:8.1f} us/call")


if __name__ == "__main__":
    main()
