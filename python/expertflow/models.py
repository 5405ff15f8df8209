"""Model adapters: where each architecture keeps its routed experts, and how an expert computes.

An adapter knows tensor names and module paths, nothing of policies. Everything but the routed
experts stays transformers' own code: the router (``gate`` / ``router``) runs unchanged, and the
experts module is swapped for :class:`expertflow.offload.OffloadedExperts` while the model is built.

Per expert, the pool holds:

- gated (SwiGLU) families — Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3:
  ``gate_up`` ``[2 * ffn, hidden]`` (gate rows, then up rows) and ``down`` ``[hidden, ffn]``;
- gpt-oss: ``gate_up`` ``[hidden, 2 * ffn]`` (gate and up columns interleaved) and ``down``
  ``[ffn, hidden]``, transposed as its model keeps them, each with a bias; its clamped SwiGLU;
- Switch Transformers: ``wi`` ``[ffn, hidden]`` and ``wo`` ``[hidden, ffn]``.

Those are the dense weights (:class:`~expertflow.formats.WeightSpec`); the pool holds them in a
storage format (``formats.py``): dense, or fp8 / int8 / mxfp4 data with scales, biases dense.

Checkpoint layouts accepted for each experts module at model path ``P``:

- fused (transformers v5): ``P.gate_up_proj`` ``[E, 2F, H]`` and ``P.down_proj`` ``[E, H, F]``;
- per expert, as published: ``P'.{e}.gate_proj.weight`` / ``up_proj`` / ``down_proj`` (Mixtral:
  ``w1`` / ``w3`` / ``w2`` under ``block_sparse_moe``); Switch: ``P.expert_{e}.wi.weight`` / ``wo``;
- gpt-oss: ``P.gate_up_proj`` / ``P.down_proj`` (``[E, ...]``, dense) or their MXFP4
  ``_blocks`` / ``_scales``, and ``P.gate_up_proj_bias`` / ``P.down_proj_bias``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from .formats import FORMATS, FP8_BLOCK, ExpertFormat, WeightSpec

__all__ = ["Architecture", "ARCHITECTURES", "architecture_for", "ExpertSource", "model_dtype"]


def _gpt_oss_name(pool_tensor: str) -> str:
    """A pool tensor's checkpoint name in a gpt-oss experts module: gate_up -> gate_up_proj,
    gate_up_blocks -> gate_up_proj_blocks, down_bias -> down_proj_bias."""
    for weight in ("gate_up", "down"):
        if pool_tensor == weight:
            return f"{weight}_proj"
        if pool_tensor.startswith(weight + "_"):
            return f"{weight}_proj{pool_tensor[len(weight):]}"
    raise ValueError(f"no gpt-oss checkpoint tensor for pool tensor '{pool_tensor}'")


@dataclass(frozen=True)
class ExpertSource:
    """Where one pool tensor of one expert comes from: a checkpoint tensor, possibly a slice of it.

    ``expert_index`` selects ``[e]`` of a fused ``[E, ...]`` tensor; ``row_offset`` places the source
    at that row of the pool tensor (the up half of ``gate_up``).
    """

    pool_tensor: str
    checkpoint_name: str
    expert_index: int | None = None
    row_offset: int = 0


@dataclass(frozen=True)
class Architecture:
    model_types: tuple[str, ...]
    modeling_module: str
    experts_class: str
    router_attr: str = "gate"
    published_block: str | None = None  # Mixtral publishes ".mlp." as ".block_sparse_moe."
    published_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    encoder_decoder: bool = False
    style: str = "swiglu"  # how an expert computes: swiglu, switch (wi/wo) or gpt_oss (clamped, biased)

    @property
    def gated(self) -> bool:
        """A gated (SwiGLU) expert: every style but Switch's plain wi/wo."""
        return self.style != "switch"

    @property
    def auto_class(self):
        import transformers

        return transformers.AutoModelForSeq2SeqLM if self.encoder_decoder else transformers.AutoModelForCausalLM

    def modeling(self):
        """The transformers module that defines this architecture's experts class."""
        return importlib.import_module(self.modeling_module)

    def dims(self, config) -> tuple[int, int, int, int]:
        """(num_experts, experts_per_token, hidden, ffn) of a config."""
        if self.encoder_decoder:
            return config.num_experts, 1, config.d_model, config.d_ff
        num_experts = next(
            getattr(config, name) for name in ("num_local_experts", "num_experts", "n_routed_experts") if getattr(config, name, None)
        )
        ffn = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
        return num_experts, config.num_experts_per_tok, config.hidden_size, ffn

    def activation(self, config) -> str:
        return config.dense_act_fn if self.encoder_decoder else config.hidden_act

    def weights(self, config) -> list[WeightSpec]:
        """The dense weights of one expert, as this architecture computes with them."""
        _, _, hidden, ffn = self.dims(config)
        if self.style == "gpt_oss":
            return [WeightSpec("gate_up", 2 * ffn, hidden, transposed=True, bias=True),
                    WeightSpec("down", hidden, ffn, transposed=True, bias=True)]
        if self.gated:
            return [WeightSpec("gate_up", 2 * ffn, hidden), WeightSpec("down", hidden, ffn)]
        return [WeightSpec("wi", ffn, hidden), WeightSpec("wo", hidden, ffn)]

    def pool_tensors(self, config, dtype: torch.dtype, expert_format: ExpertFormat | None = None) -> list:
        """The pool tensors (``runtime.TensorSpec``) of one expert in ``expert_format`` (default dense)."""
        fmt = expert_format or FORMATS["dense"]
        return [spec for weight in self.weights(config) for spec in fmt.stored(weight, dtype)]

    def checkpoint_format(self, config) -> ExpertFormat:
        """The format the checkpoint stores its experts in (gpt-oss: MXFP4 where its config says so)."""
        method = (getattr(config, "quantization_config", None) or {})
        method = method.get("quant_method") if isinstance(method, dict) else getattr(method, "quant_method", None)
        if method is None:
            return FORMATS["dense"]
        if method == "mxfp4" and self.style == "gpt_oss":
            return FORMATS["mxfp4"]
        if method == "fp8" and self.style == "swiglu":  # DeepSeek-V3, Qwen3 FP8: e4m3 with 128 x 128 block scales
            quant = config.quantization_config
            block = quant.get("weight_block_size") if isinstance(quant, dict) else getattr(quant, "weight_block_size", None)
            ffn = self.dims(config)[3]
            if list(block or []) != [FP8_BLOCK, FP8_BLOCK] or ffn % FP8_BLOCK:
                raise ValueError(f"this fp8 checkpoint has blocks {block} and an expert FFN of {ffn}; ExpertFlow reads "
                                 f"{FP8_BLOCK} x {FP8_BLOCK} blocks with an FFN that is a multiple of {FP8_BLOCK}")
            return FORMATS["fp8"]
        raise ValueError(f"this {config.model_type} checkpoint is quantized with '{method}'; ExpertFlow reads gpt-oss "
                         "MXFP4, fp8 block-quantized and unquantized checkpoints (quantize at load with expert_dtype='fp8' or 'int8')")

    def sources(self, path: str, expert: int, config, available) -> list[ExpertSource] | None:
        """The checkpoint tensors of one expert of the experts module at ``path``, or None if absent.

        ``available``: a container of the checkpoint's tensor names.
        """
        _, _, _, ffn = self.dims(config)
        if self.style == "gpt_oss":
            names = ("gate_up_blocks", "gate_up_scales", "down_blocks", "down_scales") \
                if f"{path}.gate_up_proj_blocks" in available else ("gate_up", "down")
            out = [ExpertSource(n, f"{path}.{_gpt_oss_name(n)}", expert) for n in names + ("gate_up_bias", "down_bias")]
            return out if all(s.checkpoint_name in available for s in out) else None
        if not self.gated:
            base = f"{path}.expert_{expert}"
            out = [ExpertSource("wi", f"{base}.wi.weight"), ExpertSource("wo", f"{base}.wo.weight")]
            return out if all(s.checkpoint_name in available for s in out) else None
        fused = [
            ExpertSource("gate_up", f"{path}.gate_up_proj", expert),
            ExpertSource("down", f"{path}.down_proj", expert),
        ]
        if all(s.checkpoint_name in available for s in fused):
            return fused
        published = path.replace(".mlp.", self.published_block) if self.published_block else path
        for base in dict.fromkeys((f"{published}.{expert}", f"{path}.{expert}")):
            gate, up, down = (f"{base}.{n}.weight" for n in self.published_names)
            out = [ExpertSource("gate_up", gate), ExpertSource("gate_up", up, row_offset=ffn), ExpertSource("down", down)]
            if f"{gate}_scale_inv" in available:  # fp8: each weight's block scales (whole blocks: ffn % 128 == 0)
                out += [ExpertSource("gate_up_scale", f"{gate}_scale_inv"),
                        ExpertSource("gate_up_scale", f"{up}_scale_inv", row_offset=ffn // FP8_BLOCK),
                        ExpertSource("down_scale", f"{down}_scale_inv")]
            if all(s.checkpoint_name in available for s in out):
                return out
        return None

    def describe_sources(self, path: str) -> str:
        if self.style == "gpt_oss":
            return f"{path}.gate_up_proj / .down_proj (or their _blocks and _scales, MXFP4) with .gate_up_proj_bias / .down_proj_bias"
        if not self.gated:
            return f"{path}.expert_<e>.wi.weight / .wo.weight"
        published = path.replace(".mlp.", self.published_block) if self.published_block else path
        gate, up, down = self.published_names
        return f"{path}.gate_up_proj + {path}.down_proj (fused), or {published}.<e>.{gate}/{up}/{down}.weight (per expert)"

    def router_top_k(self, router: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        """Experts the router picks for ``hidden_states [num_tokens, hidden]``: ``[num_tokens, k]``."""
        if self.encoder_decoder:
            _, _, logits = router(hidden_states.unsqueeze(0))
            return logits.reshape(-1, logits.shape[-1]).argmax(dim=-1, keepdim=True)
        _, _, indices = router(hidden_states)
        return indices


_TM = "transformers.models."

ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(("mixtral",), _TM + "mixtral.modeling_mixtral", "MixtralExperts",
                 published_block=".block_sparse_moe.", published_names=("w1", "w3", "w2")),
    Architecture(("qwen2_moe",), _TM + "qwen2_moe.modeling_qwen2_moe", "Qwen2MoeExperts"),
    Architecture(("qwen3_moe",), _TM + "qwen3_moe.modeling_qwen3_moe", "Qwen3MoeExperts"),
    Architecture(("olmoe",), _TM + "olmoe.modeling_olmoe", "OlmoeExperts"),
    Architecture(("deepseek_v2",), _TM + "deepseek_v2.modeling_deepseek_v2", "DeepseekV2Experts"),
    Architecture(("deepseek_v3",), _TM + "deepseek_v3.modeling_deepseek_v3", "DeepseekV3Experts"),
    Architecture(("gpt_oss",), _TM + "gpt_oss.modeling_gpt_oss", "GptOssExperts", router_attr="router", style="gpt_oss"),
    Architecture(("switch_transformers",), _TM + "switch_transformers.modeling_switch_transformers",
                 "SwitchTransformersExperts", router_attr="router", encoder_decoder=True, style="switch"),
)


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The compute dtype of a model: that of its first floating-point parameter."""
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def architecture_for(model_type: str) -> Architecture:
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    supported = ", ".join(t for a in ARCHITECTURES for t in a.model_types)
    raise ValueError(f"unknown MoE architecture '{model_type}'; ExpertFlow supports: {supported}")
