"""CPU experts on the H200 machine: ms per token with GPU-only offload (cpu_experts off), the cost
model (auto) and every miss on the CPU (on), against the slots, at batch 1, 4 and 16
(benchmarks/results/cpu_experts_h200-b{1,4,16}.json, made by the command in docs/cpu_experts.md).
Writes docs/img/cpu-experts-h200.png.

    python benchmarks/cpu_experts_plot.py
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parent.parent
LABELS = {"off": "GPU only (off)", "auto": "auto", "on": "CPU for every miss (on)"}
BATCHES = (1, 4, 16)


def main() -> None:
    fig, axes = plt.subplots(1, len(BATCHES), figsize=(12, 3.8))
    for ax, batch in zip(axes, BATCHES):
        result = json.loads((ROOT / f"benchmarks/results/cpu_experts_h200-b{batch}.json").read_text())
        rows = [r for r in result["rows"] if r["policy"] != "all_gpu"]
        for mode in ("off", "auto", "on"):
            mine = sorted((r for r in rows if r["cpu_experts_asked"] == mode), key=lambda r: r["slot_share"])
            if not mine:  # a run without this mode
                continue
            ax.plot([100 * r["slot_share"] for r in mine], [r["ms_per_token"] for r in mine], marker="o",
                    label=LABELS[mode])
        ax.axhline(result["all_gpu_ms"], color="gray", linestyle="dashed", label="every expert resident")
        ax.set_xlabel("slots, % of the experts")
        ax.set_ylabel("ms per decode step")  # a step gives each of the batch's sequences a token
        ax.set_ylim(bottom=0)
        ax.set_title(f"batch {batch}", fontsize=9)
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['arch']} shape, {result['num_layers']} layers, expertflow policy, "
                 f"{result['machine']['device']} and its 16 cores", fontsize=9)
    fig.tight_layout()
    fig.savefig(ROOT / "docs/img/cpu-experts-h200.png", dpi=120)


if __name__ == "__main__":
    main()
