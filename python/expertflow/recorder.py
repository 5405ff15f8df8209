"""``expertflow trace``: record which experts a model's routers choose, token by token.

Runs greedy generation over prompts with the model loaded by :func:`expertflow.from_pretrained` (any
policy; ``all_gpu`` by default) and records per token: sequence, position, token id, each layer's
experts and router weights, gate-ahead's guess for each layer (the next layer's router applied to
the current hidden state), and the token's input embedding (the predictor's feature).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .predictor import model_fingerprint
from .traces import RecordedTrace

__all__ = ["read_prompts", "record_trace"]


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line of a ``.txt``, or the ``prompt`` field of each ``.jsonl`` object."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist or is not a file")
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e})") from None
    if path.suffix == ".jsonl":
        prompts = []
        for number, line in enumerate(lines, 1):
            try:
                prompt = json.loads(line)["prompt"]
            except (ValueError, KeyError, TypeError):
                prompt = None
            if not isinstance(prompt, str) or not prompt:
                raise ValueError(f"{path}:{number}: not a JSON object with a non-empty string 'prompt' field")
            prompts.append(prompt)
    else:
        prompts = lines
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def record_trace(model, tokenizer, prompts: list[str], max_new_tokens: int = 32, progress: bool = True,
                 source: str = "") -> RecordedTrace:
    """Records ``model`` (loaded by ``expertflow.from_pretrained``) generating from each prompt."""
    engine = model.expertflow
    arch, layers = engine.architecture, engine.layers
    if arch.encoder_decoder:
        raise ValueError("tracing records decoder-only models; Switch Transformers is encoder-decoder")
    num_experts, top_k, hidden, _ = arch.dims(model.config)
    num_layers = len(layers)
    device = next(model.parameters()).device
    rows: dict[str, list[np.ndarray]] = {k: [] for k in ("sequence", "position", "token", "experts", "weights", "embedding", "gate_ahead")}
    step: dict = {}
    looking_ahead = [False]
    seq_state = {"sequence": 0, "position": 0}

    def flush() -> None:
        if "token" not in step:
            return
        ids, emb = step["token"], step["embedding"]
        n = ids.shape[0]
        experts = np.full((n, num_layers, top_k), -1, dtype=np.int16)
        weights = np.zeros((n, num_layers, top_k), dtype=np.float16)
        gate = np.full((n, num_layers, top_k), -1, dtype=np.int16)
        for l in range(num_layers):
            if l in step.get("experts", {}):
                experts[:, l] = step["experts"][l]
                weights[:, l] = step["weights"][l]
            if l in step.get("gate", {}):
                gate[:, l] = step["gate"][l]
        start = seq_state["position"]
        rows["sequence"].append(np.full(n, seq_state["sequence"], dtype=np.int32))
        rows["position"].append(np.arange(start, start + n, dtype=np.int32))
        rows["token"].append(ids.astype(np.int32))
        rows["experts"].append(experts)
        rows["weights"].append(weights)
        rows["embedding"].append(emb.astype(np.float16))
        rows["gate_ahead"].append(gate)
        seq_state["position"] = start + n
        step.clear()

    def on_embedding(module, inputs, output):
        flush()
        step["token"] = inputs[0].reshape(-1).cpu().numpy()
        step["embedding"] = output.reshape(-1, output.shape[-1]).float().cpu().numpy()

    def on_router(layer):
        def hook(module, inputs, output):
            if looking_ahead[0]:
                return
            _, w, idx = output
            step.setdefault("experts", {})[layer.index] = idx.reshape(-1, top_k).cpu().numpy()
            step.setdefault("weights", {})[layer.index] = w.reshape(-1, top_k).float().cpu().numpy()
            if layer.next is not None:
                looking_ahead[0] = True
                try:
                    guess = arch.router_top_k(layer.next.router, inputs[0].reshape(-1, hidden))
                finally:
                    looking_ahead[0] = False
                step.setdefault("gate", {})[layer.next.index] = guess.reshape(-1, top_k).cpu().numpy()

        return hook

    handles = [model.get_input_embeddings().register_forward_hook(on_embedding)]
    handles += [layer.router.register_forward_hook(on_router(layer)) for layer in layers]
    try:
        for seq, prompt in enumerate(tqdm(prompts, desc="tracing", unit="prompt", disable=not progress)):
            seq_state.update(sequence=seq, position=0)
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
            with torch.no_grad():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                               do_sample=False, pad_token_id=model.config.pad_token_id)
            flush()
    finally:
        for h in handles:
            h.remove()
    meta = {
        "source": source,
        "model": {
            "model_type": model.config.model_type,
            "fingerprint": model_fingerprint([layer.router.weight for layer in layers]),
            "num_layers": num_layers,
            "num_experts": num_experts,
            "top_k": top_k,
            "embed_dim": int(rows["embedding"][0].shape[1]),
        },
        "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
    }
    return RecordedTrace(meta, *(np.concatenate(rows[k]) for k in ("sequence", "position", "token", "experts", "weights", "embedding", "gate_ahead")))
