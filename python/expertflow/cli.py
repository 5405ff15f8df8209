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
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .replay import PREDICTORS, REPLAY_POLICIES, ReplayResult, parse_capacity, replay
from .traces import read_trace, synthetic_trace, write_jsonl_trace

log = logging.getLogger("expertflow")


def _split(text: str) -> list[str]:
    return [part for part in text.split(",") if part.strip()]


def _format_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _table(results: list[ReplayResult], capacities: list[str]) -> str:
    header = ["policy", "capacity", "hit ratio", "demand misses", "prefetches", "wasted", "bytes", "simulated s"]
    rows = [header]
    for r, label in zip(results, capacities):
        name = f"{r.policy} ({r.predictor})" if r.predictor else r.policy
        cap = f"{label} ({r.capacity})" if label != str(r.capacity) else label
        time_s = f"{r.simulated_time_s:.2f}" if r.simulated_time_s is not None else "-"
        rows.append([name, cap, f"{r.hit_ratio:.1%}", str(r.demand_misses), str(r.prefetches), str(r.wasted_prefetches),
                     _format_bytes(r.bytes), time_s])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_replay(args: argparse.Namespace) -> int:
    trace = read_trace(args.trace)
    policies = _split(args.policy)
    for p in policies:
        if p not in REPLAY_POLICIES:
            raise ValueError(f"unknown policy '{p}'; choose from {', '.join(REPLAY_POLICIES)}")
    predictor = None
    if args.predictor is not None:
        if "expertflow" not in policies:
            raise ValueError("--predictor applies to --policy expertflow")
        predictor = args.predictor
        if predictor not in PREDICTORS:
            from .predictor import RoutingPathPredictor
            from .traces import load_recorded_trace

            if not Path(args.trace).is_dir():
                raise ValueError("a trained predictor replays traces recorded by `expertflow trace` (they hold its features)")
            recorded = load_recorded_trace(args.trace)
            model = RoutingPathPredictor.load(predictor, expected_fingerprint=recorded.meta["model"]["fingerprint"])
            predictor = model.for_replay(recorded)
    results, labels = [], []
    for label in _split(args.capacity):
        capacity = parse_capacity(label, trace, args.per_layer)
        for p in policies:
            results.append(
                replay(trace, capacity, p, per_layer=args.per_layer, predictor=predictor if p == "expertflow" else None,
                       bandwidth_gbps=args.bandwidth_gbps, compute_ms_per_layer=args.compute_ms_per_layer,
                       expert_bytes=args.expert_bytes)
            )
            labels.append(label)
    if args.json:
        out = [r.to_dict() for r in results]
        print(json.dumps(out[0] if len(out) == 1 else out))
        return 0
    scope = "slots per layer" if args.per_layer else "slots shared by all layers"
    print(
        f"trace {trace.source}: {trace.num_tokens} tokens, {trace.num_layers} layers x {trace.num_experts} experts, "
        f"{trace.num_accesses} expert accesses; capacity in {scope}"
    )
    print(_table(results, labels))
    return 0


def cmd_synth_trace(args: argparse.Namespace) -> int:
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
    )


def _tokenizer(model_path: str):
    if not Path(model_path).is_dir():
        raise ValueError(f"model folder {model_path} does not exist")
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
    return torch.tensor([ids])


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
    return (
        f"{n} tokens in {seconds:.2f} s ({n / seconds:.1f} tokens/s) | policy {stats['policy']}, {stats['num_slots']} slots | "
        f"hit ratio {stats['hit_ratio']:.1%} ({stats['hits']}/{stats['accesses']}), prefetch hits {stats['prefetch_hits']}, "
        f"wasted {stats['wasted_prefetches']}, copied {_format_bytes(stats['bytes_copied'])}, stalled {stats['stall_ms']:.1f} ms"
    )


def cmd_generate(args: argparse.Namespace) -> int:
    tokenizer = _tokenizer(args.model)
    input_ids = _prompt_ids(args, tokenizer)
    model = _load(args, args.policy)
    try:
        new, seconds = _generate(model, input_ids, args)
        stats = model.expertflow.stats()
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
    from .policies import POLICY_NAMES

    policies = _split(args.policies) if args.policies != "all" else list(POLICY_NAMES)
    tokenizer = _tokenizer(args.model)
    input_ids = _prompt_ids(args, tokenizer)
    args.quiet = True
    logging.getLogger("expertflow").setLevel(logging.WARNING)  # one table, not a load report per policy
    rows, reference = [], None
    for policy in policies:
        model = _load(args, policy)
        try:
            _generate(model, input_ids, args)  # warm-up: the first run pays one-time kernel and allocator set-up
            model.expertflow.reset_stats()
            new, seconds = _generate(model, input_ids, args)
            stats = model.expertflow.stats()
        finally:
            model.expertflow.close()
        reference = reference if reference is not None else new
        rows.append({"policy": policy, "tokens_per_s": len(new) / seconds, "same_tokens_as_first": new == reference, **stats})
    if args.json:
        print(json.dumps(rows))
        return 0
    header = ["policy", "tokens/s", "hit ratio", "prefetch hits", "wasted", "copied", "stall ms", f"same tokens as {policies[0]}"]
    table = [header] + [
        [r["policy"], f"{r['tokens_per_s']:.1f}", f"{r['hit_ratio']:.1%}", str(r["prefetch_hits"]), str(r["wasted_prefetches"]),
         _format_bytes(r["bytes_copied"]), f"{r['stall_ms']:.1f}", "yes" if r["same_tokens_as_first"] else "NO"]
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    offloaded = [r for r in rows if r["policy"] != "all_gpu"] or rows
    print(f"{args.model}: {offloaded[0]['num_slots']} expert slots (all_gpu: every expert), {args.max_new_tokens} new tokens, greedy")
    for i, row in enumerate(table):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    return 0


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=str(BUNDLED_MODEL), help="checkpoint folder (default: the bundled tiny Mixtral)")
    p.add_argument("--gpu-memory", default="12GiB", help="device memory ExpertFlow may use, e.g. 12GiB")
    p.add_argument("--expert-slots", default=None, help="slot count or share of all experts (e.g. 25%%) instead of the budget")
    p.add_argument("--dtype", default=None, help="compute dtype (default: the checkpoint's)")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (needs the checkpoint's tokenizer)")
    prompt.add_argument("--prompt-ids", help="prompt token ids, comma-separated")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def cmd_trace(args: argparse.Namespace) -> int:
    from .recorder import read_prompts, record_trace
    from .traces import save_recorded_trace

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
    methods = ["predictor", "previous_token", "static", "gate_ahead", "combined"]
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
    p.add_argument("--policy", default="expertflow",
                   help="expertflow|all_gpu|lru|next_layers|gate_ahead|lru_with_correction")
    p.add_argument("--predictor", default=None,
                   help="routing-path predictor file for the expertflow policy (the bundled model brings its own)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="every offload policy on one model: tokens/s, hit ratio, bytes copied")
    _model_args(p)
    p.add_argument("--policies", default="all", help="comma list, or all")
    p.add_argument("--predictor", default=None, help="routing-path predictor file for the expertflow policy")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("trace", help="record a model's routing over prompts")
    p.add_argument("--model", default=str(BUNDLED_MODEL))
    p.add_argument("--prompts", required=True, help=".txt (one prompt per line) or .jsonl with a 'prompt' field")
    p.add_argument("--out", required=True, help="trace folder to write")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--policy", default="all_gpu")
    p.add_argument("--gpu-memory", default="12GiB")
    p.add_argument("--expert-slots", default=None)
    p.add_argument("--dtype", default=None)
    p.set_defaults(func=cmd_trace)

    p = sub.add_parser("train-predictor", help="train the routing-path predictor on recorded traces")
    p.add_argument("--traces", nargs="+", required=True, help="trace folders of one model")
    p.add_argument("--out", required=True, help="predictor file (.safetensors)")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--epochs", type=int, default=60)
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
    p.add_argument("--predictor", default=None, help="expertflow only: history (default), oracle, or a predictor file")
    p.add_argument("--bandwidth-gbps", type=float, default=55.0, help="host-to-device link for the simulated time")
    p.add_argument("--compute-ms-per-layer", type=float, default=0.5, help="compute per layer for the simulated time")
    p.add_argument("--expert-bytes", type=int, default=None, help="bytes per expert (traces without sizes)")
    p.add_argument("--json", action="store_true", help="print one JSON object (a list for several runs)")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("synth-trace", help="write a synthetic per-layer JSONL routing trace")
    p.add_argument("--out", required=True)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth_trace)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"expertflow {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
