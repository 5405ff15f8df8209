"""What expanding compressed experts costs a decode step: the same trace-forced benchmark run as
shipped and with the expansion taken out (each expert's dense weights left as they are in the
scratch buffers, no kernel and no host work), ``--rounds`` times on one model in one process, the
order of the two alternating from round to round. Routing is forced from the trace, so both runs copy the same experts
at the same moments, and the difference in median ms/token is the expansion's cost on the step,
copies overlapping it included. (The ablated runs' tokens are meaningless; only their timing is kept.)

    python benchmarks/expand_cost.py --arch mixtral-8x7b --expert-dtype fp8 --slots 11,31 --rounds 3 \\
        --routing trace:TRACES/mixtral-8x7b-instruct.gsm8k.jsonl --out benchmarks/results/expand-cost-mixtral-fp8-h200.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from tqdm import tqdm

from expertflow.bench.harness import BenchConfig, build_model, run_bench
from expertflow.formats import ExpertFormat, SlotExpander


class _Unexpanded:
    """Takes the expansion out: both paths hand back dense buffers of the right shape, unwritten."""

    def __init__(self) -> None:
        self.buffers: dict = {}
        self.saved = (ExpertFormat.expand, SlotExpander.__call__)

    def __enter__(self) -> None:
        buffers = self.buffers

        def expand(fmt, weight, stored, dtype):
            device = next(iter(stored.values())).device
            key = (weight.name, weight.shape, dtype, device)
            if key not in buffers:
                buffers[key] = torch.empty(weight.shape, dtype=dtype, device=device)
            return buffers[key]

        def call(expander, slot_address, stream, slot_tensors):
            return {**expander.dense, **{b: slot_tensors[b] for b in expander.biases}}

        ExpertFormat.expand, SlotExpander.__call__ = expand, call  # type: ignore[method-assign]

    def __exit__(self, *exc) -> None:
        ExpertFormat.expand, SlotExpander.__call__ = self.saved  # type: ignore[method-assign]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="mixtral-8x7b")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--routing", required=True)
    p.add_argument("--slots", default="11,31")
    p.add_argument("--policies", default="all_gpu,lru,expertflow")
    p.add_argument("--expert-dtype", default="fp8")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    cfg = BenchConfig(arch=args.arch, layers=args.layers, routing=args.routing, slots=args.slots.split(","),
                      policies=args.policies.split(","), expert_dtype=args.expert_dtype, transformers=False,
                      progress=False)
    model = build_model(cfg)
    shipped: list[dict] = []
    ablated: list[dict] = []
    try:
        for r in tqdm(range(args.rounds), desc="rounds"):
            for ablate in ((False, True) if r % 2 == 0 else (True, False)):  # either order as often
                if ablate:
                    with _Unexpanded():
                        ablated.append(run_bench(cfg, model))
                else:
                    shipped.append(run_bench(cfg, model))
    finally:
        model.pool.close()
    rows = []
    for i, first in enumerate(shipped[0]["rows"]):
        with_ms = [r["rows"][i]["ms_per_token"] for r in shipped]
        without_ms = [r["rows"][i]["ms_per_token"] for r in ablated]
        rows.append({"policy": first["policy"], "slots": first["slots"],
                     "ms_per_token": statistics.median(with_ms), "ms_per_token_unexpanded": statistics.median(without_ms),
                     "expansion_share": 1 - statistics.median(without_ms) / statistics.median(with_ms),
                     "ms_per_token_rounds": with_ms, "ms_per_token_unexpanded_rounds": without_ms,
                     "bytes_per_token": first["bytes_per_token"],
                     "same_bytes": all(r["rows"][i]["bytes_per_token"] == first["bytes_per_token"] for r in shipped + ablated)})
        print(json.dumps(rows[-1]), flush=True)
    result = {"arch": args.arch, "layers": args.layers, "expert_dtype": args.expert_dtype, "routing": args.routing,
              "rounds": args.rounds, "machine": shipped[0].get("machine"), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
