"""The state file: last good data of every source plus first-seen times, written atomically.

After a restart the exporter serves the persisted snapshot at once, before any backend answered,
and first-seen times (the only evidence of when a user reached the collection/connector stages)
survive. The format is JSON with a version number; a file of another version, or a damaged one, is
logged and ignored rather than crashing the exporter.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import logging
import os
import tempfile
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from exporter.model import (
    STAGES,
    AdData,
    ConfigMgrData,
    EntraData,
    OrganizationData,
    SourceData,
    SourceKind,
)
from exporter.stages import FirstSeen

log = logging.getLogger(__name__)

STATE_VERSION = 1
DATA_TYPES: dict[SourceKind, type] = {
    "ad": AdData,
    "entra": EntraData,
    "entra_organization": OrganizationData,
    "configmgr": ConfigMgrData,
}


@dataclass
class PersistedSource:
    data: SourceData
    up: bool
    last_success: float | None
    duration: float | None


@dataclass
class PersistedEstate:
    sources: dict[SourceKind, PersistedSource] = field(default_factory=dict)
    first_seen: dict[str, FirstSeen] = field(default_factory=dict)


# ------------------------------------------------------------------------------ generic codec
def encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, tuple | list):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        return {str(k): encode(v) for k, v in value.items()}
    return value


_HINTS: dict[type, dict[str, Any]] = {}


def decode(cls: Any, raw: Any) -> Any:
    """Rebuild a value of type ``cls`` from what :func:`encode` produced (raises on mismatch)."""
    origin = typing.get_origin(cls)
    if origin in (Union, types.UnionType):
        options = typing.get_args(cls)
        if raw is None and type(None) in options:
            return None
        last_error: Exception | None = None
        for option in options:
            if option is type(None):
                continue
            try:
                return decode(option, raw)
            except (TypeError, ValueError, KeyError) as exc:
                last_error = exc
        raise ValueError(f"no union member of {cls} fits: {last_error}")
    if origin is tuple:
        (item_type, *_rest) = typing.get_args(cls)
        if not isinstance(raw, list):
            raise TypeError("expected a list")
        return tuple(decode(item_type, v) for v in raw)
    if dataclasses.is_dataclass(cls) and isinstance(cls, type):
        if not isinstance(raw, dict):
            raise TypeError(f"expected an object for {cls.__name__}")
        hints = _HINTS.get(cls)
        if hints is None:
            hints = _HINTS[cls] = typing.get_type_hints(cls)
        kwargs = {
            f.name: decode(hints[f.name], raw[f.name]) for f in dataclasses.fields(cls) if f.name in raw
        }
        return cls(**kwargs)
    if cls is bytes:
        if not isinstance(raw, str):
            raise TypeError("expected base64 text")
        return base64.b64decode(raw)
    if cls is float:
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise TypeError("expected a number")
        return float(raw)
    if cls in (int, str, bool):
        if not isinstance(raw, cls) or (cls is int and isinstance(raw, bool)):
            raise TypeError(f"expected {cls.__name__}")
        return raw
    raise TypeError(f"cannot decode {cls}")


# ------------------------------------------------------------------------------ the file
class StateStore:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def save(self, estates: Mapping[str, PersistedEstate], saved_at: float) -> None:
        document = {
            "version": STATE_VERSION,
            "saved_at": saved_at,
            "estates": {
                name: {
                    "sources": {
                        kind: {
                            "up": src.up,
                            "last_success": src.last_success,
                            "duration": src.duration,
                            "data": encode(src.data),
                        }
                        for kind, src in estate.sources.items()
                    },
                    "first_seen": {key: [fs.stage, fs.since] for key, fs in estate.first_seen.items()},
                }
                for name, estate in estates.items()
            },
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Write to a temporary file in the same directory and rename it over the old one, so a
        # crash mid-write leaves the previous state intact.
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(document, handle, separators=(",", ":"))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def load(self) -> dict[str, PersistedEstate]:
        """The persisted estates; empty when there is no usable file (the reason is logged)."""
        try:
            document = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable state file %s: %s", self.path, exc)
            return {}
        if not isinstance(document, dict) or document.get("version") != STATE_VERSION:
            log.warning("ignoring state file %s: unknown format version", self.path)
            return {}
        result: dict[str, PersistedEstate] = {}
        for name, raw_estate in (document.get("estates") or {}).items():
            try:
                result[name] = _load_estate(raw_estate)
            except (TypeError, ValueError, KeyError) as exc:
                log.warning("ignoring damaged state of estate %s in %s: %s", name, self.path, exc)
        return result


def _load_estate(raw: dict[str, Any]) -> PersistedEstate:
    estate = PersistedEstate()
    for kind, raw_source in (raw.get("sources") or {}).items():
        data_type = DATA_TYPES.get(kind)
        if data_type is None:
            continue
        estate.sources[kind] = PersistedSource(
            data=decode(data_type, raw_source["data"]),
            up=bool(raw_source.get("up", True)),
            last_success=raw_source.get("last_success"),
            duration=raw_source.get("duration"),
        )
    for key, (stage, since) in (raw.get("first_seen") or {}).items():
        if stage in STAGES:
            estate.first_seen[key] = FirstSeen(stage, float(since))
    return estate
