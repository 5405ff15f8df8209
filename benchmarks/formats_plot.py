"""Compressed experts on the H200 at the same GPU budget: ms per token of bf16 and compressed experts
under each policy, with the compressed format's bound (benchmarks/results/decode_*_h200.json, made by
the commands in docs/formats.md). Writes docs/img/formats-h200.png.

    python benchmarks/formats_plot.py
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks/results"
# (title, dense run, compressed run, [(budget label, dense slots, compressed slots)])
PANELS = [
    ("Mixtral-8x7B shape, fp8", "decode_mixtral_bf16_h200.json", "decode_mixtral_fp8_h200.json",
     [("10%", 6, 11), ("25%", 16, 31)]),
    ("gpt-oss-120b shape, MXFP4", "decode_gpt_oss_bf16_h200.json", "decode_gpt_oss_mxfp4_h200.json",
     [("10%", 102, 383), ("25%", 256, 963)]),
]


def _row(result: dict, policy: str, slots: int) -> dict:
    return next(r for r in result["rows"] if r["policy"] == policy and r["num_slots"] == slots)


def main() -> None:
    fig, axes = plt.subplots(1, len(PANELS), figsize=(11, 3.8))
    for ax, (title, dense_name, packed_name, budgets) in zip(axes, PANELS):
        dense = json.loads((RESULTS / dense_name).read_text())
        packed = json.loads((RESULTS / packed_name).read_text())
        fmt = packed["expert_dtype"]
        labels, xs = [], 0
        for budget, dense_slots, packed_slots in budgets:
            for policy in ("lru", "expertflow"):
                d, p = _row(dense, policy, dense_slots), _row(packed, policy, packed_slots)
                ax.bar(xs - 0.2, d["ms_per_token"], 0.4, color="tab:blue", label="bf16" if xs == 0 else None)
                ax.bar(xs + 0.2, p["ms_per_token"], 0.4, color="tab:orange", label=fmt if xs == 0 else None)
                ax.hlines(p["bound_ms"], xs + 0.0, xs + 0.4, colors="black", linestyles="dashed",
                          label=f"{fmt} bound" if xs == 0 else None)
                ax.annotate(f"{d['ms_per_token'] / p['ms_per_token']:.2f}×", (xs + 0.2, p["ms_per_token"]),
                            ha="center", va="bottom", fontsize=8)
                labels.append(f"{policy}\n{budget} budget")
                xs += 1
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.set_ylabel("ms per token (batch 1)")
        ax.set_title(f"{title}, {dense['num_layers']} layers", fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle("Same GPU budget: bf16 experts against compressed ones (H200, shared traces)", fontsize=9)
    fig.tight_layout()
    fig.savefig(ROOT / "docs/img/formats-h200.png", dpi=120)


if __name__ == "__main__":
    main()
