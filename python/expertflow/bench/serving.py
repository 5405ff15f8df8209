"""``expertflow bench-scheduler``: the token scheduler against first-come batching on one model.

Both schedules serve the same requests under the same policy and slots, from a fresh load each, all
submitted at once so every round regroups every running sequence. Reported per schedule: distinct
(layer, expert) pairs a decode batch activates (its actual routing), bytes copied per generated token,
tokens per second and the scheduler's own time.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..scheduler import SCHEDULES

__all__ = ["bench_scheduler", "format_scheduler_table"]


def bench_scheduler(
    model_path: str | Path,
    prompts: list[str],
    num_requests: int,
    batch_size: int,
    max_new_tokens: int = 32,
    policy: str = "lru",
    expert_slots: str = "25%",
    predictor: str | Path | None = None,
    dtype: str | None = None,
    progress: bool = True,
) -> dict:
    """``{schedule: {activated_pairs_per_batch, bytes_per_token, tokens_per_s, schedule_ms, ...}}``."""
    from transformers import AutoTokenizer

    from .. import from_pretrained
    from ..serving import Engine

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    texts = [prompts[i % len(prompts)] for i in range(num_requests)]
    ids = [tokenizer(t)["input_ids"] for t in texts]
    result: dict = {}
    for schedule in SCHEDULES[::-1]:  # fifo first: the reference
        model = from_pretrained(model_path, policy=policy, expert_slots=expert_slots, dtype=dtype, progress=False)
        try:
            engine = Engine(model, max_batch_size=batch_size, schedule=schedule, max_running=num_requests,
                            max_queue=num_requests, predictor=predictor)
            requests = [engine.submit(p, max_new_tokens=max_new_tokens) for p in ids]
            model.expertflow.cache.reset_stats()
            device = next(model.parameters()).device
            bar = tqdm(total=num_requests * max_new_tokens, desc=f"serve {schedule}", unit="tok", disable=not progress)
            start = time.perf_counter()
            while engine.has_work():
                bar.update(len(engine.step()))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
            bar.close()
            stats = model.expertflow.stats()
            s = engine.stats
            result[schedule] = {
                "activated_pairs_per_batch": s["activated_pairs"] / max(s["decode_batches"], 1),
                "bytes_per_token": stats["bytes_copied"] / max(s["tokens"], 1),
                "tokens_per_s": s["tokens"] / seconds,
                "schedule_ms": s["schedule_ms"],
                "schedule_ms_per_round": s["schedule_ms"] / max(s["rounds"], 1),
                "tokens": s["tokens"],
                "decode_batches": s["decode_batches"],
                "prefill_passes": s["prefill_passes"],
                "hit_ratio": stats["hit_ratio"],
                "outputs": [r.output_ids for r in requests],
            }
            engine.close()
        finally:
            model.expertflow.close()
    fifo, ef = result["fifo"], result["expertflow"]
    result["expertflow"]["pairs_vs_fifo"] = ef["activated_pairs_per_batch"] / fifo["activated_pairs_per_batch"]
    result["expertflow"]["speedup_vs_fifo"] = ef["tokens_per_s"] / fifo["tokens_per_s"]
    result["expertflow"]["same_outputs_as_fifo"] = ef["outputs"] == fifo["outputs"]
    for r in result.values():
        del r["outputs"]
    result["config"] = {"model": str(model_path), "num_requests": num_requests, "batch_size": batch_size,
                        "max_new_tokens": max_new_tokens, "policy": policy, "expert_slots": expert_slots,
                        "predictor": str(predictor) if predictor is not None else "history", "dtype": dtype}
    return result


def format_scheduler_table(result: dict) -> str:
    rows = [["schedule", "pairs/batch", "bytes/token", "tokens/s", "schedule ms", "hit ratio"]]
    for name in SCHEDULES[::-1]:
        r = result[name]
        rows.append([name, f"{r['activated_pairs_per_batch']:.1f}", f"{r['bytes_per_token'] / 1e3:.1f} KB",
                     f"{r['tokens_per_s']:.1f}", f"{r['schedule_ms']:.1f}", f"{r['hit_ratio']:.1%}"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    ef = result["expertflow"]
    lines.append(f"expertflow vs fifo: {ef['pairs_vs_fifo']:.2f}x activated pairs per batch, {ef['speedup_vs_fifo']:.2f}x tokens/s")
    return "\n".join(lines)
