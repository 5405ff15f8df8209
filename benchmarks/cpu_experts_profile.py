"""Where a decode step's time goes, with CPU experts off and on: the GPU's idle time split by what
the launching thread was doing then, from torch's profiler.

Each configuration (forecast, slots, mode) runs as a bench configuration (``expertflow.bench``);
its timed run is profiled, each engine stage marked (``ef::layer``, ``ef::decide``, ``ef::apply``,
``ef::acquire``, ``ef::backfill``, ``ef::cpu_wait``, ``ef::on_step``) and each forward pass
(``ef::step``). Per decode step (the prompt's pass and the last step left out):

- ``wall_ms``: the pass, by the launching thread's clock;
- ``kernel_ms``: the union of the GPU's kernels (any stream); ``h2d_ms``: of its host-to-device copies;
- ``idle_ms``: the pass less ``kernel_ms``, split by what the launching thread was in at each idle
  stretch's middle (``idle_by``): the innermost ``ef::`` stage, a host sync (``sync``: it waits for
  the GPU, which waits for a copy or runs launched work), or ``launch`` (the model's own code);
- ``host_ms``: each stage's time on the launching thread, nested stages counted in each.

Rounds interleave the modes (every other round reversed). Writes ``profile_summary.json`` and the
traces (``traces.tar.gz``) to ``--out``.

    python benchmarks/cpu_experts_profile.py --routing trace:TRACES/mixtral-8x7b-instruct.gsm8k.jsonl \\
        --predictors noisy-oracle:0.8 --slots 16,32 --new-tokens 32 --rounds 2 --out /tmp/profile
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import itertools
import json
import statistics
import tarfile
from pathlib import Path

import bench_cli
import numpy as np
import torch
from tqdm import tqdm

from expertflow.bench.harness import BenchConfig, TraceForcing, build_model, run_bench
from expertflow.offload import OffloadEngine
from expertflow.runtime import ExpertCache

STAGES = {  # (class, method) -> label
    (OffloadEngine, "_run_layer"): "ef::layer",
    (OffloadEngine, "_submit_cpu_experts"): "ef::decide",
    (OffloadEngine, "_apply"): "ef::apply",
    (OffloadEngine, "_on_step"): "ef::on_step",
    (ExpertCache, "acquire_slots"): "ef::acquire",
    (ExpertCache, "backfill"): "ef::backfill",
    (concurrent.futures.Future, "result"): "ef::cpu_wait",
}
SYNCS = ("cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize", "cudaMemcpy", "cudaMemcpyAsync")


def annotate() -> None:
    for (cls, name), label in STAGES.items():
        method = getattr(cls, name)

        @functools.wraps(method)
        def marked(*args, __method=method, __label=label, **kwargs):
            with torch.profiler.record_function(__label):
                return __method(*args, **kwargs)

        setattr(cls, name, marked)


class StepProfiler:
    """Profiles each timed run (the reset with an ``on_step``) of a TraceForcing, one pass a range."""

    def __init__(self) -> None:
        self.profile: torch.profiler.profile | None = None
        self.range: torch.profiler.record_function | None = None
        reset, pre = TraceForcing.reset, TraceForcing._pre
        tracker = self

        def patched_reset(forcing, on_step=None):
            tracker.stop()
            if on_step is not None:
                tracker.start()
            reset(forcing, on_step)

        def patched_pre(forcing, module, inputs):
            if tracker.profile is not None:
                if tracker.range is not None:
                    tracker.range.__exit__(None, None, None)
                tracker.range = torch.profiler.record_function(f"ef::step{len(forcing.times)}")
                tracker.range.__enter__()
            pre(forcing, module, inputs)

        TraceForcing.reset, TraceForcing._pre = patched_reset, patched_pre  # type: ignore[method-assign]

    def start(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profile = torch.profiler.profile(activities=activities)
        self.profile.start()

    def stop(self) -> torch.profiler.profile | None:
        if self.range is not None:
            self.range.__exit__(None, None, None)
            self.range = None
        done, self.profile = self.profile, None
        if done is not None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            done.stop()
        return done


def union_ms(intervals: list[tuple[float, float]], lo: float, hi: float) -> tuple[float, list[tuple[float, float]]]:
    """The union's length of ``intervals`` (µs) clipped to [lo, hi], in ms, and its complement's stretches."""
    clipped = sorted((max(a, lo), min(b, hi)) for a, b in intervals if b > lo and a < hi)
    busy, gaps, cursor = 0.0, [], lo
    for a, b in clipped:
        if a > cursor:
            gaps.append((cursor, a))
        if b > cursor:
            busy += b - max(a, cursor)
            cursor = b
    if cursor < hi:
        gaps.append((cursor, hi))
    return busy / 1e3, gaps


def state(inside: list[dict], at: float) -> str:
    """What the launching thread is in at ``at`` (µs): a host sync, else the innermost stage, else
    ``launch`` (the model's own code)."""
    active = [e for e in inside if e["ts"] <= at < e["ts"] + e["dur"]]
    if any(e.get("cat") == "cuda_runtime" for e in active):
        return "sync"
    stages = [e for e in active if e["name"] != "ef::layer"]
    if stages:
        return max(stages, key=lambda e: e["ts"])["name"]
    return "ef::layer" if active else "launch"


def summarise(trace: dict) -> dict:
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    steps = sorted((e for e in events if e["name"].startswith("ef::step") and e.get("cat") == "user_annotation"),
                   key=lambda e: e["ts"])  # the launching thread's ranges, not their copies on the GPU's timeline
    main_tid = steps[0]["tid"] if steps else None
    kernels = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "kernel"]
    h2d = [(e["ts"], e["ts"] + e["dur"]) for e in events
           if e.get("cat") == "gpu_memcpy" and "HtoD" in e["name"]]
    host = [e for e in events if e.get("tid") == main_tid and (
        (e.get("cat") == "user_annotation" and e["name"].startswith("ef::") and not e["name"].startswith("ef::step"))
        or (e.get("cat") == "cuda_runtime" and e["name"] in SYNCS))]
    starts = np.array([e["ts"] for e in host])
    per_step = []
    for step in steps[1:-1]:  # decode passes with one after them
        lo, hi = step["ts"], step["ts"] + step["dur"]
        kernel_ms, gaps = union_ms(kernels, lo, hi)
        h2d_ms, _ = union_ms(h2d, lo, hi)
        inside = [host[i] for i in np.flatnonzero((starts >= lo) & (starts < hi))]
        host_ms: dict[str, float] = {}
        for e in inside:
            key = "sync" if e.get("cat") == "cuda_runtime" else e["name"]
            host_ms[key] = host_ms.get(key, 0.0) + e["dur"] / 1e3
        idle_by: dict[str, float] = {}
        for a, b in gaps:  # each idle stretch cut where the launching thread's state changes
            cuts = sorted({a, b, *(t for e in inside for t in (e["ts"], e["ts"] + e["dur"]) if a < t < b)})
            for c, d in itertools.pairwise(cuts):
                key = state(inside, (c + d) / 2)
                idle_by[key] = idle_by.get(key, 0.0) + (d - c) / 1e3
        per_step.append({"wall_ms": (hi - lo) / 1e3, "kernel_ms": kernel_ms, "h2d_ms": h2d_ms,
                         "idle_ms": (hi - lo) / 1e3 - kernel_ms, "idle_by": idle_by, "host_ms": host_ms})

    def mean(get) -> float:
        return statistics.fmean(get(s) for s in per_step) if per_step else 0.0

    keys = sorted({k for s in per_step for k in s["idle_by"]})
    host_keys = sorted({k for s in per_step for k in s["host_ms"]})
    return {"num_steps": len(per_step),
            "wall_ms": mean(lambda s: s["wall_ms"]), "wall_ms_median": statistics.median(s["wall_ms"] for s in per_step),
            "kernel_ms": mean(lambda s: s["kernel_ms"]), "h2d_ms": mean(lambda s: s["h2d_ms"]),
            "idle_ms": mean(lambda s: s["idle_ms"]),
            "idle_by": {k: mean(lambda s, k=k: s["idle_by"].get(k, 0.0)) for k in keys},
            "host_ms": {k: mean(lambda s, k=k: s["host_ms"].get(k, 0.0)) for k in host_keys},
            "steps": per_step}


def main() -> None:
    parser = bench_cli.parser(__doc__, slots="16,32", new_tokens=32)
    parser.add_argument("--predictors", default="noisy-oracle:0.8")
    parser.add_argument("--modes", default="off,auto")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--trace-rounds", type=int, default=1, help="rounds whose traces are kept")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    modes = args.modes.split(",")
    cfg = BenchConfig(arch=args.arch, layers=args.layers, routing=args.routing, slots=args.slots.split(","),
                      policies=["expertflow"], predictors=args.predictors.split(","), cpu_experts=modes,
                      new_tokens=args.new_tokens, cuda_graphs=args.cuda_graphs, progress=False)
    model = build_model(cfg)
    annotate()
    profiler = StepProfiler()
    command = bench_cli.command(__file__, args)
    rows: list[dict] = []
    traces: list[Path] = []
    order = [(r, p, s, m) for r in range(args.rounds) for p in cfg.predictors for s in cfg.slots
             for m in (modes if r % 2 == 0 else modes[::-1])]
    try:
        for rnd, predictor, slots, mode in tqdm(order, desc="profile"):
            result = run_bench(dataclasses.replace(cfg, slots=[slots], predictors=[predictor], cpu_experts=[mode]), model)
            done = profiler.stop()
            assert done is not None
            name = f"trace_{rnd}_{predictor.replace(':', '-')}_{slots.replace('%', 'pct')}_{mode}.json"
            path = args.out / name
            done.export_chrome_trace(str(path))
            summary = summarise(json.loads(path.read_text()))
            if rnd < args.trace_rounds:
                traces.append(path)
            else:
                path.unlink()
            row = next(r for r in result["rows"] if r["policy"] == "expertflow")
            rows.append({"round": rnd, "predictor": predictor, "slots": slots, "mode": mode,
                         "ms_per_token": row["ms_per_token"], "ms_per_token_mean": row["ms_per_token_mean"],
                         "cpu_experts_per_token": row["cpu_experts_per_token"],
                         "demand_misses_per_token": row["demand_misses_per_token"],
                         "bytes_per_token": row["bytes_per_token"], "stall_share": row["stall_share"],
                         "cpu_wait_ms_per_token": row["cpu_wait_ms_per_token"], **summary})
            idle = " ".join(f"{k.removeprefix('ef::')} {v:.2f}" for k, v in summary["idle_by"].items())
            tqdm.write(f"{rnd} {predictor} {slots:>4} {mode:5s} wall {summary['wall_ms']:.2f} kernels "
                       f"{summary['kernel_ms']:.2f} h2d {summary['h2d_ms']:.2f} idle {summary['idle_ms']:.2f}: {idle}")
            (args.out / "profile_summary.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    finally:
        model.pool.close()
    with tarfile.open(args.out / "traces.tar.gz", "w:gz") as tar:
        for path in traces:
            tar.add(path, arcname=path.name)
            path.unlink()


if __name__ == "__main__":
    main()
