"""all_gpu and lru against transformers, with and without enable_cuda_graphs, on the Mixtral trace
(8 layers, 16 slots, 32 tokens, one process, a GPU machine); with graphs, the compiled graphs run per
decode step (every generation of the run counted: warm-ups, timed runs and transformers').

    python3 benchmarks/cuda_graphs_probe.py --routing trace:TRACES/mixtral-8x7b-instruct.gsm8k.jsonl \
        --out benchmarks/results/cuda_graphs_probe_h200.json
"""
import argparse
import json
import time

import torch
import torch._inductor.output_code as output_code
from torch._dynamo.utils import counters

from expertflow.bench.harness import BenchConfig, run_bench

calls = [0]
call = output_code.CompiledFxGraph.__call__


def counting(self, *args, **kwargs):
    calls[0] += 1
    return call(self, *args, **kwargs)


output_code.CompiledFxGraph.__call__ = counting
parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--routing", required=True, help="trace:FILE")
parser.add_argument("--out", required=True)
args = parser.parse_args()
out: dict = {"command": "python3 benchmarks/cuda_graphs_probe.py --routing " + args.routing + " --out " + args.out,
             "torch": torch.__version__, "nested_graph_breaks": "nested_graph_breaks" in torch._dynamo.config._config,
             "runs": []}
for graphs in (False, True):
    cfg = BenchConfig(arch="mixtral-8x7b", layers=8, routing=args.routing, slots=["16"],
                      policies=["all_gpu", "lru"], new_tokens=32, cuda_graphs=graphs, progress=False)
    start, calls[0] = time.time(), 0
    res = run_bench(cfg)
    # each configuration generates twice (warm-up, timed) and the transformers row twice: 6 runs of 31 decode steps
    print("graphs", graphs, f"wall {time.time() - start:.1f}", "transformers", res.get("transformers", {}).get("ms_per_token"),
          [(r["policy"], round(r["ms_per_token"], 2)) for r in res["rows"]], dict(counters["stats"]),
          "graph calls per decode step", calls[0] / (6 * 31), flush=True)
    out["runs"].append({"cuda_graphs": graphs, "transformers_ms": res.get("transformers", {}).get("ms_per_token"),
                        "ms_per_token": {r["policy"]: r["ms_per_token"] for r in res["rows"]},
                        "graph_calls_per_decode_step": calls[0] / (6 * 31)})
with open(args.out, "w") as f:
    json.dump(out, f, indent=1)
