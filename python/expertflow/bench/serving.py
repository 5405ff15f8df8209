"""``expertflow bench-scheduler``: the token scheduler against first-come batching on one model.

Both schedules serve the same requests under the same policy and slots, from a fresh load each, all
submitted at once so every round regroups every running sequence. Reported per schedule: distinct
(layer, expert) pairs a decode batch activates (its actual routing), bytes copied per generated token,
tokens per second and the scheduler's own time.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..scheduler import SCHEDULES

__all__ = ["bench_scheduler", "bench_scheduler_trace", "format_scheduler_table", "RequestForcing"]


def bench_scheduler(
    model_path: str | Path,
    prompts: list[str],
    num_requests: int,
    batch_size: int,
    max_new_tokens: int = 32,
    policy: str = "lru",
    expert_slots: str = "25%",
    predictor: str | Path | None = None,
    dtype: str | None = None,
    progress: bool = True,
) -> dict:
    """``{schedule: {activated_pairs_per_batch, bytes_per_token, tokens_per_s, schedule_ms, ...}, "runs":
    [one run], "config"}``: the shape of :func:`bench_scheduler_trace`'s result, with one slot count and
    one forecast."""
    from transformers import AutoTokenizer

    from .. import from_pretrained

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    ids = [tokenizer(prompts[i % len(prompts)])["input_ids"] for i in range(num_requests)]
    result: dict = {}
    num_slots = 0
    for schedule in SCHEDULES[::-1]:  # fifo first: the reference
        model = from_pretrained(model_path, policy=policy, expert_slots=expert_slots, dtype=dtype, progress=False)
        try:
            num_slots = model.expertflow.cache.num_slots
            result[schedule] = _serve(model, ids, batch_size, schedule, max_new_tokens, None, 0,
                                      next(model.parameters()).device, progress, predictor)
        finally:
            model.expertflow.close()
    _compare(result["fifo"], result["expertflow"])
    result["fifo"].pop("outputs")
    forecast = str(predictor) if predictor is not None else "history"
    result["runs"] = [{"expert_slots": expert_slots, "num_slots": num_slots, "fifo": result["fifo"],
                       "expertflow": {forecast: result["expertflow"]}}]
    result["config"] = {"model": str(model_path), "num_requests": num_requests, "batch_size": batch_size,
                        "max_new_tokens": max_new_tokens, "policy": policy, "expert_slots": expert_slots,
                        "predictor": forecast, "dtype": dtype}
    return result


def _serve(model, prompts: list[list[int]], batch_size: int, schedule: str, max_new_tokens: int,
           forcing: RequestForcing | None, spacing: int, device: torch.device, progress: bool, predictor=None,
           path_forecast=None) -> dict:
    """Serves every prompt under one schedule (all submitted at once); the schedule's figures."""
    from ..serving import Engine

    engine = Engine(model, max_batch_size=batch_size, schedule=schedule, max_running=max(len(prompts), batch_size),
                    max_queue=len(prompts), predictor=predictor, path_forecast=path_forecast,
                    before_pass=forcing.before_pass if forcing is not None else None)
    requests = [engine.submit(p, max_new_tokens=max_new_tokens) for p in prompts]
    if forcing is not None:
        forcing.offsets = {r.id: i * spacing for i, r in enumerate(requests)}
    model.expertflow.cache.reset_stats()
    bar = tqdm(total=len(prompts) * max_new_tokens, desc=f"serve {schedule}", unit="tok", disable=not progress)
    _sync(device)
    start = time.perf_counter()
    while engine.has_work():
        bar.update(len(engine.step()))
    _sync(device)
    seconds = time.perf_counter() - start
    bar.close()
    stats = model.expertflow.stats()
    s = engine.stats
    engine.close()
    return {
        "activated_pairs_per_batch": s["activated_pairs"] / max(s["decode_batches"], 1),
        "bytes_per_token": stats["bytes_copied"] / max(s["tokens"], 1),
        "tokens_per_s": s["tokens"] / seconds,
        "schedule_ms": s["schedule_ms"],
        "schedule_ms_per_round": s["schedule_ms"] / max(s["rounds"], 1),
        "tokens": s["tokens"],
        "decode_batches": s["decode_batches"],
        "prefill_passes": s["prefill_passes"],
        "hit_ratio": stats["hit_ratio"],
        "stall_ms": stats["stall_ms"],
        "seconds": seconds,
        "outputs": [r.output_ids for r in requests],
    }


def _compare(fifo: dict, ef: dict) -> None:
    """Gives ``ef`` its ratios to ``fifo`` and drops its outputs (``fifo``'s stay for further comparisons)."""
    ef["pairs_vs_fifo"] = ef["activated_pairs_per_batch"] / fifo["activated_pairs_per_batch"]
    ef["bytes_vs_fifo"] = ef["bytes_per_token"] / max(fifo["bytes_per_token"], 1e-9)
    ef["speedup_vs_fifo"] = ef["tokens_per_s"] / fifo["tokens_per_s"]
    ef["same_outputs_as_fifo"] = ef.pop("outputs") == fifo["outputs"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def format_scheduler_table(result: dict) -> str:
    runs = result["runs"]
    rows = [["slots", "schedule (forecast)", "pairs/batch", "bytes/token", "tokens/s", "schedule ms", "hit ratio", "x fifo tokens/s"]]
    for run in runs:
        entries = [("fifo", run["fifo"])] + [(f"expertflow ({name})", r) for name, r in run["expertflow"].items()]
        for label, r in entries:
            rows.append([run["expert_slots"], label, f"{r['activated_pairs_per_batch']:.1f}", f"{r['bytes_per_token'] / 1e3:.1f} KB",
                         f"{r['tokens_per_s']:.1f}", f"{r['schedule_ms']:.1f}", f"{r['hit_ratio']:.1%}",
                         f"{r.get('speedup_vs_fifo', 1.0):.2f}"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    ef = result["expertflow"]
    lines.append(f"expertflow vs fifo: {ef['pairs_vs_fifo']:.2f}x activated pairs per batch, {ef['speedup_vs_fifo']:.2f}x tokens/s")
    return "\n".join(lines)


class RequestForcing:
    """Routes each request as a trace sequence does: request ``r`` takes the trace's tokens from
    ``offsets[r.id]`` on (its prompt first, then one per generated token), whichever batch it is in.
    Router hooks swap each pass's expert indices for the table :meth:`before_pass` uploads (once per
    pass); left-padding rows repeat their sequence's first token."""

    def __init__(self, paths: np.ndarray, device: torch.device) -> None:
        self.paths = paths  # [N, L, k]
        self.device = device
        self.offsets: dict[int, int] = {}
        self.table: torch.Tensor | None = None
        self._handles: list = []

    def attach(self, model: torch.nn.Module, arch) -> None:
        from .harness import force_routing

        self._handles += force_routing(model, arch, self._forced)

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def before_pass(self, batch, new_ids: list[list[int]], past: list[int]) -> None:
        width = max(len(n) for n in new_ids)
        rows = []
        for r, ids, p in zip(batch, new_ids, past):
            tokens = self.offsets[r.id] + p + np.arange(len(ids))
            tokens = np.concatenate([np.full(width - len(ids), tokens[0]), tokens])
            rows.append(self.paths[tokens % len(self.paths)])
        self.table = torch.from_numpy(np.concatenate(rows)).to(self.device)  # [B * width, L, k]

    def path_forecast(self, paths: np.ndarray):
        """The scheduler's forecast from ``paths [N, L, k]`` (the trace's, or a blurred copy): each
        request's row for the token its next pass routes, ``offset + length``."""

        def forecast(requests) -> np.ndarray:
            rows = np.array([self.offsets[r.id] + r.length for r in requests])
            return paths[rows % len(paths)]

        return forecast

    def _forced(self, layer: int) -> torch.Tensor:
        if self.table is None:
            raise ValueError("no forced routing for this pass; call before_pass first")
        return self.table[:, layer]


def bench_scheduler_trace(
    arch: str,
    trace_path: str | Path,
    num_requests: int,
    batch_size: int,
    max_new_tokens: int = 32,
    prompt_len: int = 16,
    layers: int | None = None,
    policy: str = "lru",
    expert_slots: str | list[str] = "25%",
    forecasts: str | list[str] = "history",
    config_overrides: dict | None = None,
    progress: bool = True,
) -> dict:
    """The same comparison on random weights at a published model's dimensions, each request routed
    as a sequence of a real routing trace (its own stretch of it).

    Random weights have no trained predictor, so the scheduler's forecast is emulated at known
    quality (``forecasts``, as ``expertflow bench`` does for the policies): ``history`` (each
    sequence's previous path), ``oracle`` (its true next path), ``noisy-oracle:R`` (each true expert
    kept with probability R). One model and pool serve every slot count and forecast; ``fifo`` runs
    once per slot count. ``runs`` holds every combination; the top-level ``fifo`` and ``expertflow``
    are the first slot count's, with the first forecast."""
    from ..loader import attach
    from ..oracles import blur, parse_forecast
    from ..units import parse_slots
    from .harness import BenchConfig, build_model

    slot_specs = [expert_slots] if isinstance(expert_slots, str) else list(expert_slots)
    forecast_specs = [forecasts] if isinstance(forecasts, str) else list(forecasts)
    for spec in forecast_specs:
        try:
            kind = parse_forecast(spec)[0]
        except ValueError:
            kind = "unknown"
        if kind not in ("history", "oracle", "noisy-oracle"):
            raise ValueError(f"the scheduler groups by next-token forecasts: history, oracle or noisy-oracle:R (R in [0, 1]), "
                             f"not '{spec}'")
    cfg = BenchConfig(arch=arch, layers=layers, routing=f"trace:{trace_path}", config_overrides=config_overrides,
                      progress=progress)
    m = build_model(cfg)  # checks, before any weight is built, that the trace routes its experts
    device = m.device
    assert m.trace is not None
    paths = m.trace.to_array(m.num_layers)
    total = m.num_layers * m.num_experts
    slot_counts = [min(parse_slots(spec, "slots").count(total), total) for spec in slot_specs]
    vocab = int(m.model.config.vocab_size)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (prompt_len,), generator=generator).tolist() for _ in range(num_requests)]
    spacing = max(len(paths) // num_requests, 1)
    expert_bytes, num_layers = m.expert_bytes, m.num_layers
    forcing = RequestForcing(paths, device)
    forcing.attach(m.model, m.arch)
    path_forecasts = {}  # each emulated forecast, built once for every slot count
    for spec in forecast_specs:
        kind, keep = parse_forecast(spec)
        path_forecasts[spec] = None if kind == "history" else \
            forcing.path_forecast(paths if keep >= 1 else blur(paths, m.num_experts, keep, seed=0))
    runs = []
    try:
        for spec, num_slots in zip(slot_specs, slot_counts):
            run: dict = {"expert_slots": spec, "num_slots": num_slots, "expertflow": {}}
            for schedule, forecast in [("fifo", "history")] + [("expertflow", f) for f in forecast_specs]:
                path_forecast = None if schedule == "fifo" else path_forecasts[forecast]
                offload = attach(m.model, m.arch, m.pool, num_slots, policy, owns_pool=False)
                try:
                    figures = _serve(m.model, prompts, batch_size, schedule, max_new_tokens, forcing, spacing, device,
                                     progress, path_forecast=path_forecast)
                finally:
                    offload.close()
                if schedule == "fifo":
                    run["fifo"] = figures
                else:
                    run["expertflow"][forecast] = figures
            for figures in run["expertflow"].values():
                _compare(run["fifo"], figures)
            run["fifo"].pop("outputs")
            runs.append(run)
    finally:
        forcing.detach()
        m.pool.close()
    first = runs[0]
    return {"fifo": first["fifo"], "expertflow": first["expertflow"][forecast_specs[0]], "runs": runs,
            "config": {"arch": arch, "layers": num_layers, "trace": str(trace_path), "num_requests": num_requests,
                       "batch_size": batch_size, "max_new_tokens": max_new_tokens, "prompt_len": prompt_len,
                       "policy": policy, "expert_slots": slot_specs, "num_slots": slot_counts,
                       "forecasts": forecast_specs, "expert_bytes": expert_bytes, "device": str(device)}}
