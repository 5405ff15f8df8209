"""Trace replay: drive the runtime's slot cache through a routing trace, without a model.

Semantics: tokens in trace order; each visits its layers in ascending order; at a layer it accesses
its experts in router-rank order. A resident (layer, expert) is a hit; otherwise a demand miss that
loads it, evicting (when full) a resident expert not needed by the current layer, chosen by the
policy. One pool of ``capacity`` slots serves all layers, or with ``per_layer`` each layer has
``capacity`` slots of its own (the cache's per-layer quotas). ``belady`` evicts the expert whose next
access lies farthest ahead: the optimal bound for demand paging.

``expertflow`` adds prediction: after each layer's router has spoken (its experts accessed, its wrong
prefetches demoted), a plan covers the layers that run next — the rest of this token, then the next
token's — with the experts a predictor expects, at priorities that fall with distance, so the slots
go to the upcoming layers in proportion to their predicted demand and slots of finished layers are
reused for later ones. Predictors: ``history`` (the previous token's path), ``oracle`` (the true
path: an upper bound for any predictor) or a trained :class:`~expertflow.predictor.RoutingPathPredictor`.

Simulated time: copies share one link of ``bandwidth_gbps``; prefetches go out in plan order behind
whatever is on the wire, demand loads (and prefetches still queued when needed) go next; a layer
computes for ``compute_ms_per_layer`` once its experts have landed, so demand misses stall it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass

from . import _C
from .traces import RoutingTrace

__all__ = ["REPLAY_POLICIES", "ReplayResult", "replay", "parse_capacity", "next_use_positions", "PREDICTORS"]

REPLAY_POLICIES = ("lru", "lfu", "lru_with_correction", "expertflow", "belady")
PREDICTORS = ("history", "oracle")
NEVER = 2**64 - 1


@dataclass
class ReplayResult:
    policy: str
    capacity: int
    per_layer: bool
    num_slots: int
    accesses: int
    hits: int
    misses: int
    hit_ratio: float
    bytes: int | None  # every byte copied (demand and prefetch), when expert sizes are known
    demand_misses: int = 0
    prefetches: int = 0
    prefetch_hits: int = 0
    wasted_prefetches: int = 0
    wasted_prefetch_bytes: int | None = None
    simulated_time_s: float | None = None
    predictor: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def parse_capacity(text: str, trace: RoutingTrace, per_layer: bool) -> int:
    """``"64"`` slots, or ``"25%"`` of all experts (of one layer's experts with ``per_layer``)."""
    text = text.strip()
    if text.endswith("%"):
        total = trace.num_experts if per_layer else trace.num_experts * trace.num_layers
        return max(1, round(float(text[:-1]) / 100 * total))
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"capacity '{text}' is neither a slot count nor a percentage like 25%") from None


def next_use_positions(trace: RoutingTrace) -> list[list[int]]:
    """For every layer visit, per listed expert, the global position of that (layer, expert)'s next access."""
    visits = list(trace.layer_visits())
    out: list[list[int]] = [[] for _ in visits]
    upcoming: dict[tuple[int, int], int] = {}
    position = trace.num_accesses
    for i in range(len(visits) - 1, -1, -1):
        layer, experts = visits[i]
        row = [0] * len(experts)
        for j in range(len(experts) - 1, -1, -1):
            position -= 1
            row[j] = upcoming.get((layer, experts[j]), NEVER)
            upcoming[(layer, experts[j])] = position
        out[i] = row
    return out


class _Link:
    """One host-to-device link: copies in order at ``bytes_per_s``.

    Prefetches queue behind the copy on the wire; a demand load waits only for the chunk in flight
    (the copy engine splits prefetches into chunks), then the interrupted prefetch resumes.
    """

    def __init__(self, bytes_per_s: float, chunk_bytes: int) -> None:
        self.rate = bytes_per_s
        self.chunk_s = chunk_bytes / bytes_per_s
        self.free_at = 0.0  # when the copy on the wire ends
        self.on_wire: tuple[int, int] | None = None
        self.queue: deque[tuple[tuple[int, int], int]] = deque()
        self.landed: dict[tuple[int, int], float] = {}

    def run_until(self, now: float) -> None:
        """Starts queued copies whose turn comes before ``now``."""
        while self.queue and self.free_at < now:
            key, size = self.queue.popleft()
            self.free_at += size / self.rate
            self.landed[key] = self.free_at
            self.on_wire = key

    def enqueue(self, key: tuple[int, int], size: int, now: float) -> None:
        if not self.queue and self.free_at < now:
            self.free_at = now
        self.queue.append((key, size))

    def demand(self, keys: list[tuple[int, int]], sizes: list[int], now: float) -> float:
        """Loads ``keys`` next, ahead of queued prefetches; returns when the last has landed."""
        wanted = set(keys)
        self.queue = deque((k, s) for k, s in self.queue if k not in wanted)
        duration = sum(sizes) / self.rate
        start = now
        if self.free_at > now:  # a prefetch is on the wire: it pauses after its current chunk
            start = min(self.free_at, now + self.chunk_s)
            if self.on_wire is not None and self.on_wire not in wanted:
                self.landed[self.on_wire] = self.free_at + duration
            self.free_at += duration
        else:
            self.free_at = now + duration
        end = start
        for k, size in zip(keys, sizes):
            end += size / self.rate
            self.landed[k] = end
        return end


def _paths(trace: RoutingTrace) -> list[dict[int, list[int]]]:
    return [dict(token) for token in trace.tokens]


class _Planner:
    """Which experts each upcoming layer is expected to need, as seen after layer ``layer`` of ``t``."""

    def __init__(self, trace: RoutingTrace, predictor, num_slots: int) -> None:
        self.trace = trace
        self.paths = _paths(trace)
        self.predictor = predictor
        self.num_slots = num_slots
        self.predicted: dict[int, dict[int, list[tuple[int, float]]]] = {}

    def _same_sequence(self, a: int, b: int) -> bool:
        ids = self.trace.sequence_ids
        return 0 <= a < len(self.paths) and 0 <= b < len(self.paths) and (not ids or ids[a] == ids[b])

    def prediction(self, t: int, layer: int, known_until: tuple[int, int]) -> list[tuple[int, float]]:
        """Predicted (expert, score) for token ``t`` at ``layer``; ``known_until`` = (token, layer) computed."""
        if self.predictor == "oracle":
            return [(e, 1.0) for e in self.paths[t].get(layer, [])] if t < len(self.paths) else []
        # A trained predictor sees token t once its step begins; for the next token, history.
        if self.predictor == "history" or t > known_until[0]:
            prev = t - 1
            return [(e, 1.0) for e in self.paths[prev].get(layer, [])] if self._same_sequence(prev, t) else []
        if t not in self.predicted:
            self.predicted[t] = self.predictor.predict_token(self.trace, t)
        return self.predicted[t].get(layer, [])

    def plan(self, t: int, layer: int) -> list[tuple[int, int, float]]:
        L = self.trace.num_layers
        plan: list[tuple[int, int, float]] = []
        for d in range(1, L + 1):
            target = layer + d
            token, target_layer = (t, target) if target < L else (t + 1, target - L)
            for e, score in self.prediction(token, target_layer, (t, layer)):
                plan.append((target_layer, e, score * (L + 1 - d) / (L + 1)))
            if len(plan) >= self.num_slots:
                break
        return plan[: self.num_slots]


def replay(
    trace: RoutingTrace,
    capacity: int,
    policy: str,
    per_layer: bool = False,
    predictor=None,
    bandwidth_gbps: float = 55.0,
    compute_ms_per_layer: float = 0.5,
    expert_bytes: int | None = None,
    chunk_bytes: int = 8 << 20,
) -> ReplayResult:
    """Replays ``trace`` through a :class:`expertflow._C.SlotCache` and counts hits, misses and copies.

    ``predictor`` (``expertflow`` only): ``"history"`` (default), ``"oracle"`` or a trained predictor.
    ``expert_bytes`` overrides the trace's expert sizes (needed for bytes and time on traces without).
    """
    if policy not in REPLAY_POLICIES:
        raise ValueError(f"unknown replay policy '{policy}'; choose one of {', '.join(REPLAY_POLICIES)}")
    need = trace.max_experts_per_layer
    if capacity < need:
        scope = "per layer" if per_layer else "in all"
        raise ValueError(
            f"capacity {capacity} {scope} is below the {need} experts one layer of one token needs; "
            f"use a capacity of at least {need}"
        )
    if policy == "expertflow":
        predictor = predictor or "history"
        if isinstance(predictor, str) and predictor not in PREDICTORS:
            raise ValueError(f"unknown predictor '{predictor}'; use history, oracle or a predictor file")
    elif predictor is not None:
        raise ValueError(f"--predictor applies to the expertflow policy only, not {policy}")
    sizes = (
        {l: expert_bytes for l in range(trace.num_layers)} if expert_bytes else dict(trace.expert_bytes or {})
    )
    known_sizes = bool(sizes)
    size = lambda layer: sizes.get(layer, 0)  # noqa: E731
    num_slots = capacity * trace.num_layers if per_layer else capacity
    cache = _C.SlotCache(num_slots, policy, trace.num_layers)
    if per_layer:
        cache.set_layer_quotas([capacity] * trace.num_layers)
    next_uses = next_use_positions(trace) if policy == "belady" else None
    planner = _Planner(trace, predictor, num_slots) if policy == "expertflow" else None
    link = _Link(bandwidth_gbps * 1e9, chunk_bytes)
    compute_s = compute_ms_per_layer / 1e3
    now = 0.0
    hits = misses = prefetches = prefetch_hits = wasted = 0
    copied = wasted_bytes = 0
    prefetched_size: dict[tuple[int, int], int] = {}
    i = 0
    for t, token in enumerate(trace.tokens):
        for layer, experts in token:
            h, ph, _, w = cache.access(layer, experts, next_uses[i] if next_uses else None)
            i += 1
            hits += h
            prefetch_hits += ph
            wasted += w
            missed = [(layer, e) for e in experts if (layer, e) not in link.landed and (layer, e) not in prefetched_size]
            # Time: misses (and prefetches still queued) load now; landed or in-flight ones may still stall.
            link.run_until(now)
            queued = {k for k, _ in link.queue}
            demand = [(layer, e) for e in experts if (layer, e) in queued] + missed
            ready = link.demand(demand, [size(k[0]) for k in demand], now) if demand else now
            ready = max([ready] + [link.landed.get((layer, e), now) for e in experts])
            now = max(now, ready) + compute_s
            demand_count = len(experts) - h
            misses += demand_count
            copied += demand_count * size(layer)
            for e in experts:
                prefetched_size.pop((layer, e), None)
            if planner is not None:
                for l2, e2, _, was_wasted in cache.apply_plan(planner.plan(t, layer)):
                    prefetches += 1
                    copied += size(l2)
                    prefetched_size[(l2, e2)] = size(l2)
                    link.landed.pop((l2, e2), None)
                    link.enqueue((l2, e2), size(l2), now)
                    if was_wasted:
                        wasted += 1
            # Every expert not resident any more has left the device.
            resident = set(cache.resident())
            for key in [k for k in prefetched_size if k not in resident]:
                wasted_bytes += prefetched_size.pop(key)
            for key in [k for k in link.landed if k not in resident]:
                del link.landed[key]
    accesses = hits + misses
    return ReplayResult(
        policy=policy,
        capacity=capacity,
        per_layer=per_layer,
        num_slots=num_slots,
        accesses=accesses,
        hits=hits,
        misses=misses,
        hit_ratio=hits / accesses if accesses else 0.0,
        bytes=copied if known_sizes else None,
        demand_misses=misses,
        prefetches=prefetches,
        prefetch_hits=prefetch_hits,
        wasted_prefetches=wasted,
        wasted_prefetch_bytes=wasted_bytes if known_sizes else None,
        simulated_time_s=now if known_sizes else None,
        predictor=(predictor if isinstance(predictor, str) else getattr(predictor, "name", "file")) if planner else None,
    )
