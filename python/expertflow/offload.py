"""Offloaded experts: the module that replaces a model's routed experts, and the engine behind it.

For one MoE layer, :class:`OffloadedExperts` receives the router's choice, and the engine moves it to
the host once (with the next layer's gate-ahead picks, when the policy wants them), acquires the
chosen experts from the :class:`~expertflow.runtime.ExpertCache` (misses are demand-loaded at once),
applies the plan the policy returns, computes the experts whose bytes have already landed first and
the rest as they land, and releases them. With CPU experts, the misses the cost model picks run on
the CPU from the pool and are then backfilled into the cache behind the layer
(:meth:`~expertflow.runtime.ExpertCache.backfill`). Tokens are grouped by expert with one sort, so a
batch runs one matmul chain per expert. The arithmetic is transformers' eager experts loop, accumulated in
ascending expert order, so outputs match the resident model.

Host syncs: one per layer (the routing transfer; sharded, a second one for who holds which expert;
with CPU experts, a second one in a layer where the CPU computes: its hidden states)
and, for a policy with a step predictor, one per forward pass (its forecast).

With an :class:`~expertflow.distributed.ExpertShard` (one process per GPU), the engine computes the
experts :func:`~expertflow.distributed.assign` gives its rank, applies the part of each plan
:func:`~expertflow.distributed.deal_prefetches` gives it, and combines the layer's output with the
other ranks (``distributed.py``).
"""

from __future__ import annotations

import functools
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from . import _C
from .cpu_experts import CostModel, CpuExecutor, HostLinear, calibrate, check_mode, check_threads
from .distributed import assign, deal_prefetches
from .formats import FORMATS, ExpertFormat, SlotExpander, WeightSpec, kernels_available
from .models import Architecture, model_dtype
from .planner import Plan
from .policies import EngineInfo, Policy, StepContext
from .runtime import ExpertCache, ExpertPool

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from .distributed import ExpertShard

__all__ = ["OffloadedExperts", "OffloadEngine", "MoELayer", "StableHook", "hit_ratio"]

log = logging.getLogger("expertflow")


class StableHook:
    """A forward hook (or pre-hook) of ``module`` that compiled code calls correctly after it changes.

    torch.compile traces the hooks a module has when it compiles; replacing one by another does not
    always recompile (its guards may see the same number of hooks), and the compiled code would call
    the hook it was traced with: a closed engine's, a finished benchmark run's. So each module gets
    one dispatcher of each kind while it has hooks, eager under compile, which calls the hooks
    present now. ``fn(module, inputs[, output])`` as torch's hooks take them; a forward
    hook's non-None result replaces the output, a pre-hook's the inputs. :meth:`remove` takes it out.
    """

    def __init__(self, module: nn.Module, fn: Callable, pre: bool = False) -> None:
        self._module, self._attr = module, "_expertflow_pre_hooks" if pre else "_expertflow_hooks"
        hooks = module.__dict__.get(self._attr)
        if hooks is None:
            hooks = module.__dict__[self._attr] = {}
            handle = (module.register_forward_pre_hook(_dispatch_pre_hooks) if pre
                      else module.register_forward_hook(_dispatch_hooks))
            module.__dict__[self._attr + "_handle"] = handle
        self._key = object()
        hooks[self._key] = fn

    def remove(self) -> None:
        """Takes the hook out, and the dispatcher with the module's last one: compiled code then
        has no break for it (it is the same function when it comes back)."""
        hooks = self._module.__dict__.get(self._attr)
        if hooks is None or hooks.pop(self._key, None) is None or hooks:
            return
        self._module.__dict__.pop(self._attr + "_handle").remove()
        del self._module.__dict__[self._attr]


@torch.compiler.disable  # host code (the policy's planning, a benchmark's clock): eager under compile
def _dispatch_hooks(module: nn.Module, inputs, output):
    for fn in list(module.__dict__.get("_expertflow_hooks", {}).values()):
        result = fn(module, inputs, output)
        output = output if result is None else result
    return output


@torch.compiler.disable
def _dispatch_pre_hooks(module: nn.Module, inputs):
    for fn in list(module.__dict__.get("_expertflow_pre_hooks", {}).values()):
        result = fn(module, inputs)
        inputs = inputs if result is None else result
    return inputs


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
        self.style = architecture.style
        # compute's products go through its `linear` argument (gpt-oss multiplies [in, out] with torch)
        self.takes_linear = self.style != "gpt_oss"
        # a gated SiLU expert goes whole to a HostLinear's native call (cpu_experts.HostLinear.gated_silu);
        # transformers maps both names to torch's silu
        self.silu_gated = self.gated and self.takes_linear and architecture.activation(config) in ("silu", "swish")
        if self.style == "gpt_oss":  # its clamped SwiGLU
            # older transformers (5.17) fix both in the module instead of the config
            self.alpha, self.limit = getattr(config, "swiglu_alpha", 1.702), getattr(config, "swiglu_limit", 7.0)
        self.layer = -1
        self.engine: OffloadEngine | None = None
        # A benchmark's recorded routing: () -> [num_tokens, k] expert ids that replace the router's
        # (its weights stay). Here rather than a hook on the router, which compiled decoding would
        # have to break its graph for (loader.enable_cuda_graphs); this forward runs eagerly anyway.
        self.forced_routing: Callable[[], torch.Tensor] | None = None

    # Under torch.compile (loader.enable_cuda_graphs) the engine runs eagerly between the compiled
    # graphs: it decides on the host, per layer, from the routing it reads back.
    @torch.compiler.disable
    def forward(self, hidden_states: torch.Tensor, routing: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.engine is None:
            raise RuntimeError("these experts are not attached to an ExpertFlow engine (was the model closed?)")
        if self.forced_routing is not None:
            forced = self.forced_routing()
            if forced.shape != routing.shape:
                raise ValueError(f"the forced routing is {tuple(forced.shape)} but the router chose {tuple(routing.shape)}")
            routing = forced.to(routing.dtype)
        if not self.gated:
            # Switch: a one-hot dispatch mask [T, 1, E]; a token over capacity has none (sentinel E).
            hit = routing.any(dim=-1)
            routing = torch.where(hit, routing.to(torch.int8).argmax(dim=-1), self.num_experts)
        return self.engine.run_layer(self, hidden_states, routing, weights)

    def compute(self, weights: dict[str, torch.Tensor], x: torch.Tensor,
                linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.linear,
                out: torch.Tensor | None = None, signal: _C.HostSignal | None = None) -> torch.Tensor:
        """One expert on its tokens: ``x [n, hidden] -> [n, hidden]`` (dense ``weights``, the
        architecture's layout: ``Architecture.weights``), written into ``out`` where given. The
        arithmetic is transformers' own; ``linear`` computes its ``[out, in]`` products (the CPU's
        experts pass ``cpu_experts.HostLinear``; gpt-oss keeps its weights as ``[in, out]`` and
        multiplies with torch). With a HostLinear, a gated SiLU expert the native kernel takes runs
        whole in one call (``HostLinear.gated_silu``), which sets ``signal`` once ``out`` is written;
        otherwise the caller sets it."""
        if self.silu_gated and isinstance(linear, HostLinear):
            y = linear.gated_silu(x, weights["gate_up"], weights["down"], out, signal)
            if y is not None:
                return y
        y = self._composed(weights, x, linear)
        return y if out is None else out.copy_(y)

    def _composed(self, weights: dict[str, torch.Tensor], x: torch.Tensor,
                  linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """:meth:`compute`'s arithmetic op by op."""
        if self.style == "gpt_oss":
            gate_up = x @ weights["gate_up"] + weights["gate_up_bias"]
            gate, up = gate_up[..., ::2], gate_up[..., 1::2]
            gate = gate.clamp(min=None, max=self.limit)
            up = up.clamp(min=-self.limit, max=self.limit)
            return ((up + 1) * (gate * torch.sigmoid(gate * self.alpha))) @ weights["down"] + weights["down_bias"]
        if self.gated:
            gate, up = linear(x, weights["gate_up"]).chunk(2, dim=-1)
            return linear(self.act_fn(gate) * up, weights["down"])
        h = self.act_fn(linear(x, weights["wi"]))
        if h.dtype != weights["wo"].dtype:
            h = h.to(weights["wo"].dtype)
        return linear(h, weights["wo"])

    def extra_repr(self) -> str:
        return f"layer={self.layer}, num_experts={self.num_experts}, offloaded"


@dataclass
class MoELayer:
    index: int
    path: str  # module path of the experts module
    module: OffloadedExperts
    router: nn.Module
    next: MoELayer | None = field(default=None, repr=False)  # the next MoE layer of the same stack


class CpuJob(NamedTuple):
    """A missed expert the CPU computes: its result ``[n, H]`` to come. On a GPU the result lands in
    ``staging`` (pinned ``[n, H]``) and ``signal`` is set once it is there (whatever happens), so the
    GPU can wait for it instead of the thread that launches its work."""

    future: Future
    staging: torch.Tensor | None = None
    signal: _C.HostSignal | None = None


def hit_ratio(stats: dict) -> float:
    """Hits over every expert use: those computed from slots (``accesses``) and the CPU's, which were
    not in a slot."""
    uses = stats["accesses"] + stats.get("cpu_experts", 0)
    return stats["hits"] / uses if uses else 0.0


class OffloadEngine:
    """Runs every offloaded layer of one model on one cache, under one policy.

    Available as ``model.expertflow``: :meth:`stats`, :meth:`reset_stats`, :meth:`close`.
    ``host_transfers`` counts the routing transfers (one per layer visit).
    """

    def __init__(
        self,
        architecture: Architecture,
        layers: list[MoELayer],
        pool: ExpertPool,
        cache: ExpertCache,
        policy: Policy,
        owns_pool: bool = True,
        model: nn.Module | None = None,
        top_k: int = 1,
        shard: ExpertShard | None = None,
        expert_format: ExpertFormat | None = None,
        cpu_experts: str = "off",
        recalibrate: bool = False,
        cpu_threads: int | None = None,
    ) -> None:
        self.architecture = architecture
        self.shard = shard
        # Slots hold experts in this storage format; a non-dense one expands just before computing.
        self.expert_format = expert_format or FORMATS["dense"]
        self.weights: list[WeightSpec] = architecture.weights(model.config) if model is not None else []
        if not self.expert_format.dense and not self.weights:
            raise ValueError(f"experts stored as {self.expert_format.name} need the model's weight specs to expand them")
        self.model = model
        self.owns_pool = owns_pool
        self.layers = layers
        self.pool = pool
        self.cache = cache
        self.policy = policy
        self.num_experts = pool.num_experts(0)
        # [E]: each expert's owning rank, and whether it is this one's (all of them unless sharded)
        self.owner = shard.owner(self.num_experts) if shard is not None else np.zeros(self.num_experts, dtype=np.int64)
        self.owned = self.owner == (shard.rank if shard is not None else 0)
        self.computed_unowned = 0  # sharded: experts this rank computed for another owner (balanced links)
        # sharded: [world, L, E] which rank holds which expert, as gathered at the last layer and
        # updated (identically on every rank) by the copies dealt out since
        self._holders = np.zeros((shard.world_size if shard is not None else 1, len(layers), self.num_experts), dtype=bool)
        self.host_transfers = 0
        self.steps = 0
        # CPU experts (cpu_experts.py): the cost model, its executor, and their counters
        self.cost_model: CostModel | None = None
        self._cpu: CpuExecutor | None = None
        self.num_cpu_experts = 0
        self.cpu_ms = 0.0
        self.cpu_wait_ms = 0.0
        # CPU experts whose results the GPU waits for (CpuJob.signal) while this thread goes on: each
        # is collected (its error raised) after the next layer's routing has synchronised, by when
        # the GPU has waited for it, and at the end of the pass.
        self._cpu_pending: list[Future] = []
        self._link_seen: tuple[int, float] = (0, 0.0)  # the runtime's timed demand bytes and ms at the last _observe_link
        self._step_tokens: int | None = None  # tokens of the forward pass under way (_on_step)
        # When the pass under way began, and the last few decode passes' times at one batch size (ms,
        # _visit_ms): the pace at which the layers ask for their experts. Only a pass followed by
        # another decode pass of the same sequences is timed, so no pause between requests counts.
        self._step_began: float | None = None
        self._decode_steps_ms: deque[float] = deque(maxlen=8)
        self._pace_batch = 0
        # A list: run_layer appends a record of each layer visit (a diagnostic: it costs two stats
        # reads a layer). layer, tokens, experts used, misses (demand loads), backfills, cpu_experts,
        # cpu_ms, cpu_wait_ms, host_ms (run_layer's host time; the GPU's work may finish in the next
        # layer's), demand_ms (demand loads timed on the link since the last record: those landed),
        # gap_ms (the host time since the previous record's visit returned; None for the first).
        self.layer_trace: list[dict] | None = None
        self._layer_trace_end: float | None = None  # when the last traced visit returned
        self._set_up_cpu_experts(check_mode(cpu_experts, shard is not None), recalibrate, model,
                                 check_threads(cpu_threads, cpu_experts))
        self._expanders: dict[tuple[int, torch.dtype], SlotExpander] = {}  # per slot layout and dtype
        self._expansions: dict[tuple[int, torch.dtype, int], Callable] = {}  # _slot_expansion's, per layer
        self._positions: torch.Tensor | None = None
        self._next_step: dict[str, Any] | None = None
        # Each MoE layer's routing in the last forward pass, ``[T, k]`` on the host (the copy run_layer
        # makes anyway): a serving engine reads each sequence's path from it.
        self.routing: list[np.ndarray | None] = [None] * len(layers)
        self._hook = None
        for layer in layers:
            layer.module.engine = self
            layer.module.layer = layer.index
        info = EngineInfo(len(layers), self.num_experts, cache.num_slots, top_k)
        quotas = policy.layer_quotas(info)
        if quotas is not None:
            cache.set_layer_quotas(quotas)
        plan = policy.attach(info)
        if plan is not None:
            self._apply(plan)
            cache.synchronize()  # a preloading policy (all_gpu) starts with its experts in place
            cache.reset_stats()
        if policy.wants_steps and model is not None and not architecture.encoder_decoder:
            # A transformers model: nn.Module's stubs type the method as a tensor or submodule attribute.
            embeddings = cast("PreTrainedModel", model).get_input_embeddings()
            self._hook = StableHook(embeddings, self._on_step)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def _set_up_cpu_experts(self, mode: str, recalibrate: bool, model: nn.Module | None, num_threads: int | None) -> None:
        """Calibrates and sets the cost model where ``mode`` may send experts to the CPU (their
        executor with ``num_threads``); logs what ``auto`` chose and why."""
        if mode == "off":
            return
        if self.shard is not None:  # "auto" (check_mode refused "on")
            log.info("cpu experts: off (distributed: each GPU's share computes on its GPU)")
            return
        on_gpu = self.cache.device.type == "cuda"
        if mode == "auto" and not on_gpu:
            log.info("cpu experts: off (host backend: every expert already computes on the CPU, so there is no "
                     "second pipe to add)")
            return
        if model is None or not self.layers:
            raise ValueError("cpu_experts needs the model, to calibrate its expert arithmetic")
        dtype = model_dtype(model)
        config = cast("PreTrainedModel", model).config
        _, _, hidden, ffn = self.architecture.dims(config)
        shape_key = (f"{config.model_type} {self.num_experts}x[{hidden}, {ffn}] "
                     f"{self.expert_format.name} {self.pool.expert_bytes(0)}B")
        executor = CpuExecutor(asynchronous=on_gpu, num_threads=num_threads)
        try:
            # Each timed call reads another of layer 0's experts, as steps do (see calibrate).
            experts = [self.pool.expert(0, e) for e in range(self.pool.num_experts(0))]
            module = self.layers[0].module
            calibration = calibrate(module.compute, experts, lambda tensors: self._expand(tensors, dtype),
                                    hidden, dtype, self.cache.device, shape_key, recalibrate,
                                    executor.linear if module.takes_linear else None, executor)
        except BaseException:
            executor.close()
            raise
        cost_model = CostModel(calibration, mode)
        if mode == "auto" and not cost_model.cpu_can_win(self.num_experts):
            executor.close()
            log.info("cpu experts: off (calibrated: %s; the CPU never finishes a miss first, even behind %d copies)",
                     calibration.describe(), self.num_experts - 1)
            return
        log.info("cpu experts: %s (calibrated in %.2f s: %s; native kernel: %s)", mode,
                 calibration.seconds, calibration.describe(), executor.linear.isa)
        self.cost_model = cost_model
        self._cpu = executor

    def _cpu_expert(self, module: OffloadedExperts, layer: int, expert: int, x: torch.Tensor, rows: torch.Tensor | None,
                    linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], with_demand_loads: bool,
                    staging: torch.Tensor | None = None, signal: _C.HostSignal | None = None) -> torch.Tensor:
        """One expert computed on the CPU from its pool tensors (no copy over the link; a compressed
        format expands on the CPU first): the layer's hidden states ``x [T, H]`` on the host, the
        expert's ``rows [n]`` of them (None: all, in order) -> ``[n, H]``, its products by ``linear``;
        ``with_demand_loads``: its layer also copies misses. With ``staging`` (pinned ``[n, H]``, on a
        GPU) the result is written there and returned, and ``signal`` is set once it is, or once this
        fails: the GPU's stream waits for the signal, and must not wait forever."""
        try:
            start = time.perf_counter()
            with torch.no_grad():  # the gather runs here, on the CPU's threads, not on the thread launching the GPU's work
                inputs = x if rows is None else x[rows]
                # A gated SiLU expert runs in one native call that writes the staging and sets the
                # signal itself: the GPU waits for neither Python's lock nor this thread's steps after it.
                y = module.compute(self._expand(self.pool.expert(layer, expert), x.dtype), inputs, linear,
                                   staging, signal)
            ms = (time.perf_counter() - start) * 1e3
        finally:
            if signal is not None:
                signal.set()
        self.cpu_ms += ms  # one worker thread: no race
        if self.cost_model is not None:
            self.cost_model.observe(inputs.shape[0], ms, with_demand_loads)  # what the CPU costs inside a step, not alone
        return y

    def next_step(self, positions: torch.Tensor, new_sequences: bool, previous_path: np.ndarray | None = None) -> None:
        """Describes the next forward pass where the caller regroups sequences between passes (a
        serving engine): ``positions [B]`` of each sequence's last token, ``previous_path [B, L, k]``."""
        self._next_step = {"positions": positions, "new_sequences": new_sequences, "previous_path": previous_path}

    def _on_step(self, module, inputs, output) -> None:
        """A forward pass begins: the policy forecasts it (``output [B, T, D]``, the input embeddings)."""
        ids = inputs[0]
        batch, length = ids.shape[0], ids.shape[-1]
        positions = self._positions
        told, self._next_step = self._next_step, None
        previous_path = None
        if told is not None:
            new, positions, previous_path = told["new_sequences"], told["positions"], told["previous_path"]
        elif length > 1 or positions is None or positions.shape[0] != batch:
            new, positions = True, torch.full((batch,), length - 1, device=output.device, dtype=torch.long)
        else:
            new, positions = False, positions + 1
        self._positions = positions
        ctx = StepContext(step=self.steps, batch=batch, new_sequences=new, embeddings=output[:, -1],
                          positions=positions, previous_path=previous_path)
        self.steps += 1
        began = time.perf_counter()
        if length == 1 and not new:  # a decode pass follows one of the same sequences
            if self._pace_batch != batch:  # another batch decodes at another pace
                self._decode_steps_ms.clear()
                self._pace_batch = batch
            elif self._step_began is not None and self._step_tokens == batch:  # and the pass that ended decoded
                self._decode_steps_ms.append((began - self._step_began) * 1e3)
        self._step_began = began
        self._step_tokens = batch * length
        self._apply(self.policy.on_step(ctx))

    def _apply(self, plan: Plan | None) -> None:
        if plan is None:
            return
        if self.shard is not None:  # this rank's share of the prefetches (distributed.deal_prefetches)
            ranks = deal_prefetches(plan.layers, plan.experts, self.owner, self._holders)
            self._holders[ranks, plan.layers, plan.experts] = True
            keep = ranks == self.shard.rank
            # Experts another rank holds or brings in run there (assign): never needed here.
            never = np.zeros(self._holders.shape[1:], dtype=bool)
            never[plan.layers[~keep], plan.experts[~keep]] = True
            never |= self._holders.any(axis=0) & ~self._holders[self.shard.rank]
            plan = Plan(plan.layers[keep], plan.experts[keep], plan.due[keep],
                        None if plan.next_use is None else np.where(never, np.inf, plan.next_use),
                        None if plan.following_use is None else np.where(never, np.inf, plan.following_use),
                        plan.now, None if plan.sure is None else plan.sure[keep])
        self.cache.apply(self._leave_to_cpu(plan))

    def _visit_ms(self) -> float | None:
        """The time between layer visits at decode: the median of the last eight decode passes (of
        the batch size decoding now) over the layers; None before the first."""
        if not self._decode_steps_ms:
            return None
        return float(np.median(self._decode_steps_ms)) / self.num_layers

    def _leave_to_cpu(self, plan: Plan) -> Plan:
        """``plan`` less the prefetches the CPU computes instead. The link is taken to copy the plan's
        misses one after another from now, in the order of their dues (what is left of each; an
        entry due before now, or naming an expert again, adds nothing), while the layers come at the
        recent decode pace (:meth:`_visit_ms`). At each visit, in the plan's order, a miss whose copy
        would land after the visit, has not started, and that the cache would not keep until its
        next use (:meth:`Plan.kept_until_next_use` at that visit) is left out, up to
        :meth:`CostModel.misses_left_to_cpu` a visit; the link then does not carry it, so the misses
        after it land sooner. So the plan's prefetches carry only what the GPU will run, and a
        prefetch the CPU would overtake at its layer takes no slot (nor evicts) before; a copy that
        lands in time stays, as the GPU then computes its expert at once. The next-use tables stay
        whole: they still rank evictions and admit backfills. Only plans that name later
        uses (the trace oracles) say which misses are not kept: others apply whole."""
        cost_model = self.cost_model
        if (cost_model is None or plan.following_use is None or not len(plan) or self._step_tokens is None
                or np.isnan(plan.following_use).all()):  # no later use named (the history forecast)
            return plan
        per_visit = cost_model.misses_left_to_cpu(self._step_tokens)
        visit_ms = self._visit_ms()
        if per_visit == 0 or visit_ms is None:
            return plan
        num_layers, num_slots, copy_ms = self.num_layers, self.cache.num_slots, cost_model.copy_ms()
        keys = plan.layers.astype(np.int64) * self.num_experts + plan.experts
        ahead = np.zeros(len(plan), dtype=bool)  # each expert's first entry still ahead of the clock
        with np.errstate(invalid="ignore"):
            upcoming = np.flatnonzero(plan.due >= plan.now)
        ahead[upcoming[np.unique(keys[upcoming], return_index=True)[1]]] = True
        share = np.zeros(len(plan))  # what the link still has to carry of each, in copies
        for layer in np.unique(plan.layers[ahead]).tolist():  # one native call a layer named
            at = np.flatnonzero(ahead & (plan.layers == layer))
            share[at] = self._copy_left(layer, plan.experts[at].tolist())
        left: list[int] = []
        link_ms = 0.0  # when the link has carried every copy due so far
        for due in np.unique(plan.due[ahead]).tolist():  # visits in order
            at = np.flatnonzero(ahead & (plan.due == due))
            deadline = (due - plan.now) * visit_ms
            layer = int(plan.layers[at[0]])
            visit_copies_ms = share[at].sum() * copy_ms
            if (link_ms + visit_copies_ms <= deadline or due % num_layers != layer
                    or (plan.layers[at] != layer).any()):  # all in time, or not a visit of one layer
                link_ms += visit_copies_ms
                continue
            kept = plan.kept_until_next_use(layer, plan.experts[at].tolist(), num_slots, visit=due)
            num_left = 0
            for i, k in zip(at.tolist(), kept.tolist()):
                arrival = link_ms + share[i] * copy_ms
                if num_left < per_visit and share[i] == 1.0 and k == 0.0 and arrival > deadline:
                    left.append(i)
                    num_left += 1
                else:
                    link_ms = arrival
        if not left:
            return plan
        keep = ~np.isin(keys, keys[left])  # an expert named twice is left whole
        return Plan(plan.layers[keep], plan.experts[keep], plan.due[keep], plan.next_use, plan.following_use,
                    plan.now, None if plan.sure is None else plan.sure[keep])

    def run_layer(
        self,
        module: OffloadedExperts,
        hidden_states: torch.Tensor,
        routing: torch.Tensor,
        weights: torch.Tensor,
    ) -> torch.Tensor:
        """``hidden_states [T, H]``, ``routing [T, k]`` expert ids (``num_experts``: none), ``weights
        [T, k]`` -> ``[T, H]``. With :attr:`layer_trace` a list, appends one record of the visit."""
        if self.layer_trace is None:
            return self._run_layer(module, hidden_states, routing, weights)
        def snapshot() -> tuple:
            stats = self.cache.stats()
            return (time.perf_counter(), stats["misses"], stats["backfills"], stats["demand_ms"], self.num_cpu_experts,
                    self.cpu_ms, self.cpu_wait_ms)

        before = snapshot()
        # The host time since the previous visit returned: the model's own layers between the two, the
        # hooks, and at a pass's first layer the policy's step plan and the previous pass's sampling.
        gap_ms = (before[0] - self._layer_trace_end) * 1e3 if self._layer_trace_end is not None else None
        out = self._run_layer(module, hidden_states, routing, weights)
        now = snapshot()
        self._layer_trace_end = time.perf_counter()
        chosen = self.routing[module.layer]
        self.layer_trace.append({
            "layer": module.layer, "tokens": routing.shape[0],
            "experts": int(np.unique(chosen[chosen < self.num_experts]).size) if chosen is not None else 0,
            "misses": int(now[1] - before[1]), "backfills": int(now[2] - before[2]), "cpu_experts": now[4] - before[4],
            "cpu_ms": now[5] - before[5], "cpu_wait_ms": now[6] - before[6], "host_ms": (now[0] - before[0]) * 1e3,
            "gap_ms": gap_ms,
            "demand_ms": now[3] - before[3]})
        return out

    def _run_layer(self, module: OffloadedExperts, hidden_states: torch.Tensor, routing: torch.Tensor,
                   weights: torch.Tensor) -> torch.Tensor:
        layer = self.layers[module.layer]
        if layer.index == 0 and self.cost_model is not None:  # a pass begins
            self._observe_link()
        num_tokens, k = routing.shape
        num_experts = self.num_experts
        nxt = layer.next if self.policy.gate_from_router else None
        with torch.no_grad():
            if nxt is not None:  # a benchmark's forced routing stands for the next router's too
                forced = nxt.module.forced_routing
                guess = forced() if forced is not None else self.architecture.router_top_k(nxt.router, hidden_states)
                both = torch.cat([routing, guess.to(routing.dtype)], dim=1).cpu().numpy()
                chosen, gate = both[:, :k], both[:, k:]
            else:
                chosen, gate = routing.cpu().numpy(), None
            self.host_transfers += 1
            if num_tokens > 1:
                # Tokens grouped by expert with one stable sort of the [k, T] choices (rank-major, as
                # transformers' loop visits them); the host copy gives each expert's share of the order.
                order = torch.argsort(routing.t().reshape(-1), stable=True)
                tokens, choices = order % num_tokens, order // num_tokens
        self.routing[layer.index] = chosen
        if self._cpu_pending:  # the routing's copy waited for the GPU, which waited for them: done
            self._collect_cpu_jobs()
        counts = np.bincount(chosen.ravel(), minlength=num_experts + 1)[:num_experts]
        experts = np.flatnonzero(counts).tolist()  # ascending
        cpu_jobs = self._submit_cpu_experts(module, layer.index, experts, counts, chosen, hidden_states)
        if cpu_jobs:
            experts = [e for e in experts if e not in cpu_jobs]
        if self.shard is not None:  # this rank's share of the layer's experts (distributed.assign)
            self._holders = self.shard.holders(self.cache.held(self.num_layers, num_experts), hidden_states.device)
            compute_rank = assign(layer.index, experts, self.owner, self._holders)
            self._holders[compute_rank, layer.index, experts] = True  # the misses land there
            experts = [e for e, r in zip(experts, compute_rank.tolist()) if r == self.shard.rank]
            self.computed_unowned += int(np.sum(~self.owned[experts]))
        if num_tokens > 1:
            starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
        else:  # one token (decoding at batch 1): slices, no index kernels
            choice_of = {int(e): c for c, e in enumerate(chosen[0].tolist())}
        stream = self.cache.compute_stream()
        expand = self._slot_expansion(layer.index, hidden_states.dtype, stream)
        outputs: dict[int, tuple[torch.Tensor | None, torch.Tensor]] = {}

        def weighted(e: int, y: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
            """Expert ``e``'s output on its tokens (in the order ``inputs`` gives them) -> (rows, y x weight)."""
            if num_tokens > 1:
                token_idx = tokens[starts[e] : starts[e + 1]]
                return token_idx, y * weights[token_idx, choices[starts[e] : starts[e + 1]], None]
            c = choice_of[e]
            return None, y * weights[:, c : c + 1]

        def inputs(e: int) -> torch.Tensor:
            return hidden_states[tokens[starts[e] : starts[e + 1]]] if num_tokens > 1 else hidden_states
        # A batch may route to more experts than there are slots: run them in waves that fit.
        capacity = self.cache.num_slots
        waves = [experts[start : start + capacity] for start in range(0, len(experts), capacity)]
        # The misses spare the slots of the CPU's experts where their backfill follows (one wave): a
        # copy on its way for one is kept for its next use, not evicted by its own layer's demand loads.
        backfill_follows = bool(cpu_jobs) and len(waves) <= 1
        first = self.cache.acquire_slots(layer.index, waves[0], stream=stream, wait=False,
                                         spare=list(cpu_jobs) if backfill_follows else ()) if waves else []
        if backfill_follows:
            # The CPU's experts enter the cache behind the layer, as if the GPU had run them: after the
            # demand loads (they go first), while the first wave is pinned, and before the policy's
            # plan (which would cancel a prefetch the CPU took as stale). Not in a layer of several
            # waves: its experts overflow the slots already.
            self.cache.backfill(layer.index, list(cpu_jobs))
        # The policy hears the layer once, after the first wave's demand loads are queued (they go
        # first), and also where this rank runs none of the layer's experts.
        self._apply(self.policy.on_layer(layer.index, chosen, gate))
        for n, wave in enumerate(waves):
            slots = first if n == 0 else self.cache.acquire_slots(layer.index, wave, stream=stream, wait=False)
            # Experts whose bytes have landed first; misses as they land.
            for i in sorted(range(len(wave)), key=lambda i: not self.cache.slot_ready(slots[i])):
                e = wave[i]
                self.cache.wait_slot(slots[i], stream)
                expert_weights = expand(slots[i])
                outputs[e] = weighted(e, module.compute(expert_weights, inputs(e)))
            self.cache.release(layer.index, wave, stream)
        for e, job in cpu_jobs.items():
            if job.signal is not None:
                # The GPU waits for the CPU's result, not this thread: it goes on to queue the layer's
                # sum and the next layer's attention while the CPU computes (waiting here, it queued
                # them only after, and the GPU idled meanwhile). Until the signal is set the compute
                # stream is held, so this thread must not wait for that stream while it holds
                # Python's lock, which the worker needs: torch's ops and syncs let it go.
                self.cache.wait_signal(job.signal, stream)
                y = cast("torch.Tensor", job.staging).to(hidden_states.device, non_blocking=True)
                self._cpu_pending.append(job.future)
            else:  # inline (the host backend): done already
                y = job.future.result()
            outputs[e] = weighted(e, y)
        if self._cpu_pending and layer.index == self.num_layers - 1:
            self._collect_cpu_jobs()  # the pass ends with its errors raised, not in the next one
        if cpu_jobs:
            experts = sorted(outputs)  # the sum runs in ascending expert order, wherever each ran
        if self.shard is not None:
            contributions = hidden_states.new_zeros(num_tokens, k, hidden_states.shape[1])
            for e in experts:
                rows, y = outputs[e]
                if rows is None:
                    contributions[0, choice_of[e]] = y[0].to(contributions.dtype)
                else:
                    contributions[rows, choices[starts[e] : starts[e + 1]]] = y.to(contributions.dtype)
            return self.shard.combine(contributions, routing)
        final = torch.zeros_like(hidden_states)
        for e in experts:
            rows, y = outputs[e]
            if rows is None:
                final += y.to(final.dtype)
            else:
                final.index_add_(0, rows, y.to(final.dtype))
        return final

    def _submit_cpu_experts(self, module: OffloadedExperts, layer: int, experts: list[int], counts: np.ndarray,
                            chosen: np.ndarray, hidden_states: torch.Tensor) -> dict[int, CpuJob]:
        """Sends the missed experts the cost model picks to the CPU -> ``{expert: CpuJob}``, each
        expert's tokens in the order the GPU path takes them (choice-major, then token)."""
        if self.cost_model is None or self._cpu is None or not experts:
            return {}
        # An expert whose copy is still on its way (a prefetch, a backfill) counts as missed while
        # some of its bytes wait for the link: the CPU may finish it before they land. It is priced at
        # what is left of its copy (acquire moves that rest to the demand stream); one whose bytes are
        # all on the link waits for them. (Priced as a whole copy, a forecast's prefetches about to
        # land went to the CPU: on the H200 machine, with the trace's true future as the forecast,
        # `auto`'s median step was 13% longer than GPU-only's at 50% slots.)
        missed = [(e, share) for e, share in zip(experts, self._copy_left(layer, experts)) if share != 0]
        choices = self.cost_model.choose([int(counts[e]) for e, _ in missed], [share for _, share in missed])
        to_cpu = [e for (e, _), cpu in zip(missed, choices) if cpu]
        if not to_cpu:
            return {}
        x = hidden_states.to("cpu")  # the layer's one extra host sync, only where the CPU computes
        with_demand_loads = len(to_cpu) < len(missed)
        on_gpu = self.cache.device.type == "cuda"
        jobs = {}
        for e in to_cpu:
            token_idx = np.nonzero(e == chosen.T)[1]
            rows = None if len(token_idx) == x.shape[0] and (token_idx == np.arange(x.shape[0])).all() else torch.from_numpy(token_idx)
            # On a GPU the result lands in pinned memory that the GPU copies once the signal is set
            # (_run_layer queues that copy now, behind a wait for the signal).
            staging = torch.empty((len(token_idx), x.shape[1]), dtype=x.dtype, pin_memory=True) if on_gpu else None
            signal = _C.HostSignal() if on_gpu else None
            jobs[e] = CpuJob(self._cpu.submit(functools.partial(self._cpu_expert, module, layer, e, x, rows, self._cpu.linear,
                                                                with_demand_loads, staging, signal)),
                             staging, signal)
        self.num_cpu_experts += len(to_cpu)
        return jobs

    def _collect_cpu_jobs(self) -> None:
        """Waits for the CPU experts whose results the GPU waited for, raising any error of theirs."""
        start = time.perf_counter()
        pending, self._cpu_pending = self._cpu_pending, []
        for future in pending:
            future.result()
        self.cpu_wait_ms += (time.perf_counter() - start) * 1e3

    def _copy_left(self, layer: int, experts: list[int]) -> list[float]:
        """``[m]``: what the link still has to carry of each of ``experts`` of ``layer``, in whole
        copies: 1 for one in no slot, the share of its bytes not yet handed to the link for one on
        its way, 0 for one landed or with every byte on the link (one native call; a layer names a
        few experts, so plain floats: this runs at every layer, between its routing and its loads)."""
        expert_bytes = self.pool.expert_bytes(layer)
        return [1.0 if unsent < 0 else unsent / expert_bytes for unsent in self.cache.bytes_to_submit(layer, experts)]

    def _observe_link(self) -> None:
        """Once a pass: what demand loads took per expert since the last call (timed by the runtime on
        the demand stream, counted once landed) goes to the cost model; none timed, it hears so."""
        stats = self.cache.stats()
        num_bytes, ms = int(stats["timed_demand_bytes"]), stats["demand_ms"]
        new_bytes, new_ms = num_bytes - self._link_seen[0], ms - self._link_seen[1]
        self._link_seen = (num_bytes, ms)
        cost_model = cast("CostModel", self.cost_model)
        cost_model.observe_link(new_ms * self.pool.expert_bytes(0) / new_bytes if new_bytes > 0 and new_ms > 0 else None)

    def _slot_expansion(self, layer: int, dtype: torch.dtype, stream) -> Callable[[int], dict[str, torch.Tensor]]:
        """``slot -> weights``: a slot's tensors as dense weights of ``layer``, for compute on ``stream``.
        On a GPU with the kernels, one native call per expert (``formats.SlotExpander``, one per slot
        layout and dtype); otherwise :meth:`_expand`. Made once per layer, dtype and stream: every
        layer visit asks for it."""
        handle = stream.cuda_stream if stream is not None else 0
        expand = self._expansions.get((layer, dtype, handle))
        if expand is None:
            expand = self._expansions[layer, dtype, handle] = self._make_slot_expansion(layer, dtype, handle)
        return expand

    def _make_slot_expansion(self, layer: int, dtype: torch.dtype, handle: int) -> Callable[[int], dict[str, torch.Tensor]]:
        cache = self.cache
        if self.expert_format.dense:
            return lambda slot: cache.slot_tensors(slot, layer)
        if cache.device.type != "cuda" or not kernels_available(cache.device.index or 0):
            return lambda slot: self._expand(cache.slot_tensors(slot, layer), dtype)
        key = (cache.layout_id(layer), dtype)
        first, slot_bytes = cache.slot_address(0), cache.slot_bytes
        expander = self._expanders.get(key)
        if expander is None:  # one scratch per layout and dtype, shared by its layers
            expander = self._expanders[key] = SlotExpander(self.expert_format, self.weights, cache.slot_tensors(0, layer),
                                                           first, slot_bytes, dtype)

        def expand(slot: int) -> dict[str, torch.Tensor]:
            return expander(first + slot * slot_bytes, handle, cache.slot_tensors(slot, layer))

        return expand

    def _expand(self, stored: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """A slot's tensors as dense weights (biases as they are): identity for the dense format."""
        if self.expert_format.dense:
            return stored
        dense = {w.name: self.expert_format.expand(w, stored, dtype) for w in self.weights}
        dense.update({f"{w.name}_bias": stored[f"{w.name}_bias"] for w in self.weights if w.bias})
        return dense

    def stats(self) -> dict:
        """The cache's counters plus ``policy``, ``num_slots``, ``hit_ratio``; sharded,
        ``computed_unowned`` (experts this rank ran for another owner to balance the links); with CPU
        experts, ``cpu_experts``, ``cpu_ms`` and ``cpu_wait_ms``. ``accesses`` counts the experts
        computed from slots; ``hit_ratio`` is over those and the CPU's."""
        s: dict[str, Any] = dict(self.cache.stats())  # float counters, then the policy name (a str)
        s["policy"] = self.policy.name
        s["num_slots"] = self.cache.num_slots
        if self.shard is not None:
            s["computed_unowned"] = self.computed_unowned
        if self.cost_model is not None:
            s.update(cpu_experts=self.num_cpu_experts, cpu_ms=self.cpu_ms, cpu_wait_ms=self.cpu_wait_ms)
        s["hit_ratio"] = hit_ratio(s)
        return s

    def reset_stats(self) -> None:
        self.computed_unowned = 0
        self.num_cpu_experts, self.cpu_ms, self.cpu_wait_ms = 0, 0.0, 0.0
        self._link_seen = (0, 0.0)
        self.cache.reset_stats()

    def close(self) -> None:
        """Frees the slots (and the pool, when the engine owns it); the MoE layers can no longer run."""
        for layer in self.layers:
            if layer.module.engine is self:
                layer.module.engine = None
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._cpu is not None:
            self._cpu.close()  # runs what is queued: every signal a stream may wait for is set
            self._cpu = None
        self._cpu_pending.clear()
        self._expanders.clear()  # their scratch holds a dense expert per slot layout
        self._expansions.clear()
        self.policy.close()
        self.cache.close()
        if self.owns_pool:
            self.pool.close()
