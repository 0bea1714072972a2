"""Vectorised conversions for the full reads: a page of values converted in one numpy pass.

A full read converts the same few fields of hundreds of thousands of users; parsing a timestamp
with ``strptime`` or ``datetime.fromisoformat`` one value at a time costs more than decoding the
entry it came in. These functions take the common fixed-width forms of a whole page at once and
return NaN for every value not in that form (or not a valid time), which the caller then parses
one by one with the exact parser, errors included: the result is always what that parser gives.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

Floats = np.ndarray[Any, np.dtype[np.float64]]
_DAYS_BEFORE_MONTH = np.array([0, 0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334], dtype=np.int64)
_DAYS_IN_MONTH = np.array([0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31], dtype=np.int64)

# (width, positions of the 14 digits YYYYMMDDHHMMSS, (position, byte) of every separator)
_GENERALIZED = (17, tuple(range(14)), ((14, b"."), (15, b"0"), (16, b"Z")))  # 20240131235959.0Z
_ISO = (  # 2024-01-31T23:59:59Z
    20,
    (0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18),
    ((4, b"-"), (7, b"-"), (10, b"T"), (13, b":"), (16, b":"), (19, b"Z")),
)


def generalized_times(values: Sequence[bytes | None]) -> Floats:
    """POSIX seconds of LDAP GeneralizedTime values ``YYYYMMDDHHMMSS.0Z`` (how AD and OpenLDAP
    write whenCreated); NaN for anything else."""
    return _fixed_times(values, _GENERALIZED)


def iso_times(values: Sequence[str | None]) -> Floats:
    """POSIX seconds of ISO 8601 UTC times ``YYYY-MM-DDTHH:MM:SSZ`` (Graph's form); NaN for anything
    else (fractions, offsets, other types)."""
    width = _ISO[0]
    encoded = [v.encode("ascii", "replace") if type(v) is str and len(v) == width else None for v in values]
    return _fixed_times(encoded, _ISO)


def _fixed_times(values: Sequence[bytes | None], layout: tuple[int, tuple[int, ...], Any]) -> Floats:
    width, digit_positions, separators = layout
    if not values:
        return np.zeros(0, dtype=np.float64)
    filler = b"x" * width
    joined = b"".join(v if v is not None and len(v) == width else filler for v in values)
    raw = np.frombuffer(joined, dtype=np.uint8).reshape(-1, width)
    digits = raw[:, list(digit_positions)].astype(np.int64) - ord("0")
    ok = ((digits >= 0) & (digits <= 9)).all(axis=1)
    for position, byte in separators:
        ok &= raw[:, position] == byte[0]
    d = digits.T
    year = d[0] * 1000 + d[1] * 100 + d[2] * 10 + d[3]
    month = d[4] * 10 + d[5]
    day = d[6] * 10 + d[7]
    hour, minute, second = d[8] * 10 + d[9], d[10] * 10 + d[11], d[12] * 10 + d[13]
    leap = (year % 4 == 0) & ((year % 100 != 0) | (year % 400 == 0))
    month_ok = (month >= 1) & (month <= 12)
    safe_month = np.where(month_ok, month, 1)
    month_days = _DAYS_IN_MONTH[safe_month] - ((safe_month == 2) & ~leap)
    ok &= month_ok & (day >= 1) & (day <= month_days) & (year >= 1)
    ok &= (hour < 24) & (minute < 60) & (second < 60)
    # Days since 1970-01-01 (proleptic Gregorian): the days before this year, month and day.
    years = year - 1
    days = years * 365 + years // 4 - years // 100 + years // 400 - 719162
    days += _DAYS_BEFORE_MONTH[safe_month] + ((safe_month > 2) & leap) + day - 1
    seconds = (days * 86400 + hour * 3600 + minute * 60 + second).astype(np.float64)
    seconds[~ok] = np.nan
    return seconds


__all__ = ["generalized_times", "iso_times"]
