"""Offload policies: which prefetch plan each step gets, and which cache policy evicts.

All run on the same engine and cache, so comparisons between them are fair.

| name | eviction | prefetch |
|---|---|---|
| ``all_gpu`` | none: every expert resident (the reference) | all experts, once, at load |
| ``lru`` | per-layer LRU (slots split evenly over layers) | none: demand loads only (mixtral-offloading, Cache-MoE style) |
| ``next_layers`` | LRU | every expert of the next two layers (SE-MoE style) |
| ``gate_ahead`` | LRU | the next layer's router applied to this layer's hidden state: its top-k |
| ``lru_with_correction`` | lowest plan priority, then LRU; wrong prefetches demoted | gate-ahead plans |
| ``expertflow`` (default) | lowest plan priority, then farthest estimated next use; wrong prefetches demoted | the routing-path predictor's plan for every layer at each step's start (the previous token's path without a predictor), refined by gate-ahead as layers run |
"""

from __future__ import annotations

from collections import Counter

import torch

from .predictor import PLAN_THRESHOLD, combine, path_multi_hot

__all__ = ["POLICY_NAMES", "make_policy", "Policy"]


class Policy:
    name = "base"
    cache_policy = "lru"

    def attach(self, engine) -> None:
        """Called once the engine exists."""

    def after_acquire(self, engine, layer, hidden_states: torch.Tensor, routing: torch.Tensor) -> None:
        """Called when ``layer``'s experts are acquired, before they compute: plan what comes next.

        ``hidden_states [T, H]`` is the layer's input, ``routing`` its router's choice (``[T, k]``
        indices; Switch: the ``[T, 1, E]`` dispatch mask).
        """


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

    def after_acquire(self, engine, layer, hidden_states, routing) -> None:
        plan, priority, nxt = [], 2.0, layer.next
        while nxt is not None and priority > 0:
            plan += [(nxt.index, e, priority) for e in range(engine.pool.num_experts(nxt.index))]
            nxt, priority = nxt.next, priority - 1.0
        engine.cache.prefetch(plan)


class GateAhead(Policy):
    name = "gate_ahead"

    def after_acquire(self, engine, layer, hidden_states, routing) -> None:
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


class Expertflow(Policy):
    """PLEC: plan every layer before the step runs, correct and refine as routers speak.

    At each decode step's start (the input embedding's forward), the routing-path predictor scores
    every (layer, expert) for each sequence of the batch; without a predictor, the previous token's
    path stands in. The plan takes, per sequence and layer, the experts likely enough to be needed
    (``_layer_plan``), so slots go to layers in proportion to their predicted demand, at priorities
    that fall with the layer's distance, so copies go out in the order layers run. When a layer's
    router has spoken, its wrong prefetches are demoted (the cache policy), unfinished prefetches the
    new plan drops are cancelled, gate-ahead refines the next layer's scores, and the plan moves on to
    the remaining layers and then the next step's first layers (predicted by this step's path),
    reusing slots of finished layers.
    """

    name = "expertflow"
    cache_policy = "expertflow"

    def __init__(self, predictor=None) -> None:
        self.predictor = predictor
        self.scores: torch.Tensor | None = None  # [B, L, E] for the running step
        self.path: dict[int, torch.Tensor] = {}  # layer -> [B, k] experts of the running step's last tokens
        self.previous: dict[int, torch.Tensor] = {}  # layer -> [B, k] of the previous step
        self.position: torch.Tensor | None = None
        self.batch = 1
        self._hook = None

    def attach(self, engine) -> None:
        self.engine = engine
        self.num_experts = engine.pool.num_experts(0)
        self.top_k = engine.architecture.dims(engine.model.config)[1] if engine.model is not None else 1
        if engine.architecture.encoder_decoder or engine.model is None:
            return  # Switch: no step hook; plans come from history and gate-ahead
        if self.predictor is not None:
            embed_dim = engine.model.get_input_embeddings().embedding_dim
            if self.predictor.config.embed_dim != embed_dim or self.predictor.config.num_layers != engine.num_layers:
                raise ValueError("the predictor was trained for a model of another shape")
            self.predictor.to(next(engine.model.parameters()).device)
        self._hook = engine.model.get_input_embeddings().register_forward_hook(self._on_step)

    def detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _on_step(self, module, inputs, output) -> None:
        """A forward begins: predict this step's path for every sequence and plan all layers."""
        engine = self.engine
        ids = inputs[0]
        batch, length = ids.shape[0], ids.shape[-1]
        device = output.device
        if length > 1 or self.position is None or self.position.shape[0] != batch:
            self.position = torch.full((batch,), length - 1, device=device, dtype=torch.long)
            self.previous = {}
        else:
            self.position = self.position + 1
            self.previous = self.path
        self.path = {}
        self.batch = batch
        num_layers, num_experts = engine.num_layers, self.num_experts
        prev = torch.full((batch, num_layers, self.top_k), -1, dtype=torch.long, device=device)
        for l, experts in self.previous.items():
            prev[:, l] = experts
        prev_hot = path_multi_hot(prev, num_experts)
        with torch.no_grad():
            if self.predictor is not None:
                self.scores = torch.sigmoid(self.predictor(output[:, -1].float(), self.position, prev_hot))
            else:
                self.scores = prev_hot.view(batch, num_layers, num_experts)
        engine.cache.prefetch(self._plan(engine, -1))

    def after_acquire(self, engine, layer, hidden_states, routing) -> None:
        indices = routing.argmax(dim=-1) if routing.dim() == 3 else routing
        k = indices.shape[-1]
        batch = self.batch if indices.shape[0] % self.batch == 0 else 1
        self.path[layer.index] = indices.reshape(batch, -1, k)[:, -1]
        nxt = layer.next
        if nxt is not None and self.scores is not None:
            with torch.no_grad():
                guess = engine.architecture.router_top_k(nxt.router, hidden_states)
            guess = guess.reshape(batch, -1, guess.shape[-1])[:, -1]
            refined = combine(self.scores[:, nxt.index : nxt.index + 1], guess[:, None])
            self.scores = self.scores.clone()
            self.scores[:, nxt.index] = refined[:, 0]
        engine.cache.prefetch(self._plan(engine, layer.index))

    def _layer_plan(self, layer: int, scores: torch.Tensor | None, k: int, weight: float) -> list[tuple[int, int, float]]:
        """The experts ``layer`` is expected to need (scores ``[B, E]``): per sequence its top expert and,
        among its top 2k, those scoring at least ``PLAN_THRESHOLD``. Uncertain layers thus get more slots
        than confident ones. Priority: the summed score over the batch's sequences, times ``weight``."""
        if scores is None:
            return []
        top = scores.topk(min(2 * k, scores.shape[-1]), dim=-1)
        demand: Counter = Counter()
        for row, values in zip(top.indices.tolist(), top.values.tolist()):
            for rank, (e, v) in enumerate(zip(row, values)):
                if v > 0 and (rank == 0 or v >= PLAN_THRESHOLD):
                    demand[e] += v
        return [(layer, e, weight * d / scores.shape[0]) for e, d in demand.items()]

    def _plan(self, engine, current: int) -> list[tuple[int, int, float]]:
        num_layers = engine.num_layers
        wrap = not engine.architecture.encoder_decoder
        plan: list[tuple[int, int, float]] = []
        for d in range(1, num_layers + 1):
            target = current + d
            weight = (num_layers + 1 - d) / (num_layers + 1)
            if target < num_layers:
                scores = self.scores[:, target] if self.scores is not None else None
            elif wrap:
                target -= num_layers
                path = self.path.get(target)
                scores = None if path is None else path_multi_hot(path[:, None], self.num_experts)
            else:
                break
            plan += self._layer_plan(target, scores, self.top_k, weight)
            if len(plan) >= engine.cache.num_slots:
                break
        return plan[: engine.cache.num_slots]


_POLICIES = {p.name: p for p in (AllGpu, DemandLru, NextLayers, GateAhead, LruWithCorrection, Expertflow)}
POLICY_NAMES = tuple(_POLICIES)


def make_policy(name: str, predictor=None) -> Policy:
    if predictor is not None and name != "expertflow":
        raise ValueError(f"a routing-path predictor drives the expertflow policy only, not {name}")
    if name == "expertflow":
        return Expertflow(predictor)
    try:
        return _POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown offload policy '{name}'; choose one of {', '.join(POLICY_NAMES)}") from None
