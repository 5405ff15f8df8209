"""The ``expertflow`` command line.

``expertflow generate``    generate text with a MoE checkpoint whose experts are offloaded
``expertflow bench``       every offload policy on one model: tokens/s, hit ratio, bytes copied
``expertflow trace``       record a model's routing over prompts (for the predictor and replay)
``expertflow train-predictor`` / ``eval-predictor``  the routing-path predictor
``expertflow replay``      drive the slot cache through a routing trace (no model needed)
``expertflow synth-trace`` write a synthetic routing trace (for machines without recorded ones)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .cpu_experts import CPU_EXPERT_MODES, check_mode
from .files import check_output
from .replay import REPLAY_POLICIES, ReplayResult, bound, parse_capacity, replay
from .traces import read_trace, synthetic_trace, write_jsonl_trace
from .units import format_bytes, parse_bytes, parse_slots

log = logging.getLogger("expertflow")


def _checked(parse, what: str):
    """An argparse type from a parser that raises ValueError with the message to show."""
    def convert(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = what
    return convert


def _whole_number(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"'{text}' is not a whole number") from None
    if value < minimum:
        raise ValueError(f"{value} is below the minimum of {minimum}")
    return value


def _int_at_least(minimum: int):
    return _checked(lambda text: _whole_number(text, minimum), "int")


def _batch_sizes(text: str) -> list[int]:
    """``1,4,16`` -> [1, 4, 16]: each at least 1, each once."""
    return list(dict.fromkeys(_whole_number(part, 1) for part in _split(text, "--batch")))


def _float_in(low: float, high: float, low_open: bool = True):
    def parse(text: str) -> float:
        value = float(text)
        if not ((low < value if low_open else low <= value) and value <= high):  # false for NaN too
            raise ValueError(f"{text} is outside {'(' if low_open else '['}{low}, {high}]")
        return value
    return _checked(parse, "float")


def _slots(text: str) -> str:
    parse_slots(text, "--expert-slots")
    return text


def _dtype(text: str) -> str:
    from .loader import compute_dtype

    compute_dtype(text)
    return text


def _size(text: str) -> str:
    parse_bytes(text)
    return text


def _port_number(text: str) -> int:
    value = _int_at_least(0)(text)
    if value > 65535:
        raise ValueError(f"{value} is not a port (0 to 65535)")
    return value


POSITIVE = _int_at_least(1)
NON_NEGATIVE = _int_at_least(0)


def _cpu_threads(text: str) -> int:
    from .cpu_experts import MAX_THREADS

    value = _whole_number(text, 1)
    if value > MAX_THREADS:
        raise ValueError(f"{value} is more than {MAX_THREADS} threads")
    return value


def _expert_dtype(text: str) -> str:
    from .formats import expert_format

    expert_format(text)
    return text


SLOTS, DTYPE, SIZE = _checked(_slots, "slots"), _checked(_dtype, "dtype"), _checked(_size, "size")
EXPERT_DTYPE = _checked(_expert_dtype, "expert dtype")
_port = _checked(_port_number, "port")


def _split(text: str, option: str | None = None) -> list[str]:
    """The comma-separated entries of ``text``, each once, in order; with ``option``, at least one is
    required and none may be empty."""
    parts = [part.strip() for part in text.split(",")]
    if option is not None and not any(parts):
        raise ValueError(f"{option} '{text}' names nothing; give one or more, separated by commas")
    if option is not None and not all(parts):
        raise ValueError(f"{option} '{text}' has an empty entry; separate the entries by single commas")
    return list(dict.fromkeys(p for p in parts if p))


def _table(rows: list[tuple[str, ReplayResult, float | None]]) -> str:
    header = ["policy", "capacity", "hit ratio", "demand misses", "prefetches", "wasted", "bytes", "simulated s", "bound s"]
    table = [header]
    for label, r, bound_s in rows:
        name = f"{r.policy} ({r.predictor})" if r.predictor else r.policy
        cap = f"{label} ({r.capacity})" if label != str(r.capacity) else label
        time_s = f"{r.simulated_time_s:.2f}" if r.simulated_time_s is not None else "-"
        table.append([name, cap, f"{r.hit_ratio:.1%}", str(r.misses), str(r.prefetches), str(r.wasted_prefetches),
                      format_bytes(r.bytes, si=True), time_s, f"{bound_s:.2f}" if bound_s is not None else "-"])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _replay_forecasts(spec: str, trace_path: str, trace, schedule):
    """(predictor, gate) for one --predictor entry: a name (replay builds it) or a predictor file."""
    from .oracles import parse_forecast

    try:
        parse_forecast(spec)
        return spec, None
    except ValueError:
        if not Path(spec).exists():
            raise
    from .predictor import RecordedGate, RoutingPathPredictor
    from .traces import load_recorded_trace

    if not Path(trace_path).is_dir():
        raise ValueError("a trained predictor replays traces recorded by `expertflow trace` (they hold its features)")
    recorded = load_recorded_trace(trace_path)
    model = RoutingPathPredictor.load(spec, expected_fingerprint=recorded.meta["model"]["fingerprint"])
    return model.for_replay(recorded, schedule), RecordedGate(recorded, schedule)


def cmd_replay(args: argparse.Namespace) -> int:
    from .oracles import TraceSchedule

    trace = read_trace(args.trace)
    if trace.num_tokens == 0:
        raise ValueError(f"{args.trace} holds no tokens; nothing to replay")
    policies = _split(args.policy, "--policy")
    for p in policies:
        if p not in REPLAY_POLICIES:
            raise ValueError(f"unknown policy '{p}'; choose from {', '.join(REPLAY_POLICIES)}")
    specs = _split(args.predictor, "--predictor") if args.predictor is not None else []
    capacities = _split(args.capacity, "--capacity")
    if specs and not any(p in ("expertflow", "gate_ahead") for p in policies):
        raise ValueError("--predictor applies to --policy expertflow and gate_ahead")
    schedule = TraceSchedule(trace, trace.num_layers, trace.num_tokens)
    forecasts = {spec: _replay_forecasts(spec, args.trace, trace, schedule) for spec in specs}
    rows = []
    for label in capacities:
        capacity = parse_capacity(label, trace, args.per_layer)
        timing = dict(bandwidth_gbps=args.bandwidth_gbps, compute_ms_per_layer=args.compute_ms_per_layer,
                      expert_bytes=args.expert_bytes)
        bound_s = bound(trace, capacity, per_layer=args.per_layer, **timing)
        for p in policies:
            runs = specs if p == "expertflow" and specs else [None]
            if p == "gate_ahead":  # the forecasts that give gate-ahead picks
                runs = [spec for spec in specs if forecasts[spec][1] is not None or spec.startswith("gate-oracle")]
                if not runs:
                    raise ValueError("gate_ahead replays need gate-ahead picks: --predictor gate-oracle:R, or a predictor "
                                     "file with a trace recorded by `expertflow trace`")
            for spec in runs:
                predictor, gate = forecasts[spec] if spec is not None else (None, None)
                if p == "gate_ahead" and gate is not None:
                    predictor = None
                result = replay(trace, capacity, p, per_layer=args.per_layer, predictor=predictor, gate=gate,
                                schedule=schedule, **timing)
                rows.append((label, result, bound_s))
    if args.json:
        out = [{**r.to_dict(), "bound_s": b} for _, r, b in rows]
        print(json.dumps(out[0] if len(out) == 1 else out))
        return 0
    scope = "slots per layer" if args.per_layer else "slots shared by all layers"
    print(
        f"trace {trace.source}: {trace.num_tokens} tokens, {trace.num_layers} layers x {trace.num_experts} experts, "
        f"{trace.num_accesses} expert accesses; capacity in {scope}"
    )
    print(_table(rows))
    return 0


def cmd_synth_trace(args: argparse.Namespace) -> int:
    from .traces import MAX_EXPERTS, MAX_LAYERS

    if args.top_k > args.experts:
        raise ValueError(f"--top-k {args.top_k} is more than the {args.experts} experts a layer has")
    if args.layers > MAX_LAYERS or args.experts > MAX_EXPERTS:
        raise ValueError(f"traces hold at most {MAX_LAYERS} layers and {MAX_EXPERTS} experts per layer")
    check_output(args.out, args.force)
    trace = synthetic_trace(args.layers, args.experts, args.top_k, args.tokens, args.seed)
    write_jsonl_trace(trace, args.out)
    log.info("wrote %d tokens x %d layers to %s", trace.num_tokens, trace.num_layers, args.out)
    return 0


BUNDLED_MODEL = Path(__file__).resolve().parent / "data" / "tiny-mixtral"
BUNDLED_PREDICTOR = BUNDLED_MODEL.parent / "tiny-mixtral-predictor.safetensors"


def _load(args: argparse.Namespace, policy: str):
    from . import from_pretrained

    predictor = getattr(args, "predictor", None)
    if predictor is None and policy == "expertflow" and Path(args.model).resolve() == BUNDLED_MODEL:
        predictor = BUNDLED_PREDICTOR
    return from_pretrained(
        args.model, gpu_memory=args.gpu_memory, policy=policy, dtype=args.dtype, expert_slots=args.expert_slots,
        progress=not getattr(args, "quiet", False), predictor=predictor if policy == "expertflow" else None,
        distributed=getattr(args, "nproc_per_node", 1) > 1, expert_dtype=getattr(args, "expert_dtype", None),
        cpu_experts=getattr(args, "cpu_experts", "off"), recalibrate=getattr(args, "recalibrate", False),
        cpu_threads=getattr(args, "cpu_threads", None), cuda_graphs=getattr(args, "cuda_graphs", False),
    )


def _tokenizer(model_path: str):
    from .loader import read_config

    if not Path(model_path).is_dir():
        raise ValueError(f"model folder {model_path} does not exist")
    read_config(model_path)  # a folder without a readable config is named as that, not as lacking a tokenizer
    if not (Path(model_path) / "tokenizer.json").exists() and not (Path(model_path) / "tokenizer.model").exists():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def _prompt_ids(args: argparse.Namespace, tokenizer):
    import torch

    if args.prompt_ids is not None:
        try:
            ids = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise ValueError(f"--prompt-ids must be comma-separated integers, got '{args.prompt_ids}'") from None
    else:
        if tokenizer is None:
            raise ValueError(f"{args.model} has no tokenizer; pass --prompt-ids instead of --prompt")
        ids = tokenizer(args.prompt)["input_ids"]
    if not ids:
        raise ValueError("the prompt is empty")
    vocab_size = _vocab_size(args.model)
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"prompt token ids {', '.join(map(str, bad[:5]))} are outside this model's vocabulary of "
                         f"{vocab_size} (ids 0 to {vocab_size - 1})")
    return torch.tensor([ids])


def _vocab_size(model_path: str) -> int:
    from .loader import read_config

    config = read_config(model_path)
    return config.get_text_config().vocab_size


def _generate(model, input_ids, args: argparse.Namespace) -> tuple[list[int], float]:
    import torch

    torch.manual_seed(args.seed)
    kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, pad_token_id=model.config.pad_token_id)
    if args.do_sample:
        kwargs.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    new = out[0, 1:] if model.config.is_encoder_decoder else out[0, input_ids.shape[1] :]
    return new.tolist(), seconds


def _summary(stats: dict, n: int, seconds: float) -> str:
    # The hit ratio is over every expert use, the CPU's included (offload.hit_ratio).
    num_cpu = stats.get("cpu_experts", 0)
    cpu = f", {num_cpu} on the CPU ({stats['cpu_ms']:.1f} ms)" if "cpu_experts" in stats else ""
    return (
        f"{n} tokens in {seconds:.2f} s ({n / seconds:.1f} tokens/s) | policy {stats['policy']}, {stats['num_slots']} slots | "
        f"hit ratio {stats['hit_ratio']:.1%} ({stats['hits']}/{stats['accesses'] + num_cpu}{cpu}), "
        f"prefetch hits {stats['prefetch_hits']}, wasted {stats['wasted_prefetches']}, "
        f"copied {format_bytes(stats['bytes_copied'], si=True)}, stalled {stats['stall_ms']:.1f} ms"
    )


def cmd_generate(args: argparse.Namespace) -> int:
    if args.predictor is not None and args.policy != "expertflow":
        raise ValueError(f"--predictor drives the expertflow policy only, not {args.policy}")
    tokenizer = _tokenizer(args.model)
    input_ids = _prompt_ids(args, tokenizer)
    model = _load(args, args.policy)
    try:
        new, seconds = _generate(model, input_ids, args)
        stats = model.expertflow.stats()
        shard = model.expertflow.shard
        if shard is not None:  # every rank generated the same tokens; rank 0 reports for all
            from .distributed import gather_stats

            stats = gather_stats(shard, stats)
            shard.finish()
            if shard.rank != 0:
                return 0
    finally:
        model.expertflow.close()
    text = tokenizer.decode(new, skip_special_tokens=True) if tokenizer is not None else None
    if args.json:
        print(json.dumps({"token_ids": new, "text": text, "stats": {**stats, "seconds": seconds, "tokens_per_s": len(new) / seconds}}))
        return 0
    print(text if text is not None else " ".join(map(str, new)))
    print(_summary(stats, len(new), seconds))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import dataclasses

    from .bench import BenchConfig, build_model, format_table, plot, run_bench, save
    from .policies import POLICY_NAMES

    batches = args.batch
    if args.out is not None and not args.out.strip():
        raise ValueError("--out is empty: give the results' JSON file, e.g. --out results.json")
    if args.out is not None and Path(args.out).suffix == ".png":
        raise ValueError(f"--out {args.out} is the results' JSON file and its plot goes beside it with the suffix .png: "
                         "give a name that does not end in .png, e.g. results.json")
    if args.layer_trace and not (args.out or args.json):
        raise ValueError("--layer-trace adds its records to the JSON results, which the table does not show: "
                         "give --out FILE or --json")
    if args.accelerate and len(batches) > 1:
        raise ValueError("--accelerate runs with one --batch size: it compares with transformers' model, which the "
                         "first run frees")
    # One batch size writes --out; several write one file each, --out's name with -b<N>.
    outs = {b: Path(args.out) if len(batches) == 1 else Path(args.out).with_stem(f"{Path(args.out).stem}-b{b}")
            for b in batches} if args.out else {}
    for out in outs.values():
        check_output(out, args.force)
        check_output(out.with_suffix(".png"), args.force)
    if args.layers is not None and args.arch is None:
        raise ValueError("--layers applies to --arch models; a checkpoint runs all its layers")
    model = args.model if args.arch is None else None
    prompt_ids = None
    if args.arch is None:
        tokenizer = _tokenizer(args.model)
        if args.prompt is not None or args.prompt_ids is not None:
            prompt_ids = _prompt_ids(args, tokenizer)[0].tolist()
    elif args.prompt is not None or args.prompt_ids is not None:
        raise ValueError("--prompt and --prompt-ids need a checkpoint's tokenizer and vocabulary; random-weight --arch "
                         "models take --prompt-len")
    policies = _split(args.policies, "--policies") if args.policies != "all" else list(POLICY_NAMES)
    predictors = _split(args.predictors, "--predictors") if args.predictors is not None else None
    if predictors is not None and "expertflow" not in policies:
        raise ValueError(f"--predictors drive the expertflow policy only, which --policies {args.policies} does not run")
    if predictors is None:
        # The bundled predictor forecasts live generation; trace routing takes named forecasts.
        bundled = model is not None and Path(model).resolve() == BUNDLED_MODEL and args.routing == "live"
        predictors = ["history", str(BUNDLED_PREDICTOR)] if bundled else ["history"]
    cfg = BenchConfig(
        model=model, arch=args.arch, layers=args.layers, routing=args.routing, batch=batches[0],
        slots=_split(args.slots, "--slots"),
        policies=policies,
        predictors=predictors, gate_accuracy=args.gate_accuracy, new_tokens=args.new_tokens, prompt_len=args.prompt_len,
        prompt_ids=prompt_ids, transformers=args.arch is not None, accelerate=args.accelerate, expert_dtype=args.expert_dtype,
        cpu_experts=_split(args.cpu_experts, "--cpu-experts"), recalibrate=args.recalibrate, cpu_threads=args.cpu_threads,
        progress=not args.json,
        layer_trace=args.layer_trace, cuda_graphs=args.cuda_graphs,
    )
    # as typed, or run as python -m expertflow.cli
    launched = sys.argv[0].endswith(("expertflow", os.path.join("expertflow", "cli.py")))
    command = "expertflow " + " ".join(sys.argv[1:]) if launched else None
    built = build_model(cfg)  # once for every batch size
    try:
        for batch in batches:
            # --out holds the finished configurations as they finish ("partial": true), so a run cut
            # short keeps them; the whole result replaces them at the end.
            on_row = (lambda partial, out=outs[batch]: save({**partial, "command": command}, out)) if outs else None
            result = run_bench(dataclasses.replace(cfg, batch=batch), built, on_row=on_row)
            result["command"] = command
            if outs:
                save(result, outs[batch])
                plot(result, outs[batch].with_suffix(".png"))
            if args.json:
                print(json.dumps(result))
            else:
                print((f"batch {batch}\n" if len(batches) > 1 else "") + format_table(result))
    finally:
        built.pool.close()
    return 0


def cmd_bench_scheduler(args: argparse.Namespace) -> int:
    from .bench.serving import bench_scheduler, format_scheduler_table
    from .recorder import read_prompts

    if args.out:
        check_output(args.out, args.force)
    slots = _split(args.expert_slots, "--expert-slots")
    for spec in slots:
        _slots(spec)
    if args.arch is not None:
        from .bench import SHAPES

        if args.arch not in SHAPES:
            raise ValueError(f"unknown --arch '{args.arch}'; choose from {', '.join(SHAPES)}")
        if not args.routing.startswith("trace:") or not Path(args.routing[6:]).is_file():
            raise ValueError("--arch models take --routing trace:FILE (an existing trace): random weights route at random")
        forecasts = _split(args.predictor or "history", "--predictor")  # bench_scheduler_trace checks them first
        from .bench.serving import bench_scheduler_trace

        result = bench_scheduler_trace(args.arch, args.routing[6:], args.num_requests, args.batch_size,
                                       args.max_new_tokens, prompt_len=args.prompt_len, layers=args.layers,
                                       policy=args.policy, expert_slots=slots, forecasts=forecasts, progress=not args.json)
    else:
        if args.routing != "live" or args.layers is not None:
            raise ValueError("--routing and --layers apply to --arch models")
        prompts = read_prompts(args.prompts)
        if _tokenizer(args.model) is None:
            raise ValueError(f"{args.model} has no tokenizer; bench-scheduler reads text prompts")
        predictor = args.predictor
        if predictor not in (None, "history") and not Path(predictor).is_file():
            raise ValueError(f"--predictor {predictor}: no such predictor file; emulated forecasts (oracle, "
                             "noisy-oracle:R) and lists need --arch")
        if predictor is None and Path(args.model).resolve() == BUNDLED_MODEL:
            predictor = str(BUNDLED_PREDICTOR)
        if len(slots) > 1:
            raise ValueError("--expert-slots takes one value with --model; lists are for --arch models")
        result = bench_scheduler(args.model, prompts, args.num_requests, args.batch_size, args.max_new_tokens,
                                 policy=args.policy, expert_slots=slots[0],
                                 predictor=None if predictor == "history" else predictor, dtype=args.dtype,
                                 progress=not args.json)
    result["command"] = "expertflow " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("expertflow") else None
    if args.out:
        from .files import atomic_output

        with atomic_output(args.out) as tmp:
            tmp.write_text(json.dumps(result, indent=1))
    print(json.dumps(result) if args.json else format_scheduler_table(result))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .server import serve
    except ImportError as e:  # the server's libraries are an optional extra
        raise RuntimeError(f"expertflow serve needs FastAPI and uvicorn ({e}); install them with "
                           "pip install 'expertflow[serve]' (or pip install fastapi uvicorn)") from None

    if _tokenizer(args.model) is None:
        raise ValueError(f"{args.model} has no tokenizer; the server reads and writes text")
    serve(args.model, host=args.host, port=args.port, api_key=args.api_key, max_batch_size=args.max_batch_size,
          schedule=args.schedule, max_queue=args.max_queue, gpu_memory=args.gpu_memory, policy=args.policy,
          dtype=args.dtype, expert_slots=args.expert_slots, progress=False, distributed=args.nproc_per_node > 1,
          expert_dtype=args.expert_dtype, cpu_experts=args.cpu_experts, recalibrate=args.recalibrate,
          cpu_threads=args.cpu_threads,
          predictor=BUNDLED_PREDICTOR if args.policy == "expertflow" and Path(args.model).resolve() == BUNDLED_MODEL else None)
    return 0


def _expert_dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--expert-dtype", default=None, type=EXPERT_DTYPE,
                   help="how experts are stored and copied: fp8, int8, mxfp4 (quantized at load), bf16 (expands a "
                        "quantized checkpoint); default: the checkpoint's own (gpt-oss: mxfp4, FP8 releases: fp8)")


def _cpu_args(p: argparse.ArgumentParser, several: bool = False) -> None:
    """``--cpu-experts`` (``several``: a comma list, each policy run under each), ``--recalibrate`` and
    ``--cpu-threads``."""
    if several:
        p.add_argument("--cpu-experts", default="off",
                       help="comma list of off, auto, on: each policy runs under each (CPU experts, cpu_experts.py)")
    else:
        p.add_argument("--cpu-experts", default="off", choices=list(CPU_EXPERT_MODES),
                       help="compute missed experts on the CPU from host memory: auto (a calibrated cost model "
                            "decides), on (every miss), off (the default)")
    p.add_argument("--recalibrate", action="store_true", help="measure this machine again for --cpu-experts (cached otherwise)")
    p.add_argument("--cpu-threads", type=_checked(_cpu_threads, "thread count"), default=None,
                   help="threads computing the CPU's experts, with --cpu-experts auto or on (default: torch's, beside a GPU at most "
                        "the cores less one)")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=str(BUNDLED_MODEL), help="checkpoint folder (default: the bundled tiny Mixtral)")
    p.add_argument("--gpu-memory", default="12GiB", type=SIZE, help="device memory ExpertFlow may use, e.g. 12GiB")
    p.add_argument("--expert-slots", default=None, type=SLOTS,
                   help="slot count or share of all experts (e.g. 25%%) instead of the budget")
    p.add_argument("--dtype", default=None, type=DTYPE, help="compute dtype: float32, float16 or bfloat16 (default: the checkpoint's)")
    _expert_dtype_arg(p)
    _cpu_args(p)
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (needs the checkpoint's tokenizer)")
    prompt.add_argument("--prompt-ids", help="prompt token ids, comma-separated")
    p.add_argument("--max-new-tokens", type=POSITIVE, default=32)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=_float_in(0, math.inf), default=1.0)
    p.add_argument("--top-k", type=NON_NEGATIVE, default=50, help="0: no top-k filter")
    p.add_argument("--top-p", type=_float_in(0, 1), default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def cmd_trace(args: argparse.Namespace) -> int:
    from .recorder import read_prompts, record_trace
    from .traces import TRACE_FILES, save_recorded_trace

    check_output(args.out, args.force, folder_files=TRACE_FILES)
    prompts = read_prompts(args.prompts)
    tokenizer = _tokenizer(args.model)
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer; tracing reads text prompts")
    model = _load(args, args.policy)
    try:
        trace = record_trace(model, tokenizer, prompts, args.max_new_tokens, source=str(args.model))
    finally:
        model.expertflow.close()
    save_recorded_trace(trace, args.out)
    log.info("recorded %d tokens of %d prompts to %s", trace.num_tokens, len(prompts), args.out)
    return 0


def _recorded(paths: list[str]):
    from .traces import RecordedTrace, load_recorded_trace

    traces = [load_recorded_trace(p) for p in paths]
    if len({t.meta["model"]["fingerprint"] for t in traces}) > 1:
        raise ValueError("these traces were recorded with different models; train one predictor per model")
    if len(traces) == 1:
        return traces[0]
    import numpy as np

    offset, parts = 0, []
    for t in traces:
        parts.append(t.sequence + offset)
        offset = int(parts[-1].max()) + 1
    names = ("position", "token", "experts", "weights", "embedding", "gate_ahead")
    return RecordedTrace(traces[0].meta, np.concatenate(parts), *(np.concatenate([getattr(t, n) for t in traces]) for n in names))


def cmd_train_predictor(args: argparse.Namespace) -> int:
    from .predictor import train_predictor

    check_output(args.out, args.force)
    trace = _recorded(args.traces)
    model, report = train_predictor(trace, hidden=args.hidden, epochs=args.epochs, seed=args.seed)
    model.save(args.out)
    summary = {k: v for k, v in report.items() if k.endswith("/mean") or k.endswith("tokens")}
    summary["predictor_bytes"] = model.num_bytes()
    print(json.dumps(summary, indent=1))
    return 0


def cmd_eval_predictor(args: argparse.Namespace) -> int:
    from .predictor import RoutingPathPredictor, evaluate

    trace = _recorded(args.traces)
    model = RoutingPathPredictor.load(args.predictor, expected_fingerprint=trace.meta["model"]["fingerprint"])
    report = evaluate(model, trace)
    if args.json:
        print(json.dumps(report))
        return 0
    methods = ["predictor", "previous_token", "static", "gate_ahead"]
    for label in ("recall@k", "recall@2k"):
        print(f"{label} (k = {report['top_k']}, {report['tokens']} tokens)")
        num_layers = len(report[f"predictor/{label}"])
        header = ["method"] + [f"L{l}" for l in range(num_layers)] + ["mean"]
        table = [header]
        for m in methods:
            values = report.get(f"{m}/{label}")
            if values is None:
                continue
            table.append([m] + ["-" if v != v else f"{v:.2f}" for v in values] + [f"{report[f'{m}/{label}/mean']:.3f}"])
        widths = [max(len(r[i]) for r in table) for i in range(len(header))]
        for row in table:
            print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="expertflow", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate with a MoE checkpoint whose experts are offloaded")
    _model_args(p)
    p.add_argument("--policy", default="expertflow", help="expertflow|all_gpu|lru|next_layers|gate_ahead")
    p.add_argument("--predictor", default=None,
                   help="routing-path predictor file for the expertflow policy (the bundled model brings its own)")
    p.add_argument("--nproc-per-node", type=POSITIVE, default=1,
                   help="spread the experts over this many GPUs of this host (one process each, under torchrun)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="decode with the non-expert layers compiled and replayed as CUDA graphs around the eager experts "
                        "(a static KV cache; the first generation compiles, tens of seconds)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="decode speed of every policy at several slot counts, against the bound")
    p.add_argument("--model", default=str(BUNDLED_MODEL), help="checkpoint folder (default: the bundled tiny Mixtral)")
    p.add_argument("--arch", default=None, help="instead of --model: random weights at a published model's dimensions "
                   "(mixtral-8x7b, qwen3-30b-a3b, gpt-oss-120b, deepseek-v2-lite, olmoe-1b-7b)")
    p.add_argument("--layers", type=POSITIVE, default=None, help="--arch: keep the first N MoE layers")
    p.add_argument("--routing", default="live", help="live, or trace:FILE to force every layer's experts from a trace")
    p.add_argument("--batch", default=[1], type=_checked(_batch_sizes, "batch sizes"),
                   help="sequences per step (trace: B offsets into the trace); a comma list runs each on one model, "
                        "writing --out's name with -b<N> for each")
    p.add_argument("--slots", "--expert-slots", dest="slots", default="25%",
                   help="comma list of slot counts or shares of all experts, e.g. 10%%,25%%,50%%")
    p.add_argument("--policies", default="all", help="comma list, or all")
    p.add_argument("--predictors", default=None,
                   help="forecasts for expertflow, comma list: history and predictor files (live); history, oracle, "
                        "noisy-oracle:R, gate-oracle:R (trace)")
    p.add_argument("--gate-accuracy", type=_float_in(0, 1, low_open=False), default=0.8, help="trace routing: gate_ahead's emulated accuracy")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="prompt text (checkpoints with a tokenizer)")
    prompt.add_argument("--prompt-ids", help="prompt token ids, comma-separated")
    p.add_argument("--prompt-len", type=POSITIVE, default=16, help="random prompt length (--arch, or no prompt given)")
    p.add_argument("--new-tokens", "--max-new-tokens", dest="new_tokens", type=_int_at_least(2), default=32,
                   help="tokens to generate, at least 2: the first comes from the prompt's pass, the rest are decode steps")
    p.add_argument("--accelerate", default=None, help="also run accelerate's device_map offload at this slot share's budget")
    _expert_dtype_arg(p)
    _cpu_args(p, several=True)
    p.add_argument("--layer-trace", action="store_true",
                   help="add each row the timed run's per-layer records: misses, CPU experts, CPU and wait ms, host ms")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="decode with the non-expert layers compiled and replayed as CUDA graphs around the eager experts "
                        "(a static KV cache; the first generation of each configuration compiles, tens of seconds)")
    p.add_argument("--out", default=None, help="write the results as JSON here (after each configuration too, marked partial), and a PNG beside it")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--json", action="store_true", help="print one JSON object (one a line for several --batch sizes)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("serve", help="an OpenAI-compatible server (completions, chat, streaming, /metrics)")
    p.add_argument("--model", default=str(BUNDLED_MODEL))
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=_port, default=8000, help="0: any free port")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument("--gpu-memory", default="12GiB", type=SIZE)
    p.add_argument("--expert-slots", default=None, type=SLOTS)
    p.add_argument("--dtype", default=None, type=DTYPE)
    _expert_dtype_arg(p)
    _cpu_args(p)
    p.add_argument("--policy", default="expertflow")
    p.add_argument("--max-batch-size", type=POSITIVE, default=8)
    p.add_argument("--schedule", default="expertflow", choices=["expertflow", "fifo"])
    p.add_argument("--max-queue", type=POSITIVE, default=256, help="requests waiting beyond the running ones")
    p.add_argument("--nproc-per-node", type=POSITIVE, default=1,
                   help="spread the experts over this many GPUs of this host; rank 0 serves")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("bench-scheduler", help="the token scheduler against first-come batching: activated experts, bytes, tokens/s")
    p.add_argument("--model", default=str(BUNDLED_MODEL))
    p.add_argument("--prompts", default=str(BUNDLED_MODEL.parent / "prompts" / "heldout.txt"),
                   help=".txt (one prompt per line) or .jsonl with a 'prompt' field; cycled to --num-requests")
    p.add_argument("--arch", default=None, help="instead of --model: random weights at a published model's dimensions, "
                   "routed by --routing trace:FILE (each request its own stretch of the trace)")
    p.add_argument("--routing", default="live", help="live, or trace:FILE (--arch)")
    p.add_argument("--layers", type=POSITIVE, default=None, help="--arch: keep the first N MoE layers")
    p.add_argument("--prompt-len", type=POSITIVE, default=16, help="--arch: random prompt length")
    p.add_argument("--num-requests", type=POSITIVE, default=64)
    p.add_argument("--batch-size", type=POSITIVE, default=8)
    p.add_argument("--max-new-tokens", type=POSITIVE, default=32)
    p.add_argument("--policy", default="lru", help="the offload policy both schedules run under")
    p.add_argument("--expert-slots", default="25%", help="slot count or share of all experts (--arch: a comma list)")
    p.add_argument("--dtype", default=None, type=DTYPE, help="compute dtype (default: the checkpoint's)")
    p.add_argument("--predictor", default=None,
                   help="what the scheduler groups by: a routing-path predictor file or 'history' (default: the bundled "
                        "model's own predictor, else history); --arch: a comma list of emulated forecasts, history, "
                        "oracle, noisy-oracle:R")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_bench_scheduler)

    p = sub.add_parser("trace", help="record a model's routing over prompts")
    p.add_argument("--model", default=str(BUNDLED_MODEL))
    p.add_argument("--prompts", required=True, help=".txt (one prompt per line) or .jsonl with a 'prompt' field")
    p.add_argument("--out", required=True, help="trace folder to write")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--max-new-tokens", type=POSITIVE, default=32)
    p.add_argument("--policy", default="all_gpu")
    p.add_argument("--gpu-memory", default="12GiB", type=SIZE)
    p.add_argument("--expert-slots", default=None, type=SLOTS)
    p.add_argument("--dtype", default=None, type=DTYPE)
    p.set_defaults(func=cmd_trace)

    p = sub.add_parser("train-predictor", help="train the routing-path predictor on recorded traces")
    p.add_argument("--traces", nargs="+", required=True, help="trace folders of one model")
    p.add_argument("--out", required=True, help="predictor file (.safetensors)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--hidden", type=POSITIVE, default=64)
    p.add_argument("--epochs", type=POSITIVE, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train_predictor)

    p = sub.add_parser("eval-predictor", help="recall of the predictor and training-free baselines, per layer")
    p.add_argument("--predictor", required=True)
    p.add_argument("--traces", nargs="+", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval_predictor)

    p = sub.add_parser("replay", help="replay a routing trace through the expert cache")
    p.add_argument("--trace", required=True, help="per-layer .jsonl or route .csv trace")
    p.add_argument("--capacity", required=True, help="slots (e.g. 64) or share of all experts (e.g. 25%%); comma list for a table")
    p.add_argument("--per-layer", action="store_true", help="capacity slots for each layer instead of one shared pool")
    p.add_argument("--policy", default="lru", help=f"{'|'.join(REPLAY_POLICIES)}; comma list for a table")
    p.add_argument("--predictor", default=None,
                   help="expertflow and gate_ahead: history (default), oracle, noisy-oracle:R, gate-oracle:R or a "
                        "predictor file; comma list for a table")
    p.add_argument("--bandwidth-gbps", type=_float_in(0, math.inf), default=55.0, help="host-to-device link for the simulated time")
    p.add_argument("--compute-ms-per-layer", type=_float_in(0, math.inf, low_open=False), default=0.5, help="compute per layer for the simulated time")
    p.add_argument("--expert-bytes", type=POSITIVE, default=None, help="bytes per expert (traces without sizes)")
    p.add_argument("--json", action="store_true", help="print one JSON object (a list for several runs)")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("synth-trace", help="write a synthetic per-layer JSONL routing trace")
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--layers", type=POSITIVE, default=32)
    p.add_argument("--experts", type=POSITIVE, default=8)
    p.add_argument("--top-k", type=POSITIVE, default=2)
    p.add_argument("--tokens", type=POSITIVE, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth_trace)
    return parser


def _check_before_launch(args: argparse.Namespace) -> None:
    """What can fail in every rank alike is checked once, before any rank starts: the model folder
    and config, the policy, and whether there are experts and devices for every process."""
    from . import _C
    from .distributed import cli_rank
    from .loader import read_config
    from .models import architecture_for
    from .policies import make_policy
    from .runtime import backend_uses_gpu

    if cli_rank() is not None:  # checked once, by the process that started the ranks
        return
    if not Path(args.model).is_dir():
        raise ValueError(f"model folder {args.model} does not exist")
    config = read_config(args.model)
    make_policy(args.policy)
    check_mode(getattr(args, "cpu_experts", "off"), distributed=True)
    num_experts = architecture_for(config.model_type).dims(config)[0]
    n = args.nproc_per_node
    if n > num_experts:
        raise ValueError(f"--nproc-per-node {n} is more than the model's {num_experts} experts per layer; use at most {num_experts}")
    if backend_uses_gpu():
        import torch

        if n > torch.cuda.device_count():
            raise ValueError(f"--nproc-per-node {n}, but this host has {torch.cuda.device_count()} GPU(s)")
    elif n > (os.cpu_count() or 1):
        raise ValueError(f"--nproc-per-node {n} CPU processes, but this host has {os.cpu_count()} cores "
                         f"({_C.cuda_unavailable_reason() or 'the host backend was chosen'})")


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "nproc_per_node", 1) > 1:
            from .distributed import launch_ranks

            _check_before_launch(args)
            code = launch_ranks(args.nproc_per_node, list(argv) if argv is not None else sys.argv[1:])
            if code is not None:  # this process launched the ranks; they have finished
                return code
        return args.func(args)
    except (ValueError, OSError, RuntimeError) as e:
        from .distributed import cli_rank

        rank = cli_rank()
        where = f" (rank {rank})" if rank else ""
        print(f"expertflow {args.command}: error{where}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outputs are written whole or not at all (files.atomic_output)
        print(f"expertflow {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
