"""A plain-Python reference of the runtime's cache decisions (clock, slot choice, pins, plans, counters).

It is written from the definitions in include/expertflow/cache.h (invariants), csrc/cache.cpp and
csrc/runtime.cpp (``acquire``, ``apply_plan``), for a copy engine that is paused: a prefetch stays
queued, hence unfinished and cancellable, until :meth:`ReferenceCache.land_all`. That makes every
decision deterministic but one (below), so a test can compare the runtime with it slot by slot and
counter by counter.

The clock: layer ``l`` of step ``s`` sits at position ``s * num_layers + l``. :meth:`advance` (the
start of every acquire) moves it to the layer's visit; a timed plan (``now`` != -inf) says where the
next visit lands. Under expertflow every resident slot's next uses are re-predicted whenever the clock
moves or a plan arrives, and a slot's own at load and at access.

Link idleness: the engine calls the link idle when no prefetch is queued or being submitted and no
copy (demand loads included) is in flight. Here it is idle when no prefetch is queued and, inside
:meth:`acquire`, when that acquire's own demand copies (misses, and queued prefetches it promoted) have
landed. The caller says which with ``demand_landed``: the runtime asks the engine right after
submitting them, and whether a copy of a few KiB has finished by then is a race that only the caller
can resolve (see tests/test_cache_state_machine.py). Copies of earlier calls are out of the picture
when the caller synchronises the runtime first, which while paused lands the copies in flight and
nothing queued.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

NEVER = math.inf
DUE_NOW = -math.inf
NEVER_USED_POSITION = -1e12  # last position of an expert not accessed since it was loaded

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
    last_position: float = DUE_NOW  # position of the last access since loaded (-inf: none)
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
    def __init__(self, num_slots: int, policy: str, num_layers: int = 0) -> None:
        self.slots = [Slot() for _ in range(num_slots)]
        self.policy = policy
        self.num_layers = num_layers
        self.clock = 0                           # recency clock (last_use)
        self.quotas: list[int] = []
        # The layer-visit clock.
        self.position = -1.0
        self.current_layer = -1
        self.next_visit = DUE_NOW                # a timed plan's `now`, until the clock reaches it
        self.farthest = self.position            # the highest position the clock has held
        # The current plan.
        self.timed = False
        self.plan: list[tuple[int, int, float, bool]] = []
        self.next_use: np.ndarray | None = None  # [L, E] tables, or None: named_due instead
        self.following_use: np.ndarray | None = None
        self.named_due: dict[tuple[int, int], float] = {}
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

    def queued_any(self) -> bool:
        return any(s.queued for s in self.slots)

    def advance(self, layer: int) -> None:
        """Moves the clock to ``layer``'s visit: the plan's `now` when it names this layer, else the
        next visit of the layer (the same layer again is the same visit)."""
        L = self.num_layers
        if L > 0:
            if self.next_visit != DUE_NOW and math.fmod(self.next_visit, L) == layer:
                self.position = self.next_visit
            elif layer != self.current_layer:
                self.position += float((layer - self.current_layer) % L)
            if self.position >= self.next_visit:
                self.next_visit = DUE_NOW
        self.current_layer = layer
        self.farthest = max(self.farthest, self.position)
        self.refresh()

    def estimate(self, s: Slot) -> float:
        """Next use from the slot's own history: its layer's next visit, pushed back by the time the
        expert sat unused."""
        L = self.num_layers
        if L <= 0:
            return 1e15 + float(self.clock - s.last_use)
        turn = self.position + float((s.layer - self.current_layer - 1) % L + 1)
        last = NEVER_USED_POSITION if s.last_position == DUE_NOW else s.last_position
        return 2 * turn - last

    def predict(self, s: Slot) -> None:
        """Next uses of the slot's expert (expertflow only): the plan's forecast, or the estimate."""
        if self.policy != "expertflow":
            return
        first = second = math.nan
        if self.next_use is not None:
            rows, cols = self.next_use.shape
            if s.layer < rows and s.expert < cols:
                first = float(self.next_use[s.layer, s.expert])
                second = float(self.following_use[s.layer, s.expert])
        else:
            first = self.named_due.get((s.layer, s.expert), math.nan)
        if not math.isnan(first) and first <= self.position:
            first = second  # that visit has come: the next use is the one after
        gap = 2.0 * max(self.num_layers, 1)
        if math.isnan(first):
            s.next_use = self.estimate(s)
            s.following_use = s.next_use + gap
        else:
            s.next_use = first
            s.following_use = second if not math.isnan(second) and second > first else first + gap

    def refresh(self) -> None:
        for s in self.slots:
            if not s.empty:
                self.predict(s)

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
        s = self.slots[i]
        s.last_use = self.clock
        s.last_position = self.position
        s.use_count += 1
        self.predict(s)

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

    def admit(self, link_idle: bool) -> None:
        """Admits the stored plan's prefetches (apply, and readmit after an acquire). Once a next-use
        plan has to wait, later entries wait too, but those already resident are still planned."""
        admitting = True
        for layer, expert, due, sure in self.plan:
            if self.timed and due <= self.position:
                continue  # its visit has come: too late to prefetch
            i = self.find(layer, expert)
            if i >= 0:
                self.slots[i].planned = True
                continue
            if not admitting or (not sure and not link_idle):
                continue
            i = self.pick(layer, due, prefetch=True)
            if i < 0:
                admitting = not self.by_next_use  # later entries are due later still: nothing frees up
                continue
            v = self.slots[i]
            # Conservative admission: never evict an expert needed before the one replacing it.
            if self.by_next_use and not v.empty and not v.next_use > due:
                admitting = False
                continue
            # A guess takes only a free slot or an expert no forecast expects again.
            if not sure and not v.empty and v.next_use_after(due) != NEVER:
                continue
            self.evict(i)
            self.assign(i, layer, expert)
            s = self.slots[i]
            s.planned = s.prefetched_unused = s.queued = True
            self.stats["prefetches"] += 1
            link_idle = False

    # -- the runtime's operations ----------------------------------------------------------------
    def prefetch(self, entries: Sequence[tuple[int, int, float]]) -> None:
        """``ExpertCache.prefetch``: sure entries, no next-use tables, no clock."""
        self.apply([(layer, expert, due, True) for layer, expert, due in entries])

    def apply(
        self,
        entries: Sequence[tuple[int, int, float, bool]],
        next_use: np.ndarray | None = None,
        following_use: np.ndarray | None = None,
        now: float = DUE_NOW,
    ) -> None:
        """``ExpertCache.apply``: entries ``(layer, expert, due, sure)`` in plan order."""
        # A queued prefetch the new plan does not name is not worth its bytes.
        wanted = {(layer, expert) for layer, expert, _, _ in entries}
        for i, s in enumerate(self.slots):
            if not s.empty and s.pin_count == 0 and s.queued and (s.layer, s.expert) not in wanted:
                self.stats["cancelled_prefetches"] += 1
                self.slots[i] = Slot()
        if next_use is not None:
            self.next_use, self.following_use = np.asarray(next_use), np.asarray(following_use)
            self.named_due = {}
        else:
            self.next_use = self.following_use = None
            self.named_due = {(layer, expert): due for layer, expert, due, _ in entries}  # the last one wins
        self.timed = now != DUE_NOW
        if self.timed:
            self.next_visit = now  # an untimed plan leaves a pending `now` in place
        self.plan = list(entries)
        for s in self.slots:
            s.planned = False
        self.refresh()
        self.admit(link_idle=not self.queued_any())

    def acquire(self, layer: int, experts: list[int], demand_landed: bool = False) -> list[int]:
        """``ExpertCache.acquire``. ``demand_landed``: whether this acquire's own demand copies have
        landed by the time it readmits the plan (see the module docstring)."""
        if len(experts) > len(self.slots):
            raise ReferenceError_("capacity")  # checked before the clock moves
        self.advance(layer)
        slots = [self.find(layer, e) for e in experts]
        for i in slots:
            if i >= 0:
                self.slots[i].pin_count += 1
        demand_due = self.position if self.by_next_use else DUE_NOW
        missed = []
        for k, e in enumerate(experts):
            if slots[k] >= 0:
                continue
            i = self.pick(layer, demand_due, prefetch=False)
            if i < 0:
                # Undo the pins and the loads; the evictions already made, and the clock, stay moved.
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
        copies = len(missed)  # demand copies this acquire puts on the link
        for k, i in enumerate(slots):
            s = self.slots[i]
            if k in missed:
                self.stats["misses"] += 1
            else:
                self.stats["hits"] += 1
                if s.prefetched_unused:
                    self.stats["prefetch_hits"] += 1
                if s.queued:
                    copies += 1  # a queued prefetch promoted to a demand load
            s.queued = False
            s.prefetched_unused = False
            self.touch(i)
        self.stats["accesses"] += len(experts)
        if self.timed:  # readmit: an untimed plan is admitted once
            self.admit(link_idle=not self.queued_any() and (demand_landed or copies == 0))
        return slots

    def release(self, layer: int, experts: list[int]) -> None:
        for e in experts:
            self.slots[self.find(layer, e)].pin_count -= 1

    def land_all(self) -> None:
        for s in self.slots:
            s.queued = False
