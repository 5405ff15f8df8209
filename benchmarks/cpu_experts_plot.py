"""CPU experts on the H200 machine: ms per token with GPU-only offload (cpu_experts off), the cost
model (auto) and every miss on the CPU (on), against the slots, at batch 1, 4 and 16, with three
forecasts (one a row): the benchmark's history forecast, the trace's true future with each expert
right with probability 0.8 (``noisy-oracle:0.8``, the trained predictor's recall) and the true
future itself (its prefetches), from the latest runs (made by the commands in docs/cpu_experts.md;
RUNS says which code each panel ran): the median over runs and rounds, with a bar from the fastest
to the slowest; the expertflow policy's rows only. Writes docs/img/cpu-experts-h200.png.

    python benchmarks/cpu_experts_plot.py
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parent.parent
LABELS = {"off": "GPU only (off)", "auto": "auto", "on": "CPU for every miss (on)"}
FORECASTS = {"history": "history forecast", "noisy-oracle:0.8": "true future, 80% right",
             "oracle": "true future (prefetches)"}
# (forecast, batch) -> the result files and what they ran. Each is one process; a variants file holds
# rounds of GPU-only and `auto` in one (benchmarks/cpu_experts_variants.py; only its `normal` rows
# count). GPU-only and `auto` come from the final code (the GPU waits for the CPU's results) where it
# ran: batch 1 and 4. `on` never asks the cost model and was not rerun: it comes from the round
# before's code (history) or an earlier round's (the true future). Batch 16 did not run on the final
# code: those panels are the round before's code, and with the true future batches 4 and 16 are
# earlier code (docs/cpu_experts.md says which).
B1 = "cpu_experts_gpuwait_forecasts_b1_h200.json"
ROUNDS_64 = "cpu_experts_gpuwait_rounds_64tokens_h200.json"
B4 = "cpu_experts_gpuwait_b4_b16_h200-b4.json"
HISTORY_B1_ON = "cpu_experts_final_history_b1_h200.json"
ORACLE_B1_ON = "cpu_experts_leave_final_b1_h200.json"
RUNS = {
    ("history", 1): ([B1, HISTORY_B1_ON], "1 run; on: the round before's code"),
    ("history", 4): ([B4], "1 run"),
    ("history", 16): (["cpu_experts_final_history_h200-b16.json"], "1 run, the round before's code"),
    ("noisy-oracle:0.8", 1): ([B1, ROUNDS_64], "1 run; 25, 50%: 4 rounds more"),
    ("noisy-oracle:0.8", 4): ([B4], "1 run"),
    ("noisy-oracle:0.8", 16): (["cpu_experts_forecasts_noisy_h200-b16.json"], "1 run, the round before's code"),
    ("oracle", 1): ([B1, ROUNDS_64, ORACLE_B1_ON], "1 run; 25, 50%: 4 rounds more; on: earlier code"),
    ("oracle", 4): (["cpu_experts_belady_h200-b4.json"], "1 run, earlier code"),
    ("oracle", 16): (["cpu_experts_fcbackfill_h200-b16.json"], "1 run, earlier code"),
}
ONLY_ON = {("history", 1): HISTORY_B1_ON, ("oracle", 1): ORACLE_B1_ON}  # files that give a panel only their `on` rows


def main() -> None:
    batches = sorted({batch for _, batch in RUNS})
    fig, axes = plt.subplots(len(FORECASTS), len(batches), figsize=(12, 10), squeeze=False)
    for row, (forecast, forecast_label) in zip(axes, FORECASTS.items()):
        for ax, batch in zip(row, batches):
            files, label = RUNS[(forecast, batch)]
            results = [json.loads((ROOT / "benchmarks/results" / f).read_text()) for f in files]
            only_on = ONLY_ON.get((forecast, batch))
            for mode in ("off", "auto", "on"):
                by_share: dict[float, list[float]] = {}
                for f, result in zip(files, results):
                    if f == only_on and mode != "on":
                        continue
                    for r in result["rows"]:
                        if (r["policy"] == "expertflow" and r["predictor"] == forecast and r["cpu_experts_asked"] == mode
                                and r.get("variant", "normal") == "normal"):
                            by_share.setdefault(100 * r["slot_share"], []).append(r["ms_per_token"])
                if not by_share:  # runs without this mode
                    continue
                shares = sorted(by_share)
                mid = [statistics.median(by_share[x]) for x in shares]
                low = [m - min(by_share[x]) for m, x in zip(mid, shares)]
                high = [max(by_share[x]) - m for m, x in zip(mid, shares)]
                ax.errorbar(shares, mid, yerr=[low, high], marker="o", capsize=3, label=LABELS[mode])
            resident = statistics.median(r["all_gpu_ms"] for r in results if r.get("all_gpu_ms"))
            ax.axhline(resident, color="gray", linestyle="dashed", label="every expert resident")
            ax.set_xlabel("slots, % of the experts")
            ax.set_ylabel("ms per decode step")  # a step gives each of the batch's sequences a token
            ax.set_ylim(bottom=0)
            ax.set_title(f"batch {batch}, {forecast_label}\n({label})", fontsize=9)
            ax.legend(fontsize=7)
    first = results[0]
    fig.suptitle(f"{first['arch']} shape, {first['num_layers']} layers, expertflow policy, "
                 f"{first['machine']['device']} and its 16 cores", fontsize=9)
    fig.tight_layout()
    fig.savefig(ROOT / "docs/img/cpu-experts-h200.png", dpi=120)


if __name__ == "__main__":
    main()
