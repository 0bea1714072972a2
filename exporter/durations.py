"""Prometheus duration syntax: 1y2w3d4h5m6s7ms (units in this order, each at most once)."""

from __future__ import annotations

import re

_UNITS = (
    ("y", 365 * 86400.0),
    ("w", 7 * 86400.0),
    ("d", 86400.0),
    ("h", 3600.0),
    ("m", 60.0),
    ("s", 1.0),
    ("ms", 0.001),
)
_PATTERN = re.compile(r"^" + "".join(rf"(?:(\d+){u})?" for u, _ in _UNITS) + r"$")
# Longer text is never a sane duration, and it keeps int() far from its digit limit.
_MAX_LENGTH = 64


def parse_duration(text: str) -> float:
    """Seconds of a Prometheus duration; ValueError (with a message for users) when it is not one."""
    value = text.strip()
    if value == "0":
        return 0.0
    match = _PATTERN.match(value) if len(value) <= _MAX_LENGTH else None
    if not value or match is None:
        shown = text if len(text) <= _MAX_LENGTH else text[:_MAX_LENGTH] + "..."
        raise ValueError(f"not a valid duration {shown!r} (use Prometheus syntax such as 30s, 5m, 2h, 1d)")
    return sum(int(g) * factor for g, (_, factor) in zip(match.groups(), _UNITS, strict=True) if g)


def format_duration(seconds: float) -> str:
    """The shortest d/h/m/s text of whole seconds (``5400`` -> ``1h30m``); milliseconds below 1s."""
    if seconds <= 0:
        return "0s"
    parts = []
    remaining = round(seconds)
    for unit, factor in _UNITS[2:6]:
        count, remaining = divmod(remaining, int(factor))
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or f"{int(seconds * 1000)}ms"


def human_duration(seconds: float) -> str:
    """A waiting time as an administrator reads it: ``3d 4h``, ``2h 15m``, ``5m``, ``40s``."""
    seconds = max(0.0, seconds)
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h" if hours else f"{days}d"
    if hours:
        return f"{hours}h {minutes}m" if minutes else f"{hours}h"
    if minutes:
        return f"{minutes}m"
    return f"{secs}s"
