"""The CPU-expert floors (docs/cpu_experts.md, "The floors, honestly") judged from the files that
``benchmarks/cpu_experts_floors.sh`` writes, so that a verdict is computed, not paired by hand.

Each ratio is GPU-only's decode step (``cpu_experts`` off) over ``auto``'s, by the median step, in
the same process and, for the rounds files (``benchmarks/cpu_experts_variants.py``, ``auto`` of
the variant each names in ``ROUNDS_FILES``), the same round; above 1, ``auto`` is faster. The
rounds of all rounds files are also pooled, by forecast, slots, batch and prompt length (a long
prompt's rounds by file too: its files decode different numbers of steps after it): the mean of
the rounds' GPU-only medians over the mean of ``auto``'s, and the same with their mean steps. The
512-token prompt's files (a bench file, and rounds files whose rows give a ``prompt_len`` of 512 or
more) give the prompt's pass (``prefill_ms``) and its few decode steps apart. The floors, each judged over every
ratio it covers, pooled ones included:

- batch 1 at 10% and 25% slots: ``auto`` at least 1.3x faster (the one-process batch-1 run and the
  batch-1 rounds of prompts shorter than 512 tokens);
- no configuration (batch 1, 4, 16, the 512-token prompt) more than 3% slower: every ratio at
  least 1 / 1.03.

Files missing from ``--results`` are named and skipped, as are files of a run cut short
(``"partial"``: only the configurations it finished count) and files without a GPU-only and
``auto`` pair. Prints a markdown table a forecast a column, then every ratio below its floor;
``--out`` writes every ratio as JSON. ``--cuda-graphs`` judges the runs with decoding's non-expert
layers as CUDA graphs (``GRAPHS_BENCH_FILES``, ``GRAPHS_ROUNDS_FILES``) instead.

    python benchmarks/cpu_experts_floors_table.py --results benchmarks/results [--cuda-graphs]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from expertflow.bench import gpu_only_row

FORECASTS = {"history": "history forecast", "noisy-oracle:0.8": "true future, 80% right", "oracle": "true future"}
BENCH_FILES = {  # the floors script's stage -> (its file, its batch)
    "b1": ("cpu_experts_floors_b1_h200.json", 1), "b4": ("cpu_experts_floors_b4_h200.json", 4),
    "b4-oracle": ("cpu_experts_floors_b4_oracle_h200.json", 4),
    "b16-history": ("cpu_experts_floors_b16_history_h200.json", 16),
    "b16-noisy": ("cpu_experts_floors_b16_noisy_h200.json", 16),
    "b16-oracle": ("cpu_experts_floors_b16_oracle_h200.json", 16),
    "p512": ("cpu_experts_floors_p512_h200.json", 1),
}
# stage -> (its rounds file, the variant whose auto rows are the code judged). The last two ran auto
# as built under the variant name "unguarded", beside a step guard measured and withdrawn
# (docs/cpu_experts.md); their GPU-only rows are the variant "normal"'s of the same round.
ROUNDS_FILES = {"rounds": ("cpu_experts_floors_rounds_h200.json", "normal"),
                "rounds4": ("cpu_experts_floors_rounds4_h200.json", "normal"),
                "p512-rounds": ("cpu_experts_floors_p512_rounds_h200.json", "normal"),
                "rounds-unguarded4": ("cpu_experts_guard_rounds1_h200.json", "unguarded"),
                "rounds-unguarded3": ("cpu_experts_guard_rounds2_h200.json", "unguarded")}
# The same stages run with decoding's non-expert layers as CUDA graphs (GPU-only and auto alike:
# the floors script with CUDA_GRAPHS=1), judged apart with --cuda-graphs.
GRAPHS_BENCH_FILES = {stage: (name.replace("_floors_", "_cuda_graphs_"), batch) for stage, (name, batch) in BENCH_FILES.items()}
# The screens' files (one round each, 25% slots) hold the code as built under the variant "normal"
# beside variants measured and not kept (docs/cpu_experts.md); the first stopped at its second variant.
GRAPHS_ROUNDS_FILES = {"rounds": ("cpu_experts_cuda_graphs_rounds_h200.json", "normal"),
                       "rounds4": ("cpu_experts_cuda_graphs_rounds4_h200.json", "normal"),
                       "p512-rounds": ("cpu_experts_cuda_graphs_p512_rounds_h200.json", "normal"),
                       # the same with 3 decode steps after the prompt (--new-tokens 4), two rounds
                       "p512-rounds-4tokens": ("cpu_experts_cuda_graphs_p512_rounds_4tokens_h200.json", "normal"),
                       "screen-first": ("cpu_experts_cuda_graphs_threads_chunks_first_h200.json", "normal"),
                       "screen-threads-chunks": ("cpu_experts_cuda_graphs_threads_chunks_h200.json", "normal"),
                       "screen-backfill-leave": ("cpu_experts_cuda_graphs_backfill_leave_h200.json", "normal"),
                       # The switch interval's screens (batch 1 and 16) ran 6fc626f, whose executor set
                       # Python's switch interval to 0.5 ms ("normal" there): "switch:5000" is the
                       # default that the code as built keeps. Two more rounds at 10 and 25% ran at 0.5 ms.
                       "screen-switch-b1": ("cpu_experts_cuda_graphs_switch_b1_h200.json", "switch:5000"),
                       "screen-switch-b16": ("cpu_experts_cuda_graphs_switch_b16_h200.json", "switch:5000"),
                       "rounds-switch": ("cpu_experts_cuda_graphs_rounds_switch_h200.json", "normal")}
SPEEDUP_FLOOR, SLOWDOWN_FLOOR = 1.3, 1 / 1.03
POOLED = ("rounds pooled", "rounds pooled, mean steps")
MEASURED = ("predictor", "slot_share", "ms_per_token", "ms_per_token_mean", "prefill_ms")  # what a pair's rows must give
# The bench's default prompt, and the long prompt whose pass and few decode steps after it are judged
# apart (the p512 stage, and rounds files whose rows give that prompt_len): only the "never slower" floor.
SHORT_PROMPT, LONG_PROMPT = 16, 512
PROMPT_PARTS = (("the prompt's pass", "prefill_ms"), ("decode after the prompt", "ms_per_token"))


def batch1_decode(record: dict) -> bool:
    """Whether a record is of batch-1 decoding after the short prompt: what the speed-up floors cover."""
    return record["batch"] == 1 and record["prompt_len"] < LONG_PROMPT


# (label, which records it covers, the least ratio each must reach)
FLOORS = (("batch 1, 10%: ≥ 1.3×", lambda r: batch1_decode(r) and r["slots"] == "10%", SPEEDUP_FLOOR),
          ("batch 1, 25%: ≥ 1.3×", lambda r: batch1_decode(r) and r["slots"] == "25%", SPEEDUP_FLOOR),
          ("never > 3% slower", lambda r: True, SLOWDOWN_FLOOR))


class BadResults(ValueError):
    """A results file this script cannot read, named with what is wrong."""


def share_label(share: float) -> str:
    """The floors' name for a share of the experts in slots: 10% (6 of 64 Mixtral experts), 25%, 50%."""
    return "10%" if share < 0.2 else "25%" if share < 0.375 else "50%"


def load_rows(path: Path) -> tuple[list[dict], bool]:
    """A results file -> (its rows, whether its run was cut short)."""
    try:
        result = json.loads(path.read_text())
        return list(result["rows"]), bool(result.get("partial"))
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise BadResults(f"{path}: not a results file of the floors script ({type(e).__name__}: {e})") from e


def paired(rows: list[dict], path: Path, variant: str = "normal") -> list[tuple[dict, dict]]:
    """``[(GPU-only row, auto row)]``: each expertflow ``auto`` row (of ``variant`` where rows name
    one) with its GPU-only row (``gpu_only_row``: the same forecast and slots, and round, batch and
    prompt length where rows name them, of the variant ``normal``)."""
    try:
        autos = [r for r in rows if r["policy"] == "expertflow" and r["cpu_experts_asked"] == "auto"
                 and r.get("variant", "normal") == variant]
        pairs = [(off, auto) for off, auto in (
            (gpu_only_row(rows, {**r, "variant": "normal"} if "variant" in r else r,
                          ("policy", "predictor", "slots", "variant", "round", "batch", "prompt_len")), r)
            for r in autos) if off is not None]
    except (KeyError, TypeError, AttributeError) as e:
        raise BadResults(f"{path}: not a bench row ({type(e).__name__}: {e})") from e
    lacking = sorted({k for pair in pairs for r in pair for k in MEASURED if k not in r})
    if lacking:
        raise BadResults(f"{path}: rows without {', '.join(lacking)}: not a bench row")
    return pairs


def judge(results: Path, bench_files: dict = BENCH_FILES,
          rounds_files: dict = ROUNDS_FILES) -> tuple[list[dict], dict[str, list[str]]]:
    """-> (one record a ratio, the files skipped by why: not found, cut short, no pair), from
    ``bench_files`` and ``rounds_files`` (stage -> file as ``BENCH_FILES``, ``ROUNDS_FILES``). A record:
    forecast, slots (10%, 25%, 50%), batch, prompt_len, stage (the floors script's), what (one run,
    round N, rounds pooled, rounds pooled with mean steps; for a long prompt the prompt's pass and
    the decode after it of each), source (the files), off_ms, auto_ms and ratio (off over auto).
    Rounds pool by forecast, slots, batch and prompt length, and a long prompt's by file too."""
    records: list[dict] = []
    skipped: dict[str, list[str]] = {"not found": [], "cut short (what finished counts)": [], "no GPU-only and auto pair": []}

    def add(row: dict, batch: int, prompt_len: int, stage: str, what: str, source: str, off_ms: float,
            auto_ms: float) -> None:
        """One ratio; ``row`` (either of the pair) gives its forecast and slots."""
        records.append({"forecast": row["predictor"], "slots": share_label(row["slot_share"]), "batch": batch,
                        "prompt_len": prompt_len, "stage": stage, "what": what, "source": source, "off_ms": off_ms,
                        "auto_ms": auto_ms, "ratio": off_ms / auto_ms})

    def read(name: str, variant: str = "normal") -> list[tuple[dict, dict]]:
        path = results / name
        if not path.exists():
            skipped["not found"].append(name)
            return []
        rows, partial = load_rows(path)
        if partial:
            skipped["cut short (what finished counts)"].append(name)
        pairs = paired(rows, path, variant)
        if not pairs:
            skipped["no GPU-only and auto pair"].append(name)
        return pairs

    for stage, (name, batch) in bench_files.items():
        for off, auto in read(name):
            if stage == "p512":
                for what, field in PROMPT_PARTS:
                    add(off, batch, LONG_PROMPT, stage, what, name, off[field], auto[field])
            else:
                add(off, batch, SHORT_PROMPT, stage, "one run", name, off["ms_per_token"], auto["ms_per_token"])
    pools: dict[tuple, list[tuple[dict, dict, str]]] = {}  # (GPU-only row, auto row, file) by what pools
    for stage, (name, variant) in rounds_files.items():
        for off, auto in read(name, variant):
            batch, prompt_len = off.get("batch", 1), off.get("prompt_len", SHORT_PROMPT)
            long_prompt = prompt_len >= LONG_PROMPT
            parts = PROMPT_PARTS if long_prompt else (("", "ms_per_token"),)
            for what, field in parts:
                add(off, batch, prompt_len, stage, f"round {off['round']}" + (f", {what}" if what else ""), name,
                    off[field], auto[field])
            # A long prompt's files differ in the decode steps after it: each file pools apart.
            key = (off["predictor"], off["slots"], batch, prompt_len, name if long_prompt else None)
            pools.setdefault(key, []).append((off, auto, name))
    for (_, _, batch, prompt_len, _), pooled in pools.items():
        n = len(pooled)
        if prompt_len >= LONG_PROMPT:
            parts = tuple((f"{POOLED[0]} ({n}), {what}", field) for what, field in PROMPT_PARTS)
        else:
            parts = tuple((f"{what} ({n})", field) for what, field in zip(POOLED, ("ms_per_token", "ms_per_token_mean")))
        sources = "+".join(dict.fromkeys(name for _, _, name in pooled))  # each file once, in order
        for what, field in parts:
            add(pooled[0][0], batch, prompt_len, "rounds", what, sources,
                statistics.fmean(off[field] for off, _, _ in pooled), statistics.fmean(auto[field] for _, auto, _ in pooled))
    return records, skipped


def cell(records: list[dict]) -> str:
    """A table cell: the range of the single measurements (how many), then of the pooled ratios."""
    if not records:
        return "not run"

    def span(ratios: list[float]) -> str:
        low, high = f"{min(ratios):.2f}", f"{max(ratios):.2f}"
        return f"{low}×" if low == high else f"{low}–{high}×"
    single = [r["ratio"] for r in records if not r["what"].startswith(POOLED)]
    pooled = [r["ratio"] for r in records if r["what"].startswith(POOLED)]
    return f"{span(single)} ({len(single)})" + (f", pooled {span(pooled)}" if pooled else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--out", type=Path, help="every ratio as JSON")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="judge the runs with CUDA graphs (the floors script with CUDA_GRAPHS=1) instead")
    args = parser.parse_args()
    if not args.results.is_dir():
        parser.error(f"--results {args.results} is not a folder: give the folder the floors script wrote into")
    if args.out and not args.out.parent.is_dir():
        parser.error(f"--out {args.out}: its folder does not exist")
    try:
        rounds_files = GRAPHS_ROUNDS_FILES if args.cuda_graphs else ROUNDS_FILES
        records, skipped = judge(args.results, GRAPHS_BENCH_FILES if args.cuda_graphs else BENCH_FILES, rounds_files)
    except BadResults as e:
        parser.error(str(e))
    if not records:
        parser.error(f"no GPU-only and auto pair in the floors script's files in {args.results} "
                     f"({'; '.join(f'{why}: {len(names)}' for why, names in skipped.items() if names)}): "
                     "run benchmarks/cpu_experts_floors.sh first")
    print("| floor | " + " | ".join(FORECASTS.values()) + " |")
    print("|---|" + "---|" * len(FORECASTS))
    failing = []
    for label, covers, floor in FLOORS:
        cells = []
        for forecast in FORECASTS:
            mine = [r for r in records if r["forecast"] == forecast and covers(r)]
            short = [r for r in mine if r["ratio"] < floor]
            failing += [(label, r) for r in short]
            verdict = "" if not mine else "**met**: " if not short else f"**not met** ({len(short)} below): "
            cells.append(verdict + cell(mine))
        print(f"| {label} | " + " | ".join(cells) + " |")
    if failing:
        print("\nbelow the floor:")
        for label, r in failing:
            print(f"- {label}: {FORECASTS[r['forecast']]}, batch {r['batch']}, {r['slots']}, {r['what']} "
                  f"({r['source']}): {r['off_ms']:.1f} / {r['auto_ms']:.1f} ms = {r['ratio']:.3f}×")
    for why, names in skipped.items():
        if names:
            print(f"\n{why}: " + ", ".join(names))
    if args.out:
        args.out.write_text(json.dumps({"records": records, "skipped": skipped}, indent=1) + "\n")


if __name__ == "__main__":
    main()
