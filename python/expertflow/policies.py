"""Offload policies: which prefetch plan each step gets, and which cache policy evicts.

All run on the same engine and cache, so comparisons between them are fair.

| name | eviction | prefetch |
|---|---|---|
| ``all_gpu`` | none: every expert resident (the reference) | all experts, once, at load |
| ``lru`` | per-layer LRU (slots split evenly over layers) | none: demand loads only (mixtral-offloading, Cache-MoE style) |
| ``next_layers`` | LRU | every expert of the next two layers (SE-MoE style) |
| ``gate_ahead`` | LRU | the next layer's router applied to this layer's hidden state: its top-k |
| ``lru_with_correction`` | lowest plan priority, then LRU; wrong prefetches demoted | gate-ahead plans (the routing-path predictor will replace them) |
"""

from __future__ import annotations

from collections import Counter

import torch

__all__ = ["POLICY_NAMES", "make_policy", "Policy"]


class Policy:
    name = "base"
    cache_policy = "lru"

    def attach(self, engine) -> None:
        """Called once the engine exists."""

    def after_acquire(self, engine, layer, hidden_states: torch.Tensor) -> None:
        """Called when ``layer``'s experts are acquired, before they compute: plan what comes next."""


class AllGpu(Policy):
    name = "all_gpu"

    def attach(self, engine) -> None:
        pool = engine.pool
        engine.cache.prefetch([(l, e, 1.0) for l in range(pool.num_layers) for e in range(pool.num_experts(l))])
        engine.cache.synchronize()
        engine.cache.reset_stats()


class DemandLru(Policy):
    name = "lru"

    def attach(self, engine) -> None:
        slots, layers = engine.cache.num_slots, engine.num_layers
        engine.cache.set_layer_quotas([slots // layers + (1 if l < slots % layers else 0) for l in range(layers)])


class NextLayers(Policy):
    name = "next_layers"

    def after_acquire(self, engine, layer, hidden_states) -> None:
        plan, priority, nxt = [], 2.0, layer.next
        while nxt is not None and priority > 0:
            plan += [(nxt.index, e, priority) for e in range(engine.pool.num_experts(nxt.index))]
            nxt, priority = nxt.next, priority - 1.0
        engine.cache.prefetch(plan)


class GateAhead(Policy):
    name = "gate_ahead"

    def after_acquire(self, engine, layer, hidden_states) -> None:
        nxt = layer.next
        if nxt is None:
            engine.cache.prefetch([])
            return
        with torch.no_grad():
            chosen = engine.architecture.router_top_k(nxt.router, hidden_states).flatten().tolist()
        counts = Counter(chosen)
        total = len(chosen)
        engine.cache.prefetch([(nxt.index, e, c / total) for e, c in counts.items()])


class LruWithCorrection(GateAhead):
    name = "lru_with_correction"
    cache_policy = "lru_with_correction"


_POLICIES = {p.name: p for p in (AllGpu, DemandLru, NextLayers, GateAhead, LruWithCorrection)}
POLICY_NAMES = tuple(_POLICIES)


def make_policy(name: str) -> Policy:
    try:
        return _POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown offload policy '{name}'; choose one of {', '.join(POLICY_NAMES)}") from None
