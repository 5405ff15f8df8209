"""Planning overhead: policies with every expert in a slot, measured in alternation, against all_gpu.

With every expert resident nothing is copied, so any difference from ``all_gpu`` is the policy's
host work. The configurations run round-robin ``--rounds`` times on one model (trace-forced
Mixtral-8x7B shape, ``--layers`` layers, batch 1); each round is a warm-up and a measured generation
of ``--new-tokens``; reported: each policy's median ms/token over its rounds (each round's figure the
median of its decode steps) and the ratio to all_gpu. ``--profile`` adds a cProfile of one more round.

    python3 benchmarks/planning_overhead.py --trace TRACE --out benchmarks/results/planning_overhead_h200.json
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
from pathlib import Path

import torch

from expertflow.bench.harness import BenchConfig, TraceForcing, _policy, _timed, build_model
from expertflow.loader import attach
from expertflow.oracles import TraceSchedule


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", required=True)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--configs", default="all_gpu:-,lru:-,expertflow:history,expertflow:oracle,expertflow:gate-oracle:0.8")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if "all_gpu:-" not in args.configs.split(","):
        ap.error("--configs must include all_gpu:-, the baseline every other configuration is compared with")
    cfg = BenchConfig(arch="mixtral-8x7b", layers=args.layers, routing=f"trace:{args.trace}", transformers=False,
                      new_tokens=args.new_tokens, progress=False)
    m = build_model(cfg)
    device = m.device
    prompt = torch.randint(1, 1000, (1, 16), device=device, generator=None)
    assert m.trace is not None  # read once, by the model
    schedule = TraceSchedule(m.trace, m.num_layers, args.new_tokens, [0], prompt.shape[1])
    forcing = TraceForcing(schedule, device)
    forcing.attach(m.model, m.arch)
    slots = m.num_layers * m.num_experts
    configs = [tuple(item.split(":", 1)) for item in args.configs.split(",")]
    rounds: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name, spec in configs:
            policy, label = _policy(name, None if spec == "-" else spec, cfg, schedule)
            engine = attach(m.model, m.arch, m.pool, slots, policy, owns_pool=False)
            try:
                _timed(m.model, prompt, args.new_tokens, forcing, device)
                _, steps = _timed(m.model, prompt, args.new_tokens, forcing, device)
            finally:
                engine.close()
            rounds.setdefault(f"{name} ({label})" if label else name, []).append(statistics.median(steps))
    base = statistics.median(rounds["all_gpu"])
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "layers": m.num_layers,
              "new_tokens": args.new_tokens, "rounds": args.rounds, "ms_per_token": rounds,
              "median_ms": {k: statistics.median(v) for k, v in rounds.items()},
              "vs_all_gpu": {k: statistics.median(v) / base for k, v in rounds.items()}}
    for k, v in rounds.items():
        print(f"{k:35s} median {statistics.median(v):7.2f} ms/token  x all_gpu {statistics.median(v) / base:5.3f}  "
              f"rounds {' '.join(f'{x:.2f}' for x in v)}")
    if args.profile:
        for name, spec in configs[1:]:
            policy, label = _policy(name, None if spec == "-" else spec, cfg, schedule)
            engine = attach(m.model, m.arch, m.pool, slots, policy, owns_pool=False)
            prof = cProfile.Profile()
            try:
                _timed(m.model, prompt, args.new_tokens, forcing, device)
                prof.enable()
                _timed(m.model, prompt, args.new_tokens, forcing, device)
                prof.disable()
            finally:
                engine.close()
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(12)
            print(f"--- {name} {label}\n" + out.getvalue())
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    m.pool.close()


if __name__ == "__main__":
    main()
