"""How long the routing-path predictor takes per decode step, against the decode step itself.

1. The bundled model on the GPU with the ``expertflow`` policy and its trained predictor, a quarter
   of its experts in slots: median ms per decoded token, and the time of each step-start planning
   (predictor forward, plan, prefetch call) and of the predictor's forward alone.
2. A predictor shaped for Mixtral-8x7B (32 layers x 8 experts, 4096-dim embeddings; timing does not
   depend on the weights), batch 1: its forward time, against the Mixtral-8x7B-shaped decode step
   measured by ``benchmarks/offload_decode.py`` (4 layers; a 32-layer step is longer still).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import expertflow as ef
from expertflow.cli import BUNDLED_MODEL, BUNDLED_PREDICTOR
from expertflow.predictor import PredictorConfig, RoutingPathPredictor
from offload_decode import decode_ms  # benchmarks/ is the script's folder, so it is on sys.path


def cuda_ms(fn, reps: int = 1000) -> float:
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/predictor_time_h200.json")
    ap.add_argument("--decode-json", default="benchmarks/results/offload_decode_h200.json")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a GPU"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(BUNDLED_MODEL)
    model = ef.from_pretrained(BUNDLED_MODEL, policy="expertflow", predictor=BUNDLED_PREDICTOR, expert_slots="25%", progress=False)
    policy = model.expertflow.policy
    step_times: list[float] = []
    original = policy._on_step

    def timed(*a):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        original(*a)
        torch.cuda.synchronize()
        step_times.append((time.perf_counter() - t0) * 1e3)

    policy.detach()  # re-register the step hook through the timer
    policy._hook = model.get_input_embeddings().register_forward_hook(timed)
    ids = tokenizer("The json module", return_tensors="pt")["input_ids"].cuda()

    decode = decode_ms(model, ids, new_tokens=64, reps=5)
    step_times.clear()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=0)
    planning = statistics.median(step_times[1:])  # the first step is the prompt's
    p = policy.predictor
    c = p.config
    emb = torch.randn(1, c.embed_dim, device="cuda")
    pos = torch.tensor([17], device="cuda")
    prev = torch.zeros(1, c.num_layers * c.num_experts, device="cuda")
    with torch.no_grad():
        forward = cuda_ms(lambda: p(emb, pos, prev))
    model.expertflow.close()

    big = RoutingPathPredictor(PredictorConfig(num_layers=32, num_experts=8, top_k=2, embed_dim=4096, hidden=256)).cuda().eval()
    emb = torch.randn(1, 4096, device="cuda")
    prev = torch.zeros(1, 32 * 8, device="cuda")
    with torch.no_grad():
        big_forward = cuda_ms(lambda: big(emb, pos, prev))
    decode_json = Path(args.decode_json)
    mixtral_step = None
    if decode_json.exists():
        rows = json.loads(decode_json.read_text())["policies"]
        mixtral_step = min(r["ms_per_token"] for r in rows if r["policy"] != "all_gpu")
    result = {
        "device": torch.cuda.get_device_name(),
        "bundled": {"decode_ms_per_token": decode, "step_planning_ms": planning, "predictor_forward_ms": forward,
                    "planning_share": planning / decode, "forward_share": forward / decode,
                    "predictor_params": sum(t.numel() for t in p.parameters())},
        "mixtral_8x7b_shape": {"predictor_forward_ms": big_forward, "predictor_params": sum(t.numel() for t in big.parameters()),
                               "decode_ms_per_token_4_layers": mixtral_step,
                               "forward_share": big_forward / mixtral_step if mixtral_step else None,
                               "expert_bytes_share": sum(t.numel() for t in big.parameters()) * 2 / (32 * 8 * 352321536)},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
