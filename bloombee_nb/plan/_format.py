"""Human units for the planner's reprs and messages: bytes, seconds, rates, and a tiny HTML table."""

from __future__ import annotations

import html
import math

_GIB = 1024 ** 3
_MIB = 1024 ** 2


def fmt_bytes(n: float) -> str:
    """``3.2 GiB`` / ``12.0 MiB`` / ``512 B``."""
    if n >= _GIB:
        return f"{n / _GIB:.1f} GiB"
    if n >= _MIB:
        return f"{n / _MIB:.1f} MiB"
    if n >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n:.0f} B"


def fmt_s(t: float) -> str:
    """``1.25 s`` / ``3.4 ms`` / ``12 µs``; ``∞`` for infinity."""
    if math.isinf(t):
        return "∞"
    if t == 0:
        return "0"
    if t >= 1:
        return f"{t:.2f} s"
    if t >= 1e-3:
        return f"{t * 1e3:.2f} ms"
    return f"{t * 1e6:.0f} µs"


def fmt_rate(bytes_per_s: float) -> str:
    """A link or disk rate in bits (links are sold in bits): ``100 Mbit/s``."""
    bits = bytes_per_s * 8
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits >= scale:
            return f"{bits / scale:.3g} {unit}"
    return f"{bits:.3g} bit/s"


def html_table(title: str, header: list[str], rows: list[list[object]]) -> str:
    """A plain HTML table with a bold title; cells are escaped."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<div><b>{html.escape(title)}</b><table><tr>{head}</tr>{body}</table></div>"
