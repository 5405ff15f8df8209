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
2. otherwise an estimate from history: an expert's next chance is its layer's next turn, and it is
   expected later the longer it sat unused: ``2 * next_turn - last_use``. This alone evicts no more
   than LRU on layer-sequential access, where LRU evicts exactly the layer needed next;
3. an exhaustive forecast (an oracle of the whole run) leaves an expert it does not name unneeded.

A forecast the planner does not trust changes nothing: a poor predictor falls back to demand loading
with the estimate, never to more bytes. Everything here is numpy over ``[L, E]`` arrays on the host:
the only device-to-host transfers are the step forecast and each layer's routing, which the callers
make.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Plan", "Forecast", "Calibrator", "Planner", "NEVER"]

NEVER = np.inf
_NEVER_USED = -1e12  # last-use position of an expert never used: its estimate is farther than any other


@dataclass(frozen=True)
class Plan:
    """What the runtime applies (``ExpertCache.apply``).

    ``layers``, ``experts`` ``[n]`` int32 and ``due`` ``[n]`` float64: the experts to bring in, in
    ascending due order (when each is needed, in positions); ``sure [n]`` bool (None: all): the others
    load only while the link is idle. ``next_use`` and ``following_use``
    ``[L, E]`` float64: every expert's predicted next use and the use after it (``inf``: none), or
    ``None`` for policies that evict by recency and only name prefetches. ``now``: the position of the
    next layer visit; its demand loads rank an expert forecast for it, but not asked for, by its use
    after it.
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
        return np.minimum((np.clip(scores, 0.0, 1.0) * self.num_bins).astype(np.int64), self.num_bins - 1)

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
    """Predicted next uses for one model's ``num_layers`` x ``num_experts`` experts.

    Call :meth:`begin_step` when a forward pass starts (with the step predictor's forecast, if any)
    and :meth:`layer_done` once each layer's router has spoken (with the experts it chose and, if any,
    gate-ahead picks for the next layer); each returns the plan to apply.
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
        self.last_use = np.full((L, E), _NEVER_USED)
        # Steps ahead (0 = this step) of the next three trusted uses of each expert; inf = none. A use
        # is `sure` when its forecast is right at least prefetch_confidence of the time.
        self.uses = np.full((3, L, E), np.inf)
        self.sure = np.zeros((3, L, E), dtype=bool)
        self.exhaustive = False
        # The tables, kept current row by row: a layer's visit changes only its row and the next one's.
        self.next_use = np.full((L, E), np.inf)
        self.following_use = np.full((L, E), np.inf)
        self.trusted = np.zeros((L, E), dtype=bool)
        # What this step's forecasts said and what the routers did, for calibration at the step's end.
        self.step_scores: np.ndarray | None = None  # [L, E]
        self.gate_scores = np.zeros((L, E))  # gate-ahead picks for each layer, seen one layer early
        self.gated = np.zeros(L, dtype=bool)
        self.observed = np.zeros((L, E), dtype=bool)
        self.ran = np.zeros(L, dtype=bool)
        self.step_calibration = Calibrator()
        self.gate_calibration = Calibrator()
        self._rows = np.arange(L)

    @property
    def position(self) -> int:
        """Position of the last layer done."""
        return self.step * self.num_layers + self.layer

    # -- events ------------------------------------------------------------------------------------
    def begin_step(self, forecast: Forecast | None = None) -> Plan:
        """A forward pass begins: take the step predictor's forecast (None: history alone)."""
        self._calibrate()
        self.step += 1
        self.layer = -1
        self.uses[:] = np.inf
        self.sure[:] = False
        self.exhaustive = False
        self.step_scores = None
        if forecast is not None:
            probs = np.asarray(forecast.probs, dtype=np.float64)
            if probs.shape != (self.num_layers, self.num_experts):
                raise ValueError(f"a forecast has probabilities [{self.num_layers}, {self.num_experts}], got {list(probs.shape)}")
            self.step_scores = probs
            p = self.step_calibration(probs)
            now, sure_now = p >= self.confidence, p >= self.prefetch_confidence
            self.uses[0] = np.where(now, 0.0, np.inf)
            self.sure[0] = sure_now
            p_later = self.step_calibration(np.ones(1))[0]  # a later use is named outright: score 1
            if forecast.later is not None and p_later >= self.confidence:
                later = np.asarray(forecast.later, dtype=np.float64)
                sure_later = p_later >= self.prefetch_confidence
                self.uses[0] = np.where(now, 0.0, later[0])
                self.uses[1] = np.where(now, later[0], later[1])
                self.uses[2] = np.where(now, later[1], np.inf)
                self.sure[0] = np.where(now, sure_now, sure_later)
                self.sure[1:] = sure_later
            self.exhaustive = forecast.exhaustive
        self._refresh(self._rows)
        return self.plan()

    def layer_done(self, layer: int, used: np.ndarray, gate: np.ndarray | None = None) -> Plan:
        """Layer ``layer``'s router chose ``used`` (expert ids, any shape; ids >= num_experts mean none)
        for this step; ``gate`` (expert ids, any shape) are gate-ahead picks for layer ``layer + 1``."""
        if layer <= self.layer:  # no begin_step since the last pass (e.g. an encoder-decoder's stacks)
            self.begin_step()
        self.layer = layer
        E = self.num_experts
        mask = np.zeros(E + 1, dtype=bool)
        mask[np.minimum(np.asarray(used, dtype=np.int64).ravel(), E)] = True
        mask = mask[:E]
        self.observed[layer] = mask
        self.ran[layer] = True
        self.last_use[layer, mask] = self.position
        # This step's forecast for the layer is spent: its next uses move up.
        spent = self.uses[0, layer] == 0
        if spent.any():
            self.uses[:2, layer, spent] = self.uses[1:, layer, spent]
            self.uses[2, layer, spent] = np.inf
            self.sure[:2, layer, spent] = self.sure[1:, layer, spent]
            self.sure[2, layer, spent] = False
        nxt = layer + 1
        if gate is not None and nxt < self.num_layers:
            picks = np.zeros(E + 1)
            picks[np.minimum(np.asarray(gate, dtype=np.int64).ravel(), E)] = 1.0
            picks = picks[:E]
            self.gate_scores[nxt] = picks
            self.gated[nxt] = True
            p = self.gate_calibration.at_one()
            if p >= self.confidence:
                picked = picks > 0
                add = picked & (self.uses[0, nxt] != 0)
                self.uses[1:, nxt, add] = self.uses[:2, nxt, add]
                self.sure[1:, nxt, add] = self.sure[:2, nxt, add]
                self.uses[0, nxt, add] = 0.0
                self.sure[0, nxt, add] = False
                if p >= self.prefetch_confidence:
                    self.sure[0, nxt] |= picked
        self._refresh(np.array([layer, nxt % self.num_layers]))
        return self.plan()

    def _calibrate(self) -> None:
        """The finished step's forecasts against what its routers chose (once per step: cheap)."""
        ran = self.ran
        if self.step_scores is not None and ran.any():
            self.step_calibration.observe(self.step_scores[ran], self.observed[ran])
        gated = self.gated & ran
        if gated.any():
            picked = self.gate_scores[gated] > 0
            self.gate_calibration.observe(np.ones(int(picked.sum())), self.observed[gated][picked])
        self.ran[:] = False
        self.gated[:] = False

    # -- the plan ----------------------------------------------------------------------------------
    def _refresh(self, rows: np.ndarray) -> None:
        """Recomputes the tables' ``rows`` at the current position.

        A forecast use of layer ``l`` ``h`` steps ahead is at ``(step + h) * L + l``. Otherwise the
        estimate ``2 * next_turn - last_use``, with turns counted from the visit about to run (the
        plan serves its victim choices too: its experts the router does not ask for next have their
        chance a whole step later). After a forecast use an expert is as fresh as one just used: the
        use after it is estimated from there.
        """
        L = self.num_layers
        base = (self.step * L + rows)[:, None].astype(np.float64)
        first = base + self.uses[0, rows] * L
        second = base + self.uses[1, rows] * L
        trusted = np.isfinite(first)
        self.trusted[rows] = trusted
        if self.exhaustive:
            self.next_use[rows] = first
            self.following_use[rows] = second
            return
        turn = self.position + 1 + (rows - self.layer - 2) % L + 1  # each row's next visit after the coming one
        next_use = np.where(trusted, first, 2.0 * turn[:, None] - self.last_use[rows])
        self.next_use[rows] = next_use
        self.following_use[rows] = np.where(np.isfinite(second), second, next_use + 2 * L)

    def plan(self) -> Plan:
        """The plan at the current position: next-use tables, and the trusted uses within the window
        (two steps) as prefetches, earliest first; those not sure wait for an idle link."""
        pos = self.position
        flat = self.next_use.ravel()
        candidates = np.flatnonzero(self.trusted.ravel() & (flat > pos) & (flat <= pos + self.window))
        if candidates.size > 1:
            candidates = candidates[np.argsort(flat[candidates], kind="stable")]
        return Plan(
            (candidates // self.num_experts).astype(np.int32),
            (candidates % self.num_experts).astype(np.int32),
            flat[candidates],
            self.next_use.copy(),
            self.following_use.copy(),
            float(pos + 1),
            self.sure[0].ravel()[candidates],
        )
