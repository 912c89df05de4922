"""How nbtune writes a number of bytes, everywhere it shows one."""

from __future__ import annotations

GIB = 2**30


def format_bytes(n: float | None) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1: "12.55 GiB", "698 MiB", "–" for None."""
    if n is None:
        return "–"
    for unit, size in (("TiB", 2**40), ("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}" if size >= GIB else f"{n / size:.0f} {unit}"
    return f"{n:.0f} B"


def format_percent(part: float, whole: float) -> str:
    """A share with 3 significant digits, so a small one does not read as 0: "94.1%", "0.0131%", "0%"."""
    if not whole or not part:
        return "0%"
    return f"{100 * part / whole:.3g}%"
