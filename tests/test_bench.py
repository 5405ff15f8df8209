"""The real-shape benchmark harness, on the CPU with shrunken dimensions (the H200 runs it full size)."""

from __future__ import annotations

import json
import re

import pytest

from expertflow.bench import BenchConfig, belady_bytes, format_table, gpu_only_row, make_config, plot, run_bench
from expertflow.cli import main
from expertflow.replay import replay
from expertflow.traces import synthetic_trace, write_jsonl_trace

TINY = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, vocab_size=101)


@pytest.fixture(autouse=True)
def host_backend(monkeypatch):
    monkeypatch.setenv("EXPERTFLOW_BACKEND", "host")


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("trace") / "t.jsonl"
    write_jsonl_trace(synthetic_trace(num_layers=6, num_experts=8, top_k=2, num_tokens=60, seed=5), path)
    return path


def config(trace_file, **kw) -> BenchConfig:
    base = dict(arch="mixtral-8x7b", layers=4, routing=f"trace:{trace_file}", slots=["25%"], new_tokens=10,
                prompt_len=3, policies=["all_gpu", "lru", "gate_ahead", "expertflow"],
                predictors=["history", "oracle", "noisy-oracle:0.8", "gate-oracle:0.8"], config_overrides=TINY,
                progress=False)
    return BenchConfig(**{**base, **kw})


def test_shapes_are_the_published_dimensions():
    c = make_config("mixtral-8x7b", num_layers=2)
    assert (c.hidden_size, c.intermediate_size, c.num_local_experts, c.num_hidden_layers) == (4096, 14336, 8, 2)
    c = make_config("deepseek-v2-lite", num_layers=3)
    assert c.num_hidden_layers == 4 and c.first_k_dense_replace == 1  # the dense first layer stays
    assert make_config("gpt-oss-120b", top_k=2).num_experts_per_tok == 2
    with pytest.raises(ValueError, match="--layers must be between 1 and 16"):
        make_config("olmoe-1b-7b", num_layers=17)
    with pytest.raises(ValueError, match="unknown --arch 'gpt-5'"):
        make_config("gpt-5")


def test_trace_forced_bench_rows_and_bound(trace_file, tmp_path):
    result = run_bench(config(trace_file, batch=2))
    rows = result["rows"]
    labels = [(r["policy"], r["predictor"]) for r in rows]
    assert labels == [("all_gpu", None), ("lru", None), ("gate_ahead", "gate-oracle:0.8"), ("expertflow", "history"),
                      ("expertflow", "oracle"), ("expertflow", "noisy-oracle:0.8"), ("expertflow", "gate-oracle:0.8")]
    assert all(r["same_tokens_as_all_gpu"] for r in rows)  # one arithmetic, whatever moves the bytes
    assert result["top_k"] == 2 and result["num_experts"] == 8 and result["batch"] == 2
    by = {label: r for label, r in zip(labels, rows)}
    oracle, lru = by[("expertflow", "oracle")], by[("lru", None)]
    assert oracle["bytes_vs_belady"] <= 1.10 and oracle["demand_misses_per_token"] < lru["demand_misses_per_token"]
    for r in rows[1:]:
        assert r["bound_ms"] >= result["all_gpu_ms"] and r["belady_bytes_per_token"] > 0
        assert r["x_lru"] == pytest.approx(r["ms_per_token"] / lru["ms_per_token"])
    table = [re.split(r"\s{2,}", line.strip()) for line in format_table(result).splitlines() if "  " in line]
    header, body = table[0], table[2:]  # then the dashes, then one line a row
    assert len(body) == len(rows) and "oracle" in {cells[1] for cells in body}
    for cells, r in zip(body, rows):  # the median step, and beside it the mean (the decode steps' total time)
        assert cells[header.index("ms/token")] == f"{r['ms_per_token']:.2f}"
        assert cells[header.index("mean")] == f"{r['ms_per_token_mean']:.2f}"
    plot(result, tmp_path / "b.png")
    assert (tmp_path / "b.png").stat().st_size > 10_000


def test_cpu_expert_rows_give_their_time_over_gpu_only(trace_file):
    """Each row of a CPU-expert mode other than ``off`` is divided by the GPU-only row of its own
    policy, forecast and slots (decode step and prompt pass); GPU-only rows and ``all_gpu`` get none."""
    result = run_bench(config(trace_file, slots=["25%", "50%"], policies=["all_gpu", "lru", "expertflow"],
                              predictors=["history", "oracle"], cpu_experts=["off", "on"], new_tokens=4))
    rows = result["rows"]
    off = {(r["policy"], r["predictor"], r["slots"]): r for r in rows if r["cpu_experts_asked"] == "off"}
    on = [r for r in rows if r["cpu_experts_asked"] == "on"]
    assert len(on) == 2 * 3 and any(r["cpu_experts_per_token"] > 0 for r in on)  # (lru + expertflow x 2 forecasts) x 2 slots
    for r in on:
        ref = off[(r["policy"], r["predictor"], r["slots"])]
        assert r["x_gpu_only"] == pytest.approx(r["ms_per_token"] / ref["ms_per_token"])
        assert r["prefill_x_gpu_only"] == pytest.approx(r["prefill_ms"] / ref["prefill_ms"])
    assert all(r["x_gpu_only"] is None and r["prefill_x_gpu_only"] is None for r in off.values())
    table = [re.split(r"\s{2,}", line.strip()) for line in format_table(result).splitlines() if "  " in line]
    header, body = table[0], table[2:]
    assert [cells[header.index("x gpu-only")] for cells in body] == [
        "-" if r["x_gpu_only"] is None else f"{r['x_gpu_only']:.2f}" for r in rows]
    alone = run_bench(config(trace_file, policies=["lru"], cpu_experts=["on"], new_tokens=2))["rows"]
    assert [(r["policy"], r["cpu_experts_asked"], r["x_gpu_only"]) for r in alone] == [
        ("all_gpu", "off", None), ("lru", "on", None)]  # no GPU-only lru row to divide by


def test_a_cpu_expert_row_pairs_with_the_gpu_only_row_that_agrees_with_it():
    """Written from the definition: the GPU-only row of the same policy, forecast and slots, and of
    the same round where the caller names ``round`` (a rounds file holds one pair a round)."""
    def row(mode, slots="16", predictor="oracle", rnd=0):
        return {"policy": "expertflow", "predictor": predictor, "slots": slots, "cpu_experts_asked": mode, "round": rnd}
    rows = [row("off", rnd=0), row("auto", rnd=0), row("auto", rnd=1), row("off", rnd=1), row("off", slots="32"),
            row("on", predictor="history")]
    assert gpu_only_row(rows, rows[0]) is None  # a GPU-only row itself
    assert gpu_only_row(rows, rows[2]) is rows[0]  # policy, forecast and slots alone: the first such
    by_round = ("policy", "predictor", "slots", "round")
    assert gpu_only_row(rows, rows[1], by_round) is rows[0] and gpu_only_row(rows, rows[2], by_round) is rows[3]
    assert gpu_only_row(rows, rows[5]) is None  # no GPU-only row of its forecast


def test_belady_bytes_match_replay():
    trace = synthetic_trace(num_layers=4, num_experts=8, top_k=2, num_tokens=30, seed=2)
    visits = list(trace.layer_visits())
    assert belady_bytes(visits, 6, 1000, 0) == replay(trace, 6, "belady").misses * 1000
    assert belady_bytes(visits, 6, 1000, len(visits)) == 0
    # A visit wider than the cache runs in waves (a prefill routing to every expert).
    wide = [(0, list(range(8))), (1, [0, 1]), (0, [7, 6])]
    assert belady_bytes(wide, 3, 1, 0) == 8 + 2 + 1


def test_bad_input_is_refused_before_work(trace_file, tmp_path):
    with pytest.raises(ValueError, match="routes among 8 experts but olmoe-1b-7b has 64"):
        run_bench(config(trace_file, arch="olmoe-1b-7b", config_overrides={**TINY, "num_experts": 64}))
    with pytest.raises(ValueError, match="the trace has 6 layers; a model of 7 layers needs"):
        run_bench(config(trace_file, layers=7))
    with pytest.raises(ValueError, match="unknown predictor 'psychic'"):
        run_bench(config(trace_file, predictors=["psychic"]))
    with pytest.raises(ValueError, match="either --model .* or --arch"):
        run_bench(BenchConfig())
    with pytest.raises(ValueError, match="slots '0%' is not a share of the experts"):
        run_bench(config(trace_file, slots=["0%"]))
    with pytest.raises(ValueError, match="needs a GPU"):
        run_bench(config(trace_file, accelerate="25%"))


def test_cli_bench_arch_json(trace_file, tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["bench", "--arch", "mixtral-8x7b", "--layers", "2", "--routing", f"trace:{trace_file}", "--slots", "25%,50%",
            "--policies", "lru,expertflow", "--predictors", "oracle", "--new-tokens", "4", "--prompt-len", "2",
            "--out", str(out)]
    # The CLI builds full-size dimensions: shrink them for the CPU by patching the shapes table.
    from expertflow.bench import shapes

    original = shapes.SHAPES["mixtral-8x7b"]
    shapes.SHAPES["mixtral-8x7b"] = shapes.Shape(original.model_type, {**original.config, **TINY}, original.source)
    try:
        assert main(argv) == 0
    finally:
        shapes.SHAPES["mixtral-8x7b"] = original
    result = json.loads(out.read_text())
    assert [r["slots"] for r in result["rows"]] == ["100%", "25%", "25%", "50%", "50%"]
    assert out.with_suffix(".png").exists() and "x bound" in capsys.readouterr().out
    assert main(["bench", "--arch", "mixtral-8x7b", "--prompt", "hi"]) == 2
    assert "--prompt and --prompt-ids need a checkpoint" in capsys.readouterr().err


SMALL = {  # each published shape, shrunk for the CPU; the families' own configs otherwise
    "qwen3-30b-a3b": dict(moe_intermediate_size=16, head_dim=8, num_experts=16),
    "gpt-oss-120b": dict(head_dim=8, num_local_experts=16),
    "deepseek-v2-lite": dict(moe_intermediate_size=16, num_key_value_heads=4, n_routed_experts=16, kv_lora_rank=16,
                             qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8),
    "olmoe-1b-7b": dict(num_key_value_heads=4, num_experts=16, eos_token_id=100, pad_token_id=1),
}


@pytest.mark.parametrize("arch", SMALL)
def test_every_shape_runs_with_live_routing(arch):
    result = run_bench(BenchConfig(arch=arch, layers=2, slots=["25%"], policies=["all_gpu", "lru", "expertflow"],
                                   new_tokens=4, prompt_len=3, config_overrides={**TINY, **SMALL[arch]}, progress=False))
    assert [r["policy"] for r in result["rows"]] == ["all_gpu", "lru", "expertflow"]
    assert all(r["same_tokens_as_all_gpu"] for r in result["rows"])
    assert result["num_layers"] == 2 and result["num_experts"] == 16
    assert result["top_k"] == make_config(arch).num_experts_per_tok


def test_checkpoints_the_bench_cannot_time_are_refused(tmp_path):
    from moe_models import build, save

    switch = save(build("switch_transformers"), tmp_path / "switch", "published")
    with pytest.raises(ValueError, match="encoder-decoder model; the benchmark times decoder-only models"):
        run_bench(BenchConfig(model=str(switch), slots=["50%"], policies=["lru"], new_tokens=2, progress=False))
    mixtral = save(build("mixtral"), tmp_path / "mixtral", "published")  # 8 experts, top-2
    top3 = tmp_path / "top3.jsonl"
    write_jsonl_trace(synthetic_trace(num_layers=3, num_experts=8, top_k=3, num_tokens=20, seed=0), top3)
    with pytest.raises(ValueError, match="routes each token to 3 experts but the model to 2"):
        run_bench(BenchConfig(model=str(mixtral), routing=f"trace:{top3}", slots=["50%"], policies=["lru"],
                              new_tokens=2, progress=False))


@pytest.mark.parametrize("expert_dtype, ratio", [("fp8", 0.5), ("mxfp4", 4.25 / 16)])
def test_compressed_experts_move_fewer_bytes(trace_file, expert_dtype, ratio):
    """--expert-dtype: the pool holds the experts compressed, every policy still gives all_gpu's
    tokens, and each copy moves the compressed bytes (the bf16 expert's share, 256-byte aligned)."""
    sizes = {**TINY, "intermediate_size": 64}  # mxfp4 blocks: input sizes that are multiples of 32
    dense = run_bench(config(trace_file, policies=["all_gpu", "lru"], predictors=["history"], config_overrides=sizes))
    packed = run_bench(config(trace_file, policies=["all_gpu", "lru"], predictors=["history"], config_overrides=sizes,
                              expert_dtype=expert_dtype))
    assert packed["expert_dtype"] == expert_dtype and dense["expert_dtype"] == "dense"
    assert packed["dense_expert_bytes"] == dense["expert_bytes"]
    assert packed["expert_bytes"] == pytest.approx(ratio * dense["expert_bytes"], rel=0.25)  # alignment of tiny tensors
    assert all(r["same_tokens_as_all_gpu"] for r in packed["rows"])
    lru_dense, lru_packed = dense["rows"][1], packed["rows"][1]
    assert lru_packed["bytes_per_token"] / lru_dense["bytes_per_token"] == pytest.approx(
        packed["expert_bytes"] / dense["expert_bytes"])  # the same misses, each moving fewer bytes


def test_bench_times_a_quantized_checkpoint_in_its_own_format(tmp_path):
    """A checkpoint that ships compressed experts (gpt-oss MXFP4) is timed as it is stored."""
    from moe_models import build, save

    folder = save(build("gpt_oss"), tmp_path / "mxfp4", "mxfp4")
    result = run_bench(BenchConfig(model=str(folder), slots=["50%"], policies=["all_gpu", "lru"], new_tokens=4,
                                   prompt_len=3, transformers=False, progress=False))
    assert result["expert_dtype"] == "mxfp4" and result["expert_bytes"] < result["dense_expert_bytes"] / 3
    assert all(r["same_tokens_as_all_gpu"] for r in result["rows"])
