"""Normalisation of the identifiers the three systems use for the same user.

AD hands out raw bytes (objectGUID, objectSid), Entra base64 text and lower-case GUIDs, the
ConfigMgr database upper-case GUID text or binary columns. Everything is converted to one form
before any comparison: GUIDs to raw 16 bytes in AD's (little-endian, "bytes_le") order or to
lower-case text without braces, SIDs to upper-case ``S-1-...`` text.
"""

from __future__ import annotations

import base64
import struct
import uuid
from datetime import UTC, datetime


def guid_bytes(value: object) -> bytes | None:
    """Raw 16 GUID bytes in AD storage order from bytes, GUID text or hex text; None if empty.

    GUID text (``{8-4-4-4-12}``, any case) is how Windows renders the little-endian struct, so it
    converts with ``bytes_le``; 32 bare hex digits (optionally ``0x``-prefixed) are the raw bytes.
    """
    if value is None:
        return None
    if isinstance(value, memoryview | bytearray):
        value = bytes(value)
    if isinstance(value, bytes):
        if len(value) == 0:
            return None
        if len(value) != 16:
            raise ValueError(f"a GUID has 16 bytes, got {len(value)}")
        return value
    if isinstance(value, uuid.UUID):
        return value.bytes_le
    if not isinstance(value, str):
        raise ValueError(f"cannot read a GUID from {type(value).__name__}")
    text = value.strip()
    if not text:
        return None
    if text.lower().startswith("0x"):
        text = text[2:]
    if len(text) == 32 and "-" not in text:
        try:
            return bytes.fromhex(text)
        except ValueError as exc:
            raise ValueError(f"not a GUID: {value!r}") from exc
    try:
        return uuid.UUID(text.strip("{}")).bytes_le
    except ValueError as exc:
        raise ValueError(f"not a GUID: {value!r}") from exc


def guid_text(value: object) -> str | None:
    """Lower-case GUID text without braces (Graph's form) from GUID text or 16 raw bytes_le."""
    if value is None:
        return None
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        if not raw:
            return None
        return str(uuid.UUID(bytes_le=raw))
    if not isinstance(value, str):
        raise ValueError(f"cannot read a GUID from {type(value).__name__}")
    text = value.strip().strip("{}").lower()
    if not text:
        return None
    try:
        return str(uuid.UUID(text))
    except ValueError as exc:
        raise ValueError(f"not a GUID: {value!r}") from exc


def immutable_id(anchor: bytes) -> str:
    """Entra's onPremisesImmutableId for a source anchor: base64 of its raw bytes."""
    return base64.b64encode(anchor).decode("ascii")


def sid_text(value: object) -> str | None:
    """``S-1-...`` upper-case text from a binary SID or SID text; None if empty."""
    if value is None:
        return None
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        if not raw:
            return None
        return sid_from_bytes(raw)
    if not isinstance(value, str):
        raise ValueError(f"cannot read a SID from {type(value).__name__}")
    text = value.strip().upper()
    if not text:
        return None
    if not text.startswith("S-1-"):
        raise ValueError(f"not a SID: {value!r}")
    return text


def sid_from_bytes(raw: bytes) -> str:
    if len(raw) < 8:
        raise ValueError("a binary SID has at least 8 bytes")
    revision, count = raw[0], raw[1]
    if len(raw) != 8 + 4 * count:
        raise ValueError("binary SID length does not match its sub-authority count")
    authority = int.from_bytes(raw[2:8], "big")
    subs = struct.unpack("<" + "I" * count, raw[8:])
    return "S-" + "-".join(str(x) for x in (revision, authority, *subs))


def sid_to_bytes(sid: str) -> bytes:
    parts = sid.upper().split("-")
    if len(parts) < 3 or parts[0] != "S":
        raise ValueError(f"not a SID: {sid!r}")
    revision, authority, subs = int(parts[1]), int(parts[2]), [int(p) for p in parts[3:]]
    return (
        bytes([revision, len(subs)])
        + authority.to_bytes(6, "big")
        + struct.pack("<" + "I" * len(subs), *subs)
    )


def user_name_key(domain: str | None, sam: str | None) -> str | None:
    """ConfigMgr's Unique_User_Name0 form, case-folded for comparison."""
    if not sam:
        return None
    return f"{domain or ''}\\{sam}".casefold()


def unique_user_name_key(value: str | None) -> str | None:
    if not value or "\\" not in value:
        return None
    return value.strip().casefold()


def epoch_seconds(value: object) -> float | None:
    """POSIX seconds from a datetime (naive means UTC), an ISO 8601 string or a number."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("not a time: bool")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, datetime):
        dt = value if value.tzinfo else value.replace(tzinfo=UTC)
        return dt.timestamp()
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        if text.endswith("Z"):
            text = text[:-1] + "+00:00"
        # SQL drivers and Graph may give more than the 6 fractional digits Python parses.
        if "." in text:
            head, _, tail = text.partition(".")
            digits = ""
            rest = tail
            while rest and rest[0].isdigit():
                digits, rest = digits + rest[0], rest[1:]
            text = f"{head}.{digits[:6].ljust(6, '0')}{rest}" if digits else head + rest
        try:
            dt = datetime.fromisoformat(text.replace(" ", "T", 1) if "T" not in text else text)
        except ValueError as exc:
            raise ValueError(f"not a time: {value!r}") from exc
        return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()
    raise ValueError(f"not a time: {type(value).__name__}")


__all__ = [
    "epoch_seconds",
    "guid_bytes",
    "guid_text",
    "immutable_id",
    "sid_from_bytes",
    "sid_text",
    "sid_to_bytes",
    "unique_user_name_key",
    "user_name_key",
]
