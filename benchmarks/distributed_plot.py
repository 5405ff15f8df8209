"""Decode throughput on one and two H200s at the same slots per GPU (benchmarks/distributed_decode.py):
tokens/s per batch size and policy: static ownership, misses balanced across the links, and
prefetches balanced too. Writes
docs/img/distributed-h200.png.

    python benchmarks/distributed_plot.py
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks/results"
RUNS = [("1 GPU", "distributed-1gpu.json"), ("2 GPUs, static owners", "distributed-static-2gpu.json"),
        ("2 GPUs, misses balanced", "distributed-misses-2gpu.json"),
        ("2 GPUs, misses and prefetches balanced", "distributed-2gpu.json")]


def main() -> None:
    runs = [(label, json.loads((RESULTS / name).read_text())) for label, name in RUNS]
    keys = [(r["batch"], r["policy"]) for r in runs[0][1]["rows"]]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / len(runs)
    one = {(r["batch"], r["policy"]): r["tokens_per_s"] for r in runs[0][1]["rows"]}
    for i, (label, result) in enumerate(runs):
        rows = {(r["batch"], r["policy"]): r["tokens_per_s"] for r in result["rows"]}
        xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(keys))]
        bars = ax.bar(xs, [rows[k] for k in keys], width, label=label)
        if i:
            for bar, k in zip(bars, keys):
                ax.annotate(f"{rows[k] / one[k]:.2f}×", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(keys)), [f"batch {b}\n{p}" for b, p in keys])
    ax.set_ylabel("tokens/s")
    ax.legend(fontsize=8)
    first = runs[0][1]
    ax.set_title(f"{first['arch']} shape, {first['layers']} layers, {first['slots_per_gpu']} of the experts' slots per GPU, "
                 "shared Mixtral trace", fontsize=9)
    fig.tight_layout()
    fig.savefig(ROOT / "docs/img/distributed-h200.png", dpi=120)


if __name__ == "__main__":
    main()
