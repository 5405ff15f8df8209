"""Byte sizes: reading them from users, writing them for users. No torch: the replay CLI uses it too."""

from __future__ import annotations

import math
import re
from typing import NamedTuple

__all__ = ["parse_bytes", "format_bytes", "SlotSpec", "parse_slots"]

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(value: int | str) -> int:
    """``12GiB``, ``500MB``, ``1.5GB`` or a plain number of bytes."""
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size cannot be negative, got {value}")
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"cannot read '{value}' as a size; write it like 12GiB, 500MB or 1048576")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def format_bytes(n: float | None, si: bool = False, round_up: bool = False) -> str:
    """``1.50 GiB`` (binary units, for budgets), or with ``si`` ``1.6 GB`` (decimal, for traffic);
    ``-`` for None. ``round_up`` never shows less than ``n`` (for a minimum a user may copy)."""
    if n is None:
        return "-"
    base, units, digits = (1000, ("B", "KB", "MB", "GB", "TB"), 1) if si else (1024, ("B", "KiB", "MiB", "GiB", "TiB"), 2)
    for unit in units:
        if abs(n) < base or unit == units[-1]:
            if unit == "B":
                return f"{math.ceil(n) if round_up else n:.0f} {unit}"
            if round_up:
                n = math.ceil(n * 10**digits) / 10**digits
            return f"{n:.{digits}f} {unit}"
        n /= base
    return str(n)


class SlotSpec(NamedTuple):
    """A slot count (``64``) or a share of all experts (``25%``), as a user wrote it."""

    amount: float
    share: bool
    text: str

    def count(self, total: int) -> int:
        """Slots out of ``total`` experts (a share rounds to the nearest slot, at least 1)."""
        return max(1, round(self.amount / 100 * total)) if self.share else int(self.amount)


def parse_slots(value: int | str, what: str = "expert_slots") -> SlotSpec:
    """``64`` or ``25%``; anything else (``x``, ``2.5``, ``inf%``, ``nan%``, ``0``, ``150%``) raises a
    ValueError naming ``what``."""
    text = str(value).strip()
    if text.endswith("%"):
        try:
            share = float(text[:-1])
        except ValueError:
            share = math.nan
        if not 0 < share <= 100:  # also false for NaN
            raise ValueError(f"{what} '{text}' is not a share of the experts; write a percentage above 0% and at most 100%, like 25%")
        return SlotSpec(share, True, text)
    if not re.fullmatch(r"[0-9]+", text) or int(text) < 1:
        raise ValueError(f"{what} '{text}' is neither a whole number of slots (at least 1) nor a share like 25%")
    return SlotSpec(int(text), False, text)
