"""Trace replay: readers, counts against plain-Python LRU and Belady references, CLI."""

from __future__ import annotations

import json
import math

import pytest

from expertflow.cli import main
from expertflow.replay import parse_capacity, replay
from expertflow.traces import read_trace, synthetic_trace, write_jsonl_trace

from conftest import GPT_OSS_TRACE, MIXTRAL_TRACE, require_shared


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
    results = {p: replay(trace, capacity, p) for p in ("lru", "lfu", "lru_with_correction", "belady")}
    assert (results["belady"].hits, results["belady"].misses) == reference_replay(trace, capacity, "belady")
    for r in results.values():
        assert results["belady"].misses <= r.misses
        assert r.hits + r.misses == trace.num_accesses


def test_capacity_below_one_layer_is_an_error():
    trace = synthetic_trace(num_layers=2, num_experts=4, top_k=3, num_tokens=3)
    with pytest.raises(ValueError, match="capacity 2 in all is below the 3 experts one layer of one token needs"):
        replay(trace, 2, "lru")
    with pytest.raises(ValueError, match="unknown replay policy 'mru'"):
        replay(trace, 4, "mru")


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
    assert "lru" in table and "belady" in table and "demand misses" in table
    assert main(["replay", "--trace", str(path), "--capacity", "1", "--policy", "lru"]) == 2
    assert "below the 2 experts" in capsys.readouterr().err
    assert main(["replay", "--trace", str(tmp_path / "missing.jsonl"), "--capacity", "4"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_reports_bytes_for_sized_traces(capsys):
    require_shared(GPT_OSS_TRACE)
    assert main(["replay", "--trace", str(GPT_OSS_TRACE), "--capacity", "10%", "--policy", "lru", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["bytes"] == out["misses"] * 13219200


@pytest.mark.parametrize("path", shared_traces())
@pytest.mark.parametrize("share", ["10%", "25%"])
def test_expertflow_prediction_on_shared_traces(path, share):
    """history never has more demand misses than LRU (1% slack); oracle at most Belady's."""
    trace = read_trace(require_shared(path))
    capacity = parse_capacity(share, trace, per_layer=False)
    lru = replay(trace, capacity, "lru")
    belady = replay(trace, capacity, "belady")
    history = replay(trace, capacity, "expertflow", predictor="history")
    oracle = replay(trace, capacity, "expertflow", predictor="oracle")
    assert history.demand_misses <= lru.demand_misses * 1.01
    assert oracle.demand_misses <= belady.demand_misses
    for r in (history, oracle):
        assert r.hits + r.misses == r.accesses == trace.num_accesses
    if path == MIXTRAL_TRACE and share == "10%":
        # closes at least half of the gap between LRU and Belady
        assert history.demand_misses <= lru.demand_misses - 0.5 * (lru.demand_misses - belady.demand_misses)


def test_expertflow_eviction_beats_lru_without_prediction():
    """Layer-sequential access: LRU evicts the layer needed next; expertflow the layer just computed."""
    from expertflow import replay as R

    trace = synthetic_trace(num_layers=16, num_experts=8, top_k=2, num_tokens=60, seed=4)
    capacity = 12  # under half a token's path
    lru = replay(trace, capacity, "lru")
    planner = R._Planner.prediction
    try:
        R._Planner.prediction = lambda self, t, layer, known: []  # no prediction at all
        blind = replay(trace, capacity, "expertflow")
    finally:
        R._Planner.prediction = planner
    assert blind.prefetches == 0
    assert blind.demand_misses < 0.95 * lru.demand_misses


def test_expertflow_oracle_and_time_on_a_sized_trace():
    trace = synthetic_trace(num_layers=8, num_experts=16, top_k=2, num_tokens=80, seed=2)
    lru = replay(trace, 8, "lru", expert_bytes=100 << 20, compute_ms_per_layer=2.0)
    oracle = replay(trace, 8, "expertflow", predictor="oracle", expert_bytes=100 << 20, compute_ms_per_layer=2.0)
    assert oracle.demand_misses <= replay(trace, 8, "belady").demand_misses
    assert oracle.wasted_prefetches == 0 and oracle.wasted_prefetch_bytes == 0
    assert oracle.bytes == (oracle.demand_misses + oracle.prefetches) * (100 << 20)
    # The oracle's copies overlap compute; LRU's demand misses stall it.
    assert oracle.simulated_time_s < lru.simulated_time_s
    assert lru.simulated_time_s >= lru.misses * (100 << 20) / 55e9


def test_cli_replay_prediction_json(tmp_path, capsys):
    path = tmp_path / "t.jsonl"
    write_jsonl_trace(synthetic_trace(num_layers=4, num_experts=8, top_k=2, num_tokens=40, seed=3), path)
    assert main(["replay", "--trace", str(path), "--capacity", "25%", "--policy", "expertflow", "--predictor", "oracle",
                 "--expert-bytes", "1000000", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("accesses", "hits", "misses", "hit_ratio", "bytes", "demand_misses", "prefetches",
                "wasted_prefetch_bytes", "simulated_time_s"):
        assert key in out
    assert out["predictor"] == "oracle" and out["demand_misses"] <= 4
    assert main(["replay", "--trace", str(path), "--capacity", "25%", "--policy", "lru", "--predictor", "oracle"]) == 2
    assert "--predictor applies to --policy expertflow" in capsys.readouterr().err
    assert main(["replay", "--trace", str(path), "--capacity", "25%", "--policy", "expertflow", "--predictor", "nope.pt"]) == 2
