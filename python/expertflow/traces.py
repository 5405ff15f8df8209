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

__all__ = [
    "RoutingTrace",
    "RecordedTrace",
    "TRACE_FORMAT",
    "read_trace",
    "read_jsonl_trace",
    "read_route_csv",
    "load_recorded_trace",
    "save_recorded_trace",
    "synthetic_trace",
    "write_jsonl_trace",
]

#: Version tag of ExpertFlow's own trace folders (``expertflow trace``).
TRACE_FORMAT = "expertflow-trace/1"


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

    def to_array(self, num_layers: int | None = None) -> np.ndarray:
        """``[num_tokens, num_layers, k]`` int64 expert ids (k: the most experts a layer lists).

        A layer a token skipped, or lists fewer experts for, takes the previous token's experts there
        (the first token's: experts 0, 1, ...), so every entry routes to k distinct experts.
        """
        num_layers = self.num_layers if num_layers is None else num_layers
        k = self.max_experts_per_layer
        out = np.empty((self.num_tokens, num_layers, k), dtype=np.int64)
        previous = np.broadcast_to(np.arange(k), (num_layers, k))
        for t, token in enumerate(self.tokens):
            row = previous.copy()
            for layer, experts in token:
                if layer >= num_layers:
                    continue
                kept = list(dict.fromkeys(experts))[:k]
                fill = [e for e in row[layer] if e not in kept]
                row[layer] = kept + fill[: k - len(kept)]
            out[t] = row
            previous = row
        return out


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


@dataclass
class RecordedTrace:
    """A trace recorded by ``expertflow trace`` (see docs/predictor.md for the on-disk format).

    Per token, in recording order: ``sequence [N]`` int32, ``position [N]`` int32, ``token [N]`` int32,
    ``experts [N, L, k]`` int16 (router rank order; -1 where a layer did not run), ``weights [N, L, k]``
    float16, ``embedding [N, D]`` float16 (the token's input embedding: the predictor's feature),
    ``gate_ahead [N, L, k]`` int16 (layer l+1's router applied to layer l's hidden state; -1 for layer 0).
    """

    meta: dict
    sequence: np.ndarray
    position: np.ndarray
    token: np.ndarray
    experts: np.ndarray
    weights: np.ndarray
    embedding: np.ndarray
    gate_ahead: np.ndarray

    @property
    def num_tokens(self) -> int:
        return int(self.sequence.shape[0])

    def previous_index(self) -> np.ndarray:
        """Index of the previous token of the same sequence, or -1: ``[N]`` int64."""
        prev = np.arange(self.num_tokens) - 1
        same = np.zeros(self.num_tokens, dtype=bool)
        same[1:] = self.sequence[1:] == self.sequence[:-1]
        return np.where(same, prev, -1)

    def to_routing_trace(self) -> RoutingTrace:
        tokens = [
            [(l, [int(e) for e in self.experts[i, l] if e >= 0]) for l in range(self.experts.shape[1]) if self.experts[i, l, 0] >= 0]
            for i in range(self.num_tokens)
        ]
        m = self.meta["model"]
        return RoutingTrace(
            m["num_layers"], m["num_experts"], tokens, source=self.meta.get("source", ""),
            sequence_ids=[str(s) for s in self.sequence.tolist()],
        )


_ARRAYS = ("sequence", "position", "token", "experts", "weights", "embedding", "gate_ahead")


def save_recorded_trace(trace: RecordedTrace, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "meta.json").write_text(json.dumps({**trace.meta, "format": TRACE_FORMAT, "num_tokens": trace.num_tokens}, indent=1))
    np.savez(folder / "arrays.npz", **{name: getattr(trace, name) for name in _ARRAYS})
    return folder


def load_recorded_trace(folder: str | Path) -> RecordedTrace:
    folder = Path(folder)
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{folder} is not an ExpertFlow trace folder (no meta.json); record one with `expertflow trace`")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != TRACE_FORMAT:
        raise ValueError(f"{folder} has trace format {meta.get('format')!r}; this version reads {TRACE_FORMAT}")
    with np.load(folder / "arrays.npz") as arrays:
        return RecordedTrace(meta, *(arrays[name] for name in _ARRAYS))


def read_trace(path: str | Path) -> RoutingTrace:
    """Reads a trace: an ``expertflow trace`` folder, a per-layer ``.jsonl`` or a route ``.csv``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"trace file {path} does not exist")
    if path.is_dir():
        return load_recorded_trace(path).to_routing_trace()
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
    for _ in range(num_tokens):
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
