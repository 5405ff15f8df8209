"""The planner: forecasts and history -> predicted next uses -> plans, against references written out."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from expertflow import _C
from expertflow.planner import Calibrator, Forecast, Plan, Planner
from expertflow.policies import EngineInfo, Expertflow, HistoryPredictor, StepContext


def reference_estimate(num_layers: int, last_use: dict, position: int, layer: int, expert: int) -> float:
    """Next use from history: the layer's next visit after the current one, pushed back by the time the
    expert has sat unused since (2 * turn - last use)."""
    turn = next(p for p in range(position + 1, position + num_layers + 1) if p % num_layers == layer)
    return 2.0 * turn - last_use.get((layer, expert), -1e12)


def test_calibrator_measures_how_often_a_score_is_right():
    c = Calibrator(num_bins=4)
    assert c(np.array([0.1, 0.9])).tolist() == [0.0, 0.0]  # untrusted until seen right
    c.observe(np.array([0.9] * 10 + [0.1] * 10), np.array([True] * 7 + [False] * 3 + [True] * 1 + [False] * 9))
    assert c(np.array([0.95]))[0] == pytest.approx(7 / 11)
    assert c(np.array([0.05]))[0] == pytest.approx(1 / 11)
    assert c.at_one() == pytest.approx(7 / 11)


@pytest.mark.parametrize("num_layers,num_experts", [(1, 3), (7, 5), (33, 4)])
def test_the_cache_estimates_unforecast_experts_on_its_clock(num_layers, num_experts):
    """With no forecast, the expertflow cache's next uses are the reference estimate at every visit."""
    rng = np.random.default_rng(num_layers)
    cache = _C.SlotCache(num_layers * num_experts, "expertflow", num_layers)
    last: dict = {}
    for step in range(3):
        if num_layers == 1:  # one layer: only a plan's clock tells a new step from the same visit
            cache.apply_plan(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0), now=float(step))
        for layer in range(num_layers):
            used = sorted(rng.choice(num_experts, size=min(2, num_experts), replace=False).tolist())
            cache.access(layer, used)
            pos = step * num_layers + layer
            assert cache.position == pos
            for e in used:
                last[(layer, e)] = pos
            for slot in cache.slot_table():
                if slot["layer"] >= 0:
                    want = reference_estimate(num_layers, last, pos, slot["layer"], slot["expert"])
                    assert slot["next_use"] == want and slot["following_use"] == want + 2 * num_layers


def trusting(planner: Planner) -> None:
    """Calibration has seen forecasts of score 1 always right and of score 0 never used."""
    planner.step_calibration.observe(np.ones(50), np.ones(50, dtype=bool))
    planner.gate_calibration.observe(np.ones(50), np.ones(50, dtype=bool))


def test_trusted_forecasts_become_next_uses_and_prefetches_in_order():
    L, E = 5, 6
    planner = Planner(L, E)
    trusting(planner)
    probs = np.zeros((L, E))
    probs[0, 1] = probs[2, 3] = probs[4, 0] = probs[4, 5] = 1.0
    plan = planner.begin_step(Forecast(probs))  # step 0: positions 0..4
    assert plan.layers.tolist() == [0, 2, 4, 4] and plan.experts.tolist() == [1, 3, 0, 5]
    assert plan.due.tolist() == [0, 2, 4, 4] and plan.sure.all() and plan.now == 0
    assert plan.next_use[2, 3] == 2 and plan.next_use[4, 0] == 4
    assert np.isnan(plan.next_use[0, 0]) and np.isnan(plan.following_use).all()  # the cache estimates these
    assert planner.layer_done(0, [1, 2]) is None  # nothing to refine: the plan in force holds
    plan = planner.layer_done(1, [0, 1], gate=[4, 3])  # gate-ahead: layer 2 needs expert 4 too
    assert list(zip(plan.layers.tolist(), plan.experts.tolist()))[:2] == [(2, 4), (0, 1)]
    assert plan.next_use[2, 4] == 2 and plan.now == 2


def test_untrusted_forecasts_change_nothing():
    L, E = 4, 8
    told = Planner(L, E)
    rng = np.random.default_rng(0)
    for _ in range(30):
        probs = np.zeros((L, E))
        for l in range(L):
            probs[l, rng.choice(E, 2, replace=False)] = 1.0
        plan = told.begin_step(Forecast(probs))
        for layer in range(L):
            used = rng.choice(E, 2, replace=False)  # independent of the forecast: it is right 1 in 4
            assert told.layer_done(layer, used) is None
    assert told.step_calibration.at_one() < 0.3
    assert len(plan) == 0 and np.isnan(plan.next_use).all()


def test_exhaustive_forecasts_leave_unnamed_experts_unneeded():
    L, E = 3, 4
    planner = Planner(L, E)
    trusting(planner)
    probs = np.zeros((L, E))
    probs[1, 2] = 1.0
    later = np.full((2, L, E), np.inf)
    later[0, 0, 3], later[1, 0, 3] = 1, 5  # expert 3 of layer 0: next step, then five steps ahead
    later[0, 2, 1] = 2  # expert 1 of layer 2: two steps ahead, past the prefetch window
    plan = planner.begin_step(Forecast(probs, later, exhaustive=True))
    assert plan.next_use[1, 2] == 1 and plan.next_use[0, 3] == 3 and plan.following_use[0, 3] == 15
    assert plan.next_use[2, 1] == 8 and np.isinf(plan.following_use[2, 1])
    assert np.isinf(plan.next_use[2, 0]) and np.isinf(plan.next_use[0, 0])
    assert plan.layers.tolist() == [1, 0] and plan.due.tolist() == [1, 3]  # within two steps of position -1


def test_history_policy_path_and_batches():
    policy = Expertflow(HistoryPredictor(8), None)
    policy.attach(EngineInfo(num_layers=2, num_experts=8, num_slots=4, top_k=2))
    policy.on_step(StepContext(step=0, batch=2, new_sequences=True))
    policy.on_layer(0, np.array([[1, 2], [3, 4], [5, 6], [7, 0]]), None)  # 2 sequences x 2 tokens (a prefill)
    assert policy.path[:, 0].tolist() == [[3, 4], [7, 0]]  # each sequence's last token
    forecast = policy.predictor.forecast(StepContext(step=1, batch=2), policy.path)
    assert np.flatnonzero(forecast.probs[0]).tolist() == [0, 3, 4, 7] and forecast.probs[1].sum() == 0


def test_forecast_of_the_wrong_shape_is_an_error():
    with pytest.raises(ValueError, match=r"probabilities \[3, 4\]"):
        Planner(3, 4).begin_step(Forecast(np.zeros((4, 3))))
    with pytest.raises(ValueError, match="confidence"):
        Planner(3, 4, confidence=0.9, prefetch_confidence=0.5)


def test_a_prefill_does_not_teach_calibration_to_trust_zeros():
    """A prefill's routers speak for every prompt token; its forecast (none, for new sequences) would
    make 'score 0' look right. Such a step is kept out of calibration."""
    L, E = 4, 8
    policy = Expertflow(HistoryPredictor(E), None)
    policy.attach(EngineInfo(num_layers=L, num_experts=E, num_slots=8, top_k=2))
    policy.on_step(StepContext(step=0, batch=1, new_sequences=True))
    for layer in range(L):
        policy.on_layer(layer, np.arange(E).reshape(-1, 2), None)  # 4 prompt tokens: every expert used
    plan = policy.on_step(StepContext(step=1, batch=1))
    assert policy.planner.step_calibration(np.zeros(1))[0] == 0.0
    assert len(plan) == 0 and np.isnan(plan.next_use).all()  # nothing trusted: the cache estimates


def test_forecasts_with_nan_are_refused():
    with pytest.raises(ValueError, match="NaN or inf"):
        Planner(2, 3).begin_step(Forecast(np.full((2, 3), np.nan)))


def test_plan_entries_out_of_range_are_refused():
    cache = _C.SlotCache(4, "expertflow", 2)
    with pytest.raises(_C.ExpertFlowError, match="plan entry layer -1 expert 2 is out of range"):
        cache.apply_plan(np.array([-1], np.int32), np.array([2], np.int32), np.zeros(1))
    with pytest.raises(_C.ExpertFlowError, match="plan entry layer 2 expert 0 is out of range"):
        cache.apply_plan(np.array([2], np.int32), np.array([0], np.int32), np.zeros(1))


def reference_kept(next_use: np.ndarray, following_use: np.ndarray, visit: float, layer: int, expert: int,
                   num_slots: int) -> float:
    """From the definition: Belady's cache over the uses the plan names after ``visit`` (each expert's
    next use, then its following use where that comes later; none where its next use is NaN). The expert is loaded at the visit; at
    each later visit up to its next use, every expert used there is loaded, evicting the one whose
    next named use is farthest (none: never), this expert last on a tie. Kept if it is never
    evicted (nor a visit up to its use needs more slots than there are); NaN where no use of it is
    named, 0 where it is never used again."""
    def named(l: int, e: int) -> list[float]:
        if math.isnan(next_use[l, e]):  # no forecast
            return []
        uses = [u for u in (next_use[l, e], following_use[l, e]) if u > visit]  # NaN compares false
        return uses[:1] if len(uses) == 2 and not uses[1] > uses[0] else uses

    def next_after(key, q) -> float:
        return min([u for u in named(*key) if u > q], default=math.inf)

    mine = named(layer, expert)
    if not mine:
        return math.nan
    t = mine[0]
    if math.isinf(t):
        return 0.0
    me = (layer, expert)
    keys = [(l, e) for l in range(next_use.shape[0]) for e in range(next_use.shape[1])]
    held = {me}
    for q in range(int(visit) + 1, int(t) + 1):
        needed = [key for key in keys if q in named(*key)]
        for key in needed:
            if key in held:
                continue
            if len(held) == num_slots:
                victims = [k for k in held if k not in needed]
                if not victims:  # the visit needs more slots than there are, itself among them
                    return 0.0
                victim = max(victims, key=lambda k: (next_after(k, q), k != me))
                if victim == me:
                    return 0.0
                held.remove(victim)
            held.add(key)
    return 1.0


_USES = st.sampled_from([np.nan, np.inf, -1.0, 0.0, 2.0, 3.0, 5.0, 7.0, 9.0, 12.0, 20.0])


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 4), st.integers(1, 5), st.data())
def test_the_plan_says_which_misses_the_cache_would_keep_until_their_next_use(num_layers, num_experts, data):
    """Against the definition, over tables holding uses past, at, and after the visit, NaN (not
    forecast) and inf (never), at any clock of the step, for a visit of this step or of a later one
    (as the engine asks of a plan's prefetches)."""
    shape = (num_layers, num_experts)
    next_use = np.array(data.draw(st.lists(_USES, min_size=num_layers * num_experts, max_size=num_layers * num_experts))).reshape(shape)
    following_use = np.array(data.draw(st.lists(_USES, min_size=num_layers * num_experts, max_size=num_layers * num_experts))).reshape(shape)
    step = data.draw(st.integers(0, 3))
    layer = data.draw(st.integers(0, num_layers - 1))
    now = step * num_layers + data.draw(st.integers(0, layer))  # made at the step's start or after an earlier layer
    experts = data.draw(st.lists(st.integers(0, num_experts - 1), min_size=0, max_size=num_experts, unique=True))
    num_slots = data.draw(st.integers(1, num_layers * num_experts + 1))
    empty = np.zeros(0, dtype=np.int32)
    plan = Plan(empty, empty, np.zeros(0), next_use, following_use, float(now))
    ahead = data.draw(st.integers(0, 2))  # steps after the clock's: 0 asks of this step's visit
    visit = (step + ahead) * num_layers + layer
    got = plan.kept_until_next_use(layer, experts, num_slots, visit=float(visit))
    want = [reference_kept(next_use, following_use, visit, layer, e, num_slots) for e in experts]
    assert got.shape == (len(experts),)
    np.testing.assert_array_equal(got, np.array(want, dtype=np.float64))


def test_the_native_keep_test_refuses_what_does_not_fit_its_tables():
    """The native call behind ``Plan.kept_until_next_use`` names what is wrong, not crashes."""
    tables = np.zeros((2, 3))
    with pytest.raises(_C.ExpertFlowError, match="expert 3 is out of range for 3 experts"):
        _C.kept_until_next_use(tables, tables, 0, 0.0, [3], 2)
    with pytest.raises(_C.ExpertFlowError, match="layer 2 is out of range for 2 layers"):
        _C.kept_until_next_use(tables, tables, 2, 0.0, [0], 2)
    with pytest.raises(_C.ExpertFlowError, match="tables of one shape"):
        _C.kept_until_next_use(tables, np.zeros((3, 2)), 0, 0.0, [0], 2)


def test_a_trace_forecast_keeps_what_returns_soon_and_not_what_returns_late():
    """Two layers of four experts. Expert 0 of layer 0 is used at every step; expert 1 of layer 0
    this step and again three steps on (position 6); expert 2 this step, then never. Before position
    6: layer 1's expert 3 at 1 and 3 (held between), layer 0's expert 0 at 2, layer 1's expert 0 at
    5: at most two held at once (positions 2 and 3). With two slots only expert 0 comes back in
    time; with three, expert 1 does too (though three others are needed before it). A plan without
    a clock or tables, or with a clock past the layer, or a history forecast (no later uses), says
    nothing."""
    L, E = 2, 4
    planner = Planner(L, E)
    trusting(planner)
    probs = np.zeros((L, E))
    probs[0, [0, 1, 2]] = 1.0
    probs[1, 3] = 1.0
    later = np.full((2, L, E), np.inf)
    later[:, 0, 0] = [1, 2]
    later[:, 0, 1] = [3, np.inf]
    later[:, 1, 3] = [1, 2]
    later[:, 1, 0] = [2, 3]  # layer 1's expert 0: two steps on
    plan = planner.begin_step(Forecast(probs, later, exhaustive=True))
    # after layer 0's visit (position 0): L0E0 at 2, L1E3 at 1 and 3, L1E0 at 5, L0E1 at 6, L0E2 never
    np.testing.assert_array_equal(plan.kept_until_next_use(0, [0, 1, 2], num_slots=2, visit=0.0), [1, 0, 0])
    np.testing.assert_array_equal(plan.kept_until_next_use(0, [0, 1, 2], num_slots=3, visit=0.0), [1, 1, 0])
    assert np.isnan(Plan.prefetch_only([(0, 1, 0.0)]).kept_until_next_use(0, [1], 4, visit=0.0)).all()
    # a clock past layer 0 (made after layer 0 ran): that visit ran before the plan, which says nothing of it
    late = Plan(plan.layers, plan.experts, plan.due, plan.next_use, plan.following_use, 1.0)
    assert np.isnan(late.kept_until_next_use(0, [0, 1, 2], num_slots=5, visit=0.0)).all()
    assert late.kept_until_next_use(1, [3], num_slots=5, visit=1.0).tolist() == [1.0]  # layer 1 of that step: used again at 3
    # a visit named outright: layer 1 two steps on (position 5), where its expert 0 is used and then
    # again at 7, with layer 0's expert 1 used between (at 6)
    np.testing.assert_array_equal(plan.kept_until_next_use(1, [0], num_slots=2, visit=5.0), [1])
    np.testing.assert_array_equal(plan.kept_until_next_use(1, [0], num_slots=1, visit=5.0), [0])
    with pytest.raises(ValueError, match="position 3.0 is not a visit of layer 0"):
        plan.kept_until_next_use(0, [0], num_slots=2, visit=3.0)
    history = Planner(L, E)
    trusting(history)
    plan = history.begin_step(Forecast(probs))
    assert np.isnan(plan.kept_until_next_use(0, [0, 1, 2], num_slots=2, visit=0.0)).all()
