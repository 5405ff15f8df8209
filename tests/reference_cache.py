"""A plain-Python reference of the runtime's cache decisions (slot choice, pins, plans, counters).

It mirrors include/expertflow/cache.h and runtime.h for a copy engine whose prefetches stay queued
until synchronised (paused), which makes every decision deterministic and comparable slot by slot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


class ReferenceError_(Exception):
    pass


@dataclass
class Slot:
    layer: int = -1
    expert: int = -1
    pin_count: int = 0
    plan_priority: float = 0.0
    last_use: int = 0
    use_count: int = 0
    prefetched_unused: bool = False
    queued: bool = False  # a prefetch not yet started: cancellable
    last_position: int = 0

    @property
    def empty(self) -> bool:
        return self.layer < 0


class ReferenceCache:
    def __init__(self, num_slots: int, policy: str, num_layers: int) -> None:
        self.slots = [Slot() for _ in range(num_slots)]
        self.policy = policy
        self.num_layers = num_layers
        self.position = 0
        self.current_layer = 0
        self.clock = 0
        self.quotas: list[int] = []
        self.stats = dict.fromkeys(
            ["accesses", "hits", "misses", "prefetch_hits", "prefetches", "wasted_prefetches", "cancelled_prefetches", "evictions"], 0
        )

    # -- bookkeeping ---------------------------------------------------------------------------
    def find(self, layer: int, expert: int) -> int:
        for i, s in enumerate(self.slots):
            if s.layer == layer and s.expert == expert:
                return i
        return -1

    def count(self, layer: int) -> int:
        return sum(1 for s in self.slots if s.layer == layer)

    def quota(self, layer: int) -> int:
        return self.quotas[layer] if 0 <= layer < len(self.quotas) else -1

    def advance(self, layer: int) -> None:
        if layer < self.current_layer:
            self.position += self.num_layers - self.current_layer + layer
        else:
            self.position += layer - self.current_layer
        self.current_layer = layer

    def next_turn(self, layer: int) -> int:
        return self.position + (layer - self.current_layer - 1) % self.num_layers + 1

    def order_key(self, i: int):
        s = self.slots[i]
        if self.policy == "expertflow":
            turn = self.next_turn(s.layer)
            return (s.plan_priority, -(turn - min(s.last_position, turn)), -turn, s.last_use, i)
        if self.policy == "lru":
            return (s.last_use, i)
        if self.policy == "lfu":
            return (s.use_count, s.last_use, i)
        return (s.plan_priority, s.last_use, i)  # lru_with_correction

    def victim(self, candidates: list[int]) -> int:
        return min(candidates, key=self.order_key)

    def pick(self, layer: int, below: float) -> int:
        cand = [i for i, s in enumerate(self.slots) if not s.empty and s.pin_count == 0 and s.plan_priority < below]
        own = [i for i in cand if self.slots[i].layer == layer]
        others = [i for i in cand if self.slots[i].layer != layer]
        over = [i for i in cand if self.quota(self.slots[i].layer) >= 0 and self.count(self.slots[i].layer) > self.quota(self.slots[i].layer)]
        q = self.quota(layer)
        if q >= 0 and self.count(layer) >= q and own:
            return self.victim(own)
        for i, s in enumerate(self.slots):
            if s.empty:
                return i
        if over:
            return self.victim(over)
        if q >= 0 and others:
            return self.victim(others)
        return self.victim(cand) if cand else -1

    def assign(self, i: int, layer: int, expert: int) -> None:
        self.clock += 1
        self.slots[i] = Slot(layer=layer, expert=expert, last_use=self.clock, last_position=self.position)

    def touch(self, i: int) -> None:
        self.clock += 1
        self.slots[i].last_use = self.clock
        self.slots[i].last_position = self.position
        self.slots[i].use_count += 1

    def evict(self, i: int) -> None:
        s = self.slots[i]
        if s.empty:
            return
        if s.queued:
            self.stats["cancelled_prefetches"] += 1
        else:
            self.stats["evictions"] += 1
            if s.prefetched_unused:
                self.stats["wasted_prefetches"] += 1
        self.slots[i] = Slot()

    # -- the runtime's operations ----------------------------------------------------------------
    def prefetch(self, plan: list[tuple[int, int, float]]) -> None:
        wanted = {(l, e) for l, e, _ in plan}
        for s in self.slots:
            s.plan_priority = 0.0
        for i, s in enumerate(self.slots):
            if not s.empty and (s.layer, s.expert) not in wanted and s.queued:
                self.stats["cancelled_prefetches"] += 1
                self.slots[i] = Slot()
        for layer, expert, p in sorted(plan, key=lambda item: -item[2]):
            i = self.find(layer, expert)
            if i >= 0:
                self.slots[i].plan_priority = max(self.slots[i].plan_priority, p)
                continue
            i = self.pick(layer, p)
            if i < 0:
                continue
            self.evict(i)
            self.assign(i, layer, expert)
            self.slots[i].plan_priority = p
            self.slots[i].prefetched_unused = True
            self.slots[i].queued = True
            self.stats["prefetches"] += 1

    def acquire(self, layer: int, experts: list[int]) -> list[int]:
        if len(experts) > len(self.slots):
            raise ReferenceError_("capacity")
        self.advance(layer)
        slots = [self.find(layer, e) for e in experts]
        for i in slots:
            if i >= 0:
                self.slots[i].pin_count += 1
        missed = []
        for k, e in enumerate(experts):
            if slots[k] >= 0:
                continue
            i = self.pick(layer, math.inf)
            if i < 0:
                for j in slots:
                    if j >= 0:
                        self.slots[j].pin_count -= 1
                for k2 in missed:
                    self.slots[slots[k2]] = Slot()
                raise ReferenceError_("no slot")
            self.evict(i)
            self.assign(i, layer, e)
            self.slots[i].pin_count += 1
            slots[k] = i
            missed.append(k)
        for k, i in enumerate(slots):
            s = self.slots[i]
            if k in missed:
                self.stats["misses"] += 1
            else:
                self.stats["hits"] += 1
                if s.prefetched_unused:
                    self.stats["prefetch_hits"] += 1
            s.queued = False  # demand-loaded or promoted
            s.prefetched_unused = False
            self.touch(i)
        self.stats["accesses"] += len(experts)
        if self.policy in ("lru_with_correction", "expertflow"):
            for i, s in enumerate(self.slots):
                if s.layer == layer and s.plan_priority > 0 and i not in slots:
                    s.plan_priority = 0.0
        return slots

    def release(self, layer: int, experts: list[int]) -> None:
        for e in experts:
            self.slots[self.find(layer, e)].pin_count -= 1

    def land_all(self) -> None:
        for s in self.slots:
            s.queued = False
