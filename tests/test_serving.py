"""The serving engine: each request's greedy tokens equal generating it alone, requests join and leave
between steps, waiting is bounded, and a bad request fails alone."""

from __future__ import annotations

import json

import pytest
import torch

import expertflow as ef
from expertflow.cli import BUNDLED_MODEL, main

from moe_models import build, save


@pytest.fixture(autouse=True)
def host_backend(monkeypatch):
    monkeypatch.setenv("EXPERTFLOW_BACKEND", "host")


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe"])
def served(request, tmp_path_factory):
    model = build(request.param)
    folder = save(model, tmp_path_factory.mktemp(request.param), "published")
    offloaded = ef.from_pretrained(folder, gpu_memory="1GiB", expert_slots="50%", progress=False)
    yield model, offloaded
    offloaded.expertflow.close()


def alone(model, prompt, max_new_tokens):
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=model.config.pad_token_id)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("schedule", ["expertflow", "fifo"])
def test_greedy_tokens_equal_generating_each_alone(served, schedule):
    """fp32 on the CPU; prompts of 1 to 12 tokens, arriving at different steps, more running than one
    batch holds (so rounds regroup them)."""
    model, offloaded = served
    g = torch.Generator().manual_seed(7)
    lengths, budgets = (1, 7, 4, 12, 3, 9, 5, 2), (6, 9, 4, 11, 7, 5, 8, 3)
    prompts = [torch.randint(3, 90, (n,), generator=g).tolist() for n in lengths]
    with ef.Engine(offloaded, max_batch_size=3, schedule=schedule, max_running=6) as engine:
        requests = []
        for i, (prompt, budget) in enumerate(zip(prompts, budgets)):
            requests.append(engine.submit(prompt, max_new_tokens=budget))
            if i % 3 != 2:  # some arrive alone, some together (batched prefill)
                engine.step()
        engine.run()
    for prompt, budget, request in zip(prompts, budgets, requests):
        want = alone(model, prompt, budget)
        assert request.output_ids == want
        assert request.finish_reason == ("stop" if len(want) < budget or want[-1] == model.config.eos_token_id else "length")


def test_no_running_sequence_waits_more_than_the_stated_steps(served):
    _, offloaded = served
    with ef.Engine(offloaded, max_batch_size=2, max_running=7) as engine:
        assert engine.max_wait_steps == 7  # 2 * ceil(7 / 2) - 1: n - 1 batches, a prefill pass, n - 1 batches
        requests = [engine.submit([5 + i, 6, 7], max_new_tokens=12) for i in range(11)]
        last_token_step: dict[int, int] = {}
        worst = 0
        step = 0
        while engine.has_work():
            step += 1
            for r in engine.step():
                if r.id in last_token_step:
                    worst = max(worst, step - last_token_step[r.id] - 1)
                last_token_step[r.id] = step
        assert all(r.done for r in requests)
        assert 0 < worst <= engine.max_wait_steps


def test_bad_requests_fail_alone(served):
    _, offloaded = served
    with pytest.raises(ef.EngineError, match="max_batch_size must be a whole number of at least 1"):
        ef.Engine(offloaded, max_batch_size=0)
    with pytest.raises(ef.EngineError, match="unknown schedule 'lifo'"):
        ef.Engine(offloaded, schedule="lifo")
    engine = ef.Engine(offloaded, max_batch_size=2, max_queue=3)
    good = engine.submit([5, 6, 7], max_new_tokens=4)
    for prompt, kwargs, message in (
        ([], {}, "the prompt is empty"),
        ([5, 999], {}, r"prompt token ids \[999\] are outside the vocabulary of 97"),
        ([5] * 120, {"max_new_tokens": 20}, "exceed the model's 128 positions"),
        ([5], {"temperature": -1.0}, "temperature must be finite and >= 0"),
        ([5], {"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ([5], {"max_new_tokens": 0}, "max_new_tokens must be a whole number of at least 1"),
        ("text", {}, "a text prompt needs tokenizer="),
    ):
        with pytest.raises(ef.EngineError, match=message):
            engine.submit(prompt, **kwargs)
    engine.submit([8], max_new_tokens=2)
    engine.submit([9], max_new_tokens=2)
    with pytest.raises(ef.EngineError, match=r"the queue is full \(3 requests waiting\)"):
        engine.submit([10], max_new_tokens=2)
    engine.run()
    assert good.done and len(good.output_ids) >= 1
    engine.close()
    with pytest.raises(ef.EngineError, match="the engine is closed"):
        engine.submit([5], max_new_tokens=2)


def test_a_request_failing_in_the_model_fails_alone(served, monkeypatch):
    """A forward pass that fails for one request's input: the batch is retried one by one, that
    request ends with an error naming the failure, the others complete."""
    _, offloaded = served
    with ef.Engine(offloaded, max_batch_size=3) as engine:
        forward = engine._forward

        def poisoned(batch, new_ids, new_sequences):
            if any(ids[0] == 13 for ids in new_ids):
                raise RuntimeError("poisoned input")
            return forward(batch, new_ids, new_sequences)

        monkeypatch.setattr(engine, "_forward", poisoned)
        ok = [engine.submit([5, 6], max_new_tokens=3), engine.submit([7], max_new_tokens=3)]
        bad = engine.submit([13, 6], max_new_tokens=3)
        engine.run()
    assert bad.finish_reason == "error" and "prefill failed: poisoned input" in bad.error
    assert all(r.finish_reason in ("length", "stop") and r.output_ids for r in ok)


def test_cancel_frees_a_request_and_the_rest_go_on(served):
    _, offloaded = served
    with ef.Engine(offloaded, max_batch_size=2) as engine:
        keep = engine.submit([5, 6], max_new_tokens=5)
        drop = engine.submit([7, 8], max_new_tokens=50)
        engine.step()
        engine.cancel(drop)
        engine.run()
        assert drop.finish_reason == "cancelled" and drop._cache == []
        assert keep.done and len(keep.output_ids) >= 1


def test_sampling_is_reproducible_per_seed(served):
    _, offloaded = served
    with ef.Engine(offloaded, max_batch_size=4) as engine:
        a = engine.submit([5, 6, 7], max_new_tokens=8, temperature=0.9, top_p=0.9, top_k=20, seed=3)
        b = engine.submit([5, 6, 7], max_new_tokens=8, temperature=0.9, top_p=0.9, top_k=20, seed=3)
        c = engine.submit([9, 9, 9, 9], max_new_tokens=8, temperature=0.9, seed=4)
        engine.run()
    assert a.output_ids == b.output_ids and len(c.output_ids) >= 1


def test_streaming_yields_tokens_as_they_come(served):
    model, offloaded = served
    with ef.Engine(offloaded, max_batch_size=2) as engine:
        request = engine.submit([11, 12, 13], max_new_tokens=6)
        other = engine.submit([14], max_new_tokens=6)
        streamed = list(engine.stream(request))
        engine.run()
    assert streamed == request.output_ids == alone(model, [11, 12, 13], 6)
    assert other.done


def test_bench_scheduler_on_the_bundled_model(capsys):
    """The floor: with 64 requests in batches of 8, the scheduler's batches activate at least 20% fewer
    (layer, expert) pairs than first-come batches."""
    assert main(["bench-scheduler", "--num-requests", "64", "--batch-size", "8", "--max-new-tokens", "16", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    for name in ("fifo", "expertflow"):
        assert {"activated_pairs_per_batch", "bytes_per_token", "tokens_per_s", "schedule_ms"} <= set(result[name])
    assert result["expertflow"]["activated_pairs_per_batch"] <= 0.8 * result["fifo"]["activated_pairs_per_batch"]
    assert result["expertflow"]["bytes_per_token"] < result["fifo"]["bytes_per_token"]
    assert result["config"]["predictor"].endswith("tiny-mixtral-predictor.safetensors")
    # the shape of the trace-driven bench's result: one run, its slot count and its forecast
    (run,) = result["runs"]
    assert run["expert_slots"] == "25%" and run["num_slots"] > 0
    assert run["fifo"] == result["fifo"] and run["expertflow"] == {result["config"]["predictor"]: result["expertflow"]}
    assert BUNDLED_MODEL.exists()


def test_scheduler_forecasts_leave_the_policy_steps_alone():
    """Under the expertflow policy with a trained predictor, the scheduler's own forecasts (a lookup of
    the input embeddings) must not count as forward passes: tokens equal each request generated alone."""
    from expertflow.cli import BUNDLED_PREDICTOR

    model = ef.from_pretrained(BUNDLED_MODEL, policy="expertflow", predictor=BUNDLED_PREDICTOR, dtype="float32",
                               expert_slots="50%", progress=False)
    try:
        prompts = [[100 + 7 * i, 200 + i, 300] for i in range(6)]
        with ef.Engine(model, max_batch_size=2) as engine:
            assert engine.predictor is not None
            requests = [engine.submit(p, max_new_tokens=6) for p in prompts]
            steps = model.expertflow.steps
            engine.run()
            assert engine.stats["rounds"] > 0
            assert model.expertflow.steps - steps == engine.stats["steps"]  # one policy step per forward pass
        for prompt, request in zip(prompts, requests):
            assert request.output_ids == alone(model, prompt, 6)
    finally:
        model.expertflow.close()


def test_the_policy_forecasts_each_batch_from_its_own_sequences(served):
    """The expertflow policy plans for the batch that runs next: each pass, its step predictor sees
    that batch's own sequences, with each sequence's last path and position (not the previous batch's
    paths, nor the union of every running sequence), and a prefill as new sequences."""
    import numpy as np

    from expertflow.planner import Forecast

    _, offloaded = served
    engine_of = offloaded.expertflow

    class Recorder:
        name = "recorder"

        def __init__(self):
            self.seen = []

        def forecast(self, ctx, previous_path):
            self.seen.append((ctx.new_sequences, previous_path.copy(), ctx.positions.tolist()))
            return Forecast(np.zeros((engine_of.num_layers, engine_of.num_experts)))

    recorder = Recorder()
    expected = []

    def before_pass(batch, new_ids, past):
        new = past[0] == 0  # a prefill: no past
        paths = None if new else np.stack([r._path for r in batch])
        expected.append((new, paths, [p + len(n) - 1 for p, n in zip(past, new_ids)]))

    policy = engine_of.policy
    assert policy.name == "expertflow"  # from_pretrained's default
    original = policy.predictor
    policy.predictor = recorder
    try:
        with ef.Engine(offloaded, max_batch_size=2, max_running=6, before_pass=before_pass) as engine:
            prompts = [[5 + i, 9, 11 + 3 * i] for i in range(5)]
            for p in prompts:
                engine.submit(p, max_new_tokens=4)
            engine.run()
    finally:
        policy.predictor = original
    assert len(recorder.seen) == len(expected) > 0
    for (new, paths, positions), (seen_new, seen_paths, seen_positions) in zip(expected, recorder.seen):
        assert seen_new == new
        assert seen_positions == positions
        if not new:
            assert np.array_equal(seen_paths, paths)


def test_trace_routing_gives_each_request_its_own_stretch_of_the_trace(tmp_path):
    """bench-scheduler --arch: request r's token at position p routes as trace token offset_r + p,
    whatever batch it runs in (checked against the trace rows, pass by pass), and the oracle forecast
    the scheduler can group by names, before each pass, the path that pass then takes."""
    import numpy as np

    from expertflow.bench.harness import BenchConfig, BenchModel
    from expertflow.bench.serving import RequestForcing, bench_scheduler_trace
    from expertflow.loader import attach
    from expertflow.runtime import get_backend
    from expertflow.traces import read_trace, synthetic_trace, write_jsonl_trace

    trace_file = tmp_path / "t.jsonl"
    write_jsonl_trace(synthetic_trace(num_layers=4, num_experts=8, top_k=2, num_tokens=300, seed=3), trace_file)
    tiny = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, vocab_size=101)
    m = BenchModel(BenchConfig(arch="mixtral-8x7b", layers=4, routing=f"trace:{trace_file}", config_overrides=tiny,
                           progress=False), torch.device("cpu"), get_backend("host"))
    paths = read_trace(trace_file).to_array(4)
    forcing = RequestForcing(paths, torch.device("cpu"))
    forcing.attach(m.model, m.arch)
    offload = attach(m.model, m.arch, m.pool, 16, "lru", owns_pool=False)
    try:
        with ef.Engine(m.model, max_batch_size=3, before_pass=forcing.before_pass) as engine:
            requests = [engine.submit([1 + i] * (2 + i % 3), max_new_tokens=5) for i in range(7)]
            forcing.offsets = {r.id: 37 * i for i, r in enumerate(requests)}
            oracle = forcing.path_forecast(paths)
            checked = forecast_checked = 0
            while engine.has_work():
                running = list(engine._running)
                forecast = dict(zip((r.id for r in running), oracle(running))) if running else {}
                for r in engine.step():
                    position = r.length - 1  # the pass's last input token
                    assert np.array_equal(r._path, paths[(forcing.offsets[r.id] + position) % len(paths)])
                    checked += 1
                    if r.id in forecast:  # a decode pass: the forecast made before it
                        assert np.array_equal(r._path, forecast[r.id])
                        forecast_checked += 1
            assert checked == sum(len(r.output_ids) for r in requests) == 35
            assert forecast_checked == 35 - 7  # every decode token (the first of each request comes from its prefill)
    finally:
        offload.close()
        forcing.detach()
        m.pool.close()
    result = bench_scheduler_trace("mixtral-8x7b", trace_file, 12, 4, 6, prompt_len=3, layers=4, config_overrides=tiny,
                                   expert_slots=["25%", "50%"], forecasts=["history", "oracle"], progress=False)
    assert result["fifo"]["tokens"] == result["expertflow"]["tokens"] == 12 * 6
    assert result["config"]["num_slots"] == [8, 16]  # 25% and 50% of 4 layers x 8 experts
    assert [run["num_slots"] for run in result["runs"]] == [8, 16]
    for run in result["runs"]:
        assert set(run["expertflow"]) == {"history", "oracle"}
        for figures in run["expertflow"].values():
            assert {"pairs_vs_fifo", "bytes_vs_fifo", "speedup_vs_fifo"} <= set(figures)
    assert result["expertflow"] is result["runs"][0]["expertflow"]["history"]
    with pytest.raises(ValueError, match="not 'gate-oracle:0.8'"):
        bench_scheduler_trace("mixtral-8x7b", trace_file, 12, 4, 6, forecasts="gate-oracle:0.8")


def test_requests_are_checked_at_submit_and_belong_to_their_engine(served):
    import numpy as np

    _, offloaded = served
    engine, other = ef.Engine(offloaded, max_batch_size=2), ef.Engine(offloaded, max_batch_size=2)
    for prompt in ([1.7, 2.9], ["5", "6"], [True, False], None, [[1, 2]], np.array([[1, 2]]), torch.tensor([1.5])):
        with pytest.raises(ef.EngineError, match="prompt"):
            engine.submit(prompt, max_new_tokens=2)
    assert engine.submit(np.array([5, 6]), max_new_tokens=1).prompt_ids == [5, 6]
    for kwargs, message in (({"stop_token_ids": None}, "stop_token_ids must be a sequence"),
                            ({"seed": 2**70}, "seed must be a whole number"), ({"temperature": "1"}, "temperature"),
                            ({"max_new_tokens": True}, "max_new_tokens"), ({"colour": 3}, "unknown sampling field")):
        with pytest.raises(ef.EngineError, match=message):
            engine.submit([5], **kwargs)
    with pytest.raises(ef.EngineError, match="max_queue must be a whole number of at least 1"):
        ef.Engine(offloaded, max_queue=0)
    request = engine.submit([5, 6, 7], max_new_tokens=3)
    for use in (lambda: list(other.stream(request)), lambda: other.cancel(request)):
        with pytest.raises(ef.EngineError, match="was submitted to another engine"):
            use()
    engine.run()
    assert request.done and not other.has_work()
