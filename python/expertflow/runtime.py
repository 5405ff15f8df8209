"""Typed Python surface of the native runtime: pinned expert pool and GPU slot cache.

The native core (``expertflow._C``) knows raw pointers, byte sizes, streams and events. This module
adds what PyTorch users expect: torch dtypes and shapes, zero-copy tensor views of the pinned pool and
of the slot arena, torch streams, context managers.

Example::

    spec = [TensorSpec("w1", torch.bfloat16, (14336, 4096)), TensorSpec("w2", torch.bfloat16, (4096, 14336))]
    with ExpertPool.uniform(num_layers=32, num_experts=8, tensors=spec) as pool:
        pool.set_expert(0, 3, {"w1": w1, "w2": w2})
        with ExpertCache(pool, num_slots=64) as cache:
            cache.prefetch([(0, 3, 1.0), (0, 5, 0.5)])
            (weights,) = cache.acquire(0, [3])      # {"w1": tensor on the device, "w2": ...}
            y = x @ weights["w1"].T
            cache.release(0, [3])
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import _C
from ._C import ExpertFlowError

__all__ = [
    "backend_uses_gpu",
    "packed_bytes",
    "ExpertFlowError",
    "TensorSpec",
    "LayerSpec",
    "ExpertPool",
    "ExpertCache",
    "POLICIES",
    "BACKFILL_NOT_ADMITTED",
    "BACKFILL_QUEUED",
    "BACKFILL_HELD",
    "get_backend",
]

#: Cache policies of the runtime (``belady`` needs the future and exists only in trace replay).
POLICIES = ("lru", "lfu", "expertflow")

#: What :meth:`ExpertCache.backfill` did with each expert (``BackfillOutcome`` in ``runtime.h``): not
#: in a slot (the link had enough queued, or every slot was pinned); its copy queued; already in a slot.
BACKFILL_NOT_ADMITTED, BACKFILL_QUEUED, BACKFILL_HELD = _C.BACKFILL_NOT_ADMITTED, _C.BACKFILL_QUEUED, _C.BACKFILL_HELD

StreamLike = torch.cuda.Stream | None
PlanEntry = tuple[int, int] | tuple[int, int, float]

if TYPE_CHECKING:
    from .planner import Plan


def get_backend(name: str | None = None, device_index: int = 0) -> _C.Backend:
    """Returns a backend: ``name``, else ``$EXPERTFLOW_BACKEND``, else ``"auto"``, copying to GPU
    ``device_index`` (CUDA).

    ``auto`` takes CUDA when this build has it and a GPU is visible, else the host backend, whose
    "device" arena is host memory and whose copies run on worker threads. ``cuda`` where none is
    usable raises :class:`ExpertFlowError` with the reason.
    """
    return _C.make_backend(name or os.environ.get("EXPERTFLOW_BACKEND", "auto"), device_index)


def backend_uses_gpu(name: str | None = None) -> bool:
    """Whether :func:`get_backend` (``name``) would pick CUDA, without creating it (creating it
    opens a context on its GPU)."""
    name = name or os.environ.get("EXPERTFLOW_BACKEND", "auto")
    return name in ("cuda", "auto") and _C.cuda_unavailable_reason() == ""


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of an expert, e.g. ``TensorSpec("w1", torch.bfloat16, (ffn, hidden))``."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * torch.empty((), dtype=self.dtype).element_size()


def packed_bytes(tensors: Iterable[TensorSpec]) -> int:
    """Bytes one expert of these tensors takes in a pool: each tensor 256-byte aligned, as packed."""
    return sum(-(-t.nbytes // 256) * 256 for t in tensors)


@dataclass(frozen=True)
class LayerSpec:
    """Every expert of one MoE layer: how many, and the tensors each one holds."""

    num_experts: int
    tensors: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class _PackedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _views(arena: torch.Tensor, base: int, layout: Sequence[_PackedTensor]) -> dict[str, torch.Tensor]:
    out = {}
    for t in layout:
        start = base + t.offset
        out[t.name] = arena[start : start + t.nbytes].view(t.dtype).view(t.shape)
    return out


def _check_host_memory(nbytes: int) -> None:
    """Refuses a pool larger than the host memory available now: the kernel would otherwise grant the
    allocation and kill the process while the pool fills (Linux overcommits; elsewhere no check)."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return
    if nbytes > available:
        raise ExpertFlowError(
            f"the expert pool needs {nbytes / 2**30:.2f} GiB of host memory but {available / 2**30:.2f} GiB is available; "
            "free memory, or load fewer layers (bench: --layers N)"
        )


class ExpertPool:
    """Every expert of every MoE layer, once, in page-locked host memory.

    Each expert's tensors are packed contiguously (256-byte aligned) so one expert moves with one copy.
    Fill it with :meth:`set_expert` or :meth:`write_tensor` (torch tensors, numpy arrays, or raw byte
    ranges such as a memoryview of a memory-mapped safetensors file); read it back through the
    zero-copy views of :meth:`expert`.

    :meth:`close` (or leaving a ``with`` block) closes the caches built on the pool and frees the
    pinned memory; only views from :meth:`expert` that the caller still holds keep it alive.

    ``shared=True`` puts the arena in shared host memory that other processes of this host (one per
    GPU) map with ``attach=pool.shared_path`` and the same layers, so the experts are held once per
    host. The creating process must stay alive while others attach.
    """

    def __init__(self, layers: Sequence[LayerSpec], backend: _C.Backend | str | None = None, *,
                 shared: bool = False, attach: str | None = None) -> None:
        if not layers:
            raise ExpertFlowError("an expert pool needs at least one MoE layer")
        self.backend = backend if isinstance(backend, _C.Backend) else get_backend(backend)
        self.layers = tuple(layers)
        native_specs = [
            [(t.name, _dtype_name(t.dtype), list(t.shape), torch.empty((), dtype=t.dtype).element_size()) for t in spec.tensors]
            for spec in self.layers
        ]
        if attach is not None and (not isinstance(attach, str) or not attach):
            raise ExpertFlowError(f"attach takes a shared pool's path (another process's pool.shared_path), got {attach!r}")
        if attach is None:  # an attached pool maps memory another process already holds
            _check_host_memory(sum(spec.num_experts * packed_bytes(spec.tensors) for spec in self.layers))
        native = _C.ExpertPool(self.backend, [spec.num_experts for spec in self.layers], native_specs,
                               shared or attach is not None, attach or "")
        self._native: _C.ExpertPool | None = native
        self._layouts: list[tuple[_PackedTensor, ...]] = []
        for l, spec in enumerate(self.layers):
            dtypes = {t.name: t.dtype for t in spec.tensors}
            self._layouts.append(
                tuple(
                    _PackedTensor(name, dtypes[name], tuple(shape), offset, nbytes)
                    for name, _, shape, _, offset, nbytes in native.layout(l)
                )
            )
        self._arena: torch.Tensor | None = torch.from_dlpack(native.arena_dlpack())
        self._caches: weakref.WeakSet[ExpertCache] = weakref.WeakSet()
        #: the storage format (``formats.ExpertFormat``) the loader filled the experts in; None: dense
        self.expert_format: Any = None

    @classmethod
    def uniform(
        cls, num_layers: int, num_experts: int, tensors: Sequence[TensorSpec], backend: _C.Backend | str | None = None,
        *, shared: bool = False, attach: str | None = None,
    ) -> ExpertPool:
        """A pool whose ``num_layers`` layers each hold ``num_experts`` experts of the same tensors."""
        if num_layers < 1:
            raise ExpertFlowError(f"num_layers must be at least 1, got {num_layers}")
        return cls([LayerSpec(num_experts, tuple(tensors))] * num_layers, backend, shared=shared, attach=attach)

    @property
    def shared_path(self) -> str | None:
        """Where other processes of this host attach a shared pool (None: not shared)."""
        return self.native.shared_path or None

    @property
    def native(self) -> _C.ExpertPool:
        if self._native is None:
            raise ExpertFlowError("the expert pool is closed; create a new one")
        return self._native

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def total_bytes(self) -> int:
        return self.native.total_bytes

    def num_experts(self, layer: int) -> int:
        return self.native.num_experts(layer)

    def expert_bytes(self, layer: int) -> int:
        """Packed size of one expert of ``layer``, a multiple of 256."""
        return self.native.expert_bytes(layer)

    def layout(self, layer: int) -> tuple[_PackedTensor, ...]:
        self.native.num_experts(layer)  # validates the layer
        return self._layouts[layer]

    def _tensor(self, layer: int, name: str) -> tuple[int, _PackedTensor]:
        for index, packed in enumerate(self.layout(layer)):
            if packed.name == name:
                return index, packed
        names = ", ".join(t.name for t in self._layouts[layer])
        raise ExpertFlowError(f"layer {layer} experts have no tensor '{name}'; they have: {names}")

    def write_tensor(self, layer: int, expert: int, name: str, data: Any, offset: int = 0) -> None:
        """Copies one tensor of an expert into the pool.

        ``data``: a torch tensor or numpy array of the declared dtype and shape, or any contiguous
        bytes-like object (``bytes``, a memoryview of an mmap) holding raw bytes, written at byte
        ``offset`` of the tensor.
        """
        index, packed = self._tensor(layer, name)
        where = f"tensor '{name}' of layer {layer} expert {expert}"
        if isinstance(data, np.ndarray):
            data = torch.from_numpy(data)
        if isinstance(data, torch.Tensor):
            if data.dtype != packed.dtype:
                raise ExpertFlowError(f"{where} is {packed.dtype} in the pool but the source is {data.dtype}; convert it first")
            if tuple(data.shape) != packed.shape or offset:
                raise ExpertFlowError(f"{where} has shape {packed.shape} in the pool but the source has {tuple(data.shape)}")
            raw = data.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            self.native.write(layer, expert, index, raw.data, 0)
            return
        self.native.write(layer, expert, index, memoryview(data).cast("B"), offset)

    def set_expert(self, layer: int, expert: int, tensors: Mapping[str, Any]) -> None:
        """Copies every tensor of one expert into the pool; ``tensors`` maps each declared name to data."""
        declared = {t.name for t in self.layout(layer)}
        missing, extra = declared - set(tensors), set(tensors) - declared
        if missing or extra:
            raise ExpertFlowError(
                f"layer {layer} expert {expert}: missing tensors {sorted(missing)}, unknown tensors {sorted(extra)}"
            )
        for name, data in tensors.items():
            self.write_tensor(layer, expert, name, data)

    def expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """Zero-copy CPU views of one expert's tensors in the pinned pool."""
        return _views(self._open_arena(), self.native.expert_offset(layer, expert), self.layout(layer))

    def expert_bytes_view(self, layer: int, expert: int) -> torch.Tensor:
        """The expert's packed bytes, ``[expert_bytes(layer)]`` uint8, zero-copy."""
        start = self.native.expert_offset(layer, expert)
        return self._open_arena()[start : start + self.expert_bytes(layer)]

    def _open_arena(self) -> torch.Tensor:
        if self._arena is None:
            raise ExpertFlowError("the expert pool is closed; create a new one")
        return self._arena

    def close(self) -> None:
        """Closes the caches built on this pool, then frees the pinned memory (views from :meth:`expert`
        still held keep it alive). Every later call raises. Idempotent."""
        for cache in list(self._caches):
            cache.close()
        self._arena = None
        self._native = None  # the last owner of the native pool: its arena goes with it

    def __enter__(self) -> ExpertPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ExpertCache:
    """A fixed set of device slots holding experts of an :class:`ExpertPool`.

    ``num_slots`` slots of ``slot_bytes`` each (default: the pool's largest expert) are allocated
    once. :meth:`prefetch` and :meth:`apply` take a plan; :meth:`acquire` returns zero-copy tensors
    of the requested experts, demand-loading misses on the high-priority stream and making the
    compute stream wait for copies still in flight; :meth:`release` lets their slots be reused once
    the compute stream has passed that point.

    Policies: ``lru``, ``lfu`` (a prefetch evicts only experts its plan does not name) and
    ``expertflow``: evicts the expert whose predicted next use (from the plan's next-use tables) is
    farthest, and admits a prefetch only when the expert it evicts is not needed before it (see
    ``include/expertflow/cache.h`` and :mod:`expertflow.planner`).
    """

    def __init__(
        self,
        pool: ExpertPool,
        num_slots: int,
        *,
        slot_bytes: int | None = None,
        policy: str = "lru",
        chunk_bytes: int = 8 << 20,
        max_chunks_in_flight: int = 2,
        experts_per_token: int | None = None,
    ) -> None:
        if experts_per_token is not None and num_slots < experts_per_token:
            raise ExpertFlowError(
                f"capacity of {num_slots} slots is smaller than one layer's {experts_per_token} experts per token; "
                f"give the cache at least {experts_per_token} slots"
            )
        self.pool = pool
        self._native = _C.Runtime(pool.native, num_slots, slot_bytes or 0, policy, chunk_bytes, max_chunks_in_flight)
        self._arena: torch.Tensor | None = torch.from_dlpack(self._native.arena_dlpack())
        self._gpu = pool.backend.is_gpu
        pool._caches.add(self)  # closing the pool closes this cache first: its copies read the pool
        self._views: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        # Layers with identical layouts share views of a slot.
        self._layout_ids: list[int] = []
        seen: dict[tuple[_PackedTensor, ...], int] = {}
        for l in range(pool.num_layers):
            self._layout_ids.append(seen.setdefault(pool.layout(l), len(seen)))

    @property
    def native(self) -> _C.Runtime:
        return self._native

    @property
    def num_slots(self) -> int:
        return self._native.num_slots

    @property
    def slot_bytes(self) -> int:
        return self._native.slot_bytes

    @property
    def policy(self) -> str:
        return self._native.policy

    @property
    def device(self) -> torch.device:
        return self._open_arena().device

    def compute_stream(self) -> StreamLike:
        """The current stream (None on the host backend); pass it to several calls in a row to look it
        up once."""
        return torch.cuda.current_stream(self._open_arena().device) if self._gpu else None

    def _stream_handle(self, stream: StreamLike) -> int:
        if stream is None or (isinstance(stream, int) and not isinstance(stream, bool) and stream == 0):
            return torch.cuda.current_stream(self._open_arena().device).cuda_stream if self._gpu and stream is None else 0
        if self._gpu and isinstance(stream, torch.cuda.Stream):
            return stream.cuda_stream
        if not self._gpu:
            raise ExpertFlowError(f"the host backend computes on the calling thread: pass stream=None, not {stream!r}")
        raise ExpertFlowError(f"stream must be a torch.cuda.Stream (or None for the current stream), not {stream!r}")

    def _check_open(self) -> None:
        self._open_arena()

    def _open_arena(self) -> torch.Tensor:
        if self._arena is None:
            raise ExpertFlowError("the expert cache is closed; create a new one")
        return self._arena

    def prefetch(self, plan: Iterable[PlanEntry]) -> None:
        """Replaces the plan with ``(layer, expert[, due])`` entries: when each is needed (default 0).
        Earlier dues load first; unfinished prefetches the new plan does not name are cancelled.

        Under ``lru`` and ``lfu`` a due only orders the copies. Under ``expertflow`` it is also the
        expert's next use, on the cache's clock of layer visits (``layer + step * num_layers``; see
        :meth:`apply`): a due already behind the clock ranks the expert as soon evicted.
        """
        from .planner import Plan

        entries = [(int(p[0]), int(p[1]), float(p[2]) if len(p) > 2 else 0.0) for p in plan]
        self.apply(Plan.prefetch_only(entries))

    def apply(self, plan: Plan) -> None:
        """Replaces the plan with a :class:`~expertflow.planner.Plan` (prefetches, next-use tables)."""
        self._check_open()
        self._native.apply_plan(plan.layers, plan.experts, plan.due, plan.next_use, plan.following_use, plan.now,
                                plan.sure)

    def acquire_slots(
        self, layer: int, experts: Sequence[int], stream: StreamLike = None, wait: bool = True,
        spare: Sequence[int] = (),
    ) -> list[int]:
        """Pins ``experts`` of ``layer`` and returns their slot indices (see :meth:`acquire`).

        With ``wait=False`` the stream is not made to wait: call :meth:`wait_slot` before reading each
        slot, e.g. computing the slots :meth:`slot_ready` reports first and misses as they land.
        ``spare``: other experts of ``layer`` computed elsewhere in this visit (the CPU), whose
        :meth:`backfill` follows: the misses take their slots only when no other slot is free, so a
        copy whose bytes have started to move is kept for their next use (one not started is not
        spared: :meth:`backfill` cancels it).
        """
        self._check_open()
        return self._native.acquire(layer, [int(e) for e in experts], self._stream_handle(stream), wait,
                                    [int(e) for e in spare])

    def slot_ready(self, slot: int) -> bool:
        """True when an acquired slot's bytes have landed (never blocks)."""
        self._check_open()
        return self._native.is_ready(slot)

    def wait_slot(self, slot: int, stream: StreamLike = None) -> None:
        """Makes ``stream`` wait until an acquired slot's bytes have landed."""
        self._check_open()
        self._native.wait_ready(slot, self._stream_handle(stream))

    def wait_signal(self, signal: _C.HostSignal, stream: StreamLike = None) -> None:
        """Makes ``stream`` wait until ``signal`` is set on the host (``HostSignal.set``), without
        waiting here: work queued on it afterwards may read what the setter wrote before. On the host
        backend the calling thread waits. The signal must be set, or the stream never moves on."""
        self._check_open()
        self._native.wait_signal(signal, self._stream_handle(stream))

    def slot_tensors(self, slot: int, layer: int) -> dict[str, torch.Tensor]:
        """Zero-copy views of ``slot`` laid out as an expert of ``layer``."""
        self._check_open()
        key = (slot, self._layout_ids[layer])
        views = self._views.get(key)
        if views is None:
            if not 0 <= slot < self.num_slots:
                raise ExpertFlowError(f"slot {slot} is out of range (num_slots={self.num_slots})")
            views = _views(self._open_arena(), slot * self.slot_bytes, self.pool.layout(layer))
            self._views[key] = views
        return views

    def layout_id(self, layer: int) -> int:
        """Layers with equal ids lay their experts out identically (and share slot views)."""
        return self._layout_ids[layer]

    def slot_address(self, slot: int) -> int:
        """Address of ``slot``'s first byte (device memory on the CUDA backend)."""
        if not 0 <= slot < self.num_slots:
            raise ExpertFlowError(f"slot {slot} is out of range (num_slots={self.num_slots})")
        return self._open_arena().data_ptr() + slot * self.slot_bytes

    def acquire(self, layer: int, experts: Sequence[int], stream: StreamLike = None,
                spare: Sequence[int] = ()) -> list[dict[str, torch.Tensor]]:
        """Pins ``experts`` of ``layer`` and returns, per expert, its tensors in device slots.

        Misses are demand-loaded at once; ``stream`` (default: the current stream; on the host
        backend the calling thread) is made to wait for any copy still in flight, so work queued on
        it afterwards reads complete weights. Call :meth:`release` when that work is queued.
        ``spare``: as in :meth:`acquire_slots`.
        """
        slots = self.acquire_slots(layer, experts, stream, spare=spare)
        return [self.slot_tensors(s, layer) for s in slots]

    def release(self, layer: int, experts: Sequence[int], stream: StreamLike = None) -> None:
        """Unpins experts; their slots may be overwritten once ``stream`` passes this point."""
        self._check_open()
        self._native.release(layer, [int(e) for e in experts], self._stream_handle(stream))

    def set_layer_quotas(self, quotas: Sequence[int | None] | Mapping[int, int]) -> None:
        """Caps how many slots each layer may hold (None or missing: no cap); may change every step."""
        self._check_open()
        if isinstance(quotas, Mapping):
            dense = [-1] * self.pool.num_layers
            for layer, q in quotas.items():
                dense[layer] = q
        else:
            dense = [-1 if q is None else q for q in quotas]
        self._native.set_layer_quotas(dense)

    def stats(self) -> dict[str, float]:
        """Counters since creation or :meth:`reset_stats`.

        ``accesses``, ``hits``, ``misses``, ``prefetch_hits``, ``prefetches``, ``wasted_prefetches``,
        ``cancelled_prefetches``, ``backfills`` (copies :meth:`backfill` queued; their bytes count in
        ``prefetch_bytes``, the rest of one that :meth:`acquire` promotes in ``demand_bytes``),
        ``cancelled_backfills``, ``evictions``, ``bytes_copied`` (= ``prefetch_bytes`` +
        ``demand_bytes``), ``stalls`` and ``stall_ms`` (time the compute stream waited on copies),
        ``timed_demand_bytes`` and ``demand_ms`` (demand loads timed on their stream, from their first
        byte to their last: what a copy takes inside a step; a load still in flight is not yet counted).
        """
        self._check_open()
        return self._native.stats()

    def reset_stats(self) -> None:
        self._check_open()
        self._native.reset_stats()

    def resident(self, layer: int, experts: Sequence[int]) -> list[bool]:
        """Whether each of ``experts`` of ``layer`` holds a slot (its bytes landed or in flight)."""
        self._check_open()
        return [bool(r) for r in self._native.resident(layer, list(experts))]

    def landed(self, layer: int, experts: Sequence[int]) -> list[bool]:
        """Whether each of ``experts`` of ``layer`` holds a slot whose bytes have landed (never blocks)."""
        self._check_open()
        return [bool(r) for r in self._native.landed(layer, list(experts))]

    def bytes_to_submit(self, layer: int, experts: Sequence[int]) -> list[int]:
        """For each of ``experts`` of ``layer``: -1 when it holds no slot, else the bytes of its copy
        not yet handed to the link (0: landed, or every byte on its way). A prefetch the next
        :meth:`acquire` takes moves its rest to the demand stream, so this is what the link still
        has to carry for it (never blocks)."""
        self._check_open()
        return [int(b) for b in self._native.bytes_to_submit(layer, list(experts))]

    def backfill(self, layer: int, experts: Sequence[int]) -> list[int]:
        """Brings ``experts`` of ``layer``, computed elsewhere in this visit (the CPU), into slots for
        their next use, as if :meth:`acquire` had taken them: each counts as used, and a missing one
        takes the slot a demand miss would (never another of the same call's). Its copy goes on the
        prefetch path, due at the layer's next visit, and nothing waits for it. A copy is queued only
        while fewer than ``_C.BACKFILL_MAX_PENDING_PREFETCHES`` (2) prefetches are unfinished. One held
        whose copy has not started is cancelled and then treated as missing (its bytes move only where
        a backfill's would); one whose copy has started is kept. A new plan does not cancel a
        backfill as stale, though a miss or a plan's prefetch may still evict it.
        -> for each expert: :data:`BACKFILL_QUEUED`, :data:`BACKFILL_HELD` (it already held a slot,
        landed or on its way) or :data:`BACKFILL_NOT_ADMITTED`."""
        self._check_open()
        return list(self._native.backfill(layer, list(experts)))

    def held(self, num_layers: int, num_experts: int) -> np.ndarray:
        """``[num_layers, num_experts]`` bool: which experts hold a slot (landed or in flight), from one
        native call."""
        self._check_open()
        occupied = self._native.occupied()
        occupied = occupied[occupied[:, 0] >= 0]
        held = np.zeros((num_layers, num_experts), dtype=bool)
        held[occupied[:, 0], occupied[:, 1]] = True
        return held

    def slot_table(self) -> list[dict[str, Any]]:
        """Per slot: layer, expert (-1 when empty), pin_count, planned, next_use, following_use,
        last_use, use_count, prefetched_unused."""
        self._check_open()
        return self._native.slot_table()

    def synchronize(self) -> None:
        """Waits until every queued and in-flight copy has landed (submitted ones only when paused)."""
        self._check_open()
        self._native.synchronize()

    def pause_prefetch(self) -> None:
        """Holds queued prefetches on the host (demand loads still run) until :meth:`resume_prefetch`."""
        self._check_open()
        self._native.pause_prefetch()

    def resume_prefetch(self) -> None:
        self._check_open()
        self._native.resume_prefetch()

    def close(self) -> None:
        """Stops the copy engine and frees the slots; every later call raises. Idempotent."""
        if self._arena is None:
            return
        self._views.clear()
        self._arena = None
        self._native.close()

    def __enter__(self) -> ExpertCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
