"""ExpertPool: packing, filling from tensors / arrays / raw byte ranges, zero-copy views, errors."""

import mmap

import numpy as np
import pytest
import torch

import expertflow as ef
from expertflow import _C

ALIGN = _C.TENSOR_ALIGNMENT


@pytest.mark.parametrize("dims", [(1,), (7,), (33,), (7, 33), (1, 1, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8])
def test_packing_is_aligned_and_contiguous(dims, dtype):
    specs = [ef.TensorSpec("a", dtype, dims), ef.TensorSpec("b", torch.float32, (3,)), ef.TensorSpec("c", dtype, dims)]
    pool = ef.ExpertPool.uniform(2, 3, specs, backend="host")
    layout = pool.layout(0)
    end = 0
    for packed, spec in zip(layout, specs):
        assert packed.offset % ALIGN == 0
        assert packed.offset >= end  # no overlap
        assert packed.nbytes == spec.nbytes
        end = packed.offset + packed.nbytes
    assert pool.expert_bytes(0) % ALIGN == 0
    assert pool.expert_bytes(0) >= end
    assert pool.total_bytes == 2 * 3 * pool.expert_bytes(0)
    offsets = sorted(pool.native.expert_offset(l, e) for l in range(2) for e in range(3))
    assert offsets == [i * pool.expert_bytes(0) for i in range(6)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_views_roundtrip_and_are_zero_copy(backend_name, dtype):
    pool = ef.ExpertPool.uniform(2, 5, [ef.TensorSpec("w", dtype, (7, 33)), ef.TensorSpec("b", dtype, (1,))], backend_name)
    ref = {(l, e): {"w": torch.randn(7, 33).to(dtype), "b": torch.randn(1).to(dtype)} for l in range(2) for e in range(5)}
    for (l, e), tensors in ref.items():
        pool.set_expert(l, e, tensors)
    for (l, e), tensors in ref.items():
        view = pool.expert(l, e)
        for name, t in tensors.items():
            assert view[name].dtype == dtype and view[name].shape == t.shape
            assert torch.equal(view[name], t)
    # A write through the view is visible to the next view: it is the pool's memory.
    pool.expert(1, 4)["w"][0, 0] = 42
    assert pool.expert(1, 4)["w"][0, 0].item() == 42
    assert pool.expert(0, 0)["w"][0, 0].item() == ref[(0, 0)]["w"][0, 0].item()


def test_write_from_numpy_and_raw_mmap_bytes(tmp_path):
    pool = ef.ExpertPool.uniform(1, 2, [ef.TensorSpec("w", torch.float32, (33,)), ef.TensorSpec("v", torch.float16, (7,))], "host")
    w = np.arange(33, dtype=np.float32)
    v = np.linspace(0, 1, 7).astype(np.float16)
    pool.write_tensor(0, 0, "w", w)
    # Raw byte range straight from a memory-mapped file, as a safetensors loader would stream it.
    blob = tmp_path / "expert.bin"
    blob.write_bytes(b"junk" + v.tobytes() + b"tail")
    with blob.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        pool.write_tensor(0, 0, "v", memoryview(mm)[4 : 4 + v.nbytes])
        # Partial writes at an offset fill a tensor piecewise.
        pool.write_tensor(0, 1, "v", memoryview(mm)[4 : 4 + 6], offset=0)
        pool.write_tensor(0, 1, "v", memoryview(mm)[10 : 4 + v.nbytes], offset=6)
    assert np.array_equal(pool.expert(0, 0)["w"].numpy(), w)
    assert np.array_equal(pool.expert(0, 0)["v"].numpy(), v)
    assert np.array_equal(pool.expert(0, 1)["v"].numpy(), v)


def test_fill_errors_name_the_tensor():
    pool = ef.ExpertPool.uniform(2, 3, [ef.TensorSpec("w1", torch.bfloat16, (4, 5))], "host")
    with pytest.raises(ef.ExpertFlowError, match="tensor 'w1' of layer 1 expert 2 is torch.bfloat16 in the pool but the source is torch.float32"):
        pool.write_tensor(1, 2, "w1", torch.zeros(4, 5))
    with pytest.raises(ef.ExpertFlowError, match=r"has shape \(4, 5\) in the pool but the source has \(5, 4\)"):
        pool.write_tensor(1, 2, "w1", torch.zeros(5, 4, dtype=torch.bfloat16))
    with pytest.raises(ef.ExpertFlowError, match="overruns tensor 'w1'"):
        pool.write_tensor(0, 0, "w1", bytes(41))
    with pytest.raises(ef.ExpertFlowError, match="no tensor 'w3'; they have: w1"):
        pool.write_tensor(0, 0, "w3", bytes(4))
    with pytest.raises(ef.ExpertFlowError, match=r"missing tensors \['w1'\], unknown tensors \['w2'\]"):
        pool.set_expert(0, 0, {"w2": torch.zeros(1)})
    with pytest.raises(ef.ExpertFlowError, match=r"csrc/pool.cpp:\d+: unknown expert 3 of layer 0: that layer has experts 0..2"):
        pool.expert(0, 3)
    with pytest.raises(ef.ExpertFlowError, match="unknown layer 2"):
        pool.expert(2, 0)


def test_layout_errors():
    with pytest.raises(ef.ExpertFlowError, match="'w' is listed twice"):
        ef.ExpertPool.uniform(1, 1, [ef.TensorSpec("w", torch.float32, (2,))] * 2, "host")
    with pytest.raises(ef.ExpertFlowError, match="non-positive dimension 0"):
        ef.ExpertPool.uniform(1, 1, [ef.TensorSpec("w", torch.float32, (2, 0))], "host")
    with pytest.raises(ef.ExpertFlowError, match="layer 0 has 0 experts"):
        ef.ExpertPool.uniform(1, 0, [ef.TensorSpec("w", torch.float32, (2,))], "host")


def test_pool_beyond_host_memory_names_the_size():
    """Linux would grant it and kill the process as the pool fills: it is refused before allocating."""
    huge = (1 << 30, 1 << 20)  # 4 PiB of float32
    with pytest.raises(ef.ExpertFlowError, match=r"the expert pool needs 4194304\.00 GiB of host memory but .* is available"):
        ef.ExpertPool.uniform(1, 1, [ef.TensorSpec("w", torch.float32, huge)], "host")


def test_closed_pool_refuses_use():
    pool = ef.ExpertPool.uniform(1, 1, [ef.TensorSpec("w", torch.float32, (7,))], "host")
    original = torch.arange(7, dtype=torch.float32) * 0.5 - 1.25
    pool.set_expert(0, 0, {"w": original})
    view = pool.expert(0, 0)["w"]
    alias = pool.expert(0, 0)["w"]  # a second view of the same pool bytes
    with pool:
        pass
    with pytest.raises(ef.ExpertFlowError, match="expert pool is closed"):
        pool.expert(0, 0)
    # Views handed out keep the memory alive: they still hold what was written, and they are still one
    # memory (a write through one shows through the other).
    assert torch.equal(view, original)
    view += 1
    assert torch.equal(view, original + 1)
    assert torch.equal(alias, original + 1)


def test_backend_selection(monkeypatch):
    assert ef.get_backend("host").name == "host"
    monkeypatch.setenv("EXPERTFLOW_BACKEND", "host")
    assert ef.get_backend().name == "host"
    with pytest.raises(ef.ExpertFlowError, match="unknown backend 'tpu'"):
        ef.get_backend("tpu")
    reason = _C.cuda_unavailable_reason()
    if reason:
        with pytest.raises(ef.ExpertFlowError, match="CUDA backend was asked for but cannot be used"):
            ef.get_backend("cuda")
        assert ef.get_backend("auto").name == "host"
    else:
        assert ef.get_backend("auto").name == "cuda"
