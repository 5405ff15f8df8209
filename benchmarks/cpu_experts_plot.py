"""CPU experts on the H200 machine: ms per token with GPU-only offload (cpu_experts off), the cost
model (auto) and every miss on the CPU (on), against the slots, at batch 1, 4 and 16, with three
forecasts (one a row): the benchmark's history forecast, the trace's true future with each expert
right with probability 0.8 (``noisy-oracle:0.8``, the trained predictor's recall) and the true
future itself (its prefetches), from the latest runs (made by the commands in docs/cpu_experts.md;
RUNS says which code each panel ran and which rows of a file give each mode): the median over runs
and rounds, with a bar from the fastest to the slowest; the expertflow policy's rows only. Writes
docs/img/cpu-experts-h200.png; with ``--cuda-graphs``, the runs with decoding's non-expert layers as
CUDA graphs (GRAPH_RUNS) to docs/img/cpu-experts-cuda-graphs-h200.png.

    python benchmarks/cpu_experts_plot.py [--cuda-graphs]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from cpu_experts_floors_table import BENCH_FILES, GRAPHS_BENCH_FILES, GRAPHS_ROUNDS_FILES, ROUNDS_FILES

ROOT = Path(__file__).resolve().parent.parent
LABELS = {"off": "GPU only (off)", "auto": "auto", "on": "CPU for every miss (on)"}
FORECASTS = {"history": "history forecast", "noisy-oracle:0.8": "true future, 80% right",
             "oracle": "true future (prefetches)"}
# (forecast, batch) -> [(result file, {mode: the rows that give it})], and what they ran. A file's
# rows give a mode only where it names that mode: a bench file's rows by their cpu_experts (None), a
# variants file's (benchmarks/cpu_experts_variants.py: rounds in one process) by their variant too.
# Every panel but one is the final code (4c66b78), run by benchmarks/cpu_experts_floors.sh: the files
# the floors table judges (cpu_experts_floors_table.py names them). Batch 1: one run (10, 25, 50%) and
# the rounds files (25, 50%; `on` in the first only), the last two from a second machine where auto
# as built ran as the variant "unguarded" (beside a step guard, since withdrawn: docs/cpu_experts.md);
# batches 4 and 16 one run each. Batch 16 with the true future ran on the final code at 10% only (the
# device time ran out), so its panel is earlier code.
Modes = dict[str, str | None]  # mode -> the variant whose rows give it (None: a bench file's rows)
PLAIN: Modes = {"off": None, "auto": None, "on": None}


def bench_file(stage: str) -> list[tuple[str, Modes]]:
    return [(BENCH_FILES[stage][0], PLAIN)]


B1 = bench_file("b1") + [(name, {"off": "normal", "auto": variant, "on": "on"})
                         for stage, (name, variant) in ROUNDS_FILES.items() if not stage.startswith("p512")]
B1_LABEL = "10%: 1 run; 25, 50%: 1 run and 13 rounds (on: 2)"
RUNS: dict[tuple[str, int], tuple[list[tuple[str, Modes]], str]] = {
    ("history", 1): (B1, B1_LABEL),
    ("history", 4): (bench_file("b4"), "1 run"),
    ("history", 16): (bench_file("b16-history"), "1 run"),
    ("noisy-oracle:0.8", 1): (B1, B1_LABEL),
    ("noisy-oracle:0.8", 4): (bench_file("b4"), "1 run"),
    ("noisy-oracle:0.8", 16): (bench_file("b16-noisy"), "1 run"),
    ("oracle", 1): (B1, B1_LABEL),
    ("oracle", 4): (bench_file("b4-oracle"), "1 run"),
    ("oracle", 16): ([("cpu_experts_fcbackfill_h200-b16.json", PLAIN)], "1 run, earlier code"),
}
# With CUDA graphs (three device sessions, the floors script with CUDA_GRAPHS=1, and the screens):
# batch 1 one run (10, 25, 50%; on too), 2 rounds (25, 50%; off and auto), 2 more (10, 25%) and the
# screens' rounds of the code as built (25%; not every screen ran every forecast); batch 4 one run cut
# short (history at 10 and 25%, the 80%-right forecast at 10%) and one with the true future; batch 16
# one run (history) and the switch interval's screen (history, 25%: 2 rounds), one cut short (the
# 80%-right forecast at 10 and 25%) and one with the true future.
def graphs_rounds(stage: str) -> tuple[str, Modes]:
    """A graphs rounds file, its auto rows those of the variant the floors table judges."""
    name, variant = GRAPHS_ROUNDS_FILES[stage]
    return name, {"off": "normal", "auto": variant}


GRAPHS_B1 = [(GRAPHS_BENCH_FILES["b1"][0], PLAIN)] + [
    graphs_rounds(stage) for stage in ("rounds", "rounds-switch", "screen-first", "screen-threads-chunks",
                                       "screen-backfill-leave", "screen-switch-b1")]
GRAPH_RUNS: dict[tuple[str, int], tuple[list[tuple[str, Modes]], str]] = {
    **{(forecast, 1): (GRAPHS_B1, "1 run a share; rounds: 2 at 10%,\n5-9 at 25%, 2 at 50%")
       for forecast in FORECASTS},
    ("history", 4): ([(GRAPHS_BENCH_FILES["b4"][0], PLAIN)], "1 run, cut short: 10, 25%"),
    ("noisy-oracle:0.8", 4): ([(GRAPHS_BENCH_FILES["b4"][0], PLAIN)], "1 run, cut short: 10% (25%: GPU-only)"),
    ("oracle", 4): ([(GRAPHS_BENCH_FILES["b4-oracle"][0], PLAIN)], "1 run"),
    ("history", 16): ([(GRAPHS_BENCH_FILES["b16-history"][0], PLAIN),
                       graphs_rounds("screen-switch-b16")],
                      "1 run; 25%: 1 run and 2 rounds"),
    ("noisy-oracle:0.8", 16): ([(GRAPHS_BENCH_FILES["b16-noisy"][0], PLAIN)], "1 run, cut short: 10, 25%"),
    ("oracle", 16): ([(GRAPHS_BENCH_FILES["b16-oracle"][0], PLAIN)], "1 run"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cuda-graphs", action="store_true", help="plot the runs with CUDA graphs instead")
    args = parser.parse_args()
    runs = GRAPH_RUNS if args.cuda_graphs else RUNS
    batches = sorted({batch for _, batch in runs})
    fig, axes = plt.subplots(len(FORECASTS), len(batches), figsize=(4 * len(batches), 10), squeeze=False)
    for row, (forecast, forecast_label) in zip(axes, FORECASTS.items()):
        for ax, batch in zip(row, batches):
            if (forecast, batch) not in runs:
                ax.set_title(f"batch {batch}, {forecast_label}: not run", fontsize=9)
                ax.axis("off")
                continue
            files, label = runs[(forecast, batch)]
            results = [json.loads((ROOT / "benchmarks/results" / f).read_text()) for f, _ in files]
            for mode in ("off", "auto", "on"):
                by_share: dict[float, list[float]] = {}
                for (_, modes), result in zip(files, results):
                    if mode not in modes:
                        continue
                    for r in result["rows"]:
                        if (r["policy"] == "expertflow" and r["predictor"] == forecast and r["cpu_experts_asked"] == mode
                                and r.get("variant") == modes[mode]):
                            by_share.setdefault(100 * r["slot_share"], []).append(r["ms_per_token"])
                if not by_share:  # runs without this mode
                    continue
                shares = sorted(by_share)
                mid = [statistics.median(by_share[x]) for x in shares]
                low = [m - min(by_share[x]) for m, x in zip(mid, shares)]
                high = [max(by_share[x]) - m for m, x in zip(mid, shares)]
                ax.errorbar(shares, mid, yerr=[low, high], marker="o", capsize=3, label=LABELS[mode])
            # a bench file's resident step, or each round's of a variants file
            resident = statistics.median([r["all_gpu_ms"] for r in results if r.get("all_gpu_ms")] + [
                row["all_gpu_ms"] for r in results for row in r["rows"] if "variant" in row and row.get("all_gpu_ms")])
            ax.axhline(resident, color="gray", linestyle="dashed", label="every expert resident")
            ax.set_xlabel("slots, % of the experts")
            ax.set_ylabel("ms per decode step")  # a step gives each of the batch's sequences a token
            ax.set_ylim(bottom=0)
            ax.set_title(f"batch {batch}, {forecast_label}\n({label})", fontsize=9)
            ax.legend(fontsize=7)
    first = results[0]
    fig.suptitle(f"{first['arch']} shape, {first['num_layers']} layers, expertflow policy, "
                 f"{first['machine']['device']} and its 16 cores"
                 + ("\ndecoding with CUDA graphs (GPU-only and auto alike)" if args.cuda_graphs else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(ROOT / ("docs/img/cpu-experts-cuda-graphs-h200.png" if args.cuda_graphs else "docs/img/cpu-experts-h200.png"),
                dpi=120)


if __name__ == "__main__":
    main()
