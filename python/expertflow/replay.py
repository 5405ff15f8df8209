"""Trace replay: drive the runtime's slot cache through a routing trace, without a model.

Semantics: tokens in trace order; each visits its layers in ascending order; at a layer it accesses
its experts in router-rank order. A resident (layer, expert) is a hit; otherwise a miss that loads it,
evicting (when full) a resident expert not needed by the current layer, chosen by the policy. One pool
of ``capacity`` slots serves all layers, or with ``per_layer`` each layer has ``capacity`` slots of its
own (the cache's per-layer quotas). ``belady`` evicts the expert whose next access lies farthest
ahead: the optimal demand-paging bound.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from . import _C
from .traces import RoutingTrace

__all__ = ["REPLAY_POLICIES", "ReplayResult", "replay", "parse_capacity", "next_use_positions"]

REPLAY_POLICIES = ("lru", "lfu", "lru_with_correction", "belady")
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
    bytes: int | None  # bytes loaded by misses, when the trace gives expert sizes

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


def replay(trace: RoutingTrace, capacity: int, policy: str, per_layer: bool = False) -> ReplayResult:
    """Replays ``trace`` through a :class:`expertflow._C.SlotCache` and counts hits and misses."""
    if policy not in REPLAY_POLICIES:
        raise ValueError(f"unknown replay policy '{policy}'; choose one of {', '.join(REPLAY_POLICIES)}")
    need = trace.max_experts_per_layer
    if capacity < need:
        scope = "per layer" if per_layer else "in all"
        raise ValueError(
            f"capacity {capacity} {scope} is below the {need} experts one layer of one token needs; "
            f"use a capacity of at least {need}"
        )
    num_slots = capacity * trace.num_layers if per_layer else capacity
    cache = _C.SlotCache(num_slots, policy)
    if per_layer:
        cache.set_layer_quotas([capacity] * trace.num_layers)
    next_uses = next_use_positions(trace) if policy == "belady" else None
    hits = misses = 0
    loaded = 0
    for i, (layer, experts) in enumerate(trace.layer_visits()):
        h = cache.access(layer, experts, next_uses[i] if next_uses else None)
        hits += h
        misses += len(experts) - h
        if trace.expert_bytes:
            loaded += (len(experts) - h) * trace.expert_bytes.get(layer, 0)
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
        bytes=loaded if trace.expert_bytes else None,
    )
