"""Benchmarks at real model sizes: trace-forced routing, forecasts of known quality, the bound."""

from .harness import BenchConfig, belady_bytes, format_table, plot, run_bench, save
from .shapes import SHAPES, make_config

__all__ = ["BenchConfig", "run_bench", "plot", "save", "format_table", "belady_bytes", "SHAPES", "make_config"]
