"""The decode benchmark: every policy at several slot counts on one model, against the bound.

A model comes from a checkpoint folder (``--model``, live routing) or from a published model's
dimensions with random weights (``--arch``, see ``shapes.py``). With ``--routing trace:FILE`` each
layer's experts for each token are forced from a recorded trace (in the shared formats); batch
sequence b replays the trace from offset ``b * num_tokens / B``. The forecasts the ``expertflow``
policy plans with are then those of ``oracles.py``: ``history``, ``oracle``, ``noisy-oracle:R``,
``gate-oracle:R``; with live routing, ``history`` or a trained predictor file.

Per configuration (policy, forecast, slots): a warm-up generation, then a measured one of the same
routing. Reported: ms per decoded token (median over the decode steps, host clock at each forward's
start), bytes copied and demand misses per decoded token, hit ratio, stall share, peak device memory
beside the budget, and the bound of that slot count from the same run: max(Belady's bytes on the same
accesses / the pinned bandwidth measured at start, ``all_gpu`` ms per token). With CPU experts
(``--cpu-experts``), each row of a mode other than ``off`` also gives its time over the same policy,
forecast and slots with GPU-only offload: ``x_gpu_only`` for the decode step, ``prefill_x_gpu_only``
for the prompt's pass (below 1: faster).
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from tqdm.auto import tqdm

from .. import _C
from ..cpu_experts import CostModel, check_mode, check_threads
from ..files import atomic_output
from ..formats import FORMATS, ExpertFormat, expert_format
from ..loader import attach, compile_mode, enable_cuda_graphs, load_offloaded, moe_layers, offloaded_experts
from ..models import Architecture, architecture_for, model_dtype
from ..offload import OffloadedExperts, StableHook
from ..oracles import GateOracle, TraceOracle, TraceSchedule, parse_forecast
from ..policies import POLICY_NAMES, Expertflow, GateAhead, make_policy
from ..replay import next_use_positions
from ..runtime import ExpertPool, get_backend, packed_bytes
from ..timing import median_ms
from ..traces import read_trace
from ..units import format_bytes, parse_slots
from .shapes import SHAPES, make_config

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["BenchConfig", "BenchModel", "build_model", "run_bench", "plot", "save", "format_table", "TraceForcing",
           "belady_bytes", "gpu_only_row"]

log = logging.getLogger(__name__)


@dataclass
class BenchConfig:
    model: str | None = None  # checkpoint folder (live routing), or:
    arch: str | None = None  # a key of shapes.SHAPES (random weights)
    layers: int | None = None
    routing: str = "live"  # or "trace:FILE"
    batch: int = 1
    slots: list[str] = field(default_factory=lambda: ["25%"])
    policies: list[str] = field(default_factory=lambda: list(POLICY_NAMES))
    predictors: list[str] = field(default_factory=lambda: ["history"])
    gate_accuracy: float = 0.8  # gate_ahead's emulated gate-ahead in trace mode
    new_tokens: int = 32
    prompt_len: int = 16
    prompt_ids: list[int] | None = None
    transformers: bool = True  # the resident model without ExpertFlow (random-weight models only)
    accelerate: str | None = None  # slots share at which to run accelerate's device_map offload
    dtype: torch.dtype = torch.bfloat16
    expert_dtype: str | None = None  # storage format of the experts (formats.py); None: the checkpoint's, or dense
    cpu_experts: list[str] = field(default_factory=lambda: ["off"])  # cpu_experts.py modes, each policy under each
    recalibrate: bool = False
    cpu_threads: int | None = None  # the CPU experts' threads (None: cpu_experts.default_threads)
    layer_trace: bool = False  # each row gets the timed run's per-layer records (OffloadEngine.layer_trace)
    cuda_graphs: bool = False  # decode with the non-expert layers as CUDA graphs (loader.enable_cuda_graphs), every row
    config_overrides: dict | None = None  # test hook: smaller dimensions
    progress: bool = True

    def validate(self) -> None:
        if (self.model is None) == (self.arch is None):
            raise ValueError("give either --model (a checkpoint folder) or --arch (random weights at real dimensions)")
        if self.arch is not None and self.arch not in SHAPES:
            raise ValueError(f"unknown --arch '{self.arch}'; choose one of {', '.join(SHAPES)}")
        if self.routing != "live" and not self.routing.startswith("trace:"):
            raise ValueError(f"--routing must be live or trace:FILE, got '{self.routing}'")
        if self.routing.startswith("trace:") and not Path(self.routing[6:]).exists():
            raise ValueError(f"trace file {self.routing[6:]} does not exist")
        for p in self.policies:
            if p not in POLICY_NAMES:
                raise ValueError(f"unknown policy '{p}'; choose from {', '.join(POLICY_NAMES)}")
        if self.batch < 1 or self.new_tokens < 2 or self.prompt_len < 1:
            raise ValueError("--batch and --prompt-len must be at least 1 and --new-tokens at least 2")
        if not 0.0 <= self.gate_accuracy <= 1.0:
            raise ValueError(f"--gate-accuracy must be between 0 and 1, got {self.gate_accuracy}")
        if self.arch is not None and self.prompt_ids is not None:
            raise ValueError("--prompt-ids needs a checkpoint's vocabulary; random-weight --arch models take --prompt-len")
        for s in self.slots + ([self.accelerate] if self.accelerate else []):
            parse_slots(s, "slots")  # the syntax now; the count once the model's experts are known
        expert_format(self.expert_dtype)
        for mode in self.cpu_experts:
            check_mode(mode)
        check_threads(self.cpu_threads, "on" if any(mode != "off" for mode in self.cpu_experts) else "off")
        for spec in self.predictors:
            if self.routing == "live":
                if spec != "history" and not Path(spec).exists():
                    raise ValueError(f"with live routing a predictor is 'history' or a predictor file; {spec} is neither")
            else:
                parse_forecast(spec)


def _slot_share(text: str, total: int) -> int:
    n = parse_slots(text, "slots").count(total)
    if n > total:
        raise ValueError(f"slots '{text}' gives {n} slots but the model has {total} experts; use at most {total}")
    return n


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pinned_bandwidth(device: torch.device, nbytes: int = 1 << 30, reps: int = 5) -> float:
    """Host-to-device bytes/s from pinned memory (the host backend: a memcpy), median of ``reps``."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    ms = median_ms(lambda: dst.copy_(src, non_blocking=True), reps, sync=lambda: _sync(device), warmup=1)
    return nbytes / (ms / 1e3)


def _cost_model_fields(cost_model: CostModel | None) -> dict:
    """A row's view of the CPU experts' cost model (all None without one): its calibration; the
    in-step CPU time over the calibrated (``{"without_demand_loads" | "with_demand_loads": {calibration
    point's tokens: scale}}``) and how far single experts strayed from it; and a copy's in-step time
    over its calibrated, as the model had learnt them by the end."""
    if cost_model is None:
        return dict.fromkeys(("cpu_calibration", "cpu_scales", "cpu_spreads", "link_scale"))
    return {"cpu_calibration": asdict(cost_model.calibration), "cpu_scales": cost_model.by_point(cost_model.cpu_scales),
            "cpu_spreads": cost_model.by_point(cost_model.cpu_spreads), "link_scale": cost_model.link_scale}


def _routers(model: torch.nn.Module, arch: Architecture) -> list[torch.nn.Module]:
    """The routers of the MoE layers, in execution order (offloaded or resident experts alike)."""
    out = []
    for path, module in model.named_modules():
        if isinstance(module, OffloadedExperts) or type(module).__name__ == arch.experts_class:
            out.append(getattr(model.get_submodule(path.rsplit(".", 1)[0]), arch.router_attr))
    return out


class TraceForcing:
    """Replaces each router's choice with a trace's, and times each forward pass.

    A forward pre-hook on the input embeddings moves the schedule to the next step (the first pass
    after :meth:`reset` is step 0, the prefill) and records the host time; a forward hook on each router
    swaps its expert indices for the schedule's. The whole run's routing goes to the device once.
    """

    def __init__(self, schedule: TraceSchedule | None, device: torch.device) -> None:
        self.schedule = schedule
        self.device = device
        self.table: list[torch.Tensor] = []
        if schedule is not None:
            for s in range(schedule.num_steps):
                ex = schedule.experts(s)  # [B, n, L, k]
                self.table.append(torch.from_numpy(ex.reshape(-1, *ex.shape[2:])).to(device))
        self.times: list[float] = []
        self.on_step = None
        self._fresh = True
        self._handles: list = []

    def attach(self, model: torch.nn.Module, arch: Architecture) -> None:
        self.detach()
        # A transformers model: nn.Module's stubs type the method as a tensor or submodule attribute.
        embeddings = cast("PreTrainedModel", model).get_input_embeddings()
        self._handles.append(StableHook(embeddings, self._pre, pre=True))
        if self.schedule is not None:
            self._handles += force_routing(model, arch, lambda layer: self.table[self.schedule.step][:, layer])

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def reset(self, on_step=None) -> None:
        self._fresh, self.times, self.on_step = True, [], on_step

    def _pre(self, module, inputs) -> None:
        step = 0 if self._fresh else len(self.times)
        self._fresh = False
        if self.schedule is not None:
            self.schedule.step = min(step, self.schedule.num_steps - 1)
        if self.on_step is not None:
            self.on_step(step)
        self.times.append(time.perf_counter())


class _ForcedExperts:
    """Offloaded experts that take ``forced()`` as their routing (``OffloadedExperts.forced_routing``)
    until :meth:`remove`."""

    def __init__(self, module: OffloadedExperts, forced: Callable[[], torch.Tensor]) -> None:
        self.module, self.forced = module, forced
        module.forced_routing = forced

    def remove(self) -> None:
        if self.module.forced_routing is self.forced:  # not a later forcer's
            self.module.forced_routing = None


def force_routing(model: torch.nn.Module, arch: Architecture, forced) -> list:
    """Replaces each MoE layer's expert indices with ``forced(layer)`` ``[T, k]`` (a trace's choice)
    in top-k models: offloaded experts take it themselves, eagerly (and for the engine's gate-ahead
    guess of their layer); the resident model's routers through a forward hook. Returns the handles
    (``remove()``)."""
    handles: list = []
    experts = [m for m in model.modules() if isinstance(m, OffloadedExperts) or type(m).__name__ == arch.experts_class]
    for layer, (router, module) in enumerate(zip(_routers(model, arch), experts, strict=True)):
        if isinstance(module, OffloadedExperts) and module.gated:
            handles.append(_ForcedExperts(module, functools.partial(forced, layer)))
        else:
            handles.append(StableHook(router, _forcing_hook(forced, layer)))
    return handles


def _forcing_hook(forced, layer: int):
    """A router's forward hook that swaps its expert indices for ``forced(layer)``."""
    def hook(module, inputs, output):
        logits, weights, indices = output
        chosen = forced(layer)
        if chosen.shape[0] != indices.shape[0]:
            raise ValueError(f"the forced routing gives {chosen.shape[0]} tokens but the model runs {indices.shape[0]}")
        return logits, weights, chosen.to(indices.dtype)

    return hook


def belady_bytes(visits: list[tuple[int, list[int]]], num_slots: int, expert_bytes: int, count_from: int) -> int:
    """Bytes demand paging under Belady copies for ``visits`` [(layer, experts)], counting the visits
    from index ``count_from`` on (the earlier ones warm the cache). A visit needing more experts than
    there are slots runs in waves, as the engine runs it."""
    waves = []
    for i, (layer, experts) in enumerate(visits):
        waves += [(i, layer, experts[w : w + num_slots]) for w in range(0, len(experts), num_slots)]
    count_from = next((j for j, w in enumerate(waves) if w[0] >= count_from), len(waves))
    visits = [(layer, experts) for _, layer, experts in waves]
    nexts = next_use_positions(visits)
    cache = _C.SlotCache(num_slots, "belady")
    misses = 0
    for i, (layer, experts) in enumerate(visits):
        hits = cache.access(layer, experts, nexts[i])[0]
        if i >= count_from:
            misses += len(experts) - hits
    return misses * expert_bytes


def check_trace(trace, num_experts: int, top_k: int, model: str | None) -> None:
    """The trace must route among the model's experts, as many a token as the model does."""
    if trace.num_experts != num_experts:
        raise ValueError(f"the trace routes among {trace.num_experts} experts but {model} has {num_experts}; "
                         "use a trace of this model")
    if trace.max_experts_per_layer != top_k:
        raise ValueError(f"the trace routes each token to {trace.max_experts_per_layer} experts but the model to "
                         f"{top_k}; use a trace recorded with the model's top-k")


class BenchModel:
    """The model under test: its offloaded form, the pool, and (random weights) the resident form."""

    def __init__(self, cfg: BenchConfig, device: torch.device, backend) -> None:
        self.device = device
        self.resident = None
        self.recalibrated = False  # a run with --recalibrate measured the CPU experts' costs for this model
        # the routing trace (trace:FILE), read once
        self.trace = read_trace(cfg.routing[6:]) if cfg.routing.startswith("trace:") else None
        if cfg.model is not None:
            self.model, self.arch, self.pool = load_offloaded(cfg.model, device=device, backend=backend.name,
                                                              progress=cfg.progress, expert_dtype=cfg.expert_dtype)
            self.source = cfg.model
            try:
                if self.arch.encoder_decoder:
                    raise ValueError(f"{cfg.model} is an encoder-decoder model; the benchmark times decoder-only models")
                if self.trace is not None:
                    check_trace(self.trace, self.num_experts, self.top_k, cfg.model)
            except BaseException:
                self.pool.close()
                raise
            return
        arch = cfg.arch
        if arch is None:  # validate() requires one of the two
            raise ValueError("give either --model (a checkpoint folder) or --arch (random weights at real dimensions)")
        top_k = self.trace.max_experts_per_layer if self.trace is not None else None
        config = make_config(arch, cfg.layers, top_k, cfg.config_overrides)
        self.arch = architecture_for(config.model_type)
        if self.trace is not None:  # before any weight is built
            check_trace(self.trace, *self.arch.dims(config)[:2], arch)
        self.source = f"{arch} ({SHAPES[arch].source}), random weights"
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        with torch.device(device):
            full = AutoModelForCausalLM.from_config(config, dtype=cfg.dtype).eval()
            with torch.no_grad():
                for p in full.parameters():
                    p.normal_(0, 0.02)
            with offloaded_experts(self.arch):
                self.model = AutoModelForCausalLM.from_config(config, dtype=cfg.dtype).eval()
        self.model.load_state_dict(full.state_dict(), strict=False)
        layers = moe_layers(self.model, self.arch)
        num_experts = self.arch.dims(config)[0]
        fmt = expert_format(cfg.expert_dtype)
        self.pool = ExpertPool.uniform(len(layers), num_experts, self.arch.pool_tensors(config, cfg.dtype, fmt), backend=backend)
        self.pool.expert_format = fmt  # as the loader records it: attach reads it from the pool
        experts = [m for m in full.modules() if type(m).__name__ == self.arch.experts_class]
        weights = {w.name: w for w in self.arch.weights(config)}
        with torch.no_grad():
            for l, module in enumerate(experts):
                for e in range(num_experts):
                    views = self.pool.expert(l, e)
                    for name, dense in (("gate_up", module.gate_up_proj[e]), ("down", module.down_proj[e])):
                        for stored, tensor in fmt.quantize(weights[name], dense).items():  # dense: as it is
                            views[stored].copy_(tensor)
        self.resident = full if cfg.transformers else None
        if self.resident is None:
            del full
        if device.type == "cuda":
            torch.cuda.empty_cache()

    @property
    def expert_format(self) -> ExpertFormat:
        return self.pool.expert_format or FORMATS["dense"]

    @property
    def num_layers(self) -> int:
        return self.pool.num_layers

    @property
    def top_k(self) -> int:
        return self.arch.dims(self.model.config)[1]

    @property
    def num_experts(self) -> int:
        return self.pool.num_experts(0)

    @property
    def expert_bytes(self) -> int:
        return self.pool.expert_bytes(0)

    def resident_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.model.parameters(), *self.model.buffers()))


def _policy(name: str, spec: str | None, cfg: BenchConfig, schedule: TraceSchedule | None):
    """(policy object, forecast label) of one configuration."""
    if name == "gate_ahead":
        if schedule is None:
            return make_policy("gate_ahead"), "router"
        gate = GateOracle(schedule, cfg.gate_accuracy)
        return GateAhead(gate), gate.name
    if name != "expertflow":
        return make_policy(name), None
    if spec is None:  # run_bench gives expertflow one configuration per --predictors entry
        raise ValueError("the expertflow policy needs a forecast: 'history', a predictor file or a trace forecast")
    if schedule is None:
        if spec == "history":
            return Expertflow(None, "router"), "history+router"
        from ..predictor import RoutingPathPredictor

        predictor = RoutingPathPredictor.load(spec)
        return Expertflow(predictor, "router"), f"{Path(spec).name}+router"
    kind, rate = parse_forecast(spec)
    if kind in ("oracle", "noisy-oracle"):
        return Expertflow(TraceOracle(schedule, rate), None), spec
    if kind == "gate-oracle":
        return Expertflow(None, GateOracle(schedule, rate)), spec
    return Expertflow(None, None), spec


def _generate(model, prompt: torch.Tensor, n: int) -> list[list[int]]:
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0)
    return out[:, prompt.shape[1]:].tolist()


def _timed(model, prompt, n, forcing: TraceForcing, device, on_step=None) -> tuple[list[list[int]], list[float]]:
    """Generates ``n`` tokens; returns them and the decode steps' durations in ms."""
    forcing.reset(on_step)
    _sync(device)
    tokens = _generate(model, prompt, n)
    _sync(device)
    times = forcing.times + [time.perf_counter()]
    return tokens, [(b - a) * 1e3 for a, b in itertools.pairwise(times[1:])]


def build_model(cfg: BenchConfig) -> BenchModel:
    """The model ``cfg`` describes, built once to run several configurations that differ only in
    what :func:`run_bench` varies (batch, prompt, slots, policies, forecasts), e.g. one per batch
    size. Close its ``pool`` when done. Only the first run of a random-weight model times
    transformers' resident model (and accelerate's offload of it), which that run then frees."""
    backend, device = _checked_device(cfg)
    return BenchModel(cfg, device, backend)


def _checked_device(cfg: BenchConfig) -> tuple:
    """(backend, device) for ``cfg``, once it is checked (before any weight is built)."""
    cfg.validate()
    backend = get_backend()
    device = torch.device("cuda" if backend.is_gpu else "cpu")
    if cfg.accelerate and (device.type != "cuda" or cfg.arch is None):
        raise ValueError("--accelerate compares with accelerate's device_map offload: it needs a GPU and an --arch model")
    if cfg.cuda_graphs:
        compile_mode(device)
    return backend, device


def run_bench(cfg: BenchConfig, model: BenchModel | None = None,
              on_row: Callable[[dict], None] | None = None) -> dict:
    """Runs every configuration of ``cfg``; returns the results (see the module docstring).
    ``model``: one :func:`build_model` made for ``cfg`` earlier, to run it again (the caller closes
    its pool). ``on_row``: called after each configuration with the results so far, marked
    ``"partial": True`` (no ``x_lru`` nor ``x_gpu_only``, no accelerate run yet), so that a run cut
    short (a time limit) still leaves the configurations it finished."""
    backend, device = _checked_device(cfg)
    logging.getLogger("expertflow").setLevel(logging.WARNING)
    m = model if model is not None else BenchModel(cfg, device, backend)
    if cfg.cuda_graphs:  # every configuration alike (all_gpu, GPU-only, the CPU's modes, transformers' own)
        for decoder in (m.model, m.resident):
            if decoder is not None:
                enable_cuda_graphs(decoder)
    L, E = m.num_layers, m.num_experts
    total = L * E
    if cfg.prompt_ids is not None:
        prompt = torch.tensor([cfg.prompt_ids] * cfg.batch, device=device)
    else:
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(1, m.model.config.vocab_size, (cfg.batch, cfg.prompt_len), generator=g).to(device)
    schedule = None
    if m.trace is not None:  # checked against the model when it was built
        trace = m.trace
        stride = max(1, trace.num_tokens // cfg.batch)
        schedule = TraceSchedule(trace, L, cfg.new_tokens, [b * stride for b in range(cfg.batch)], prompt.shape[1])
    if schedule is None:  # trained predictors must fit the model before any configuration runs
        from ..loader import router_weight
        from ..predictor import RoutingPathPredictor, model_fingerprint

        fingerprint = model_fingerprint([router_weight(r) for r in _routers(m.model, m.arch)])
        for predictor in cfg.predictors:
            if predictor != "history" and "expertflow" in cfg.policies:
                RoutingPathPredictor.load(predictor, expected_fingerprint=fingerprint)
    forcing = TraceForcing(schedule, device)
    bandwidth = pinned_bandwidth(device)
    result: dict = {
        "machine": {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                    "backend": backend.name, "torch": torch.__version__, "host": platform.node()},
        "model": m.source, "arch": cfg.arch, "num_layers": L, "num_experts": E, "top_k": m.top_k,
        "routing": cfg.routing, "batch": cfg.batch, "prompt_len": int(prompt.shape[1]), "new_tokens": cfg.new_tokens,
        "expert_bytes": m.expert_bytes, "expert_dtype": m.expert_format.name,
        "dense_expert_bytes": packed_bytes(m.arch.pool_tensors(m.model.config, model_dtype(m.model))),
        "pool_bytes": m.pool.total_bytes, "resident_bytes": m.resident_bytes(),
        "pinned_gbps": bandwidth / 1e9, "cuda_graphs": cfg.cuda_graphs, "rows": [],
    }

    # The access sequence of a warm-up plus a measured run; the Belady bytes of its decode steps.
    visits_cache: dict = {}

    def visits() -> list[list[tuple[int, list[int]]]]:  # per step: (layer, experts) per layer visit
        if "v" not in visits_cache:
            if schedule is not None:
                steps = []
                for s in range(schedule.num_steps):
                    ex = schedule.experts(s).reshape(-1, L, schedule.top_k)
                    steps.append([(l, sorted(set(ex[:, l].ravel().tolist()))) for l in range(L)])
            else:
                steps = _record_live(m, prompt, cfg, device)
            visits_cache["v"] = steps
        return visits_cache["v"]

    def bound_ms(num_slots: int) -> tuple[float, float]:
        steps = visits()
        flat = [v for step in steps for v in step] * 2
        start = len(flat) // 2 + len(steps[0])  # the measured run's first decode step
        nbytes = belady_bytes(flat, num_slots, m.expert_bytes, start) / (len(steps) - 1)
        return nbytes, nbytes / bandwidth * 1e3

    if cfg.transformers and m.resident is not None:
        forcing.attach(m.resident, m.arch)
        _timed(m.resident, prompt, cfg.new_tokens, forcing, device)
        tokens, steps_ms = _timed(m.resident, prompt, cfg.new_tokens, forcing, device)
        result["transformers"] = {"ms_per_token": statistics.median(steps_ms), "tokens": tokens}
        forcing.detach()
        m.resident = m.resident.to("cpu") if cfg.accelerate else None
        if device.type == "cuda":
            torch.cuda.empty_cache()

    forcing.attach(m.model, m.arch)
    try:  # a reused model must not keep this run's routing hooks, whatever happens
        configs: list[tuple[str, int, str, str | None, str]] = []  # (slots, num_slots, policy, forecast, cpu experts)
        for share in cfg.slots:
            num_slots = _slot_share(share, total)
            for name in cfg.policies:
                if name == "all_gpu":
                    continue
                for spec in (cfg.predictors if name == "expertflow" else [None]):
                    for mode in cfg.cpu_experts:
                        configs.append((share, num_slots, name, spec, mode))
        # all_gpu always runs first: it is the compute half of every bound (skipped where it does not fit).
        configs.insert(0, ("100%", total, "all_gpu", None, "off"))
        reference_tokens = None
        all_gpu_ms = None
        bar = tqdm(configs, desc="bench", unit="config", disable=not cfg.progress)
        for share, num_slots, name, spec, mode in bar:
            bar.set_postfix_str(f"{name} {spec or ''} {share}{'' if mode == 'off' else ' cpu ' + mode}")
            policy, label = _policy(name, spec, cfg, schedule)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                free = torch.cuda.mem_get_info(device)[0]
                if num_slots * m.expert_bytes > free - (1 << 30):
                    log.warning("skipping %s at %s: %d slots need more than the device's free memory", name, share, num_slots)
                    continue
                torch.cuda.reset_peak_memory_stats(device)
            engine = attach(m.model, m.arch, m.pool, num_slots, policy, owns_pool=False,
                            cpu_experts=mode, recalibrate=cfg.recalibrate and not m.recalibrated,
                            cpu_threads=cfg.cpu_threads if mode != "off" else None)  # all_gpu, GPU-only: no CPU
            # one measurement serves every later run of the model
            m.recalibrated = m.recalibrated or (cfg.recalibrate and mode != "off")
            try:
                _timed(m.model, prompt, cfg.new_tokens, forcing, device)  # warm-up: same routing
                if cfg.layer_trace:
                    engine.layer_trace = []
                tokens, steps_ms = _timed(m.model, prompt, cfg.new_tokens, forcing, device,
                                          on_step=lambda s, engine=engine: engine.reset_stats() if s == 1 else None)
                stats = engine.stats()
                prefill_ms = (forcing.times[1] - forcing.times[0]) * 1e3  # the prompt's pass (the host time of its start to the next's)
            finally:
                engine.close()
            decoded = cfg.new_tokens - 1
            ms = statistics.median(steps_ms)
            if name == "all_gpu":
                all_gpu_ms, reference_tokens = ms, tokens
            belady, copy_ms = bound_ms(num_slots)
            bound = max(copy_ms, all_gpu_ms or 0.0)
            row = {
                # an "auto" the calibration turned off reads "auto: off"
                "policy": name, "predictor": label,
                "cpu_experts": mode if engine.cost_model is not None or mode == "off" else f"{mode}: off",
                "cpu_experts_asked": mode, "cpu_experts_per_token": stats.get("cpu_experts", 0) / decoded,
                "cpu_wait_ms_per_token": stats.get("cpu_wait_ms", 0.0) / decoded,
                **_cost_model_fields(engine.cost_model),
                "slots": share, "num_slots": num_slots, "slot_share": num_slots / total,
                "ms_per_token": ms, "ms_per_token_mean": statistics.fmean(steps_ms), "prefill_ms": prefill_ms, "tokens_per_s": 1e3 / ms,
                "bytes_per_token": stats["bytes_copied"] / decoded, "belady_bytes_per_token": belady,
                "bytes_vs_belady": stats["bytes_copied"] / decoded / belady if belady else None,
                "hit_ratio": stats["hit_ratio"], "demand_misses_per_token": stats["misses"] / decoded,
                "prefetches_per_token": stats["prefetches"] / decoded, "wasted_prefetches": stats["wasted_prefetches"],
                "cancelled_prefetches": stats["cancelled_prefetches"], "backfills_per_token": stats["backfills"] / decoded,
                "cancelled_backfills": stats["cancelled_backfills"],
                "stall_share": stats["stall_ms"] / sum(steps_ms) if steps_ms else 0.0,
                "bound_ms": bound, "x_bound": ms / bound if bound else None,
                "same_tokens_as_all_gpu": tokens == reference_tokens if reference_tokens is not None else None,
            }
            if device.type == "cuda":
                row["gpu_peak_bytes"] = torch.cuda.max_memory_allocated(device) + num_slots * m.expert_bytes
                row["gpu_budget_bytes"] = m.resident_bytes() + num_slots * m.expert_bytes + min(
                    (m.resident_bytes() + num_slots * m.expert_bytes) // 9, 2 << 30)
            if cfg.layer_trace:
                row["layer_trace"] = engine.layer_trace  # the prompt's pass, then each decode step's
            result["rows"].append(row)
            if on_row is not None:
                on_row({**result, "all_gpu_ms": all_gpu_ms, "partial": True})
    finally:
        forcing.detach()
    for row in result["rows"]:
        lru = next((r for r in result["rows"] if r["policy"] == "lru" and r["slots"] == row["slots"]
                    and r["cpu_experts"] == "off"), None)
        row["x_lru"] = row["ms_per_token"] / lru["ms_per_token"] if lru else None
        gpu_only = gpu_only_row(result["rows"], row)
        row["x_gpu_only"] = row["ms_per_token"] / gpu_only["ms_per_token"] if gpu_only else None
        row["prefill_x_gpu_only"] = row["prefill_ms"] / gpu_only["prefill_ms"] if gpu_only else None
    result["all_gpu_ms"] = all_gpu_ms
    if cfg.accelerate and m.resident is not None:
        acc = result["accelerate"] = _accelerate(m, cfg, prompt, forcing, device)
        m.resident = None  # dispatched by accelerate: not the resident model any more
        if device.type == "cuda":
            torch.cuda.empty_cache()
        for row in result["rows"]:
            if row["slots"] == cfg.accelerate:
                row["x_accelerate"] = acc["ms_per_token"] / row["ms_per_token"]
    if model is None:
        m.pool.close()
    return result


def gpu_only_row(rows: list[dict], row: dict, same: tuple[str, ...] = ("policy", "predictor", "slots")) -> dict | None:
    """The GPU-only row (``cpu_experts`` off) of ``rows`` that ``row``, a row of CPU experts, is
    compared with: the first that agrees with it on ``same`` (a results file of rounds adds
    ``variant`` and ``round``); None for a GPU-only row itself, or where there is none."""
    if row["cpu_experts_asked"] == "off":
        return None
    key = [row.get(k) for k in same]
    return next((r for r in rows if r["cpu_experts_asked"] == "off" and [r.get(k) for k in same] == key), None)


def format_table(result: dict) -> str:
    """The rows as a text table."""
    # ms/token is the median decode step; mean is the decode steps' total time over their number (they
    # part where steps are bimodal: a forecast's copies in place or the step waiting on the link)
    header = ["policy", "forecast", "cpu", "slots", "ms/token", "mean", "bytes/token", "vs Belady", "hit ratio", "demand/token",
              "stall", "x bound", "x lru", "x gpu-only", "same tokens"]
    table = [header]
    for r in result["rows"]:
        fmt = lambda v, f: "-" if v is None else f.format(v)  # noqa: E731
        table.append([
            r["policy"], r["predictor"] or "-",
            "-" if r.get("cpu_experts", "off") == "off" else f"{r['cpu_experts']} ({r['cpu_experts_per_token']:.1f}/token)",
            f"{r['slots']} ({r['num_slots']})", f"{r['ms_per_token']:.2f}", f"{r['ms_per_token_mean']:.2f}",
            format_bytes(r["bytes_per_token"], si=True), fmt(r["bytes_vs_belady"], "{:.2f}"), f"{r['hit_ratio']:.1%}",
            f"{r['demand_misses_per_token']:.2f}", f"{r['stall_share']:.0%}", fmt(r["x_bound"], "{:.2f}"),
            fmt(r["x_lru"], "{:.2f}"), fmt(r["x_gpu_only"], "{:.2f}"),
            {True: "yes", False: "NO", None: "-"}[r["same_tokens_as_all_gpu"]],
        ])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"{result['model']}: {result['num_layers']} MoE layers x {result['num_experts']} experts of "
             f"{format_bytes(result['expert_bytes'], si=True)}, top-{result['top_k']}, batch {result['batch']}, routing {result['routing']}, "
             f"{result['new_tokens']} new tokens; pinned link {result['pinned_gbps']:.1f} GB/s on {result['machine']['device']}"]
    if result.get("transformers"):
        notes.append(f"transformers, every expert resident: {result['transformers']['ms_per_token']:.2f} ms/token")
    if result.get("accelerate"):
        notes.append(f"accelerate device_map offload at the budget of {result['accelerate']['slots']}: "
                     f"{result['accelerate']['ms_per_token']:.1f} ms/token")
    return "\n".join(notes + lines)


def _record_live(m: BenchModel, prompt, cfg: BenchConfig, device) -> list[list[tuple[int, list[int]]]]:
    """Live routing: the experts each layer chose in each step of one all_gpu generation."""
    steps: list[list[tuple[int, list[int]]]] = []
    routers = _routers(m.model, m.arch)
    handles = []

    def hook(layer):
        def f(module, inputs, output):
            if layer == 0:
                steps.append([])
            steps[-1].append((layer, sorted(set(output[2].reshape(-1).tolist()))))

        return f

    handles = [StableHook(r, hook(l)) for l, r in enumerate(routers)]
    engine = attach(m.model, m.arch, m.pool, m.num_layers * m.num_experts, "all_gpu", owns_pool=False)
    try:
        _generate(m.model, prompt, cfg.new_tokens)
    finally:
        engine.close()
        for h in handles:
            h.remove()
    return steps


def _accelerate(m: BenchModel, cfg: BenchConfig, prompt, forcing: TraceForcing, device) -> dict:
    """accelerate's device_map offload of the resident model, at the budget of ``cfg.accelerate`` slots."""
    from accelerate import dispatch_model, infer_auto_device_map

    model = m.resident
    if cfg.accelerate is None or model is None:  # run_bench checks both before calling
        raise ValueError("the accelerate comparison needs --accelerate and the resident model of an --arch")
    num_slots = _slot_share(cfg.accelerate, m.num_layers * m.num_experts)
    resident = m.resident_bytes() + num_slots * m.expert_bytes
    budget = resident + min(resident // 9, 2 << 30)
    device_map = infer_auto_device_map(model, max_memory={0: budget, "cpu": 400 << 30},
                                       no_split_module_classes=model._no_split_modules, dtype=cfg.dtype)
    model = dispatch_model(model, device_map=device_map)
    forcing.attach(model, m.arch)
    n = 3
    try:
        _timed(model, prompt, n, forcing, device)
        _, steps_ms = _timed(model, prompt, n, forcing, device)
    finally:
        forcing.detach()
    ms = statistics.median(steps_ms)
    return {"slots": cfg.accelerate, "budget_bytes": budget, "ms_per_token": ms, "new_tokens": n,
            "device_map": {k: str(v) for k, v in device_map.items()}}


def plot(result: dict, path: str | Path) -> None:
    """ms per token against the share of experts in slots, per policy and forecast, with the bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["policy"] != "all_gpu"]
    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    series: dict[str, list] = {}
    for r in rows:
        label = r["policy"] + (f" ({r['predictor']})" if r["predictor"] else "")
        series.setdefault(label, []).append((r["slot_share"] * 100, r["ms_per_token"]))
    for label, points in series.items():
        points.sort()
        style = "-o" if label.startswith("expertflow") else "--s"
        ax.plot([p[0] for p in points], [p[1] for p in points], style, label=label, markersize=4)
    bounds = sorted({(r["slot_share"] * 100, r["bound_ms"]) for r in rows})
    if bounds:
        ax.plot([b[0] for b in bounds], [b[1] for b in bounds], "k:", linewidth=2, label="bound (Belady bytes / link, all_gpu)")
    if result.get("all_gpu_ms"):
        ax.axhline(result["all_gpu_ms"], color="gray", linewidth=1, label=f"all_gpu {result['all_gpu_ms']:.1f} ms")
    if result.get("transformers"):
        ax.axhline(result["transformers"]["ms_per_token"], color="gray", linestyle="-.", linewidth=1,
                   label=f"transformers, resident {result['transformers']['ms_per_token']:.1f} ms")
    ax.set_xlabel("experts in device slots (%)")
    ax.set_ylabel("ms per decoded token (median)")
    ax.set_yscale("log")
    model = f"{result['arch']}-shaped, random weights" if result.get("arch") else Path(result["model"]).name
    routing = result["routing"] if result["routing"] == "live" else f"routing from {Path(result['routing'][6:]).name}"
    ax.set_title(f"{model}, {result['num_layers']} MoE layers, batch {result['batch']}, {routing}\n"
                 f"{result['machine']['device']}, pinned link {result['pinned_gbps']:.1f} GB/s", fontsize=8)
    ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=130, format="png")
    plt.close(fig)


def save(result: dict, path: str | Path) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(result, indent=1))
