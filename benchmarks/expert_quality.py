"""What quantizing the experts at load costs on the bundled model: perplexity on the held-out prompts and
the agreement of greedy continuations with the checkpoint's bf16 experts. Compute runs in fp32 (the
bf16 row's experts are the checkpoint's bf16 values, held in fp32), so the only difference between
the rows is how the experts are stored; bytes are against the bf16 expert.

    python benchmarks/expert_quality.py     # writes benchmarks/results/expert-quality-cpu.json
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

import expertflow as ef
from expertflow.cli import BUNDLED_MODEL
from expertflow.recorder import read_prompts
from expertflow.runtime import packed_bytes

NEW_TOKENS = 32


def evaluate(expert_dtype: str | None, texts: list[list[int]]) -> dict:
    model = ef.from_pretrained(BUNDLED_MODEL, dtype="float32", expert_slots="100%", policy="lru",
                               expert_dtype=expert_dtype, backend="host", progress=False)
    try:
        nll, count, continuations = 0.0, 0, []
        with torch.no_grad():
            for ids in texts:
                x = torch.tensor([ids])
                logits = model(x).logits[0, :-1]
                nll += float(torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum"))
                count += len(ids) - 1
                out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, do_sample=False,
                                     min_new_tokens=NEW_TOKENS, pad_token_id=model.config.pad_token_id)
                continuations.append(out[0, len(ids):].tolist())
        arch = model.expertflow.architecture
        bf16 = packed_bytes(arch.pool_tensors(model.config, torch.bfloat16))
        # Dense experts are held in the compute dtype (fp32 here); their storage is the checkpoint's bf16.
        stored = bf16 if model.expertflow.expert_format.dense else model.expertflow.pool.expert_bytes(0)
        return {"perplexity": math.exp(nll / count), "tokens": count, "continuations": continuations,
                "stored_expert_bytes": stored, "bf16_expert_bytes": bf16}
    finally:
        model.expertflow.close()


def main() -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(BUNDLED_MODEL)
    texts = [tokenizer(t)["input_ids"] for t in read_prompts(BUNDLED_MODEL.parent / "prompts" / "heldout.txt")]
    texts = [ids for ids in texts if len(ids) >= 2]
    rows = {name: evaluate(name, texts) for name in ("bf16", "fp8", "int8")}
    base = rows["bf16"]
    for row in rows.values():
        same = [a == b for a, b in zip(row["continuations"], base["continuations"])]
        prefix = [next((i for i, (p, q) in enumerate(zip(a, b)) if p != q), NEW_TOKENS)
                  for a, b in zip(row["continuations"], base["continuations"])]
        row.update(perplexity_vs_bf16=row["perplexity"] / base["perplexity"], identical_continuations=sum(same) / len(same),
                   mean_agreeing_prefix=sum(prefix) / len(prefix), bytes_vs_bf16=row["stored_expert_bytes"] / row["bf16_expert_bytes"])
    for row in rows.values():
        del row["continuations"]
    out = Path(__file__).resolve().parent / "results" / "expert-quality-cpu.json"
    out.write_text(json.dumps({"model": "bundled tiny-mixtral", "texts": "prompts/heldout.txt", "new_tokens": NEW_TOKENS,
                               "compute_dtype": "float32", "rows": rows}, indent=1) + "\n")
    for name, row in rows.items():
        print(f"{name:5s} perplexity {row['perplexity']:.3f} ({row['perplexity_vs_bf16']:.4f}x) | identical greedy "
              f"continuations {row['identical_continuations']:.0%}, agreeing prefix {row['mean_agreeing_prefix']:.1f} of "
              f"{NEW_TOKENS} | expert bytes {row['bytes_vs_bf16']:.2f}x")


if __name__ == "__main__":
    main()
