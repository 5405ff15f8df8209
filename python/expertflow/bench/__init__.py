"""Benchmarks at real model sizes: trace-forced routing, forecasts of known quality, the bound."""

from .harness import BenchConfig, BenchModel, belady_bytes, build_model, format_table, gpu_only_row, plot, run_bench, save
from .shapes import SHAPES, make_config

__all__ = ["BenchConfig", "BenchModel", "build_model", "run_bench", "plot", "save", "format_table", "belady_bytes",
           "gpu_only_row", "SHAPES", "make_config"]
