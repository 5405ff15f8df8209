"""The token scheduler on the H200 at real shapes: tokens/s and bytes per token of each emulated
forecast against fifo, at each slot count, from the bench-scheduler JSON files (docs/serving.md has
the commands). Writes docs/img/scheduler-h200.png.

    python benchmarks/scheduler_h200_plot.py
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks/results"
PANELS = [  # (title, files: repeated runs of one configuration)
    ("gpt-oss-120b shape, 8 layers, 64 requests, B = 8",
     ["scheduler-gpt-oss-h200.json", "scheduler-gpt-oss-h200-run2.json"]),
    ("Mixtral-8x7B shape, 8 layers, 32 requests, B = 8", ["scheduler-mixtral-h200.json"]),
]
FORECASTS = ("history", "noisy-oracle:0.8", "oracle")


def main() -> None:
    fig, axes = plt.subplots(1, len(PANELS), figsize=(11, 3.8), sharey=True)
    for ax, (title, files) in zip(axes, PANELS):
        runs = [json.loads((RESULTS / f).read_text())["runs"] for f in files]
        labels, speed, speed_runs, byte_ratio = [], [], [], []
        for run in runs[0]:
            for forecast in FORECASTS:
                # every file that measured this slot count and forecast (later runs may hold a subset)
                measured = [r["expertflow"][forecast] for rs in runs for r in rs
                            if r["expert_slots"] == run["expert_slots"] and forecast in r["expertflow"]]
                labels.append(f"{run['expert_slots']}\n{forecast.replace('noisy-oracle', 'noisy')}")
                speed.append(sum(m["speedup_vs_fifo"] for m in measured) / len(measured))
                speed_runs.append([m["speedup_vs_fifo"] for m in measured])
                byte_ratio.append(measured[0]["bytes_vs_fifo"])
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], speed, 0.4, label="tokens/s (× fifo, mean of runs)")
        for x, values in zip(xs, speed_runs):
            ax.plot([x - 0.2] * len(values), values, "k.", markersize=5)
        ax.bar([x + 0.2 for x in xs], [1 / b for b in byte_ratio], 0.4, label="fifo bytes / expertflow bytes")
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.axhline(1.1, color="red", linewidth=0.8, linestyle="--", label="1.10× floor")
        ax.set_xticks(list(xs), labels, fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_ylim(0.7, 1.35)
    axes[0].set_ylabel("expertflow schedule ÷ fifo")
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle("token scheduler on one H200, lru cache, routing forced from the shared traces (dots: single runs)", fontsize=10)
    fig.tight_layout()
    fig.savefig(ROOT / "docs/img/scheduler-h200.png", dpi=120)


if __name__ == "__main__":
    main()
