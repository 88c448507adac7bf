"""Byte sizes, the one place they are parsed from flags and written for people.

Memory is shown in binary units (GiB, MiB: what `free -h`, Activity Monitor and llama.cpp's
logs show); file sizes in tables of published models in decimal GB (as Meta and llama.cpp
publish them).
"""

from __future__ import annotations

import re

KiB, MiB, GiB, TiB = 1024, 1024**2, 1024**3, 1024**4

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": KiB,
    "m": 1000**2, "mb": 1000**2, "mib": MiB,
    "g": 1000**3, "gb": 1000**3, "gib": GiB,
    "t": 1000**4, "tb": 1000**4, "tib": TiB,
}


def parse_size(text: str) -> int:
    """'24GiB' -> 25769803776, '8GB' -> 8000000000, '512MiB', '1.5G'. Raises ValueError."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (use e.g. 24GiB, 8GB, 512MiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB', 3.5 GiB -> '3.5 GiB': binary units, one decimal."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def gib(n: float) -> str:
    """Memory in a plan: '1.23 GiB' from 100 MiB up, else '87 MiB' (and '0 MiB')."""
    return f"{n / GiB:.2f} GiB" if n >= 100 * MiB else f"{n / MiB:.0f} MiB"


def gb(n: float) -> str:
    """A published model's size: '3.83 GB' (decimal)."""
    return f"{n / 1e9:.2f} GB"
