"""GPU time to expand one compressed expert into compute-dtype weights: the native kernel
(csrc/expand.cu) against torch's two-pass expansion, at published experts' sizes.

    python benchmarks/expand_kernels.py --out benchmarks/results/expand-kernels-h200.json

Each row is the median of 50 timed expansions of a whole expert (every weight) after 5 warm-ups,
timed with CUDA events on one stream; ``gbps`` counts the bytes each pass must move at least (stored
bytes read plus dense bytes written).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from expertflow import formats
from expertflow.bench.shapes import make_config
from expertflow.formats import expert_format
from expertflow.models import architecture_for

# (shape, format); "gpt_oss" is gpt-oss-120b's own layout (weights kept [in, out]: the transposed path)
CASES = [("mixtral-8x7b", "fp8"), ("mixtral-8x7b", "int8"), ("gpt-oss-120b", "mxfp4"), ("gpt_oss", "mxfp4"),
         ("gpt_oss", "fp8")]


def _config(shape: str):
    if shape == "gpt_oss":
        from transformers import GptOssConfig

        return GptOssConfig(hidden_size=2880, intermediate_size=2880, num_local_experts=128, num_experts_per_tok=4,
                            num_hidden_layers=1)
    return make_config(shape, 1, None, None)


def _median_gpu_ms(fn, reps: int = 50) -> float:
    times = []
    for i in range(reps + 5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        if i >= 5:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    args = p.parse_args()
    device = torch.device("cuda")
    rows = []
    for arch_name, name in CASES:
        config = _config(arch_name)
        arch = architecture_for(config.model_type)
        fmt = expert_format(name)
        specs = arch.weights(config)
        stored = {}
        for spec in specs:
            dense = torch.randn(spec.shape, device=device) * 0.02
            stored.update(fmt.quantize(spec, dense))
        stored_bytes = sum(t.numel() * t.element_size() for t in stored.values())
        dense_bytes = sum(s.out_features * s.in_features * 2 for s in specs)

        def expand(fmt=fmt, specs=specs, stored=stored) -> None:
            for spec in specs:
                fmt.expand(spec, stored, torch.bfloat16)

        kernel_ms = _median_gpu_ms(expand)
        original = formats.kernels_available
        formats.kernels_available = lambda device_index: False  # the torch path, on the same tensors
        try:
            torch_ms = _median_gpu_ms(expand)
        finally:
            formats.kernels_available = original
        row = {"arch": arch_name, "format": name, "stored_bytes": stored_bytes, "dense_bytes": dense_bytes,
               "kernel_ms": kernel_ms, "torch_ms": torch_ms, "speedup": torch_ms / kernel_ms,
               "kernel_gbps": (stored_bytes + dense_bytes) / kernel_ms / 1e6}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del stored
        torch.cuda.empty_cache()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
