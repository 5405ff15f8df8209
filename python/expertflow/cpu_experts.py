"""Cold experts computed on the CPU, where their weights already are, when that beats copying them.

A missed expert costs a copy over the link (a Mixtral-8x7B expert: 6.4 ms at 55 GB/s). The CPU can
compute the same expert for a token or two from the pinned pool, with no copy at all. With both
running at once, a layer's misses have two pipes instead of one: while the link copies one expert,
the CPU computes another. Whether that pays depends on the machine, so it is measured, not assumed.

- :class:`Calibration` (:func:`calibrate`): the link's time per expert, the CPU's time per expert
  for 1 to 256 tokens, and the GPU's time per resident expert. Measured once at load on the
  model's own first layer's experts (the 10 s budget is ample), cached per machine, model shape and format in
  ``$EXPERTFLOW_CACHE_DIR`` (default ``~/.cache/expertflow``) / ``calibration.json``.
- :class:`CostModel`: per layer, which of the missed experts go to the CPU: the split whose later
  pipe finishes first, the link copying its misses one after another (each then computed on the
  GPU) and the CPU computing its own one after another. Hits always compute on the GPU. Prefill,
  with many tokens per expert, copies; decode sends a lone miss, or a second or third, to the CPU
  when the CPU is fast enough. Both pipes are priced
  at what they take inside steps: the CPU's times are the calibration's scaled by what CPU experts
  then take, plus how much that strays (per calibration point, and apart for layers with and
  without demand loads: :meth:`CostModel.observe`), a copy's by what demand loads take on the link
  (timed by the runtime, :meth:`CostModel.observe_link`).
- Backfill: a CPU expert enters the cache behind its layer while the link has room
  (:meth:`~expertflow.runtime.ExpertCache.backfill`), so the cache evolves as if the GPU had run it
  and the link, which the CPU's misses would leave idle at decode, keeps copying off the layer's
  critical path. A CPU expert that was not backfilled may miss again at its next use, where the
  CPU may take it again: the layer's choice prices only the layer's own finish time. (Pricing a
  CPU expert's lost later hit at a whole copy sent too few misses to the CPU: measured on the H200
  machine, docs/cpu_experts.md.)
- Prefetches only what the GPU will run: where the policy's plan names each expert's later uses,
  the engine leaves out of it the forecast misses whose copies would land late and that the cache
  would not keep until their next use, as many a visit as the CPU computes within one copy
  (:meth:`CostModel.misses_left_to_cpu`); the CPU computes them at their layer.
- :class:`CpuExecutor`: one worker thread that runs the CPU's experts in the order given while the
  GPU works; on the host backend (no GPU to overlap) it runs them inline. Their bf16 products go to
  :class:`HostLinear` (``torch.get_num_threads()`` threads), other dtypes to torch's CPU kernels.
- :class:`HostLinear`: ``F.linear`` for bf16 with ExpertFlow's native kernel (``host_linear.h``). At
  decode an expert's products are matrix-vector products bound by host memory; on the H200 machine
  torch's bf16 kernel read a cold Mixtral expert at 55-63 GB/s, the native one at 134. torch
  splits the rows statically, so one thread that loses its core to the thread launching the GPU's
  kernels holds up the product; the native kernel deals the rows out in chunks as threads come free.

Modes: ``"off"`` (the default); ``"on"`` (every miss to the CPU); ``"auto"`` (the cost model, where
the calibration says the CPU can ever win a miss, else off, with the reason logged).

Numerics: the CPU's bf16 kernels round differently from the GPU's, and which misses go to the CPU
depends on what the cache holds at that moment (prefetches in flight included) and on the CPU times
measured in earlier steps (:meth:`CostModel.observe`), so it can change from run to run. On a GPU the
tokens can differ from ``all_gpu``'s where two candidates nearly tie; fp32 on the host backend is
bit-identical. That is why ``auto`` is opt-in.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import operator
import os
import platform
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from . import _C
from .files import atomic_output
from .timing import median_ms

__all__ = ["CPU_EXPERT_MODES", "Calibration", "CostModel", "CpuExecutor", "HostLinear", "calibrate", "check_mode", "check_threads", "default_threads"]

log = logging.getLogger("expertflow")
T = TypeVar("T")

CPU_EXPERT_MODES = ("off", "auto", "on")
# Bumped when the calibration measures differently, so older cached entries are measured over. 2: each
# timed call reads another expert; bf16 products run on the native kernel up to the token count where
# it stops being the faster of the two. 3: a point at 2 tokens. 4: timed on the executor's worker thread,
# with its thread count. 5: a gated SiLU expert timed as one native call (HostLinear.gated_silu).
_CALIBRATION_VERSION = 5
# CPU time is measured at these token counts: decode's few (bound by reading the weights) up to
# prefill's many (bound by arithmetic), so the cost model sees where the CPU stops paying. 2: on the
# H200 machine the native kernel took 2.6 ms for 1 and 2 tokens and 10.5 ms for 4 (torch's 6.1).
_TOKEN_COUNTS = (1, 2, 4, 16, 64, 256)


def check_mode(mode: str, distributed: bool = False) -> str:
    """``mode`` if it is one, and allowed: ``on`` does not combine with experts spread over GPUs."""
    if mode not in CPU_EXPERT_MODES:
        raise ValueError(f"cpu_experts must be one of {', '.join(CPU_EXPERT_MODES)}, got '{mode}'")
    if distributed and mode == "on":
        raise ValueError("cpu_experts='on' does not combine with distributed=True (each GPU computes its share); "
                         "use 'off' or 'auto'")
    return mode


@dataclass(frozen=True)
class Calibration:
    """What one expert costs on this machine, in milliseconds."""

    copy_ms: float  # the link: one expert's stored bytes, pinned host memory to a slot
    cpu_tokens: tuple[int, ...]  # the CPU computed an expert for these token counts ...
    cpu_times_ms: tuple[float, ...]  # ... in these times (expansion included), on the kernel serving each
    gpu_ms: float  # the compute device, one resident expert for one token (the host backend: the CPU)
    cpu_threads: int
    seconds: float  # how long the measurement took
    native_max_tokens: int = 0  # HostLinear computes experts of up to this many tokens; torch the rest
    torch_times_ms: tuple[float, ...] = ()  # torch's kernel at every point, where the native one was measured

    def cpu_ms(self, num_tokens: int) -> float:
        """Piecewise linear through the measured points of the kernel that serves ``num_tokens``, and
        along the last segment beyond them: a few tokens cost the time to read the weights (flat),
        many cost their arithmetic (linear)."""
        ns = self.cpu_tokens
        ts = self.torch_times_ms if num_tokens > self.native_max_tokens and self.torch_times_ms else self.cpu_times_ms
        if num_tokens <= ns[-1] or len(ns) < 2:
            return float(np.interp(num_tokens, ns, ts))
        slope = (ts[-1] - ts[-2]) / (ns[-1] - ns[-2])
        return ts[-1] + slope * (num_tokens - ns[-1])

    @classmethod
    def from_json(cls, entry: dict) -> Calibration:
        return cls(**{**entry, **{k: tuple(entry[k]) for k in ("cpu_tokens", "cpu_times_ms", "torch_times_ms") if k in entry}})

    def describe(self) -> str:
        points = ", ".join(f"{t:.1f} ms for {n}" for n, t in zip(self.cpu_tokens, self.cpu_times_ms))
        return (f"copy {self.copy_ms:.2f} ms per expert, CPU {points} tokens ({self.cpu_threads} threads, "
                f"native kernel up to {self.native_max_tokens} tokens), GPU {self.gpu_ms:.3f} ms")


class CostModel:
    """Chooses, per layer, which missed experts the CPU computes (see the module docstring)."""

    # A layer's CPU experts run either with demand loads of the same layer beside them (some misses
    # copied) or without (every miss on the CPU; backfills may still run on the link): cpu_scales[case].
    WITHOUT_DEMAND_LOADS, WITH_DEMAND_LOADS = 0, 1
    # Misses whose every split is priced where their copies are at different stages (2^m plans; a
    # Mixtral layer has 8 experts, batch 1 decode misses at most 2).
    MAX_SPLITS_PRICED = 10

    def __init__(self, calibration: Calibration, mode: str) -> None:
        self.calibration = calibration
        self.mode = check_mode(mode)
        # The CPU's time inside a step over its calibrated time, per case (above) and calibration point
        # (an expert is priced at the nearest point, in log tokens, of those its kernel serves):
        # [case][point]. The launching thread, the copies and the CPU's own threads share the cores
        # and host memory there, which the calibration (alone on the machine) does not see, and
        # experts of different sizes feel it differently: the native kernel deals its rows out as
        # threads come free, torch's splits them statically (one thread that loses its core holds
        # up the product), and a few tokens are bound by reading the weights, many by arithmetic.
        # On the H200 machine one scale for all let batch-16 decode's 4-token experts price its
        # prompt's 64-token ones, which then ran late. And the two cases differ: with one scale the
        # model learnt only the CPU beside the copies its own splits made (1.2 at one token in
        # `auto`) while `on`, every miss on the CPU, saw 0.9. Each observation moves a scale a fifth
        # of the way.
        num_points = len(calibration.cpu_tokens)
        self.cpu_scales = [[1.0] * num_points for _ in range(2)]
        # How far single experts stray from that scale (an average of |measured/calibrated - scale|):
        # [case][point]. The CPU is priced at scale + spread: its time varies with what else the host
        # does in the step (on the H200 machine torch's kernel ended prefill runs of one configuration
        # at 1.5 and 2.5 times its calibration), and a CPU expert late by that much holds up its
        # layer while one on time saves at most the copy it replaced. So a miss goes to the CPU only
        # where the CPU wins even when slow by its usual spread; a steady CPU pays little for this.
        self.cpu_spreads = [[0.0] * num_points for _ in range(2)]
        self._points: dict[int, int] = {}  # num_tokens -> its point (_point's memo)
        # num_tokens -> the calibrated time (_calibrated_ms's memo: choose runs at every layer with
        # misses, between its routing and its loads, on the thread that launches the GPU's work)
        self._calibrated: dict[int, float] = {}
        # The link's time per copy inside a step over its calibrated time: there a copy runs beside
        # prefetch chunks and the CPU's reads of host memory (on the H200 machine 49-51 GB/s against
        # 55 alone), timed by the runtime on the demand stream (observe_link).
        self.link_scale = 1.0
        # observe() runs on the executor's worker thread, choose() on the thread running the model.
        self._lock = threading.Lock()

    def _point(self, num_tokens: int) -> int:
        """Which point of :attr:`cpu_scales` prices an expert of ``num_tokens``: the calibration point
        nearest in log tokens among those its kernel serves. (Where the native kernel won at every
        point, torch serves only experts past the last one, priced at that point's scales.)"""
        point = self._points.get(num_tokens)
        if point is None:
            c = self.calibration
            native = num_tokens <= c.native_max_tokens
            same_kernel = [i for i, n in enumerate(c.cpu_tokens) if (n <= c.native_max_tokens) == native]
            n = max(num_tokens, 1)  # nearest in log tokens: the least ratio, the lower point on a tie
            point = min(same_kernel or [len(c.cpu_tokens) - 1],
                        key=lambda i: max(c.cpu_tokens[i], n) / min(c.cpu_tokens[i], n))
            self._points[num_tokens] = point
        return point

    def _calibrated_ms(self, num_tokens: int) -> float:
        """:meth:`Calibration.cpu_ms`, memoised."""
        ms = self._calibrated.get(num_tokens)
        if ms is None:
            ms = self._calibrated[num_tokens] = self.calibration.cpu_ms(num_tokens)
        return ms

    def by_point(self, values: list[list[float]]) -> dict[str, dict[str, float]]:
        """:attr:`cpu_scales` or :attr:`cpu_spreads` as ``{case: {tokens: value}}``, the cases
        ``without_demand_loads`` and ``with_demand_loads``."""
        points = [str(n) for n in self.calibration.cpu_tokens]
        return {case: dict(zip(points, row)) for case, row in zip(("without_demand_loads", "with_demand_loads"), values)}

    def observe(self, num_tokens: int, ms: float, with_demand_loads: bool) -> None:
        """A CPU expert of ``num_tokens`` took ``ms`` inside a step, in a layer that also demand-loaded
        misses or not: the scale for that case and the expert's point (:meth:`_point`) moves a fifth
        of the way toward what the steps see, and its spread a fifth of the way toward this expert's
        distance from the scale."""
        calibrated = self._calibrated_ms(num_tokens)
        if calibrated > 0:
            case, point, ratio = int(with_demand_loads), self._point(num_tokens), ms / calibrated
            with self._lock:
                scales, spreads = self.cpu_scales[case], self.cpu_spreads[case]
                spreads[point] += 0.2 * (abs(ratio - scales[point]) - spreads[point])
                scales[point] += 0.2 * (ratio - scales[point])

    def observe_link(self, ms_per_copy: float | None) -> None:
        """Demand loads took ``ms_per_copy`` per expert inside a pass (their bytes over their time on
        the demand stream): the link's scale moves a fifth of the way toward it. ``None``: the pass
        timed none (every miss went to the CPU, or none missed), and the scale goes 2% of the way
        back to the calibration, so that a link once priced out is tried, and measured, again."""
        if ms_per_copy is None:
            self.link_scale += 0.02 * (1.0 - self.link_scale)
        elif self.calibration.copy_ms > 0 and ms_per_copy > 0:
            self.link_scale += 0.2 * (ms_per_copy / self.calibration.copy_ms - self.link_scale)

    def cpu_can_win(self, num_experts: int) -> bool:
        """Whether :meth:`choose` would ever send a miss to the CPU, at the calibrated costs: in its most
        favourable layer, every one of ``num_experts`` experts missed with one token each (the longest
        link queue)."""
        ones = [1.0] * len(self.calibration.cpu_tokens)
        return self.mode == "on" or (self.mode == "auto" and any(
            self._split([1] * num_experts, [ones, ones], self.calibration.copy_ms)[0]))

    def _prices(self) -> list[list[float]]:
        """What the CPU is priced at over its calibration, ``[case][point]``: the in-step scale plus
        its spread (see :attr:`cpu_scales`)."""
        with self._lock:
            return [[scale + spread for scale, spread in zip(scales, spreads)]
                    for scales, spreads in zip(self.cpu_scales, self.cpu_spreads)]

    def copy_ms(self) -> float:
        """One expert's copy over the link, as inside steps (the calibration times the link's scale)."""
        return self.calibration.copy_ms * self.link_scale

    def misses_left_to_cpu(self, num_tokens: int) -> int:
        """How many forecast misses of one layer visit, each of up to ``num_tokens`` tokens and none
        of which the cache would keep until its next use, are left to the CPU rather than copied
        ahead (the engine leaves them out of the plan's prefetches): 0 unless the mode is ``auto``
        and the CPU computes such an expert sooner than the link copies it; else as many as the CPU
        computes, one after another, within one copy. Priced as :meth:`choose` prices
        them: the calibration times the in-step scale plus spread, the worse of the two cases.

        A copy the cache will not keep until its next use serves that one use and buys no later
        hit, and where misses wait on the link its milliseconds hold up every copy queued behind it
        (a Mixtral expert: 6.4 ms to copy, about 3 on the CPU at decode). Left to the CPU, it also
        takes no slot ahead of its use, so evicts nothing; at its layer :meth:`choose` prices it as
        any miss."""
        if self.mode != "auto" or num_tokens < 1:
            return 0
        point = self._point(num_tokens)
        cpu_ms = self._calibrated_ms(num_tokens) * max(case[point] for case in self._prices())
        copy_ms = self.copy_ms()
        return int(copy_ms // cpu_ms) if 0 < cpu_ms < copy_ms else 0

    def _split(self, num_tokens: list[int], prices: list[list[float]], copy_ms: float,
               copy_shares: list[float] | None = None) -> tuple[list[bool], set[tuple[int, int]]]:
        """The split of the misses (``num_tokens [m]``) that costs least -> (``[m]`` True for the CPU,
        the (case, point) prices some candidate plan used).

        A plan costs the later of its two pipes: the link copies its misses one after another (each
        ``copy_shares[i]`` times ``copy_ms``: the share left of a copy already on its way, default 1
        as for a demand miss; then the GPU computes); the CPU computes its own one after another,
        each at its calibrated time times ``prices[case][point]``, the case being whether any miss
        is copied. With one share for all the link's time depends only on how many it copies, so
        the cheapest k CPU experts are the k quickest on the CPU and the plan is the best k from 0
        to m. With shares that differ, every split is priced (up to :attr:`MAX_SPLITS_PRICED`
        misses; beyond, the CPU takes the k that cost it least per millisecond of link they save).
        The fewer CPU experts on a tie."""
        c = self.calibration
        m = len(num_tokens)

        def cpu_ms(n: int, case: int) -> float:
            return self._calibrated_ms(n) * prices[case][self._point(n)]

        shares = copy_shares if copy_shares is not None else [1.0] * m
        link = [copy_ms * share for share in shares]
        with_loads = [cpu_ms(n, self.WITH_DEMAND_LOADS) for n in num_tokens]
        without_loads = sum(cpu_ms(n, self.WITHOUT_DEMAND_LOADS) for n in num_tokens)
        # Every expert was priced without demand loads (the plan with all on the CPU); with them, each
        # that some plan gives the CPU beside a copy.
        priced = {(self.WITHOUT_DEMAND_LOADS, self._point(n)) for n in num_tokens}
        if 1 < m <= self.MAX_SPLITS_PRICED and len(set(shares)) > 1:
            masks = _splits(m)  # [2^m, m], fewer CPU experts first
            on = masks.astype(np.float64)
            link_ms = (1.0 - on) @ np.asarray(link) + c.gpu_ms
            costs = np.maximum(link_ms, on @ np.asarray(with_loads))
            costs[-1] = without_loads  # all on the CPU: no demand load beside them
            priced |= {(self.WITH_DEMAND_LOADS, self._point(n)) for n in num_tokens}
            return masks[int(np.argmin(costs))].tolist(), priced
        # the link takes the first m - k (a cost per link millisecond: with one share, the CPU's time)
        order = sorted(range(m), key=lambda i: -with_loads[i] / link[i] if link[i] > 0 else -math.inf)
        best_k, best_cost = 0, sum(link) + (c.gpu_ms if m else 0.0)
        link_left = sum(link)  # the link's misses: all but the k the CPU takes
        cpu_with_loads = 0.0  # the CPU's k, with demand loads beside them
        for k in range(1, m + 1):
            i = order[m - k]
            if k < m:
                link_left -= link[i]
                cpu_with_loads += with_loads[i]
                cost = max(link_left + c.gpu_ms, cpu_with_loads)
            else:
                cost = without_loads
            if cost < best_cost:
                best_k, best_cost = k, cost
        on_cpu = [False] * m
        for i in order[m - best_k :]:
            on_cpu[i] = True
        priced |= {(self.WITH_DEMAND_LOADS, self._point(num_tokens[i])) for i in order[1:]}
        return on_cpu, priced

    def choose(self, num_tokens: list[int], copy_shares: list[float] | None = None) -> list[bool]:
        """``num_tokens [m]``: tokens of each missed expert; ``copy_shares [m]``: what the link still
        has to carry of each, in whole copies (default 1: a demand miss; less for one whose copy is on
        its way) -> ``[m]`` True where the CPU computes it: the split that finishes the layer first.
        A CPU expert that is not backfilled may miss again at its next use; that miss, too, goes to
        the cheaper pipe then, so it is not priced here. (Priced at a whole copy, times whether the
        cache would keep the expert, it sent too few misses to the CPU: on the H200 machine at 25%
        slots, in the same rounds, 1.36-1.43x of GPU-only's speed with the history forecast and
        1.25-1.29x with the true future 80% right, against 1.48-1.51x and 1.40-1.46x without it;
        docs/cpu_experts.md.)

        Only the CPU experts a plan runs are observed, so a price that keeps the CPU out would never
        be measured again: each (case, point) a candidate plan of this layer priced but the chosen
        one did not run goes 1% of the way back to the calibration (scale 1, spread 0), and the CPU
        is tried again now and then, and kept where it has become faster. Near a tie that costs a
        few layers in a hundred sent to the slower pipe, each by about the tie's margin."""
        if self.mode == "on":
            return [True] * len(num_tokens)
        if self.mode == "off":
            return [False] * len(num_tokens)
        on_cpu, priced = self._split(num_tokens, self._prices(), self.copy_ms(), copy_shares)
        ran_case = self.WITHOUT_DEMAND_LOADS if all(on_cpu) else self.WITH_DEMAND_LOADS
        ran = {(ran_case, self._point(n)) for n, cpu in zip(num_tokens, on_cpu) if cpu}
        with self._lock:
            for case, point in priced - ran:
                self.cpu_scales[case][point] += 0.01 * (1.0 - self.cpu_scales[case][point])
                self.cpu_spreads[case][point] *= 0.99
        return on_cpu


@functools.cache
def _splits(m: int) -> np.ndarray:
    """``[2^m, m]`` bool: every split of m misses (True: the CPU), fewer CPU experts first, so the
    first least cost is the one with fewest."""
    masks = ((np.arange(1 << m)[:, None] >> np.arange(m)[None, :]) & 1).astype(bool)
    return masks[np.argsort(masks.sum(axis=1), kind="stable")]


class HostLinear:
    """``F.linear(x, w)`` on the host's cores: bf16 ``x [n, in]`` with ``n <= max_tokens`` and contiguous
    ``w [out, in]`` with the native kernel (fp32 sums, one rounding to bf16 per output, as torch's),
    anything else with ``F.linear``. ``isa`` names the kernel: ``avx512bf16``, ``avx512`` or
    ``portable``. The calibration sets ``max_tokens`` to where the native kernel stops being faster
    (it reads the weights once, which wins at decode's few tokens; torch's blocked GEMM wins at more)."""

    def __init__(self, num_threads: int, isa: str = "best", max_tokens: int | None = None) -> None:
        self._kernel: _C.HostLinear | None = _C.HostLinear(num_threads, isa)
        self.isa = self._kernel.isa
        self.num_threads = num_threads
        self.max_tokens = max_tokens  # None: no limit

    def _serves(self, x: torch.Tensor, *weights: torch.Tensor) -> bool:
        """Whether the native kernel takes ``x [n, in]`` against ``weights``: ``n`` from 1 to
        ``max_tokens``, every tensor bf16 on the host, the weights 2-D, contiguous and not empty, no
        autograd (the caller checks that the shapes fit each other, and that the kernel is open)."""
        tensors = (x, *weights)
        return (x.dim() == 2 and x.shape[0] > 0 and (self.max_tokens is None or x.shape[0] <= self.max_tokens)
                and all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in tensors)
                and all(w.dim() == 2 and w.is_contiguous() and w.numel() > 0 for w in weights)
                and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)))

    def __call__(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        kernel = self._kernel
        if kernel is None or not self._serves(x, w) or x.shape[1] != w.shape[1]:
            return F.linear(x, w)  # also raises torch's errors for shapes that do not fit, and keeps autograd
        x = x.contiguous()
        y = torch.empty(x.shape[0], w.shape[0], dtype=torch.bfloat16, device="cpu")
        kernel.linear_bf16(x.data_ptr(), w.data_ptr(), y.data_ptr(), x.shape[0], x.shape[1], w.shape[0])
        return y

    def gated_silu(self, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, out: torch.Tensor | None = None,
                   signal: _C.HostSignal | None = None) -> torch.Tensor | None:
        """A whole gated SiLU expert, ``(silu(g) * u) @ down.T`` with ``[g | u] = x @ gate_up.T``, in one
        native call: ``x [n, hidden]``, ``gate_up [2 * inter, hidden]`` (the gate's rows first), ``down
        [hidden, inter]``, all bf16 on the host -> ``[n, hidden]`` bf16 (``out``, contiguous bf16 of that
        shape, where given), or None where the native kernel does not take it (another dtype or layout,
        more than ``max_tokens`` tokens, autograd, closed): then the caller composes the expert from
        :meth:`__call__` and torch's ops, and ``signal`` is not set. Both products and the roundings
        between them are what that composition gives (``host_linear.h``), but the thread never takes
        Python's lock back between them, and ``signal`` is set once the result is written, before
        this thread has the lock back: a GPU stream waiting for it does not wait for Python too."""
        kernel = self._kernel
        if (kernel is None or not self._serves(x, gate_up, down) or gate_up.shape[0] % 2
                or gate_up.shape[1] != x.shape[1] or tuple(down.shape) != (x.shape[1], gate_up.shape[0] // 2)
                or (out is not None and (tuple(out.shape) != tuple(x.shape) or out.dtype != torch.bfloat16
                                         or out.device.type != "cpu" or not out.is_contiguous()))):
            return None
        x = x.contiguous()
        n, hidden, inter = x.shape[0], x.shape[1], gate_up.shape[0] // 2
        y = torch.empty(n, hidden, dtype=torch.bfloat16) if out is None else out
        scratch = torch.empty(3 * n * inter, dtype=torch.bfloat16)
        kernel.gated_silu_expert_bf16(x.data_ptr(), gate_up.data_ptr(), down.data_ptr(), y.data_ptr(), scratch.data_ptr(),
                                      n, hidden, inter, signal)
        return y

    def close(self) -> None:
        """Joins the kernel's threads; later calls use ``F.linear``."""
        if self._kernel is not None:
            self._kernel.close()
            self._kernel = None


MAX_THREADS = 4096  # the native kernel's bound (HostLinear)


def check_threads(num_threads: int | None, mode: str = "auto") -> int | None:
    """``num_threads`` as an int if it is None (the default) or a positive count of CPU threads, and
    ``mode`` (``cpu_experts``) may send experts to the CPU."""
    if num_threads is None:
        return None
    try:
        count = operator.index(num_threads) if not isinstance(num_threads, bool) else 0
    except TypeError:
        count = 0
    if not 1 <= count <= MAX_THREADS:
        raise ValueError(f"cpu_threads must be a number of threads from 1 to {MAX_THREADS} (or None: torch's), "
                         f"got {num_threads!r}")
    if mode == "off":
        raise ValueError("cpu_threads applies to cpu_experts 'auto' or 'on', not 'off'")
    return count


def _own_threads(num_threads: int) -> None:
    """The calling thread's torch threads become ``num_threads`` (its OpenMP team's count, per thread):
    set, then read, which fixes the count there before the process-wide one changes back."""
    torch.set_num_threads(num_threads)
    torch.get_num_threads()


def default_threads(asynchronous: bool) -> int:
    """The CPU experts' threads: torch's (``torch.get_num_threads()``), and beside a GPU (``asynchronous``)
    at most one fewer than the cores this process may use. The thread launching the GPU's work spins
    in its waits for the GPU and takes a core; torch's kernels split their work statically, so one of
    their threads sharing that core holds up the whole product (measured: docs/cpu_experts.md,
    "Threads")."""
    threads = torch.get_num_threads()
    if not asynchronous:
        return threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(threads, cores - 1))


class CpuExecutor:
    """Runs CPU experts one after another on a worker thread (``asynchronous``) or inline; ``linear``
    is their products' kernel (:class:`HostLinear`).

    ``num_threads``: the native kernel's threads, and on the worker thread torch's too. Inline, torch's
    kernels keep the caller's threads. By default (:func:`default_threads`) the worker leaves a core
    to the thread launching the GPU's work."""

    def __init__(self, asynchronous: bool, num_threads: int | None = None) -> None:
        self.num_threads = check_threads(num_threads) or default_threads(asynchronous)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="expertflow-cpu", initializer=_own_threads,
                                        initargs=(self.num_threads,)) if asynchronous else None
        if self._pool is not None:
            # torch.set_num_threads also sets the count that threads take at their first torch call;
            # once the worker holds its own, that goes back to what the caller had.
            caller = torch.get_num_threads()
            self._pool.submit(lambda: None).result()
            torch.set_num_threads(caller)
        try:
            self.linear = HostLinear(self.num_threads)
        except BaseException:  # no worker left behind
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            raise

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        if self._pool is not None:
            return self._pool.submit(fn)
        done: Future[T] = Future()
        done.set_result(fn())
        return done

    def run(self, fn: Callable[[], T]) -> T:
        """``fn()`` where the CPU's experts run (the worker thread, with its thread count), waited for."""
        return self.submit(fn).result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self.linear.close()


def _cache_file() -> Path:
    root = os.environ.get("EXPERTFLOW_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "expertflow"
    return Path(root) / "calibration.json"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def calibrate(compute: Callable[..., torch.Tensor],
              experts: Sequence[dict[str, torch.Tensor]],
              expand: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
              hidden_size: int, dtype: torch.dtype, device: torch.device, shape_key: str,
              recalibrate: bool = False, linear: HostLinear | None = None,
              executor: CpuExecutor | None = None) -> Calibration:
    """Measures (or reads from the per-machine cache) what one expert costs, and sets
    ``linear.max_tokens`` from it.

    ``compute(weights, x [n, hidden], linear)``: the layer's expert arithmetic, as the executor runs it
    with ``linear`` as its product. With a :class:`HostLinear` (pass one only where ``compute`` uses
    it) and bf16, the points are measured with torch's kernel and with the native one, up to the first
    point where the native one loses; it then serves from one token up to the last point it won.
    ``experts``: a few experts' tensors in the pool (pinned host memory, their storage format); each
    timed call takes the next, so that the CPU reads its expert from memory as in a step, not from a
    cache that one expert would fit (the H200 machine's CPU has 300 MB of L3, a Mixtral expert 352 MB).
    ``expand(tensors)``: dense weights from stored tensors, on their device. ``shape_key`` names the
    model shape and format. ``executor``: the CPU's times are measured where it runs its experts (its
    worker thread, with its thread count); without one, on the calling thread.
    """
    if not experts:
        raise ValueError("calibrate needs at least one expert")
    threads = (executor.num_threads if executor is not None else
               linear.num_threads if linear is not None else torch.get_num_threads())
    run: Callable[[Callable[[], float]], float] = executor.run if executor is not None else (lambda fn: fn())
    torch_threads = executor.run(torch.get_num_threads) if executor is not None else torch.get_num_threads()
    both_kernels = linear is not None and dtype == torch.bfloat16
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "host"
    threads_text = f"{threads} threads" + ("" if torch_threads == threads else f" (torch {torch_threads})")
    key = (f"{_cpu_name()} | {threads_text} | {device_name} | {shape_key} | {str(dtype).removeprefix('torch.')}"
           f" | {'native and torch' if both_kernels else 'torch'} | v{_CALIBRATION_VERSION}")
    path = _cache_file()
    cached: dict[str, dict] = {}
    if path.exists():
        try:
            cached = json.loads(path.read_text())
        except (OSError, ValueError):
            log.warning("ignoring an unreadable calibration cache %s", path)
        if not isinstance(cached, dict):
            log.warning("ignoring a calibration cache %s that is not a JSON object", path)
            cached = {}
    if not recalibrate and key in cached:
        try:
            calibration = Calibration.from_json(cached[key])
        except (TypeError, KeyError):
            pass  # written by another version, or not an entry: measure again
        else:
            if linear is not None:
                linear.max_tokens = calibration.native_max_tokens
            return calibration
    started = time.perf_counter()
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    turn = itertools.cycle(experts)

    def on_cpu(x: torch.Tensor, product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():  # grad mode is per thread: this may run on the executor's
            return compute(expand(next(turn)), x, product)  # as the executor runs it: expansion included

    def later_minimum(times: list[float]) -> list[float]:
        """More tokens never cost less. Timing noise only adds time, so a point above a later one is
        noise: each takes the least of itself and the points after it. (A slow first point once
        lifted the whole curve, 14.7 ms at 1 to 64 tokens where 5.8 ms was right, and turned auto off.)"""
        return np.minimum.accumulate(times[::-1])[::-1].tolist() if times else []

    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        native = linear if both_kernels else None  # timed until the first point where it loses
        if native is not None:
            native.max_tokens = None  # what is timed as native must be native
        torch_ms: list[float] = []
        native_ms: list[float] = []
        for n in _TOKEN_COUNTS:
            x = (torch.randn(n, hidden_size, generator=g) * 0.1).to(dtype)
            torch_ms.append(run(functools.partial(median_ms, functools.partial(on_cpu, x, F.linear), reps=5)))
            if native is not None:
                native_ms.append(run(functools.partial(median_ms, functools.partial(on_cpu, x, native), reps=5)))
                if native_ms[-1] >= torch_ms[-1]:
                    native = None
        torch_ms, native_ms = later_minimum(torch_ms), later_minimum(native_ms)
        native_points = 0  # the native kernel serves the first native_points points
        while native_points < len(native_ms) and native_ms[native_points] < torch_ms[native_points]:
            native_points += 1
        samples = native_ms[:native_points] + torch_ms[native_points:]
        native_max_tokens = _TOKEN_COUNTS[native_points - 1] if native_points else 0
        raws = itertools.cycle([[t.view(torch.uint8).reshape(-1) for t in stored.values()] for stored in experts])
        targets = [torch.empty_like(t, device=device) for t in next(raws)]

        def copy() -> None:
            for src, dst in zip(next(raws), targets):
                dst.copy_(src, non_blocking=True)

        copy_ms = median_ms(copy, reps=3, sync=sync)
        if device.type == "cuda":  # a resident expert: expanded from its slot, then computed
            on_device = {k: v.to(device) for k, v in experts[0].items()}
            x = torch.zeros(1, hidden_size, dtype=dtype, device=device)
            gpu_ms = median_ms(lambda: compute(expand(on_device), x, F.linear), reps=5, sync=sync)
        else:
            gpu_ms = samples[0]
    calibration = Calibration(copy_ms, _TOKEN_COUNTS, tuple(samples), gpu_ms, threads, time.perf_counter() - started,
                              native_max_tokens, tuple(torch_ms) if both_kernels else ())
    if linear is not None:
        linear.max_tokens = native_max_tokens
    cached[key] = asdict(calibration)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as tmp:
            tmp.write_text(json.dumps(cached, indent=1))
    except OSError as e:
        log.warning("could not cache the calibration in %s: %s", path, e)
    return calibration
