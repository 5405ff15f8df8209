"""Routing traces: which experts each token used at each MoE layer.

A :class:`RoutingTrace` is a sequence of tokens in replay order; each token visits its layers in
ascending order and needs, at each, a list of experts in router-rank order. Readers for the two
external formats (see ``docs/replay.md``):

- per-layer JSONL (vLLM-style logging): one object per (sequence, token, layer) with ``experts``;
  sequences in order of first appearance, then ``token_idx``;
- route CSV (llama.cpp-style ``--route-trace``): ``# layer=L expert_bytes=N`` headers, then rows
  ``turn,phase,step,layer,slot,expert,...``; tokens by ``turn`` then ``step`` (prompt and decode alike).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["RoutingTrace", "read_trace", "read_jsonl_trace", "read_route_csv", "synthetic_trace", "write_jsonl_trace"]


@dataclass
class RoutingTrace:
    """``tokens[i]`` is a list of ``(layer, experts)`` in ascending layer order."""

    num_layers: int
    num_experts: int
    tokens: list[list[tuple[int, list[int]]]]
    expert_bytes: dict[int, int] | None = None  # per layer, when the source gives sizes
    source: str = ""
    sequence_ids: list[str] = field(default_factory=list)  # per token

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_accesses(self) -> int:
        return sum(len(experts) for token in self.tokens for _, experts in token)

    @property
    def max_experts_per_layer(self) -> int:
        return max((len(experts) for token in self.tokens for _, experts in token), default=0)

    def layer_visits(self) -> Iterator[tuple[int, list[int]]]:
        """Every (layer, experts) in replay order."""
        for token in self.tokens:
            yield from token


def _finish(tokens: dict, order: list, num_layers: int | None, num_experts: int | None, **kwargs) -> RoutingTrace:
    out, seq_ids, max_layer, max_expert = [], [], -1, -1
    for key in order:
        layers = tokens[key]
        visit = []
        for layer in sorted(layers):
            experts = layers[layer]
            visit.append((layer, experts))
            max_layer = max(max_layer, layer)
            max_expert = max(max_expert, *experts)
        out.append(visit)
        seq_ids.append(str(key[0]))
    return RoutingTrace(
        num_layers=num_layers if num_layers is not None else max_layer + 1,
        num_experts=num_experts if num_experts is not None else max_expert + 1,
        tokens=out,
        sequence_ids=seq_ids,
        **kwargs,
    )


def read_jsonl_trace(path: str | Path) -> RoutingTrace:
    """Reads a per-layer JSONL trace (one object per sequence, token and layer)."""
    path = Path(path)
    tokens: dict[tuple, dict[int, list[int]]] = {}
    sequences: dict[tuple, int] = {}
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                seq = (row.get("dataset", ""), row.get("problem_id", row.get("sequence_id", 0)))
                key = (sequences.setdefault(seq, len(sequences)), int(row["token_idx"]))
                tokens.setdefault(key, {})[int(row["layer"])] = [int(e) for e in row["experts"]]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: not a routing record ({e}); expected layer, experts, token_idx") from e
    order = sorted(tokens)
    return _finish(tokens, order, None, None, source=str(path))


def read_route_csv(path: str | Path) -> RoutingTrace:
    """Reads a llama.cpp-style route CSV (``# layer=L expert_bytes=N`` headers, one row per expert)."""
    path = Path(path)
    header: dict[str, str] = {}
    expert_bytes: dict[int, int] = {}
    rows = []
    with path.open() as f:
        for line in f:
            if line.startswith("#"):
                for k, v in re.findall(r"(\w+)=(\S+)", line):
                    header[k] = v
                m = re.search(r"layer=(\d+)\s+expert_bytes=(\d+)", line)
                if m:
                    expert_bytes[int(m.group(1))] = int(m.group(2))
            else:
                rows.append(line)
    reader = csv.DictReader(rows)
    tokens: dict[tuple, dict[int, list[tuple[int, int]]]] = {}
    for lineno, row in enumerate(reader, 2):
        try:
            key = (int(row["turn"]), int(row["step"]))
            tokens.setdefault(key, {}).setdefault(int(row["layer"]), []).append((int(row["slot"]), int(row["expert"])))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: data row {lineno}: {e}; expected turn,phase,step,layer,slot,expert columns") from e
    ranked = {k: {l: [e for _, e in sorted(v)] for l, v in layers.items()} for k, layers in tokens.items()}
    return _finish(
        ranked,
        sorted(ranked),
        int(header["n_layer"]) if "n_layer" in header else None,
        int(header["n_expert"]) if "n_expert" in header else None,
        expert_bytes=expert_bytes or None,
        source=str(path),
    )


def read_trace(path: str | Path) -> RoutingTrace:
    """Reads a trace, choosing the format by extension (``.jsonl`` or ``.csv``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"trace file {path} does not exist")
    if path.suffix == ".jsonl":
        return read_jsonl_trace(path)
    if path.suffix == ".csv":
        return read_route_csv(path)
    raise ValueError(f"unknown trace format '{path.suffix}' of {path}; use a per-layer .jsonl or a route .csv")


def synthetic_trace(
    num_layers: int = 32, num_experts: int = 8, top_k: int = 2, num_tokens: int = 256, seed: int = 0
) -> RoutingTrace:
    """A made-up trace with real traces' two traits: skewed expert popularity per layer and tokens
    that often reuse the previous token's experts. For demos where no recorded trace is at hand."""
    rng = np.random.default_rng(seed)
    popularity = rng.dirichlet(np.full(num_experts, 0.6), size=num_layers)
    tokens, previous = [], None
    for t in range(num_tokens):
        visit = []
        for layer in range(num_layers):
            if previous is not None and rng.random() < 0.35:
                experts = list(previous[layer][1])
            else:
                experts = [int(e) for e in rng.choice(num_experts, size=top_k, replace=False, p=popularity[layer])]
            visit.append((layer, experts))
        tokens.append(visit)
        previous = visit
    return RoutingTrace(num_layers, num_experts, tokens, source=f"synthetic(seed={seed})", sequence_ids=["0"] * num_tokens)


def write_jsonl_trace(trace: RoutingTrace, path: str | Path) -> None:
    """Writes ``trace`` in the per-layer JSONL format (sequence = ``problem_id``)."""
    counters: dict[str, int] = {}
    with Path(path).open("w") as f:
        for seq, token in zip(trace.sequence_ids or ["0"] * trace.num_tokens, trace.tokens):
            idx = counters.get(seq, 0)
            counters[seq] = idx + 1
            for layer, experts in token:
                f.write(json.dumps({"problem_id": seq, "layer": layer, "experts": experts, "token_idx": idx}) + "\n")
