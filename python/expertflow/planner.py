"""The planner: routing forecasts -> predicted next use of every (layer, expert) -> a :class:`Plan`.

At batch 1 a Mixtral expert takes milliseconds to copy and a tenth of one to compute: bytes decide
time. So a plan is read as *when* each (layer, expert) is next needed, and the runtime's cache
(``include/expertflow/cache.h``) decides with it: evict the expert needed farthest ahead, prefetch X
only when the expert it would evict is not needed before X (integrated prefetching and caching, Cao,
Felten, Karlin and Li, 1995). With perfect forecasts that moves exactly Belady's bytes, each copy as
early as it can go.

Positions count layer visits: layer ``l`` of step ``s`` is at ``s * num_layers + l``. A step is one
forward pass (all sequences of a batch together).

Where the next use comes from, for each (layer, expert):

1. a forecast the planner trusts: a step predictor's probability, calibrated online against what the
   routers then chose (:class:`Calibrator`), at least ``confidence``; gate-ahead picks for the next
   layer, calibrated the same way; later steps from multi-step forecasts (the trace oracles);
2. otherwise (NaN in the tables) the cache's own estimate from history, on its own clock: an expert's
   next chance is its layer's next visit, and it is expected later the longer it sat unused,
   ``2 * next_visit - last_use``. This alone evicts no more than LRU on layer-sequential access,
   where LRU evicts exactly the layer needed next;
3. an exhaustive forecast (an oracle of the whole run) leaves an expert it does not name unneeded
   (``inf``).

A forecast the planner does not trust changes nothing: a poor predictor falls back to demand loading
with the estimate, never to more bytes. Planning is numpy over ``[L, E]`` arrays once per step; a
layer adds a few array writes (and a plan only when gate-ahead refines the next layer). The only
device-to-host transfers are the step forecast and each layer's routing, which the callers make.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from . import _C

__all__ = ["Plan", "Forecast", "Calibrator", "Planner"]


@dataclass(frozen=True)
class Plan:
    """What the runtime applies (``ExpertCache.apply``).

    ``layers``, ``experts`` ``[n]`` int32 and ``due`` ``[n]`` float64: the experts to bring in, in
    ascending due order (when each is needed, in positions); ``sure [n]`` bool (None: all): the others
    load only while the link is idle. ``next_use`` and ``following_use`` ``[L, E]`` float64: every
    expert's forecast next use and the use after it (NaN: none, the cache estimates; ``inf``: never),
    or ``None`` for policies that evict by recency and only name prefetches. ``now``: the position of the
    next layer visit, which sets the cache's clock; -inf: a plan without a clock, admitted once.
    """

    layers: np.ndarray
    experts: np.ndarray
    due: np.ndarray
    next_use: np.ndarray | None = None
    following_use: np.ndarray | None = None
    now: float = -np.inf
    sure: np.ndarray | None = None

    @staticmethod
    def prefetch_only(entries: list[tuple[int, int, float]]) -> Plan:
        """A plan of ``(layer, expert, due)`` entries and no next-use tables."""
        arr = np.array(entries, dtype=np.float64).reshape(-1, 3)
        return Plan(arr[:, 0].astype(np.int32), arr[:, 1].astype(np.int32), arr[:, 2].copy())

    def __len__(self) -> int:
        return int(self.layers.shape[0])

    def kept_until_next_use(self, layer: int, experts: Sequence[int], num_slots: int, visit: float) -> np.ndarray:
        """Whether a cache of ``num_slots`` slots that evicts the expert needed farthest ahead would
        keep each of ``experts`` (ids of ``layer``, used at ``visit``, a position of that layer) until
        its next use, by this plan's forecast -> ``[m]`` float64: 1 kept, 0 not (or never used
        again), NaN where the plan does not say: no tables, no clock, a clock past ``visit`` (the
        visit ran before the plan was made), or no use of the expert named after this visit (a next
        use of NaN names none, as for the runtime's cache). Raises ``ValueError`` for a ``visit``
        that is not a position of ``layer``.

        Belady's rule over the uses the plan names (each expert's next two), from a cache holding
        only this expert: it is kept until its next use ``t`` when, at every visit after this one up
        to ``t``, fewer than ``num_slots`` other experts must be held. Another expert must be held at
        each of its uses up to ``t``, and from its first use to its second where that comes before
        ``t`` (needed sooner, the cache keeps it instead); one used and not again before ``t`` is
        evicted first. What no forecast names is not counted. Positions are whole visits. A forecast
        miss the cache would not keep buys no later hit with its copy: the engine may leave it to the
        CPU (``OffloadEngine._leave_to_cpu``). One native call (``policy.h``): the leave rule asks
        at each late visit of a plan, on the thread that launches the GPU's work, where numpy's
        per-call costs added up."""
        m = len(experts)
        if self.next_use is None or self.following_use is None or not np.isfinite(self.now):
            return np.full(m, np.nan)
        num_layers = self.next_use.shape[0]  # positions count layer visits (module docstring)
        if visit % num_layers != layer:
            raise ValueError(f"position {visit} is not a visit of layer {layer} ({num_layers} layers a step)")
        if visit < self.now:  # already run: the plan was made after it
            return np.full(m, np.nan)
        return _C.kept_until_next_use(self.next_use, self.following_use, layer, float(visit),
                                      [int(e) for e in experts], num_slots)


@dataclass
class Forecast:
    """What a step predictor expects before a step runs, over the union of the batch's sequences.

    ``probs [L, E]``: probability that each expert is used in this step. ``later [2, L, E]``
    (optional): steps ahead (>= 1) of the next two uses after this step, ``inf`` for none (multi-step
    forecasts: the trace oracles). ``exhaustive``: an expert the forecast never names is not used
    again (an oracle of the whole run).
    """

    probs: np.ndarray
    later: np.ndarray | None = None
    exhaustive: bool = False


class Calibrator:
    """How often an expert scored ``p`` was then used: counts in ``num_bins`` bins over [0, 1].

    Each bin starts with one pseudo-observation of a forecast that was wrong: a predictor is trusted
    only once it has been seen right (a good one after a layer or two), and a poor one never costs a
    byte.
    """

    def __init__(self, num_bins: int = 10) -> None:
        self.num_bins = num_bins
        self.used = np.zeros(num_bins)
        self.seen = np.ones(num_bins)

    def _bins(self, scores: np.ndarray) -> np.ndarray:
        return np.minimum((np.clip(np.nan_to_num(scores), 0.0, 1.0) * self.num_bins).astype(np.int64), self.num_bins - 1)

    def observe(self, scores: np.ndarray, used: np.ndarray) -> None:
        """``scores`` the forecast gave, ``used`` (same shape, bool): whether each was then used."""
        bins = self._bins(scores).ravel()
        self.seen += np.bincount(bins, minlength=self.num_bins)
        self.used += np.bincount(bins, weights=used.ravel().astype(np.float64), minlength=self.num_bins)

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        """Measured probability of use for ``scores`` (any shape)."""
        return (self.used / self.seen)[self._bins(scores)]

    def at_one(self) -> float:
        """Measured probability of use for a score of 1 (an expert named outright)."""
        return float(self.used[-1] / self.seen[-1])


class Planner:
    """Forecasts for one model's ``num_layers`` x ``num_experts`` experts, as plans.

    Call :meth:`begin_step` when a forward pass starts (with the step predictor's forecast, if any)
    and :meth:`layer_done` once each layer's router has spoken (with the experts it chose and, if any,
    gate-ahead picks for the next layer). Each returns the plan to apply, or None when the plan in
    force still holds: the cache moves its own clock, estimates what no forecast names and lets spent
    forecasts give way (``cache.h``), so a layer that refines nothing costs a few array writes.
    """

    def __init__(self, num_layers: int, num_experts: int, *, confidence: float = 0.5,
                 prefetch_confidence: float = 0.9, window_steps: int = 2) -> None:
        if not 0.0 < confidence <= prefetch_confidence <= 1.0:
            raise ValueError(f"need 0 < confidence <= prefetch_confidence <= 1, got {confidence} and {prefetch_confidence}")
        L, E = num_layers, num_experts
        self.num_layers = L
        self.num_experts = E
        self.confidence = confidence
        self.prefetch_confidence = prefetch_confidence
        self.window = window_steps * L
        self.step = -1
        self.layer = L - 1  # the last layer done: a new step starts at layer 0
        # The plan in force: forecast next uses (NaN: none, the cache estimates; inf: never), and the
        # prefetches (flat indices, ascending due, sure flags).
        self.next_use = np.full((L, E), np.nan)
        self.following_use = np.full((L, E), np.nan)
        self.candidates = np.zeros(0, dtype=np.int64)
        self.sure = np.zeros(0, dtype=bool)
        # What this step's forecasts said and what the routers did, for calibration at the step's end.
        self.step_scores: np.ndarray | None = None  # [L, E]
        self.gate_picks = np.zeros((L, E), dtype=bool)  # gate-ahead picks for each layer, seen one layer early
        self.gated = np.zeros(L, dtype=bool)
        self.observed = np.zeros((L, E), dtype=bool)
        self.ran = np.zeros(L, dtype=bool)
        self.step_calibration = Calibrator()
        self.gate_calibration = Calibrator()
        self._base = (np.arange(L) * 1.0)[:, None]

    @property
    def position(self) -> int:
        """Position of the last layer done."""
        return self.step * self.num_layers + self.layer

    # -- events ------------------------------------------------------------------------------------
    def begin_step(self, forecast: Forecast | None = None, observe: bool = True) -> Plan:
        """A forward pass begins: take the step predictor's forecast (None: history alone).

        ``observe=False`` keeps this step out of calibration: a prefill, whose routers speak for all
        the prompt's tokens while the forecast is of one (or none: the sequences just began).
        """
        self._calibrate()
        self.step += 1
        self.layer = -1
        L = self.num_layers
        base = self.step * L + self._base  # this step's visit of each layer
        self.step_scores = None
        first = np.full((L, self.num_experts), np.nan)
        second = np.full_like(first, np.nan)
        sure = np.zeros(first.shape, dtype=bool)
        if forecast is not None:
            probs = np.asarray(forecast.probs, dtype=np.float64)
            if probs.shape != (L, self.num_experts):
                raise ValueError(f"a forecast has probabilities [{L}, {self.num_experts}], got {list(probs.shape)}")
            if not np.isfinite(probs).all():
                raise ValueError("a forecast's probabilities must be finite numbers in [0, 1]; this one holds NaN or inf")
            self.step_scores = probs if observe else None
            p = self.step_calibration(probs)
            now = p >= self.confidence
            first[now] = np.broadcast_to(base, first.shape)[now]
            sure = p >= self.prefetch_confidence
            p_later = self.step_calibration.at_one()  # a later use is named outright: score 1
            if forecast.later is not None and p_later >= self.confidence:
                later = base + np.asarray(forecast.later, dtype=np.float64) * L  # inf stays inf
                first = np.where(now, first, later[0])
                second = np.where(now, later[0], later[1])
                sure = np.where(now, sure, p_later >= self.prefetch_confidence)
                if forecast.exhaustive:  # what the forecast never names is never used
                    first[np.isnan(first)] = np.inf
                    second[np.isnan(second)] = np.inf
        self.next_use, self.following_use = first, second
        return self._plan(sure)

    def layer_done(self, layer: int, used: np.ndarray, gate: np.ndarray | None = None) -> Plan | None:
        """Layer ``layer``'s router chose ``used`` (expert ids, any shape; ids >= num_experts mean none)
        for this step; ``gate`` (expert ids, any shape) are gate-ahead picks for layer ``layer + 1``.
        Returns a new plan when gate-ahead refined the next layer, else None."""
        restarted = None
        if layer <= self.layer:  # no begin_step since the last pass (e.g. an encoder-decoder's stacks)
            restarted = self.begin_step()
        self.layer = layer
        E = self.num_experts
        mask = np.zeros(E + 1, dtype=bool)
        mask[np.minimum(np.asarray(used, dtype=np.int64).ravel(), E)] = True
        self.observed[layer] = mask[:E]
        self.ran[layer] = True
        nxt = layer + 1
        if gate is None or nxt >= self.num_layers:
            return restarted
        picks = np.zeros(E + 1, dtype=bool)
        picks[np.minimum(np.asarray(gate, dtype=np.int64).ravel(), E)] = True
        picked = picks[:E]
        self.gate_picks[nxt] = picked
        self.gated[nxt] = True
        p = self.gate_calibration.at_one()
        if p < self.confidence:
            return restarted
        visit = float(self.step * self.num_layers + nxt)
        add = picked & (self.next_use[nxt] != visit)
        if not add.any():
            return restarted
        self.following_use[nxt, add] = self.next_use[nxt, add]
        self.next_use[nxt, add] = visit
        # The new uses are the earliest ahead: they go first, then the plan in force (sorted by due).
        flat = nxt * E + np.flatnonzero(add)
        self.candidates = np.concatenate([flat, self.candidates])
        self.sure = np.concatenate([np.full(flat.size, p >= self.prefetch_confidence), self.sure])
        return self._make_plan()

    def _calibrate(self) -> None:
        """The finished step's forecasts against what its routers chose (once per step: cheap)."""
        ran = self.ran
        if self.step_scores is not None and ran.any():
            self.step_calibration.observe(self.step_scores[ran], self.observed[ran])
        gated = self.gated & ran
        if gated.any():
            picked = self.gate_picks[gated]
            self.gate_calibration.observe(np.ones(int(picked.sum())), self.observed[gated][picked])
        self.ran[:] = False
        self.gated[:] = False

    # -- the plan ----------------------------------------------------------------------------------
    def _plan(self, sure: np.ndarray) -> Plan:
        """Prefetches: the forecast uses within the window (two steps), earliest first."""
        pos = self.position
        flat = self.next_use.ravel()
        with np.errstate(invalid="ignore"):
            candidates = np.flatnonzero((flat > pos) & (flat <= pos + self.window))
        if candidates.size > 1:
            candidates = candidates[np.argsort(flat[candidates], kind="stable")]
        self.candidates, self.sure = candidates, sure.ravel()[candidates]
        return self._make_plan()

    def _make_plan(self) -> Plan:
        c = self.candidates
        return Plan(
            (c // self.num_experts).astype(np.int32),
            (c % self.num_experts).astype(np.int32),
            self.next_use.ravel()[c],
            self.next_use.copy(),
            self.following_use.copy(),
            float(self.position + 1),
            self.sure,
        )
