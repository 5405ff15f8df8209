"""Decode speed of every offload policy on a Mixtral-8x7B-shaped model, beside HF accelerate offload.

The model has Mixtral-8x7B's real dimensions (hidden 4096, expert FFN 14336, 8 experts, top-2, 32
heads, 8 KV heads) and ``--layers`` layers with random bf16 weights. Experts are generated on the GPU
and copied into the pinned pool (initialising ~11 GB on the CPU takes minutes). Every ExpertFlow policy
runs at ``--gpu-memory`` (default 4 GiB: a quarter of the experts of 4 layers); accelerate runs the
same model with ``device_map`` offload at the same budget. Reports ms per decoded token (the median
difference between generating N and 1 new tokens), tokens/s, hit ratio and bytes copied per token,
and the all-miss pinned-copy floor. Writes JSON and a PNG next to it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import expertflow as ef
from expertflow.loader import attach, offloaded_experts, parse_bytes, plan_slots
from expertflow.models import architecture_for
from expertflow.policies import POLICY_NAMES


def mixtral_config(layers: int):
    from transformers import MixtralConfig

    return MixtralConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
        num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
        max_position_embeddings=4096, rope_theta=1e6, dtype="bfloat16",
    )


def decode_ms(model, prompt: torch.Tensor, new_tokens: int, reps: int) -> float:
    def run(n: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    run(2)  # warm-up
    samples = []
    for _ in range(reps):
        samples.append((run(new_tokens) - run(1)) / (new_tokens - 1) * 1e3)
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--gpu-memory", default="4GiB")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--accelerate-tokens", type=int, default=3)
    ap.add_argument("--policies", default=",".join(POLICY_NAMES))
    ap.add_argument("--out", default="benchmarks/results/offload_decode_h200.json")
    args = ap.parse_args()
    assert torch.cuda.is_available() and ef.get_backend().name == "cuda", "needs a GPU and the CUDA backend"
    torch.manual_seed(0)
    config = mixtral_config(args.layers)
    arch = architecture_for("mixtral")
    budget = parse_bytes(args.gpu_memory)
    prompt = torch.randint(0, config.vocab_size, (1, 16), device="cuda")

    # ExpertFlow: non-expert weights built on the GPU, experts generated on the GPU into the pinned pool.
    with offloaded_experts(arch), torch.device("cuda"):
        from transformers import MixtralForCausalLM

        model = MixtralForCausalLM(config).to(torch.bfloat16).eval()
    pool = ef.ExpertPool.uniform(args.layers, 8, arch.pool_tensors(config, torch.bfloat16))
    for layer in range(args.layers):
        for expert in range(8):
            for view in pool.expert(layer, expert).values():
                view.copy_(torch.randn(view.shape, device="cuda", dtype=torch.bfloat16) * 0.02)
    expert_bytes = pool.expert_bytes(0)
    floor_ms = args.layers * 2 * expert_bytes / 55.2e9 * 1e3
    result = {
        "device": torch.cuda.get_device_name(), "layers": args.layers, "gpu_memory": args.gpu_memory,
        "expert_mb": expert_bytes / 2**20, "pool_gb": pool.total_bytes / 1e9, "all_miss_floor_ms": floor_ms,
        "policies": [],
    }
    for policy in args.policies.split(","):
        num_slots = plan_slots(model, arch, config, args.layers, policy, budget)
        engine = attach(model, arch, pool, num_slots, policy, owns_pool=False)
        ms = decode_ms(model, prompt, args.new_tokens, args.reps)
        engine.reset_stats()
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
        s = engine.stats()
        row = {"policy": policy, "num_slots": num_slots, "ms_per_token": ms, "tokens_per_s": 1e3 / ms,
               "hit_ratio": s["hit_ratio"], "bytes_copied_per_generate": s["bytes_copied"],
               "stall_ms_per_generate": s["stall_ms"], "prefetch_hits": s["prefetch_hits"],
               "wasted_prefetches": s["wasted_prefetches"]}
        result["policies"].append(row)
        print(json.dumps(row), flush=True)
        engine.close()
    del model, pool
    torch.cuda.empty_cache()

    # HF accelerate device_map offload of the same model at the same budget.
    from accelerate import dispatch_model, infer_auto_device_map
    from transformers import MixtralForCausalLM

    with torch.device("cuda"):
        full = MixtralForCausalLM(config).to(torch.bfloat16).eval()
    full = full.to("cpu")
    torch.cuda.empty_cache()
    device_map = infer_auto_device_map(full, max_memory={0: budget, "cpu": 200 * 2**30},
                                       no_split_module_classes=full._no_split_modules, dtype=torch.bfloat16)
    full = dispatch_model(full, device_map=device_map)
    acc_ms = decode_ms(full, prompt, args.accelerate_tokens, 1)
    result["accelerate"] = {"ms_per_token": acc_ms, "tokens_per_s": 1e3 / acc_ms,
                            "device_map": {k: str(v) for k, v in device_map.items()}}
    for row in result["policies"]:
        row["speedup_vs_accelerate"] = acc_ms / row["ms_per_token"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["policy"] for r in result["policies"]] + ["accelerate"]
    values = [r["ms_per_token"] for r in result["policies"]] + [acc_ms]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh(names, values, color=["tab:blue"] * (len(names) - 1) + ["tab:gray"])
    ax.axvline(floor_ms, color="black", linestyle="--", label=f"all-miss copy floor {floor_ms:.0f} ms")
    ax.set_xscale("log")
    ax.set_xlabel("ms per decoded token (log scale)")
    ax.set_title(f"Mixtral-8x7B-shaped, {args.layers} layers, {args.gpu_memory} budget, {result['device']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)

    print(f"accelerate: {acc_ms:.0f} ms/token; all-miss floor {floor_ms:.1f} ms/token")
    for r in result["policies"]:
        print(f"{r['policy']:>20}: {r['ms_per_token']:8.1f} ms/token {r['tokens_per_s']:6.1f} tok/s  hit {r['hit_ratio']:.1%}  "
              f"{r['speedup_vs_accelerate']:5.1f}x accelerate")


if __name__ == "__main__":
    main()
