"""Activated (layer, expert) pairs per decode batch and bytes per token, fifo against the token scheduler,
on the bundled model at several batch sizes (CPU host backend, fp32, 64 requests, 32 new tokens, lru at
25% slots). Writes benchmarks/results/scheduler-batch-sizes.json and docs/img/scheduler-batch-sizes.png.

    python benchmarks/scheduler_plot.py
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from expertflow.bench.serving import bench_scheduler
from expertflow.cli import BUNDLED_MODEL, BUNDLED_PREDICTOR
from expertflow.recorder import read_prompts

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    prompts = read_prompts(BUNDLED_MODEL.parent / "prompts" / "heldout.txt")
    sizes = (4, 8, 16)
    results = {b: bench_scheduler(BUNDLED_MODEL, prompts, 64, b, 32, predictor=BUNDLED_PREDICTOR, dtype="float32")
               for b in sizes}
    (ROOT / "benchmarks/results/scheduler-batch-sizes.json").write_text(json.dumps({str(b): r for b, r in results.items()}, indent=1))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    width = 0.38
    for i, name in enumerate(("fifo", "expertflow")):
        xs = [j + (i - 0.5) * width for j in range(len(sizes))]
        axes[0].bar(xs, [results[b][name]["activated_pairs_per_batch"] for b in sizes], width, label=name)
        axes[1].bar(xs, [results[b][name]["bytes_per_token"] / 1e3 for b in sizes], width, label=name)
    for ax, label in zip(axes, ("activated (layer, expert) pairs per batch", "KB copied per token")):
        ax.set_xticks(range(len(sizes)), [f"B = {b}" for b in sizes])
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle("bundled tiny Mixtral (128 experts), 64 requests, lru at 25% slots")
    fig.tight_layout()
    (ROOT / "docs/img").mkdir(exist_ok=True)
    fig.savefig(ROOT / "docs/img/scheduler-batch-sizes.png", dpi=120)
    for b in sizes:
        print(b, {n: round(results[b][n]["activated_pairs_per_batch"], 1) for n in ("fifo", "expertflow")},
              round(results[b]["expertflow"]["pairs_vs_fifo"], 3))


if __name__ == "__main__":
    main()
