"""What the benchmark scripts share: the trace-driven ones' common options (``cpu_experts_variants.py``,
``cpu_experts_profile.py``, ``prefetch_depth.py``), and the command line each script records in its
results (those and ``cpu_experts_gil.py``)."""

from __future__ import annotations

import argparse
from pathlib import Path


def parser(doc: str, *, slots: str, new_tokens: int, live: bool = False) -> argparse.ArgumentParser:
    """A parser described by ``doc``'s first paragraph, with the options every such script takes:
    ``--arch``, ``--layers``, ``--routing`` (``trace:FILE``, required unless ``live`` routing is
    allowed, the default then), ``--slots``, ``--new-tokens``, ``--cuda-graphs`` and ``--out``."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--arch", default="mixtral-8x7b")
    p.add_argument("--layers", type=int, default=8)
    if live:
        p.add_argument("--routing", default="live", help="live, or trace:FILE")
    else:
        p.add_argument("--routing", required=True, help="trace:FILE")
    p.add_argument("--slots", default=slots)
    p.add_argument("--new-tokens", type=int, default=new_tokens)
    p.add_argument("--cuda-graphs", action="store_true",
                   help="decode with the non-expert layers as CUDA graphs (expertflow.enable_cuda_graphs), every run")
    p.add_argument("--out", type=Path, required=True)
    return p


def command(script: str, args: argparse.Namespace) -> str:
    """The command line that ran ``script`` (a file name under benchmarks/) with ``args``."""
    return f"python benchmarks/{Path(script).name} " + " ".join(
        f"--{k.replace('_', '-')}" + ("" if isinstance(v, bool) else f" {v}")
        for k, v in vars(args).items() if v is not False)
