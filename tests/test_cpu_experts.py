"""Experts computed on the CPU from the pool: tokens equal to the resident model, a cost model that
never plans a layer slower than copying alone, and a cached calibration that fits its definition."""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import expertflow as ef
from expertflow import _C, ExpertFlowError
from expertflow.cpu_experts import Calibration, CostModel, CpuExecutor, HostLinear, calibrate, default_threads
from expertflow.planner import Plan
from expertflow.policies import EngineInfo

from moe_models import build, save

PROMPT = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46]])


@pytest.fixture(autouse=True)
def host_and_private_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("EXPERTFLOW_BACKEND", "host")
    monkeypatch.setenv("EXPERTFLOW_CACHE_DIR", str(tmp_path / "cache"))


def _greedy(model, prompt=PROMPT, n=8):
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "gpt_oss"])
@pytest.mark.parametrize("asynchronous", [False, True])
def test_cpu_experts_give_the_resident_models_tokens_and_logits(tmp_path, model_type, asynchronous):
    """fp32 on the host backend: every miss computed from the pool, inline or on the worker thread,
    prefill (many tokens an expert) and decode (one)."""
    reference = build(model_type)
    folder = save(reference, tmp_path / model_type, "published" if model_type != "gpt_oss" else "fused")
    copied = ef.from_pretrained(folder, policy="lru", expert_slots="25%", cpu_experts="off", progress=False)
    with torch.no_grad():
        copied_logits = copied(PROMPT).logits
    copied.expertflow.close()
    model = ef.from_pretrained(folder, policy="lru", expert_slots="25%", cpu_experts="on", progress=False)
    try:
        engine = model.expertflow
        if asynchronous:  # the GPU's arrangement: CPU experts overlap the other experts on a worker thread
            engine._cpu.close()
            # with the caller's thread count (beside a GPU the default leaves a core): fp32 sums split
            # over another count of threads round differently, and this compares bit for bit
            engine._cpu = CpuExecutor(asynchronous=True, num_threads=torch.get_num_threads())
        assert _greedy(model).tolist() == _greedy(reference).tolist()
        with torch.no_grad():
            logits = model(PROMPT).logits
        torch.testing.assert_close(logits, reference(PROMPT).logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(logits, copied_logits)  # the same arithmetic as the copied experts, bit for bit
        s = engine.stats()
        assert s["cpu_experts"] > 0 and s["cpu_ms"] > 0
        assert s["misses"] == 0  # "on": no miss was copied, every one ran from the pool
        assert s["accesses"] == s["hits"]
    finally:
        model.expertflow.close()


def test_the_engine_prices_copies_at_what_demand_loads_took_inside_steps(tmp_path):
    """Once a pass the engine hands the cost model the time per expert of the demand loads timed since
    the previous pass: the runtime's timed milliseconds over its timed bytes in expert sizes, both
    taken as differences between the pass's counters and the last pass's (None where none were
    timed). A running total instead of the difference, or a pass left out, fails."""
    folder = save(build("mixtral"), tmp_path / "m", "published")
    model = ef.from_pretrained(folder, policy="lru", expert_slots="25%", cpu_experts="on", progress=False)
    try:
        engine = model.expertflow
        engine.cost_model.mode = "off"  # every miss copied: demand loads to time
        seen, counters = [], []
        engine.cost_model.observe_link = seen.append
        cache_stats = engine.cache.stats

        def recording_stats():
            s = cache_stats()
            counters.append((s["timed_demand_bytes"], s["demand_ms"]))
            return s

        engine.cache.stats = recording_stats
        _greedy(model)
        engine.cache.synchronize()
        engine._observe_link()  # the last pass's loads
        expert_bytes = engine.pool.expert_bytes(0)
        want = []
        for (bytes_before, ms_before), (num_bytes, ms) in zip([(0, 0.0)] + counters, counters):
            new_bytes, new_ms = num_bytes - bytes_before, ms - ms_before
            want.append(new_ms / (new_bytes / expert_bytes) if new_bytes > 0 and new_ms > 0 else None)
        assert len(seen) == len(counters) == 9  # 8 new tokens (a pass each) and the last call
        assert seen == [pytest.approx(w) if w is not None else None for w in want]
        assert sum(w is not None for w in want) >= 2 and counters[-1][0] == engine.stats()["demand_bytes"] > 0
    finally:
        model.expertflow.close()


def test_the_engine_prices_a_queued_prefetch_at_its_bytes_and_skips_landed_experts(tmp_path):
    """The cost model hears each missed expert's share of a copy still to carry: a demand miss (no
    slot) 1, a prefetch still queued 1, one part way what is left; an expert whose bytes have landed,
    or are all on the link, is no miss."""
    folder = save(build("mixtral"), tmp_path / "m", "published")
    model = ef.from_pretrained(folder, policy="lru", expert_slots="50%", cpu_experts="on", progress=False)
    try:
        engine = model.expertflow
        engine.cost_model.mode = "off"  # copies every miss; the recorder sees what it was asked
        asked = []
        choose = engine.cost_model.choose

        def recording_choose(num_tokens, copy_shares=None):
            asked.append((len(num_tokens), copy_shares))
            return choose(num_tokens, copy_shares)

        engine.cost_model.choose = recording_choose
        one = torch.tensor([[5]])
        with torch.no_grad():
            model(one)  # one token: each layer uses top_k experts, all misses on a cold cache
        assert asked and all(shares == [1.0] * n for n, shares in asked)
        used = [set(np.unique(r).tolist()) for r in engine.routing]
        engine.cache.synchronize()
        asked.clear()
        with torch.no_grad():
            model(one)  # the same token: every expert landed in its slot
        assert all(n == 0 for n, _ in asked)
        # a prefetch of experts of layer 0 not in a slot, held in the queue, beside one landed
        missing = [e for e in range(engine.num_experts) if e not in used[0]][:2]
        landed = sorted(used[0])[0]
        engine.cache.pause_prefetch()
        engine.cache.prefetch([(0, e) for e in missing] + [(0, landed)])
        assert engine.cache.bytes_to_submit(0, missing + [landed]) == [engine.pool.expert_bytes(0)] * 2 + [0]
        asked.clear()
        experts = sorted(missing + [landed])
        counts = np.ones(engine.num_experts, dtype=np.int64)
        engine._submit_cpu_experts(engine.layers[0].module, 0, experts, counts, np.array([experts]), torch.zeros(1, 8))
        assert asked == [(2, [1.0, 1.0])]
        engine.cache.resume_prefetch()
        # a copy part way (a quarter left), one with every byte on the link, one with no slot
        quarter = engine.pool.expert_bytes(0) // 4
        engine.cache.bytes_to_submit = lambda layer, es: [quarter, 0, -1][: len(es)]
        asked.clear()
        engine._submit_cpu_experts(engine.layers[0].module, 0, [0, 1, 2], counts, np.array([[0, 1, 2]]), torch.zeros(1, 8))
        assert asked == [(2, [quarter / engine.pool.expert_bytes(0), 1.0])]
    finally:
        model.expertflow.close()


class _EveryExpertEveryStep:
    """A policy whose step plans prefetch every expert for this step's visit of its layer, in layer
    order, and forecast each expert's next use there and the one after at the next step's visit,
    except the odd-numbered experts, forecast never used again."""

    name, cache_policy, gate_from_router, wants_steps = "every-expert", "expertflow", False, True

    def attach(self, info):
        self.info = info

    def layer_quotas(self, info):
        return None

    def on_step(self, ctx):
        L, E = self.info.num_layers, self.info.num_experts
        next_use = np.repeat((ctx.step * L + np.arange(L, dtype=np.float64))[:, None], E, axis=1)
        following_use = next_use + L
        following_use[:, 1::2] = np.inf
        layers, experts = np.divmod(np.arange(L * E), E)
        return Plan(layers.astype(np.int32), experts.astype(np.int32), next_use.ravel().copy(), next_use,
                    following_use, float(ctx.step * L))

    def on_layer(self, layer, experts, gate):
        return None

    def close(self):
        pass


def _record_applied_plans(engine) -> list[Plan]:
    """The plans the engine hands its cache from now on, in order (each still applied)."""
    applied: list[Plan] = []
    apply = engine.cache.apply
    engine.cache.apply = lambda plan: (applied.append(plan), apply(plan))
    return applied


def test_the_engine_leaves_out_of_the_plan_the_misses_the_cpu_computes_instead(tmp_path):
    """Plans of prefetches for this step's and the next step's visits, drawn at random (the next-use
    tables too; NaN, inf and past uses among them), with, in front as gate-ahead puts its picks, an
    entry due before now and one naming an expert again; some copies queued (prefetching paused:
    not started), some reported started (half their bytes on the link) and some landed, the layers
    coming at a pace drawn too. Against the definition: the link copies the plan's misses one after
    another from now in the order of their dues (a started one half a copy, a landed one nothing,
    an entry due before now or naming an expert again nothing), and at each visit, in the plan's
    order, a miss that would land after its visit, has not started, and that a cache evicting the
    farthest next use would not keep until its next use (test_planner.reference_kept) is left out,
    up to ``misses_left_to_cpu`` a visit, and then carried by no link. An expert left is left with
    every entry naming it; the tables stay whole, the sure flags follow their entries. Before any
    decode step the engine knows no pace and leaves nothing; a plan naming no later use applies
    whole."""
    from test_planner import reference_kept

    folder = save(build("mixtral"), tmp_path / "m", "published")
    model = ef.from_pretrained(folder, policy="expertflow", expert_slots="7", cpu_experts="on", progress=False)
    try:
        engine = model.expertflow
        L, E, num_slots = engine.num_layers, engine.num_experts, engine.cache.num_slots
        engine._step_tokens = 1
        engine.cost_model = CostModel(line_calibration(6.4, 2.8, 0.1), "auto")
        applied = _record_applied_plans(engine)
        bytes_to_submit = engine.cache.bytes_to_submit
        empty = np.zeros(0, dtype=np.int32)
        never = Plan(np.array([0], np.int32), np.array([1], np.int32), np.zeros(1), np.zeros((L, E)), np.full((L, E), np.inf), 0.0)
        engine._apply(never)  # no decode step yet: no pace
        assert applied[-1].experts.tolist() == [1]
        rng = np.random.default_rng(7)
        half = engine.pool.expert_bytes(0) // 2  # every layer's experts are alike
        num_left = 0
        for cpu_ms, per_visit in ((2.9, 2), (3.9, 1)):
            engine.cost_model = CostModel(line_calibration(6.4, cpu_ms - 0.1, 0.1), "auto")
            assert engine.cost_model.misses_left_to_cpu(1) == per_visit
            for trial in range(24):
                visit_ms = [0.0, 1e9, *rng.uniform(0.5, 8.0, size=2)][trial % 4]
                engine._decode_steps_ms.extend([visit_ms * L] * 8)
                step = int(rng.integers(1, 4))
                now = float(step * L + rng.integers(0, L))
                # each expert's uses are visits of its layer: a step before, this one, up to three on
                visits = (step + rng.integers(-1, 4, size=(L, E))) * L + np.arange(L)[:, None]
                next_use = np.where(rng.random((L, E)) < 0.8, visits, rng.choice([np.nan, np.inf], size=(L, E)))
                following_use = next_use + L * rng.choice([np.nan, np.inf, 1, 2, 3], size=(L, E))
                flat = next_use.ravel()
                with np.errstate(invalid="ignore"):
                    named = np.flatnonzero((flat >= now) & (flat < now - now % L + 2 * L))
                named = named[np.argsort(flat[named], kind="stable")]
                layers, experts, dues = (named // E).tolist(), (named % E).tolist(), flat[named].tolist()
                if named.size:  # in front: one named again (due as before), one due before now
                    again = int(rng.integers(named.size))
                    layers, experts, dues = [layers[again]] + layers, [experts[again]] + experts, [dues[again]] + dues
                past_layer = int(rng.integers(L))
                layers, experts = [past_layer] + layers, [int(rng.integers(E))] + experts
                dues = [float((now // L - 1) * L + past_layer)] + dues
                sure = rng.random(len(layers)) < 0.7
                plan = Plan(np.array(layers, np.int32), np.array(experts, np.int32), np.array(dues), next_use,
                            following_use, now, sure)
                engine.cache.apply(Plan(empty, empty, np.zeros(0)))  # no prefetch left over
                engine.cache.synchronize()
                landed = {(layer, e) for layer, e in zip(layers, experts) if rng.random() < 0.2}
                for layer, e in landed:
                    engine.cache.release(layer, [e], None) if engine.cache.acquire_slots(layer, [e]) else None
                engine.cache.pause_prefetch()
                queued = {(layer, e) for layer, e, due in zip(layers, experts, dues) if due >= now and rng.random() < 0.3}
                engine.cache.prefetch([(layer, e, now) for layer, e in queued])
                # landed: these, and what earlier trials left in slots
                landed = {(layer, e) for layer, e in zip(layers, experts) if engine.cache.bytes_to_submit(layer, [e])[0] == 0}
                # started (half its bytes handed to the link), as the cache reports it
                started = {(layer, e) for layer, e in zip(layers, experts) if (layer, e) not in landed and rng.random() < 0.3}
                engine.cache.bytes_to_submit = lambda layer, experts, started=started: [
                    half if (layer, e) in started else b for e, b in zip(experts, bytes_to_submit(layer, experts))]
                applied.clear()
                engine._apply(plan)
                del engine.cache.bytes_to_submit
                engine.cache.resume_prefetch()
                first: dict[tuple[int, int], int] = {}
                for i, (layer, e, due) in enumerate(zip(layers, experts, dues)):
                    if due >= now:
                        first.setdefault((layer, e), i)
                link_ms, left, left_at = 0.0, set(), {}
                for i in sorted(first.values(), key=lambda i: (dues[i], i)):
                    key, due = (layers[i], experts[i]), dues[i]
                    share = 0.0 if key in landed else 0.5 if key in started else 1.0
                    arrival = link_ms + 6.4 * share
                    if (share == 1.0 and arrival > (due - now) * visit_ms and left_at.get(due, 0) < per_visit
                            and reference_kept(next_use, following_use, due, *key, num_slots) == 0.0):
                        left.add(key)
                        left_at[due] = left_at.get(due, 0) + 1
                    else:
                        link_ms = arrival
                stays = [key not in left for key in zip(layers, experts)]
                got = applied[-1]
                assert list(zip(got.layers.tolist(), got.experts.tolist())) == [
                    key for key, stay in zip(zip(layers, experts), stays) if stay], (cpu_ms, trial)
                assert got.sure.tolist() == sure[stays].tolist()
                assert got.next_use is next_use and got.following_use is following_use
                if visit_ms == 1e9:  # the layers far apart: only a miss of the visit under way is late
                    assert all(due == now for due in left_at)
                num_left += len(left)
                engine.cache.synchronize()
                silent = Plan(plan.layers, plan.experts, plan.due, next_use, np.full((L, E), np.nan), now)
                engine._apply(silent)  # no later use named (as the history forecast's plans): applied whole
                assert applied[-1] is silent
        assert num_left > 10
    finally:
        model.expertflow.close()


def test_a_miss_left_to_the_cpu_frees_the_link_for_the_misses_after_it(tmp_path):
    """Worked by hand: copies of 6.4 ms, a visit every 7 ms, two left a visit at most, the clock at
    layer 0 (position 3) and three experts never used again (none kept): layer 0's expert 1 at
    this visit, layer 1's experts 2 and 3 at the next. Expert 1 is late (needed now) and left; the
    link then has expert 2 in 6.4 ms, in time for its visit at 7, so it stays, and expert 3, at
    12.8 ms, is left. A plan naming layer 1's expert 3 twice, first in front (as gate-ahead puts
    its picks), orders that visit's misses 3 then 2: expert 3 stays, expert 2 is left, and the
    second entry of expert 3 adds no copy."""
    folder = save(build("mixtral"), tmp_path / "m", "published")
    model = ef.from_pretrained(folder, policy="expertflow", expert_slots="7", cpu_experts="on", progress=False)
    try:
        engine = model.expertflow
        L, E = engine.num_layers, engine.num_experts
        engine.cost_model = CostModel(line_calibration(6.4, 2.8, 0.1), "auto")
        engine._step_tokens = 1
        engine._decode_steps_ms.extend([7.0 * L] * 8)
        applied = _record_applied_plans(engine)
        next_use = np.full((L, E), np.inf)
        next_use[0, 1], next_use[1, 2], next_use[1, 3] = L, L + 1, L + 1
        engine.cache.pause_prefetch()  # the first plan's copies stay queued: none started at the second
        for entries, stay in (([(0, 1), (1, 2), (1, 3)], [(1, 2)]),
                              ([(1, 3), (0, 1), (1, 2), (1, 3)], [(1, 3), (1, 3)])):
            layers, experts = np.array(entries, np.int32).T
            engine._apply(Plan(layers, experts, next_use[layers, experts], next_use, np.full((L, E), np.inf), float(L)))
            assert list(zip(applied[-1].layers.tolist(), applied[-1].experts.tolist())) == stay
    finally:
        model.expertflow.close()


def test_the_decode_pace_is_the_median_of_decode_passes_without_the_pauses_between_requests(tmp_path):
    """The pace of the layers (`_visit_ms`) comes from decode passes only: two requests with a pause
    between them record no sample holding the pause, nor the prompts' passes; it is the median of
    the last eight samples over the layers; another batch size starts again."""
    folder = save(build("mixtral"), tmp_path / "m", "published")
    model = ef.from_pretrained(folder, policy="expertflow", expert_slots="75%", progress=False)
    try:
        engine = model.expertflow
        assert engine._visit_ms() is None
        _greedy(model, n=4)
        time.sleep(0.5)
        _greedy(model, n=4)
        samples = list(engine._decode_steps_ms)
        assert len(samples) == 2 * (4 - 2)  # 4 tokens: the prompt's pass and 3 decode passes, timed 2
        assert max(samples) < 500.0
        engine._decode_steps_ms.clear()
        engine._decode_steps_ms.extend([1.0, 2.0, 30.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 90.0])  # the last eight
        assert engine._visit_ms() == pytest.approx(np.median([30.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 90.0]) / engine.num_layers)
        _greedy(model, prompt=PROMPT.repeat(2, 1), n=3)  # batch 2: the samples of batch 1 go
        assert len(engine._decode_steps_ms) == 1
    finally:
        model.expertflow.close()


def test_forecast_misses_left_to_the_cpu_give_the_resident_models_tokens(tmp_path):
    """Live generation under step plans that prefetch every expert and forecast the odd-numbered
    ones never used again, with `auto` and a CPU that computes two such misses within a copy: each
    step's plan is applied without the odd experts of each visit (never kept; two a visit), the
    CPU computes them, and the tokens are the resident model's. Prefetches are held (paused), so no
    copy is part way when a plan is applied; an odd expert already landed (a demand load) is no
    miss: it stays, and the next one not landed is left instead."""
    folder = save(build("mixtral"), tmp_path / "m", "published")
    resident = ef.from_pretrained(folder, policy="all_gpu", progress=False)
    want = _greedy(resident, n=5)
    resident.expertflow.close()
    model = ef.from_pretrained(folder, policy="expertflow", expert_slots="75%", cpu_experts="on", progress=False)
    try:
        engine = model.expertflow
        engine.policy = _EveryExpertEveryStep()
        engine.policy.attach(EngineInfo(engine.num_layers, engine.num_experts, engine.cache.num_slots, 2))
        engine.cost_model = CostModel(line_calibration(6.4, 2.8, 0.1), "auto")
        # prices as set: the tiny model's copies and CPU experts take microseconds
        engine.cost_model.observe = engine.cost_model.observe_link = lambda *args: None
        engine._visit_ms = lambda: 0.0  # the link never ahead: every miss is late
        L, odd = engine.num_layers, [1, 3, 5, 7]
        applied: list[tuple[Plan, list[list[int]]]] = []
        apply = engine.cache.apply

        def recording_apply(plan):
            landed = [[e for e, b in zip(odd, engine.cache.bytes_to_submit(layer, odd)) if b == 0] for layer in range(L)]
            applied.append((plan, landed))
            apply(plan)

        engine.cache.apply = recording_apply
        engine.cache.pause_prefetch()
        got = _greedy(model, n=5)
        assert torch.equal(got, want)
        decode = [(plan, landed) for plan, landed in applied if plan.due.size and plan.now > 0]  # not the prompt's
        assert len(decode) == 4
        for plan, landed in decode:
            for layer in range(L):
                misses = [e for e in odd if e not in landed[layer]]
                named = set(plan.experts[plan.layers == layer].tolist())
                assert sorted(set(odd) - named) == misses[:2], (layer, landed, sorted(named))
        assert engine.num_cpu_experts > 0
    finally:
        model.expertflow.close()


def test_a_prefetch_the_cpu_overtakes_before_its_bytes_go_is_dropped_and_the_misses_spare_its_slot(tmp_path):
    """A layer whose experts all have a prefetch held in the queue: the CPU takes the first miss, the
    link the second (its queued prefetch promoted). The CPU's prefetch moved no byte, so it is
    cancelled: the CPU has the result without it, and with six other copies waiting it is not queued
    again. Every acquire spares the slots of the layer's CPU experts."""
    folder = save(build("mixtral"), tmp_path / "m", "published")
    model = ef.from_pretrained(folder, policy="lru", expert_slots="50%", cpu_experts="on", progress=False)
    try:
        engine = model.expertflow
        engine.cost_model.mode = "auto"
        engine.cost_model.choose = lambda num_tokens, copy_shares=None: [i == 0 for i in range(len(num_tokens))]
        acquired, on_cpu = [], []
        acquire_slots, submit = engine.cache.acquire_slots, engine._submit_cpu_experts

        def recording_acquire(layer, experts, stream=None, wait=True, spare=()):
            acquired.append((layer, list(experts), list(spare)))
            return acquire_slots(layer, experts, stream=stream, wait=wait, spare=spare)

        def recording_submit(module, layer, *args):
            jobs = submit(module, layer, *args)
            on_cpu.append((layer, sorted(jobs)))
            return jobs

        engine.cache.acquire_slots, engine._submit_cpu_experts = recording_acquire, recording_submit
        assert engine.num_experts == 8 and engine.cache.num_slots >= 8
        engine.cache.pause_prefetch()
        engine.cache.prefetch([(0, e) for e in range(8)])
        with torch.no_grad():
            model(torch.tensor([[5]]))
        first, second = sorted(np.unique(engine.routing[0]).tolist())
        assert on_cpu[0] == (0, [first])
        assert acquired[0] == (0, [second], [first])
        assert engine.cache.resident(0, [first, second]) == [False, True]
        stats = engine.cache.stats()
        # layer 0: the promoted prefetch a hit; every later layer: its second expert demand-loaded
        assert stats["cancelled_prefetches"] == 1 and stats["hits"] == 1 and stats["misses"] == engine.num_layers - 1
        assert all(spare == dict(on_cpu)[layer] for layer, _, spare in acquired)
        engine.cache.resume_prefetch()
    finally:
        model.expertflow.close()


@pytest.mark.parametrize("whole", [True, False])
def test_bf16_cpu_experts_run_the_native_kernel_and_stay_close_to_the_resident_model(tmp_path, whole):
    """bf16: the CPU's experts run on HostLinear's native kernel (its sums run in another order than
    torch's, so logits agree to bf16's precision, not bit for bit). Mixtral's gated SiLU experts go
    whole to one native call each (``whole``); composed (as an expert of another activation would
    be), each takes its two products from the kernel."""
    reference = build("mixtral", dtype=torch.bfloat16)
    folder = save(reference, tmp_path / "m", "published")
    model = ef.from_pretrained(folder, policy="lru", expert_slots="25%", cpu_experts="on", progress=False)
    try:
        engine = model.expertflow
        assert all(layer.module.silu_gated for layer in engine.layers)
        for layer in engine.layers:
            layer.module.silu_gated = whole
        linear = engine._cpu.linear
        linear.max_tokens = None  # whatever this machine's calibration chose
        kernel, products, experts = linear._kernel, [], []

        class Counting:
            def linear_bf16(self, *args):
                products.append(args[3])  # n
                kernel.linear_bf16(*args)

            def gated_silu_expert_bf16(self, *args):
                experts.append(args[5])  # n
                kernel.gated_silu_expert_bf16(*args)

            def close(self):
                kernel.close()

        linear._kernel = Counting()
        with torch.no_grad():
            logits, want = model(PROMPT).logits, reference(PROMPT).logits
        num_cpu = engine.stats()["cpu_experts"]
        assert num_cpu > 0
        assert (len(experts), len(products)) == ((num_cpu, 0) if whole else (0, 2 * num_cpu))
        torch.testing.assert_close(logits.float(), want.float(), rtol=0.05, atol=0.05 * want.float().abs().max().item())
    finally:
        model.expertflow.close()


def _composed_expert(linear: HostLinear, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """A gated SiLU expert composed op by op from ``linear``'s products and torch's silu and product."""
    gate, up = linear(x, gate_up).chunk(2, dim=-1)
    return linear(F.silu(gate) * up, down)


@pytest.mark.parametrize("n,hidden,inter", [(1, 7, 33), (2, 33, 7), (3, 64, 130), (7, 257, 513)])
def test_a_whole_gated_silu_expert_follows_the_definition(n, hidden, inter):
    """``HostLinear.gated_silu``: ``(silu(g) * u) @ down.T`` with ``[g | u] = x @ gate_up.T``, in float64
    from the bf16 operands, within bf16's roundings: of g and u, of silu(g) and of the product (each
    2^-8 relative), then the down product's own (its fp32 sum rounded once). Against torch's
    composition of the same kernel's products (F.silu, then the product, each rounded to bf16) it
    differs at most where silu's fp32 value sits on a bf16 rounding boundary (std::exp against
    torch's own exp): at most 1% of outputs. ``out`` takes the result and ``signal`` is set."""
    g = torch.Generator().manual_seed(n * 1000 + hidden)
    x = torch.randn(n, hidden, generator=g).bfloat16()
    gate_up = (torch.randn(2 * inter, hidden, generator=g) / hidden**0.5).bfloat16()
    down = (torch.randn(hidden, inter, generator=g) / inter**0.5).bfloat16()
    linear = HostLinear(2)
    try:
        out = torch.full((n, hidden), float("nan"), dtype=torch.bfloat16)
        signal = _C.HostSignal()
        y = linear.gated_silu(x, gate_up, down, out, signal)
        assert y is out and signal.is_set()
        gu = x.double() @ gate_up.double().T
        gate, up = gu[:, :inter], gu[:, inter:]
        exact = (gate * torch.sigmoid(gate) * up) @ down.double().T
        # each rounding of g, u, silu(g) and the product moves h by at most 2^-8 of itself: bound the
        # down product's error by those on |h| . |down|, plus the output's own rounding
        h_abs = (gate * torch.sigmoid(gate) * up).abs()
        bound = 4 * 2.0**-8 * (h_abs @ down.double().abs().T) + 2.0**-8 * exact.abs() + 1e-6
        assert ((y.double() - exact).abs() <= bound).all()
        assert (y != _composed_expert(linear, x, gate_up, down)).float().mean().item() <= 0.01
    finally:
        linear.close()


def test_a_cpu_expert_fills_its_staging_and_sets_its_signal_whether_the_whole_expert_call_takes_it_or_not(tmp_path):
    """The engine's CPU expert with a staging tensor and a signal, as on a GPU: the whole-expert call
    writes the result into the staging and sets the signal; where the native kernel declines it (no
    tokens it serves), the composition runs (torch's kernels: bit for bit ``compute`` with
    ``F.linear``), its result is copied into the staging, and the signal is set all the same."""
    folder = save(build("mixtral", dtype=torch.bfloat16), tmp_path / "m", "published")
    model = ef.from_pretrained(folder, policy="lru", expert_slots="50%", cpu_experts="on", progress=False)
    try:
        engine = model.expertflow
        module, linear = engine.layers[0].module, engine._cpu.linear
        weights = engine._expand(engine.pool.expert(0, 1), torch.bfloat16)
        x = torch.randn(3, weights["gate_up"].shape[1], generator=torch.Generator().manual_seed(0)).bfloat16()
        composed = _composed_expert(linear, x[[0, 2]], weights["gate_up"], weights["down"])
        for max_tokens, want in ((None, composed), (0, module.compute(weights, x[[0, 2]], F.linear))):
            linear.max_tokens = max_tokens
            staging, signal = torch.full((2, x.shape[1]), float("nan"), dtype=torch.bfloat16), _C.HostSignal()
            y = engine._cpu_expert(module, 0, 1, x, torch.tensor([0, 2]), linear, False, staging, signal)
            assert y is staging and signal.is_set()
            if max_tokens is None:
                assert (y != want).float().mean().item() <= 0.01
            else:
                assert torch.equal(y, want)
    finally:
        model.expertflow.close()


def test_a_whole_expert_the_native_kernel_does_not_take_is_left_to_the_caller():
    """None (and the signal untouched) for what the composition must compute: fp32, a layout that
    does not fit, more tokens than the kernel serves, a non-contiguous weight, an ``out`` of another
    shape, a closed kernel."""
    x, gate_up, down = torch.ones(2, 8).bfloat16(), torch.ones(12, 8).bfloat16(), torch.ones(8, 6).bfloat16()
    linear = HostLinear(1, max_tokens=1)
    signal = _C.HostSignal()
    assert linear.gated_silu(x[:1], gate_up, down) is not None
    for args in ((x[:1].float(), gate_up, down), (x[:1], gate_up[:11], down), (x[:1], gate_up, down[:, :5]),
                 (x, gate_up, down), (x[:1], gate_up.T.contiguous().T, down), (x[:1], gate_up, down.T.contiguous().T),
                 (x[:1], gate_up, down, torch.empty(2, 8, dtype=torch.bfloat16)),
                 (x[:1], gate_up, down, torch.empty(1, 8))):
        assert linear.gated_silu(*args, signal=signal) is None
    with torch.enable_grad():
        assert linear.gated_silu(x[:1], gate_up.clone().requires_grad_(), down, signal=signal) is None
    linear.close()
    assert linear.gated_silu(x[:1], gate_up, down, signal=signal) is None and not signal.is_set()


@pytest.mark.parametrize("isa", ["best", "avx512", "portable"])
@pytest.mark.parametrize("n", [1, 2, 6, 33])
@pytest.mark.parametrize("in_features,out_features", [(1, 7), (7, 1), (33, 33), (4100, 9), (4096, 70)])
def test_host_linear_follows_the_definition(isa, n, in_features, out_features):
    """y = x . w^T from fp32 sums with one rounding to bf16: within that rounding (2^-8 of |y|) plus
    the fp32 sum's own error bound (in x 2^-23 of sum |x_k w_k|) of the float64 product. 4096 x 70
    is five chunks of 16 rows (the last one short), dealt to three threads."""
    g = torch.Generator().manual_seed(n * in_features + out_features)
    x = torch.randn(n, in_features, generator=g).to(torch.bfloat16)
    w = torch.randn(out_features, in_features, generator=g).to(torch.bfloat16)
    linear = HostLinear(3, isa)
    try:
        y = linear(x, w)
        exact = x.double() @ w.double().T
        bound = exact.abs() * 2**-8 + (x.double().abs() @ w.double().abs().T) * in_features * 2**-23
        assert y.dtype == torch.bfloat16 and y.shape == (n, out_features)
        assert ((y.double() - exact).abs() <= bound + 1e-30).all()
    finally:
        linear.close()


def test_a_lone_miss_goes_to_the_cpu_whenever_the_cpu_finishes_it_first():
    """CPU 3.4 ms against a 6.5 ms copy: a lone miss goes to the CPU. Its next use may miss again (it
    enters the cache only if backfilled), but that miss, too, may go to the CPU then, so nothing
    more is priced now: the layer's finish time alone decides. Two misses: one to each pipe (6.5 ms)
    beats both on the CPU (6.8); a CPU slower than the copy takes none of one."""
    model = CostModel(line_calibration(6.4, 3.3, 0.1), "auto")
    assert model.choose([1]) == [True]
    assert sorted(model.choose([1, 1])) == [False, True]
    assert CostModel(line_calibration(6.4, 6.6, 0.1), "auto").choose([1]) == [False]


def test_host_linear_leaves_what_it_does_not_take_to_torch():
    linear = HostLinear(2)
    try:
        assert linear.isa in ("avx512bf16", "avx512", "portable") and HostLinear(1, "portable").isa == "portable"
        x32, w32 = torch.randn(3, 8), torch.randn(5, 8)
        assert torch.equal(linear(x32, w32), F.linear(x32, w32))  # fp32: torch's kernel, bit for bit
        x, w = x32.bfloat16(), torch.randn(8, 5).bfloat16().T  # a transposed view: not contiguous
        assert torch.equal(linear(x, w), F.linear(x, w))
        with pytest.raises(RuntimeError):  # shapes that do not fit: torch's own error
            linear(x, torch.randn(5, 9).bfloat16())
        with pytest.raises(ExpertFlowError, match="isa must be best, avx512 or portable"):
            HostLinear(2, "sse")
        with pytest.raises(ExpertFlowError, match="num_threads must be 1 to 4096"):
            HostLinear(0)
    finally:
        linear.close()
    assert torch.equal(linear(x32.bfloat16(), w32.bfloat16()), F.linear(x32.bfloat16(), w32.bfloat16()))  # closed
    kernel = _C.HostLinear(2)
    kernel.close()
    kernel.close()  # twice is fine
    y = torch.empty(1, 1, dtype=torch.bfloat16)
    with pytest.raises(ExpertFlowError, match="after close"):
        kernel.linear_bf16(y.data_ptr(), y.data_ptr(), y.data_ptr(), 1, 1, 1)
    w = torch.randn(4, 8).bfloat16().requires_grad_()
    out = HostLinear(1)(x32.bfloat16(), w)
    assert out.requires_grad  # autograd is torch's: the native kernel is skipped


def test_calibration_gives_each_token_count_the_faster_kernel():
    """A stand-in whose native kernel takes 1 ms up to 16 tokens and 40 ms beyond, torch 3 + 0.1 n
    ms: the native kernel serves up to 16 tokens, the curve takes the faster time at each point, and a
    cached calibration sets the kernel's limit again."""
    def compute(weights, x, linear):
        n = x.shape[0]
        native = isinstance(linear, HostLinear) and (linear.max_tokens is None or n <= linear.max_tokens)
        time.sleep(((1.0 if n <= 16 else 40.0) if native else 3.0 + 0.1 * n) / 1e3)
        return x

    linear = HostLinear(1)
    try:
        args = (compute, [{"w": torch.zeros(64, dtype=torch.uint8)}], lambda t: t, 8, torch.bfloat16,
                torch.device("cpu"), "two kernels")
        c = calibrate(*args, linear=linear)
        assert c.native_max_tokens == 16 and linear.max_tokens == 16
        assert c.cpu_ms(1) == pytest.approx(1.0, abs=0.7) and c.cpu_ms(16) == pytest.approx(1.0, abs=0.7)
        assert c.cpu_ms(64) == pytest.approx(3.0 + 6.4, abs=1.5) and c.cpu_ms(256) == pytest.approx(3.0 + 25.6, abs=3)
        # past the native kernel's last point, torch's curve prices it (torch serves it), not a line
        # from the native point at 16 tokens to torch's at 64
        assert c.cpu_ms(17) == pytest.approx(3.0 + 1.7, abs=0.8)
        linear.max_tokens = 0
        assert calibrate(*args, linear=linear) == c and linear.max_tokens == 16  # from the cache
        fp32 = calibrate(*args[:4], torch.float32, *args[5:], linear=linear)  # native is bf16 only
        assert fp32.native_max_tokens == 0 and linear.max_tokens == 0
    finally:
        linear.close()


def test_calibration_reads_a_new_expert_at_every_call(tmp_path):
    """Each timed call takes the next of the experts given, so none is read from a warm cache."""
    seen = []

    def compute(weights, x, linear):
        seen.append(int(weights["w"][0]))
        return x

    experts = [{"w": torch.full((64,), e, dtype=torch.uint8)} for e in range(3)]
    calibrate(compute, experts, lambda t: t, 8, torch.float32, torch.device("cpu"), "rotation")
    assert len(seen) >= 3 * 5 and all(b == (a + 1) % 3 for a, b in itertools.pairwise(seen))
    with pytest.raises(ValueError, match="at least one expert"):
        calibrate(compute, [], lambda t: t, 8, torch.float32, torch.device("cpu"), "none")


def test_auto_on_the_host_backend_stays_off_and_says_why(tmp_path, caplog):
    folder = save(build("mixtral"), tmp_path / "m", "published")
    with caplog.at_level(logging.INFO, logger="expertflow"):
        model = ef.from_pretrained(folder, policy="expertflow", expert_slots="25%", cpu_experts="auto", progress=False)
    try:
        assert model.expertflow.cost_model is None
        assert "cpu experts: off (host backend" in caplog.text
        _greedy(model)
        assert "cpu_experts" not in model.expertflow.stats()
    finally:
        model.expertflow.close()


def test_bad_modes_are_refused_before_loading(tmp_path):
    folder = save(build("mixtral"), tmp_path / "m", "published")
    with pytest.raises(ValueError, match="cpu_experts must be one of off, auto, on"):
        ef.from_pretrained(folder, cpu_experts="sometimes", progress=False)
    with pytest.raises(ValueError, match="does not combine with distributed"):
        ef.from_pretrained(folder, cpu_experts="on", distributed=True, progress=False)
    for bad in (0, -2, 1.5, "4", True, 4097):
        with pytest.raises(ValueError, match="cpu_threads must be a number of threads from 1 to 4096"):
            ef.from_pretrained(folder, cpu_experts="on", cpu_threads=bad, progress=False)
    with pytest.raises(ValueError, match="cpu_threads applies to cpu_experts 'auto' or 'on', not 'off'"):
        ef.from_pretrained(folder, cpu_experts="off", cpu_threads=2, progress=False)


def test_the_executor_runs_torch_with_its_own_thread_count_on_its_worker():
    """``num_threads`` sets the worker thread's torch threads (and the native kernel's); the caller's
    threads stay as they were, and so do those of a thread that first calls torch later. Inline,
    torch keeps the caller's."""
    caller = torch.get_num_threads()

    def in_a_new_thread() -> int:
        seen = []
        thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        return seen[0]

    for threads in (1, 2):
        executor = CpuExecutor(asynchronous=True, num_threads=threads)
        try:
            assert executor.run(torch.get_num_threads) == threads and executor.linear.num_threads == threads
            assert executor.run(lambda: threading.current_thread().name).startswith("expertflow-cpu")
            assert torch.get_num_threads() == caller and in_a_new_thread() == caller
            assert executor.run(torch.get_num_threads) == threads  # the worker kept its own
        finally:
            executor.close()
    inline = CpuExecutor(asynchronous=False, num_threads=1)
    try:
        assert inline.run(torch.get_num_threads) == caller and inline.linear.num_threads == 1
    finally:
        inline.close()


def test_an_executor_whose_kernel_fails_to_start_leaves_no_worker_behind(monkeypatch):
    from expertflow import cpu_experts

    def broken(num_threads):
        raise RuntimeError("no kernel")
    monkeypatch.setattr(cpu_experts, "HostLinear", broken)
    threads = threading.active_count()
    with pytest.raises(RuntimeError, match="no kernel"):
        CpuExecutor(asynchronous=True, num_threads=1)
    assert threading.active_count() == threads


@pytest.mark.parametrize("torch_threads,cores,asynchronous,expected", [
    (16, 16, True, 15),   # beside a GPU: one core for the thread launching its work
    (16, 16, False, 16),  # inline (host backend): nothing else runs meanwhile
    (4, 16, True, 4),     # fewer asked of torch than the cores allow
    (2, 1, True, 1),      # one core: still one thread
])
def test_default_threads_leave_a_core_to_the_launching_thread(monkeypatch, torch_threads, cores, asynchronous, expected):
    monkeypatch.setattr(torch, "get_num_threads", lambda: torch_threads)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert default_threads(asynchronous) == expected


def test_calibration_times_the_cpu_where_the_executor_runs_its_experts():
    """With an executor the CPU's points are timed on its worker thread, with its thread count, and
    the calibration (and its cache key) record that count."""
    seen = set()

    def compute(weights, x, linear):
        seen.add((threading.current_thread().name.split("_")[0], torch.get_num_threads()))
        return x

    executor = CpuExecutor(asynchronous=True, num_threads=1)
    try:
        args = (compute, [{"w": torch.zeros(64, dtype=torch.uint8)}], lambda t: t, 8, torch.float32,
                torch.device("cpu"), "where it runs")
        c = calibrate(*args, executor=executor)
        assert seen == {("expertflow-cpu", 1)} and c.cpu_threads == 1
        executor2 = CpuExecutor(asynchronous=True, num_threads=2)
        try:
            seen.clear()
            assert calibrate(*args, executor=executor2).cpu_threads == 2  # another count: measured again
            assert seen == {("expertflow-cpu", 2)}
        finally:
            executor2.close()
    finally:
        executor.close()


def line_calibration(copy_ms, fixed_ms, per_token_ms, gpu_ms=0.1) -> Calibration:
    """A calibration whose CPU takes fixed_ms + per_token_ms * n."""
    return Calibration(copy_ms, (1, 256), (fixed_ms + per_token_ms, fixed_ms + 256 * per_token_ms), gpu_ms, 4, 0.0)


DECODE = line_calibration(6.4, 7.3, 0.1)


def test_the_cost_model_on_the_h200_machines_figures():
    """A Mixtral expert: 6.4 ms to copy, 7.4 ms on 16 cores for one token."""
    auto = CostModel(DECODE, "auto")
    assert auto.cpu_can_win(8)
    assert auto.choose([1]) == [False]  # one miss: the link is free, a copy is sooner
    assert sorted(auto.choose([1, 1])) == [False, True]  # the second miss would wait 6.4 ms: the CPU
    assert auto.choose([200, 150]) == [False, False]  # prefill: 27 ms on the CPU, copies win
    assert CostModel(DECODE, "on").choose([200, 1]) == [True, True]
    assert CostModel(DECODE, "off").choose([1, 1]) == [False, False]
    # A CPU slower than two copies still wins the third miss of a layer (top-k 4 and up, batches)
    third = CostModel(line_calibration(1.0, 2.5, 0.0), "auto")
    assert third.choose([1, 1, 1]) == [False, False, True] and third.cpu_can_win(8)
    assert not third.cpu_can_win(2)  # two experts a layer: never
    assert not CostModel(line_calibration(1.0, 50.0, 0.1), "auto").cpu_can_win(8)


def test_a_visit_leaves_to_the_cpu_the_unkept_misses_it_computes_within_one_copy():
    """A copy takes 6.4 ms. A CPU of 3 ms an expert takes two of a visit's misses that the cache
    would not keep, one of 4 ms one, one of 7 ms none (the copy is sooner); 64 tokens at 3 + 0.1 a
    token (9.4 ms) none; only `auto` leaves any. Priced as inside steps: a CPU measured 1.6 times
    slower there (4.8 ms) takes one, and a link measured twice as slow makes room for more."""
    assert CostModel(line_calibration(6.4, 2.9, 0.1), "auto").misses_left_to_cpu(1) == 2
    assert CostModel(line_calibration(6.4, 3.9, 0.1), "auto").misses_left_to_cpu(1) == 1
    assert CostModel(line_calibration(6.4, 6.9, 0.1), "auto").misses_left_to_cpu(1) == 0
    assert CostModel(line_calibration(6.4, 2.9, 0.1), "auto").misses_left_to_cpu(64) == 0
    assert [CostModel(line_calibration(6.4, 2.9, 0.1), mode).misses_left_to_cpu(1) for mode in ("on", "off")] == [0, 0]
    slow = CostModel(line_calibration(6.4, 2.9, 0.1), "auto")
    for _ in range(30):
        slow.observe(1, 4.8, with_demand_loads=True)
    assert slow.misses_left_to_cpu(1) == 1
    for _ in range(30):
        slow.observe_link(12.8)
    assert slow.misses_left_to_cpu(1) == 2


def test_the_cost_model_learns_what_the_cpu_costs_inside_a_step():
    """Calibrated alone the CPU beats a copy (5.8 against 6.5 ms); inside steps it takes 11.6 ms. After
    a few observations the model weighs the CPU at about twice its calibration: a lone miss copies
    again, a second one still goes to the CPU (11.6 < 6.5 + 6.5 + 0.1)."""
    auto = CostModel(line_calibration(6.5, 5.7, 0.1), "auto")
    assert auto.choose([1]) == [True]
    for _ in range(30):
        for with_demand_loads in (False, True):
            auto.observe(1, 11.6, with_demand_loads)
    assert auto.by_point(auto.cpu_scales) == {case: {"1": pytest.approx(2.0, rel=1e-2), "256": 1.0}  # 11.6 / 5.8
                                              for case in ("without_demand_loads", "with_demand_loads")}
    assert auto.choose([1]) == [False]
    assert sorted(auto.choose([1, 1])) == [False, True]
    for _ in range(30):  # and back, when the steps leave the CPU alone again
        for with_demand_loads in (False, True):
            auto.observe(4, 6.1, with_demand_loads)
    assert auto.cpu_scales[0][0] == pytest.approx(1.0, rel=1e-2) and auto.choose([1]) == [True]


def test_each_calibration_point_has_its_own_scale():
    """The native kernel serves up to 2 tokens here (3.5 ms calibrated), torch's the rest (6 ms for 4,
    8 for 64, 32 for 256). Inside steps torch's 64-token experts take three times their calibration,
    its 4-token ones and the native kernel's their own: what one size does says nothing of another,
    so prefill's experts of 64 tokens (24 ms, past three copies' 19.6) now copy while decode's lone
    miss (3.5 ms) and batched decode's 4-token experts still go to the CPU."""
    c = Calibration(6.5, (1, 2, 4, 64, 256), (3.5, 3.5, 6.0, 8.0, 32.0), 0.1, 16, 0.0, 2, (6.0, 6.0, 6.0, 8.0, 32.0))
    auto = CostModel(c, "auto")
    assert auto.choose([64, 64, 64]).count(True) == 1  # 8 ms beside two copies' 13.1, against three (19.6)
    for _ in range(40):
        for with_demand_loads in (False, True):
            auto.observe(70, 24.0 * c.cpu_ms(70) / 8.0, with_demand_loads)  # priced at the point of 64 tokens
            auto.observe(1, 3.5, with_demand_loads)
            auto.observe(3, 6.0, with_demand_loads)  # torch's kernel (past 2 tokens), nearest to 4
    assert auto.by_point(auto.cpu_scales)["with_demand_loads"] == {
        "1": pytest.approx(1.0), "2": 1.0, "4": pytest.approx(1.0), "64": pytest.approx(3.0, rel=1e-3), "256": 1.0}
    assert auto.choose([64, 64, 64]) == [False, False, False]
    assert auto.choose([1]) == [True]  # one scale for all (3) would copy it: 10.5 ms against 6.6
    assert auto.choose([4, 4]).count(True) == 1  # 6 ms beside a copy's 6.6, against 12 on the CPU or 13.1


def test_an_erratic_cpu_is_priced_at_its_usual_worst():
    """A lone miss: a copy takes 6.6 ms, the CPU 3.5 calibrated. A CPU steadily 1.5 times slower in
    steps (5.25 ms) takes it. One as fast on average but alternating between 1 and 2 times its
    calibration is priced at its scale plus its spread (1.5 + 0.5: 7 ms), and the miss is copied."""
    c = line_calibration(6.5, 3.4, 0.1)
    steady, erratic = CostModel(c, "auto"), CostModel(c, "auto")
    for i in range(60):
        steady.observe(1, 3.5 * 1.5, with_demand_loads=False)  # a lone miss: nothing copied beside it
        erratic.observe(1, 3.5 * (1.0 if i % 2 else 2.0), with_demand_loads=False)
    assert steady.cpu_scales[0][0] == pytest.approx(1.5) and steady.cpu_spreads[0][0] < 0.01
    assert erratic.cpu_scales[0][0] == pytest.approx(1.5, abs=0.06)
    assert erratic.cpu_spreads[0][0] == pytest.approx(0.5, abs=0.06)
    assert steady.choose([1]) == [True] and erratic.choose([1]) == [False]


def test_the_link_is_priced_at_its_time_inside_steps():
    """Two misses of one token each: alone, a copy (6.5 ms) finishes with the CPU's first (3.4 ms), so
    one goes to each pipe. Once demand loads take 8 ms inside steps, the CPU's two (6.8 ms) finish
    first, and the model sends both there."""
    auto = CostModel(line_calibration(6.5, 3.3, 0.1), "auto")
    assert sorted(auto.choose([1, 1])) == [False, True]
    for _ in range(40):
        auto.observe_link(8.0)
    assert auto.link_scale == pytest.approx(8.0 / 6.5, rel=1e-2)
    assert auto.choose([1, 1]) == [True, True]
    auto.observe_link(0.0)  # nothing timed: no change
    assert auto.link_scale == pytest.approx(8.0 / 6.5, rel=1e-2)


def test_a_slow_cpu_is_tried_again_and_kept_once_it_is_fast():
    """The loop a run makes: choose, then observe what the chosen CPU experts took. While the CPU
    takes 2.5x its calibration inside steps, a layer's second miss mostly copies; the CPU is still
    tried now and then (a scale that kept it out for good could never be measured again), and once it
    is back at its calibrated speed the second miss goes to it again."""
    auto = CostModel(line_calibration(6.5, 5.7, 0.1), "auto")

    def layers(num_layers: int, true_scale: float) -> int:
        sent = 0
        for _ in range(num_layers):
            assert auto.choose([]) == []  # a layer of hits between every two: it neither counts nor resets
            plan = auto.choose([1, 1])
            for to_cpu in plan:
                if to_cpu:
                    sent += 1
                    auto.observe(1, 5.8 * true_scale, with_demand_loads=not all(plan))
        return sent

    slow = layers(1000, 2.5)
    assert 0 < slow < 100  # tried again now and then, mostly copied
    assert auto.choose([1]) == [False]  # still known to be slow: a lone miss copies
    layers(300, 1.0)
    assert auto.by_point(auto.cpu_scales)["with_demand_loads"]["1"] == pytest.approx(1.0, abs=0.05)
    assert layers(100, 1.0) >= 100  # every layer's second miss (at least) goes to the CPU again


def test_cpu_time_follows_the_measured_points_and_their_last_slope():
    """Flat where reading the weights dominates, linear where the arithmetic does (the H200 machine's
    shape: 7 ms for 1 to 16 tokens), extended beyond the last point along its slope."""
    c = Calibration(6.4, (1, 4, 16, 64, 256), (7.0, 7.0, 7.2, 20.0, 80.0), 0.1, 16, 0.0)
    assert c.cpu_ms(1) == 7.0 and c.cpu_ms(16) == pytest.approx(7.2)
    assert c.cpu_ms(40) == pytest.approx(7.2 + (20.0 - 7.2) * 24 / 48)
    assert c.cpu_ms(512) == pytest.approx(80.0 + 60.0 / 192 * 256)
    # prefill's experts (128 tokens each) are copied, decode's second miss goes to the CPU
    auto = CostModel(c, "auto")
    assert auto.choose([128, 128, 128]) == [False, False, False]
    assert sorted(auto.choose([1, 1])) == [False, True]


POINTS = (1, 2, 4, 16, 64, 256)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 300), min_size=0, max_size=9), st.floats(0.1, 20), st.floats(0.0, 20),
       st.floats(0.0, 2), st.floats(0.0, 1), st.sampled_from([0, 1, 2, 4, 256]),
       st.lists(st.floats(0.5, 3), min_size=2 * len(POINTS), max_size=2 * len(POINTS)),
       st.lists(st.floats(0.0, 1), min_size=2 * len(POINTS), max_size=2 * len(POINTS)), st.floats(0.5, 2))
def test_auto_plans_the_cheapest_split_and_never_one_slower_than_copying(
        tokens, copy_ms, fixed, per_token, gpu_ms, native_max_tokens, scales, spreads, link_scale):
    """From the definition, against every split of the misses: a layer finishes when both pipes do.
    The link copies its experts one after another at its in-step time (each then computes on the
    GPU); the CPU computes its own one after another, each at its calibrated time times the scale
    plus spread of its calibration point (the nearest in log tokens of those its kernel serves;
    past every point of its kernel, the last point), for a layer that also copies or for one whose
    misses all run on the CPU. The plan costs the least of all 2^m splits, and finishes no later than
    copying every miss, with the CPU at its scale or slower by its spread."""
    c = Calibration(copy_ms, POINTS, tuple(fixed + per_token * n for n in POINTS), gpu_ms, 4, 0.0, native_max_tokens)
    model = CostModel(c, "auto")
    model.link_scale = link_scale
    num_points = len(POINTS)
    model.cpu_scales = [list(scales[:num_points]), list(scales[num_points:])]
    model.cpu_spreads = [list(spreads[:num_points]), list(spreads[num_points:])]
    on_cpu = model.choose(tokens)
    assert len(on_cpu) == len(tokens)
    link_ms = copy_ms * link_scale

    def point_of(n):
        native = n <= native_max_tokens
        mine = [i for i, p in enumerate(POINTS) if (p <= native_max_tokens) == native] or [num_points - 1]
        # nearest in log tokens, the lower point on an exact tie (log2 of powers of two is exact)
        return min(mine, key=lambda i: (round(abs(math.log2(POINTS[i]) - math.log2(n)), 9), POINTS[i]))

    def finish(assignment, slow):
        num_copies = sum(1 for cpu in assignment if not cpu)
        case = num_points if num_copies else 0  # the second half: a layer that also copies
        link = num_copies * link_ms + (gpu_ms if num_copies else 0.0)
        cpu = sum(c.cpu_ms(n) * (scales[case + point_of(n)] + slow * spreads[case + point_of(n)])
                  for n, on in zip(tokens, assignment) if on)
        return max(link, cpu)

    # a plan's cost prices the CPU at its scale plus spread, as the model does
    best = min(finish(list(a), 1) for a in itertools.product([False, True], repeat=len(tokens)))
    assert finish(on_cpu, 1) == pytest.approx(best, rel=1e-9, abs=1e-9)
    for slow in (0, 1):
        assert finish(on_cpu, slow) <= finish([False] * len(tokens), slow) + 1e-9


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 300), st.floats(0.0, 1.0)), min_size=0, max_size=12),
       st.floats(0.5, 10), st.floats(0.5, 10), st.floats(0.0, 0.2), st.floats(0.0, 1), st.floats(0.5, 2), st.booleans())
def test_copies_on_their_way_are_priced_at_what_is_left_of_them(misses, copy_ms, cpu_ms, per_token, gpu_ms, scale, same_share):
    """A miss whose copy is on its way costs the link only what is left of it (``copy_shares``). From
    the definition, against every split: the plan costs the least of all 2^m splits (with one share
    for all, or up to MAX_SPLITS_PRICED misses), and never more than copying every miss or computing
    every one on the CPU."""
    if same_share and misses:  # every copy as far along
        misses = [(n, misses[0][1]) for n, _ in misses]
    tokens = [n for n, _ in misses]
    shares = [share for _, share in misses]
    c = Calibration(copy_ms, (1, 256), (cpu_ms + per_token, cpu_ms + 256 * per_token), gpu_ms, 4, 0.0)
    model = CostModel(c, "auto")
    model.cpu_scales = [[scale, scale], [1.2 * scale, 1.2 * scale]]  # slower beside demand loads
    scales = [row[0] for row in model.cpu_scales]  # as priced: choose then moves unused prices 1% back
    on_cpu = model.choose(tokens, shares)

    def cost(assignment):
        link = [copy_ms * share for share, cpu in zip(shares, assignment) if not cpu]
        case = 1 if link else 0
        cpu = sum(c.cpu_ms(n) * scales[case] for n, on in zip(tokens, assignment) if on)
        return max(sum(link) + (gpu_ms if link else 0.0), cpu)

    assert cost(on_cpu) <= min(cost([False] * len(tokens)), cost([True] * len(tokens))) + 1e-9
    if same_share or len(tokens) <= CostModel.MAX_SPLITS_PRICED:
        best = min(cost(list(a)) for a in itertools.product([False, True], repeat=len(tokens)))
        assert cost(on_cpu) == pytest.approx(best, rel=1e-9, abs=1e-9)


def test_a_forecasts_copies_about_to_land_stay_on_the_link():
    """Two misses of one token at the H200 machine's figures (a copy 6.4 ms, the CPU 7.4): as demand
    misses one goes to the CPU (7.4 ms against 12.8 + 0.1); with a tenth of each copy left, both wait
    for the link (1.4 ms). Of three, one copy half done and two not started, the CPU takes a whole
    one (the link 9.7 ms, the CPU 7.4), not the half (12.9)."""
    auto = CostModel(DECODE, "auto")
    assert sorted(auto.choose([1, 1])) == [False, True]
    assert auto.choose([1, 1], [0.1, 0.1]) == [False, False]
    on_cpu = auto.choose([1, 1, 1], [0.5, 1.0, 1.0])
    assert not on_cpu[0] and sum(on_cpu) == 1


def test_a_layer_goes_whole_to_the_cpu_where_the_cpu_is_faster_without_demand_loads_beside_it():
    """Two misses of one token: a copy takes 6.9 ms, the CPU 3.5 calibrated. With a demand load beside
    it the CPU takes 1.2 times that, without 0.9 times: both to the CPU (6.3 ms) beats one to each
    pipe (6.9). Had the model learnt only the CPU beside copies, both on the CPU would have looked
    like 8.4 ms."""
    auto = CostModel(line_calibration(6.8, 3.4, 0.1), "auto")
    for _ in range(30):
        auto.observe(1, 3.5 * 1.2, with_demand_loads=True)
        auto.observe(1, 3.5 * 0.9, with_demand_loads=False)
    assert auto.choose([1, 1]) == [True, True]
    for _ in range(30):  # the CPU without demand loads as slow as with them: one to each pipe
        auto.observe(1, 3.5 * 1.2, with_demand_loads=False)
    assert sorted(auto.choose([1, 1])) == [False, True]


def test_prices_the_plan_leaves_unused_drift_back_until_the_cpu_is_tried_again():
    """Two 1-token misses, a copy 6.9 ms with its GPU compute, the CPU 3.0 ms calibrated: at its
    calibration the whole layer on the CPU (6.0 ms) wins. A few slow measurements of whole-CPU layers
    (2.5 times the calibration) keep the layer split; each layer that prices the whole-CPU plan
    without running it moves that price 1% of the way back to the calibration, so the CPU is tried
    whole again (after about 240 layers), and kept once it measures fast. The link priced out (every
    miss on the CPU) drifts back the same way, 2% a pass."""
    auto = CostModel(line_calibration(6.8, 2.9, 0.1), "auto")
    for _ in range(30):
        auto.observe(1, 3.0 * 1.2, with_demand_loads=True)
    for _ in range(5):
        auto.observe(1, 3.0 * 2.5, with_demand_loads=False)
    assert sorted(auto.choose([1, 1])) == [False, True]
    layers_until_tried = next((n for n in range(500) if all(auto.choose([1, 1]))), None)
    assert layers_until_tried is not None and 150 < layers_until_tried < 350
    for _ in range(30):
        auto.observe(1, 3.0 * 0.9, with_demand_loads=False)
    assert all(all(auto.choose([1, 1])) for _ in range(50))
    for _ in range(20):
        auto.observe_link(13.6)
    assert auto.link_scale == pytest.approx(2.0, rel=0.02)
    for _ in range(100):
        auto.observe_link(None)
    assert auto.link_scale == pytest.approx(1.0 + 0.98 ** 100, rel=0.02)


def test_calibration_fits_its_definition_and_is_cached(tmp_path):
    """A stand-in expert that takes 2 + 0.5 n ms on the CPU: the measured curve follows it; the
    second call reads the cache; recalibrate measures again (the stand-in now takes 4 + 0.5 n)."""
    fixed_ms = [2.0]

    def compute(weights, x, linear):
        time.sleep((fixed_ms[0] + 0.5 * x.shape[0]) / 1e3)
        return x

    stored = {"w": torch.zeros(1024, dtype=torch.uint8)}
    args = (compute, [stored], lambda tensors: tensors, 8, torch.float32,
            torch.device("cpu"), "stand-in")
    first = calibrate(*args)
    assert first.cpu_tokens == (1, 2, 4, 16, 64, 256)
    for n in (1, 16, 100, 256, 400):
        assert first.cpu_ms(n) == pytest.approx(2.0 + 0.5 * n, abs=0.8 + 0.02 * n)
    assert first.copy_ms >= 0 and first.seconds < 10
    cache = json.loads((tmp_path / "cache" / "calibration.json").read_text())
    assert len(cache) == 1 and "stand-in" in next(iter(cache))
    fixed_ms[0] = 4.0
    assert calibrate(*args) == first  # read back, not measured
    again = calibrate(*args, recalibrate=True)
    assert again.cpu_ms(1) == pytest.approx(4.5, abs=0.8)
    assert calibrate(*args) == again  # the new measurement replaced the old one


def test_a_slow_outlier_at_few_tokens_does_not_lift_the_curve(tmp_path, monkeypatch):
    """Noise only adds time: a first point slower than later ones is an outlier and takes the least
    of the points after it; a curve that rises stays as measured."""
    from expertflow import cpu_experts

    monkeypatch.setenv("EXPERTFLOW_CACHE_DIR", str(tmp_path))
    stored = {"w": torch.zeros(64, dtype=torch.uint8)}
    for measured, want in (([14.7, 8.9, 9.0, 9.1, 10.1, 29.5], [8.9, 8.9, 9.0, 9.1, 10.1, 29.5]),
                           ([2.0, 2.5, 3.0, 5.0, 9.0, 30.0], [2.0, 2.5, 3.0, 5.0, 9.0, 30.0])):
        times = iter(measured + [1.0])  # then the copy
        monkeypatch.setattr(cpu_experts, "median_ms", lambda fn, reps, sync=None, times=times: next(times))
        c = calibrate(lambda w, x, linear: x, [stored], lambda t: t, 8, torch.float32, torch.device("cpu"), "outlier",
                      recalibrate=True)
        assert list(c.cpu_times_ms) == want


def test_a_broken_calibration_cache_is_measured_over(tmp_path):
    cache = tmp_path / "cache" / "calibration.json"
    cache.parent.mkdir(parents=True)
    stored = {"w": torch.zeros(64, dtype=torch.uint8)}
    for text in ("[1, 2]", "{not json", '{"x": 5}'):
        cache.write_text(text)
        c = calibrate(lambda w, x, linear: x, [stored], lambda t: t, 8, torch.float32, torch.device("cpu"), "broken")
        assert c.cpu_threads == torch.get_num_threads()
        assert "broken" in next(iter(json.loads(cache.read_text()).keys() - {"x"}))


def test_bench_runs_each_policy_with_and_without_cpu_experts(tmp_path):
    from expertflow.bench import BenchConfig, run_bench

    folder = save(build("mixtral"), tmp_path / "m", "published")
    result = run_bench(BenchConfig(model=str(folder), routing="live", slots=["25%"], policies=["all_gpu", "lru"],
                                   cpu_experts=["off", "on"], new_tokens=6, progress=False, prompt_ids=[3, 14, 15]))
    rows = {(r["policy"], r["cpu_experts"]): r for r in result["rows"]}
    assert set(rows) == {("all_gpu", "off"), ("lru", "off"), ("lru", "on")}
    on = rows[("lru", "on")]
    assert on["cpu_experts_per_token"] > 0 and rows[("lru", "off")]["cpu_experts_per_token"] == 0
    assert on["same_tokens_as_all_gpu"] and rows[("lru", "off")]["same_tokens_as_all_gpu"]
    assert on["demand_misses_per_token"] == 0  # every miss ran from host memory ...
    # ... and was backfilled into the cache behind its layer: those are the only bytes moved (a backfill
    # evicted before it finished moves less than an expert), and later uses of those experts came from slots
    assert on["backfills_per_token"] > 0 and rows[("lru", "off")]["backfills_per_token"] == 0
    assert 0 < on["bytes_per_token"] <= on["backfills_per_token"] * result["expert_bytes"] * (1 + 1e-9)
    assert on["hit_ratio"] > 0
    calibration = rows[("lru", "on")]["cpu_calibration"]  # what the cost model measured, and how long it took
    assert calibration["seconds"] > 0 and len(calibration["cpu_times_ms"]) == len(calibration["cpu_tokens"])
    assert rows[("lru", "off")]["cpu_calibration"] is None
    assert all(r["prefill_ms"] > 0 for r in rows.values())


def test_the_bench_traces_each_layer_of_the_timed_run(tmp_path):
    """--layer-trace: every row carries one record per MoE layer per pass of the timed run (the
    prompt's, then each decode step's), in layer order; the decode passes' records add up to the
    row's per-token counters (taken over the same steps). A thread count given for the CPU's experts
    sets theirs, and the runs without CPU experts (all_gpu first) run as they would without it."""
    from expertflow.bench import BenchConfig, run_bench

    folder = save(build("mixtral"), tmp_path / "m", "published")
    new_tokens, prompt = 5, [3, 14, 15]
    result = run_bench(BenchConfig(model=str(folder), routing="live", slots=["25%"], policies=["lru"],
                                   cpu_experts=["off", "on"], new_tokens=new_tokens, progress=False,
                                   prompt_ids=prompt, layer_trace=True, cpu_threads=1))
    assert [(r["policy"], r["cpu_experts"]) for r in result["rows"]] == [("all_gpu", "off"), ("lru", "off"), ("lru", "on")]
    assert next(r for r in result["rows"] if r["cpu_experts"] == "on")["cpu_calibration"]["cpu_threads"] == 1
    num_layers, decoded = result["num_layers"], new_tokens - 1
    for row in result["rows"]:
        trace = row["layer_trace"]
        assert [r["layer"] for r in trace] == list(range(num_layers)) * new_tokens
        assert [r["tokens"] for r in trace] == [len(prompt)] * num_layers + [1] * num_layers * decoded
        decode = trace[num_layers:]
        assert sum(r["cpu_experts"] for r in decode) == pytest.approx(row["cpu_experts_per_token"] * decoded)
        assert sum(r["misses"] for r in decode) == pytest.approx(row["demand_misses_per_token"] * decoded)
        assert all(1 <= r["experts"] <= 2 for r in decode)  # top-2 of one token
        assert all(r["host_ms"] > 0 and r["cpu_ms"] >= 0 and r["cpu_wait_ms"] >= 0 for r in trace)
        assert trace[0]["gap_ms"] is None and all(r["gap_ms"] > 0 for r in trace[1:])
    on = next(r for r in result["rows"] if r["cpu_experts"] == "on")
    assert sum(r["cpu_experts"] for r in on["layer_trace"]) > 0 and all(r["misses"] == 0 for r in on["layer_trace"])


def test_a_price_no_plan_used_stays_as_learnt():
    """A layer with one miss prices it copied or on the CPU without demand loads; the price with
    demand loads beside the CPU is not used, so it must not drift: decode's lone misses would
    otherwise pull the price of split layers toward the calibration."""
    auto = CostModel(line_calibration(6.8, 2.9, 0.1), "auto")
    for _ in range(40):
        auto.observe(1, 3.0 * 1.4, with_demand_loads=True)
    learnt = auto.cpu_scales[1][0]
    for _ in range(300):
        auto.choose([1])
    assert auto.cpu_scales[1][0] == learnt
    for _ in range(100):  # a layer of two misses prices it, and when it copies both ...
        auto.observe(1, 3.0 * 5.0, with_demand_loads=False)
        auto.observe(1, 3.0 * 5.0, with_demand_loads=True)
    assert auto.choose([1, 1]) == [False, False]
    before = auto.cpu_scales[1][0]
    auto.choose([1, 1])
    assert auto.cpu_scales[1][0] == pytest.approx(before + 0.01 * (1 - before))  # ... it drifts back

