"""A plain-Python reference of the runtime's cache decisions (slot choice, pins, plans, counters).

It is written from the documented semantics (include/expertflow/cache.h, policy.h, runtime.h), not
from the C++, for a copy engine that is paused: a prefetch stays queued, hence unfinished and
cancellable, until :meth:`ReferenceCache.land_all`. That makes every decision deterministic, so a
test can compare the runtime with it slot by slot and counter by counter.

Link idleness: the engine calls the link idle when no prefetch is queued or being submitted and no
copy (demand loads included) is in flight. Here it is idle when no prefetch is queued. The two agree
only once the demand copies have landed; acquire() does not guarantee that on the GPU (the compute
stream waits, the host does not), so a caller comparing plans with guesses (``sure=False``) must
first synchronise the runtime, which while paused lands the copies in flight and nothing queued.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

NEVER = math.inf

STAT_KEYS = (
    "accesses", "hits", "misses", "prefetch_hits", "prefetches", "wasted_prefetches", "cancelled_prefetches", "evictions",
)


class ReferenceError_(Exception):
    pass


@dataclass
class Slot:
    layer: int = -1
    expert: int = -1
    pin_count: int = 0
    planned: bool = False           # named by the latest plan's prefetch list
    next_use: float = NEVER
    following_use: float = NEVER
    last_use: int = 0
    use_count: int = 0
    prefetched_unused: bool = False
    queued: bool = False            # a prefetch copy not yet landed: cancelled, not evicted, when dropped

    @property
    def empty(self) -> bool:
        return self.layer < 0

    def next_use_after(self, due: float) -> float:
        """The next use as seen from a load due at ``due``: a use before it no longer counts."""
        return self.next_use if self.next_use > due else self.following_use


class ReferenceCache:
    def __init__(self, num_slots: int, policy: str) -> None:
        self.slots = [Slot() for _ in range(num_slots)]
        self.policy = policy
        self.clock = 0
        self.quotas: list[int] = []
        self.next_use: np.ndarray | None = None  # [L, E] tables of the latest plan that had them
        self.following_use: np.ndarray | None = None
        self.now = -math.inf                     # `now` of that plan: the due of demand loads
        self.stats = dict.fromkeys(STAT_KEYS, 0)

    @property
    def by_next_use(self) -> bool:
        return self.policy == "expertflow"

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

    def link_idle(self) -> bool:
        return not any(s.queued for s in self.slots)

    def predict(self, s: Slot) -> None:
        """Next uses of the slot's expert from the stored tables (none stored: left as they are)."""
        if self.next_use is None:
            return
        rows, cols = self.next_use.shape
        known = s.layer < rows and s.expert < cols
        s.next_use = float(self.next_use[s.layer, s.expert]) if known else NEVER
        s.following_use = float(self.following_use[s.layer, s.expert]) if known else NEVER

    def order_key(self, i: int, due: float):
        """Victims sort first; the slot index breaks every tie."""
        s = self.slots[i]
        if self.policy == "lru":
            return (s.last_use, i)
        if self.policy == "lfu":
            return (s.use_count, s.last_use, i)
        return (-s.next_use_after(due), s.last_use, i)  # expertflow: farthest next use first

    def victim(self, candidates: list[int], due: float) -> int:
        return min(candidates, key=lambda i: self.order_key(i, due))

    def pick(self, layer: int, due: float, prefetch: bool) -> int:
        """The slot a load of ``layer`` due at ``due`` takes, or -1 (quota rules of cache.h)."""
        spare_planned = prefetch and not self.by_next_use
        cand = [
            i for i, s in enumerate(self.slots) if not s.empty and s.pin_count == 0 and not (spare_planned and s.planned)
        ]
        own = [i for i in cand if self.slots[i].layer == layer]
        others = [i for i in cand if self.slots[i].layer != layer]
        over = [i for i in cand if 0 <= self.quota(self.slots[i].layer) < self.count(self.slots[i].layer)]
        q = self.quota(layer)
        if q >= 0 and self.count(layer) >= q and own:
            return self.victim(own, due)
        for i, s in enumerate(self.slots):
            if s.empty:
                return i
        if over:
            return self.victim(over, due)
        if q >= 0 and others:
            return self.victim(others, due)
        return self.victim(cand, due) if cand else -1

    def assign(self, i: int, layer: int, expert: int) -> None:
        self.clock += 1
        self.slots[i] = Slot(layer=layer, expert=expert, last_use=self.clock)
        self.predict(self.slots[i])

    def touch(self, i: int) -> None:
        self.clock += 1
        self.slots[i].last_use = self.clock
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
    def prefetch(self, entries: Sequence[tuple[int, int, float]]) -> None:
        """``ExpertCache.prefetch``: sure entries, no next-use tables."""
        self.apply([(layer, expert, due, True) for layer, expert, due in entries])

    def apply(
        self,
        entries: Sequence[tuple[int, int, float, bool]],
        next_use: np.ndarray | None = None,
        following_use: np.ndarray | None = None,
        now: float = -math.inf,
    ) -> None:
        """``ExpertCache.apply``: entries ``(layer, expert, due, sure)`` in plan order."""
        # A queued prefetch the new plan does not name is not worth its bytes.
        wanted = {(layer, expert) for layer, expert, _, _ in entries}
        for i, s in enumerate(self.slots):
            if not s.empty and s.pin_count == 0 and s.queued and (s.layer, s.expert) not in wanted:
                self.stats["cancelled_prefetches"] += 1
                self.slots[i] = Slot()
        has_tables = next_use is not None
        if has_tables:
            self.next_use, self.following_use, self.now = np.asarray(next_use), np.asarray(following_use), now
        for s in self.slots:
            s.planned = False
            if has_tables and not s.empty:
                self.predict(s)
        idle = self.link_idle()
        for layer, expert, due, sure in entries:
            i = self.find(layer, expert)
            if i >= 0:
                self.slots[i].planned = True
                if not has_tables:
                    self.slots[i].next_use = due
                continue
            if not sure and not idle:
                continue
            i = self.pick(layer, due, prefetch=True)
            if i < 0:
                if self.by_next_use:
                    break  # later entries are due later still: nothing frees up for them
                continue
            v = self.slots[i]
            # Conservative admission: never evict an expert needed before the one replacing it.
            if self.by_next_use and not v.empty and not v.next_use > due:
                break
            # A guess takes only a free slot or an expert no forecast expects again.
            if not sure and not v.empty and v.next_use_after(due) != NEVER:
                continue
            self.evict(i)
            self.assign(i, layer, expert)
            s = self.slots[i]
            s.planned = s.prefetched_unused = s.queued = True
            if not has_tables:
                s.next_use = due
            self.stats["prefetches"] += 1
            idle = False

    def acquire(self, layer: int, experts: list[int]) -> list[int]:
        if len(experts) > len(self.slots):
            raise ReferenceError_("capacity")
        slots = [self.find(layer, e) for e in experts]
        for i in slots:
            if i >= 0:
                self.slots[i].pin_count += 1
        missed = []
        for k, e in enumerate(experts):
            if slots[k] >= 0:
                continue
            i = self.pick(layer, self.now, prefetch=False)
            if i < 0:
                # Undo the pins and the loads; the evictions already made stay made.
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
            s.queued = False  # demand-loaded, or a queued prefetch promoted to a demand load
            s.prefetched_unused = False
            self.touch(i)
        self.stats["accesses"] += len(experts)
        return slots

    def release(self, layer: int, experts: list[int]) -> None:
        for e in experts:
            self.slots[self.find(layer, e)].pin_count -= 1

    def land_all(self) -> None:
        for s in self.slots:
            s.queued = False
