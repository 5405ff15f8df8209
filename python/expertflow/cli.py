"""The ``expertflow`` command line.

``expertflow replay``      drive the slot cache through a routing trace (no model needed)
``expertflow synth-trace`` write a synthetic routing trace (for machines without recorded ones)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from .replay import REPLAY_POLICIES, ReplayResult, parse_capacity, replay
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
    policies = list(dict.fromkeys(r.policy for r in results))
    caps = list(dict.fromkeys((r.capacity, label) for r, label in zip(results, capacities)))
    cells = {(r.policy, r.capacity): r for r in results}
    header = ["policy"] + [f"{label} ({cap} slots)" if label != str(cap) else f"{cap} slots" for cap, label in caps]
    rows = [header]
    for p in policies:
        row = [p]
        for cap, _ in caps:
            r = cells[(p, cap)]
            extra = f", {_format_bytes(r.bytes)}" if r.bytes is not None else ""
            row.append(f"{r.hit_ratio:6.1%} hit ({r.misses} miss{extra})")
        rows.append(row)
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
    labels = _split(args.capacity)
    results, result_labels = [], []
    for label in labels:
        capacity = parse_capacity(label, trace, args.per_layer)
        for p in policies:
            results.append(replay(trace, capacity, p, per_layer=args.per_layer))
            result_labels.append(label)
    if args.json:
        out = [r.to_dict() for r in results]
        print(json.dumps(out[0] if len(out) == 1 else out))
        return 0
    scope = "slots per layer" if args.per_layer else "slots shared by all layers"
    print(
        f"trace {trace.source}: {trace.num_tokens} tokens, {trace.num_layers} layers x {trace.num_experts} experts, "
        f"{trace.num_accesses} expert accesses; capacity in {scope}"
    )
    print(_table(results, result_labels))
    return 0


def cmd_synth_trace(args: argparse.Namespace) -> int:
    trace = synthetic_trace(args.layers, args.experts, args.top_k, args.tokens, args.seed)
    write_jsonl_trace(trace, args.out)
    log.info("wrote %d tokens x %d layers to %s", trace.num_tokens, trace.num_layers, args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="expertflow", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("replay", help="replay a routing trace through the expert cache")
    p.add_argument("--trace", required=True, help="per-layer .jsonl or route .csv trace")
    p.add_argument("--capacity", required=True, help="slots (e.g. 64) or share of all experts (e.g. 25%%); comma list for a table")
    p.add_argument("--per-layer", action="store_true", help="capacity slots for each layer instead of one shared pool")
    p.add_argument("--policy", default="lru", help=f"{'|'.join(REPLAY_POLICIES)}; comma list for a table")
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
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"expertflow {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
