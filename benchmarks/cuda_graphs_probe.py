"""all_gpu and lru against transformers, with and without enable_cuda_graphs, on the Mixtral trace (8 layers, 16 slots, 32 tokens)."""
import inspect
import time

from torch._dynamo.utils import counters
from transformers import GenerationMixin

from expertflow.bench.harness import BenchConfig, run_bench

src = inspect.getsource(GenerationMixin._valid_auto_compile_criteria)
print(src[:3000])

for graphs in (False, True):
    cfg = BenchConfig(arch="mixtral-8x7b", layers=8, routing="trace:.data/mixtral-8x7b-instruct.gsm8k.jsonl", slots=["16"],
                      policies=["all_gpu", "lru"], new_tokens=32, cuda_graphs=graphs, progress=False)
    t = time.time()
    res = run_bench(cfg)
    print("graphs", graphs, "wall %.1f" % (time.time() - t), "transformers", res.get("transformers", {}).get("ms_per_token"),
          [(r["policy"], round(r["ms_per_token"], 2)) for r in res["rows"]], dict(counters["stats"]), flush=True)
    print({k[:80]: v for k, v in counters["graph_break"].items()})
