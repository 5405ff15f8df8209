"""Random-weight MoE models at the dimensions of real ones, from configs written here.

``--arch`` names a published model; ``--layers`` keeps its first N decoder layers so the model fits
the machine. Weights are random bf16 (normal, std 0.02), generated on the compute device; only the
dimensions matter for copy and compute time. gpt-oss-120b's experts (hidden 2880, FFN 2880, 128
experts) are built as Mixtral-style SwiGLU experts of those dimensions, without gpt-oss's biases and
clamp (real gpt-oss checkpoints load as ``gpt_oss``): a copy costs what one of its experts costs, and
its biases are 0.02% of an expert's bytes. ``--expert-dtype mxfp4`` stores them as gpt-oss ships them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SHAPES", "Shape", "make_config"]


@dataclass(frozen=True)
class Shape:
    model_type: str
    config: dict
    source: str  # where the dimensions come from


SHAPES: dict[str, Shape] = {
    "mixtral-8x7b": Shape("mixtral", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        num_local_experts=8, num_experts_per_tok=2, vocab_size=32000, max_position_embeddings=32768, rope_theta=1e6,
    ), "mistralai/Mixtral-8x7B-v0.1 config.json"),
    "qwen3-30b-a3b": Shape("qwen3_moe", dict(
        hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
        vocab_size=151936, max_position_embeddings=40960, rope_theta=1e6,
    ), "Qwen/Qwen3-30B-A3B config.json"),
    "gpt-oss-120b": Shape("mixtral", dict(
        hidden_size=2880, intermediate_size=2880, num_hidden_layers=36, num_attention_heads=64, num_key_value_heads=8,
        head_dim=64, num_local_experts=128, num_experts_per_tok=4, vocab_size=201088, max_position_embeddings=131072,
        rope_theta=150000.0,
    ), "openai/gpt-oss-120b config.json (experts as Mixtral-style SwiGLU in bf16)"),
    "deepseek-v2-lite": Shape("deepseek_v2", dict(
        hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16,
        num_key_value_heads=16, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1,
        kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_group=1,
        topk_group=1, vocab_size=102400, max_position_embeddings=163840,
    ), "deepseek-ai/DeepSeek-V2-Lite config.json"),
    "olmoe-1b-7b": Shape("olmoe", dict(
        hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
        num_experts=64, num_experts_per_tok=8, vocab_size=50304, max_position_embeddings=4096,
    ), "allenai/OLMoE-1B-7B-0924 config.json"),
}


def make_config(arch: str, num_layers: int | None = None, top_k: int | None = None, overrides: dict | None = None):
    """The transformers config of ``arch`` with ``num_layers`` MoE layers (dense leading layers stay)."""
    from transformers import AutoConfig

    if arch not in SHAPES:
        raise ValueError(f"unknown --arch '{arch}'; choose one of {', '.join(SHAPES)}")
    shape = SHAPES[arch]
    kwargs = dict(shape.config)
    if num_layers is not None:
        full = kwargs["num_hidden_layers"] - kwargs.get("first_k_dense_replace", 0)
        if not 1 <= num_layers <= full:
            raise ValueError(f"--layers must be between 1 and {full} for {arch}, got {num_layers}")
        kwargs["num_hidden_layers"] = num_layers + kwargs.get("first_k_dense_replace", 0)
    if top_k is not None:
        kwargs["num_experts_per_tok"] = top_k
    kwargs.update(overrides or {})
    config = AutoConfig.for_model(shape.model_type, **kwargs)
    config.dtype = torch.bfloat16
    return config
