"""How fast can CPU experts make batch-1 decoding, at best, for a given CPU time per expert?

At batch 1 a step is each layer's compute plus its misses: with GPU-only offload the misses of a
layer are copied one after another (the history forecast prefetches nothing). With CPU experts a
layer's misses split between the link and the CPU, which run at once, so the layer waits for the
slower of the two. This replays a routing trace through per-layer LRU caches (the ``lru`` policy's
slots, split evenly over the layers) to count each layer's misses, and reports, for CPU times per
expert from ``--cpu-ms``, the best split's speed-up over GPU-only:

    GPU only:  sum over layers of  compute + misses x copy
    two pipes: sum over layers of  compute + min over k of max(k x copy, (misses - k) x cpu)

It is an upper bound for ``cpu_experts="auto"``: the split is the best one for each layer, and
nothing else (host syncs, the CPU's start) is counted. Inputs default to the H200 machine's
Mixtral-8x7B figures (docs/cpu_experts.md): a copy 6.47 ms, a layer's compute 2.0 ms (a resident
step of 8 layers, about 16 ms); CPU times of the native kernel (2.9 ms alone, about 3.5 inside
steps) and of torch's (5.8 ms from a warm cache, 7.4 and 10 from memory and inside steps).

    python benchmarks/cpu_experts_bound.py --trace TRACES/mixtral-8x7b-instruct.gsm8k.jsonl \\
        --cpu-ms 2.9,3.5,5.8,7.4,10 --out benchmarks/results/cpu-experts-bound-mixtral.json
"""

from __future__ import annotations

import argparse
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np

from expertflow.traces import read_trace


def misses_per_layer(tokens, num_layers: int, num_slots: int) -> np.ndarray:
    """``[T, L]`` misses of each token at each of the first ``num_layers`` layers under per-layer LRU
    with ``num_slots`` split evenly (the first layers take the remainder). Each layer keeps at least
    one slot, so fewer slots than layers replay as one a layer: more hits than the engine gets
    there, where slot-less layers borrow."""
    quotas = [max(1, num_slots // num_layers + (1 if l < num_slots % num_layers else 0)) for l in range(num_layers)]
    caches: list[OrderedDict] = [OrderedDict() for _ in range(num_layers)]
    out = np.zeros((len(tokens), num_layers), dtype=np.int64)
    for t, token in enumerate(tokens):
        for layer, experts in token:
            if layer >= num_layers:
                continue
            cache = caches[layer]
            for e in experts:
                if e in cache:
                    cache.move_to_end(e)
                    continue
                out[t, layer] += 1
                cache[e] = True
                if len(cache) > quotas[layer]:
                    cache.popitem(last=False)
    return out


def best_layer_ms(misses: int, copy_ms: float, cpu_ms: float) -> float:
    return min(max(k * copy_ms, (misses - k) * cpu_ms) for k in range(misses + 1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trace", required=True)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--slots", default="6,16,32", help="slot counts (the bench's 10%%, 25%%, 50%% of 64 experts)")
    p.add_argument("--tokens", type=int, default=2000, help="tokens of the trace to replay (the first ones)")
    p.add_argument("--copy-ms", type=float, default=6.47)
    p.add_argument("--compute-ms", type=float, default=2.0, help="a layer's compute, experts resident")
    p.add_argument("--cpu-ms", default="2.9,3.5,5.8,7.4,10")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    slots = [int(s) for s in args.slots.split(",")]
    cpu_times = [float(c) for c in args.cpu_ms.split(",")]
    if args.layers < 1 or args.tokens < 1 or min(slots) < 1 or min(cpu_times) <= 0 or args.copy_ms <= 0:
        p.error("--layers, --tokens and --slots must be at least 1; --copy-ms and --cpu-ms must be positive")
    trace = read_trace(args.trace)
    if args.layers > trace.num_layers:
        p.error(f"the trace has {trace.num_layers} layers; --layers {args.layers} is more")
    tokens = trace.tokens[: args.tokens]
    rows = []
    for num_slots in slots:
        m = misses_per_layer(tokens, args.layers, num_slots)
        gpu_only = (args.compute_ms + m * args.copy_ms).sum(axis=1).mean()
        row = {"slots": num_slots, "misses_per_token": float(m.sum(axis=1).mean()),
               "layers_by_misses": {int(k): float(np.mean(m == k)) for k in np.unique(m)},
               "gpu_only_ms": float(gpu_only), "bound": {}}
        for cpu_ms in cpu_times:
            table = np.array([best_layer_ms(k, args.copy_ms, cpu_ms) for k in range(int(m.max()) + 1)])
            two_pipes = (args.compute_ms + table[m]).sum(axis=1).mean()
            row["bound"][str(cpu_ms)] = {"ms_per_token": float(two_pipes), "speedup": float(gpu_only / two_pipes)}
        rows.append(row)
        print(f"{num_slots} slots: {row['misses_per_token']:.2f} misses a token, GPU only {gpu_only:.1f} ms; "
              + ", ".join(f"CPU {c} ms: {v['speedup']:.2f}x" for c, v in row["bound"].items()), flush=True)
    result = {"trace": args.trace, "layers": args.layers, "tokens": len(tokens), "copy_ms": args.copy_ms,
              "compute_ms": args.compute_ms, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
