"""cProfile of the timed run of all_gpu and lru (16 slots) with enable_cuda_graphs: where the launching thread spends a decode step."""
import cProfile
import io
import pstats

import torch

from expertflow.bench.harness import BenchConfig, BenchModel, TraceForcing, _checked_device, _timed, enable_cuda_graphs
from expertflow.loader import attach
from expertflow.oracles import TraceSchedule

cfg = BenchConfig(arch="mixtral-8x7b", layers=8, routing="trace:.data/mixtral-8x7b-instruct.gsm8k.jsonl", slots=["16"],
                  policies=["all_gpu"], new_tokens=32, cuda_graphs=True, progress=False, transformers=False)
backend, device = _checked_device(cfg)
m = BenchModel(cfg, device, backend)
enable_cuda_graphs(m.model)
g = torch.Generator().manual_seed(0)
prompt = torch.randint(1, m.model.config.vocab_size, (1, 16), generator=g).to(device)
schedule = TraceSchedule(m.trace, m.num_layers, cfg.new_tokens, [0], 16)
forcing = TraceForcing(schedule, device)
forcing.attach(m.model, m.arch)
for policy, slots in (("all_gpu", 64), ("lru", 16)):
    engine = attach(m.model, m.arch, m.pool, slots, policy, owns_pool=False)
    _timed(m.model, prompt, 32, forcing, device)
    _timed(m.model, prompt, 32, forcing, device)
    pr = cProfile.Profile()
    pr.enable()
    tokens, steps = _timed(m.model, prompt, 32, forcing, device)
    pr.disable()
    steps.sort()
    print(policy, f"median step {steps[len(steps) // 2]:.2f} ms", flush=True)
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(35)
    print(s.getvalue()[:9000])
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("cumtime").print_stats(30)
    print(s.getvalue()[:7000])
    engine.close()
