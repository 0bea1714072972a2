"""The state file: last good data of every source plus first-seen times, written atomically.

After a restart the exporter serves the persisted snapshot at once, before any backend answered,
and first-seen times (the only evidence of when a user reached the collection/connector stages)
survive. The format is JSON with a version number; a file of another version, or a damaged one, is
logged and ignored rather than crashing the exporter.
"""

from __future__ import annotations

import binascii
import contextlib
import dataclasses
import json
import logging
import os
import tempfile
import types
import typing
from collections.abc import Callable, Mapping
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


# ------------------------------------------------------------------------------ codec
# Dataclasses are written as positional rows (lists), not objects with keys: a state file of a large
# tenant is then several times smaller and faster to read. The field names of every type are stored
# alongside as a schema; a file written by a version with other fields is ignored, never misread.
Encoder = Callable[[Any], Any]
Decoder = Callable[[Any], Any]
_ENCODERS: dict[Any, Encoder] = {}
_DECODERS: dict[Any, Decoder] = {}


def _identity(value: Any) -> Any:
    return value


def _b64(value: bytes) -> str:
    return binascii.b2a_base64(value, newline=False).decode("ascii")


def _unb64(value: Any) -> bytes:
    if not isinstance(value, str):
        raise TypeError("expected base64 text")
    return binascii.a2b_base64(value)


def _primitive(cls: type) -> Decoder:
    def check(value: Any) -> Any:
        if cls is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if not isinstance(value, cls) or (cls is int and isinstance(value, bool)):
            raise TypeError(f"expected {cls.__name__}, got {type(value).__name__}")
        return value

    return check


def _optional_of(cls: Any) -> Any:
    """X for ``X | None``; the model uses no other unions."""
    options = [o for o in typing.get_args(cls) if o is not type(None)]
    if len(options) != 1:
        raise TypeError(f"unsupported union {cls}")
    return options[0]


def encoder_for(cls: Any) -> Encoder:
    cached = _ENCODERS.get(cls)
    if cached is not None:
        return cached
    origin = typing.get_origin(cls)
    result: Encoder
    if origin in (Union, types.UnionType):
        inner = encoder_for(_optional_of(cls))
        result = lambda v: None if v is None else inner(v)  # noqa: E731
    elif origin is tuple:
        item = encoder_for(typing.get_args(cls)[0])
        result = lambda v: [item(x) for x in v]  # noqa: E731
    elif dataclasses.is_dataclass(cls) and isinstance(cls, type):
        hints = typing.get_type_hints(cls)
        fields = [(f.name, encoder_for(hints[f.name])) for f in dataclasses.fields(cls)]
        result = lambda v: [enc(getattr(v, name)) for name, enc in fields]  # noqa: E731
    elif cls is bytes:
        result = _b64
    elif cls in (int, float, str, bool):
        result = _identity
    else:
        raise TypeError(f"cannot encode {cls}")
    _ENCODERS[cls] = result
    return result


def decoder_for(cls: Any) -> Decoder:
    cached = _DECODERS.get(cls)
    if cached is not None:
        return cached
    origin = typing.get_origin(cls)
    result: Decoder
    if origin in (Union, types.UnionType):
        inner = decoder_for(_optional_of(cls))
        result = lambda v: None if v is None else inner(v)  # noqa: E731
    elif origin is tuple:
        item = decoder_for(typing.get_args(cls)[0])

        def result(v: Any) -> Any:
            if not isinstance(v, list):
                raise TypeError("expected a list")
            return tuple(item(x) for x in v)

    elif dataclasses.is_dataclass(cls) and isinstance(cls, type):
        hints = typing.get_type_hints(cls)
        decoders = [decoder_for(hints[f.name]) for f in dataclasses.fields(cls)]
        target = cls

        def result(v: Any) -> Any:
            if not isinstance(v, list) or len(v) != len(decoders):
                raise TypeError(f"expected a row of {len(decoders)} values for {target.__name__}")
            return target(*[dec(x) for dec, x in zip(decoders, v, strict=True)])

    elif cls is bytes:
        result = _unb64
    elif cls in (int, float, str, bool):
        result = _primitive(cls)
    else:
        raise TypeError(f"cannot decode {cls}")
    _DECODERS[cls] = result
    return result


def encode(value: Any) -> Any:
    return encoder_for(type(value))(value)


def decode(cls: Any, raw: Any) -> Any:
    return decoder_for(cls)(raw)


def schema(cls: Any, seen: set[Any] | None = None) -> dict[str, list[str]]:
    """Field names of a dataclass and of every dataclass inside it."""
    seen = set() if seen is None else seen
    result: dict[str, list[str]] = {}
    if cls in seen:
        return result
    seen.add(cls)
    if typing.get_origin(cls) in (Union, types.UnionType, tuple):
        for arg in typing.get_args(cls):
            if arg is not Ellipsis:
                result.update(schema(arg, seen))
    elif dataclasses.is_dataclass(cls) and isinstance(cls, type):
        hints = typing.get_type_hints(cls)
        result[cls.__name__] = [f.name for f in dataclasses.fields(cls)]
        for f in dataclasses.fields(cls):
            result.update(schema(hints[f.name], seen))
    return result


SCHEMA = {kind: schema(cls) for kind, cls in DATA_TYPES.items()}


# ------------------------------------------------------------------------------ the file
class StateStore:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def save(self, estates: Mapping[str, PersistedEstate], saved_at: float) -> None:
        document = {
            "version": STATE_VERSION,
            "saved_at": saved_at,
            "schema": SCHEMA,
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
                # json.dumps uses the C encoder; json.dump to a file falls back to a slow pure-Python one.
                handle.write(json.dumps(document, separators=(",", ":")))
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
        if document.get("schema") != SCHEMA:
            log.warning("ignoring state file %s: written by a version with other data fields", self.path)
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
