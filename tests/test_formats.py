"""Expert storage formats against their definitions (e4m3, per-block and per-channel scales, OCP MXFP4)
and against transformers' own MXFP4 decoder, over odd sizes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from expertflow.formats import FP4_VALUES, FP8_BLOCK, WeightSpec, expert_format


def e2m1(nibble: int) -> float:
    """The OCP e2m1 value of a 4-bit code, from its bits."""
    sign = -1.0 if nibble & 0b1000 else 1.0
    exponent, mantissa = (nibble >> 1) & 0b11, nibble & 1
    return sign * (mantissa * 0.5 if exponent == 0 else (1 + mantissa / 2) * 2.0 ** (exponent - 1))


def test_the_fp4_table_is_e2m1():
    assert [e2m1(n) for n in range(16)] == list(FP4_VALUES)


@pytest.mark.parametrize("out, groups", [(1, 1), (7, 3), (33, 2)])
def test_mxfp4_expands_as_its_definition_and_as_transformers(out, groups):
    g = torch.Generator().manual_seed(out * 10 + groups)
    blocks = torch.randint(0, 256, (out, groups, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(110, 140, (out, groups), dtype=torch.uint8, generator=g)
    spec = WeightSpec("w", out, groups * 32)
    dense = expert_format("mxfp4").expand(spec, {"w_blocks": blocks, "w_scales": scales}, torch.float32)
    assert dense.shape == (out, groups * 32)
    for r in range(out):
        for c in range(0, groups * 32, 5):
            byte = int(blocks[r, c // 32, (c % 32) // 2])
            nibble = byte & 0x0F if c % 2 == 0 else byte >> 4
            assert dense[r, c].item() == e2m1(nibble) * 2.0 ** (int(scales[r, c // 32]) - 127)
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    theirs = convert_moe_packed_tensors(blocks[None], scales[None], dtype=torch.bfloat16)[0]  # [in, out]
    ours = expert_format("mxfp4").expand(WeightSpec("w", out, groups * 32, transposed=True),
                                         {"w_blocks": blocks, "w_scales": scales}, torch.bfloat16)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("shape", [(1, 32), (7, 64), (33, 96)])
def test_mxfp4_round_trips_what_it_can_hold(shape):
    """Values that are e2m1 codes times a power of two per 32-block come back exactly."""
    g = torch.Generator().manual_seed(shape[0])
    codes = torch.tensor(FP4_VALUES)[torch.randint(0, 16, shape, generator=g)]
    codes[:, ::32] = 6.0  # each block's largest magnitude is 6: its exponent is exact
    powers = 2.0 ** torch.randint(-8, 8, (shape[0], shape[1] // 32), generator=g).float()
    x = codes * powers.repeat_interleave(32, 1)
    spec = WeightSpec("w", *shape)
    fmt = expert_format("mxfp4")
    assert torch.equal(fmt.expand(spec, fmt.quantize(spec, x), torch.float32), x)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_mxfp4_rounds_to_the_nearest_code(out, groups, seed):
    x = torch.randn(out, groups * 32, generator=torch.Generator().manual_seed(seed)) * 3
    spec = WeightSpec("w", out, groups * 32)
    fmt = expert_format("mxfp4")
    y = fmt.expand(spec, fmt.quantize(spec, x), torch.float32)
    for r in range(out):
        for b in range(groups):
            block = x[r, b * 32 : (b + 1) * 32]
            step = 2.0 ** (math.floor(math.log2(block.abs().max().item())) - 2)  # the block's scale
            grid = torch.tensor(FP4_VALUES) * step
            nearest = grid[(block[:, None] - grid).abs().argmin(dim=1)]
            assert torch.allclose(y[r, b * 32 : (b + 1) * 32].abs(), nearest.abs())


@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (130, 257), (256, 128)])
def test_fp8_block_scales_follow_the_definition(shape):
    g = torch.Generator().manual_seed(shape[1])
    x = torch.randn(shape, generator=g) * torch.logspace(-2, 2, shape[1])  # very different blocks
    spec = WeightSpec("w", *shape)
    fmt = expert_format("fp8")
    stored = fmt.quantize(spec, x)
    assert stored["w"].dtype == torch.float8_e4m3fn and stored["w"].shape == shape
    rows, cols = -(-shape[0] // FP8_BLOCK), -(-shape[1] // FP8_BLOCK)
    assert stored["w_scale"].shape == (rows, cols)
    for i in range(rows):
        for j in range(cols):
            block = x[i * FP8_BLOCK : (i + 1) * FP8_BLOCK, j * FP8_BLOCK : (j + 1) * FP8_BLOCK]
            assert stored["w_scale"][i, j].item() == pytest.approx(block.abs().max().item() / 448, rel=1e-6)
    y = fmt.expand(spec, stored, torch.float32)
    scale = stored["w_scale"].repeat_interleave(FP8_BLOCK, 0)[: shape[0]].repeat_interleave(FP8_BLOCK, 1)[:, : shape[1]]
    # e4m3 keeps 3 mantissa bits: within 2^-4 relative for normals, half the smallest subnormal (2^-10 scaled) below
    assert ((y - x).abs() <= torch.maximum(x.abs() / 16, scale * 2.0**-10)).all()
    assert torch.equal(y, stored["w"].float() * scale)  # the definition: q * s


@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (64, 5)])
def test_int8_per_channel(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    spec = WeightSpec("w", *shape, transposed=True)  # gpt-oss's layout: [in, out] = shape
    fmt = expert_format("int8")
    stored = fmt.quantize(spec, x)
    rows = x.t()
    assert torch.allclose(stored["w_scale"], rows.abs().amax(dim=1) / 127)
    y = fmt.expand(spec, stored, torch.float32)
    assert y.shape == x.shape
    assert ((y - x).abs() <= stored["w_scale"][None, :] / 2 + 1e-7).all()
    want = (stored["w"].float() * stored["w_scale"][:, None]).t()  # q * s in fp32, [in, out] as stored
    assert torch.equal(fmt.expand(spec, stored, torch.bfloat16), want.to(torch.bfloat16))


def test_stored_sizes():
    """A Mixtral expert's gate_up: fp8 and int8 hold half the bf16 bytes, mxfp4 about a quarter."""
    spec = WeightSpec("gate_up", 2 * 14336, 4096, bias=False)
    size = {name: sum(t.nbytes for t in expert_format(name).stored(spec, torch.bfloat16))
            for name in ("dense", "fp8", "int8", "mxfp4")}
    assert size["fp8"] / size["dense"] == pytest.approx(0.5, abs=0.001)
    assert size["int8"] / size["dense"] == pytest.approx(0.5, abs=0.001)
    assert size["mxfp4"] / size["dense"] == pytest.approx(4.25 / 16, abs=0.001)
    with pytest.raises(ValueError, match="unknown expert dtype 'fp4'"):
        expert_format("fp4")
    for name in ("dense", "bf16", "bfloat16", "half", "fp16", "float", "float32"):  # what dtype= also takes
        assert expert_format(name).dense, name
    with pytest.raises(ValueError, match="multiple of 32"):
        expert_format("mxfp4").stored(WeightSpec("w", 4, 33), torch.bfloat16)
    assert np.isclose(sum(t.nbytes for t in expert_format("dense").stored(WeightSpec("w", 4, 8, bias=True), torch.float32)), 4 * 8 * 4 + 4 * 4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_expands_as_an_fp32_product_cast_to_the_output(dtype):
    """Into bf16 (or fp32) the expansion is q * s computed in fp32, then cast: (q.float() * s).to(dtype),
    as transformers dequantizes fp8 checkpoints, whole blocks or not."""
    for shape in ((256, 384), (130, 257)):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(shape[1])) * 5
        spec = WeightSpec("w", *shape)
        fmt = expert_format("fp8")
        stored = fmt.quantize(spec, x)
        scale = stored["w_scale"].repeat_interleave(FP8_BLOCK, 0)[: shape[0]].repeat_interleave(FP8_BLOCK, 1)[:, : shape[1]]
        assert torch.equal(fmt.expand(spec, stored, dtype), (stored["w"].float() * scale).to(dtype))


def _dense_from_definition(name: str, stored: dict[str, torch.Tensor], spec: WeightSpec, dtype: torch.dtype) -> torch.Tensor:
    """code value * scale, the product in fp32, one rounding into ``dtype``; transposed where the spec is."""
    if name == "fp8":
        q, s = stored["w"].float(), stored["w_scale"]
        s = s.repeat_interleave(FP8_BLOCK, 0)[: q.shape[0]].repeat_interleave(FP8_BLOCK, 1)[:, : q.shape[1]]
    elif name == "int8":
        q, s = stored["w"].float(), stored["w_scale"][:, None]
    else:
        blocks, scales = stored["w_blocks"], stored["w_scales"]
        table = torch.tensor([e2m1(n) for n in range(16)])
        nibbles = torch.stack([blocks & 15, blocks >> 4], dim=-1).long()  # low nibble first
        q = table[nibbles].reshape(blocks.shape[0], -1)
        s = torch.tensor(2.0) ** (scales.float() - 127).repeat_interleave(32, 1)
    dense = (q * s).to(dtype)
    return dense.t().contiguous() if spec.transposed else dense


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("name", ["fp8", "int8", "mxfp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("transposed", [False, True])
def test_expansion_follows_the_definition_bit_for_bit(device, name, dtype, transposed):
    """On the CPU torch expands; on the GPU the native kernel (csrc/expand.cu) does, both paths of it."""
    from expertflow import _C

    if device == "cuda" and not _C.expand_kernels_available():
        pytest.skip("this build has no expansion kernels")
    shapes = [(1, 32), (7, 64), (33, 96), (130, 256), (256, 384)]
    if name != "mxfp4":
        shapes += [(1, 1), (7, 33), (129, 257)]  # odd widths take the tiled path
    fmt = expert_format(name)
    for out, inp in shapes:
        spec = WeightSpec("w", out, inp, transposed=transposed)
        x = torch.randn(out, inp, generator=torch.Generator().manual_seed(out * inp)) * 3
        stored = fmt.quantize(spec, x.t() if transposed else x)
        want = _dense_from_definition(name, stored, spec, dtype)
        got = fmt.expand(spec, {k: v.to(device) for k, v in stored.items()}, dtype)
        assert got.shape == spec.shape and got.dtype == dtype
        assert torch.equal(got.cpu(), want), (name, dtype, transposed, out, inp)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["fp8", "int8", "mxfp4"])
def test_the_gpu_kernel_at_large_and_misaligned_weights(name):
    """A weight past the grid's 8192 x 256 threads x 8 values (the grid-stride loop), and codes one
    byte off their alignment (the tiled path, straight)."""
    from expertflow import _C

    if not _C.expand_kernels_available():
        pytest.skip("this build has no expansion kernels")
    fmt = expert_format(name)
    spec = WeightSpec("w", 4224, 4096)  # 17.3 M values
    stored = fmt.quantize(spec, torch.randn(4224, 4096, generator=torch.Generator().manual_seed(1)))
    want = _dense_from_definition(name, stored, spec, torch.bfloat16)
    on_gpu = {k: v.cuda() for k, v in stored.items()}
    assert torch.equal(fmt.expand(spec, on_gpu, torch.bfloat16).cpu(), want)
    codes_name = "w_blocks" if name == "mxfp4" else "w"
    codes = on_gpu[codes_name]
    buffer = torch.empty(codes.numel() * codes.element_size() + 1, dtype=torch.uint8, device="cuda")
    shifted = buffer[1:].view(codes.dtype).view(codes.shape)
    shifted.copy_(codes)
    assert shifted.data_ptr() % 8 == 1
    assert torch.equal(fmt.expand(spec, {**on_gpu, codes_name: shifted}, torch.bfloat16).cpu(), want)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["fp8", "int8", "mxfp4"])
@pytest.mark.parametrize("transposed", [False, True])
def test_slot_expander_expands_whichever_slot_it_is_given(name, transposed):
    """Experts packed in slots as the pool packs them (256-byte aligned tensors, a dense bias): one
    expander made on slot 0 expands each slot, in any order, as the definition says."""
    from expertflow import _C
    from expertflow.formats import SlotExpander

    if not _C.expand_kernels_available():
        pytest.skip("this build has no expansion kernels")
    fmt = expert_format(name)
    weights = [WeightSpec("gate_up", 2 * 96, 64, transposed=transposed), WeightSpec("down", 64, 96, transposed=transposed, bias=True)]
    specs = [s for w in weights for s in fmt.stored(w, torch.bfloat16)]
    offsets, end = [], 0
    for s in specs:
        offsets.append(end)
        end = -(-(end + s.nbytes) // 256) * 256
    num_slots, slot_bytes = 3, end
    arena = torch.zeros(num_slots * slot_bytes, dtype=torch.uint8, device="cuda")

    def views(slot):
        base = slot * slot_bytes
        return {s.name: arena[base + o : base + o + s.nbytes].view(s.dtype).view(s.shape) for s, o in zip(specs, offsets)}

    stored = []
    for slot in range(num_slots):
        g = torch.Generator().manual_seed(slot)
        tensors = {}
        for w in weights:
            x = torch.randn(w.out_features, w.in_features, generator=g) * 3
            tensors.update(fmt.quantize(w, x.t() if transposed else x))
            if w.bias:
                tensors[f"{w.name}_bias"] = torch.randn(w.out_features, generator=g).to(torch.bfloat16)
        for k, v in views(slot).items():
            v.copy_(tensors[k])
        stored.append(tensors)
    expander = SlotExpander(fmt, weights, views(0), arena.data_ptr(), slot_bytes, torch.bfloat16)
    with pytest.raises(ValueError, match="inside the slot"):
        SlotExpander(fmt, weights, views(1), arena.data_ptr(), slot_bytes, torch.bfloat16)  # slot 1, said to be slot 0
    stream = torch.cuda.current_stream().cuda_stream
    for slot in (2, 0, 1, 2):
        got = expander(arena.data_ptr() + slot * slot_bytes, stream, views(slot))
        for w in weights:
            as_w = {"w" + k[len(w.name):]: v for k, v in stored[slot].items() if k.startswith(w.name)}
            assert torch.equal(got[w.name].cpu(), _dense_from_definition(name, as_w, w, torch.bfloat16)), (slot, w)
        assert torch.equal(got["down_bias"].cpu(), stored[slot]["down_bias"])


@pytest.mark.parametrize("name", ["fp8", "int8", "mxfp4"])
def test_stored_tensors_of_the_wrong_shape_or_dtype_are_refused_before_the_kernel(name):
    from expertflow.formats import _check_stored

    fmt = expert_format(name)
    spec = WeightSpec("w", 64, 128)
    stored = fmt.quantize(spec, torch.randn(64, 128))
    codes_name, scales_name = ("w_blocks", "w_scales") if name == "mxfp4" else ("w", "w_scale")
    _check_stored(name, spec, stored[codes_name], stored[scales_name])  # the format's own: fine
    with pytest.raises(ValueError, match="codes and scales must be"):
        _check_stored(name, WeightSpec("w", 32, 128), stored[codes_name], stored[scales_name])
    with pytest.raises(ValueError, match="codes and scales must be"):
        _check_stored(name, spec, stored[codes_name].view(torch.uint8) if name != "mxfp4" else stored[codes_name].to(torch.int8),
                      stored[scales_name])
    with pytest.raises(ValueError, match="codes and scales must be"):
        _check_stored(name, spec, stored[codes_name], stored[scales_name].reshape(-1)[:0])
