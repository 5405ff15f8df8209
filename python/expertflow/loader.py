"""``expertflow.from_pretrained``: a local MoE checkpoint onto a GPU far smaller than the model.

Steps: transformers builds the model on the meta device with each routed-experts class swapped for
:class:`~expertflow.offload.OffloadedExperts` (which has no weights), and loads every other weight
straight onto the compute device; the routed experts stream from the memory-mapped safetensors
shards into the pinned :class:`~expertflow.runtime.ExpertPool`, one tensor at a time; the slot count
follows from ``gpu_memory``.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import torch
import transformers
from tqdm.auto import tqdm

from .checkpoint import Checkpoint, CheckpointError
from .models import Architecture, architecture_for
from .offload import MoELayer, OffloadedExperts, OffloadEngine
from .policies import make_policy
from .runtime import ExpertCache, ExpertFlowError, ExpertPool, get_backend
from .units import format_bytes, parse_bytes

__all__ = ["from_pretrained", "load_offloaded", "attach", "offloaded_experts", "moe_layers", "plan_slots", "parse_bytes", "format_bytes"]

log = logging.getLogger(__name__)

@contextlib.contextmanager
def offloaded_experts(arch: Architecture):
    """While transformers builds the model, its experts class yields weightless OffloadedExperts."""
    module = arch.modeling()
    original = getattr(module, arch.experts_class)

    class _Factory:  # not a base of OffloadedExperts, so transformers' isinstance checks skip it
        def __new__(cls, config, *args, **kwargs):
            return OffloadedExperts(config, arch)

    # Weight initialisation of a module that holds the experts (Switch's SparseMLP initialises them
    # itself) is skipped: its other weights come from the checkpoint, the experts from the pool.
    initialize = transformers.PreTrainedModel._initialize_weights

    def _initialize_weights(self, target, *args, **kwargs):
        if any(isinstance(child, OffloadedExperts) for child in target.children()):
            target._is_hf_initialized = True
            return None
        return initialize(self, target, *args, **kwargs)

    setattr(module, arch.experts_class, _Factory)
    transformers.PreTrainedModel._initialize_weights = _initialize_weights
    try:
        yield
    finally:
        setattr(module, arch.experts_class, original)
        transformers.PreTrainedModel._initialize_weights = initialize


def moe_layers(model: torch.nn.Module, arch: Architecture) -> list[MoELayer]:
    """The model's offloaded experts modules in execution order, with their routers."""
    layers: list[MoELayer] = []
    for path, module in model.named_modules():
        if isinstance(module, OffloadedExperts):
            parent = model.get_submodule(path.rsplit(".", 1)[0])
            layers.append(MoELayer(len(layers), path, module, getattr(parent, arch.router_attr)))
    stack = lambda p: p.split(".", 1)[0] if arch.encoder_decoder else ""  # noqa: E731
    for a, b in zip(layers, layers[1:]):
        if stack(a.path) == stack(b.path):
            a.next = b
    return layers


def _fill_pool(pool: ExpertPool, layers: list[MoELayer], arch: Architecture, config, ckpt: Checkpoint, progress: bool) -> None:
    num_experts = pool.num_experts(0)
    bar = tqdm(total=len(layers) * num_experts, desc="Loading experts", unit="expert", disable=not progress)
    source_dtype: tuple[torch.dtype, str] | None = None
    for layer in layers:
        packed = {t.name: t for t in pool.layout(layer.index)}
        for e in range(num_experts):
            sources = arch.sources(layer.path, e, config, ckpt)
            if sources is None:
                raise CheckpointError(
                    f"expert {e} of MoE layer {layer.index} ({layer.path}) is not in the checkpoint at {ckpt.folder}; "
                    f"expected {arch.describe_sources(layer.path)}"
                )
            for src in sources:
                info = ckpt.info(src.checkpoint_name)
                target = packed[src.pool_tensor]
                rows = target.shape[0] // 2 if (arch.gated and src.pool_tensor == "gate_up" and src.expert_index is None) else target.shape[0]
                want = (rows, *target.shape[1:])
                if src.expert_index is not None:
                    want = (num_experts, *want)
                if info.shape != want:
                    raise CheckpointError(
                        f"tensor '{info.name}' in {info.file} has shape {list(info.shape)}, expected {list(want)} "
                        f"for this {config.model_type} config"
                    )
                if source_dtype is None:
                    source_dtype = (info.dtype, info.name)
                elif info.dtype != source_dtype[0]:
                    raise CheckpointError(
                        f"tensor '{info.name}' in {info.file} is {info.dtype} but '{source_dtype[1]}' is {source_dtype[0]}; "
                        "all routed experts of a checkpoint must share one dtype"
                    )
                nbytes = info.nbytes // num_experts if src.expert_index is not None else info.nbytes
                offset = nbytes * (src.expert_index or 0)
                row_bytes = target.nbytes // target.shape[0]
                with ckpt.view(info, offset, nbytes) as raw:
                    if info.dtype == target.dtype:
                        pool.write_tensor(layer.index, e, src.pool_tensor, raw, offset=src.row_offset * row_bytes)
                    else:
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore", UserWarning)  # read-only buffer: we only read it
                            converted = torch.frombuffer(raw, dtype=info.dtype).to(target.dtype)
                        pool.write_tensor(
                            layer.index, e, src.pool_tensor, memoryview(converted.view(torch.uint8).numpy()),
                            offset=src.row_offset * row_bytes,
                        )
                ckpt.release(info, offset, nbytes)
            bar.update(1)
    bar.close()


def router_weight(router: torch.nn.Module) -> torch.Tensor:
    """A router's weight matrix (Switch keeps it in ``classifier``)."""
    return router.weight if hasattr(router, "weight") else router.classifier.weight


def plan_slots(
    model: torch.nn.Module,
    arch: Architecture,
    config,
    num_layers: int,
    policy: str,
    budget: int,
    headroom: int | str | None = None,
    expert_slots: int | str | None = None,
) -> int:
    """How many expert slots fit ``budget`` beside the model's resident (non-expert) weights."""
    num_experts, top_k, _, _ = arch.dims(config)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    expert_bytes = sum(-(-t.nbytes // 256) * 256 for t in arch.pool_tensors(config, dtype))  # as the pool packs them
    weights_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    reserve = parse_bytes(headroom) if headroom is not None else min(budget // 10, 2 << 30)
    total_experts = num_layers * num_experts
    if policy == "all_gpu":
        return total_experts
    if expert_slots is not None:
        text = str(expert_slots).strip()
        num_slots = round(float(text[:-1]) / 100 * total_experts) if text.endswith("%") else int(text)
        if not top_k <= num_slots <= total_experts:
            raise ExpertFlowError(
                f"expert_slots={expert_slots} gives {num_slots} slots; use between {top_k} (one layer's experts per "
                f"token) and {total_experts} (every expert)"
            )
        return num_slots
    num_slots = min(total_experts, max(0, budget - weights_bytes - reserve) // expert_bytes)
    if num_slots < top_k:
        minimum = weights_bytes + reserve + top_k * expert_bytes
        raise ExpertFlowError(
            f"gpu_memory={format_bytes(budget)} is below the minimum of {format_bytes(minimum)} for this model: "
            f"non-expert weights {format_bytes(weights_bytes)} + headroom {format_bytes(reserve)} + {top_k} "
            f"expert slots of {format_bytes(expert_bytes)} (one layer's experts per token)"
        )
    return num_slots


def attach(
    model: torch.nn.Module,
    arch: Architecture,
    pool: ExpertPool,
    num_slots: int,
    policy,
    owns_pool: bool = True,
    predictor=None,
) -> OffloadEngine:
    """Connects a model built under :func:`offloaded_experts` to a filled pool: ``model.expertflow``.

    ``policy``: a name, or a policy object (``expertflow.policies``) such as one with trace-driven
    forecasts in a benchmark.

    ``owns_pool=False`` leaves the pool open when the engine closes, so one pool can serve several
    engines in turn (benchmarks compare policies this way).
    """
    layers = moe_layers(model, arch)
    if isinstance(predictor, (str, Path)):
        from .predictor import RoutingPathPredictor, model_fingerprint

        predictor = RoutingPathPredictor.load(predictor, expected_fingerprint=model_fingerprint([router_weight(l.router) for l in layers]))
    if predictor is not None and hasattr(predictor, "config"):
        embed_dim = model.get_input_embeddings().embedding_dim
        if predictor.config.embed_dim != embed_dim or predictor.config.num_layers != len(layers):
            raise ValueError(
                f"the predictor was trained for {predictor.config.num_layers} MoE layers and {predictor.config.embed_dim}-dim "
                f"embeddings; this model has {len(layers)} and {embed_dim}"
            )
    offload_policy = policy if not isinstance(policy, str) else make_policy(policy, predictor)
    top_k = arch.dims(model.config)[1]
    cache = ExpertCache(pool, num_slots, policy=offload_policy.cache_policy, experts_per_token=top_k)
    model.expertflow = OffloadEngine(arch, layers, pool, cache, offload_policy, owns_pool, model, top_k)
    return model.expertflow


def load_offloaded(
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    *,
    backend: str | None = None,
    progress: bool = True,
) -> tuple[torch.nn.Module, Architecture, ExpertPool]:
    """A checkpoint folder -> (model without routed-expert weights, its architecture, the filled pool).

    :func:`attach` then connects the two under a policy; benchmarks attach one pool to several.
    """
    path = Path(path)
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path} has no config.json; pass the folder of a transformers checkpoint")
    config = transformers.AutoConfig.from_pretrained(path)
    arch = architecture_for(config.model_type)
    backend_obj = get_backend(backend)
    device = torch.device(device) if device is not None else torch.device("cuda" if backend_obj.is_gpu else "cpu")
    if (device.type == "cuda") != backend_obj.is_gpu:
        raise ExpertFlowError(
            f"device {device} does not match the {backend_obj.name} backend: the expert slots live where the backend "
            f"puts them; use device={'cuda' if backend_obj.is_gpu else 'cpu'}, or backend={'host' if backend_obj.is_gpu else 'cuda'}"
        )
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    ckpt = Checkpoint(path)
    try:
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # the experts' checkpoint keys are ours, not "unexpected"
        bars = transformers.utils.logging.is_progress_bar_enabled()
        if not progress:
            transformers.utils.logging.disable_progress_bar()
        try:
            with offloaded_experts(arch):
                model, info = arch.auto_class.from_pretrained(
                    path, dtype=dtype or "auto", device_map={"": device}, output_loading_info=True
                )
        finally:
            transformers.logging.set_verbosity(verbosity)
            if bars:
                transformers.utils.logging.enable_progress_bar()
        if info.get("missing_keys"):
            raise CheckpointError(
                f"the checkpoint at {path} lacks these weights: {', '.join(sorted(info['missing_keys'])[:8])}"
            )
        model.eval()
        layers = moe_layers(model, arch)
        if not layers:
            raise ExpertFlowError(f"found no routed experts in this {config.model_type} model")
        num_experts = arch.dims(config)[0]
        pool_dtype = dtype or next(p.dtype for p in model.parameters() if p.is_floating_point())
        tensors = arch.pool_tensors(config, pool_dtype)
        pool = ExpertPool.uniform(len(layers), num_experts, tensors, backend=backend_obj)
        try:
            _fill_pool(pool, layers, arch, config, ckpt, progress)
        except BaseException:
            pool.close()
            raise
    finally:
        ckpt.close()
    return model, arch, pool


def from_pretrained(
    path: str | Path,
    gpu_memory: int | str = "12GiB",
    policy: str = "expertflow",
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    *,
    predictor=None,
    headroom: int | str | None = None,
    expert_slots: int | str | None = None,
    backend: str | None = None,
    progress: bool = True,
) -> torch.nn.Module:
    """Loads a MoE checkpoint folder with its routed experts offloaded.

    Returns the ordinary transformers model (``generate()`` and ``forward()`` work unchanged) with
    ``model.expertflow`` (an :class:`~expertflow.offload.OffloadEngine`: ``stats()``,
    ``reset_stats()``, ``close()``).

    ``gpu_memory`` bounds everything ExpertFlow puts on the device: the non-expert weights, the expert
    slots and ``headroom`` for activations and the KV cache (default: a tenth of ``gpu_memory``, at
    most 2 GiB). The slots get the rest. ``expert_slots`` (a count, or a share of all experts such as
    ``"25%"``) sets the slot count directly instead. ``all_gpu`` keeps every expert resident whatever
    the budget. Without a GPU the host backend serves and the model computes on the CPU.
    ``predictor`` (a file from ``expertflow train-predictor`` for this model, or a loaded
    :class:`~expertflow.predictor.RoutingPathPredictor`) drives the ``expertflow`` policy; without
    one it plans from the previous token's path.
    """
    offload_policy = make_policy(policy)
    if predictor is not None and offload_policy.name != "expertflow":
        raise ValueError(f"a routing-path predictor drives the expertflow policy only, not {policy}")
    budget = parse_bytes(gpu_memory)
    model, arch, pool = load_offloaded(path, dtype, device, backend=backend, progress=progress)
    config = model.config
    num_experts = pool.num_experts(0)
    try:
        num_slots = plan_slots(model, arch, config, pool.num_layers, offload_policy.name, budget, headroom, expert_slots)
        attach(model, arch, pool, num_slots, offload_policy.name, predictor=predictor)
    except BaseException:
        pool.close()
        raise
    device = next(model.parameters()).device
    log.info(
        "%s: %d MoE layers x %d experts (%s each) in pinned memory; %d slots on %s (%s), policy %s",
        config.model_type, pool.num_layers, num_experts, format_bytes(pool.expert_bytes(0)), num_slots,
        device, pool.backend.name, offload_policy.name,
    )
    return model
