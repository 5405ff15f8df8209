"""Trains ExpertFlow's bundled model: a small Mixtral-architecture MoE on real text.

    python scripts/train_tiny_mixtral.py --text ../shared/data/text/tinyshakespeare.txt PYDOC_DIR \
        --out python/expertflow/data/tiny-mixtral

Trains a byte-level BPE tokenizer (``tokenizers``) and a Mixtral (``transformers``) on the given
files or folders (``*.txt``, ``*.rst.txt``), holds out every 20th document for validation, and saves
``config.json``, ``model.safetensors``, ``tokenizer.json`` and ``training_report.json`` (validation
perplexity; per-layer entropy of expert usage against the uniform ``log2(num_experts)`` bits). Runs on
a GPU in minutes and on a CPU with fewer ``--steps``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

DOC_CHARS = 20_000  # single-file corpora are cut into documents of this size for the split


def read_documents(paths: list[str]) -> list[str]:
    docs: list[str] = []
    for p in map(Path, paths):
        files = sorted(p.rglob("*.txt")) if p.is_dir() else [p]
        for f in files:
            text = f.read_text(encoding="utf-8", errors="replace")
            docs += [text[i : i + DOC_CHARS] for i in range(0, len(text), DOC_CHARS)] if len(files) == 1 else [text]
    if not docs:
        raise SystemExit(f"no text found in {paths}")
    return docs


def train_tokenizer(docs: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(docs, trainer)
    return tok


def encode(tok, docs: list[str]) -> np.ndarray:
    eot = tok.token_to_id("<|endoftext|>")
    ids: list[int] = []
    for enc in tok.encode_batch(docs):
        ids += enc.ids + [eot]
    return np.array(ids, dtype=np.int64)


def batches(data: np.ndarray, seq: int, batch: int, rng: np.random.Generator):
    while True:
        starts = rng.integers(0, len(data) - seq - 1, size=batch)
        x = np.stack([data[s : s + seq + 1] for s in starts])
        yield torch.from_numpy(x)


@torch.no_grad()
def evaluate(model, data: np.ndarray, seq: int, device, max_windows: int = 64) -> dict:
    """Validation perplexity and each layer's expert-usage distribution over held-out text."""
    model.eval()
    cfg = model.config
    usage = torch.zeros(cfg.num_hidden_layers, cfg.num_local_experts, dtype=torch.float64)
    total_loss, total_tokens = 0.0, 0
    starts = list(range(0, len(data) - seq - 1, seq))[:max_windows]
    for s in starts:
        x = torch.from_numpy(data[s : s + seq + 1]).unsqueeze(0).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(x[:, :-1], output_router_logits=True)
        logits = out.logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0], x[0, 1:], reduction="sum")
        total_loss += loss.item()
        total_tokens += seq
        for l, router_logits in enumerate(out.router_logits):
            top = router_logits.float().topk(cfg.num_experts_per_tok, dim=-1).indices.flatten().cpu()
            usage[l] += torch.bincount(top, minlength=cfg.num_local_experts).double()
    model.train()
    p = usage / usage.sum(dim=1, keepdim=True)
    entropy = -(p * torch.log2(p.clamp_min(1e-12))).sum(dim=1)
    return {
        "val_tokens": total_tokens,
        "val_loss": total_loss / total_tokens,
        "val_perplexity": math.exp(total_loss / total_tokens),
        "routing_entropy_bits": [round(float(h), 3) for h in entropy],
        "uniform_entropy_bits": round(math.log2(cfg.num_local_experts), 3),
        "expert_usage": [[round(float(v), 4) for v in row] for row in p],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", nargs="+", required=True, help="text files or folders of *.txt")
    ap.add_argument("--out", required=True)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=96)
    ap.add_argument("--ffn", type=int, default=80, help="intermediate size of each expert")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--aux-loss", type=float, default=0.02, help="router load-balancing loss weight")
    ap.add_argument("--max-seconds", type=float, default=None, help="stop training early after this long")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--save-dtype", default="bfloat16")
    args = ap.parse_args()

    from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    device = torch.device(args.device)
    docs = read_documents(args.text)
    train_docs = [d for i, d in enumerate(docs) if i % 20 != 7]
    val_docs = [d for i, d in enumerate(docs) if i % 20 == 7]
    tok = train_tokenizer(train_docs, args.vocab)
    train_ids, val_ids = encode(tok, train_docs), encode(tok, val_docs)
    eot = tok.token_to_id("<|endoftext|>")
    config = MixtralConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=args.hidden, intermediate_size=args.ffn,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        num_local_experts=args.experts, num_experts_per_tok=args.top_k, max_position_embeddings=4 * args.seq,
        tie_word_embeddings=True, router_aux_loss_coef=args.aux_loss, output_router_logits=False,
        bos_token_id=eot, eos_token_id=eot, pad_token_id=eot, rope_theta=10000.0,
    )
    model = MixtralForCausalLM(config).to(device)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))
    )
    t0 = time.time()
    stream = batches(train_ids, args.seq, args.batch, rng)
    bar = tqdm(range(args.steps), desc="training", unit="step")
    for step in bar:
        x = next(stream).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(x[:, :-1], output_router_logits=True)
        loss = torch.nn.functional.cross_entropy(out.logits.float().reshape(-1, config.vocab_size), x[:, 1:].reshape(-1))
        total = loss + (args.aux_loss * out.aux_loss if out.aux_loss is not None else 0)
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if args.max_seconds is not None and time.time() - t0 > args.max_seconds:
            args.steps = step + 1
            break
    train_seconds = time.time() - t0
    report = evaluate(model, val_ids, args.seq, device)
    report.update({
        "train_tokens": len(train_ids), "steps": args.steps, "batch": args.batch, "seq": args.seq,
        "train_seconds": round(train_seconds, 1), "device": str(torch.cuda.get_device_name() if device.type == "cuda" else "cpu"),
        "num_parameters": sum(p.numel() for p in model.parameters()), "text": [Path(t).name for t in args.text],
    })
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False
    model.to(getattr(torch, args.save_dtype)).save_pretrained(out_dir)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                            pad_token="<|endoftext|>").save_pretrained(out_dir)
    (out_dir / "training_report.json").write_text(json.dumps(report, indent=2))
    size = sum(f.stat().st_size for f in out_dir.iterdir())
    print(json.dumps({k: v for k, v in report.items() if k != "expert_usage"}, indent=1))
    print(f"saved to {out_dir}: {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
