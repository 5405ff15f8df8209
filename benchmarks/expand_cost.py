"""What expanding compressed experts costs a decode step: the same trace-forced benchmark run twice
in one process, once as shipped and once with the expansion replaced by handing back an unwritten
buffer of the right shape (no kernel at all). Routing is forced from the trace, so both runs copy the
same experts at the same moments, and the difference in ms/token is the expansion's cost on the step,
copies overlapping it included. (The second run's tokens are meaningless; only its timing is kept.)

    python benchmarks/expand_cost.py --arch mixtral-8x7b --expert-dtype fp8 --slots 11,31 \\
        --routing trace:TRACES/mixtral-8x7b-instruct.gsm8k.jsonl --out benchmarks/results/expand-cost-mixtral-fp8-h200.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from expertflow.bench.harness import BenchConfig, run_bench
from expertflow.formats import ExpertFormat


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="mixtral-8x7b")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--routing", required=True)
    p.add_argument("--slots", default="11,31")
    p.add_argument("--policies", default="all_gpu,lru,expertflow")
    p.add_argument("--expert-dtype", default="fp8")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    cfg = BenchConfig(arch=args.arch, layers=args.layers, routing=args.routing, slots=args.slots.split(","),
                      policies=args.policies.split(","), expert_dtype=args.expert_dtype, transformers=False)
    cfg.validate()
    shipped = run_bench(cfg)
    buffers: dict = {}
    original = ExpertFormat.expand

    def unexpanded(self, weight, stored, dtype):
        device = next(iter(stored.values())).device
        key = (weight.name, weight.shape, dtype, device)
        if key not in buffers:
            buffers[key] = torch.empty(weight.shape, dtype=dtype, device=device)
        return buffers[key]

    ExpertFormat.expand = unexpanded  # type: ignore[method-assign]
    try:
        ablated = run_bench(cfg)
    finally:
        ExpertFormat.expand = original  # type: ignore[method-assign]
    rows = []
    for with_row, without_row in zip(shipped["rows"], ablated["rows"]):
        rows.append({"policy": with_row["policy"], "slots": with_row["slots"],
                     "ms_per_token": with_row["ms_per_token"], "ms_per_token_unexpanded": without_row["ms_per_token"],
                     "expansion_share": 1 - without_row["ms_per_token"] / with_row["ms_per_token"],
                     "bytes_per_token": with_row["bytes_per_token"],
                     "same_bytes": with_row["bytes_per_token"] == without_row["bytes_per_token"]})
        print(json.dumps(rows[-1]), flush=True)
    result = {"arch": args.arch, "layers": args.layers, "expert_dtype": args.expert_dtype, "routing": args.routing,
              "machine": shipped.get("machine"), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
