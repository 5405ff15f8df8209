"""Offload policies: a typed :class:`Policy` protocol; each policy returns plans, the engine applies them.

All run on the same engine and cache, so comparisons between them are fair. The engine (live
generation, ``offload.py``) and trace replay (``replay.py``) drive a policy through the same calls:
``attach`` once, ``on_step`` when a forward pass begins, ``on_layer`` once each layer's router has
spoken; a returned :class:`~expertflow.planner.Plan` goes to the cache.

| name | eviction | prefetch |
|---|---|---|
| ``all_gpu`` | none: every expert resident (the reference) | all experts, once, at attach |
| ``lru`` | per-layer LRU (slots split evenly over layers) | none: demand loads only (mixtral-offloading style) |
| ``next_layers`` | LRU | every expert of the next two layers (SE-MoE style) |
| ``gate_ahead`` | LRU | the next layer's router applied to this layer's input: its picks |
| ``expertflow`` (default) | farthest predicted next use | trusted forecasts, admitted only when the expert they evict is needed later (``planner.py``) |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from .planner import Forecast, Plan, Planner

__all__ = ["POLICY_NAMES", "make_policy", "Policy", "EngineInfo", "StepContext", "StepPredictor", "GateSource",
           "HistoryPredictor", "Expertflow"]


@dataclass(frozen=True)
class EngineInfo:
    """The model a policy plans for."""

    num_layers: int
    num_experts: int
    num_slots: int
    top_k: int


@dataclass
class StepContext:
    """A forward pass begins.

    ``step``: passes so far; ``batch``: sequences in it; ``new_sequences``: the sequences start here (a
    prefill), so the previous step's path says nothing; ``embeddings [B, D]`` (live generation only):
    the input embedding of each sequence's last token, on the model's device; ``positions [B]``: that
    token's position (a device tensor in live generation); ``previous_path [B, L, k]`` int64: where a
    serving engine regroups sequences between steps, each sequence's own last path (-1: none), which
    replaces the policy's memory of the previous batch.
    """

    step: int
    batch: int = 1
    new_sequences: bool = False
    embeddings: object | None = None
    positions: object | None = None
    previous_path: np.ndarray | None = None


@runtime_checkable
class StepPredictor(Protocol):
    """Forecasts a step before it runs. ``previous_path [B, L, k]`` int64: the experts each sequence's
    last token used at each layer in the previous step (-1: none)."""

    # Read-only: implementations may define it as a property (``RoutingPathPredictor``) or an attribute.
    @property
    def name(self) -> str: ...

    def forecast(self, ctx: StepContext, previous_path: np.ndarray) -> Forecast: ...


@runtime_checkable
class GateSource(Protocol):
    """Gate-ahead without a router: the picks for layer ``layer + 1`` seen at layer ``layer`` of the
    running step (expert ids, any shape). The trace oracles emulate one (``oracles.GateOracle``)."""

    name: str

    def picks(self, layer: int) -> np.ndarray: ...


class Policy(Protocol):
    """What the engine asks of a policy. A returned plan replaces the previous one; None keeps it."""

    name: str
    #: the runtime's eviction order: ``lru``, ``lfu`` or ``expertflow`` (farthest predicted next use)
    cache_policy: str
    #: the engine computes the next layer's router on each layer's input and passes its picks
    gate_from_router: bool
    #: the engine calls ``on_step`` when each forward pass begins
    wants_steps: bool

    def attach(self, info: EngineInfo) -> Plan | None: ...

    def layer_quotas(self, info: EngineInfo) -> list[int] | None: ...

    def on_step(self, ctx: StepContext) -> Plan | None: ...

    def on_layer(self, layer: int, experts: np.ndarray, gate: np.ndarray | None) -> Plan | None:
        """``experts [T, k]`` (host int64): the router's choice for the layer's tokens; ``gate [T, k']``:
        the next layer's router on this layer's input, when ``gate_from_router``."""
        ...

    def close(self) -> None: ...


class _Base:
    name = "base"
    cache_policy = "lru"
    gate_from_router = False
    wants_steps = False

    def attach(self, info: EngineInfo) -> Plan | None:
        self.info = info
        return None

    def layer_quotas(self, info: EngineInfo) -> list[int] | None:
        return None

    def on_step(self, ctx: StepContext) -> Plan | None:
        return None

    def on_layer(self, layer: int, experts: np.ndarray, gate: np.ndarray | None) -> Plan | None:
        return None

    def close(self) -> None:
        pass


class AllGpu(_Base):
    name = "all_gpu"

    def attach(self, info: EngineInfo) -> Plan:
        super().attach(info)
        layers, experts = np.divmod(np.arange(info.num_layers * info.num_experts), info.num_experts)
        return Plan(layers.astype(np.int32), experts.astype(np.int32), layers.astype(np.float64))


class DemandLru(_Base):
    name = "lru"

    def layer_quotas(self, info: EngineInfo) -> list[int]:
        slots, layers = info.num_slots, info.num_layers
        return [slots // layers + (1 if l < slots % layers else 0) for l in range(layers)]


class NextLayers(_Base):
    name = "next_layers"

    def on_layer(self, layer: int, experts: np.ndarray, gate: np.ndarray | None) -> Plan:
        ahead = [l for l in (layer + 1, layer + 2) if l < self.info.num_layers]
        return Plan.prefetch_only([(l, e, l - layer) for l in ahead for e in range(self.info.num_experts)])


class GateAhead(_Base):
    """Prefetches the next layer's gate-ahead picks: from its router, or from ``gate`` (emulated)."""

    name = "gate_ahead"

    def __init__(self, gate: GateSource | None = None) -> None:
        self.gate = gate
        self.gate_from_router = gate is None

    def on_layer(self, layer: int, experts: np.ndarray, gate: np.ndarray | None) -> Plan:
        if layer + 1 >= self.info.num_layers:
            return Plan.prefetch_only([])
        if self.gate is not None:
            gate = self.gate.picks(layer)
        picks = np.unique(np.asarray(gate, dtype=np.int64)) if gate is not None else np.zeros(0, dtype=np.int64)
        return Plan.prefetch_only([(layer + 1, int(e), 1.0) for e in picks[picks < self.info.num_experts]])


class HistoryPredictor:
    """The previous step's path: an expert a sequence used at a layer is forecast again there."""

    name = "history"

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts

    def forecast(self, ctx: StepContext, previous_path: np.ndarray) -> Forecast:
        num_layers = previous_path.shape[1]
        probs = np.zeros((num_layers, self.num_experts))
        if not ctx.new_sequences:
            rows = np.broadcast_to(np.arange(num_layers)[None, :, None], previous_path.shape)
            valid = (previous_path >= 0) & (previous_path < self.num_experts)
            probs[rows[valid], previous_path[valid]] = 1.0
        return Forecast(probs)


class Expertflow(_Base):
    """Plans every layer before the step runs and corrects as routers speak (``planner.py``).

    At each forward pass the step predictor (default: the previous step's path) forecasts the step;
    after each layer the planner learns what its router chose, refines the next layer with gate-ahead
    (the next router on this layer's input, or an emulated ``gate``), and re-plans. Predictions it has
    not measured to be right at least ``confidence`` of the time change nothing.
    """

    name = "expertflow"
    cache_policy = "expertflow"
    wants_steps = True

    def __init__(self, predictor: StepPredictor | None = None, gate: GateSource | str | None = "router",
                 confidence: float = 0.5, prefetch_confidence: float = 0.9) -> None:
        self.predictor = predictor
        self.gate = gate if not isinstance(gate, str) else None
        self.gate_from_router = gate == "router"
        self.confidence = confidence
        self.prefetch_confidence = prefetch_confidence
        self.planner: Planner | None = None

    @property
    def label(self) -> str:
        """The forecasts this policy plans with, e.g. ``history``, ``predictor+router``."""
        parts = [self.predictor.name if self.predictor is not None else HistoryPredictor.name]
        if self.gate_from_router:
            parts.append("router")
        elif self.gate is not None:
            parts.append(self.gate.name)
        return "+".join(parts)

    def attach(self, info: EngineInfo) -> None:
        super().attach(info)
        self.planner = Planner(info.num_layers, info.num_experts, confidence=self.confidence,
                               prefetch_confidence=self.prefetch_confidence)
        self.predictor = self.predictor or HistoryPredictor(info.num_experts)
        self.path = np.full((1, info.num_layers, info.top_k), -1, dtype=np.int64)
        return None

    def on_step(self, ctx: StepContext) -> Plan:
        if ctx.previous_path is not None:
            self.path = ctx.previous_path.copy()
        elif ctx.new_sequences or self.path.shape[0] != ctx.batch:
            self.path = np.full((ctx.batch, self.info.num_layers, self.path.shape[2]), -1, dtype=np.int64)
            ctx.new_sequences = True
        predictor, planner = self._attached()
        forecast = predictor.forecast(ctx, self.path)
        return planner.begin_step(forecast, observe=not ctx.new_sequences)

    def on_layer(self, layer: int, experts: np.ndarray, gate: np.ndarray | None) -> Plan | None:
        batch, k = self.path.shape[0], self.path.shape[2]
        if experts.shape[0] % batch == 0 and experts.shape[1] == k:
            self.path[:, layer] = experts.reshape(batch, -1, k)[:, -1]
        if self.gate is not None and layer + 1 < self.info.num_layers:
            gate = self.gate.picks(layer)
        return self._attached()[1].layer_done(layer, experts, gate)

    def _attached(self) -> tuple[StepPredictor, Planner]:
        """The predictor and planner :meth:`attach` set up."""
        if self.predictor is None or self.planner is None:
            raise RuntimeError("the expertflow policy is not attached to an engine: call attach() first")
        return self.predictor, self.planner


_POLICIES = {p.name: p for p in (AllGpu, DemandLru, NextLayers, GateAhead, Expertflow)}
POLICY_NAMES = tuple(_POLICIES)


def make_policy(name: str, predictor: StepPredictor | None = None, gate: GateSource | str | None = None) -> Policy:
    """A policy by name. ``predictor`` (expertflow only) forecasts each step; ``gate`` (expertflow and
    gate_ahead) emulates gate-ahead instead of running the next router."""
    if name not in _POLICIES:
        raise ValueError(f"unknown offload policy '{name}'; choose one of {', '.join(POLICY_NAMES)}")
    if predictor is not None and name != "expertflow":
        raise ValueError(f"a routing-path predictor drives the expertflow policy only, not {name}")
    if gate is not None and name not in ("expertflow", "gate_ahead"):
        raise ValueError(f"gate-ahead applies to the expertflow and gate_ahead policies, not {name}")
    if name == "expertflow":
        return Expertflow(predictor, gate if gate is not None else "router")
    if name == "gate_ahead":
        if isinstance(gate, str) and gate != "router":  # GateAhead takes a source; None runs the next router
            raise ValueError(f"gate must be a gate-ahead source or 'router', not '{gate}'")
        return GateAhead(None if isinstance(gate, str) else gate)
    return _POLICIES[name]()
