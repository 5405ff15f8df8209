"""Trace replay: drive the runtime's slot cache through a routing trace, without a model.

Semantics: tokens in trace order, one step each; each visits its layers in ascending order and, at a
layer, accesses its experts in router-rank order. A resident (layer, expert) is a hit; otherwise a
demand miss loads it, evicting (when full) a resident expert the layer does not need, as the policy
orders. One pool of ``capacity`` slots serves all layers, or with ``per_layer`` each layer has
``capacity`` slots of its own (the cache's per-layer quotas).

Policies: ``lru`` and ``lfu`` (demand paging over the shared pool), ``belady`` (evicts the expert
whose next access lies farthest ahead: the fewest bytes demand paging can move), and the live
policies ``gate_ahead`` and ``expertflow``, driven exactly as in generation: the same
:class:`~expertflow.policies.Policy` objects, the same planner, the same cache decisions. Forecasts
(``predictor``): ``history`` (the previous token's path), ``oracle`` (the true future),
``noisy-oracle:R``, ``gate-oracle:R`` (history plus gate-ahead right with probability R), or a trained
predictor on a trace recorded by ``expertflow trace`` (whose recorded gate-ahead then refines it, as the
router does live).

Simulated time follows the copy engine: one link of ``bandwidth_gbps``; prefetches go out in chunks
in due order; a demand load waits only for the chunk on the wire; a queued prefetch that is needed
becomes a demand load; a layer computes for ``compute_ms_per_layer`` once its experts have landed.
The bound is max(Belady's bytes / bandwidth, total compute): no policy of this cache can beat it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from . import _C
from .oracles import GateOracle, TraceOracle, TraceSchedule, parse_forecast
from .planner import Plan
from .policies import EngineInfo, Expertflow, GateAhead, GateSource, HistoryPredictor, StepContext, StepPredictor
from .traces import RoutingTrace
from .units import parse_slots

__all__ = ["REPLAY_POLICIES", "ReplayResult", "replay", "bound", "parse_capacity", "next_use_positions"]

REPLAY_POLICIES = ("lru", "lfu", "belady", "gate_ahead", "expertflow")


@dataclass
class ReplayResult:
    policy: str
    capacity: int
    per_layer: bool
    num_slots: int
    accesses: int
    hits: int
    misses: int  # demand misses: loads compute had to ask for
    hit_ratio: float
    bytes: int | None  # every byte sent over the link (demand and prefetch), when expert sizes are known
    demand_bytes: int | None = None
    prefetch_bytes: int | None = None
    prefetches: int = 0
    prefetch_hits: int = 0
    wasted_prefetches: int = 0  # prefetched, then evicted unused
    cancelled_prefetches: int = 0  # dropped before all their bytes moved
    simulated_time_s: float | None = None
    stall_s: float | None = None  # time compute waited for copies
    compute_s: float | None = None
    predictor: str | None = None

    @property
    def demand_misses(self) -> int:
        return self.misses

    def to_dict(self) -> dict:
        return {**asdict(self), "demand_misses": self.misses}


def parse_capacity(text: str, trace: RoutingTrace, per_layer: bool) -> int:
    """``"64"`` slots, or ``"25%"`` of all experts (of one layer's experts with ``per_layer``)."""
    total = trace.num_experts if per_layer else trace.num_experts * trace.num_layers
    return parse_slots(text, "capacity").count(total)


def next_use_positions(visits: list[tuple[int, list[int]]]) -> list[list[float]]:
    """For every layer visit ``(layer, experts)``, per listed expert, the position (visit index) of that
    (layer, expert)'s next access; ``inf`` for none."""
    out: list[list[float]] = [[] for _ in visits]
    upcoming: dict[tuple[int, int], float] = {}
    for i in range(len(visits) - 1, -1, -1):
        layer, experts = visits[i]
        out[i] = [upcoming.get((layer, e), np.inf) for e in experts]
        for e in experts:
            upcoming[(layer, e)] = float(i)
    return out


class _Link:
    """The copy engine on one host-to-device link, in simulated seconds.

    Prefetches queue by (due, arrival) and go out one chunk at a time; a demand load waits only for
    the chunk on the wire, then the queue resumes. ``clock``: when the link is next free.
    """

    def __init__(self, bytes_per_s: float, chunk_bytes: int) -> None:
        self.rate = bytes_per_s
        self.chunk = chunk_bytes
        self.clock = 0.0
        self.queue: dict[tuple[int, int], list] = {}  # key -> [due, arrival, bytes left]
        self.landed: dict[tuple[int, int], float] = {}
        self.arrivals = 0
        self.prefetch_bytes = 0
        self.demand_bytes = 0

    def run_until(self, now: float) -> None:
        while self.queue and self.clock < now:
            key = min(self.queue, key=lambda k: (self.queue[k][0], self.queue[k][1]))
            job = self.queue[key]
            n = min(self.chunk, job[2])
            self.clock += n / self.rate
            job[2] -= n
            self.prefetch_bytes += n
            if job[2] == 0:
                del self.queue[key]
                self.landed[key] = self.clock
        self.clock = max(self.clock, now)

    def prefetch(self, key: tuple[int, int], size: int, due: float) -> None:
        self.landed.pop(key, None)
        self.queue[key] = [due, self.arrivals, size]
        self.arrivals += 1

    def set_due(self, key: tuple[int, int], due: float) -> None:
        if key in self.queue:
            self.queue[key][0] = due

    def cancel(self, key: tuple[int, int]) -> bool:
        return self.queue.pop(key, None) is not None

    def demand(self, items: list[tuple[tuple[int, int], int]], now: float) -> None:
        """Loads ``(key, bytes)`` next; a queued prefetch of a key moves here with its bytes left."""
        self.run_until(now)
        for key, size in items:
            job = self.queue.pop(key, None)
            n = job[2] if job is not None else size
            self.clock += n / self.rate
            self.demand_bytes += n
            self.landed[key] = self.clock


def _forecasts(spec, trace: RoutingTrace, schedule: TraceSchedule) -> tuple[StepPredictor | None, GateSource | None]:
    if spec is None or not isinstance(spec, str):
        return spec, None
    kind, rate = parse_forecast(spec)
    if kind == "oracle" or kind == "noisy-oracle":
        return TraceOracle(schedule, rate), None
    if kind == "gate-oracle":
        return HistoryPredictor(trace.num_experts), GateOracle(schedule, rate)
    return HistoryPredictor(trace.num_experts), None


def replay(
    trace: RoutingTrace,
    capacity: int,
    policy: str,
    per_layer: bool = False,
    predictor: str | StepPredictor | None = None,
    gate: GateSource | None = None,
    bandwidth_gbps: float = 55.0,
    compute_ms_per_layer: float = 0.5,
    expert_bytes: int | None = None,
    chunk_bytes: int = 8 << 20,
    confidence: float = 0.5,
    prefetch_confidence: float = 0.9,
    schedule: TraceSchedule | None = None,
) -> ReplayResult:
    """Replays ``trace`` through a :class:`expertflow._C.SlotCache`; counts hits, misses, bytes and time.

    ``predictor`` (``expertflow``; ``gate-oracle:R`` also for ``gate_ahead``): ``history`` (default),
    ``oracle``, ``noisy-oracle:R``, ``gate-oracle:R``, or a step predictor object; ``gate`` a gate-ahead
    source (a recorded trace's). Forecasts made for this trace read the running step from
    ``schedule`` (one step per token; made here when not given). ``expert_bytes`` overrides the trace's
    expert sizes (bytes and time need sizes).
    """
    if policy not in REPLAY_POLICIES:
        raise ValueError(f"unknown replay policy '{policy}'; choose one of {', '.join(REPLAY_POLICIES)}")
    if trace.num_tokens == 0:
        raise ValueError("the trace holds no tokens; nothing to replay")
    need = trace.max_experts_per_layer
    if capacity < need:
        scope = "per layer" if per_layer else "in all"
        raise ValueError(
            f"capacity {capacity} {scope} is below the {need} experts one layer of one token needs; "
            f"use a capacity of at least {need}"
        )
    if not (bandwidth_gbps > 0 and compute_ms_per_layer >= 0 and (expert_bytes is None or expert_bytes > 0)):
        raise ValueError("bandwidth must be > 0 GB/s, expert bytes > 0 and compute per layer >= 0 ms")
    num_layers = trace.num_layers
    schedule = schedule or TraceSchedule(trace, num_layers, trace.num_tokens)
    step_predictor, gate_source = _forecasts(predictor, trace, schedule)
    gate_source = gate or gate_source
    planner_policy: Expertflow | GateAhead | None
    if policy == "expertflow":
        planner_policy = Expertflow(step_predictor, gate_source, confidence=confidence,
                                    prefetch_confidence=prefetch_confidence)
    elif policy == "gate_ahead":
        if gate_source is None:
            raise ValueError("gate_ahead replays need gate-ahead picks: --predictor gate-oracle:R, or a trace "
                             "recorded by `expertflow trace` (which holds them)")
        planner_policy = GateAhead(gate_source)
    else:
        if predictor is not None or gate is not None:
            raise ValueError(f"--predictor applies to the expertflow and gate_ahead policies, not {policy}")
        planner_policy = None
    sizes = {l: expert_bytes for l in range(num_layers)} if expert_bytes else dict(trace.expert_bytes or {})
    known_sizes = bool(sizes)
    num_slots = capacity * num_layers if per_layer else capacity
    cache = _C.SlotCache(num_slots, planner_policy.cache_policy if planner_policy else policy, num_layers)
    if per_layer:
        cache.set_layer_quotas([capacity] * num_layers)
    if planner_policy is not None:
        planner_policy.attach(EngineInfo(num_layers, trace.num_experts, num_slots, need))
    next_uses = next_use_positions(list(trace.layer_visits())) if policy == "belady" else None
    link = _Link(bandwidth_gbps * 1e9, chunk_bytes)
    compute_s = compute_ms_per_layer / 1e3
    counts = dict.fromkeys(("hits", "misses", "prefetches", "prefetch_hits", "wasted", "cancelled"), 0)
    state = {"now": 0.0, "stall": 0.0}

    def reconcile() -> int:
        """Copies of experts that left the cache stop (queued) or are forgotten (landed); returns how
        many stopped. Such an expert was prefetched and unused: the cache counted it wasted, the
        runtime counts it cancelled (its copy never finished), so the caller moves it over."""
        resident = set(cache.resident())
        stopped = [k for k in link.queue if k not in resident]
        for key in stopped:
            link.cancel(key)
        counts["cancelled"] += len(stopped)
        for key in [k for k in link.landed if k not in resident]:
            del link.landed[key]
        return len(stopped)

    def apply(plan: Plan | None) -> None:
        if plan is None:
            return
        link.run_until(state["now"])
        wanted = set(zip(plan.layers.tolist(), plan.experts.tolist()))
        for key in [k for k in link.queue if k not in wanted]:  # stale prefetches, as the runtime cancels them
            link.cancel(key)
            cache.clear(cache.find(*key))
            counts["cancelled"] += 1
        loads = cache.apply_plan(plan.layers, plan.experts, plan.due, plan.next_use, plan.following_use, plan.now,
                                 plan.sure, link_idle())
        for layer, expert, due in zip(plan.layers.tolist(), plan.experts.tolist(), plan.due.tolist()):
            link.set_due((layer, expert), due)
        queue(loads)

    def link_idle() -> bool:
        return not link.queue and link.clock <= state["now"]

    def queue(loads) -> None:
        """Loads the cache admitted go on the link; copies of experts it evicted stop."""
        counts["wasted"] += sum(int(load[4]) for load in loads) - reconcile()
        for layer, expert, due, _, _ in loads:
            counts["prefetches"] += 1
            link.prefetch((layer, expert), sizes.get(layer, 0), due)

    sequence_ids = trace.sequence_ids
    visit = 0
    for t, token in enumerate(trace.tokens):
        schedule.step = t
        if planner_policy is not None and planner_policy.wants_steps:
            new = t == 0 or (bool(sequence_ids) and sequence_ids[t] != sequence_ids[t - 1])
            apply(planner_policy.on_step(StepContext(step=t, new_sequences=new)))
        for layer, experts in token:
            now = state["now"]
            link.run_until(now)
            missed = [e for e in experts if cache.find(layer, e) < 0]
            h, ph, _, w = cache.access(layer, experts, next_uses[visit] if next_uses else None)
            visit += 1
            counts["hits"] += h
            counts["prefetch_hits"] += ph
            counts["misses"] += len(experts) - h
            items = [((layer, e), sizes.get(layer, 0)) for e in missed]
            items += [((layer, e), 0) for e in experts if e not in missed and (layer, e) in link.queue]
            if items:
                link.demand(items, now)
            counts["wasted"] += w - reconcile()
            ready = max([now] + [link.landed.get((layer, e), now) for e in experts])
            state["stall"] += ready - now
            # As in the engine: once the layer's misses are on their way the runtime admits what the
            # plan still holds and the policy re-plans, then the layer computes while those copies run.
            state["now"] = ready
            queue(cache.readmit(link_idle()))
            if planner_policy is not None:
                apply(planner_policy.on_layer(layer, np.asarray([experts], dtype=np.int64), None))
            state["now"] = ready + compute_s
    accesses = counts["hits"] + counts["misses"]
    total_bytes = link.prefetch_bytes + link.demand_bytes
    return ReplayResult(
        policy=policy,
        capacity=capacity,
        per_layer=per_layer,
        num_slots=num_slots,
        accesses=accesses,
        hits=counts["hits"],
        misses=counts["misses"],
        hit_ratio=counts["hits"] / accesses if accesses else 0.0,
        bytes=total_bytes if known_sizes else None,
        demand_bytes=link.demand_bytes if known_sizes else None,
        prefetch_bytes=link.prefetch_bytes if known_sizes else None,
        prefetches=counts["prefetches"],
        prefetch_hits=counts["prefetch_hits"],
        wasted_prefetches=counts["wasted"],
        cancelled_prefetches=counts["cancelled"],
        simulated_time_s=state["now"] if known_sizes else None,
        stall_s=state["stall"] if known_sizes else None,
        compute_s=visit * compute_s,
        predictor=planner_policy.label if isinstance(planner_policy, Expertflow) else (
            getattr(planner_policy.gate, "name", None) if planner_policy is not None else None),
    )


def bound(trace: RoutingTrace, capacity: int, per_layer: bool = False, bandwidth_gbps: float = 55.0,
          compute_ms_per_layer: float = 0.5, expert_bytes: int | None = None) -> float | None:
    """max(Belady's bytes / bandwidth, total compute) in seconds, or None without expert sizes."""
    r = replay(trace, capacity, "belady", per_layer=per_layer, bandwidth_gbps=bandwidth_gbps,
               compute_ms_per_layer=compute_ms_per_layer, expert_bytes=expert_bytes)
    if r.bytes is None or r.compute_s is None:  # no expert sizes (replay always sets compute_s)
        return None
    return max(r.bytes / (bandwidth_gbps * 1e9), r.compute_s)
