"""Storage formats of an expert's weights: how they sit in the pinned pool, cross the link and fill a slot.

At batch 1 decoding is copy time, so the bytes per expert set the speed. An expert stays in its
storage format in the pool and in its slot; just before it computes, :meth:`ExpertFormat.expand`
turns the stored tensors into compute-dtype weights (on the slot's device: the GPU, or the CPU on the
host backend). Each weight is a matrix ``[out, in]`` (``F.linear``'s layout) or, for architectures
that keep the transpose (gpt-oss), ``[in, out]``; quantization always runs along ``in``.

| format | stored per weight | bytes per weight (bf16 = 2) |
|---|---|---|
| ``dense`` | the weight in the compute dtype | 2 (bf16), 4 (fp32) |
| ``fp8`` | ``float8_e4m3fn [out, in]`` + fp32 scales per 128 x 128 block (DeepSeek-V3's ``weight_scale_inv``) | ~1 |
| ``int8`` | ``int8 [out, in]`` + fp32 scale per output channel | ~1 |
| ``mxfp4`` | ``uint8 blocks [out, in / 32, 16]`` (two e2m1 a byte, low nibble first) + e8m0 ``scales [out, in / 32]`` | ~0.53 |

(MXFP4 is gpt-oss's ``_blocks`` / ``_scales`` layout.)

Biases stay dense. Definitions: e4m3 is torch's ``float8_e4m3fn``; an fp8 weight is ``q * s`` with
``s`` its block's scale; int8 ``q * s`` with ``s`` its row's scale; MXFP4 ``v * 2^(e - 127)`` with
``v`` the e2m1 value of the nibble (OCP Microscaling Formats v1.0).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

__all__ = ["WeightSpec", "ExpertFormat", "FORMATS", "expert_format", "FP4_VALUES", "FP8_BLOCK", "SlotExpander",
           "kernels_available"]

#: e2m1 values of the 16 nibbles: sign bit 3, exponent bits 2-1, mantissa bit 0
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
FP8_BLOCK = 128  # DeepSeek-V3 and Qwen3 FP8: weight_block_size [128, 128]
MX_BLOCK = 32
_FP8_MAX = 448.0


@dataclass(frozen=True)
class WeightSpec:
    """One weight of an expert: ``name``, ``[out, in]``, and whether it is stored transposed
    (``[in, out]``, gpt-oss's dense layout). ``bias``: a dense ``[out]`` bias beside it."""

    name: str
    out_features: int
    in_features: int
    transposed: bool = False
    bias: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        """The dense weight's shape as the architecture computes with it."""
        return (self.in_features, self.out_features) if self.transposed else (self.out_features, self.in_features)


@dataclass(frozen=True)
class ExpertFormat:
    name: str

    @property
    def dense(self) -> bool:
        return self.name == "dense"

    def stored(self, weight: WeightSpec, dtype: torch.dtype) -> list:
        """The pool tensors (``runtime.TensorSpec``) that hold ``weight`` (and its bias) in this format;
        ``dtype`` is the compute dtype (dense weights and biases)."""
        from .runtime import TensorSpec

        w, out, inp = weight.name, weight.out_features, weight.in_features
        if self.dense:
            specs = [TensorSpec(w, dtype, weight.shape)]
        elif self.name == "fp8":
            specs = [TensorSpec(w, torch.float8_e4m3fn, (out, inp)),
                     TensorSpec(f"{w}_scale", torch.float32, (-(-out // FP8_BLOCK), -(-inp // FP8_BLOCK)))]
        elif self.name == "int8":
            specs = [TensorSpec(w, torch.int8, (out, inp)), TensorSpec(f"{w}_scale", torch.float32, (out,))]
        else:  # mxfp4
            if inp % MX_BLOCK:
                raise ValueError(f"mxfp4 needs {weight.name}'s input size to be a multiple of {MX_BLOCK}, got {inp}")
            specs = [TensorSpec(f"{w}_blocks", torch.uint8, (out, inp // MX_BLOCK, MX_BLOCK // 2)),
                     TensorSpec(f"{w}_scales", torch.uint8, (out, inp // MX_BLOCK))]
        if weight.bias:
            specs.append(TensorSpec(f"{w}_bias", dtype, (out,)))
        return specs

    def expand(self, weight: WeightSpec, stored: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The dense weight (``weight.shape``, ``dtype``) from its stored tensors, on their device."""
        w = weight.name
        if self.dense:
            return stored[w]
        codes, scales = (stored[f"{w}_blocks"], stored[f"{w}_scales"]) if self.name == "mxfp4" else (stored[w], stored[f"{w}_scale"])
        if codes.is_cuda and kernels_available(codes.device.index or 0) and codes.is_contiguous() and scales.is_contiguous():
            return _expand_on_gpu(self.name, weight, codes, scales, dtype)
        if self.name == "fp8":
            q, scale = codes, scales
            out, inp = q.shape
            if out % FP8_BLOCK == 0 and inp % FP8_BLOCK == 0:  # whole blocks: broadcast, no expanded scales
                # e4m3 is exact in bf16 and fp32; the multiply runs in fp32 and its product is cast into
                # the output, as transformers' (q.float() * s).to(dtype), in place: on the GPU 7 bytes of
                # traffic an element in bf16, not 19.
                dense = q.to(dtype)
                blocks = dense.view(out // FP8_BLOCK, FP8_BLOCK, inp // FP8_BLOCK, FP8_BLOCK)
                torch.mul(blocks, scale[:, None, :, None], out=blocks)
            else:
                s = scale.repeat_interleave(FP8_BLOCK, 0)[:out].repeat_interleave(FP8_BLOCK, 1)[:, :inp]
                dense = (q.to(torch.float32) * s).to(dtype)
        elif self.name == "int8":  # int8 is exact in bf16; the product is computed in fp32, cast in place
            dense = codes.to(dtype)
            torch.mul(dense, scales[:, None], out=dense)
        else:
            dense = _mxfp4_expand(codes, scales, dtype)
        return dense.t().contiguous() if weight.transposed else dense

    def quantize(self, weight: WeightSpec, dense: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored tensors of a dense weight (``weight.shape``), without its bias."""
        w = weight.name
        if self.dense:
            return {w: dense}
        x = (dense.t() if weight.transposed else dense).to(torch.float32)
        if self.name == "fp8":
            out, inp = x.shape
            rows, cols = -(-out // FP8_BLOCK), -(-inp // FP8_BLOCK)
            padded = x.new_zeros(rows * FP8_BLOCK, cols * FP8_BLOCK)
            padded[:out, :inp] = x
            blocks = padded.view(rows, FP8_BLOCK, cols, FP8_BLOCK)
            scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / _FP8_MAX
            q = (blocks / scale[:, None, :, None]).clamp(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn)
            return {w: q.view(rows * FP8_BLOCK, cols * FP8_BLOCK)[:out, :inp].contiguous(), f"{w}_scale": scale}
        if self.name == "int8":
            scale = x.abs().amax(dim=1).clamp(min=1e-12) / 127.0
            q = torch.round(x / scale[:, None]).clamp(-127, 127).to(torch.int8)
            return {w: q, f"{w}_scale": scale}
        return _mxfp4_quantize(x, w)


FORMATS = {name: ExpertFormat(name) for name in ("dense", "fp8", "int8", "mxfp4")}


#: the compute dtypes, and their other names; ``dtype`` and ``expert_dtype`` take both
COMPUTE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}


def expert_format(name: str | None) -> ExpertFormat:
    """A format by name; None and the compute dtypes' names (``bf16``, ``half``, ...) are dense."""
    if name is None or name == "dense" or DTYPE_ALIASES.get(name, name) in COMPUTE_DTYPES:
        return FORMATS["dense"]
    if name not in FORMATS:
        raise ValueError(f"unknown expert dtype '{name}'; choose fp8, int8 or mxfp4 (or bf16 for the checkpoint's own)")
    return FORMATS[name]


_PAIRS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _fp4_pairs(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``[256, 2]``: the two e2m1 values of every byte (low nibble first), made once per device and
    dtype: building it per expansion would copy (and sync) each time, and one lookup per byte reads
    half the indices two per-nibble lookups would."""
    key = (device, dtype)
    if key not in _PAIRS:
        values = torch.tensor(FP4_VALUES, dtype=dtype)
        codes = torch.arange(256)
        _PAIRS[key] = torch.stack([values[codes & 0x0F], values[codes >> 4]], dim=1).to(device)
    return _PAIRS[key]


@functools.cache
def kernels_available(device_index: int) -> bool:
    """The native kernels run on this GPU: built (nvcc was found) for Ampere and Hopper, and later
    GPUs through PTX; older GPUs expand with torch."""
    from . import _C

    return bool(_C.expand_kernels_available()) and torch.cuda.get_device_capability(device_index) >= (8, 0)


@functools.cache
def _stored_codes_and_scales(name: str, weight: WeightSpec) -> tuple:
    """(codes dtype, shape, scales dtype, shape) as the format stores ``weight`` (:meth:`ExpertFormat.stored`)."""
    codes, scales = FORMATS[name].stored(weight, torch.float32)[:2]
    return codes.dtype, tuple(codes.shape), scales.dtype, tuple(scales.shape)


def _check_stored(name: str, weight: WeightSpec, codes: torch.Tensor, scales: torch.Tensor) -> None:
    """The kernel indexes raw memory: shapes and dtypes must be the format's, or it is an error."""
    want = _stored_codes_and_scales(name, weight)
    got = (codes.dtype, tuple(codes.shape), scales.dtype, tuple(scales.shape))
    if got != want:
        raise ValueError(f"{weight.name}: {name} codes and scales must be {want}, got {got}")


def _expand_on_gpu(name: str, weight: WeightSpec, codes: torch.Tensor, scales: torch.Tensor,
                   dtype: torch.dtype) -> torch.Tensor:
    """One pass of the native kernel (``csrc/expand.cu``) on the current stream: the same values as
    the torch path below, bit for bit, in about a third of the memory traffic."""
    from . import _C
    from .runtime import _dtype_name

    _check_stored(name, weight, codes, scales)
    rows = codes.shape[0]
    cols = codes.shape[1] * MX_BLOCK if name == "mxfp4" else codes.shape[1]
    out = torch.empty(weight.shape, dtype=dtype, device=codes.device)
    _C.expand_weight(name, _dtype_name(dtype), codes.data_ptr(), scales.data_ptr(), out.data_ptr(),
                     rows, cols, weight.transposed, codes.device.index,
                     torch.cuda.current_stream(codes.device).cuda_stream)
    return out


class SlotExpander:
    """Expands experts of one slot layout on the GPU with one native call each (``ExpertExpansion``).

    A decode step expands every expert it runs; per weight, the Python of :meth:`ExpertFormat.expand`
    (checks, an allocation, a launch) cost about as much host time as the kernel's GPU time, and at
    batch 1 the host is the bottleneck. Here the checks run once, the dense weights go to one
    persistent scratch buffer per weight, and a call passes the slot's address. The scratch is
    rewritten by the next expert: compute reads it on the same stream first, as every expert of a
    step computes on the one compute stream. The values are the kernel's, bit for bit
    :meth:`ExpertFormat.expand`'s.

    ``slot_tensors``: the views of the slot at ``slot_address`` (names, shapes and dtypes as the
    format stores ``weights``, contiguous, within ``slot_bytes``); every slot of the layout holds them
    at the same offsets. ``dtype``: the compute dtype. The GPU must run the kernels
    (``kernels_available``). For inference: the kernel rewrites the scratch without autograd knowing.
    """

    def __init__(self, fmt: ExpertFormat, weights: list[WeightSpec], slot_tensors: dict[str, torch.Tensor],
                 slot_address: int, slot_bytes: int, dtype: torch.dtype) -> None:
        from . import _C
        from .runtime import _dtype_name

        if fmt.dense:
            raise ValueError("dense experts need no expansion")
        device = next(iter(slot_tensors.values())).device
        self.dense: dict[str, torch.Tensor] = {}
        packed = []
        for w in weights:
            names = (f"{w.name}_blocks", f"{w.name}_scales") if fmt.name == "mxfp4" else (w.name, f"{w.name}_scale")
            codes, scales = slot_tensors[names[0]], slot_tensors[names[1]]
            _check_stored(fmt.name, w, codes, scales)
            for t in (codes, scales):  # the kernel reads raw memory at fixed offsets in every slot
                start = t.data_ptr() - slot_address
                if not t.is_contiguous() or start < 0 or start + t.nbytes > slot_bytes:
                    raise ValueError(f"{w.name}: the stored tensors must be contiguous and inside the slot's "
                                     f"{slot_bytes} bytes")
            out = torch.empty(w.shape, dtype=dtype, device=device)
            self.dense[w.name] = out
            cols = codes.shape[1] * MX_BLOCK if fmt.name == "mxfp4" else codes.shape[1]
            packed.append((codes.data_ptr() - slot_address, scales.data_ptr() - slot_address, out.data_ptr(),
                           codes.shape[0], cols, w.transposed))
        self.biases = [f"{w.name}_bias" for w in weights if w.bias]
        self._native = _C.ExpertExpansion(fmt.name, _dtype_name(dtype), packed, device.index or 0)

    def __call__(self, slot_address: int, stream: int, slot_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The dense weights of the expert in the slot at ``slot_address`` (and its dense biases, from
        ``slot_tensors``), expanded on ``stream``."""
        self._native.run(slot_address, stream)
        if not self.biases:
            return self.dense
        return {**self.dense, **{b: slot_tensors[b] for b in self.biases}}


def _mxfp4_expand(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``blocks [out, G, 16]`` uint8, ``scales [out, G]`` uint8 -> ``[out, G * 32]``: low nibble first."""
    out, groups, half = blocks.shape
    dense = _fp4_pairs(blocks.device, dtype)[blocks.to(torch.int32)].view(out, groups, 2 * half)
    # 2^(e - 127) exactly: ldexp, as the checkpoint's own reference does
    torch.ldexp(dense, (scales.to(torch.int32) - 127)[..., None], out=dense)
    return dense.view(out, groups * 2 * half)


def _mxfp4_quantize(x: torch.Tensor, name: str) -> dict[str, torch.Tensor]:
    """``x [out, in]`` fp32 -> blocks and scales: each 32-value block shares the exponent
    ``floor(log2(amax)) - 2`` (e2m1's largest exponent), values round to the nearest e2m1 value
    (a tie goes to the smaller magnitude, not to even: 0.75 -> 0.5; checkpoints made elsewhere
    decode the same whatever rounding made them)."""
    out, inp = x.shape
    if inp % MX_BLOCK:
        raise ValueError(f"mxfp4 needs {name}'s input size to be a multiple of {MX_BLOCK}, got {inp}")
    groups = x.view(out, inp // MX_BLOCK, MX_BLOCK)
    amax = groups.abs().amax(dim=-1)
    exponent = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp(min=2.0**-126))) - 2, torch.full_like(amax, -127))
    exponent = exponent.clamp(-127, 127)
    scaled = groups / torch.exp2(exponent)[..., None]
    values = torch.tensor(FP4_VALUES, dtype=torch.float32, device=x.device)
    nibbles = (scaled[..., None] - values).abs().argmin(dim=-1).to(torch.uint8)  # nearest; +0 before -0
    blocks = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)
    return {f"{name}_blocks": blocks.contiguous(), f"{name}_scales": (exponent + 127).to(torch.uint8)}
