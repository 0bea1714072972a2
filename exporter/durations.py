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
