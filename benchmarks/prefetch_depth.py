"""How far ahead the link works: at each decode layer visit (batch 1), the state of the copies of the
experts the plan forecasts for this visit and the next two, averaged over the visits of a run:
landed, on their way (some bytes handed to the link), queued (none yet), or not admitted (no slot
the cache would give them yet: every candidate victim is needed sooner, or the CPU computes them).
A link held back by admission, not by its bandwidth, shows many "not admitted" a visit or two
ahead. Runs the expertflow policy with a forecast that names uses (the trace's true future),
with GPU-only offload and with `auto`, at each slot count; each row is a bench row plus its
``ahead`` table ``[visit offset][landed, started, queued, not admitted]``.

    python benchmarks/prefetch_depth.py --routing trace:TRACES/mixtral-8x7b-instruct.gsm8k.jsonl \\
        --slots 16,32 --out benchmarks/results/prefetch_depth_h200.json
"""

from __future__ import annotations

import collections
import json

import bench_cli
import numpy as np

from expertflow import offload
from expertflow.bench.harness import BenchConfig, run_bench
from expertflow.runtime import ExpertCache

AHEAD = 3  # this visit and the next two


def main() -> None:
    parser = bench_cli.parser(__doc__, slots="16,32", new_tokens=16)
    parser.add_argument("--predictor", default="oracle")
    args = parser.parse_args()
    visits: dict[tuple[str, int], list[list[list[int]]]] = collections.defaultdict(list)
    run_layer, apply = offload.OffloadEngine._run_layer, ExpertCache.apply

    def recording_apply(self, plan):
        self.last_plan = plan  # the plan this cache applied last
        return apply(self, plan)

    def recording_run_layer(self, module, hidden_states, routing, weights):
        plan = getattr(self.cache, "last_plan", None)
        if plan is not None and plan.next_use is not None and routing.shape[0] == 1:  # decode, batch 1
            L = self.num_layers
            visit = (self.steps - 1) * L + module.layer
            states = []
            for ahead in range(AHEAD):
                layer = (visit + ahead) % L
                with np.errstate(invalid="ignore"):
                    experts = np.flatnonzero(plan.next_use[layer] == visit + ahead).tolist()
                unsent = np.asarray(self.cache.bytes_to_submit(layer, experts) if experts else [], dtype=np.int64)
                full = self.pool.expert_bytes(layer)
                states.append([int(np.sum(unsent == 0)), int(np.sum((unsent > 0) & (unsent < full))),
                               int(np.sum(unsent == full)), int(np.sum(unsent < 0))])
            mode = "auto" if self.cost_model is not None else "off"
            visits[(mode, self.cache.num_slots)].append(states)
        return run_layer(self, module, hidden_states, routing, weights)

    offload.OffloadEngine._run_layer = recording_run_layer  # type: ignore[method-assign]
    ExpertCache.apply = recording_apply  # type: ignore[method-assign]
    try:
        cfg = BenchConfig(arch=args.arch, layers=args.layers, routing=args.routing, slots=args.slots.split(","),
                          policies=["expertflow"], predictors=[args.predictor], cpu_experts=["off", "auto"],
                          new_tokens=args.new_tokens, cuda_graphs=args.cuda_graphs)
        result = run_bench(cfg)
    finally:
        offload.OffloadEngine._run_layer = run_layer  # type: ignore[method-assign]
        ExpertCache.apply = apply  # type: ignore[method-assign]
    rows = []
    for r in result["rows"]:
        if r["policy"] != "expertflow":
            continue
        states = np.asarray(visits[(r["cpu_experts"], r["num_slots"])], dtype=np.float64)
        r = {**r, "ahead": states.mean(axis=0).round(3).tolist() if states.size else None}
        rows.append(r)
        print(f"{r['slots']:>4} {r['cpu_experts']:4s} {r['ms_per_token']:.2f} ms/token; per visit ahead "
              f"[landed, started, queued, not admitted]: {r['ahead']}")
    command = bench_cli.command(__file__, args)
    args.out.write_text(json.dumps({"command": command, "machine": result["machine"], "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
