"""Immutable column tables: the generic machinery behind the model's AD, Entra, ConfigMgr and device tables.

A table is a set of equally long columns described by its class's ``COLUMNS`` (name and kind), an
optional set of child tables (per-user lists such as licence states, whose ``row`` column points at
the parent row) and a small JSON-able ``meta`` mapping. Tables never change: selecting rows
(:meth:`Table.take`) or appending (:meth:`Table.concat`) makes a new table, which is what lets a
snapshot be shared by scrapes while a source merges an incremental read into the next version.
The state file stores tables column by column (see exporter.state), driven by the same description.
"""

from __future__ import annotations

import threading
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Self, TypeVar

import numpy as np

from exporter.columns import GUID, I64, Array, Blob, BlobBuilder
from exporter.turns import step_aside

Kind = Literal["f8", "i8", "i4", "i2", "i1", "bool", "u64", "guid", "text", "bytes", "cat"]
NUMPY_KINDS: dict[str, np.dtype[Any]] = {
    "f8": np.dtype(np.float64),
    "i8": np.dtype(np.int64),
    "i4": np.dtype(np.int32),
    "i2": np.dtype(np.int16),
    "i1": np.dtype(np.int8),
    "bool": np.dtype(np.bool_),
    "u64": np.dtype(np.uint64),
    "guid": GUID,
}
_T = TypeVar("_T")


@dataclass(frozen=True)
class Col:
    name: str
    kind: Kind


@dataclass(frozen=True, eq=False)
class Categorical:
    """A column of few distinct strings: int32 codes into a vocabulary (-1 for None)."""

    codes: np.ndarray[Any, np.dtype[np.int32]]
    vocab: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.codes)

    def get(self, row: int) -> str | None:
        code = int(self.codes[row])
        return None if code < 0 else self.vocab[code]

    def code(self, name: str) -> int:
        """The code of ``name``, or -2 (which no row has) when it never occurs."""
        try:
            return self.vocab.index(name)
        except ValueError:
            return -2

    def codes_of(self, names: Iterable[str]) -> list[int]:
        return [c for c in (self.code(n) for n in names) if c >= 0]

    def take(self, rows: I64) -> Categorical:
        return Categorical(self.codes[rows], self.vocab)

    @staticmethod
    def concat(parts: Sequence[Categorical]) -> Categorical:
        vocab: dict[str, int] = {}
        for part in parts:
            for name in part.vocab:
                vocab.setdefault(name, len(vocab))
        codes = []
        for part in parts:
            remap = np.array([vocab[name] for name in part.vocab] + [-1], dtype=np.int32)
            codes.append(remap[part.codes])  # code -1 indexes the trailing -1
        merged = np.concatenate(codes) if codes else np.zeros(0, dtype=np.int32)
        return Categorical(merged.astype(np.int32), tuple(vocab))

    @staticmethod
    def from_values(values: Iterable[str | None]) -> Categorical:
        vocab: dict[str, int] = {}
        codes = [-1 if v is None else vocab.setdefault(v, len(vocab)) for v in values]
        return Categorical(np.asarray(codes, dtype=np.int32), tuple(vocab))


ColumnValue = Array | Blob | Categorical


_prepare_deferred = False


def defer_prepare() -> None:
    """From now on ``Table.prepare()`` builds nothing in this process: a refresh child hands its
    table over as column files, and the exporter builds the join indexes when it reads them back."""
    global _prepare_deferred
    _prepare_deferred = True


def empty_column(kind: Kind) -> ColumnValue:
    if kind in ("text", "bytes"):
        return Blob(b"", np.zeros(1, dtype=np.int64), None, kind == "text")
    if kind == "cat":
        return Categorical(np.zeros(0, dtype=np.int32), ())
    return np.zeros(0, dtype=NUMPY_KINDS[kind])


def column_length(value: ColumnValue) -> int:
    return len(value)


def take_column(value: ColumnValue, rows: I64) -> ColumnValue:
    step_aside()  # a column of a large table is one step of heavy work (exporter.turns)
    if isinstance(value, Blob | Categorical):
        return value.take(rows)
    return value[rows]


def concat_columns(kind: Kind, parts: Sequence[ColumnValue]) -> ColumnValue:
    step_aside()
    if kind in ("text", "bytes"):
        return Blob.concat([p for p in parts if isinstance(p, Blob)])
    if kind == "cat":
        return Categorical.concat([p for p in parts if isinstance(p, Categorical)])
    arrays = [p for p in parts if isinstance(p, np.ndarray)]
    return np.concatenate(arrays) if arrays else empty_column(kind)


class Table:
    """Base class of the immutable tables. Subclasses declare COLUMNS and CHILDREN."""

    COLUMNS: ClassVar[tuple[Col, ...]] = ()
    CHILDREN: ClassVar[Mapping[str, type[Table]]] = {}

    __slots__ = ("_cache", "_cache_lock", "_columns", "children", "meta", "n")

    def __init__(
        self,
        columns: Mapping[str, ColumnValue],
        *,
        meta: Mapping[str, Any] | None = None,
        children: Mapping[str, Table] | None = None,
    ) -> None:
        expected = {c.name for c in self.COLUMNS}
        if set(columns) != expected:
            missing, extra = expected - set(columns), set(columns) - expected
            raise ValueError(
                f"{type(self).__name__}: columns missing {sorted(missing)}, unknown {sorted(extra)}"
            )
        lengths = {column_length(columns[c.name]) for c in self.COLUMNS}
        if len(lengths) > 1:
            raise ValueError(f"{type(self).__name__}: columns of different lengths {sorted(lengths)}")
        self._columns = dict(columns)
        for value in self._columns.values():
            _freeze(value)
        self.n = lengths.pop() if lengths else 0
        self.meta: dict[str, Any] = dict(meta or {})
        self.children: dict[str, Table] = {
            name: (children or {}).get(name) or cls.empty() for name, cls in self.CHILDREN.items()
        }
        for name, child in self.children.items():
            rows = child.array("row")
            if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= self.n):
                raise ValueError(f"{type(self).__name__}.{name}: row reference out of range")
        self._cache: dict[str, Any] = {}
        self._cache_lock = threading.Lock()

    # Pickled for the demo's simulation process (exporter.demo.child); the lock is per process.
    def __getstate__(
        self,
    ) -> tuple[dict[str, ColumnValue], int, dict[str, Any], dict[str, Table], dict[str, Any]]:
        with self._cache_lock:
            cache = dict(self._cache)
        return self._columns, self.n, self.meta, self.children, cache

    def __setstate__(
        self, state: tuple[dict[str, ColumnValue], int, dict[str, Any], dict[str, Table], dict[str, Any]]
    ) -> None:
        self._columns, self.n, self.meta, self.children, self._cache = state
        self._cache_lock = threading.Lock()

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return self.n

    def column(self, name: str) -> ColumnValue:
        return self._columns[name]

    def array(self, name: str) -> np.ndarray[Any, Any]:
        value = self._columns[name]
        assert isinstance(value, np.ndarray), name
        return value

    def blob(self, name: str) -> Blob:
        value = self._columns[name]
        assert isinstance(value, Blob), name
        return value

    def cat(self, name: str) -> Categorical:
        value = self._columns[name]
        assert isinstance(value, Categorical), name
        return value

    def text(self, name: str, row: int) -> str | None:
        return self.blob(name).get(row)

    def columns(self) -> Mapping[str, ColumnValue]:
        return self._columns

    def take_apart(self) -> Iterator[object]:
        """Remove and yield this table's pieces one at a time (cached indexes, child tables, columns),
        for exporter.release to free a table nothing else refers to; the table is unusable after."""
        for key in list(self._cache):
            yield self._cache.pop(key)
        for name in list(self.children):
            yield self.children.pop(name)
        for name in list(self._columns):
            yield self._columns.pop(name)

    def cached(self, name: str, compute: Callable[[], _T]) -> _T:
        """A value derived from this (immutable) table, computed once."""
        with self._cache_lock:
            if name in self._cache:
                cached_value: _T = self._cache[name]
                return cached_value
        value = compute()  # outside the lock: computing twice in a race is harmless
        with self._cache_lock:
            stored: _T = self._cache.setdefault(name, value)
            return stored

    def prepare(self) -> Self:
        """Build the join indexes now (in the refresh thread, not in the evaluation); nothing in a
        process that hands its tables over (:func:`defer_prepare`)."""
        if not _prepare_deferred:
            self.build_indexes()
        return self

    def build_indexes(self) -> None:
        """The indexes :meth:`prepare` builds ahead of the evaluation (none by default)."""

    # ------------------------------------------------------------------ making new tables
    @classmethod
    def empty(cls, meta: Mapping[str, Any] | None = None) -> Self:
        return cls({c.name: empty_column(c.kind) for c in cls.COLUMNS}, meta=meta)

    def derive(
        self,
        columns: Mapping[str, ColumnValue],
        children: Mapping[str, Table] | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> Self:
        return type(self)(columns, meta=self.meta if meta is None else meta, children=children)

    def take(self, rows: I64) -> Self:
        """The given rows, in that order (children follow their parent rows)."""
        rows = np.asarray(rows, dtype=np.int64)
        columns = {c.name: take_column(self._columns[c.name], rows) for c in self.COLUMNS}
        return self.derive(columns, self._taken_children(rows))

    def take_and_append(self, rows: I64, other: Self, meta: Mapping[str, Any]) -> Self:
        """``concat([self.take(rows), other])``, column by column: only one column's intermediate
        copy exists at a time, so merging a change set into a 500,000-row table needs the new table
        and not a third full copy besides."""
        rows = np.asarray(rows, dtype=np.int64)
        columns = {
            c.name: concat_columns(c.kind, [take_column(self._columns[c.name], rows), other.column(c.name)])
            for c in self.COLUMNS
        }
        kept_children = self._taken_children(rows)
        children = {
            name: child_cls.concat([kept_children[name], _rows_shifted(other.children[name], len(rows))])
            for name, child_cls in self.CHILDREN.items()
        }
        return type(self)(columns, meta=meta, children=children)

    def _taken_children(self, rows: I64) -> dict[str, Table]:
        """The child rows of the parent ``rows``, re-pointed at their new positions."""
        new_position = np.full(self.n, -1, dtype=np.int64)
        new_position[rows] = np.arange(len(rows), dtype=np.int64)
        children: dict[str, Table] = {}
        for name, child in self.children.items():
            parent = child.array("row")
            kept = np.flatnonzero(new_position[parent] >= 0) if len(parent) else np.zeros(0, np.int64)
            moved = child.take(kept)
            remapped = dict(moved.columns())
            remapped["row"] = new_position[parent[kept]]
            children[name] = moved.derive(remapped)
        return children

    def where(self, mask: np.ndarray[Any, np.dtype[np.bool_]]) -> Self:
        return self.take(np.flatnonzero(mask))

    @classmethod
    def concat(cls, parts: Sequence[Self], meta: Mapping[str, Any] | None = None) -> Self:
        if not parts:
            return cls.empty(meta)
        columns = {c.name: concat_columns(c.kind, [p.column(c.name) for p in parts]) for c in cls.COLUMNS}
        children = {}
        for name, child_cls in cls.CHILDREN.items():
            shifted = []
            base = 0
            for part in parts:
                shifted.append(_rows_shifted(part.children[name], base))
                base += part.n
            children[name] = child_cls.concat(shifted)
        return cls(columns, meta=parts[-1].meta if meta is None else meta, children=children)


def _rows_shifted(child: Table, base: int) -> Table:
    """A child table whose parent rows moved ``base`` places down (its parent follows others)."""
    columns = dict(child.columns())
    columns["row"] = child.array("row") + base
    return child.derive(columns)


_ARRAY_CODES = {"f8": "d", "i8": "q", "i4": "i", "i2": "h", "i1": "b", "bool": "b", "u64": "Q"}


def _freeze(value: ColumnValue) -> None:
    """Columns of an immutable table are read-only (they may be views of a builder's buffers)."""
    arrays = [value] if isinstance(value, np.ndarray) else []
    if isinstance(value, Blob):
        arrays = [value.offsets] + ([value.nulls] if value.nulls is not None else [])
    elif isinstance(value, Categorical):
        arrays = [value.codes]
    for array_ in arrays:
        array_.flags.writeable = False


class TableBuilder:
    """Collects rows of one table value by value, straight into compact buffers.

    Numbers go into ``array.array`` objects, GUIDs and text into byte buffers: a row costs its bytes, not
    a Python object per field, and ``columns()`` hands the buffers to numpy without copying.
    """

    def __init__(self, table_type: type[Table]) -> None:
        self.table_type = table_type
        self.rows = 0
        self._numbers: dict[str, array[Any]] = {}
        self._blobs: dict[str, BlobBuilder] = {}
        self._cats: dict[str, tuple[dict[str, int], array[int]]] = {}
        self._guids: dict[str, bytearray] = {}
        for col in table_type.COLUMNS:
            if col.kind in ("text", "bytes"):
                self._blobs[col.name] = BlobBuilder(text=col.kind == "text")
            elif col.kind == "cat":
                self._cats[col.name] = ({}, array("i"))
            elif col.kind == "guid":
                self._guids[col.name] = bytearray()
            else:
                self._numbers[col.name] = array(_ARRAY_CODES[col.kind])

    def add(self, values: Mapping[str, Any]) -> int:
        """Append one row (every column named); returns its row number."""
        for name, numbers in self._numbers.items():
            numbers.append(values[name])
        for name, blob in self._blobs.items():
            blob.append(values[name])
        for name, (vocab, codes) in self._cats.items():
            value = values[name]
            codes.append(-1 if value is None else vocab.setdefault(value, len(vocab)))
        for name, guids in self._guids.items():
            value = values[name]
            if value is None:
                guids.extend(_NO_GUID)
            elif len(value) == 16:
                guids.extend(value)
            else:
                raise ValueError(f"{name}: a GUID has 16 bytes, got {len(value)}")
        self.rows += 1
        return self.rows - 1

    def extend(self, values: Mapping[str, Sequence[Any] | np.ndarray[Any, Any]]) -> int:
        """Append many rows at once, column by column (every column named, equally long); returns
        the row number of the first. Numbers may come as lists or numpy arrays."""
        count = len(next(iter(values.values()))) if values else 0
        if any(len(column) != count for column in values.values()):
            raise ValueError("extend: columns of different lengths")
        for name, numbers in self._numbers.items():
            column = values[name]
            if isinstance(column, np.ndarray):
                numbers.frombytes(np.ascontiguousarray(column, dtype=numbers.typecode).tobytes())
            else:
                numbers.extend(column)
        for name, blob in self._blobs.items():
            blob.extend(values[name])
        for name, (vocab, codes) in self._cats.items():
            codes.extend([-1 if v is None else vocab.setdefault(v, len(vocab)) for v in values[name]])
        for name, guids in self._guids.items():
            column = values[name]
            bad = next((v for v in column if v is not None and len(v) != 16), None)
            if bad is not None:
                raise ValueError(f"{name}: a GUID has 16 bytes, got {len(bad)}")
            guids.extend(b"".join(_NO_GUID if v is None else v for v in column))
        first = self.rows
        self.rows += count
        return first

    def columns(self) -> dict[str, ColumnValue]:
        kinds = {c.name: c.kind for c in self.table_type.COLUMNS}
        result: dict[str, ColumnValue] = {}
        for name, numbers in self._numbers.items():
            dtype = NUMPY_KINDS[kinds[name]]
            raw = np.frombuffer(numbers, dtype=np.int8 if kinds[name] == "bool" else dtype)
            result[name] = raw.astype(np.bool_) if kinds[name] == "bool" else raw
        for name, guids in self._guids.items():
            result[name] = np.frombuffer(guids, dtype=GUID)
        for name, (vocab, codes) in self._cats.items():
            result[name] = Categorical(np.frombuffer(codes, dtype=np.int32), tuple(vocab))
        for name, blob in self._blobs.items():
            result[name] = blob.build()
        return result


_NO_GUID = bytes(16)
