"""Tiny random-weight MoE models of every supported architecture, saved in both expert layouts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

COMMON = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=97, max_position_embeddings=128, eos_token_id=96, pad_token_id=95, bos_token_id=1)

CONFIGS = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2),
    "deepseek_v2": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
                        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, num_key_value_heads=4,
                        qk_nope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1),
    "deepseek_v3": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
                        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, num_key_value_heads=4,
                        qk_nope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1),
    # gpt-oss: MXFP4 blocks need input sizes that are multiples of 32 (hidden 32, ffn 64)
    "gpt_oss": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=64, head_dim=8, sliding_window=8,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                    rope_parameters={"rope_type": "default", "rope_theta": 150000.0}),
    "switch_transformers": dict(d_model=32, d_ff=48, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2,
                                num_sparse_encoder_layers=2, num_sparse_decoder_layers=2, num_experts=8,
                                vocab_size=97, expert_capacity=64, decoder_start_token_id=0, pad_token_id=0,
                                eos_token_id=96),
}
ARCHS = tuple(CONFIGS)


def build(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32, overrides: dict | None = None) -> torch.nn.Module:
    """A random model whose routing and outputs are far from uniform (weights ~ N(0, 0.2))."""
    kwargs = CONFIGS[model_type] if model_type == "switch_transformers" else {**COMMON, **CONFIGS[model_type]}
    kwargs = {**kwargs, **(overrides or {})}
    config = AutoConfig.for_model(model_type, **kwargs)
    auto = AutoModelForSeq2SeqLM if model_type == "switch_transformers" else AutoModelForCausalLM
    torch.manual_seed(seed)
    model = auto.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.to(dtype).eval()


def _published(state: dict[str, torch.Tensor], model_type: str) -> dict[str, torch.Tensor]:
    """Fused v5 expert tensors rewritten as the per-expert tensors of checkpoints as published
    (gpt-oss publishes them fused)."""
    if model_type == "gpt_oss":
        return state
    out = {}
    for name, t in state.items():
        m = re.fullmatch(r"(.*\.experts)\.(gate_up_proj|down_proj)", name)
        if not m:
            out[name.replace(".mlp.", ".block_sparse_moe.") if model_type == "mixtral" else name] = t
            continue
        path = m.group(1).replace(".mlp.", ".block_sparse_moe.") if model_type == "mixtral" else m.group(1)
        gate, up, down = ("w1", "w3", "w2") if model_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        for e in range(t.shape[0]):
            if m.group(2) == "gate_up_proj":
                g, u = t[e].chunk(2, dim=0)
                out[f"{path}.{e}.{gate}.weight"] = g.contiguous()
                out[f"{path}.{e}.{up}.weight"] = u.contiguous()
            else:
                out[f"{path}.{e}.{down}.weight"] = t[e].contiguous()
    return out


def _mxfp4(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """gpt-oss's fused expert weights as its MXFP4 checkpoints hold them: ``_blocks`` and ``_scales``
    of each ``[E, in, out]`` weight, quantized along ``in`` (biases stay)."""
    from expertflow.formats import WeightSpec, expert_format

    fmt, out = expert_format("mxfp4"), {}
    for name, t in state.items():
        if not re.fullmatch(r".*\.experts\.(gate_up_proj|down_proj)", name):
            out[name] = t
            continue
        spec = WeightSpec("w", t.shape[2], t.shape[1], transposed=True)
        parts = [fmt.quantize(spec, t[e].float()) for e in range(t.shape[0])]
        out[name + "_blocks"] = torch.stack([q["w_blocks"] for q in parts])
        out[name + "_scales"] = torch.stack([q["w_scales"] for q in parts])
    return out


def _fp8(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every projection (attention, shared and routed experts; not the router, embeddings or head)
    as DeepSeek-V3 and Qwen3 FP8 checkpoints hold them: e4m3 weights and ``weight_scale_inv`` per
    128 x 128 block."""
    from expertflow.formats import WeightSpec, expert_format

    fmt, out = expert_format("fp8"), {}
    for name, t in state.items():
        if not name.endswith("proj.weight") or t.ndim != 2:
            out[name] = t
            continue
        q = fmt.quantize(WeightSpec("w", *t.shape), t.float())
        out[name], out[name + "_scale_inv"] = q["w"], q["w_scale"]
    return out


def save(model: torch.nn.Module, folder: Path, layout: str, num_shards: int = 1) -> Path:
    """Saves ``model`` with its experts ``fused`` (v5 tensors), ``published`` (one tensor per expert,
    where the architecture publishes them so), ``mxfp4`` (gpt-oss's quantized checkpoints) or ``fp8``
    (published, every projection block-quantized, as DeepSeek-V3 and Qwen3 FP8 release them)."""
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if layout == "mxfp4":
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
        (folder / "config.json").write_text(json.dumps(config, indent=1))
        state = _mxfp4(state)
    for a, b in [("lm_head.weight", "model.embed_tokens.weight")]:
        if getattr(model.config, "tie_word_embeddings", False) and a in state and b in state:
            del state[a]
    if layout in ("published", "fp8"):
        state = _published(state, model.config.model_type)
    if layout == "fp8":
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                         "weight_block_size": [128, 128], "modules_to_not_convert": ["lm_head"]}
        (folder / "config.json").write_text(json.dumps(config, indent=1))
        state = _fp8(state)
    # Tensors that share storage (tied weights) are saved once.
    seen, unique = set(), {}
    for k, v in state.items():
        key = (v.data_ptr(), v.shape)
        if key not in seen:
            seen.add(key)
            unique[k] = v.clone()
    names = sorted(unique)
    if num_shards == 1:
        save_file(unique, folder / "model.safetensors", metadata={"format": "pt"})
        return folder
    weight_map = {}
    for i in range(num_shards):
        shard = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {k: unique[k] for k in names[i::num_shards]}
        save_file(part, folder / shard, metadata={"format": "pt"})
        weight_map.update({k: shard for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def expert_bytes(model: torch.nn.Module) -> tuple[int, int, int]:
    """(non-expert bytes, one expert's packed bytes, number of experts) of a built model."""
    experts = [m for n, m in model.named_modules() if n.endswith(".experts")]
    expert_param_bytes = sum(p.numel() * p.element_size() for m in experts for p in m.parameters())
    total = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    first = experts[0]
    num = getattr(first, "num_experts", None) or len(first)
    if hasattr(first, "gate_up_proj"):
        tensors = [first.gate_up_proj[0], first.down_proj[0]]
        tensors += [getattr(first, f"{n}_bias")[0] for n in ("gate_up_proj", "down_proj") if hasattr(first, f"{n}_bias")]
    else:
        tensors = [first["expert_0"].wi.weight, first["expert_0"].wo.weight]
    per = sum(-(-t.numel() * t.element_size() // 256) * 256 for t in tensors)
    return total - expert_param_bytes, per, num * len(experts)


def quarter_budget(model: torch.nn.Module, stored_format: str | None = None) -> int:
    """A gpu_memory that holds the non-expert weights and a quarter of the experts (headroom 0), the
    experts dense or in ``stored_format`` (as the pool packs them)."""
    non_expert, per, count = expert_bytes(model)
    if stored_format is not None:
        from expertflow.formats import expert_format
        from expertflow.models import architecture_for
        from expertflow.runtime import packed_bytes

        arch = architecture_for(model.config.model_type)
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        per = packed_bytes(arch.pool_tensors(model.config, dtype, expert_format(stored_format)))
    return non_expert + (count // 4) * per
