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
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .files import atomic_output

__all__ = [
    "RoutingTrace",
    "RecordedTrace",
    "TRACE_FORMAT",
    "TRACE_FILES",
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
#: What a recorded trace folder holds (save_recorded_trace writes nothing else).
TRACE_FILES = frozenset({"meta.json", "arrays.npz"})
#: Bounds on the ids a trace may hold: far beyond any published MoE model, and small enough that
#: tables over layers x experts stay small (an id of 2**31 is a corrupt line, not a model).
MAX_LAYERS = 4096
MAX_EXPERTS = 65536


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


def _int(value, name: str, low: int, high: int) -> int:
    """``value`` as an int in ``[low, high)``; a ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if not low <= number < high:
        raise ValueError(f"{name} {number} is out of range [{low}, {high})")
    return number


def _experts(value, num_experts: int) -> list[int]:
    """A routing record's experts: a non-empty list of distinct ids below ``num_experts``."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"experts must be a non-empty list of expert ids, got {value!r}")
    experts = [_int(e, "expert", 0, num_experts) for e in value]
    if len(set(experts)) != len(experts):
        raise ValueError(f"experts {experts} lists an expert twice; a router picks distinct experts")
    return experts


def _finish(tokens: dict, order: list, num_layers: int | None, num_experts: int | None, path: Path, **kwargs) -> RoutingTrace:
    if not tokens:
        raise ValueError(f"{path} holds no routing records")
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
                if not isinstance(row, dict):
                    raise ValueError(f"a record is a JSON object, got {type(row).__name__}")
                seq = (row.get("dataset", ""), row.get("problem_id", row.get("sequence_id", 0)))
                hash(seq)
                key = (sequences.setdefault(seq, len(sequences)), _int(row["token_idx"], "token_idx", 0, 1 << 40))
                layer = _int(row["layer"], "layer", 0, MAX_LAYERS)
                layers = tokens.setdefault(key, {})
                if layer in layers:
                    raise ValueError(f"layer {layer} of token {key[1]} of this sequence was already given")
                layers[layer] = _experts(row["experts"], MAX_EXPERTS)
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: not a routing record ({e}); expected layer, experts, token_idx") from e
    order = sorted(tokens)
    return _finish(tokens, order, None, None, path, source=str(path))


def read_route_csv(path: str | Path) -> RoutingTrace:
    """Reads a llama.cpp-style route CSV (``# layer=L expert_bytes=N`` headers, one row per expert)."""
    path = Path(path)
    header: dict[str, str] = {}
    expert_bytes: dict[int, int] = {}
    rows: list[str] = []
    lines: list[int] = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if line.startswith("#"):
                try:
                    for k, v in re.findall(r"(\w+)=(\S+)", line):
                        header[k] = v
                    m = re.search(r"layer=(\d+)\s+expert_bytes=(\d+)", line)
                    if m:
                        expert_bytes[_int(m.group(1), "layer", 0, MAX_LAYERS)] = _int(m.group(2), "expert_bytes", 0, 1 << 50)
                except ValueError as e:
                    raise ValueError(f"{path}:{lineno}: {e}") from None
            elif line.strip():
                rows.append(line)
                lines.append(lineno)
    try:
        num_layers = _int(header["n_layer"], "n_layer", 1, MAX_LAYERS + 1) if "n_layer" in header else None
        num_experts = _int(header["n_expert"], "n_expert", 1, MAX_EXPERTS + 1) if "n_expert" in header else None
    except ValueError as e:
        raise ValueError(f"{path}: header: {e}") from None
    reader = csv.DictReader(rows)
    tokens: dict[tuple, dict[int, dict[int, int]]] = {}
    for i, row in enumerate(reader):
        lineno = lines[i + 1] if i + 1 < len(lines) else lines[-1]
        try:
            key = (_int(row["turn"], "turn", 0, 1 << 40), _int(row["step"], "step", 0, 1 << 40))
            layer = _int(row["layer"], "layer", 0, num_layers or MAX_LAYERS)
            slot = _int(row["slot"], "slot", 0, MAX_EXPERTS)
            expert = _int(row["expert"], "expert", 0, num_experts or MAX_EXPERTS)
            ranked = tokens.setdefault(key, {}).setdefault(layer, {})
            if slot in ranked or expert in ranked.values():
                raise ValueError(f"layer {layer} of turn {key[0]} step {key[1]} lists rank {slot} or expert {expert} twice")
            ranked[slot] = expert
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{lineno}: {e}; expected turn,phase,step,layer,slot,expert columns") from e
    paths = {k: {l: [e for _, e in sorted(v.items())] for l, v in layers.items()} for k, layers in tokens.items()}
    return _finish(paths, sorted(paths), num_layers, num_experts, path, expert_bytes=expert_bytes or None,
                   source=str(path))


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
    folder.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(folder) as tmp:
        tmp.mkdir()
        (tmp / "meta.json").write_text(json.dumps({**trace.meta, "format": TRACE_FORMAT, "num_tokens": trace.num_tokens}, indent=1))
        np.savez(tmp / "arrays.npz", **{name: getattr(trace, name) for name in _ARRAYS})
    return folder


def load_recorded_trace(folder: str | Path) -> RecordedTrace:
    folder = Path(folder)
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{folder} is not an ExpertFlow trace folder (no meta.json); record one with `expertflow trace`")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as e:
        raise ValueError(f"{meta_path} is not valid JSON ({e}); record the trace again with `expertflow trace`") from None
    if not isinstance(meta, dict) or meta.get("format") != TRACE_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{folder} has trace format {found!r}; this version reads {TRACE_FORMAT}")
    model = meta.get("model")
    need = ("num_layers", "num_experts", "top_k", "embed_dim", "fingerprint")
    if not isinstance(model, dict) or any(k not in model for k in need):
        raise ValueError(f"{meta_path} lacks its model description ({', '.join(need)}); record the trace again")
    try:
        with np.load(folder / "arrays.npz") as arrays:
            trace = RecordedTrace(meta, *(arrays[name] for name in _ARRAYS))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{folder / 'arrays.npz'} is missing, empty or truncated ({e}); record the trace again") from None
    n, L, k = trace.num_tokens, model["num_layers"], model["top_k"]
    shapes = {"position": (n,), "token": (n,), "experts": (n, L, k), "weights": (n, L, k),
              "embedding": (n, model["embed_dim"]), "gate_ahead": (n, L, k)}
    for name, shape in shapes.items():
        if getattr(trace, name).shape != shape:
            raise ValueError(f"{folder}: {name} has shape {list(getattr(trace, name).shape)}, expected {list(shape)} "
                             "for the model meta.json describes")
    if n == 0 or ((trace.experts < -1) | (trace.experts >= model["num_experts"])).any():
        raise ValueError(f"{folder}: the trace is empty or holds expert ids outside 0..{model['num_experts'] - 1}")
    return trace


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
    with atomic_output(path) as tmp, tmp.open("w") as f:
        for seq, token in zip(trace.sequence_ids or ["0"] * trace.num_tokens, trace.tokens):
            idx = counters.get(seq, 0)
            counters[seq] = idx + 1
            for layer, experts in token:
                f.write(json.dumps({"problem_id": seq, "layer": layer, "experts": experts, "token_idx": idx}) + "\n")
