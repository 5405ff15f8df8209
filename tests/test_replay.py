"""Trace replay: readers, counts against plain-Python LRU and Belady references, CLI."""

from __future__ import annotations

import json
import math

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from expertflow.cli import main
from expertflow.planner import Forecast
from expertflow.replay import bound, parse_capacity, replay
from expertflow.traces import read_trace, synthetic_trace, write_jsonl_trace

from conftest import GPT_OSS_TRACE, MIXTRAL_TRACE, cli_exit_code, require_shared


def reference_replay(trace, capacity: int, policy: str, per_layer: bool = False) -> tuple[int, int]:
    """Plain-Python demand paging with the documented semantics; returns (hits, misses)."""
    visits = list(trace.layer_visits())
    accesses = [(layer, e) for layer, experts in visits for e in experts]
    future: dict[tuple[int, int], list[int]] = {}
    for pos in range(len(accesses) - 1, -1, -1):
        future.setdefault(accesses[pos], []).append(pos)  # reversed: last element is the soonest
    caches: dict[int | None, dict[tuple[int, int], list]] = {}  # key -> [last_use, next_use]
    clock = hits = misses = pos = 0
    for layer, experts in visits:
        cache = caches.setdefault(layer if per_layer else None, {})
        needed = {(layer, e) for e in experts}
        for e in experts:
            key = (layer, e)
            future[key].pop()
            nxt = future[key][-1] if future[key] else math.inf
            clock += 1
            if key in cache:
                hits += 1
            else:
                misses += 1
                if len(cache) >= capacity:
                    candidates = [k for k in cache if k not in needed]
                    if policy == "belady":
                        victim = min(candidates, key=lambda k: (-cache[k][1], cache[k][0]))
                    else:
                        victim = min(candidates, key=lambda k: cache[k][0])
                    del cache[victim]
            cache[key] = [clock, nxt]
            pos += 1
    return hits, misses


def shared_traces():
    return [pytest.param(MIXTRAL_TRACE, id="mixtral"), pytest.param(GPT_OSS_TRACE, id="gpt-oss")]


def test_jsonl_reader_order_and_shape():
    trace = read_trace(require_shared(MIXTRAL_TRACE))
    assert (trace.num_layers, trace.num_experts, trace.num_tokens) == (32, 8, 247)
    assert trace.tokens[0][0] == (0, [7, 0])  # the file's first record, router order kept
    assert trace.sequence_ids[0] == "0" and trace.sequence_ids[-1] == "1"
    assert all(layers == sorted(layers) for layers in ([l for l, _ in t] for t in trace.tokens))
    assert trace.num_accesses == 2 * (244 * 32 + 31 + 23 + 27)  # a handful of tokens miss layers


def test_csv_reader_order_shape_and_sizes():
    trace = read_trace(require_shared(GPT_OSS_TRACE))
    assert (trace.num_layers, trace.num_experts, trace.num_tokens) == (36, 128, 149)
    assert trace.tokens[0][0] == (0, [83, 30])
    assert trace.expert_bytes[0] == 13219200 and len(trace.expert_bytes) == 36
    assert trace.num_accesses == 10560


@pytest.mark.parametrize("path", shared_traces())
@pytest.mark.parametrize("policy", ["lru", "belady"])
@pytest.mark.parametrize("share", ["10%", "25%"])
def test_replay_matches_reference_on_shared_traces(path, policy, share):
    trace = read_trace(require_shared(path))
    capacity = parse_capacity(share, trace, per_layer=False)
    result = replay(trace, capacity, policy)
    assert (result.hits, result.misses) == reference_replay(trace, capacity, policy)
    assert result.accesses == trace.num_accesses


@pytest.mark.parametrize("policy", ["lru", "belady"])
@pytest.mark.parametrize("capacity", [2, 3, 7])
def test_replay_matches_reference_per_layer(policy, capacity):
    trace = synthetic_trace(num_layers=5, num_experts=9, top_k=2, num_tokens=120, seed=capacity)
    result = replay(trace, capacity, policy, per_layer=True)
    assert (result.hits, result.misses) == reference_replay(trace, capacity, policy, per_layer=True)


@pytest.mark.parametrize("capacity", [2, 7, 33, 80])
def test_belady_bounds_every_policy(capacity):
    trace = synthetic_trace(num_layers=8, num_experts=16, top_k=2, num_tokens=100, seed=1)
    results = {p: replay(trace, capacity, p) for p in ("lru", "lfu", "belady", "expertflow")}
    assert (results["belady"].hits, results["belady"].misses) == reference_replay(trace, capacity, "belady")
    for r in results.values():  # no policy loads fewer experts than Belady's demand paging
        assert results["belady"].misses <= r.misses + r.prefetches
        assert r.hits + r.misses == trace.num_accesses


def test_capacity_below_one_layer_is_an_error():
    trace = synthetic_trace(num_layers=2, num_experts=4, top_k=3, num_tokens=3)
    with pytest.raises(ValueError, match="capacity 2 in all is below the 3 experts one layer of one token needs"):
        replay(trace, 2, "lru")
    with pytest.raises(ValueError, match="unknown replay policy 'mru'"):
        replay(trace, 4, "mru")
    with pytest.raises(ValueError, match="gate_ahead replays need gate-ahead picks"):
        replay(trace, 4, "gate_ahead")
    with pytest.raises(ValueError, match="unknown predictor 'psychic'"):
        replay(trace, 4, "expertflow", predictor="psychic")


def test_cli_json_and_table(tmp_path, capsys):
    path = tmp_path / "t.jsonl"
    trace = synthetic_trace(num_layers=4, num_experts=8, top_k=2, num_tokens=50, seed=3)
    write_jsonl_trace(trace, path)
    assert read_trace(path).tokens == trace.tokens  # the writer and reader agree
    assert main(["replay", "--trace", str(path), "--capacity", "25%", "--policy", "belady", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["capacity"] == 8 and out["accesses"] == trace.num_accesses
    assert (out["hits"], out["misses"]) == reference_replay(trace, 8, "belady")
    assert out["hit_ratio"] == pytest.approx(out["hits"] / out["accesses"])
    assert main(["replay", "--trace", str(path), "--capacity", "4,16", "--policy", "lru,belady"]) == 0
    table = capsys.readouterr().out
    assert "lru" in table and "belady" in table and "demand misses" in table and "bound s" in table
    assert main(["replay", "--trace", str(path), "--capacity", "1", "--policy", "lru"]) == 2
    assert "below the 2 experts" in capsys.readouterr().err
    assert main(["replay", "--trace", str(tmp_path / "missing.jsonl"), "--capacity", "4"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_reports_bytes_for_sized_traces(capsys):
    require_shared(GPT_OSS_TRACE)
    assert main(["replay", "--trace", str(GPT_OSS_TRACE), "--capacity", "10%", "--policy", "lru", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["bytes"] == out["misses"] * 13219200


# -- the expertflow policy against LRU, Belady and the bound -----------------------------------------

MIXTRAL_EXPERT_BYTES = 352321536  # one bf16 expert of Mixtral-8x7B; its trace gives no sizes
SIZED = dict(expert_bytes=MIXTRAL_EXPERT_BYTES, compute_ms_per_layer=0.5)


def synthetic():
    return synthetic_trace(num_layers=32, num_experts=8, top_k=2, num_tokens=160, seed=0)


def floors(trace, share: str, expert_bytes: int | None) -> None:
    """The issue's replay floors at one capacity: the oracle copies at most 1.10x Belady's bytes and
    takes at most 1.10x the bound; history is never slower than LRU."""
    capacity = parse_capacity(share, trace, per_layer=False)
    kw = dict(expert_bytes=expert_bytes, compute_ms_per_layer=0.5)
    lru = replay(trace, capacity, "lru", **kw)
    belady = replay(trace, capacity, "belady", **kw)
    oracle = replay(trace, capacity, "expertflow", predictor="oracle", **kw)
    history = replay(trace, capacity, "expertflow", predictor="history", **kw)
    limit = bound(trace, capacity, **kw)
    assert limit == max(belady.bytes / 55e9, belady.compute_s)
    assert oracle.bytes <= 1.10 * belady.bytes, (oracle.bytes, belady.bytes)
    assert oracle.simulated_time_s <= 1.10 * limit, (oracle.simulated_time_s, limit)
    assert history.simulated_time_s <= lru.simulated_time_s, (history.simulated_time_s, lru.simulated_time_s)
    assert history.bytes <= lru.bytes
    for r in (oracle, history):
        assert r.hits + r.misses == r.accesses == trace.num_accesses
        assert r.bytes == r.demand_bytes + r.prefetch_bytes


@pytest.mark.parametrize("share", ["10%", "25%"])
def test_floors_on_a_synthetic_trace(share):
    floors(synthetic(), share, MIXTRAL_EXPERT_BYTES)


@pytest.mark.parametrize("path", shared_traces())
@pytest.mark.parametrize("share", ["10%", "25%"])
def test_floors_on_shared_traces(path, share):
    trace = read_trace(require_shared(path))
    floors(trace, share, MIXTRAL_EXPERT_BYTES if path == MIXTRAL_TRACE else None)


@pytest.mark.parametrize("share", ["5%", "50%"])
def test_history_is_never_slower_than_lru(share):
    trace = synthetic()
    capacity = parse_capacity(share, trace, per_layer=False)
    lru = replay(trace, capacity, "lru", **SIZED)
    history = replay(trace, capacity, "expertflow", predictor="history", **SIZED)
    assert history.simulated_time_s <= lru.simulated_time_s


class RandomPredictor:
    """Guesses at random, and sure of it: every forecast expert gets probability 1."""

    name = "random"

    def __init__(self, num_experts: int, top_k: int, seed: int) -> None:
        self.num_experts, self.top_k = num_experts, top_k
        self.rng = np.random.default_rng(seed)

    def forecast(self, ctx, previous_path):
        num_layers = previous_path.shape[1]
        probs = np.zeros((num_layers, self.num_experts))
        for layer in range(num_layers):
            probs[layer, self.rng.choice(self.num_experts, self.top_k, replace=False)] = 1.0
        return Forecast(probs)


@pytest.mark.parametrize("share", ["10%", "25%", "50%"])
def test_a_random_predictor_copies_no_more_than_lru(share):
    """Calibration finds the guesses wrong three times in four: they change nothing."""
    trace = synthetic()
    capacity = parse_capacity(share, trace, per_layer=False)
    lru = replay(trace, capacity, "lru", **SIZED)
    guessing = replay(trace, capacity, "expertflow", predictor=RandomPredictor(8, 2, seed=1), **SIZED)
    assert guessing.bytes <= lru.bytes
    assert guessing.prefetches == 0


def test_estimate_alone_beats_lru_on_layer_sequential_access():
    """Without any forecast: LRU evicts the layer needed next; the estimate the layer just computed."""
    trace = synthetic_trace(num_layers=16, num_experts=8, top_k=2, num_tokens=60, seed=4)
    lru = replay(trace, 12, "lru")  # under half a token's path
    blind = replay(trace, 12, "expertflow", predictor=RandomPredictor(8, 0, seed=0))  # forecasts nothing
    assert blind.prefetches == 0
    assert blind.demand_misses < 0.95 * lru.demand_misses


def test_oracle_copies_overlap_compute():
    trace = synthetic_trace(num_layers=8, num_experts=16, top_k=2, num_tokens=80, seed=2)
    kw = dict(expert_bytes=100 << 20, compute_ms_per_layer=2.0)
    lru = replay(trace, 8, "lru", **kw)
    oracle = replay(trace, 8, "expertflow", predictor="oracle", **kw)
    assert oracle.wasted_prefetches + oracle.cancelled_prefetches <= 0.01 * oracle.prefetches
    assert oracle.demand_misses < 0.25 * lru.demand_misses  # prefetched before needed
    assert oracle.stall_s < 0.6 * lru.stall_s
    assert oracle.simulated_time_s < lru.simulated_time_s
    assert lru.simulated_time_s == pytest.approx(lru.bytes / 55e9 + lru.compute_s)  # every miss stalls compute


def test_noisy_forecasts_and_gate_ahead_replay():
    trace = synthetic()
    capacity = parse_capacity("25%", trace, per_layer=False)
    lru = replay(trace, capacity, "lru", **SIZED)
    noisy = replay(trace, capacity, "expertflow", predictor="noisy-oracle:0.8", **SIZED)
    gate = replay(trace, capacity, "gate_ahead", predictor="gate-oracle:0.8", **SIZED)
    assert noisy.predictor == "noisy-oracle:0.8" and gate.predictor == "gate-oracle:0.8"
    assert noisy.simulated_time_s < lru.simulated_time_s
    assert gate.prefetches > 0 and gate.prefetch_hits > 0


def test_cli_replay_prediction_json(tmp_path, capsys):
    path = tmp_path / "t.jsonl"
    write_jsonl_trace(synthetic_trace(num_layers=4, num_experts=8, top_k=2, num_tokens=40, seed=3), path)
    assert main(["replay", "--trace", str(path), "--capacity", "25%", "--policy", "expertflow", "--predictor",
                 "history,oracle", "--expert-bytes", "1000000", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["predictor"] for r in out] == ["history", "oracle"]
    for key in ("accesses", "hits", "misses", "hit_ratio", "bytes", "demand_misses", "prefetches",
                "wasted_prefetches", "simulated_time_s", "bound_s"):
        assert key in out[1]
    assert out[1]["demand_misses"] < out[0]["demand_misses"] / 3
    assert main(["replay", "--trace", str(path), "--capacity", "25%", "--policy", "lru", "--predictor", "oracle"]) == 2
    assert "--predictor applies to --policy expertflow" in capsys.readouterr().err
    assert main(["replay", "--trace", str(path), "--capacity", "25%", "--policy", "expertflow", "--predictor", "nope.pt"]) == 2


def test_gate_ahead_copies_overlap_the_layer_that_planned_them():
    """Like the engine, replay plans right after a layer's misses are on their way: the next layer's
    prefetches then run while this layer computes, so more compute hides more of them."""
    trace = synthetic_trace(num_layers=8, num_experts=8, top_k=2, num_tokens=60, seed=3)
    stall = {ms: replay(trace, 24, "gate_ahead", predictor="gate-oracle:1.0", expert_bytes=10**8,
                        compute_ms_per_layer=ms).stall_s for ms in (0.5, 5.0)}
    assert stall[5.0] < 0.5 * stall[0.5]


@pytest.mark.parametrize("policy,spec", [("gate_ahead", "gate-oracle:0.3"), ("gate_ahead", "gate-oracle:0.9"),
                                         ("expertflow", "noisy-oracle:0.6"), ("expertflow", "gate-oracle:0.95")])
def test_every_prefetch_has_one_fate(policy, spec):
    """A prefetch is used, wasted (evicted after it landed, unused) or cancelled (dropped before it
    landed) — never two of these."""
    trace = synthetic_trace(num_layers=6, num_experts=8, top_k=2, num_tokens=80, seed=1)
    r = replay(trace, 5, policy, predictor=spec, expert_bytes=10**8)
    assert r.prefetches > 0
    assert r.prefetch_hits + r.wasted_prefetches + r.cancelled_prefetches <= r.prefetches


def test_cli_replay_runs_gate_ahead_on_the_forecasts_that_give_picks(tmp_path, capsys):
    path = tmp_path / "t.jsonl"
    write_jsonl_trace(synthetic_trace(num_layers=4, num_experts=8, top_k=2, num_tokens=30, seed=3), path)
    assert main(["replay", "--trace", str(path), "--capacity", "25%", "--policy", "expertflow,gate_ahead",
                 "--predictor", "history,gate-oracle:0.8", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["policy"], r["predictor"]) for r in rows] == [
        ("expertflow", "history"), ("expertflow", "history+gate-oracle:0.8"), ("gate_ahead", "gate-oracle:0.8")]


# -- bad traces and arguments: clear errors with file:line, never a traceback or a hang ------------------

GOOD_JSONL = '{"problem_id": 0, "layer": 0, "experts": [1, 3], "token_idx": 0}\n'
GOOD_CSV = "# n_layer=2 n_expert=4\nturn,phase,step,layer,slot,expert,weight,residency,expert_bytes\n0,1,0,0,0,3,0.5,0,9\n"


@pytest.mark.parametrize("line,message", [
    ('{"problem_id": 0, "layer": 0, "experts": [1, -3], "token_idx": 1}', "expert -3 is out of range"),
    ('{"problem_id": 0, "layer": 0, "experts": [1, 70000], "token_idx": 1}', "expert 70000 is out of range"),
    ('{"problem_id": 0, "layer": 0, "experts": [1, 1], "token_idx": 1}', "lists an expert twice"),
    ('{"problem_id": 0, "layer": 0, "experts": "13", "token_idx": 1}', "experts must be a non-empty list"),
    ('{"problem_id": 0, "layer": 0, "experts": [], "token_idx": 1}', "experts must be a non-empty list"),
    ('{"problem_id": 0, "layer": 2147483646, "experts": [1], "token_idx": 0}', "layer 2147483646 is out of range"),
    ('{"problem_id": 0, "layer": 1.5, "experts": [1], "token_idx": 0}', "layer must be an integer"),
    ('{"problem_id": 0, "layer": true, "experts": [1], "token_idx": 0}', "layer must be an integer"),
    ('[1, 2]', "a record is a JSON object"),
    (GOOD_JSONL.strip(), "layer 0 of token 0 of this sequence was already given"),  # the same record twice
])
def test_jsonl_reader_refuses_bad_records_with_file_and_line(tmp_path, line, message):
    path = tmp_path / "t.jsonl"
    path.write_text(GOOD_JSONL + line + "\n")
    with pytest.raises(ValueError, match=f"t.jsonl:2: .*{message}"):
        read_trace(path)


@pytest.mark.parametrize("row,message", [
    ("0,1,1,0,1,4,0.5,0,9", "expert 4 is out of range"),  # n_expert=4
    ("0,1,1,2,0,1,0.5,0,9", "layer 2 is out of range"),  # n_layer=2
    ("0,1,0,0,0,3,0.5,0,9", "lists rank 0 or expert 3 twice"),
    ("0,1,0,0,1,3,0.5,0,9", "lists rank 1 or expert 3 twice"),
    ("0,1,x,0,0,1,0.5,0,9", "step must be an integer"),
    ("0,1,-1,0,0,1,0.5,0,9", "step -1 is out of range"),
])
def test_csv_reader_refuses_bad_rows_with_file_and_line(tmp_path, row, message):
    path = tmp_path / "t.csv"
    path.write_text(GOOD_CSV + row + "\n")
    with pytest.raises(ValueError, match=f"t.csv:4: .*{message}"):
        read_trace(path)


def test_empty_traces_are_refused(tmp_path):
    for name, text in (("e.jsonl", "\n"), ("e.csv", "# n_layer=2 n_expert=4\nturn,phase,step,layer,slot,expert\n")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match="holds no routing records"):
            read_trace(tmp_path / name)


@pytest.mark.parametrize("argv,message", [
    (["--policy", ","], "--policy ',' names nothing"),
    (["--capacity", ","], "--capacity ',' names nothing"),
    (["--capacity", "10%,,25%"], "--capacity '10%,,25%' has an empty entry"),
    (["--bandwidth-gbps", "0"], "argument --bandwidth-gbps: 0 is outside (0, inf]"),
    (["--bandwidth-gbps", "-5"], "argument --bandwidth-gbps: -5 is outside (0, inf]"),
    (["--bandwidth-gbps", "nan"], "argument --bandwidth-gbps: nan is outside (0, inf]"),
    (["--expert-bytes", "-1"], "argument --expert-bytes: -1 is below the minimum of 1"),
    (["--compute-ms-per-layer", "-1"], "argument --compute-ms-per-layer: -1 is outside [0, inf]"),
    (["--policy", "expertflow", "--predictor", ","], "--predictor ',' names nothing"),
])
def test_cli_replay_refuses_bad_arguments(tmp_path, capsys, argv, message):
    path = tmp_path / "t.jsonl"
    write_jsonl_trace(synthetic_trace(num_layers=2, num_experts=4, top_k=2, num_tokens=5), path)
    base = {"--policy": "lru", "--capacity": "4"}
    args = ["replay", "--trace", str(path)]
    for flag, value in base.items():
        if flag not in argv:
            args += [flag, value]
    assert cli_exit_code(args + argv) == 2
    assert message in capsys.readouterr().err


@settings(max_examples=200, deadline=2000, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_readers_never_crash_on_mutated_lines(tmp_path_factory, data):
    """Random edits of valid lines: the readers return a trace or raise ValueError, quickly."""
    folder = tmp_path_factory.mktemp("fuzz")
    kind = data.draw(st.sampled_from(["jsonl", "csv"]))
    good = GOOD_JSONL if kind == "jsonl" else GOOD_CSV
    lines = good.splitlines()
    edits = data.draw(st.lists(st.tuples(st.integers(0, 200), st.text(max_size=6)), max_size=4))
    extra = data.draw(st.lists(st.text(max_size=40), max_size=3))
    text = "\n".join(lines + extra)
    for pos, insert in edits:
        pos %= max(1, len(text))
        text = text[:pos] + insert + text[pos + 1:]
    path = folder / f"t.{kind}"
    path.write_text(text + "\n")
    try:
        trace = read_trace(path)
    except ValueError:
        return
    assert trace.num_layers <= 4096 and trace.num_experts <= 65536 and trace.num_tokens >= 1
    replay(trace, max(trace.max_experts_per_layer, 1), "expertflow")  # bounded tables: no hang
