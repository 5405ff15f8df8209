"""The offload policies (policies.py), called directly through their protocol: attach, layer_quotas,
on_step, on_layer, close. Expectations are worked out from the module's table and docstrings."""

from __future__ import annotations

import collections

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings

import expertflow as ef
from expertflow.planner import Plan
from expertflow.policies import (
    POLICY_NAMES,
    AllGpu,
    DemandLru,
    EngineInfo,
    Expertflow,
    GateAhead,
    HistoryPredictor,
    NextLayers,
    StepContext,
    StepPredictor,
    make_policy,
)

SIZES = [(1, 1), (1, 7), (7, 3), (3, 33)]  # (num_layers, num_experts)


def info(num_layers: int, num_experts: int, num_slots: int | None = None, top_k: int = 2) -> EngineInfo:
    return EngineInfo(num_layers, num_experts, num_slots or num_layers * num_experts, top_k)


def entries(plan: Plan) -> list[tuple[int, int, float]]:
    return list(zip(plan.layers.tolist(), plan.experts.tolist(), plan.due.tolist()))


# -- the table ------------------------------------------------------------------------------------------

def test_names_eviction_orders_and_hooks_follow_the_table():
    assert POLICY_NAMES == ("all_gpu", "lru", "next_layers", "gate_ahead", "expertflow")
    classes = {"all_gpu": AllGpu, "lru": DemandLru, "next_layers": NextLayers, "gate_ahead": GateAhead,
               "expertflow": Expertflow}
    for name, cls in classes.items():
        policy = make_policy(name)
        assert type(policy) is cls and policy.name == name
        # only expertflow evicts by predicted next use; the others by recency
        assert policy.cache_policy == ("expertflow" if name == "expertflow" else "lru")
        assert policy.wants_steps == (name == "expertflow")
        for hook in ("attach", "layer_quotas", "on_step", "on_layer", "close"):
            assert callable(getattr(policy, hook))
    # gate-ahead from the next layer's router unless an emulated gate is given
    assert make_policy("gate_ahead").gate_from_router and make_policy("expertflow").gate_from_router
    assert not GateAhead(FixedGate({})).gate_from_router and not Expertflow(gate=None).gate_from_router
    assert not any(make_policy(n).gate_from_router for n in ("all_gpu", "lru", "next_layers"))


def test_make_policy_refuses_what_does_not_apply():
    with pytest.raises(ValueError, match="unknown offload policy 'mru'"):
        make_policy("mru")
    with pytest.raises(ValueError, match="drives the expertflow policy only"):
        make_policy("lru", predictor=HistoryPredictor(4))
    with pytest.raises(ValueError, match="gate-ahead applies to the expertflow and gate_ahead policies"):
        make_policy("next_layers", gate=FixedGate({}))


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_only_lru_sets_quotas_and_recency_policies_ignore_steps(name):
    policy = make_policy(name)
    i = info(7, 3, num_slots=8)
    plan = policy.attach(i)
    assert (policy.layer_quotas(i) is None) == (name != "lru")
    if name != "expertflow":
        assert policy.on_step(StepContext(step=0, new_sequences=True)) is None
    assert (plan is not None) == (name == "all_gpu")  # only all_gpu preloads at attach
    assert policy.close() is None


# -- all_gpu ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_layers,num_experts", SIZES)
def test_all_gpu_preloads_every_expert_once_in_layer_order(num_layers, num_experts):
    policy = AllGpu()
    plan = policy.attach(info(num_layers, num_experts))
    # every (layer, expert) once, due at its layer's visit of the first step
    want = [(l, e, float(l)) for l in range(num_layers) for e in range(num_experts)]
    assert entries(plan) == want
    assert plan.next_use is None and plan.now == -np.inf  # no forecasts: recency eviction, no clock
    for layer in range(num_layers):
        assert policy.on_layer(layer, np.zeros((1, 1), np.int64), None) is None  # nothing more to load


def test_all_gpu_plan_fills_a_cache_with_every_expert():
    from conftest import make_filled_pool

    pool = make_filled_pool("host", num_layers=3, num_experts=7)
    with ef.ExpertCache(pool, num_slots=21) as cache:
        cache.apply(AllGpu().attach(info(3, 7)))
        cache.synchronize()
        resident = sorted((t["layer"], t["expert"]) for t in cache.slot_table())
        assert resident == [(l, e) for l in range(3) for e in range(7)]
        for layer in range(3):
            for weights, e in zip(cache.acquire(layer, list(range(7))), range(7)):
                assert torch.equal(weights["w1"], pool.expert(layer, e)["w1"])
            cache.release(layer, list(range(7)))
        assert cache.stats()["misses"] == 0


# -- lru: per-layer LRU, slots split evenly over layers ---------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(num_slots=st.integers(1, 600), num_layers=st.integers(1, 70))
def test_lru_quotas_split_the_slots_evenly(num_slots, num_layers):
    quotas = DemandLru().layer_quotas(EngineInfo(num_layers, 8, num_slots, 1))
    assert len(quotas) == num_layers and sum(quotas) == num_slots
    assert max(quotas) - min(quotas) <= 1  # evenly: no layer has two slots more than another


@pytest.mark.parametrize("num_slots,num_layers,want", [(7, 3, [3, 2, 2]), (1, 1, [1]), (33, 7, [5, 5, 5, 5, 5, 4, 4]),
                                                      (3, 7, [1, 1, 1, 0, 0, 0, 0])])
def test_lru_quotas_by_hand(num_slots, num_layers, want):
    assert sorted(DemandLru().layer_quotas(EngineInfo(num_layers, 8, num_slots, 1)), reverse=True) == want


def per_layer_lru(visits, quotas) -> tuple[int, int]:
    """Reference: each layer keeps its own LRU list of quotas[layer] experts; returns (hits, misses)."""
    lists = [collections.OrderedDict() for _ in quotas]
    hits = misses = 0
    for layer, experts in visits:
        lru = lists[layer]
        for e in experts:
            if e in lru:
                hits += 1
            else:
                misses += 1
                if len(lru) >= quotas[layer]:
                    victim = next(x for x in lru if x not in experts)  # the least recent not in use now
                    del lru[victim]
                lru[e] = True
        for e in experts:
            lru.move_to_end(e)
    return hits, misses


@settings(max_examples=60, deadline=None)
@given(data=st.data(), num_layers=st.sampled_from([1, 3, 7]), extra=st.integers(0, 9))
def test_lru_policy_on_a_cache_is_per_layer_lru(data, num_layers, extra):
    """With the policy's quotas the runtime's cache behaves as one LRU list per layer."""
    from conftest import make_filled_pool

    num_experts, top_k = 9, 2
    num_slots = min(top_k * num_layers + extra, num_layers * num_experts)  # every quota holds a token's experts
    policy = DemandLru()
    quotas = policy.layer_quotas(EngineInfo(num_layers, num_experts, num_slots, top_k))
    assert min(quotas) >= top_k
    tokens = data.draw(st.lists(st.lists(st.lists(st.integers(0, num_experts - 1), min_size=1, max_size=top_k, unique=True),
                                         min_size=num_layers, max_size=num_layers), min_size=1, max_size=12))
    visits = [(layer, experts) for token in tokens for layer, experts in enumerate(token)]
    pool = make_filled_pool("host", num_layers=num_layers, num_experts=num_experts,
                            tensors=[ef.TensorSpec("w", torch.float32, (7,))])
    with ef.ExpertCache(pool, num_slots=num_slots, policy=policy.cache_policy) as cache:
        cache.set_layer_quotas(quotas)
        assert policy.attach(info(num_layers, num_experts, num_slots, top_k)) is None
        for layer, experts in visits:
            cache.acquire(layer, experts)
            assert policy.on_layer(layer, np.array([experts]), None) is None  # demand loads only
            cache.release(layer, experts)
        s = cache.stats()
        assert (s["hits"], s["misses"]) == per_layer_lru(visits, quotas)
        assert s["prefetches"] == 0


# -- next_layers ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_layers,num_experts", [(1, 7), (3, 1), (7, 3), (33, 5)])
def test_next_layers_prefetches_every_expert_of_the_next_two_layers(num_layers, num_experts):
    policy = NextLayers()
    policy.attach(info(num_layers, num_experts))
    for layer in range(num_layers):
        plan = policy.on_layer(layer, np.array([[0]]), None)
        ahead = [l for l in (layer + 1, layer + 2) if l < num_layers]  # the model ends: nothing beyond
        got = entries(plan)
        assert sorted((l, e) for l, e, _ in got) == [(l, e) for l in ahead for e in range(num_experts)]
        # the next layer's experts are due before the one after it's
        dues = {l: {d for ll, _, d in got if ll == l} for l in ahead}
        if len(ahead) == 2:
            assert max(dues[ahead[0]]) < min(dues[ahead[1]])
        assert [d for _, _, d in got] == sorted(d for _, _, d in got)
        assert plan.next_use is None  # recency eviction: the plan only names prefetches


# -- gate_ahead ------------------------------------------------------------------------------------------

class FixedGate:
    """A gate source with fixed picks per layer (the trace oracles' role)."""

    name = "fixed"

    def __init__(self, picks: dict[int, list[int]]) -> None:
        self.table = picks
        self.asked: list[int] = []

    def picks(self, layer: int) -> np.ndarray:
        self.asked.append(layer)
        return np.array(self.table.get(layer, []), dtype=np.int64)


def test_gate_ahead_prefetches_the_next_layers_picks_from_the_router():
    E = 7
    policy = GateAhead()
    policy.attach(info(3, E))
    gate = np.array([[5, 1], [1, E], [2, 5]])  # [T, k'] picks for layer 1; E: no expert
    plan = policy.on_layer(0, np.array([[0, 3], [4, 6], [1, 2]]), gate)
    assert sorted((l, e) for l, e, _ in entries(plan)) == [(1, 1), (1, 2), (1, 5)]  # distinct, in range
    assert len({d for _, _, d in entries(plan)}) == 1  # all needed at the same visit
    assert entries(policy.on_layer(1, np.array([[0, 3]]), None)) == []  # no picks: nothing
    assert entries(policy.on_layer(2, np.array([[0, 3]]), np.array([[1, 2]]))) == []  # the last layer has no next


def test_gate_ahead_with_an_emulated_gate_asks_it_each_layer():
    gate = FixedGate({0: [3, 3, 0], 1: [6]})
    policy = make_policy("gate_ahead", gate=gate)
    policy.attach(info(3, 7))
    assert sorted((l, e) for l, e, _ in entries(policy.on_layer(0, np.array([[1, 2]]), None))) == [(1, 0), (1, 3)]
    assert [(l, e) for l, e, _ in entries(policy.on_layer(1, np.array([[1, 2]]), None))] == [(2, 6)]
    assert gate.asked == [0, 1]


# -- HistoryPredictor: the previous step's path -----------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(data=st.data(), batch=st.integers(1, 4), num_layers=st.sampled_from([1, 3, 7]), k=st.integers(1, 3),
       num_experts=st.sampled_from([1, 5, 33]))
def test_history_forecasts_what_the_previous_step_used(data, batch, num_layers, k, num_experts):
    ids = st.integers(-1, num_experts + 2)  # -1: none; ids past the model's experts name nothing either
    path = np.array(data.draw(st.lists(ids, min_size=batch * num_layers * k, max_size=batch * num_layers * k)),
                    dtype=np.int64).reshape(batch, num_layers, k)
    predictor = HistoryPredictor(num_experts)
    assert isinstance(predictor, StepPredictor)
    forecast = predictor.forecast(StepContext(step=1, batch=batch), path)
    want = np.zeros((num_layers, num_experts))
    for b in range(batch):
        for layer in range(num_layers):
            for e in path[b, layer]:
                if 0 <= e < num_experts:
                    want[layer, e] = 1.0  # some sequence used it there
    assert np.array_equal(forecast.probs, want)
    assert forecast.later is None and not forecast.exhaustive
    fresh = predictor.forecast(StepContext(step=0, batch=batch, new_sequences=True), path)
    assert not fresh.probs.any()  # new sequences: the previous step says nothing about them


# -- expertflow -------------------------------------------------------------------------------------------

def run_step(policy: Expertflow, step: int, path: list[list[int]], new: bool = False, gate=None):
    """One forward pass: the step's plan, then each layer's plan (None: the plan in force holds)."""
    plan = policy.on_step(StepContext(step=step, batch=1, new_sequences=new))
    layer_plans = [policy.on_layer(layer, np.array([experts]), None if gate is None else gate[layer])
                   for layer, experts in enumerate(path)]
    return plan, layer_plans


@pytest.mark.parametrize("num_layers,num_experts,top_k", [(1, 3, 1), (3, 7, 2), (5, 9, 2)])
def test_expertflow_trusts_history_once_measured_right(num_layers, num_experts, top_k):
    """A routing path that repeats every step. Forecasts count only once measured right at least half
    the time (one pseudo-observation of a wrong forecast per score bin; prefills are not measured):
    step 2 is the first that plans, with next use = that step's visit of each layer (step * L + l), and
    prefetches sure only when measured right at least 90% of the time."""
    L, E, k = num_layers, num_experts, top_k
    rng = np.random.default_rng(L)
    path = [sorted(rng.choice(E, k, replace=False).tolist()) for _ in range(L)]
    policy = Expertflow(gate=None)
    assert policy.attach(info(L, E, num_slots=L * k, top_k=k)) is None
    assert policy.label == "history"
    for step, new in ((0, True), (1, False)):
        plan, layer_plans = run_step(policy, step, path, new=new)
        assert len(plan) == 0 and np.isnan(plan.next_use).all()  # nothing trusted yet: the cache estimates
        assert plan.now == step * L  # the next visit is the step's first layer
        assert layer_plans == [None] * L  # no gate-ahead: nothing refines the plan in force
    plan, _ = run_step(policy, 2, path)
    right = L * k  # step 1's forecasts scored 1 and all used
    measured = right / (right + 1)
    want = np.full((L, E), np.nan)
    for layer, experts in enumerate(path):
        want[layer, experts] = 2 * L + layer
    np.testing.assert_array_equal(plan.next_use, want)
    assert np.isnan(plan.following_use).all()  # history forecasts one step ahead only
    assert entries(plan) == [(l, e, 2.0 * L + l) for l in range(L) for e in path[l]]  # earliest due first
    assert plan.sure.tolist() == [measured >= 0.9] * right
    assert plan.now == 2 * L


def test_expertflow_refines_the_next_layer_with_a_gate_once_it_is_measured_right():
    """An emulated gate whose picks for layer l + 1 are always right: after one step of measurement
    (4 right of 4, plus the pseudo-observation: 80%), each layer's plan names the next layer's picks,
    needed at that layer's visit of this step, ahead of the plan in force; not sure below 90%."""
    L, E = 3, 7
    path = [[1, 4], [0, 6], [2, 3]]
    gate = FixedGate({0: path[1], 1: path[2]})
    policy = Expertflow(gate=gate)
    policy.attach(info(L, E))
    assert policy.label == "history+fixed" and not policy.gate_from_router
    _, layer_plans = run_step(policy, 0, path, new=True)
    assert layer_plans == [None] * L  # not measured yet
    _, layer_plans = run_step(policy, 1, path)
    assert layer_plans[2] is None  # the last layer has no next layer
    for layer in (0, 1):
        plan = layer_plans[layer]
        nxt, visit = layer + 1, 1 * L + layer + 1
        assert [(l, e) for l, e, _ in entries(plan)][:2] == [(nxt, e) for e in path[nxt]]
        assert all(d == visit for l, _, d in entries(plan) if l == nxt)
        assert plan.next_use[nxt, path[nxt]].tolist() == [visit, visit]
        assert not plan.sure[:2].any()
        assert plan.now == 1 * L + layer + 1  # the next visit
    assert gate.asked == [0, 1, 0, 1]


def test_expertflow_records_each_sequences_last_token_and_restarts_on_a_new_batch():
    policy = Expertflow(gate=None)
    policy.attach(info(2, 8, top_k=2))
    policy.on_step(StepContext(step=0, batch=2, new_sequences=True))
    policy.on_layer(0, np.array([[1, 2], [3, 4], [5, 6], [7, 0]]), None)  # 2 sequences x 2 tokens
    assert policy.path[:, 0].tolist() == [[3, 4], [7, 0]]
    assert (policy.path[:, 1] == -1).all()  # layer 1 has not run
    ctx = StepContext(step=1, batch=3)  # a different batch: the old paths say nothing
    policy.on_step(ctx)
    assert ctx.new_sequences and policy.path.shape == (3, 2, 2) and (policy.path == -1).all()
