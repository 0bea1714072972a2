"""The state file: the last good data of every source, first-seen times and incremental read state.

After a restart the exporter serves the persisted snapshot at once, before any backend answers;
first-seen times (the only evidence of when a user reached a stage no backend timestamps) and the
sources' incremental state (Graph delta link, AD USN) survive.

Layout: ``state_file`` itself is a small JSON *manifest*; each source table lives in a binary file
in the directory ``<state_file>.d/`` (a header describing the columns, then the raw column
buffers). A table file is written once per table version, so a refresh that changed nothing
writes nothing but the manifest, and a 500,000-user table is written with a few large ``write``
calls instead of being turned into JSON. Every file is written to a temporary name, synced and
renamed; the manifest is renamed last, so a kill at any moment leaves the previous complete state.
Leftover temporary files and table files no manifest refers to are removed at start.

Everything read back is validated (pydantic for the manifest, shape and range checks for every
column); a damaged part is logged once and that estate starts clean, never crashing the exporter.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import mmap
import os
import secrets
import struct
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from exporter.columns import Blob
from exporter.model import SOURCE_REGISTRY, OrganizationData, SourceData, SourceKind
from exporter.pipelines.definitions import PIPELINES
from exporter.pipelines.evaluation import FirstSeen
from exporter.tables import NUMPY_KINDS, Categorical, Col, ColumnValue, Table

log = logging.getLogger(__name__)

STATE_VERSION = 2
MAGIC = b"IPXTABLE3\n"  # 3: every buffer carries a CRC-32
# Timestamps outside this range are damage, not data (year 1336 .. 2603).
TIME_LIMIT = 2e10
_WRITE_SLICE = 8 << 20  # bytes per write call: the GIL is released during each


class StateError(ValueError):
    """A state file (or one of its parts) that cannot be used."""


# ============================================================================ table files
def _buffers(table: Table) -> Iterator[tuple[dict[str, Any], list[memoryview | bytes]]]:
    """(column description, its buffers) for every column, children after the parent's."""
    for col in table.COLUMNS:
        value = table.column(col.name)
        if isinstance(value, Blob):
            parts: list[memoryview | bytes] = [memoryview(value.data), value.offsets.data]
            if value.nulls is not None:
                parts.append(value.nulls.data)
            yield {"name": col.name, "kind": col.kind, "nulls": value.nulls is not None}, parts
        elif isinstance(value, Categorical):
            yield {"name": col.name, "kind": col.kind, "vocab": list(value.vocab)}, [value.codes.data]
        else:
            yield {"name": col.name, "kind": col.kind}, [np.ascontiguousarray(value).data.cast("B")]


def _describe(table: Table, offset: int) -> tuple[dict[str, Any], list[memoryview | bytes], int]:
    columns = []
    payload: list[memoryview | bytes] = []
    for description, parts in _buffers(table):
        lengths = [len(p) if isinstance(p, bytes) else p.nbytes for p in parts]
        # A CRC-32 per buffer: a flipped bit in a column is caught at load, not served until the next
        # full read (zlib's crc32 runs at memory speed and releases the GIL on large buffers).
        description["buffers"] = [
            [offset + sum(lengths[:i]), n, zlib.crc32(part)]
            for i, (n, part) in enumerate(zip(lengths, parts, strict=True))
        ]
        offset += sum(lengths)
        columns.append(description)
        payload.extend(parts)
    children = {}
    for name, child in table.children.items():
        children[name], child_payload, offset = _describe(child, offset)
        payload.extend(child_payload)
    return (
        {"type": type(table).__name__, "rows": table.n, "columns": columns, "children": children},
        payload,
        offset,
    )


def write_table(path: Path, table: Table, should_stop: Callable[[], bool] = lambda: False) -> bool:
    """Write one table file atomically; False if ``should_stop`` interrupted it (nothing left behind)."""
    header, payload, _ = _describe(table, 0)
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(MAGIC + struct.pack("<Q", len(header_bytes)) + header_bytes)
            for part in payload:
                view = memoryview(part).cast("B")
                for start in range(0, len(view), _WRITE_SLICE):
                    if should_stop():
                        raise InterruptedError
                    handle.write(view[start : start + _WRITE_SLICE])
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
        return True
    except InterruptedError:
        return False
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def read_table(path: Path, table_type: type[Table]) -> Table:
    """Read and validate one table file; StateError says what is wrong."""
    try:
        raw = _read_mapped(path)
    except OSError as exc:
        raise StateError(f"cannot read {path.name}: {exc.strerror or exc}") from None
    if raw[: len(MAGIC)] != MAGIC or len(raw) < len(MAGIC) + 8:
        raise StateError(f"{path.name} is not a table file of this version")
    (header_length,) = struct.unpack_from("<Q", raw, len(MAGIC))
    start = len(MAGIC) + 8
    try:
        header = json.loads(raw[start : start + header_length])
    except ValueError:
        raise StateError(f"{path.name}: damaged header") from None
    body = memoryview(raw)[start + header_length :]
    try:
        return _table_from(header, body, table_type)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise StateError(f"{path.name}: {exc}") from None


def _read_mapped(path: Path) -> mmap.mmap | bytes:
    """The file's bytes in an anonymous mapping of their own. The table's columns are views into
    it, so it is freed in one piece when the table goes: from a ``bytes`` that is one ``munmap`` of
    the whole file with the GIL held (10-20 ms at 500,000 users, during which no scrape is
    answered), while an ``mmap`` object unmaps with the GIL released."""
    with path.open("rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            return b""
        mapped = mmap.mmap(-1, size)
        view = memoryview(mapped)
        try:
            done = 0
            while done < size:
                count = handle.readinto(view[done:])
                if not count:
                    raise OSError(errno.EIO, f"{path.name} ended after {done} of {size} bytes")
                done += count
        finally:
            view.release()
        return mapped


def _buffer(body: memoryview, spec: Any) -> memoryview:
    offset, length, checksum = int(spec[0]), int(spec[1]), int(spec[2])
    if offset < 0 or length < 0 or offset + length > len(body):
        raise ValueError("a column buffer lies outside the file")
    data = body[offset : offset + length]
    if zlib.crc32(data) != checksum:
        raise ValueError("a column buffer does not match its checksum (damaged file)")
    return data


def _array(body: memoryview, spec: Any, dtype: np.dtype[Any], rows: int) -> np.ndarray[Any, Any]:
    data = _buffer(body, spec)
    if len(data) != rows * dtype.itemsize:
        raise ValueError(f"a {dtype} column has {len(data)} bytes for {rows} rows")
    return np.frombuffer(data, dtype=dtype)


def _table_from(header: Mapping[str, Any], body: memoryview, table_type: type[Table]) -> Table:
    if header.get("type") != table_type.__name__:
        raise ValueError(f"holds a {header.get('type')}, expected {table_type.__name__}")
    rows = int(header["rows"])
    if rows < 0:
        raise ValueError("negative row count")
    described = {c["name"]: c for c in header["columns"]}
    columns: dict[str, ColumnValue] = {}
    for col in table_type.COLUMNS:
        spec = described.get(col.name)
        if spec is None or spec.get("kind") != col.kind:
            raise ValueError(f"column {col.name} missing or of another kind")
        columns[col.name] = _column(col, spec, body, rows)
    children = {
        name: _table_from(header["children"][name], body, child_type)
        for name, child_type in table_type.CHILDREN.items()
    }
    return table_type(columns, children=children)


def _column(col: Col, spec: Mapping[str, Any], body: memoryview, rows: int) -> ColumnValue:
    buffers = spec["buffers"]
    if col.kind in ("text", "bytes"):
        data = _buffer(body, buffers[0])  # a view of the file's bytes: no second copy in memory
        offsets = _array(body, buffers[1], np.dtype(np.int64), rows + 1)
        if offsets[0] != 0 or offsets[-1] != len(data) or (np.diff(offsets) < 0).any():
            raise ValueError(f"column {col.name}: offsets do not describe the text")
        nulls = _array(body, buffers[2], np.dtype(np.bool_), rows) if spec.get("nulls") else None
        return Blob(data, offsets, nulls, col.kind == "text")
    if col.kind == "cat":
        vocab = spec["vocab"]
        if not isinstance(vocab, list) or not all(isinstance(v, str) for v in vocab):
            raise ValueError(f"column {col.name}: vocabulary is not a list of strings")
        codes = _array(body, buffers[0], np.dtype(np.int32), rows)
        if len(codes) and (int(codes.min()) < -1 or int(codes.max()) >= len(vocab)):
            raise ValueError(f"column {col.name}: code outside its vocabulary")
        return Categorical(codes, tuple(vocab))
    values = _array(body, buffers[0], NUMPY_KINDS[col.kind], rows)
    if col.kind == "f8" and len(values):
        finite = values[~np.isnan(values)]
        if len(finite) and (np.abs(finite) > TIME_LIMIT).any():
            raise ValueError(f"column {col.name}: a time outside years 1336..2603")
    if col.kind == "i8" and col.name == "row" and len(values) and int(values.min()) < 0:
        raise ValueError("negative row reference")
    return values


class FirstSeenTable(Table):
    COLUMNS = (Col("key", "u64"), Col("stage", "i1"), Col("since", "f8"))
    __slots__ = ()


# ============================================================================ manifest
def _finite_time(value: float | None) -> float | None:
    if value is not None and (not math.isfinite(value) or abs(value) > TIME_LIMIT):
        raise ValueError("not a plausible time")
    return value


class _SourceEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    up: bool
    last_success: float | None = None
    duration: float | None = Field(default=None, ge=0, le=1e7)
    full_read_at: float | None = None
    table: str | None = None  # file name in the table directory (tables)
    data: dict[str, Any] | None = None  # inline JSON (small data: the organization)
    meta: dict[str, Any] = Field(default_factory=dict)

    _times = field_validator("last_success", "full_read_at")(_finite_time)

    @field_validator("table")
    @classmethod
    def _plain_name(cls, value: str | None) -> str | None:
        if value is not None and (not value or "/" in value or value.startswith(".")):
            raise ValueError("not a file name")
        return value


class _EstateEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    pipeline: str
    sources: dict[str, _SourceEntry] = Field(default_factory=dict)
    first_seen: str | None = None

    @field_validator("pipeline")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in PIPELINES:
            raise ValueError(f"unknown pipeline {value!r}")
        return value


class _Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    version: int
    saved_at: float
    label_key: str | None = None
    estates: dict[str, _EstateEntry] = Field(default_factory=dict)


_ORGANIZATION = TypeAdapter(OrganizationData)


# ============================================================================ what is saved
@dataclass
class SourceState:
    data: SourceData
    up: bool
    last_success: float | None
    duration: float | None
    full_read_at: float | None = None


@dataclass
class EstateState:
    pipeline: str
    sources: dict[SourceKind, SourceState] = field(default_factory=dict)
    first_seen: FirstSeen | None = None


@dataclass
class SavedState:
    estates: dict[str, EstateState] = field(default_factory=dict)
    label_key: str | None = None


# ============================================================================ the store
class StateStore:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.directory = self.path.with_name(self.path.name + ".d")
        self._lock = threading.Lock()
        # content key of a table -> (its columns, weakly; the file it was written to or restored
        # from). A table whose columns did not change (only its meta, e.g. a new delta link) is not
        # written again; its meta goes into the manifest. Weakly: holding the written tables would
        # keep a 500,000-user estate's previous tables alive until the next write (hundreds of MiB).
        self._written: dict[tuple[int, ...], _Written] = {}

    # ------------------------------------------------------------------ load
    def load(self, *, cleanup: bool = True) -> SavedState:
        """The persisted state; empty when there is no usable file (the reason is logged).

        With ``cleanup`` (the exporter at start, the only writer) leftovers of a killed write and
        table files no manifest refers to are removed; other readers pass False.
        """
        if cleanup:
            self._remove_leftovers()
        try:
            text = self.path.read_bytes()
        except FileNotFoundError:
            return SavedState()
        except OSError as exc:
            log.warning("ignoring unreadable state file %s: %s", self.path, exc.strerror or exc)
            return SavedState()
        try:
            manifest = _Manifest.model_validate_json(text)
        except ValidationError as exc:
            log.warning("ignoring state file %s: %s", self.path, _first_error(exc))
            return SavedState()
        if manifest.version != STATE_VERSION:
            log.warning(
                "ignoring state file %s: format version %s, expected %s",
                self.path,
                manifest.version,
                STATE_VERSION,
            )
            return SavedState()
        result = SavedState(label_key=manifest.label_key)
        for name, entry in manifest.estates.items():
            try:
                result.estates[name] = self._load_estate(entry)
            except StateError as exc:
                log.warning("state file %s: starting estate %s clean: %s", self.path, name, exc)
        if cleanup:
            self._remove_unreferenced(manifest)
        return result

    def load_first_seen(self, estate: str) -> FirstSeen | None:
        """Only the first-seen times of one estate (what ``trace`` needs), without reading tables."""
        try:
            manifest = _Manifest.model_validate_json(self.path.read_bytes())
        except (OSError, ValidationError):
            return None
        entry = manifest.estates.get(estate)
        if manifest.version != STATE_VERSION or entry is None or entry.first_seen is None:
            return None
        table = read_table(self.directory / entry.first_seen, FirstSeenTable)
        return FirstSeen.from_rows(
            entry.pipeline, table.array("key"), table.array("stage"), table.array("since")
        )

    def _load_estate(self, entry: _EstateEntry) -> EstateState:
        estate = EstateState(pipeline=entry.pipeline)
        for kind, source in entry.sources.items():
            info = SOURCE_REGISTRY.get(kind)  # type: ignore[call-overload]
            if info is None:
                continue
            data = self._load_data(info.data_type, source)
            estate.sources[info.kind] = SourceState(
                data=data,
                up=source.up,
                last_success=source.last_success,
                duration=source.duration,
                full_read_at=source.full_read_at,
            )
        if entry.first_seen is not None:
            table = read_table(self.directory / entry.first_seen, FirstSeenTable)
            stages = table.array("stage")
            if len(stages) and (
                int(stages.min()) < 0 or int(stages.max()) >= len(PIPELINES[entry.pipeline].stages)
            ):
                raise StateError("first-seen stage out of range")
            estate.first_seen = FirstSeen.from_rows(
                entry.pipeline, table.array("key"), stages, table.array("since")
            )
            self._remember(table, entry.first_seen)
        return estate

    def _load_data(self, data_type: type, entry: _SourceEntry) -> SourceData:
        if data_type is OrganizationData:
            if entry.data is None:
                raise StateError("organization data missing")
            try:
                return _ORGANIZATION.validate_python(entry.data)
            except ValidationError as exc:
                raise StateError(f"organization data: {_first_error(exc)}") from None
        if entry.table is None:
            raise StateError(f"{data_type.__name__} without a table file")
        table = read_table(self.directory / entry.table, data_type)
        table.meta.update(entry.meta)
        self._remember(table, entry.table)
        return table  # type: ignore[return-value]

    def _remember(self, table: Table, name: str) -> None:
        with self._lock:
            self._written[content_key(table)] = _Written.of(table, name)

    # ------------------------------------------------------------------ save
    def save(
        self, state: SavedState, saved_at: float, should_stop: Callable[[], bool] = lambda: False
    ) -> bool:
        """Write what changed and then the manifest; False when interrupted (the old state stays)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            os.chmod(self.directory, 0o700)
        estates: dict[str, Any] = {}
        keep: dict[tuple[int, ...], _Written] = {}
        for name, estate in state.estates.items():
            entry: dict[str, Any] = {"pipeline": estate.pipeline, "sources": {}}
            for kind, source in estate.sources.items():
                item: dict[str, Any] = {
                    "up": source.up,
                    "last_success": source.last_success,
                    "duration": source.duration,
                    "full_read_at": source.full_read_at,
                }
                if isinstance(source.data, Table):
                    file_name = self._write(name, kind, source.data, keep, should_stop)
                    if file_name is None:
                        return False
                    item["table"] = file_name
                    item["meta"] = source.data.meta
                else:
                    item["data"] = _ORGANIZATION.dump_python(source.data, mode="json")
                entry["sources"][kind] = item
            if estate.first_seen is not None:
                seen = estate.first_seen
                table = _first_seen_table(seen)
                file_name = self._write(name, "first-seen", table, keep, should_stop)
                if file_name is None:
                    return False
                entry["first_seen"] = file_name
            estates[name] = entry
        manifest = {
            "version": STATE_VERSION,
            "saved_at": saved_at,
            "label_key": state.label_key,
            "estates": estates,
        }
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as handle:
                handle.write(json.dumps(manifest, separators=(",", ":"), default=_json_default))
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        with self._lock:
            self._written = keep
        self._remove_files_except({written.name for written in keep.values()})
        return True

    def _write(
        self,
        estate: str,
        kind: str,
        table: Table,
        keep: dict[tuple[int, ...], _Written],
        should_stop: Callable[[], bool],
    ) -> str | None:
        key = content_key(table)
        with self._lock:
            known = self._written.get(key)
        if known is not None and known.alive():
            keep[key] = known
            return known.name
        name = f"{_slug(estate)}-{kind}-{secrets.token_hex(6)}.tbl"
        started = time.monotonic()
        if not write_table(self.directory / name, table, should_stop):
            return None
        log.debug("wrote %s (%d rows) in %.2fs", name, table.n, time.monotonic() - started)
        keep[key] = _Written.of(table, name)
        return name

    # ------------------------------------------------------------------ housekeeping
    def _remove_leftovers(self) -> None:
        """Temporary files of a write that was killed."""
        candidates = [self.path.with_name(self.path.name + ".tmp")]
        if self.directory.is_dir():
            candidates += list(self.directory.glob("*.tmp"))
        for leftover in candidates:
            with contextlib.suppress(OSError):
                leftover.unlink()
                log.info("removed leftover temporary state file %s", leftover)

    def _remove_unreferenced(self, manifest: _Manifest) -> None:
        referenced: set[str] = set()
        for estate in manifest.estates.values():
            referenced.update(s.table for s in estate.sources.values() if s.table)
            if estate.first_seen:
                referenced.add(estate.first_seen)
        self._remove_files_except(referenced)

    def _remove_files_except(self, referenced: set[str]) -> None:
        if not self.directory.is_dir():
            return
        for file in self.directory.glob("*.tbl"):
            if file.name not in referenced:
                with contextlib.suppress(OSError):
                    file.unlink()


@dataclass(frozen=True)
class _Written:
    """A table file and weak references to the columns written to it. A content key is made of the
    columns' ids, and an id names one object only while it lives: a key whose columns are all alive
    is the same content; once one is gone, its id may be another column's and the key proves
    nothing (the table is written again)."""

    columns: tuple[weakref.ref[Any], ...]
    name: str

    @classmethod
    def of(cls, table: Table, name: str) -> _Written:
        return cls(tuple(weakref.ref(column) for column in _all_columns(table)), name)

    def alive(self) -> bool:
        return all(column() is not None for column in self.columns)


def _all_columns(table: Table) -> list[Any]:
    columns = list(table.columns().values())
    for child in table.children.values():
        columns += _all_columns(child)
    return columns


def content_key(table: Table) -> tuple[int, ...]:
    """Identity of a table's columns (tables are immutable: same column objects, same content)."""
    return tuple(id(column) for column in _all_columns(table))


def _first_seen_table(seen: FirstSeen) -> Table:
    return FirstSeenTable(
        {"key": seen.keys, "stage": seen.stage, "since": seen.since}, meta={"pipeline": seen.pipeline}
    )


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)[:64]


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    raise TypeError(f"cannot store {type(value).__name__} in the state manifest")


def _first_error(exc: ValidationError) -> str:
    error = exc.errors(include_input=False)[0]
    location = ".".join(str(part) for part in error.get("loc", ()))
    return f"{location}: {error.get('msg')}" if location else str(error.get("msg"))
