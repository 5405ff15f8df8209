"""Byte sizes: reading them from users, writing them for users. No torch: the replay CLI uses it too."""

from __future__ import annotations

import re

__all__ = ["parse_bytes", "format_bytes"]

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(value: int | str) -> int:
    """``12GiB``, ``500MB``, ``1.5GB`` or a plain number of bytes."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"cannot read '{value}' as a size; write it like 12GiB, 500MB or 1048576")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def format_bytes(n: float | None, si: bool = False) -> str:
    """``1.50 GiB`` (binary units, for budgets), or with ``si`` ``1.6 GB`` (decimal, for traffic);
    ``-`` for None."""
    if n is None:
        return "-"
    base, units, digits = (1000, ("B", "KB", "MB", "GB", "TB"), 1) if si else (1024, ("B", "KiB", "MiB", "GiB", "TiB"), 2)
    for unit in units:
        if abs(n) < base or unit == units[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.{digits}f} {unit}"
        n /= base
    return str(n)
