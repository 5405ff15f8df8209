"""Shared fixtures: backends (host always, CUDA under the `gpu` marker), small pools, shared data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import expertflow as ef
from expertflow import _C

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MIXTRAL_TRACE = SHARED_DATA / "traces" / "mixtral-8x7b-instruct.gsm8k.jsonl"
GPT_OSS_TRACE = SHARED_DATA / "traces" / "gpt-oss-120b.route.csv"


def cuda_usable() -> bool:
    return _C.cuda_unavailable_reason() == "" and torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if cuda_usable():
        return
    reason = f"no usable CUDA GPU: {_C.cuda_unavailable_reason() or 'torch sees no CUDA device'}"
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


BACKENDS = ["host", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(params=BACKENDS)
def backend_name(request) -> str:
    return request.param


def require_shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data {path} is absent (it lives beside the repository in ../shared/data)")
    return path


def make_filled_pool(
    backend_name: str, num_layers: int = 3, num_experts: int = 6, seed: int = 0, tensors: list | None = None
) -> ef.ExpertPool:
    """A pool of random experts with odd-sized tensors of two dtypes."""
    tensors = tensors or [ef.TensorSpec("w1", torch.float32, (33, 65)), ef.TensorSpec("w2", torch.bfloat16, (7,))]
    pool = ef.ExpertPool.uniform(num_layers, num_experts, tensors, backend=backend_name)
    g = torch.Generator().manual_seed(seed)
    for layer in range(num_layers):
        for expert in range(num_experts):
            pool.set_expert(layer, expert, {t.name: torch.randn(t.shape, generator=g).to(t.dtype) for t in tensors})
    return pool


def cli_exit_code(argv: list[str]) -> int:
    """``expertflow ARGV``'s exit status, whether main returns it or argparse exits with it."""
    from expertflow.cli import main

    try:
        return main(argv)
    except SystemExit as e:  # argparse refuses malformed values itself
        return int(e.code)
