"""The CPU-expert floors (docs/cpu_experts.md, "The floors, honestly") judged from the files that
``benchmarks/cpu_experts_floors.sh`` writes, so that a verdict is computed, not paired by hand.

Each ratio is GPU-only's median decode step (``cpu_experts`` off) over ``auto``'s, in the same
process and, for the rounds files (``benchmarks/cpu_experts_variants.py``, variant ``normal``), the
same round; above 1, ``auto`` is faster. A rounds file's configurations are also pooled: the mean
of the rounds' GPU-only medians over the mean of ``auto``'s (and the same with the mean steps). The
512-token prompt's file gives the prompt's pass (``prefill_ms``) and its few decode steps apart.
The floors:

- batch 1 at 10% and 25% slots: ``auto`` at least 1.3x faster, every measurement (the one-process
  run and each round) and pooled;
- no configuration (batch 1, 4, 16, the 512-token prompt) more than 3% slower: every ratio at
  least 1 / 1.03.

Files missing from ``--results`` are named and skipped. Prints a markdown table a forecast a column
and the failing measurements; ``--out`` writes every ratio as JSON.

    python benchmarks/cpu_experts_floors_table.py --results benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

FORECASTS = {"history": "history forecast", "noisy-oracle:0.8": "true future, 80% right", "oracle": "true future"}
BENCH_FILES = {  # the floors script's stage -> (its file, its batch)
    "b1": ("cpu_experts_floors_b1_h200.json", 1), "b4": ("cpu_experts_floors_b4_h200.json", 4),
    "b4-oracle": ("cpu_experts_floors_b4_oracle_h200.json", 4),
    "b16-history": ("cpu_experts_floors_b16_history_h200.json", 16),
    "b16-noisy": ("cpu_experts_floors_b16_noisy_h200.json", 16),
    "b16-oracle": ("cpu_experts_floors_b16_oracle_h200.json", 16),
    "p512": ("cpu_experts_floors_p512_h200.json", 1),
}
ROUNDS_FILES = ("cpu_experts_floors_rounds_h200.json", "cpu_experts_floors_rounds4_h200.json")
SPEEDUP_FLOOR, SLOWDOWN_FLOOR = 1.3, 1 / 1.03


def share_label(row: dict) -> str:
    """The floors' name for a row's slots: 10% (6 of 64 Mixtral experts), 25% or 50%."""
    share = row["slot_share"]
    return "10%" if share < 0.2 else "25%" if share < 0.375 else "50%"


def paired(rows: list[dict], extra_key: str | None = None) -> dict[tuple, tuple[dict, dict]]:
    """``{(forecast, slots[, extra]): (off row, auto row)}`` over the expertflow rows that have both."""
    by: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if r["policy"] != "expertflow" or r.get("variant", "normal") != "normal":
            continue
        key = (r["predictor"], share_label(r)) + ((r[extra_key],) if extra_key else ())
        by.setdefault(key, {})[r["cpu_experts_asked"]] = r
    return {k: (v["off"], v["auto"]) for k, v in by.items() if "off" in v and "auto" in v}


def judge(results: Path) -> tuple[list[dict], list[str]]:
    """-> (one record a ratio, the files missing). A record: forecast, slots, batch, what (decode,
    prefill, decode after the prompt, round N, pooled, pooled mean steps), source and ratio."""
    records: list[dict] = []
    missing: list[str] = []

    def add(forecast: str, slots: str, batch: int, what: str, source: str, off: float, auto: float) -> None:
        records.append({"forecast": forecast, "slots": slots, "batch": batch, "what": what, "source": source,
                        "off_ms": off, "auto_ms": auto, "ratio": off / auto})

    for stage, (name, batch) in BENCH_FILES.items():
        path = results / name
        if not path.exists():
            missing.append(name)
            continue
        for (forecast, slots), (off, auto) in paired(json.loads(path.read_text())["rows"]).items():
            if stage == "p512":
                add(forecast, slots, batch, "prompt's pass", name, off["prefill_ms"], auto["prefill_ms"])
                add(forecast, slots, batch, "decode after the prompt", name, off["ms_per_token"], auto["ms_per_token"])
            else:
                add(forecast, slots, batch, "decode, one run", name, off["ms_per_token"], auto["ms_per_token"])
    pools: dict[tuple[str, str], list[tuple[dict, dict]]] = {}
    for name in ROUNDS_FILES:
        path = results / name
        if not path.exists():
            missing.append(name)
            continue
        for (forecast, slots, rnd), (off, auto) in paired(json.loads(path.read_text())["rows"], "round").items():
            add(forecast, slots, 1, f"decode, round {rnd}", name, off["ms_per_token"], auto["ms_per_token"])
            pools.setdefault((forecast, slots), []).append((off, auto))
    for (forecast, slots), pairs in pools.items():
        for what, field in (("decode, rounds pooled", "ms_per_token"), ("decode, rounds pooled (mean steps)", "ms_per_token_mean")):
            add(forecast, slots, 1, what, "+".join(ROUNDS_FILES), statistics.fmean(o[field] for o, _ in pairs),
                statistics.fmean(a[field] for _, a in pairs))
    return records, missing


def cell(records: list[dict]) -> str:
    """A table cell: the range of the measurements (how many) and of the rounds' pooled medians."""
    if not records:
        return "not run"

    def span(ratios: list[float]) -> str:
        return f"{min(ratios):.2f}–{max(ratios):.2f}×" if len(ratios) > 1 else f"{ratios[0]:.2f}×"
    single = [r["ratio"] for r in records if "pooled" not in r["what"]]
    pooled = [r["ratio"] for r in records if r["what"] == "decode, rounds pooled"]
    return f"{span(single)} ({len(single)})" + (f", pooled {span(pooled)}" if pooled else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--out", type=Path, help="every ratio as JSON")
    args = parser.parse_args()
    if not args.results.is_dir():
        parser.error(f"--results {args.results} is not a folder: give the folder the floors script wrote into")
    records, missing = judge(args.results)
    if not records:
        parser.error(f"none of the floors script's files is in {args.results}: run benchmarks/cpu_experts_floors.sh first")
    rows = [("batch 1, 10%: ≥ 1.3×", lambda r: r["batch"] == 1 and r["slots"] == "10%" and "prompt" not in r["what"], SPEEDUP_FLOOR),
            ("batch 1, 25%: ≥ 1.3×", lambda r: r["batch"] == 1 and r["slots"] == "25%" and "prompt" not in r["what"], SPEEDUP_FLOOR),
            ("never > 3% slower", lambda r: True, SLOWDOWN_FLOOR)]
    print("| floor | " + " | ".join(FORECASTS.values()) + " |")
    print("|---|" + "---|" * len(FORECASTS))
    failing = []
    for label, keep, floor in rows:
        cells = []
        for forecast in FORECASTS:
            mine = [r for r in records if r["forecast"] == forecast and keep(r)]
            short = [r for r in mine if r["ratio"] < floor and "mean steps" not in r["what"]]
            failing += [(label, r) for r in short]
            verdict = "" if not mine else "**met**: " if not short else f"**not met** ({len(short)} below): "
            cells.append(verdict + cell(mine))
        print(f"| {label} | " + " | ".join(cells) + " |")
    if failing:
        print("\nbelow the floor:")
        for label, r in failing:
            print(f"- {label}: {FORECASTS[r['forecast']]}, batch {r['batch']}, {r['slots']}, {r['what']} "
                  f"({r['source']}): {r['off_ms']:.1f} / {r['auto_ms']:.1f} ms = {r['ratio']:.3f}×")
    if missing:
        print("\nnot found (skipped): " + ", ".join(missing))
    if args.out:
        args.out.write_text(json.dumps({"records": records, "missing": missing}, indent=1) + "\n")


if __name__ == "__main__":
    main()
