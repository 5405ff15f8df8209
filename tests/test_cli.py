"""The command line and the bundled model."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from expertflow.cli import BUNDLED_MODEL, main

from conftest import cli_exit_code
from moe_models import build, save


@pytest.fixture(autouse=True)
def host_backend(monkeypatch):
    monkeypatch.setenv("EXPERTFLOW_BACKEND", "host")


def run_json(capsys, *argv) -> dict:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_bundled_model_is_small_trained_and_non_uniform():
    size = sum(f.stat().st_size for f in BUNDLED_MODEL.iterdir())
    assert size <= 8 * 2**20
    config = json.loads((BUNDLED_MODEL / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["num_local_experts"], config["num_experts_per_tok"]) == ("mixtral", 8, 16, 2)
    report = json.loads((BUNDLED_MODEL / "training_report.json").read_text())
    assert report["val_perplexity"] < 100  # the vocabulary has 4096 entries: uniform guessing is 4096
    uniform = math.log2(config["num_local_experts"])
    assert all(h < uniform - 0.5 for h in report["routing_entropy_bits"])


def test_generate_matches_transformers_on_the_bundled_model(capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(BUNDLED_MODEL)
    # bf16: compare with the eager experts loop, the arithmetic the offloaded experts run
    reference = AutoModelForCausalLM.from_pretrained(BUNDLED_MODEL, experts_implementation="eager").eval()
    ids = tokenizer("ROMEO:", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = reference.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1] :].tolist()
    for policy in ("lru", "expertflow"):
        out = run_json(capsys, "generate", "--prompt", "ROMEO:", "--max-new-tokens", "24", "--expert-slots", "25%",
                       "--policy", policy, "--json")
        assert out["token_ids"] == want
        assert out["text"] == tokenizer.decode(want, skip_special_tokens=True)
        assert out["stats"]["num_slots"] == 32 and out["stats"]["misses"] > 0


def test_generate_prompt_ids_and_sampling(capsys, tmp_path):
    folder = save(build("qwen3_moe"), tmp_path / "qwen3", "published")  # no tokenizer
    out = run_json(capsys, "generate", "--model", str(folder), "--prompt-ids", "3,14,15", "--max-new-tokens", "6", "--json")
    assert len(out["token_ids"]) == 6 and out["text"] is None
    a = run_json(capsys, "generate", "--model", str(folder), "--prompt-ids", "3,14", "--max-new-tokens", "8",
                 "--do-sample", "--temperature", "2.0", "--seed", "1", "--json")
    b = run_json(capsys, "generate", "--model", str(folder), "--prompt-ids", "3,14", "--max-new-tokens", "8",
                 "--do-sample", "--temperature", "2.0", "--seed", "1", "--json")
    assert a["token_ids"] == b["token_ids"]  # sampling is seeded
    assert main(["generate", "--model", str(tmp_path / "nowhere"), "--prompt", "hello"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", "--model", str(folder), "--prompt", "hello"]) == 2
    assert "has no tokenizer; pass --prompt-ids" in capsys.readouterr().err
    assert main(["generate", "--model", str(folder), "--prompt-ids", "1,x"]) == 2
    assert "comma-separated integers" in capsys.readouterr().err
    assert main(["generate", "--model", str(folder), "--prompt-ids", "1", "--gpu-memory", "10KB"]) == 2
    assert "is below the minimum of" in capsys.readouterr().err
    if not torch.cuda.is_available():  # CUDA graphs: refused before any weight loads
        assert main(["generate", "--model", str(folder), "--prompt-ids", "1", "--cuda-graphs"]) == 2
        assert "needs a CUDA device" in capsys.readouterr().err
        assert main(["bench", "--model", str(folder), "--prompt-ids", "1", "--cuda-graphs", "--policies", "lru"]) == 2
        assert "needs a CUDA device" in capsys.readouterr().err


def test_a_bench_cut_short_keeps_the_configurations_it_finished(capsys, tmp_path, monkeypatch):
    """The third configuration fails (as a run past its time limit stops): --out holds the two that
    finished, marked partial, with the command that ran them; no plot is written for a partial run."""
    import expertflow.bench.harness as harness

    attach = harness.attach

    def failing_attach(model, arch, pool, num_slots, policy, *args, **kwargs):
        if getattr(policy, "name", policy) == "next_layers":
            raise RuntimeError("stopped")
        return attach(model, arch, pool, num_slots, policy, *args, **kwargs)

    monkeypatch.setattr(harness, "attach", failing_attach)
    out = tmp_path / "bench.json"
    assert main(["bench", "--prompt", "ROMEO:", "--max-new-tokens", "3", "--slots", "25%",
                 "--policies", "lru,next_layers,gate_ahead", "--json", "--out", str(out)]) == 2
    assert "stopped" in capsys.readouterr().err
    saved = json.loads(out.read_text())
    assert saved["partial"] is True and [r["policy"] for r in saved["rows"]] == ["all_gpu", "lru"]
    assert saved["all_gpu_ms"] == saved["rows"][0]["ms_per_token"] and "x_lru" not in saved["rows"][1]
    assert not out.with_suffix(".png").exists()
    monkeypatch.setattr(harness, "attach", attach)
    assert main(["bench", "--prompt", "ROMEO:", "--max-new-tokens", "3", "--slots", "25%", "--policies", "lru",
                 "--json", "--out", str(out), "--force"]) == 0
    whole = json.loads(out.read_text())
    assert "partial" not in whole and [r["policy"] for r in whole["rows"]] == ["all_gpu", "lru"]


def test_generate_prints_text_and_summary(capsys):
    assert main(["generate", "--prompt", "ROMEO:", "--max-new-tokens", "8", "--expert-slots", "25%"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("8 tokens in ") and "policy expertflow, 32 slots" in out[-1]


def test_the_summary_counts_the_cpus_experts_among_the_uses(capsys):
    """With CPU experts the hit ratio is over every use, the CPU's too: the fraction printed beside it
    says so, and names the CPU's share."""
    assert main(["generate", "--prompt", "ROMEO:", "--max-new-tokens", "4", "--expert-slots", "25%",
                 "--cpu-experts", "on", "--cpu-threads", "1"]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    ratio, hits, uses, num_cpu = re.search(r"hit ratio ([\d.]+)% \((\d+)/(\d+), (\d+) on the CPU", summary).groups()
    assert int(num_cpu) > 0 and int(hits) < int(uses)
    assert float(ratio) == pytest.approx(100 * int(hits) / int(uses), abs=0.05)


def test_bench_every_policy_same_tokens(capsys, tmp_path):
    out = tmp_path / "bench.json"
    result = run_json(capsys, "bench", "--prompt", "ROMEO:", "--max-new-tokens", "12", "--slots", "25%", "--json",
                      "--out", str(out))
    rows = result["rows"]
    assert [(r["policy"], r["predictor"]) for r in rows] == [
        ("all_gpu", None), ("lru", None), ("next_layers", None), ("gate_ahead", "router"),
        ("expertflow", "history+router"), ("expertflow", "tiny-mixtral-predictor.safetensors+router")]
    assert all(r["same_tokens_as_all_gpu"] for r in rows)
    assert rows[0]["hit_ratio"] == 1.0 and rows[0]["bytes_per_token"] == 0 and rows[0]["x_bound"] == 1.0
    assert all(r["bytes_per_token"] > 0 and r["bound_ms"] > 0 for r in rows[1:])
    assert all(r["bytes_per_token"] >= r["belady_bytes_per_token"] * 0.5 for r in rows[1:])
    assert json.loads(out.read_text())["rows"] == rows and out.with_suffix(".png").stat().st_size > 10_000
    assert main(["bench", "--prompt", "ROMEO:", "--max-new-tokens", "4", "--slots", "25%", "--policies", "lru,gate_ahead"]) == 0
    table = capsys.readouterr().out
    assert "ms/token" in table and "gate_ahead" in table and "NO" not in table
    assert main(["bench", "--policies", "lru,mru"]) == 2
    assert "unknown policy 'mru'" in capsys.readouterr().err
    assert main(["bench", "--routing", "trace:/nonexistent.jsonl"]) == 2
    assert "does not exist" in capsys.readouterr().err



@pytest.mark.parametrize("argv,message", [
    (["--expert-slots", "inf%"], "--expert-slots 'inf%' is not a share of the experts"),
    (["--expert-slots", "nan%"], "--expert-slots 'nan%' is not a share of the experts"),
    (["--expert-slots", "x"], "--expert-slots 'x' is neither a whole number of slots"),
    (["--expert-slots", "2.5"], "--expert-slots '2.5' is neither a whole number of slots"),
    (["--expert-slots", "0"], "--expert-slots '0' is neither a whole number of slots"),
    (["--dtype", "abc"], "dtype 'abc' is not a compute dtype; use float32, float16, bfloat16"),
    (["--dtype", "float8_e4m3fn"], "dtype 'float8_e4m3fn' is not a compute dtype"),
    (["--gpu-memory", "lots"], "cannot read 'lots' as a size"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: 0 is below the minimum of 1"),
    (["--top-p", "1.5"], "argument --top-p: 1.5 is outside (0, 1]"),
    (["--temperature", "0"], "argument --temperature: 0 is outside (0, inf]"),
    (["--prompt-ids", "999999"], "prompt token ids 999999 are outside this model's vocabulary of 4096"),
    (["--prompt-ids", "5,-3"], "prompt token ids -3 are outside this model's vocabulary"),
])
def test_generate_refuses_bad_arguments_before_loading(capsys, monkeypatch, argv, message):
    import expertflow.cli as cli

    def no_load(*args, **kwargs):
        raise AssertionError("the model loaded before its arguments were checked")

    monkeypatch.setattr(cli, "_load", no_load)
    if "--prompt-ids" not in argv:
        argv = [*argv, "--prompt", "ROMEO:"]
    assert cli_exit_code(["generate", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv", [["--layers", "0"], ["--tokens", "-1"], ["--experts", "0"], ["--top-k", "0"]])
def test_synth_trace_refuses_empty_outputs(tmp_path, capsys, argv):
    out = tmp_path / "t.jsonl"
    assert cli_exit_code(["synth-trace", "--out", str(out), *argv]) == 2
    assert "is below the minimum of 1" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("argv", [["--epochs", "0"], ["--hidden", "0"]])
def test_train_predictor_refuses_untrained_outputs(tmp_path, capsys, argv):
    out = tmp_path / "p.safetensors"
    assert cli_exit_code(["train-predictor", "--traces", str(tmp_path), "--out", str(out), *argv]) == 2
    assert "is below the minimum of 1" in capsys.readouterr().err
    assert not out.exists()


def test_outputs_are_not_overwritten_without_force(tmp_path, capsys):
    out = tmp_path / "t.jsonl"
    out.write_text("precious\n")
    trace = tmp_path / "trace"
    trace.mkdir()
    (trace / "meta.json").write_text("{}")
    for command, target in ((["synth-trace", "--out", str(out)], out),
                            (["train-predictor", "--traces", str(tmp_path), "--out", str(out)], out),
                            (["trace", "--prompts", str(out), "--out", str(trace)], trace)):
        assert cli_exit_code(command) == 2
        assert f"{target} already exists; pass --force to overwrite it" in capsys.readouterr().err
        assert out.read_text() == "precious\n" and (trace / "meta.json").read_text() == "{}"
    assert cli_exit_code(["synth-trace", "--out", str(out), "--layers", "2", "--tokens", "3", "--force"]) == 0
    assert len(out.read_text().splitlines()) == 2 * 3


def test_a_failed_write_leaves_the_previous_output(tmp_path, monkeypatch):
    """Outputs are written under a temporary name and renamed: a write that fails midway (a full disk)
    leaves the old file whole and no partial file beside it."""
    import expertflow.traces as traces

    out = tmp_path / "t.jsonl"
    out.write_text("precious\n")
    real_dumps = json.dumps
    calls = []

    def dumps_then_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise OSError(28, "No space left on device")
        return real_dumps(*args, **kwargs)

    monkeypatch.setattr(traces.json, "dumps", dumps_then_fail)
    with pytest.raises(OSError, match="No space left"):
        traces.write_jsonl_trace(traces.synthetic_trace(num_layers=2, num_tokens=4), out)
    assert out.read_text() == "precious\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl"]


def test_force_never_deletes_what_the_output_would_not_hold(tmp_path, capsys):
    folder = tmp_path / "precious"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("keep me")
    assert cli_exit_code(["synth-trace", "--out", str(folder), "--force", "--tokens", "2"]) == 2
    assert "is a folder and this command writes a file there" in capsys.readouterr().err
    assert cli_exit_code(["trace", "--prompts", str(folder / "notes.txt"), "--out", str(folder), "--force"]) == 2
    assert "holds notes.txt, sub, which this command does not write" in capsys.readouterr().err
    afile = tmp_path / "a.jsonl"
    afile.write_text("x\n")
    assert cli_exit_code(["trace", "--prompts", str(folder / "notes.txt"), "--out", str(afile), "--force"]) == 2
    assert "is a file and this command writes a folder there" in capsys.readouterr().err
    assert (folder / "notes.txt").read_text() == "keep me" and afile.read_text() == "x\n"


@pytest.mark.parametrize("argv,message", [
    (["synth-trace", "--experts", "4", "--top-k", "5"], "--top-k 5 is more than the 4 experts a layer has"),
    (["synth-trace", "--experts", "100000"], "traces hold at most 4096 layers and 65536 experts per layer"),
    (["generate", "--policy", "lru", "--predictor", "p.safetensors", "--prompt", "x"], "--predictor drives the expertflow policy only"),
    (["bench", "--layers", "2"], "--layers applies to --arch models"),
    (["bench", "--batch", "1,4", "--accelerate", "25%"], "--accelerate runs with one --batch size"),
    (["generate", "--nproc-per-node", "2", "--cpu-experts", "on", "--prompt-ids", "1,2"], "does not combine with distributed"),
    (["bench", "--cpu-experts", "auto", "--cpu-threads", "0"], "--cpu-threads"),
    (["generate", "--cpu-threads", "2", "--prompt-ids", "1,2"], "cpu_threads applies to cpu_experts"),
    (["generate", "--cpu-experts", "on", "--cpu-threads", "4097", "--prompt-ids", "1,2"], "4097 is more than 4096 threads"),
    (["bench", "--new-tokens", "1"], "1 is below the minimum of 2"),
    (["bench", "--out", "r.png"], "give a name that does not end in .png"),
    (["bench", "--out", " "], "--out is empty"),
    (["bench", "--layer-trace"], "--layer-trace adds its records to the JSON results"),
    (["bench", "--policies", "lru", "--predictors", "history"], "--predictors drive the expertflow policy only"),
])
def test_contradictory_arguments_are_refused(tmp_path, capsys, argv, message):
    if argv[0] == "synth-trace":
        argv = [*argv, "--out", str(tmp_path / "t.jsonl")]
    assert cli_exit_code(argv) == 2
    assert message in capsys.readouterr().err


def test_prompt_files_are_checked(tmp_path, capsys):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": 5}\n')
    for prompts, message in ((tmp_path, "does not exist or is not a file"), (bad, "p.jsonl:2: not a JSON object with a non-empty string 'prompt'")):
        assert cli_exit_code(["trace", "--prompts", str(prompts), "--out", str(tmp_path / "t")]) == 2
        assert message in capsys.readouterr().err


def test_a_folder_without_config_is_named_as_such(tmp_path, capsys):
    assert cli_exit_code(["generate", "--model", str(tmp_path), "--prompt", "x"]) == 2
    assert "has no config.json; pass the folder of a transformers checkpoint" in capsys.readouterr().err


def test_interrupt_exits_130_without_a_traceback(monkeypatch, capsys):
    import expertflow.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_func(parser(), interrupted))
    assert main(["synth-trace", "--out", "x.jsonl"]) == 130
    assert "expertflow synth-trace: interrupted" in capsys.readouterr().err


def _with_func(parser, func):
    parser.set_defaults(func=func)
    for action in parser._subparsers._group_actions:
        for sub in action.choices.values():
            sub.set_defaults(func=func)
    return parser


def test_bench_slot_counts_beyond_100_and_trace_routing_with_defaults(tmp_path, capsys):
    """The bundled model has 128 experts: 128 slots is every one of them. Trace routing runs with the
    default forecasts (the bundled predictor file forecasts live generation only)."""
    out = run_json(capsys, "bench", "--slots", "128", "--policies", "lru", "--new-tokens", "2", "--json")
    assert {row["num_slots"] for row in out["rows"] if row["policy"] == "lru"} == {128}
    trace = tmp_path / "t.jsonl"
    assert main(["synth-trace", "--out", str(trace), "--layers", "8", "--experts", "16", "--tokens", "12"]) == 0
    out = run_json(capsys, "bench", "--routing", f"trace:{trace}", "--policies", "lru,expertflow", "--new-tokens", "3", "--json")
    assert {row["policy"] for row in out["rows"]} >= {"lru", "expertflow"}


def test_serve_refuses_a_busy_port_before_loading(capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert cli_exit_code(["serve", "--port", str(busy.getsockname()[1])]) == 2
    assert "Address already in use; choose another --port" in capsys.readouterr().err


def test_serve_without_its_libraries_names_the_extra(monkeypatch, capsys):
    import sys

    monkeypatch.delitem(sys.modules, "expertflow.server", raising=False)
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if not installed: importing it raises ImportError
    assert cli_exit_code(["serve"]) == 2
    assert "pip install 'expertflow[serve]'" in capsys.readouterr().err


def test_serve_and_bench_scheduler_arguments(tmp_path, capsys):
    import shutil

    assert cli_exit_code(["serve", "--port", "70000"]) == 2
    assert "70000 is not a port (0 to 65535)" in capsys.readouterr().err
    model = tmp_path / "no-tokenizer"
    shutil.copytree(BUNDLED_MODEL, model)
    (model / "tokenizer.json").unlink()
    assert cli_exit_code(["bench-scheduler", "--model", str(model)]) == 2
    assert "has no tokenizer; bench-scheduler reads text prompts" in capsys.readouterr().err
    out = run_json(capsys, "bench-scheduler", "--num-requests", "2", "--max-new-tokens", "2", "--json")
    assert out["fifo"]["tokens"] == out["expertflow"]["tokens"] == 4


def test_bench_runs_several_batch_sizes_on_one_model(tmp_path, capsys, monkeypatch):
    """--batch 1,2 builds the model once and writes one result per batch size beside --out's name;
    each has the rows of a run of that batch size alone, and all_gpu's tokens."""
    from expertflow.bench import harness

    built = []
    build_model = harness.build_model
    monkeypatch.setattr(harness, "build_model", lambda cfg: built.append(cfg) or build_model(cfg))
    monkeypatch.setattr("expertflow.bench.build_model", harness.build_model)
    out = tmp_path / "r.json"
    common = ["--prompt", "ROMEO:", "--new-tokens", "3", "--slots", "25%", "--policies", "lru"]
    assert main(["bench", *common, "--batch", "1,2,1", "--out", str(out)]) == 0
    assert len(built) == 1  # one model for both
    printed = capsys.readouterr().out
    assert "batch 1\n" in printed and "batch 2\n" in printed
    results = {b: json.loads((tmp_path / f"r-b{b}.json").read_text()) for b in (1, 2)}
    assert not out.exists() and (tmp_path / "r-b2.png").exists()
    assert [results[b]["batch"] for b in (1, 2)] == [1, 2]
    for b in (1, 2):
        alone = run_json(capsys, "bench", *common, "--batch", str(b), "--json")
        assert [r["policy"] for r in alone["rows"]] == [r["policy"] for r in results[b]["rows"]]
        assert alone["rows"][-1]["same_tokens_as_all_gpu"] and results[b]["rows"][-1]["same_tokens_as_all_gpu"]


@pytest.mark.parametrize("batch,message", [("0", "0 is below the minimum of 1"), ("1,x", "'x' is not a whole number"),
                                           (",", "names nothing")])
def test_bad_batch_sizes_are_refused_before_loading(capsys, batch, message):
    assert cli_exit_code(["bench", "--batch", batch]) == 2
    assert message in capsys.readouterr().err
