"""Traces recorded from a model, the routing-path predictor, and its evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

import expertflow as ef
from expertflow.cli import BUNDLED_MODEL, BUNDLED_PREDICTOR, main
from expertflow.predictor import RoutingPathPredictor, evaluate, model_fingerprint, train_predictor
from expertflow.recorder import read_prompts, record_trace
from expertflow.traces import load_recorded_trace, read_trace, save_recorded_trace

HELDOUT = BUNDLED_MODEL.parent / "prompts" / "heldout.txt"


@pytest.fixture(autouse=True)
def host_backend(monkeypatch):
    monkeypatch.setenv("EXPERTFLOW_BACKEND", "host")


@pytest.fixture(scope="module")
def heldout_trace(tmp_path_factory):
    """The bundled model's routing on 40 held-out prompts (prompts the predictor never saw)."""
    import os

    os.environ["EXPERTFLOW_BACKEND"] = "host"
    model = ef.from_pretrained(BUNDLED_MODEL, policy="all_gpu", progress=False)
    tokenizer = AutoTokenizer.from_pretrained(BUNDLED_MODEL)
    try:
        trace = record_trace(model, tokenizer, read_prompts(HELDOUT)[:40], max_new_tokens=24, progress=False)
    finally:
        model.expertflow.close()
    return save_recorded_trace(trace, tmp_path_factory.mktemp("trace") / "heldout")


def test_recorded_trace_round_trip_and_content(heldout_trace, tmp_path):
    trace = load_recorded_trace(heldout_trace)
    # The on-disk dtypes RecordedTrace documents, and a round trip: saving what was loaded and loading
    # it again gives the same arrays and meta.
    dtypes = {"sequence": np.int32, "position": np.int32, "token": np.int32, "experts": np.int16,
              "weights": np.float16, "embedding": np.float16, "gate_ahead": np.int16}
    again = load_recorded_trace(save_recorded_trace(trace, tmp_path / "again"))
    for name, dtype in dtypes.items():
        a, b = getattr(trace, name), getattr(again, name)
        assert a.dtype == b.dtype == dtype and np.array_equal(a, b), name
    assert again.meta["model"] == trace.meta["model"] and again.num_tokens == trace.num_tokens
    n, L, k = trace.experts.shape
    assert (L, k) == (8, 2) and n > 40 * 24
    assert trace.embedding.shape == (n, 96) and trace.gate_ahead.shape == (n, L, k)
    assert (trace.gate_ahead[:, 0] == -1).all() and (trace.gate_ahead[:, 1:] >= 0).all()
    assert ((trace.experts >= 0) & (trace.experts < 16)).all()
    assert np.allclose(trace.weights.astype(np.float32).sum(-1), 1.0, atol=1e-2)  # Mixtral renormalises top-k
    # positions restart with each sequence and count up by one
    starts = np.flatnonzero(np.diff(trace.sequence, prepend=-1))
    assert (trace.position[starts] == 0).all()
    assert (np.diff(trace.position)[np.diff(trace.sequence) == 0] == 1).all()
    routing = read_trace(heldout_trace)
    assert routing.num_tokens == n and routing.tokens[0][3] == (3, trace.experts[0, 3].tolist())


def test_trace_matches_the_model(heldout_trace):
    """The recorded experts are what transformers' own router picks for those tokens."""
    from transformers import AutoModelForCausalLM

    trace = load_recorded_trace(heldout_trace)
    model = AutoModelForCausalLM.from_pretrained(BUNDLED_MODEL).eval()
    seq = trace.sequence == 0
    ids = torch.from_numpy(trace.token[seq].astype(np.int64))[None]
    with torch.no_grad():
        out = model(ids, output_router_logits=True)
    for layer in (0, 5):
        chosen = out.router_logits[layer].topk(2, dim=-1).indices
        recorded = torch.from_numpy(trace.experts[seq][:, layer].astype(np.int64))
        agree = (chosen.sort(-1).values == recorded.sort(-1).values).all(-1).float().mean()
        assert agree > 0.95  # bf16 prefill vs incremental decode may flip near-ties


def test_bundled_predictor_beats_baselines_on_heldout_prompts(heldout_trace):
    trace = load_recorded_trace(heldout_trace)
    predictor = RoutingPathPredictor.load(BUNDLED_PREDICTOR, expected_fingerprint=trace.meta["model"]["fingerprint"])
    r = evaluate(predictor, trace)
    assert r["predictor/recall@k/mean"] > r["previous_token/recall@k/mean"] + 0.1
    assert r["predictor/recall@k/mean"] > r["static/recall@k/mean"] + 0.1
    others = ("predictor", "previous_token", "static", "gate_ahead")
    assert all(len(r[f"{m}/recall@k"]) == 8 for m in others)
    # small: under 1% of the model's expert bytes (docs/predictor.md: 46 KB, 0.8% of 5.9 MB)
    expert_bytes = 8 * 16 * 3 * 96 * 80 * 2  # layers x experts x (w1, w2, w3) x hidden x ffn x bf16
    assert expert_bytes == checkpoint_expert_bytes(BUNDLED_MODEL / "model.safetensors")
    assert predictor.num_bytes() < 0.01 * expert_bytes


def checkpoint_expert_bytes(path) -> int:
    """Bytes of a checkpoint's routed-expert tensors, from the safetensors header alone."""
    data = path.read_bytes()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    return sum(end - start for name, t in header.items() if ".experts." in name for start, end in [t["data_offsets"]])


def test_train_save_load_and_wrong_model(heldout_trace, tmp_path):
    trace = load_recorded_trace(heldout_trace)
    model, report = train_predictor(trace, hidden=32, epochs=5, progress=False)
    assert report["val_tokens"] > 0 and report["train_tokens"] > report["val_tokens"]
    assert 0 <= report["predictor/recall@k/mean"] <= 1
    path = tmp_path / "p.safetensors"
    model.save(path)
    again = RoutingPathPredictor.load(path, expected_fingerprint=trace.meta["model"]["fingerprint"])
    torch.testing.assert_close(again.scores(trace), model.scores(trace), atol=2e-3, rtol=0)  # float16 on disk
    with pytest.raises(ValueError, match="belongs to model .* not to this model"):
        RoutingPathPredictor.load(path, expected_fingerprint="0123456789abcdef")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        RoutingPathPredictor.load(tmp_path / "none.safetensors")


def test_predictor_for_another_model_is_refused(tmp_path):
    from moe_models import build, save

    folder = save(build("mixtral"), tmp_path / "other", "published")
    with pytest.raises(ValueError, match="belongs to model"):
        ef.from_pretrained(folder, policy="expertflow", predictor=BUNDLED_PREDICTOR, progress=False)
    with pytest.raises(ValueError, match="drives the expertflow policy only"):
        ef.from_pretrained(folder, policy="lru", predictor=BUNDLED_PREDICTOR, progress=False)


def test_cli_trace_train_eval_replay(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "ROMEO: good"}\n{"prompt": "The json module"}\n{"prompt": "def main():"}\n')
    out = tmp_path / "trace"
    assert main(["trace", "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "6"]) == 0
    assert load_recorded_trace(out).num_tokens > 18
    pred = tmp_path / "pred.safetensors"
    assert main(["train-predictor", "--traces", str(out), "--out", str(pred), "--epochs", "2", "--hidden", "16"]) == 0
    capsys.readouterr()
    assert main(["eval-predictor", "--predictor", str(BUNDLED_PREDICTOR), "--traces", str(out)]) == 0
    table = capsys.readouterr().out
    assert "recall@k" in table and "predictor" in table and "gate_ahead" in table
    assert main(["replay", "--trace", str(out), "--capacity", "25%", "--policy", "expertflow", "--predictor",
                 str(BUNDLED_PREDICTOR), "--expert-bytes", "46080", "--json"]) == 0
    r = __import__("json").loads(capsys.readouterr().out)
    assert r["predictor"] == "predictor+recorded-gate" and r["accesses"] == load_recorded_trace(out).experts.shape[0] * 16
    bad = tmp_path / "bad.txt"
    bad.write_text("")
    assert main(["trace", "--prompts", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "holds no prompts" in capsys.readouterr().err


@pytest.mark.parametrize("share", ["10%", "25%", "50%"])
def test_trained_predictor_plans_prefetch_usefully(heldout_trace, share):
    """Replayed exactly as live generation plans (the predictor's step forecasts, refined by the
    recorded gate-ahead): fewer demand misses than LRU, at no more than 1.10x LRU's bytes."""
    from expertflow.oracles import TraceSchedule
    from expertflow.predictor import RecordedGate
    from expertflow.replay import parse_capacity, replay

    recorded, trace = load_recorded_trace(heldout_trace), read_trace(heldout_trace)
    predictor = RoutingPathPredictor.load(BUNDLED_PREDICTOR, expected_fingerprint=recorded.meta["model"]["fingerprint"])
    capacity = parse_capacity(share, trace, per_layer=False)
    schedule = TraceSchedule(trace, trace.num_layers, trace.num_tokens)
    size = dict(expert_bytes=46080)
    lru = replay(trace, capacity, "lru", **size)
    planned = replay(trace, capacity, "expertflow", predictor=predictor.for_replay(recorded, schedule),
                     gate=RecordedGate(recorded, schedule), schedule=schedule, **size)
    assert planned.prefetch_hits > 0.5 * planned.prefetches  # the prefetches were used
    assert planned.demand_misses < 0.8 * lru.demand_misses
    assert planned.bytes <= 1.10 * lru.bytes


def test_fingerprint_identifies_routers():
    a = [torch.ones(4, 3), torch.zeros(4, 3)]
    assert model_fingerprint(a) == model_fingerprint([t.clone() for t in a])
    assert model_fingerprint(a) != model_fingerprint([torch.ones(4, 3), torch.ones(4, 3)])


def small_predictor(**overrides) -> RoutingPathPredictor:
    from expertflow.predictor import PredictorConfig

    return RoutingPathPredictor(PredictorConfig(**{**dict(num_layers=2, num_experts=4, top_k=2, embed_dim=3, hidden=5),
                                                   **overrides}))


def test_a_predictor_with_nan_weights_is_refused(tmp_path):
    p = small_predictor()
    with torch.no_grad():
        p.net[0].weight[0, 0] = float("nan")
    p.save(tmp_path / "nan.safetensors")
    with pytest.raises(ValueError, match="NaN or infinite .*net.0.weight"):
        RoutingPathPredictor.load(tmp_path / "nan.safetensors")


@pytest.mark.parametrize("overrides", [dict(top_k=0), dict(top_k=5), dict(num_layers=0), dict(hidden=0)])
def test_an_impossible_predictor_config_is_refused(tmp_path, overrides):
    from dataclasses import asdict

    from safetensors.torch import save_file

    p = small_predictor()
    meta = {**asdict(p.config), **overrides}
    save_file({k: v.to(torch.float16).contiguous() for k, v in p.state_dict().items()}, str(tmp_path / "p.safetensors"),
              metadata={"expertflow_predictor": json.dumps(meta)})
    with pytest.raises(ValueError, match="impossible predictor"):
        RoutingPathPredictor.load(tmp_path / "p.safetensors")


def test_cut_or_foreign_predictor_files_are_refused(tmp_path):
    from dataclasses import asdict

    from safetensors.torch import save_file

    p = small_predictor()
    p.save(tmp_path / "ok.safetensors")
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable predictor file"):
        RoutingPathPredictor.load(tmp_path / "cut.safetensors")
    save_file({k: v.contiguous() for k, v in p.state_dict().items()}, str(tmp_path / "extra.safetensors"),
              metadata={"expertflow_predictor": json.dumps({**asdict(p.config), "colour": "blue"})})
    with pytest.raises(ValueError, match="not a readable predictor file .*colour"):
        RoutingPathPredictor.load(tmp_path / "extra.safetensors")


def test_broken_recorded_traces_are_refused(heldout_trace, tmp_path):
    import shutil

    for case in ("no_model", "empty_npz", "cut_npz"):
        folder = tmp_path / case
        shutil.copytree(heldout_trace, folder)
        if case == "no_model":
            meta = json.loads((folder / "meta.json").read_text())
            del meta["model"]
            (folder / "meta.json").write_text(json.dumps(meta))
            match = "lacks its model description"
        elif case == "empty_npz":
            (folder / "arrays.npz").write_bytes(b"")
            match = "missing, empty or truncated"
        else:
            data = (folder / "arrays.npz").read_bytes()
            (folder / "arrays.npz").write_bytes(data[: len(data) // 3])
            match = "missing, empty or truncated"
        with pytest.raises(ValueError, match=match):
            load_recorded_trace(folder)
