"""benchmarks/cpu_experts_floors_table.py: the CPU-expert floors judged from result files, on small
files written here, against ratios computed from their definition (GPU-only's step over auto's)."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import cpu_experts_floors_table as table


def row(mode: str, ms: float, mean_ms: float, variant: str | None = None, rnd: int | None = None,
        slots: str = "16", predictor: str = "history") -> dict:
    r = {"policy": "expertflow", "predictor": predictor, "slots": slots, "slot_share": int(slots) / 64,
         "cpu_experts_asked": mode, "ms_per_token": ms, "ms_per_token_mean": mean_ms, "prefill_ms": 100.0}
    if variant is not None:
        r.update(variant=variant, round=rnd)
    return r


def write(folder: Path, name: str, rows: list[dict], partial: bool = False) -> None:
    (folder / name).write_text(json.dumps({"rows": rows, **({"partial": True} if partial else {})}))


def test_rounds_pair_each_files_auto_variant_with_its_rounds_gpu_only_and_pool_them(tmp_path):
    """A rounds file of the variant ``normal`` and one whose auto rows are ``unguarded``: each auto row
    pairs with the GPU-only row of its own round (variant ``normal``), never another variant's auto;
    the pooled ratios are the mean of the GPU-only medians (mean steps) over auto's, over both files."""
    normal_name = table.ROUNDS_FILES["rounds"][0]
    unguarded_name, variant = table.ROUNDS_FILES["rounds-unguarded4"]
    assert variant == "unguarded"
    write(tmp_path, normal_name, [row("off", 80.0, 81.0, "normal", 0), row("auto", 60.0, 62.0, "normal", 0),
                                  row("auto", 55.0, 57.0, "on", 0), row("off", 70.0, 72.0, "normal", 1),
                                  row("auto", 50.0, 49.0, "normal", 1)])
    write(tmp_path, unguarded_name, [row("off", 90.0, 91.0, "normal", 0), row("auto", 40.0, 41.0, "normal", 0),
                                     row("auto", 60.0, 65.0, "unguarded", 0)])
    records, skipped = table.judge(tmp_path)
    rounds = {(r["source"], r["what"]): r["ratio"] for r in records if r["what"].startswith("round ")}
    assert rounds == {(normal_name, "round 0"): pytest.approx(80 / 60), (normal_name, "round 1"): pytest.approx(70 / 50),
                      (unguarded_name, "round 0"): pytest.approx(90 / 60)}
    pooled = {r["what"]: r["ratio"] for r in records if r["what"].startswith(table.POOLED)}
    assert pooled == {
        "rounds pooled (3)": pytest.approx(statistics.fmean([80, 70, 90]) / statistics.fmean([60, 50, 60])),
        "rounds pooled, mean steps (3)": pytest.approx(statistics.fmean([81, 72, 91]) / statistics.fmean([62, 49, 65]))}
    assert all(r["batch"] == 1 and r["slots"] == "25%" for r in records)
    assert table.ROUNDS_FILES["rounds4"][0] in skipped["not found"]
    assert table.BENCH_FILES["b1"][0] in skipped["not found"]


def test_a_bench_file_cut_short_counts_what_finished_and_a_prompt_file_gives_its_pass_and_decode(tmp_path):
    b1, _ = table.BENCH_FILES["b1"]
    p512, _ = table.BENCH_FILES["p512"]
    write(tmp_path, b1, [row("off", 50.0, 50.0, slots="32"), row("auto", 52.0, 51.0, slots="32")], partial=True)
    write(tmp_path, p512, [{**row("off", 20.0, 20.0, slots="6"), "prefill_ms": 300.0},
                           {**row("auto", 25.0, 24.0, slots="6"), "prefill_ms": 250.0}])
    records, skipped = table.judge(tmp_path)
    got = {(r["stage"], r["what"], r["slots"]): r["ratio"] for r in records}
    assert got == {("b1", "one run", "50%"): pytest.approx(50 / 52),
                   ("p512", "the prompt's pass", "10%"): pytest.approx(300 / 250),
                   ("p512", "decode after the prompt", "10%"): pytest.approx(20 / 25)}
    assert skipped["cut short (what finished counts)"] == [b1]


def test_a_file_that_is_not_a_results_file_is_named(tmp_path):
    (tmp_path / table.BENCH_FILES["b4"][0]).write_text("[1, 2]")
    with pytest.raises(table.BadResults, match=table.BENCH_FILES["b4"][0]):
        table.judge(tmp_path)
    (tmp_path / table.BENCH_FILES["b4"][0]).write_text(json.dumps({"rows": [{"policy": "expertflow"}]}))
    with pytest.raises(table.BadResults, match="not a bench row"):
        table.judge(tmp_path)


def test_the_cuda_graph_runs_are_judged_apart(tmp_path):
    """The runs with CUDA graphs have files of their own: judging them reads those only, and the
    default judges the others only."""
    graphs_b1, _ = table.GRAPHS_BENCH_FILES["b1"]
    assert graphs_b1 == "cpu_experts_cuda_graphs_b1_h200.json"
    write(tmp_path, graphs_b1, [row("off", 40.0, 40.0), row("auto", 25.0, 26.0)])
    write(tmp_path, table.BENCH_FILES["b1"][0], [row("off", 80.0, 80.0), row("auto", 64.0, 64.0)])
    graphs, _ = table.judge(tmp_path, table.GRAPHS_BENCH_FILES, table.GRAPHS_ROUNDS_FILES)
    plain, _ = table.judge(tmp_path)
    assert [(r["source"], r["ratio"]) for r in graphs] == [(graphs_b1, pytest.approx(40 / 25))]
    assert [(r["source"], r["ratio"]) for r in plain] == [(table.BENCH_FILES["b1"][0], pytest.approx(80 / 64))]


def test_rounds_of_a_long_prompt_or_a_larger_batch_pool_apart_and_count_toward_no_speedup_floor(tmp_path):
    """Rows that give their batch and prompt length (the variants script's ``--batch``,
    ``--prompt-len``) pool by them: a 512-token prompt's rounds give each round's pass and decode
    after it, and pooled ratios of each; a batch-4 round pools apart from batch 1's. Neither counts
    toward the batch-1 speed-up floors."""
    name = table.GRAPHS_ROUNDS_FILES["p512-rounds"][0]

    def long(mode: str, ms: float, prefill_ms: float, rnd: int) -> dict:
        return {**row(mode, ms, ms + 1, "normal", rnd), "batch": 1, "prompt_len": 512, "prefill_ms": prefill_ms}
    write(tmp_path, name, [long("off", 40.0, 300.0, 0), long("auto", 30.0, 330.0, 0),
                           long("off", 44.0, 310.0, 1), long("auto", 40.0, 290.0, 1)])
    batch4 = table.GRAPHS_ROUNDS_FILES["rounds"][0]
    write(tmp_path, batch4, [{**row("off", 60.0, 61.0, "normal", 0), "batch": 4},
                             {**row("auto", 50.0, 52.0, "normal", 0), "batch": 4},
                             row("off", 70.0, 71.0, "normal", 0), row("auto", 50.0, 51.0, "normal", 0)])
    records, _ = table.judge(tmp_path, {}, table.GRAPHS_ROUNDS_FILES)
    got = {(r["batch"], r["prompt_len"], r["what"]): r["ratio"] for r in records}
    assert got == {
        (1, 512, "round 0, the prompt's pass"): pytest.approx(300 / 330),
        (1, 512, "round 0, decode after the prompt"): pytest.approx(40 / 30),
        (1, 512, "round 1, the prompt's pass"): pytest.approx(310 / 290),
        (1, 512, "round 1, decode after the prompt"): pytest.approx(44 / 40),
        (1, 512, "rounds pooled (2), the prompt's pass"): pytest.approx((300 + 310) / (330 + 290)),
        (1, 512, "rounds pooled (2), decode after the prompt"): pytest.approx((40 + 44) / (30 + 40)),
        (4, 16, "round 0"): pytest.approx(60 / 50),
        (4, 16, "rounds pooled (1)"): pytest.approx(60 / 50),
        (4, 16, "rounds pooled, mean steps (1)"): pytest.approx(61 / 52),
        (1, 16, "round 0"): pytest.approx(70 / 50),
        (1, 16, "rounds pooled (1)"): pytest.approx(70 / 50),
        (1, 16, "rounds pooled, mean steps (1)"): pytest.approx(71 / 51)}
    # Another file of the long prompt (fewer decode steps after it) pools apart from the first.
    write(tmp_path, table.GRAPHS_ROUNDS_FILES["p512-rounds-4tokens"][0], [long("off", 20.0, 200.0, 0), long("auto", 25.0, 250.0, 0)])
    pooled = {(r["source"], r["what"]): r["ratio"] for r in table.judge(tmp_path, {}, table.GRAPHS_ROUNDS_FILES)[0]
              if r["what"].startswith(table.POOLED[0]) and r["prompt_len"] == 512}
    short_name = table.GRAPHS_ROUNDS_FILES["p512-rounds-4tokens"][0]
    assert pooled == {(name, "rounds pooled (2), the prompt's pass"): pytest.approx(610 / 620),
                      (name, "rounds pooled (2), decode after the prompt"): pytest.approx(84 / 70),
                      (short_name, "rounds pooled (1), the prompt's pass"): pytest.approx(200 / 250),
                      (short_name, "rounds pooled (1), decode after the prompt"): pytest.approx(20 / 25)}
    ten, twenty_five, _ = (covers for _, covers, _ in table.FLOORS)
    assert {(r["batch"], r["prompt_len"]) for r in records if twenty_five(r)} == {(1, 16)}
    assert not any(ten(r) for r in records)  # all at 25% slots
