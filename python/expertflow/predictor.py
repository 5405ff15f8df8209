"""The routing-path predictor: before a step runs, which experts will every layer need?

``RoutingPathPredictor`` is a small MLP. For each token, before layer 0 runs, it scores every
(layer, expert) from what is known then: the token's input embedding ``[D]``, its position (8
sinusoidal features) and the previous token's actual routing path (multi-hot ``[L * E]``). Output:
logits ``[L, E]``; trained with multi-label binary cross-entropy on recorded traces, validated on
held-out sequences. A saved predictor (``.safetensors``) carries its config and the fingerprint of
the model it belongs to; loading it for another model is an error.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .files import atomic_output
from .planner import Forecast
from .traces import RecordedTrace

__all__ = ["PredictorConfig", "RoutingPathPredictor", "RecordedForecast", "RecordedGate", "model_fingerprint",
           "features", "train_predictor", "evaluate"]

POSITION_FEATURES = 8


def model_fingerprint(routers: list[torch.Tensor]) -> str:
    """Identifies a model by its routers' weights (sha256 of their bytes)."""
    h = hashlib.sha256()
    for w in routers:
        h.update(w.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def position_features(position: torch.Tensor) -> torch.Tensor:
    """``[N]`` positions -> ``[N, 8]`` sinusoids at wavelengths 2 .. 2**8 tokens."""
    scales = 2.0 ** torch.arange(1, POSITION_FEATURES // 2 + 1, dtype=torch.float32, device=position.device)
    angle = position.float()[:, None] * (2 * math.pi / scales)
    return torch.cat([angle.sin(), angle.cos()], dim=1)


def path_multi_hot(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``experts [N, L, k]`` (-1 = none) -> ``[N, L * E]`` float multi-hot."""
    n, num_layers, _ = experts.shape
    hot = torch.zeros(n, num_layers, num_experts + 1, dtype=torch.float32, device=experts.device)
    hot.scatter_(2, experts.long().clamp(min=-1) % (num_experts + 1), 1.0)
    return hot[:, :, :num_experts].reshape(n, -1)


def features(trace: RecordedTrace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(embedding ``[N, D]``, position ``[N]``, previous path ``[N, L*E]``) of every token of a trace."""
    num_experts = trace.meta["model"]["num_experts"]
    prev = torch.from_numpy(trace.previous_index())
    experts = torch.from_numpy(trace.experts.astype(np.int64))
    prev_experts = torch.where(prev[:, None, None] >= 0, experts[prev.clamp(min=0)], torch.full_like(experts, -1))
    return (
        torch.from_numpy(trace.embedding.astype(np.float32)),
        torch.from_numpy(trace.position.astype(np.int64)),
        path_multi_hot(prev_experts, num_experts),
    )


@dataclass
class PredictorConfig:
    num_layers: int
    num_experts: int
    top_k: int
    embed_dim: int
    hidden: int = 64
    model_fingerprint: str = ""
    model_type: str = ""
    static_top: list[list[int]] = field(default_factory=list)  # most frequent experts per layer (training traces)


class RoutingPathPredictor(nn.Module):
    """``forward(embedding [N, D], position [N], previous_path [N, L*E]) -> logits [N, L, E]``."""

    _staging: torch.Tensor | None = None  # forecast()'s pinned host buffer (CUDA), made on first use

    def __init__(self, config: PredictorConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.net = nn.Sequential(
            nn.Linear(c.embed_dim + POSITION_FEATURES + c.num_layers * c.num_experts, c.hidden),
            nn.GELU(),
            nn.Linear(c.hidden, c.num_layers * c.num_experts),
        )

    @property
    def name(self) -> str:
        return "predictor"

    def forward(self, embedding: torch.Tensor, position: torch.Tensor, previous_path: torch.Tensor) -> torch.Tensor:
        x = torch.cat([embedding.float(), position_features(position), previous_path.float()], dim=1)
        return self.net(x).view(-1, self.config.num_layers, self.config.num_experts)

    def num_bytes(self) -> int:
        """Bytes of the saved weights (float16)."""
        return sum(p.numel() * 2 for p in self.parameters())

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        with atomic_output(path) as tmp:
            save_file({k: v.to(torch.float16).contiguous() for k, v in self.state_dict().items()}, str(tmp),
                      metadata={"expertflow_predictor": json.dumps(asdict(self.config))})

    @classmethod
    def load(cls, path: str | Path, expected_fingerprint: str | None = None) -> RoutingPathPredictor:
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"predictor file {path} does not exist")
        try:
            with safe_open(str(path), "pt") as f:
                meta = (f.metadata() or {}).get("expertflow_predictor")
                if meta is None:
                    raise ValueError(f"{path} is not an ExpertFlow predictor (no expertflow_predictor metadata)")
                state = {k: f.get_tensor(k) for k in f.keys()}
            config = PredictorConfig(**json.loads(meta))
        except ValueError:
            raise
        except Exception as e:  # safetensors reports a cut file or a bad header as its own error types
            raise ValueError(f"{path} is not a readable predictor file ({type(e).__name__}: {e}); train it again "
                             "with `expertflow train-predictor`") from None
        c = config
        if not (c.num_layers >= 1 and c.num_experts >= 1 and 1 <= c.top_k <= c.num_experts and c.embed_dim >= 1
                and c.hidden >= 1):
            raise ValueError(f"{path} describes an impossible predictor: {c.num_layers} layers, {c.num_experts} experts, "
                             f"top-{c.top_k}, {c.embed_dim}-dim embeddings, hidden {c.hidden}")
        bad = [k for k, v in state.items() if not torch.isfinite(v.float()).all()]
        if bad:
            raise ValueError(f"{path} holds weights that are NaN or infinite ({', '.join(bad)}); train it again")
        if expected_fingerprint is not None and config.model_fingerprint != expected_fingerprint:
            raise ValueError(
                f"predictor {path} belongs to model {config.model_fingerprint} ({config.model_type}), not to this model "
                f"({expected_fingerprint}); train one on this model's traces with `expertflow train-predictor`"
            )
        model = cls(config)
        try:
            model.load_state_dict({k: v.float() for k, v in state.items()})
        except RuntimeError as e:
            raise ValueError(f"{path}: its weights do not fit the predictor its metadata describes ({e})") from None
        return model.eval()

    @torch.no_grad()
    def scores(self, trace: RecordedTrace) -> torch.Tensor:
        """Probabilities ``[N, L, E]`` for every token of a recorded trace."""
        if trace.meta["model"].get("fingerprint") != self.config.model_fingerprint:
            raise ValueError(
                f"this predictor belongs to model {self.config.model_fingerprint}, but the trace was recorded with "
                f"{trace.meta['model'].get('fingerprint')}"
            )
        return torch.sigmoid(self(*features(trace)))

    @torch.no_grad()
    def forecast(self, ctx, previous_path: np.ndarray) -> Forecast:
        """The step predictor of the ``expertflow`` policy (``policies.StepPredictor``): one forward on
        the model's device for the batch, one transfer of the union ``[L, E]`` to the host."""
        emb = ctx.embeddings
        if next(self.parameters()).device != emb.device:
            self.to(emb.device)
        path = torch.from_numpy(previous_path)
        if emb.device.type == "cuda":
            # A pinned staging buffer: the upload does not wait for the device (the per-layer routing
            # transfers of the step have synchronised before the buffer is written again).
            staging = self._staging
            if staging is None or staging.shape != path.shape:
                staging = self._staging = torch.empty(path.shape, dtype=path.dtype, pin_memory=True)
            staging.copy_(path)
            path = staging.to(emb.device, non_blocking=True)
        probs = torch.sigmoid(self(emb.float(), ctx.positions, path_multi_hot(path, self.config.num_experts)))
        union = 1.0 - torch.prod(1.0 - probs, dim=0)
        return Forecast(union.double().cpu().numpy())

    def for_replay(self, trace: RecordedTrace, schedule) -> RecordedForecast:
        """This predictor's forecasts of every token of a recorded trace, for replay (step = token)."""
        return RecordedForecast(self.scores(trace).double().numpy(), schedule)


class RecordedForecast:
    """Forecasts computed ahead for a recorded trace: ``probs [N, L, E]``; the step is the schedule's."""

    name = "predictor"

    def __init__(self, probs: np.ndarray, schedule) -> None:
        self.probs = probs
        self.schedule = schedule

    def forecast(self, ctx, previous_path: np.ndarray) -> Forecast:
        return Forecast(self.probs[self.schedule.step])


class RecordedGate:
    """The gate-ahead picks a recorded trace holds (``gate_ahead [N, L, k]``): at layer l, layer l+1's."""

    name = "recorded-gate"

    def __init__(self, trace: RecordedTrace, schedule) -> None:
        self.gate_ahead = trace.gate_ahead.astype(np.int64)
        self.schedule = schedule

    def picks(self, layer: int) -> np.ndarray:
        picks = self.gate_ahead[self.schedule.step, layer + 1]
        return picks[picks >= 0]


def _split_by_sequence(trace: RecordedTrace, every: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Token masks (train, validation): every ``every``-th sequence is held out whole."""
    seqs = np.unique(trace.sequence)
    held = set(seqs[::every].tolist())
    val = np.isin(trace.sequence, list(held))
    return ~val, val


def train_predictor(trace: RecordedTrace, hidden: int = 64, epochs: int = 60, lr: float = 3e-3, seed: int = 0,
                    progress: bool = True) -> tuple[RoutingPathPredictor, dict]:
    """Trains on the training sequences of ``trace``; returns the predictor and validation recall."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    m = trace.meta["model"]
    emb, pos, prev = features(trace)
    target = path_multi_hot(torch.from_numpy(trace.experts.astype(np.int64)), m["num_experts"]).view(-1, m["num_layers"], m["num_experts"])
    train_mask, val_mask = _split_by_sequence(trace)
    counts = target[torch.from_numpy(train_mask)].sum(0)  # [L, E]
    static_top = counts.topk(min(2 * m["top_k"], m["num_experts"]), dim=1).indices.tolist()
    config = PredictorConfig(m["num_layers"], m["num_experts"], m["top_k"], emb.shape[1], hidden,
                             m["fingerprint"], m.get("model_type", ""), static_top)
    model = RoutingPathPredictor(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    idx = torch.from_numpy(np.flatnonzero(train_mask))
    batch = 256
    for _ in tqdm(range(epochs), desc="training predictor", unit="epoch", disable=not progress):
        perm = idx[torch.randperm(len(idx))]
        for start in range(0, len(perm), batch):
            b = perm[start : start + batch]
            loss = nn.functional.binary_cross_entropy_with_logits(model(emb[b], pos[b], prev[b]), target[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    report = evaluate(model, trace, mask=val_mask)
    report["train_tokens"] = int(train_mask.sum())
    report["val_tokens"] = int(val_mask.sum())
    return model, report


def _recall(ranked: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    """Per layer: share of used experts found in the top-k of ``ranked [N, L, >=k]`` (expert ids)."""
    top = ranked[:, :, :k]
    hot = torch.zeros_like(target)
    valid = top >= 0
    hot.scatter_(2, top.clamp(min=0), valid.float())
    found = (hot * target).sum(dim=(0, 2))
    return found / target.sum(dim=(0, 2)).clamp(min=1)


def evaluate(model: RoutingPathPredictor, trace: RecordedTrace, mask: np.ndarray | None = None) -> dict:
    """recall@k and recall@2k per layer and mean: predictor, previous-token path, static, gate-ahead."""
    c = model.config
    k, L, E = c.top_k, c.num_layers, c.num_experts
    probs = model.scores(trace)
    experts = torch.from_numpy(trace.experts.astype(np.int64))
    target = path_multi_hot(experts, E).view(-1, L, E)
    prev = torch.from_numpy(trace.previous_index())
    keep = prev >= 0
    if mask is not None:
        keep &= torch.from_numpy(mask)
    probs, target = probs[keep], target[keep]
    prev_path = experts[prev[keep]]  # [N, L, k]
    gate = torch.from_numpy(trace.gate_ahead.astype(np.int64))[keep]
    n = probs.shape[0]
    ranked = probs.argsort(dim=-1, descending=True)  # [N, L, E]
    static = torch.tensor(c.static_top)[None].expand(n, L, -1)

    def merge(first: torch.Tensor, then: torch.Tensor) -> torch.Tensor:
        """``first``'s experts, then ``then``'s not already listed: [N, L, 2k]."""
        out = torch.full((n, L, 2 * k), -1, dtype=torch.long)
        a, b = first.tolist(), then.tolist()
        for i in range(n):
            for l in range(L):
                row = [e for e in a[i][l] if e >= 0]
                row += [e for e in b[i][l] if e not in row]
                out[i, l, : min(len(row), 2 * k)] = torch.tensor(row[: 2 * k], dtype=torch.long)
        return out

    methods = {
        "predictor": ranked,
        "previous_token": merge(prev_path, static),  # the path, then the layer's most frequent experts
        "static": static,
        "gate_ahead": gate,
    }
    report: dict = {"tokens": n, "top_k": k}
    for name, ranking in methods.items():
        for kk, label in ((k, "recall@k"), (2 * k, "recall@2k")):
            if ranking.shape[2] < kk:
                per_layer = None
            else:
                per_layer = _recall(ranking, target, kk)
                if name == "gate_ahead":
                    per_layer[0] = float("nan")  # layer 0 has no earlier layer to look ahead from
            report[f"{name}/{label}"] = None if per_layer is None else [round(float(v), 4) for v in per_layer]
            if per_layer is not None:
                valid = per_layer[~torch.isnan(per_layer)]
                report[f"{name}/{label}/mean"] = round(float(valid.mean()), 4)
    return report
