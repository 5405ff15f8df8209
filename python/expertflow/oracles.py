"""Forecasts from a recorded routing trace: what benchmarks and replay know of the future, and blur.

On random weights a model's routers guess at random, so a benchmark forces each layer's experts
from a real trace and gives the policies forecasts of known quality:

- :class:`TraceOracle` with ``keep=1``: the true future path of the whole run (``oracle``), a bound
  for any predictor; with ``keep=R < 1`` each true expert is kept with probability R and otherwise
  replaced by a wrong one (``noisy-oracle:R``);
- :class:`GateOracle`: gate-ahead (the next layer's experts, seen one layer early) right with
  probability R (``gate-oracle:R``).

A :class:`TraceSchedule` says which trace tokens each step of a run covers: batch sequence ``b``
starts at trace token ``offsets[b]``; the first step (the prefill) covers ``prefill`` tokens of each
sequence, every later step one. Runs longer than the trace wrap around to its start.
"""

from __future__ import annotations

import numpy as np

from .planner import Forecast
from .traces import RoutingTrace

__all__ = ["TraceSchedule", "TraceOracle", "GateOracle", "blur", "parse_forecast"]


class TraceSchedule:
    """Which trace tokens each step covers; ``step`` is the running step (set by whoever drives the run)."""

    def __init__(self, trace: RoutingTrace, num_layers: int, num_steps: int, offsets: list[int] | None = None,
                 prefill: int = 1) -> None:
        if num_layers > trace.num_layers:
            raise ValueError(f"the trace has {trace.num_layers} layers; a model of {num_layers} layers needs at least as many")
        if trace.num_tokens == 0:
            raise ValueError("the trace holds no tokens")
        if prefill < 1 or num_steps < 1:
            raise ValueError(f"prefill and num_steps must be at least 1, got {prefill} and {num_steps}")
        self.paths = trace.to_array(num_layers)  # [N, L, k]
        self.num_layers = num_layers
        self.num_experts = trace.num_experts
        self.num_steps = num_steps
        self.offsets = np.asarray(offsets if offsets is not None else [0], dtype=np.int64)
        self.prefill = prefill
        self.step = 0

    @property
    def batch(self) -> int:
        return int(self.offsets.shape[0])

    @property
    def top_k(self) -> int:
        return int(self.paths.shape[2])

    def tokens(self, step: int | None = None) -> np.ndarray:
        """``[B, n]`` trace token indices of a step (n = prefill for step 0, else 1)."""
        step = self.step if step is None else step
        if step == 0:
            index = self.offsets[:, None] + np.arange(self.prefill)[None, :]
        else:
            index = (self.offsets + self.prefill + step - 1)[:, None]
        return index % self.paths.shape[0]

    def experts(self, step: int | None = None, paths: np.ndarray | None = None) -> np.ndarray:
        """``[B, n, L, k]``: each token's experts at each layer in a step."""
        return (self.paths if paths is None else paths)[self.tokens(step)]

    def used(self, paths: np.ndarray | None = None) -> np.ndarray:
        """``[num_steps, L, E]`` bool: which experts each step uses (over the batch)."""
        out = np.zeros((self.num_steps, self.num_layers, self.num_experts), dtype=bool)
        layers = np.arange(self.num_layers)[:, None]
        for s in range(self.num_steps):
            ex = self.experts(s, paths).reshape(-1, self.num_layers, self.top_k)
            for row in ex:
                out[s, layers, row] = True
        return out


def blur(paths: np.ndarray, num_experts: int, keep: float, seed: int) -> np.ndarray:
    """``paths [..., k]`` with each expert kept with probability ``keep``, else replaced by a wrong one
    (uniform among the experts its row does not hold)."""
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"an oracle's accuracy must be in [0, 1], got {keep}")
    rng = np.random.default_rng(seed)
    out = paths.copy()
    flat = out.reshape(-1, out.shape[-1])
    replace = rng.random(flat.shape) >= keep
    for r, c in zip(*np.nonzero(replace)):
        wrong = np.setdiff1d(np.arange(num_experts), np.concatenate([paths.reshape(flat.shape)[r], flat[r]]))
        if wrong.size:
            flat[r, c] = rng.choice(wrong)
    return out


class TraceOracle:
    """The (blurred) future path of a scheduled run: this step's experts, and when each is next used."""

    def __init__(self, schedule: TraceSchedule, keep: float = 1.0, seed: int = 0) -> None:
        self.schedule = schedule
        self.name = "oracle" if keep >= 1.0 else f"noisy-oracle:{keep:g}"
        paths = schedule.paths if keep >= 1.0 else blur(schedule.paths, schedule.num_experts, keep, seed)
        used = schedule.used(paths)
        nxt = np.full((schedule.num_steps + 2, *used.shape[1:]), np.inf)
        for s in range(schedule.num_steps - 1, -1, -1):
            nxt[s] = np.where(used[s], s, nxt[s + 1])
        self.used, self.next_step = used, nxt

    def forecast(self, ctx, previous_path: np.ndarray) -> Forecast:
        s = min(self.schedule.step, self.schedule.num_steps - 1)
        first = self.next_step[s + 1]
        index = np.minimum(np.where(np.isfinite(first), first + 1, self.schedule.num_steps + 1), self.schedule.num_steps + 1)
        second = np.take_along_axis(self.next_step, index[None].astype(np.int64), axis=0)[0]
        later = np.stack([first - s, second - s])
        return Forecast(self.used[s].astype(np.float64), later, exhaustive=True)


class GateOracle:
    """Gate-ahead right with probability ``keep``: at layer l, layer l+1's blurred experts of the step."""

    def __init__(self, schedule: TraceSchedule, keep: float, seed: int = 1) -> None:
        self.schedule = schedule
        self.name = f"gate-oracle:{keep:g}"
        self.paths = blur(schedule.paths, schedule.num_experts, keep, seed)

    def picks(self, layer: int) -> np.ndarray:
        return np.unique(self.schedule.experts(paths=self.paths)[:, :, layer + 1])


def parse_forecast(spec: str) -> tuple[str, float]:
    """``history``, ``oracle``, ``noisy-oracle:R`` or ``gate-oracle:R`` -> (kind, R)."""
    kind, _, rate = spec.partition(":")
    if kind in ("history", "oracle") and not rate:
        return kind, 1.0
    if kind in ("noisy-oracle", "gate-oracle"):
        try:
            value = float(rate)
        except ValueError:
            raise ValueError(f"'{spec}' needs an accuracy, like {kind}:0.8") from None
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"the accuracy of '{spec}' must be between 0 and 1")
        return kind, value
    raise ValueError(f"unknown predictor '{spec}'; use history, oracle, noisy-oracle:R or gate-oracle:R")
