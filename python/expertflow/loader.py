"""``expertflow.from_pretrained``: a local MoE checkpoint onto a GPU far smaller than the model.

Steps: transformers builds the model on the meta device with each routed-experts class swapped for
:class:`~expertflow.offload.OffloadedExperts` (which has no weights), and loads every other weight
straight onto the compute device; the routed experts stream from the memory-mapped safetensors
shards into the pinned :class:`~expertflow.runtime.ExpertPool`, one tensor at a time; the slot count
follows from ``gpu_memory``.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import warnings
from pathlib import Path
from typing import cast

import torch
import transformers
from tqdm.auto import tqdm

from .checkpoint import Checkpoint, CheckpointError
from .cpu_experts import check_mode, check_threads
from .formats import COMPUTE_DTYPES, DTYPE_ALIASES, FORMATS, ExpertFormat, expert_format
from .models import Architecture, architecture_for, model_dtype
from .offload import MoELayer, OffloadedExperts, OffloadEngine
from .policies import make_policy
from .runtime import ExpertCache, ExpertFlowError, ExpertPool, backend_uses_gpu, get_backend, packed_bytes
from .units import format_bytes, parse_bytes, parse_slots

__all__ = ["from_pretrained", "enable_cuda_graphs", "compile_mode", "load_offloaded", "attach", "offloaded_experts", "moe_layers", "plan_slots", "read_config",
           "compute_dtype", "parse_bytes", "format_bytes"]

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
    # A deliberate monkeypatch (restored below). mypy forbids assigning to a method, and misreads the
    # pass-through signature of a function assigned to a class (it is compatible: it forwards any arguments).
    transformers.PreTrainedModel._initialize_weights = _initialize_weights  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        setattr(module, arch.experts_class, original)
        transformers.PreTrainedModel._initialize_weights = initialize  # type: ignore[method-assign]


def moe_layers(model: torch.nn.Module, arch: Architecture) -> list[MoELayer]:
    """The model's offloaded experts modules in execution order, with their routers."""
    layers: list[MoELayer] = []
    for path, module in model.named_modules():
        if isinstance(module, OffloadedExperts):
            parent = model.get_submodule(path.rsplit(".", 1)[0])
            layers.append(MoELayer(len(layers), path, module, getattr(parent, arch.router_attr)))
    stack = lambda p: p.split(".", 1)[0] if arch.encoder_decoder else ""  # noqa: E731
    for a, b in itertools.pairwise(layers):
        if stack(a.path) == stack(b.path):
            a.next = b
    return layers


def _fill_pool(pool: ExpertPool, layers: list[MoELayer], arch: Architecture, config, ckpt: Checkpoint, progress: bool,
               experts: list[int] | None = None, checkpoint_format: ExpertFormat | None = None,
               pool_format: ExpertFormat | None = None, dtype: torch.dtype | None = None) -> None:
    """Reads every expert (or, of each layer, those in ``experts``) from the checkpoint into the pool.

    Where the pool keeps another storage format than the checkpoint (``pool_format``: fp8 from bf16,
    dense from MXFP4, ...), each expert is staged in the checkpoint's format, expanded and stored in
    the pool's (``dtype``: the compute dtype of dense weights and biases)."""
    num_experts = pool.num_experts(0)
    wanted = list(range(num_experts)) if experts is None else experts
    checkpoint_format = checkpoint_format or FORMATS["dense"]
    convert = pool_format is not None and pool_format != checkpoint_format
    if convert and dtype is None:
        raise ValueError("converting experts between storage formats needs the compute dtype")
    staged = {t.name: t for t in arch.pool_tensors(config, cast(torch.dtype, dtype), checkpoint_format)} if convert else {}
    # Dense weights and biases may be converted to the compute dtype, fp8 scales to fp32; codes never are.
    dense_names = {n for w in arch.weights(config) for n in (w.name, f"{w.name}_bias")}
    bar = tqdm(total=len(layers) * len(wanted), desc="Loading experts", unit="expert", disable=not progress)
    source_dtype: tuple[torch.dtype, str] | None = None
    for layer in layers:
        packed = {t.name: t for t in pool.layout(layer.index)}
        for e in wanted:
            sources = arch.sources(layer.path, e, config, ckpt)
            if sources is None:
                raise CheckpointError(
                    f"expert {e} of MoE layer {layer.index} ({layer.path}) is not in the checkpoint at {ckpt.folder}; "
                    f"expected {arch.describe_sources(layer.path)}"
                )
            staging = {name: torch.empty(t.shape, dtype=t.dtype) for name, t in staged.items()}
            missing = sorted(set(staged if convert else packed) - {src.pool_tensor for src in sources})
            if missing:  # a part of the expert the checkpoint does not hold would be left as garbage
                raise CheckpointError(
                    f"expert {e} of MoE layer {layer.index} ({layer.path}) in {ckpt.folder} lacks {', '.join(missing)}; "
                    f"expected {arch.describe_sources(layer.path)}"
                )
            for src in sources:
                info = ckpt.info(src.checkpoint_name)
                target = staged[src.pool_tensor] if convert else packed[src.pool_tensor]
                # A published expert's gate and up each fill half of gate_up (and of its fp8 scales)
                halved = arch.gated and src.pool_tensor in ("gate_up", "gate_up_scale") and src.expert_index is None
                rows = target.shape[0] // 2 if halved else target.shape[0]
                want = (rows, *target.shape[1:])
                if src.expert_index is not None:
                    want = (num_experts, *want)
                if info.shape != want:
                    raise CheckpointError(
                        f"tensor '{info.name}' in {info.file} has shape {list(info.shape)}, expected {list(want)} "
                        f"for this {config.model_type} config"
                    )
                if src.pool_tensor in dense_names and target.dtype.itemsize > 1:  # dense weights and biases
                    if source_dtype is None:
                        source_dtype = (info.dtype, info.name)
                    elif info.dtype != source_dtype[0]:
                        raise CheckpointError(
                            f"tensor '{info.name}' in {info.file} is {info.dtype} but '{source_dtype[1]}' is {source_dtype[0]}; "
                            "all routed experts of a checkpoint must share one dtype"
                        )
                elif info.dtype != target.dtype and not (src.pool_tensor.endswith("_scale") and info.dtype.is_floating_point):
                    # codes must be the format's own (e5m2 is not e4m3); fp8 scales widen to fp32 exactly
                    raise CheckpointError(f"tensor '{info.name}' in {info.file} is {info.dtype}; {src.pool_tensor} must be {target.dtype}")
                nbytes = info.nbytes // num_experts if src.expert_index is not None else info.nbytes
                offset = nbytes * (src.expert_index or 0)
                row_bytes = target.nbytes // target.shape[0]
                with ckpt.view(info, offset, nbytes) as raw:
                    data = raw
                    if info.dtype != target.dtype:
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore", UserWarning)  # read-only buffer: we only read it
                            data = torch.frombuffer(raw, dtype=info.dtype).to(target.dtype).view(torch.uint8).numpy().data
                    if convert:
                        start = src.row_offset * row_bytes
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore", UserWarning)  # read-only buffer: we only read it
                            chunk = torch.frombuffer(data, dtype=torch.uint8)
                        staging[src.pool_tensor].view(-1).view(torch.uint8)[start : start + chunk.numel()] = chunk
                    else:
                        pool.write_tensor(layer.index, e, src.pool_tensor, data, offset=src.row_offset * row_bytes)
                ckpt.release(info, offset, nbytes)
            if convert:
                assert pool_format is not None and dtype is not None
                for weight in arch.weights(config):
                    dense = checkpoint_format.expand(weight, staging, torch.float32)
                    for name, tensor in pool_format.quantize(weight, dense).items():
                        pool.write_tensor(layer.index, e, name, tensor.to(packed[name].dtype))
                    if weight.bias:
                        pool.write_tensor(layer.index, e, f"{weight.name}_bias", staging[f"{weight.name}_bias"])
            bar.update(1)
    bar.close()


def router_weight(router: torch.nn.Module) -> torch.Tensor:
    """A router's weight matrix (Switch keeps it in ``classifier``)."""
    owner = router if hasattr(router, "weight") else router.get_submodule("classifier")
    # A Parameter; nn.Module's stubs type attributes as a tensor or submodule.
    return cast(torch.Tensor, owner.weight)


def plan_slots(
    model: torch.nn.Module,
    arch: Architecture,
    config,
    num_layers: int,
    policy: str,
    budget: int,
    headroom: int | str | None = None,
    expert_slots: int | str | None = None,
    expert_format: ExpertFormat | None = None,
    num_owned: int | None = None,
) -> int:
    """How many expert slots fit ``budget`` beside the model's resident (non-expert) weights; a slot
    holds one expert in ``expert_format`` (default dense). ``num_owned``: the experts of each layer
    this process holds (distributed: its share; default all), which caps the slots: more could never
    fill."""
    num_experts, top_k, _, _ = arch.dims(config)
    most = num_layers * (num_owned if num_owned is not None else num_experts)
    dtype = model_dtype(model)
    expert_bytes = packed_bytes(arch.pool_tensors(config, dtype, expert_format))
    weights_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    total_experts = num_layers * num_experts
    if policy == "all_gpu":
        return most
    if expert_slots is not None:
        num_slots = parse_slots(expert_slots).count(total_experts)
        if not top_k <= num_slots <= total_experts:
            raise ExpertFlowError(
                f"expert_slots={expert_slots} gives {num_slots} slots; use between {top_k} (one layer's experts per "
                f"token) and {total_experts} (every expert)"
            )
        return min(num_slots, most)
    reserve = parse_bytes(headroom) if headroom is not None else default_headroom(budget)
    num_slots = min(total_experts, max(0, budget - weights_bytes - reserve) // expert_bytes)
    if num_slots < top_k:
        need = weights_bytes + top_k * expert_bytes
        if headroom is not None:
            minimum, reserve_text = need + reserve, f"headroom {format_bytes(reserve)}"
        else:
            minimum = min_budget(need)
            reserve_text = f"headroom {format_bytes(default_headroom(minimum))} (a tenth of the budget, at most 2 GiB)"
        raise ExpertFlowError(
            f"gpu_memory={format_bytes(budget)} is below the minimum of {format_bytes(minimum, round_up=True)} "
            f"({minimum} bytes) for this model: non-expert weights {format_bytes(weights_bytes)} + {reserve_text} + "
            f"{top_k} expert slots of {format_bytes(expert_bytes)} (one layer's experts per token)"
        )
    return min(num_slots, most)


def default_headroom(budget: int) -> int:
    """Device memory kept for activations and the KV cache when none is given: a tenth, at most 2 GiB."""
    return min(budget // 10, 2 << 30)


def min_budget(need: int) -> int:
    """The smallest budget B with ``B - default_headroom(B) >= need``."""
    if need + (2 << 30) >= 10 * (2 << 30):  # the headroom is capped at 2 GiB there
        return need + (2 << 30)
    budget = max(0, need * 10 // 9 - 10)  # B - B // 10 grows by at most 1 per byte: step up to the first fit
    while budget - default_headroom(budget) < need:
        budget += 1
    return budget


def attach(
    model: torch.nn.Module,
    arch: Architecture,
    pool: ExpertPool,
    num_slots: int,
    policy,
    owns_pool: bool = True,
    predictor=None,
    shard=None,
    expert_format: ExpertFormat | None = None,
    cpu_experts: str = "off",
    recalibrate: bool = False,
    cpu_threads: int | None = None,
) -> OffloadEngine:
    """Connects a model built under :func:`offloaded_experts` to a filled pool: ``model.expertflow``.

    ``policy``: a name, or a policy object (``expertflow.policies``) such as one with trace-driven
    forecasts in a benchmark.

    ``owns_pool=False`` leaves the pool open when the engine closes, so one pool can serve several
    engines in turn (benchmarks compare policies this way). ``shard`` (an
    :class:`~expertflow.distributed.ExpertShard`): this process computes only its rank's experts.
    ``expert_format``: the storage format the pool holds the experts in (default: the one the
    loader recorded on the pool, else dense). ``cpu_experts`` (``off``, ``auto``, ``on``): whether
    missed experts may compute on the CPU from the pool (``cpu_experts.py``); ``recalibrate`` measures
    the machine again instead of reading the cached calibration; ``cpu_threads`` sets the CPU experts'
    threads (default: ``cpu_experts.default_threads``).
    """
    layers = moe_layers(model, arch)
    if isinstance(predictor, (str, Path)):
        from .predictor import RoutingPathPredictor, model_fingerprint

        predictor = RoutingPathPredictor.load(predictor, expected_fingerprint=model_fingerprint([router_weight(l.router) for l in layers]))
    if predictor is not None and hasattr(predictor, "config"):
        # A transformers model: nn.Module's stubs type the method as a tensor or submodule attribute.
        embed_dim = cast(transformers.PreTrainedModel, model).get_input_embeddings().embedding_dim
        if predictor.config.embed_dim != embed_dim or predictor.config.num_layers != len(layers):
            raise ValueError(
                f"the predictor was trained for {predictor.config.num_layers} MoE layers and {predictor.config.embed_dim}-dim "
                f"embeddings; this model has {len(layers)} and {embed_dim}"
            )
    offload_policy = policy if not isinstance(policy, str) else make_policy(policy, predictor)
    top_k = arch.dims(model.config)[1]
    cache = ExpertCache(pool, num_slots, policy=offload_policy.cache_policy, experts_per_token=top_k)
    try:
        engine = OffloadEngine(arch, layers, pool, cache, offload_policy, owns_pool, model, top_k, shard,
                               expert_format or pool.expert_format, cpu_experts, recalibrate, cpu_threads)
    except BaseException:
        cache.close()
        raise
    # nn.Module.__setattr__'s stub admits only tensors and modules; any value is a plain attribute.
    model.expertflow = engine  # type: ignore[assignment]
    return engine


def compute_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``dtype`` as a torch floating-point compute dtype (None: the checkpoint's)."""
    if dtype is None or dtype in COMPUTE_DTYPES.values():
        return dtype  # type: ignore[return-value]
    name = DTYPE_ALIASES.get(str(dtype), str(dtype)).removeprefix("torch.")
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"dtype '{dtype}' is not a compute dtype; use {', '.join(COMPUTE_DTYPES)} (or leave it out for the checkpoint's)")
    return COMPUTE_DTYPES[name]


def read_config(path: str | Path) -> transformers.PretrainedConfig:
    """The config of a checkpoint folder, with a clear error where transformers cannot read it."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path} has no config.json; pass the folder of a transformers checkpoint")
    try:
        return transformers.AutoConfig.from_pretrained(path)
    except Exception as e:  # transformers raises many kinds here; all mean the same to the user
        first = str(e).strip().splitlines()
        raise CheckpointError(f"{path / 'config.json'} is not a valid transformers config: {' '.join(first[-2:])}") from e


def _check_loading_info(info: dict, layers: list[MoELayer], path: Path) -> None:
    """Weights the checkpoint has but the model lacks, or the other way round, are errors that name them.

    Transformers reports the routed experts as unexpected (our modules have no weights): those of the
    model's own MoE layers are ours to load. Any other unexpected weight means config and checkpoint
    disagree (e.g. fewer layers in the config than in the weights), and loading would silently drop it.
    """
    ours = tuple(layer.path + "." for layer in layers)
    unexpected = sorted(k for k in info.get("unexpected_keys", ()) if not k.startswith(ours))
    missing = sorted(info.get("missing_keys", ()))
    mismatched = [f"{key} {list(have)} (the model has {list(want)})" for key, have, want in sorted(info.get("mismatched_keys", ()))]
    problems = []
    for what, keys in (("has weights this model does not", unexpected), ("lacks weights this model needs", missing),
                       ("has weights of other shapes", mismatched)):
        if keys:
            more = f" and {len(keys) - 8} more" if len(keys) > 8 else ""
            problems.append(f"{what} ({len(keys)}): {', '.join(keys[:8])}{more}")
    if problems:
        raise CheckpointError(
            f"the checkpoint at {path} does not match its config.json: it {'; it '.join(problems)}. "
            "Fix config.json (e.g. its layer or expert counts) to describe these weights"
        )


@contextlib.contextmanager
def _resident(path: Path, dtype: torch.dtype | None, device: torch.device, progress: bool):
    """Yields (model without routed-expert weights, its architecture, MoE layers, open checkpoint, the
    format the checkpoint stores its experts in)."""
    config = read_config(path)
    arch = architecture_for(config.model_type)
    checkpoint_format = arch.checkpoint_format(config)  # refuses quantizations we cannot read, before any weight loads
    num_experts, top_k = arch.dims(config)[:2]
    if not 1 <= top_k <= num_experts:
        raise CheckpointError(f"{path / 'config.json'} routes each token to {top_k} of {num_experts} experts; "
                              "top-k must be between 1 and the expert count")
    load_config: dict = {}
    if getattr(config, "quantization_config", None) is not None:
        if checkpoint_format.name == "fp8":
            # fp8 checkpoints quantize the resident layers too: transformers expands those; the routed
            # experts we read ourselves, in fp8.
            load_config = {"quantization_config": transformers.FineGrainedFP8Config(dequantize=True)}
        else:
            # gpt-oss MXFP4: only the routed experts are quantized, and we read them: transformers builds
            # the model unquantized and loads the rest.
            stripped = copy.deepcopy(config)
            del stripped.quantization_config
            load_config = {"config": stripped}
    with Checkpoint(path) as ckpt:  # validates every shard before transformers reads one
        verbosity = transformers.logging.get_verbosity()
        # Transformers would list every routed expert as unexpected; _check_loading_info reports the
        # weights that really are.
        transformers.logging.set_verbosity_error()
        bars = transformers.utils.logging.is_progress_bar_enabled()
        if not progress:
            transformers.utils.logging.disable_progress_bar()
        try:
            with offloaded_experts(arch):
                # Mismatched shapes are reported (and refused) by _check_loading_info, not raised with a
                # pointer to a report the verbosity above hides.
                model, info = arch.auto_class.from_pretrained(
                    path, dtype=dtype or "auto", device_map={"": device}, output_loading_info=True,
                    ignore_mismatched_sizes=True, **load_config,
                )
        finally:
            transformers.logging.set_verbosity(verbosity)
            if bars:
                transformers.utils.logging.enable_progress_bar()
        model.eval()
        layers = moe_layers(model, arch)
        if not layers:
            raise ExpertFlowError(f"found no routed experts in this {config.model_type} model")
        _check_loading_info(info, layers, path)
        yield model, arch, layers, ckpt, checkpoint_format


def _filled_pool(model, arch: Architecture, layers: list[MoELayer], ckpt: Checkpoint, backend_obj, progress: bool,
                 checkpoint_format: ExpertFormat, shard=None, pool_format: ExpertFormat | None = None) -> ExpertPool:
    """The pool, filled from the checkpoint, in ``pool_format`` (default: the checkpoint's own). With
    ``shard``: one shared pool for the host, created by rank 0 and mapped by the others; each rank
    reads its own experts into it."""
    config = model.config
    pool_dtype = model_dtype(model)
    num_experts = arch.dims(config)[0]
    pool_format = pool_format or checkpoint_format
    tensors = arch.pool_tensors(config, pool_dtype, pool_format)
    if shard is None:
        pool = ExpertPool.uniform(len(layers), num_experts, tensors, backend=backend_obj)
    else:
        from .distributed import open_shared_pool

        pool = open_shared_pool(shard, len(layers), num_experts, tensors, backend_obj)
    pool.expert_format = pool_format
    try:
        _fill_pool(pool, layers, arch, config, ckpt, progress,
                   None if shard is None else shard.owned_ids(num_experts), checkpoint_format, pool_format, pool_dtype)
        if shard is not None:
            shard.barrier()  # every expert is in before any rank computes
    except BaseException:
        pool.close()
        raise
    return pool


def _device_for(backend_obj, device: str | torch.device | None) -> torch.device:
    device = torch.device(device) if device is not None else torch.device("cuda" if backend_obj.is_gpu else "cpu")
    if (device.type == "cuda") != backend_obj.is_gpu:
        raise ExpertFlowError(
            f"device {device} does not match the {backend_obj.name} backend: the expert slots live where the backend "
            f"puts them; use device={'cuda' if backend_obj.is_gpu else 'cpu'}, or backend={'host' if backend_obj.is_gpu else 'cuda'}"
        )
    return device


def load_offloaded(
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    *,
    backend: str | None = None,
    progress: bool = True,
    expert_dtype: str | None = None,
) -> tuple[transformers.PreTrainedModel, Architecture, ExpertPool]:
    """A checkpoint folder -> (model without routed-expert weights, its architecture, the filled pool,
    in ``expert_dtype``'s storage format: default the checkpoint's).

    :func:`attach` then connects the two under a policy; benchmarks attach one pool to several.
    """
    dtype = compute_dtype(dtype)
    pool_format = expert_format(expert_dtype) if expert_dtype is not None else None
    backend_obj = get_backend(backend)
    device = _device_for(backend_obj, device)
    with _resident(Path(path), dtype, device, progress) as (model, arch, layers, ckpt, checkpoint_format):
        return model, arch, _filled_pool(model, arch, layers, ckpt, backend_obj, progress, checkpoint_format,
                                         pool_format=pool_format)


def compile_mode(device: torch.device, mode: str | None = None) -> str:
    """The torch.compile mode decoding on ``device`` compiles with (:func:`enable_cuda_graphs`):
    ``mode``, by default ``"reduce-overhead"`` (CUDA graphs), which needs a CUDA device. Checked
    before any weight loads where the device is known first (``from_pretrained``, the benchmark)."""
    if mode is None and device.type != "cuda":
        raise ValueError(f"decoding with CUDA graphs needs a CUDA device; this runs on {device.type}. Leave them off "
                         "here (enable_cuda_graphs(model, mode='default') compiles without graphs)")
    mode = mode or "reduce-overhead"
    if mode not in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
        raise ValueError(f"mode must be one of torch.compile's modes (default, reduce-overhead, ...), got '{mode}'")
    return mode


def enable_cuda_graphs(model: torch.nn.Module, mode: str | None = None) -> None:
    """Decodes ``model`` (one :func:`from_pretrained` returned) with its non-expert layers compiled:
    ``generate()`` then keeps a static KV cache and runs each decoding pass's attention, norms and
    routers as compiled graphs, replayed as CUDA graphs (``mode``: torch.compile's, by default
    ``"reduce-overhead"``, which needs a CUDA device; another, such as ``"default"`` on the CPU,
    compiles without graphs). The routed experts stay eager between the graphs (the engine decides per
    layer on the host), so each pass is a few graphs a layer instead of some hundred kernel launches
    a layer from Python. At batch 1 those launches are most of a resident step (transformers' code
    held the H200 machine's GPU idle 14-37 ms a pass against 2.3-2.7 ms of kernels,
    docs/cpu_experts.md). The prompt's pass runs eagerly, as transformers compiles decoding only.

    Sets ``model.generation_config`` (``cache_implementation="static"``, a ``compile_config`` that
    allows graph breaks), and torch's compiler settings for the whole process: the recompile limit
    raised to cover the layers (each decoder layer compiles once per decoding shape, as torch
    specialises on its index), nested graph breaks on (a break at the experts resumes in the frames
    around it: about two graphs a layer instead of five) and the guards on module hooks on. The
    first ``generate()`` compiles (tens of seconds); later ones of the same batch size and length
    (prompt plus new tokens: the static cache's) replay, and each new shape compiles again, up to 8
    of them. A ``generate()`` argument overrides either generation setting.
    A hook added to a module later makes the code that calls it compile again (torch's hook guards
    are turned on); ExpertFlow's own hooks (``offload.StableHook``) share one dispatcher a module."""
    from transformers import CompileConfig

    if not hasattr(model, "generation_config"):
        raise TypeError(f"enable_cuda_graphs needs a transformers model with generate(), not {type(model).__name__}")
    device = next(model.parameters()).device
    mode = compile_mode(device, mode)
    config = CompileConfig(fullgraph=False, dynamic=False, mode=mode)
    # transformers compiles on accelerators only unless told (a private flag; harmless where absent)
    config._compile_all_devices = device.type != "cuda"  # type: ignore[assignment]
    generation_config = cast(transformers.GenerationConfig, model.generation_config)
    generation_config.cache_implementation = "static"
    generation_config.compile_config = config
    num_layers = int(getattr(model.config, "num_hidden_layers", 0) or 0)
    dynamo = torch._dynamo.config
    # Each layer's frames compile once per decoding shape (batch size, static cache length): room
    # for 8 shapes; past that, torch runs the layers that hit the limit eagerly.
    name = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    limit = max(getattr(dynamo, name), 8 * (num_layers + 1))
    setattr(dynamo, name, limit)
    if hasattr(dynamo, "accumulated_recompile_limit"):
        dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 4 * limit)
    # A hook added after compiling (a module's first StableHook) must make its caller compile again,
    # or the compiled code never calls it: torch skips the guards on hooks by default.
    dynamo.skip_nnmodule_hook_guards = False
    # A break inside the experts call resumes in the frames around it (decoder layer, model) instead
    # of ending a graph in each: about two graphs a layer, not five (each CUDA-graph replay costs
    # host time: ~190 us under a profiler on the H200 machine).
    if hasattr(dynamo, "nested_graph_breaks"):
        dynamo.nested_graph_breaks = True


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
    distributed: bool = False,
    expert_dtype: str | None = None,
    cpu_experts: str = "off",
    recalibrate: bool = False,
    cpu_threads: int | None = None,
    cuda_graphs: bool = False,
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

    ``expert_dtype``: the storage format of the experts in host memory, over the link and in their
    slots (``formats.py``): None keeps the checkpoint's (bf16, gpt-oss's MXFP4, an FP8 release's fp8);
    ``"fp8"``, ``"int8"`` or ``"mxfp4"`` quantize at load; ``"bf16"`` (or any dense name: the compute
    dtype's) expands a quantized checkpoint. Slots are sized by it,
    so the same ``gpu_memory`` holds 2-4x more compressed experts.

    ``distributed=True`` (under ``torchrun``, one process per GPU of one host): each process caches
    and computes its share of the experts with ``gpu_memory`` (and ``expert_slots``) of its own, the
    host holds one shared pool, and every process returns the same model (``distributed.py``).

    ``cpu_experts``: ``"auto"`` lets a calibrated cost model compute a missed expert on the CPU,
    from the pool, where that finishes the layer sooner than copying it; ``"on"`` sends every miss
    there; ``"off"`` (the default) never. On a GPU the CPU's experts round differently, so tokens may
    differ from ``all_gpu``'s at near-ties. The calibration is cached per machine;
    ``recalibrate=True`` measures again (``cpu_experts.py``). ``cpu_threads``: the CPU experts'
    threads (default: torch's, beside a GPU at most the cores less one: ``cpu_experts.default_threads``).

    ``cuda_graphs=True``: ``generate()`` decodes with the non-expert layers compiled and replayed as
    CUDA graphs around the eager experts (:func:`enable_cuda_graphs`).
    """
    offload_policy = make_policy(policy)
    check_mode(cpu_experts, distributed)
    check_threads(cpu_threads, cpu_experts)
    if predictor is not None and offload_policy.name != "expertflow":
        raise ValueError(f"a routing-path predictor drives the expertflow policy only, not {policy}")
    # Every argument is checked before any weight loads.
    requested_format = expert_format(expert_dtype) if expert_dtype is not None else None
    budget = parse_bytes(gpu_memory)
    if headroom is not None:
        parse_bytes(headroom)
    if expert_slots is not None:
        parse_slots(expert_slots)
    dtype = compute_dtype(dtype)
    shard = None
    if distributed:
        from .distributed import init_distributed

        if device is not None:
            raise ValueError("distributed=True places each process on its own GPU (LOCAL_RANK); leave device unset")
        use_gpu = backend_uses_gpu(backend)  # without a backend: one would open a context on GPU 0
        shard, device = init_distributed(use_gpu)
        backend_obj = get_backend(backend, device.index if use_gpu else 0)
        progress = progress and shard.rank == 0
    else:
        backend_obj = get_backend(backend)
    device = _device_for(backend_obj, device)
    if cuda_graphs:
        compile_mode(device)
    with _resident(Path(path), dtype, device, progress) as (model, arch, layers, ckpt, checkpoint_format):
        config = model.config
        pool_format = requested_format or checkpoint_format
        # The slot count needs the resident weights' size; the pool (the model's bulk) is read after it.
        num_owned = len(shard.owned_ids(arch.dims(config)[0])) if shard is not None else None
        num_slots = plan_slots(model, arch, config, len(layers), offload_policy.name, budget, headroom, expert_slots,
                               pool_format, num_owned)
        pool = _filled_pool(model, arch, layers, ckpt, backend_obj, progress, checkpoint_format, shard, pool_format)
    try:
        attach(model, arch, pool, num_slots, offload_policy.name, predictor=predictor, shard=shard,
               cpu_experts=cpu_experts, recalibrate=recalibrate, cpu_threads=cpu_threads)
    except BaseException:
        pool.close()
        raise
    if cuda_graphs:
        enable_cuda_graphs(model)
    dense_bytes = packed_bytes(arch.pool_tensors(config, model_dtype(model)))
    stored = "" if pool_format.dense else f" as {pool_format.name}, {format_bytes(dense_bytes)} dense"
    log.info(
        "%s: %d MoE layers x %d experts (%s each%s) in pinned memory; %d slots on %s (%s), policy %s",
        config.model_type, pool.num_layers, pool.num_experts(0), format_bytes(pool.expert_bytes(0)), stored, num_slots,
        device, pool.backend.name, offload_policy.name,
    )
    return model
