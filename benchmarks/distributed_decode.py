"""Decode throughput with the experts spread over the GPUs of one host, at a published model's
dimensions with routing forced from a real trace, at a fixed budget of slots per GPU.

Run it once per GPU count; each rank holds the same resident weights and its share of the experts
(``expertflow/distributed.py``), all ranks map one pool:

    torchrun --standalone --nproc-per-node 1 benchmarks/distributed_decode.py --out R/distributed-1gpu.json
    torchrun --standalone --nproc-per-node 2 benchmarks/distributed_decode.py --out R/distributed-2gpu.json
    python benchmarks/distributed_plot.py R/distributed-1gpu.json R/distributed-2gpu.json

Each configuration (batch, policy) is a warm-up generation and a measured one of the same routing;
ms per step is the median of the decode steps. With two or more ranks the script also times the
layer's combine (all_reduce of ``[T, k, hidden]``) against an all_gather of the same bytes, and a
copy of one expert from the other GPU (NVLink) against one from pinned host memory.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
from pathlib import Path

import torch

from expertflow.bench.harness import TraceForcing, _timed, pinned_bandwidth
from expertflow.bench.shapes import make_config
from expertflow.loader import attach, moe_layers, offloaded_experts
from expertflow.models import architecture_for
from expertflow.oracles import TraceSchedule
from expertflow.runtime import ExpertPool, backend_uses_gpu, get_backend
from expertflow.timing import median_ms
from expertflow.traces import read_trace
from expertflow.units import parse_slots


def _sync_all() -> None:
    for d in range(torch.cuda.device_count()):
        torch.cuda.synchronize(d)


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def _collectives(shard, hidden: int, top_k: int, device: torch.device) -> dict:
    """The combine at batch 1 and 8: all_reduce of [T, k, H] (what the engine does) against an
    all_gather of each rank's [T, k, H] share (what a dispatch-free gather would move)."""
    import torch.distributed as dist

    out = {}
    for tokens in (1, 8):
        x = torch.zeros(tokens, top_k, hidden, dtype=torch.bfloat16, device=device)
        gathered = torch.empty(shard.world_size * x.numel(), dtype=x.dtype, device=device)
        out[f"all_reduce_ms_T{tokens}"] = median_ms(lambda x=x: dist.all_reduce(x), 50, sync=_sync_all, warmup=5)
        out[f"all_gather_ms_T{tokens}"] = median_ms(lambda x=x, g=gathered: dist.all_gather_into_tensor(g, x.reshape(-1)), 50, sync=_sync_all, warmup=5)
    return out


def _peer_copy(expert_bytes: int, rank: int) -> dict:
    """One expert from the other GPU (NVLink, peer access) and from pinned host memory, on GPU 0."""
    if rank != 0 or torch.cuda.device_count() < 2:
        return {}
    src_peer = torch.empty(expert_bytes, dtype=torch.uint8, device="cuda:1")
    src_host = torch.empty(expert_bytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(expert_bytes, dtype=torch.uint8, device="cuda:0")
    peer = median_ms(lambda: dst.copy_(src_peer, non_blocking=True), 20, sync=_sync_all, warmup=5)
    host = median_ms(lambda: dst.copy_(src_host, non_blocking=True), 20, sync=_sync_all, warmup=5)
    return {"expert_from_peer_ms": peer, "expert_from_host_ms": host, "peer_gbps": expert_bytes / peer / 1e6,
            "host_gbps": expert_bytes / host / 1e6, "peer_access": torch.cuda.can_device_access_peer(0, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="mixtral-8x7b")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--trace", default="../shared/data/traces/mixtral-8x7b-instruct.gsm8k.jsonl")
    p.add_argument("--slots", default="25%", help="slots per GPU: a count or a share of all experts")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--policies", default="lru,expertflow")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--out", required=True)
    p.add_argument("--tiny", action="store_true", help="tiny dimensions, for a smoke test on the CPU")
    args = p.parse_args()
    if args.new_tokens < 2 or args.prompt_len < 1 or args.layers < 1:
        p.error("--new-tokens must be at least 2 (the first is the prompt's pass), --prompt-len and --layers at least 1")
    logging.getLogger("expertflow").setLevel(logging.WARNING)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_gpu = backend_uses_gpu()
    shard = None
    if world > 1:
        from expertflow.distributed import init_distributed

        shard, device = init_distributed(use_gpu)
    else:
        device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
    rank = shard.rank if shard is not None else 0
    if shard is not None:
        shard.barrier()
    available_before = _available_bytes()  # the host memory the pool takes, seen from rank 0
    backend = get_backend(None, device.index or 0)
    trace = read_trace(args.trace)
    tiny = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
    config = make_config(args.arch, args.layers, trace.max_experts_per_layer, tiny if args.tiny else None)
    arch = architecture_for(config.model_type)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)  # every rank: the same resident weights
    with torch.device(device), offloaded_experts(arch):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.02)
    layers = moe_layers(model, arch)
    num_experts, top_k = arch.dims(config)[:2]
    tensors = arch.pool_tensors(config, torch.bfloat16)
    if shard is None:
        pool = ExpertPool.uniform(len(layers), num_experts, tensors, backend=backend)
        owned = list(range(num_experts))
    else:
        from expertflow.distributed import open_shared_pool

        pool = open_shared_pool(shard, len(layers), num_experts, tensors, backend)
        owned = shard.owned_ids(num_experts)
    generator = torch.Generator(device=device)
    with torch.no_grad():
        for l in range(len(layers)):
            for e in owned:  # each rank writes its own experts, in parallel, seeded per expert
                generator.manual_seed(1 + l * num_experts + e)
                for view in pool.expert(l, e).values():
                    view.copy_(torch.randn(view.shape, generator=generator, device=device, dtype=view.dtype) * 0.02)
    if shard is not None:
        shard.barrier()
    host_bytes_used = available_before - _available_bytes()
    total = len(layers) * num_experts
    num_slots = min(parse_slots(args.slots, "--slots").count(total), len(layers) * len(owned))
    result: dict = {"arch": args.arch, "layers": len(layers), "world_size": world, "slots_per_gpu": args.slots,
                    "num_slots_per_gpu": num_slots, "expert_bytes": pool.expert_bytes(0), "pool_bytes": pool.total_bytes,
                    "host_bytes_used_by_model_and_pool": host_bytes_used,
                    "trace": args.trace, "new_tokens": args.new_tokens,
                    "device": torch.cuda.get_device_name(device) if use_gpu else "cpu",
                    "torch": torch.__version__, "pinned_gbps": pinned_bandwidth(device) / 1e9, "rows": []}
    for batch in [int(b) for b in args.batches.split(",")]:
        stride = max(1, trace.num_tokens // batch)
        schedule = TraceSchedule(trace, len(layers), args.new_tokens, [b * stride for b in range(batch)], args.prompt_len)
        forcing = TraceForcing(schedule, device)
        prompt = torch.randint(1, config.vocab_size, (batch, args.prompt_len), generator=torch.Generator().manual_seed(0)).to(device)
        for policy in args.policies.split(","):
            offload = attach(model, arch, pool, num_slots, policy, owns_pool=False, shard=shard)
            forcing.attach(model, arch)
            try:
                _timed(model, prompt, args.new_tokens, forcing, device)
                # counted from the first decode step, as bench counts them: the prompt's pass is not a token's
                tokens, steps_ms = _timed(model, prompt, args.new_tokens, forcing, device,
                                          on_step=lambda s, offload=offload: offload.reset_stats() if s == 1 else None)
                stats = offload.stats()
                if shard is not None:
                    from expertflow.distributed import gather_stats

                    stats = gather_stats(shard, stats)
            finally:
                forcing.detach()
                offload.close()
            ms = statistics.median(steps_ms)
            result["rows"].append({"batch": batch, "policy": policy, "ms_per_step": ms, "tokens_per_s": batch * 1e3 / ms,
                                   "bytes_per_token": stats["bytes_copied"] / (batch * (args.new_tokens - 1)),
                                   "hit_ratio": stats["hit_ratio"], "tokens": tokens,
                                   "computed_unowned": stats.get("computed_unowned", 0),
                                   "bytes_per_rank": [r["bytes_copied"] for r in stats.get("ranks", [stats])]})
            if rank == 0:
                print(json.dumps(result["rows"][-1]), flush=True)
    if shard is not None and use_gpu:
        result["collectives"] = _collectives(shard, config.hidden_size, top_k, device)
        result["copies"] = _peer_copy(pool.expert_bytes(0), rank)
        shard.barrier()
    if rank == 0:
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    pool.close()
    if shard is not None:
        import torch.distributed as dist

        dist.destroy_process_group()


if __name__ == "__main__":
    main()
