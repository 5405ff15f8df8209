"""A plain-Python model of the runtime's slot cache, written from its documented rules.

Sources: the invariants of include/expertflow/cache.h, policy.h and runtime.h, docs/runtime.md
(policies, clock, quotas, statistics) and python/expertflow/planner.py (what a plan means). Nothing
here is carried over from csrc/: each quantity is computed the way its definition states it, e.g.

- the clock is a sequence of layer visits; "layer l of step s is at position s * L + l", so the next
  visit of a layer is found by walking the positions after the current one until one belongs to it;
- a slot's next uses are not stored: they are derived, whenever they are looked at, from the plan in
  force (the forecast uses that are still ahead of the clock), else from the estimate
  ``2 * (the layer's next visit) - (the expert's last use)``;
- a victim is the first candidate in the documented eviction order, found by sorting.

The copy engine is modelled as paused: a prefetch stays queued (unfinished, cancellable) until
:meth:`ReferenceCache.land_all`. That makes every decision deterministic but one. The engine calls the
link idle when no prefetch is queued or being submitted and no copy (demand loads included) is in
flight; here it is idle when no prefetch is queued and, inside :meth:`acquire`, when that acquire's
own demand copies (misses, and queued prefetches it promoted) have landed. Whether a copy of a few
KiB has landed by the time the runtime asks is a race only the caller can resolve, so the caller says
which with ``demand_landed`` (see tests/test_cache_state_machine.py).

Where the two disagreed (the first visit of the last layer, a negative `now`, a following use that has
passed too, an expert named twice in a plan without tables), the native cache was fixed to follow the
definition; tests/test_cache_definition.py pins each case with values worked out by hand.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

NEVER = math.inf          # a next use that never comes
DUE_NOW = -math.inf       # a load due now (a demand load), and "no clock" for a plan's `now`
#: The last-use position the estimate assumes for an expert not accessed since it was loaded, so that
#: its estimate comes after every other expert's (cache.cpp names this constant; it shows in slot_table).
NEVER_USED_POSITION = -1e12
#: Without a clock (num_layers=0) the estimate ranks by recency alone: a base beyond any position, plus
#: the loads and accesses since the expert's last one.
NO_CLOCK_ESTIMATE = 1e15

STAT_KEYS = (
    "accesses", "hits", "misses", "prefetch_hits", "prefetches", "wasted_prefetches", "cancelled_prefetches", "evictions",
    "backfills", "cancelled_backfills",
)
#: backfill() queues a copy only while fewer prefetches than this are unfinished (runtime.h).
MAX_PENDING_BACKFILL = 2
#: backfill()'s outcome for each expert (runtime.h): not in a slot, its copy queued, already held.
NOT_ADMITTED, QUEUED, HELD = 0, 1, 2


class ReferenceError_(Exception):
    pass


@dataclass
class Resident:
    """What the cache remembers about one slot's occupant (everything else is derived)."""

    layer: int
    expert: int
    loaded_at: int                    # recency counter at the load
    pin_count: int = 0
    planned: bool = False             # named by the plan in force when it was last admitted
    prefetched_unused: bool = False   # brought in by a prefetch and not acquired since
    queued: bool = False              # that prefetch's copy has not landed: dropping it cancels it
    backfilled: bool = False          # backfill() queued its copy or found it queued: no new plan cancels it
    accesses: list[tuple[int, float]] | None = None  # (recency counter, clock position) of each access

    def __post_init__(self) -> None:
        self.accesses = [] if self.accesses is None else self.accesses


@dataclass
class SlotView:
    """One row of ``slot_table()``, as the runtime reports it."""

    layer: int = -1
    expert: int = -1
    pin_count: int = 0
    planned: bool = False
    prefetched_unused: bool = False
    last_position: float = DUE_NOW
    next_use: float = NEVER
    following_use: float = NEVER
    last_use: int = 0
    use_count: int = 0
    backfilled: bool = False


class ReferenceCache:
    def __init__(self, num_slots: int, policy: str, num_layers: int = 0) -> None:
        assert policy in ("lru", "lfu", "expertflow"), policy
        self.residents: list[Resident | None] = [None] * num_slots
        self.policy = policy
        self.num_layers = num_layers
        self.quotas: list[int] = []
        self.counter = 0                # counts loads and accesses: the recency clock (last_use)
        # The clock of layer visits.
        self.position = -1.0            # the current visit; -1 before the first
        self.visited = False
        self.current_layer: int | None = None
        self.pending_now: float | None = None  # a timed plan's `now`, until the clock reaches it
        self.farthest = self.position  # the highest position the clock has held
        # The plan in force.
        self.timed = False
        self.plan: list[tuple[int, int, float, bool]] = []
        self.tables: tuple[np.ndarray, np.ndarray] | None = None
        self.stats = dict.fromkeys(STAT_KEYS, 0)

    # -- the clock -------------------------------------------------------------------------------
    def layer_of(self, position: float) -> int | None:
        """The layer whose visit ``position`` is (s * L + l -> l), or None for no visit."""
        L = self.num_layers
        if position != math.floor(position):
            return None
        return int(position) % L

    def next_visit(self, layer: int, after: float) -> float:
        """The first position after ``after`` that is a visit of ``layer``."""
        p = math.floor(after) + 1
        while p % self.num_layers != layer:
            p += 1
        return float(p)

    def advance(self, layer: int) -> None:
        """An acquire of ``layer``: the clock moves to that layer's visit. A pending ``now`` that names
        the layer is where this visit lands; the current layer again is the same visit (waves); any
        other layer is its next visit after the current position (a lower layer starts the next step)."""
        if self.num_layers > 0:
            if self.pending_now is not None and self.layer_of(self.pending_now) == layer:
                self.position = self.pending_now
            elif self.visited and layer == self.current_layer:
                pass
            else:
                self.position = self.next_visit(layer, after=self.position)
            if self.pending_now is not None and self.position >= self.pending_now:
                self.pending_now = None  # the clock has reached the plan's `now`
        self.visited = True
        self.current_layer = layer
        self.farthest = max(self.farthest, self.position)

    # -- next uses (expertflow) ------------------------------------------------------------------
    def forecast_uses(self, layer: int, expert: int) -> list[float] | None:
        """The plan's forecast uses of an expert in time order, or None when it forecasts nothing.

        With tables: its next use and the one after (NaN: no forecast; a following use not after the
        next use says nothing). Without: the dues of the entries naming it."""
        if self.tables is not None:
            next_use, following_use = self.tables
            if not (layer < next_use.shape[0] and expert < next_use.shape[1]):
                return None
            first, second = float(next_use[layer, expert]), float(following_use[layer, expert])
            if math.isnan(first):
                return None
            return [first, second] if not math.isnan(second) and second > first else [first]
        dues = [due for l, e, due, _ in self.plan if (l, e) == (layer, expert)]
        if not dues:
            return None
        return sorted(set(dues))  # two entries with one due are one use

    def forecast_ahead(self, layer: int, expert: int) -> list[float]:
        """The forecast's uses of (layer, expert) still ahead of the clock, in time order (a use whose
        visit has come gives way); empty where it forecasts none."""
        uses = self.forecast_uses(layer, expert)
        return [u for u in uses if u > self.position] if uses is not None else []

    def forecast_next_use(self, layer: int, expert: int) -> float | None:
        """The forecast's next use of (layer, expert) after the current visit (NEVER: not again), or
        None where no forecast names one."""
        ahead = self.forecast_ahead(layer, expert)
        return ahead[0] if ahead else None

    def estimate(self, r: Resident) -> float:
        """Next use from history: the layer's next visit, pushed back by the time the expert sat unused
        since its last access (since forever when it has none)."""
        if self.num_layers <= 0:
            return NO_CLOCK_ESTIMATE + float(self.counter - self.last_use(r))
        last = r.accesses[-1][1] if r.accesses else NEVER_USED_POSITION
        return 2 * self.next_visit(r.layer, after=self.position) - last

    def next_uses(self, r: Resident) -> tuple[float, float]:
        """(next use, the use after it) as the expertflow policy sees them now; both never under the
        recency policies, which forecast nothing."""
        if self.policy != "expertflow":
            return NEVER, NEVER
        after_next = 2.0 * max(self.num_layers, 1)  # a use with no known successor: the next is two steps on
        ahead = self.forecast_ahead(r.layer, r.expert)
        if ahead:
            return ahead[0], ahead[1] if len(ahead) > 1 else ahead[0] + after_next
        guess = self.estimate(r)
        return guess, guess + after_next

    def next_use_seen_from(self, r: Resident, due: float) -> float:
        """The slot's next use as seen from a load due at ``due``: a use at or before it no longer counts."""
        first, second = self.next_uses(r)
        return first if first > due else second

    # -- the slots --------------------------------------------------------------------------------
    @staticmethod
    def last_use(r: Resident) -> int:
        return r.accesses[-1][0] if r.accesses else r.loaded_at

    @property
    def slots(self) -> list[SlotView]:
        out = []
        for r in self.residents:
            if r is None:
                out.append(SlotView())
                continue
            first, second = self.next_uses(r)
            out.append(SlotView(r.layer, r.expert, r.pin_count, r.planned, r.prefetched_unused,
                                r.accesses[-1][1] if r.accesses else DUE_NOW, first, second, self.last_use(r),
                                len(r.accesses), r.backfilled))
        return out

    def find(self, layer: int, expert: int) -> int:
        for i, r in enumerate(self.residents):
            if r is not None and (r.layer, r.expert) == (layer, expert):
                return i
        return -1

    def count(self, layer: int) -> int:
        return sum(1 for r in self.residents if r is not None and r.layer == layer)

    def quota(self, layer: int) -> int | None:
        q = self.quotas[layer] if 0 <= layer < len(self.quotas) else -1
        return None if q < 0 else q

    def eviction_order(self, candidates: list[int], due: float) -> list[int]:
        """Candidates, the first to evict first (policy.h); the slot index breaks every tie."""
        def key(i: int):
            r = self.residents[i]
            if self.policy == "lru":  # least recently used
                return (self.last_use(r), i)
            if self.policy == "lfu":  # fewest uses since loaded, then least recent
                return (len(r.accesses), self.last_use(r), i)
            return (-self.next_use_seen_from(r, due), self.last_use(r), i)  # farthest next use

        return sorted(candidates, key=key)

    def pick(self, layer: int, due: float, prefetch: bool) -> int:
        """The slot a load of ``layer`` due at ``due`` takes, or -1, by the placement rules of cache.h:
        a layer with a quota that holds at least that many slots reloads into one of its own; else an
        empty slot; else a slot of a layer above its quota; else, for a layer with a quota, another
        layer's slot; else any candidate. Candidates are unpinned; a prefetch under a recency policy
        also spares the slots the plan names."""
        candidates = [
            i for i, r in enumerate(self.residents)
            if r is not None and r.pin_count == 0 and not (prefetch and self.policy != "expertflow" and r.planned)
        ]
        own = [i for i in candidates if self.residents[i].layer == layer]
        q = self.quota(layer)
        if q is not None and self.count(layer) >= q and own:
            return self.eviction_order(own, due)[0]
        empty = [i for i, r in enumerate(self.residents) if r is None]
        if empty:
            return empty[0]
        over = [i for i in candidates
                if self.quota(self.residents[i].layer) is not None
                and self.count(self.residents[i].layer) > self.quota(self.residents[i].layer)]
        if over:
            return self.eviction_order(over, due)[0]
        others = [i for i in candidates if self.residents[i].layer != layer]
        if q is not None and others:
            return self.eviction_order(others, due)[0]
        return self.eviction_order(candidates, due)[0] if candidates else -1

    def may_replace(self, i: int, due: float) -> bool:
        """Conservative admission of a load due at ``due`` into slot ``i``: it is empty, or its
        expert is next needed after ``due``."""
        r = self.residents[i]
        return r is None or self.next_uses(r)[0] > due

    def load(self, i: int, layer: int, expert: int) -> Resident:
        self.counter += 1
        self.residents[i] = Resident(layer, expert, loaded_at=self.counter)
        return self.residents[i]

    def access(self, r: Resident) -> None:
        self.counter += 1
        r.accesses.append((self.counter, self.position))

    def evict(self, i: int) -> None:
        """Empties slot ``i``: a prefetch still queued is cancelled, anything else is an eviction."""
        r = self.residents[i]
        if r is None:
            return
        if r.queued:
            self.stats["cancelled_backfills" if r.backfilled else "cancelled_prefetches"] += 1
        else:
            self.stats["evictions"] += 1
            if r.prefetched_unused:
                self.stats["wasted_prefetches"] += 1
        self.residents[i] = None

    def queued_any(self) -> bool:
        return any(r is not None and r.queued for r in self.residents)

    # -- admission ----------------------------------------------------------------------------------
    def admit(self, link_idle: bool) -> None:
        """Walks the plan's prefetches in order (cache.h):

        - under a timed plan, one whose due has come is too late;
        - one already resident is planned (this goes on even after admission stops);
        - a next-use plan that had to wait admits nothing after that point;
        - a guess (not sure) goes only on an idle link, and only into a free slot or over an expert no
          forecast expects again; a load makes the link busy;
        - under expertflow, a prefetch due at t evicts only an expert not needed until after t
          (conservative: otherwise the plan waits); when no slot can be taken, it waits too.
        """
        expertflow = self.policy == "expertflow"
        waiting = False
        for layer, expert, due, sure in self.plan:
            if self.timed and due <= self.position:
                continue
            i = self.find(layer, expert)
            if i >= 0:
                self.residents[i].planned = True
                continue
            if waiting or (not sure and not link_idle):
                continue
            i = self.pick(layer, due, prefetch=True)
            if i < 0:
                waiting = expertflow
                continue
            if expertflow and not self.may_replace(i, due):
                waiting = True  # the victim is needed no later than this prefetch
                continue
            victim = self.residents[i]
            if not sure and victim is not None and self.next_use_seen_from(victim, due) != NEVER:
                continue
            self.evict(i)
            r = self.load(i, layer, expert)
            r.planned = r.prefetched_unused = r.queued = True
            self.stats["prefetches"] += 1
            link_idle = False

    # -- the runtime's operations ------------------------------------------------------------------
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
        """``ExpertCache.apply``: entries ``(layer, expert, due, sure)`` in plan order. The new plan
        replaces the old: a queued prefetch it does not name is cancelled; ``now`` (unless -inf: no
        clock, which leaves a pending ``now`` alone) is where the next visit lands."""
        wanted = {(layer, expert) for layer, expert, _, _ in entries}
        for i, r in enumerate(self.residents):
            if r is not None and r.pin_count == 0 and r.queued and not r.backfilled and (r.layer, r.expert) not in wanted:
                self.stats["cancelled_prefetches"] += 1
                self.residents[i] = None
        self.tables = None if next_use is None else (np.asarray(next_use), np.asarray(following_use))
        self.timed = now != DUE_NOW
        if self.timed:
            self.pending_now = now
        self.plan = list(entries)
        for r in self.residents:
            if r is not None:
                r.planned = False
        self.admit(link_idle=not self.queued_any())

    def acquire(self, layer: int, experts: list[int], demand_landed: bool = False, spare: Sequence[int] = ()) -> list[int]:
        """``ExpertCache.acquire``: the clock moves to the layer's visit; resident experts are pinned
        first, so the misses never evict them; the resident ones of ``spare`` whose copy is not waiting
        to start are pinned too, until a miss finds no other slot; each miss is demand-loaded (due
        now); then each expert is accessed, and a timed plan is admitted again. ``demand_landed``: whether this acquire's own demand copies
        have landed by then (see the module docstring)."""
        if set(spare) & set(experts) or len(set(spare)) < len(spare):
            raise ReferenceError_("spare")  # refused before the clock moves
        if len(experts) > len(self.residents):
            raise ReferenceError_("capacity")
        self.advance(layer)
        slots = [self.find(layer, e) for e in experts]
        for i in slots:
            if i >= 0:
                self.residents[i].pin_count += 1
        # not a copy that has not started (the exact machine pauses prefetches: queued means that)
        spared = [i for i in (self.find(layer, e) for e in spare) if i >= 0 and not self.residents[i].queued]
        for i in spared:
            self.residents[i].pin_count += 1

        def let_go_spared() -> None:
            for j in spared:
                self.residents[j].pin_count -= 1
            spared.clear()

        due_now = self.position if self.policy == "expertflow" else DUE_NOW
        missed: list[int] = []
        for k, e in enumerate(experts):
            if slots[k] >= 0:
                continue
            i = self.pick(layer, due_now, prefetch=False)
            if i < 0 and spared:
                let_go_spared()
                i = self.pick(layer, due_now, prefetch=False)
            if i < 0:
                # Nothing is left pinned or half-loaded; the evictions made so far, the clock and the
                # recency counter stay where they went.
                for j in slots:
                    if j >= 0:
                        self.residents[j].pin_count -= 1
                for k2 in missed:
                    self.residents[slots[k2]] = None
                raise ReferenceError_("no slot")
            self.evict(i)
            self.load(i, layer, e).pin_count += 1
            slots[k] = i
            missed.append(k)
        let_go_spared()
        copies = len(missed)  # demand copies this acquire puts on the link
        for k, i in enumerate(slots):
            r = self.residents[i]
            if k in missed:
                self.stats["misses"] += 1
            else:
                self.stats["hits"] += 1
                if r.prefetched_unused:
                    self.stats["prefetch_hits"] += 1
                if r.queued:
                    copies += 1  # a queued prefetch promoted to a demand load
            r.queued = r.prefetched_unused = False
            self.access(r)
        self.stats["accesses"] += len(experts)
        if self.timed:  # an untimed plan is admitted once
            self.admit(link_idle=not self.queued_any() and (demand_landed or copies == 0))
        return slots

    def backfill(self, layer: int, experts: list[int], outcome: list[int] | None = None) -> list[int]:
        """``ExpertCache.backfill``: as :meth:`acquire`, but a miss is copied on the prefetch path and
        nothing waits. The clock moves to the layer's visit; a resident expert whose copy has not
        started is evicted (its copy cancelled) and counts as missing; the other resident ones are
        pinned first (one whose copy is still on its way becomes a backfill: no new plan cancels it as
        stale); each missing one in turn, while fewer than MAX_PENDING_BACKFILL copies are queued, is
        loaded into the slot a demand miss would take and pinned, its copy queued (under expertflow,
        where the forecast names its next use, into the slot a prefetch due then would take, and only
        where a prefetch would be admitted: not for an expert never used again, not over one needed no
        later); every expert now in a slot is accessed in order, then unpinned; a timed plan is
        admitted again. -> per expert:
        QUEUED, HELD or NOT_ADMITTED. ``outcome``: follow the runtime's admissions instead (where
        copies race, the queue's length, and whether a queued copy has started, are not known here:
        a resident one the runtime did not report HELD was cancelled). Without it every queued copy
        is taken as not started (the prefetch queue is paused)."""
        self.advance(layer)
        slots = [self.find(layer, e) for e in experts]
        for k, i in enumerate(slots):
            r = self.residents[i] if i >= 0 else None
            if r is not None and r.queued and r.pin_count == 0 and (outcome is None or outcome[k] != HELD):
                self.evict(i)
                slots[k] = -1
        result = [HELD if i >= 0 else NOT_ADMITTED for i in slots]
        for i in slots:
            if i >= 0:
                self.residents[i].pin_count += 1
                self.residents[i].backfilled |= self.residents[i].queued
        due_now = self.position if self.policy == "expertflow" else DUE_NOW
        for k, e in enumerate(experts):
            if slots[k] >= 0:
                continue
            if outcome is None:
                admit = sum(r is not None and r.queued for r in self.residents) < MAX_PENDING_BACKFILL
            else:
                admit = outcome[k] == QUEUED
            if not admit:
                continue
            forecast = self.forecast_next_use(layer, e) if self.policy == "expertflow" else None
            if forecast is None:
                i = self.pick(layer, due_now, prefetch=False)
            else:  # a prefetch for its forecast next use, admitted as one
                i = self.pick(layer, forecast, prefetch=True) if forecast != NEVER else -1
                if i >= 0 and not self.may_replace(i, forecast):
                    i = -1
            if i < 0:
                continue
            self.evict(i)
            r = self.load(i, layer, e)
            r.queued = r.backfilled = True
            r.pin_count += 1
            self.stats["backfills"] += 1
            slots[k], result[k] = i, QUEUED
        for i in slots:
            if i >= 0:
                self.residents[i].prefetched_unused = False
                self.access(self.residents[i])
        for i in slots:
            if i >= 0:
                self.residents[i].pin_count -= 1
        if self.timed:
            self.admit(link_idle=not self.queued_any())
        return result

    def release(self, layer: int, experts: list[int]) -> None:
        for e in experts:
            self.residents[self.find(layer, e)].pin_count -= 1

    def land_all(self) -> None:
        for r in self.residents:
            if r is not None:
                r.queued = False
