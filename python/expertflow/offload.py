"""Offloaded experts: the module that replaces a model's routed experts, and the engine behind it.

For one MoE layer, :class:`OffloadedExperts` receives the router's choice, acquires the chosen experts
from the :class:`~expertflow.runtime.ExpertCache` (misses are demand-loaded at once), lets the policy
plan prefetches for later layers, computes the experts whose bytes have already landed first and
the rest as they land, and releases them. Tokens are grouped by expert, so a batch runs one matmul
chain per expert. The arithmetic is transformers' eager experts loop, accumulated in ascending expert
order, so outputs match the resident model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from .models import Architecture
from .runtime import ExpertCache, ExpertPool

__all__ = ["OffloadedExperts", "OffloadEngine", "MoELayer"]

log = logging.getLogger(__name__)


class OffloadedExperts(nn.Module):
    """Stands in for a routed-experts module; holds no weights.

    ``forward(hidden_states [num_tokens, hidden], top_k_index [num_tokens, k], top_k_weights
    [num_tokens, k]) -> [num_tokens, hidden]``; for Switch Transformers the second and third arguments
    are its one-hot dispatch mask ``[num_tokens, 1, num_experts]`` and weights ``[num_tokens, 1]``.
    """

    def __init__(self, config, architecture: Architecture) -> None:
        super().__init__()
        self.num_experts = architecture.dims(config)[0]
        self.act_fn = ACT2FN[architecture.activation(config)]
        self.gated = architecture.gated
        self.layer = -1
        self.engine: OffloadEngine | None = None

    def forward(self, hidden_states: torch.Tensor, routing: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.engine is None:
            raise RuntimeError("these experts are not attached to an ExpertFlow engine (was the model closed?)")
        with torch.no_grad():
            if self.gated:
                # [num_experts, k, num_tokens], as transformers' eager loop builds it
                expert_mask = F.one_hot(routing, num_classes=self.num_experts + 1).permute(2, 1, 0)[: self.num_experts]
            else:
                expert_mask = routing.permute(2, 1, 0)
        return self.engine.run_layer(self, hidden_states, expert_mask, weights, routing)

    def compute(self, weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """One expert on its tokens: ``x [n, hidden] -> [n, hidden]``."""
        if self.gated:
            gate, up = F.linear(x, weights["gate_up"]).chunk(2, dim=-1)
            return F.linear(self.act_fn(gate) * up, weights["down"])
        h = self.act_fn(F.linear(x, weights["wi"]))
        if h.dtype != weights["wo"].dtype:
            h = h.to(weights["wo"].dtype)
        return F.linear(h, weights["wo"])

    def extra_repr(self) -> str:
        return f"layer={self.layer}, num_experts={self.num_experts}, offloaded"


@dataclass
class MoELayer:
    index: int
    path: str  # module path of the experts module
    module: OffloadedExperts
    router: nn.Module
    next: MoELayer | None = field(default=None, repr=False)  # the next MoE layer of the same stack


class OffloadEngine:
    """Runs every offloaded layer of one model on one cache, under one policy.

    Available as ``model.expertflow``: :meth:`stats`, :meth:`reset_stats`, :meth:`close`.
    """

    def __init__(
        self,
        architecture: Architecture,
        layers: list[MoELayer],
        pool: ExpertPool,
        cache: ExpertCache,
        policy,
        owns_pool: bool = True,
        model: nn.Module | None = None,
    ) -> None:
        self.architecture = architecture
        self.model = model
        self.owns_pool = owns_pool
        self.layers = layers
        self.pool = pool
        self.cache = cache
        self.policy = policy
        for layer in layers:
            layer.module.engine = self
            layer.module.layer = layer.index
        policy.attach(self)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def run_layer(
        self,
        module: OffloadedExperts,
        hidden_states: torch.Tensor,
        expert_mask: torch.Tensor,
        weights: torch.Tensor,
        routing: torch.Tensor,
    ) -> torch.Tensor:
        """``hidden_states [T, H]``, ``expert_mask [E, k, T]``, ``weights [T, k]`` -> ``[T, H]``."""
        layer = self.layers[module.layer]
        experts = torch.nonzero(expert_mask.sum(dim=(-1, -2)) > 0).flatten().tolist()  # ascending
        outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # A batch may route to more experts than there are slots: run them in waves that fit.
        capacity = self.cache.num_slots
        for start in range(0, len(experts), capacity):
            wave = experts[start : start + capacity]
            slots = self.cache.acquire_slots(layer.index, wave, wait=False)
            if start == 0:
                self.policy.after_acquire(self, layer, hidden_states, routing)
            # Experts whose bytes have landed first; misses as they land.
            for i in sorted(range(len(wave)), key=lambda i: not self.cache.slot_ready(slots[i])):
                self.cache.wait_slot(slots[i])
                top_k_pos, token_idx = torch.where(expert_mask[wave[i]])
                y = module.compute(self.cache.slot_tensors(slots[i], layer.index), hidden_states[token_idx])
                outputs[wave[i]] = (token_idx, y * weights[token_idx, top_k_pos, None])
            self.cache.release(layer.index, wave)
        final = torch.zeros_like(hidden_states)
        for e in experts:
            token_idx, y = outputs[e]
            final.index_add_(0, token_idx, y.to(final.dtype))
        return final

    def stats(self) -> dict:
        """The cache's counters plus ``policy``, ``num_slots`` and ``hit_ratio``."""
        s = dict(self.cache.stats())
        s["hit_ratio"] = s["hits"] / s["accesses"] if s["accesses"] else 0.0
        s["policy"] = self.policy.name
        s["num_slots"] = self.cache.num_slots
        return s

    def reset_stats(self) -> None:
        self.cache.reset_stats()

    def close(self) -> None:
        """Frees the slots (and the pool, when the engine owns it); the MoE layers can no longer run."""
        for layer in self.layers:
            if layer.module.engine is self:
                layer.module.engine = None
        if hasattr(self.policy, "detach"):
            self.policy.detach()
        self.cache.close()
        if self.owns_pool:
            self.pool.close()
