"""The command line and the bundled model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from expertflow.cli import BUNDLED_MODEL, main

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


def test_generate_prints_text_and_summary(capsys):
    assert main(["generate", "--prompt", "ROMEO:", "--max-new-tokens", "8", "--expert-slots", "25%"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("8 tokens in ") and "policy expertflow, 32 slots" in out[-1]


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
