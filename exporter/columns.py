"""Compact columns for tables of hundreds of thousands of users.

A Python object per user and field costs 50-100 bytes of overhead; a 500,000-user estate held as
objects needs gigabytes and makes every garbage collection crawl over millions of objects. Tables
therefore keep each field as one numpy array, or, for text, as one UTF-8 buffer plus offsets
(:class:`Blob`). Joins compare 64-bit keys (:func:`text_keys`, :func:`guid_keys`) through sorted
indexes (:class:`SortedIndex`), so a whole estate is evaluated with a handful of vectorised
operations instead of a Python loop per user.

Keys are hashes: two different identifiers share a key with probability 2^-64 per pair (about
1e-7 for a million users); the identifiers themselves are kept for display and look-ups.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from exporter.turns import step_aside

Array = npt.NDArray[np.generic]
U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]
Floats = npt.NDArray[np.float64]

NO_KEY = 0  # the key of a missing identifier; never matches anything
GUID = np.dtype("V16")
ROW = np.int64  # row numbers; -1 means "no row"
# Large buffers are copied this much at a time (see join_buffers).
COPY_STEP = 1 << 18
MAX_TEXT_BYTES = 1024  # longer backend values are cut: no identifier is that long, garbage can be


# ------------------------------------------------------------------------------------ keys
_NO_DIGEST = bytes(8)


def text_key(value: str | None, *, fold: bool = True) -> int:
    """The key of one identifier, as :func:`text_keys` computes it (cheap: one hash, no numpy)."""
    if not value:
        return NO_KEY
    digest = hashlib.blake2b(
        (value.casefold() if fold else value).encode("utf-8", "surrogatepass"), digest_size=8
    ).digest()
    return int.from_bytes(digest, "little") or 1  # 0 is reserved for "no identifier"


def text_keys(values: Iterable[str | None], *, fold: bool = True) -> U64:
    """64-bit keys of text identifiers; case-insensitive (casefolded) unless ``fold`` is false.

    Missing or empty values get NO_KEY. Deterministic across processes (unlike ``hash()``), so keys
    can be persisted and compared between the exporter and the ``trace`` command. Equal to
    :func:`text_key` value by value.
    """
    hash_ = hashlib.blake2b
    texts = values if isinstance(values, list) else list(values)
    if fold:
        digests = [
            hash_(v.casefold().encode("utf-8", "surrogatepass"), digest_size=8).digest() if v else _NO_DIGEST
            for v in texts
        ]
    else:
        digests = [
            hash_(v.encode("utf-8", "surrogatepass"), digest_size=8).digest() if v else _NO_DIGEST
            for v in texts
        ]
    return _keys_of(digests, texts)


def bytes_keys(values: Sequence[bytes | None]) -> U64:
    """:func:`text_keys` with ``fold=False`` of values already encoded as UTF-8 (no decoding)."""
    blake2b = hashlib.blake2b
    digests = [blake2b(v, digest_size=8).digest() if v else _NO_DIGEST for v in values]
    return _keys_of(digests, values)


def _keys_of(digests: list[bytes], values: Sequence[object]) -> U64:
    """Keys from 8-byte digests (the all-zero digest stands for a missing value)."""
    keys = np.frombuffer(b"".join(digests), dtype="<u8").astype(np.uint64)
    zero = np.flatnonzero(keys == NO_KEY)
    if len(zero):
        # A present value whose digest is 0 (probability 2^-64) gets key 1, as in text_key.
        keys[[int(i) for i in zero if values[int(i)]]] = 1
    return keys


def guid_keys(guids: Array, present: Bools | None = None) -> U64:
    """64-bit keys of 16-byte GUIDs (vectorised); rows where ``present`` is false get NO_KEY."""
    if len(guids) == 0:
        return np.zeros(0, dtype=np.uint64)
    halves = np.ascontiguousarray(guids).view("<u8").reshape(-1, 2)
    with np.errstate(over="ignore"):
        mixed = halves[:, 0] * np.uint64(0x9E3779B97F4A7C15) ^ halves[:, 1]
        mixed ^= mixed >> np.uint64(31)
        mixed *= np.uint64(0xBF58476D1CE4E5B9)
        mixed ^= mixed >> np.uint64(29)
    keys = mixed.astype(np.uint64)
    keys[keys == NO_KEY] = 1
    if present is not None:
        keys[~present] = NO_KEY
    return keys


def guid_array(values: Sequence[bytes | None]) -> tuple[Array, Bools]:
    """A GUID column and its "present" mask from 16-byte values (None for missing)."""
    raw = b"".join(v if v is not None else bytes(16) for v in values)
    present = np.fromiter((v is not None for v in values), dtype=np.bool_, count=len(values))
    return np.frombuffer(raw, dtype=GUID).copy(), present


def guid_bytes_at(column: Array, row: int) -> bytes:
    return bytes(column[row].tobytes())


def guid_order_key(guids: Array) -> tuple[U64, U64]:
    """(high, low) halves as big-endian integers: sorting by them sorts GUIDs as their bytes."""
    halves = np.ascontiguousarray(guids).view(">u8").reshape(-1, 2)
    return halves[:, 0].astype(np.uint64), halves[:, 1].astype(np.uint64)


# ------------------------------------------------------------------------------------ text
def _clip(value: bytes, text: bool = True) -> bytes:
    """At most MAX_TEXT_BYTES; text is cut at a character boundary, raw bytes just cut."""
    if len(value) <= MAX_TEXT_BYTES:
        return value
    if not text:
        return value[:MAX_TEXT_BYTES]
    return value[:MAX_TEXT_BYTES].decode("utf-8", "ignore").encode("utf-8")


@dataclass(frozen=True, eq=False)
class Blob:
    """Variable-length values (UTF-8 text or raw bytes) in one buffer with offsets; None allowed."""

    data: bytes | bytearray | memoryview  # a memoryview when restored from the state file (no copy)
    offsets: I64  # len n + 1, non-decreasing, offsets[0] == 0, offsets[-1] == len(data)
    nulls: Bools | None = None  # True where the value is None (no array when nothing is None)
    text: bool = True

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def raw(self, row: int) -> bytes | None:
        if self.nulls is not None and self.nulls[row]:
            return None
        return bytes(self.data[int(self.offsets[row]) : int(self.offsets[row + 1])])

    def get(self, row: int) -> str | None:
        value = self.raw(row)
        if value is None:
            return None
        return value.decode("utf-8", "replace")

    def value(self, row: int) -> str | bytes | None:
        return self.get(row) if self.text else self.raw(row)

    def values(self) -> list[str | bytes | None]:
        return [self.value(i) for i in range(len(self))]

    def null_mask(self) -> Bools:
        if self.nulls is None:
            return np.zeros(len(self), dtype=np.bool_)
        return self.nulls

    def take(self, rows: I64) -> Blob:
        """The values of ``rows`` (in that order) as a new Blob.

        Rows that ascend (a table minus some changed rows, the usual case) are copied run by run,
        one slice per run of consecutive rows; other orders value by value. Neither builds an index
        per byte, so taking from a large column costs about its own size in memory.
        """
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return Blob(b"", np.zeros(1, dtype=np.int64), None, self.text)
        starts, ends = _runs(rows)
        return self._take_runs(rows, starts, ends)

    def _take_runs(self, rows: I64, starts: I64, ends: I64) -> Blob:
        """``take`` of rows that form a few ascending runs (a table minus a few changed rows): the
        text of each run is copied as one slice."""
        view = memoryview(self.data)
        data = join_buffers(
            view[int(self.offsets[a]) : int(self.offsets[b + 1])] for a, b in zip(starts, ends, strict=True)
        )
        lengths = self.offsets[1:][rows] - self.offsets[:-1][rows]
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        nulls = None if self.nulls is None else self.nulls[rows]
        if nulls is not None and not nulls.any():
            nulls = None
        return Blob(data, offsets, nulls, self.text)

    @staticmethod
    def concat(parts: Sequence[Blob]) -> Blob:
        text = parts[0].text if parts else True
        offsets = [np.zeros(1, dtype=np.int64)]
        base = 0
        for part in parts:
            offsets.append(part.offsets[1:] + base)
            base += len(part.data)
        any_nulls = any(p.nulls is not None for p in parts)
        nulls = np.concatenate([p.null_mask() for p in parts]) if any_nulls else None
        return Blob(join_buffers(p.data for p in parts), np.concatenate(offsets), nulls, text)

    @staticmethod
    def from_values(values: Iterable[str | bytes | None], *, text: bool = True) -> Blob:
        builder = BlobBuilder(text=text)
        for value in values:
            builder.append(value)
        return builder.build()


def join_buffers(parts: Iterable[bytes | bytearray | memoryview]) -> bytearray:
    """The parts one after another, copied at most ``COPY_STEP`` bytes at a time.

    ``b"".join`` gives the GIL up while it copies only when every part is a ``bytes``; the columns
    of a table read back from a refresh child or the state file are memoryviews, and joining one
    (tens of MiB, the new buffer's page faults included) held the GIL for 25-50 ms while a refresh
    merged its changes into a held table: every scrape waited that long (GIL probe, 500,000 users).
    Between two steps of 256 KiB (a fraction of a millisecond) the threads answering scrapes get
    their turn, and the copy steps aside while they answer (exporter.turns).
    """
    joined = bytearray()
    for part in parts:
        view = memoryview(part).cast("B")
        for start in range(0, len(view), COPY_STEP):
            step_aside()
            joined += view[start : start + COPY_STEP]
    return joined


def same_bytes(first: bytes | bytearray | memoryview, second: bytes | bytearray | memoryview) -> bool:
    """Whether two buffers hold the same bytes. Comparing memoryviews with ``==`` goes byte by byte
    with the GIL held (65 ms for a 15 MiB column); numpy compares a step at a time without it."""
    a, b = memoryview(first).cast("B"), memoryview(second).cast("B")
    if len(a) != len(b):
        return False
    for start in range(0, len(a), COPY_STEP):
        step_aside()
        end = start + COPY_STEP
        if not np.array_equal(np.frombuffer(a[start:end], np.uint8), np.frombuffer(b[start:end], np.uint8)):
            return False
    return True


def _runs(rows: I64) -> tuple[I64, I64]:
    """(first row, last row) of each run of consecutive rows (in ``rows``' order)."""
    breaks = np.flatnonzero(np.diff(rows) != 1)
    starts = np.concatenate((rows[:1], rows[breaks + 1]))
    ends = np.concatenate((rows[breaks], rows[-1:]))
    return starts.astype(np.int64), ends.astype(np.int64)


class BlobBuilder:
    """Appends values one at a time straight into one growing buffer (no Python object per value)."""

    def __init__(self, *, text: bool = True) -> None:
        self.text = text
        self._data = bytearray()
        self._offsets = array("q", [0])
        self._nulls: bytearray | None = None

    def append(self, value: str | bytes | None) -> None:
        if value is None:
            if self._nulls is None:
                self._nulls = bytearray(len(self._offsets) - 1)
            self._nulls.append(1)
        else:
            encoded = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value
            self._data += encoded if len(encoded) <= MAX_TEXT_BYTES else _clip(encoded, self.text)
            if self._nulls is not None:
                self._nulls.append(0)
        self._offsets.append(len(self._data))

    def extend(self, values: Iterable[str | bytes | None]) -> None:
        """Append many values (as :meth:`append` one by one, with less work per value)."""
        data, offsets = self._data, self._offsets
        for value in values:
            if value is None:
                if self._nulls is None:
                    self._nulls = bytearray(len(offsets) - 1)
                self._nulls.append(1)
            else:
                encoded = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value
                data += encoded if len(encoded) <= MAX_TEXT_BYTES else _clip(encoded, self.text)
                if self._nulls is not None:
                    self._nulls.append(0)
            offsets.append(len(data))

    def build(self) -> Blob:
        offsets = (
            np.frombuffer(self._offsets, dtype=np.int64) if len(self._offsets) else np.zeros(1, np.int64)
        )
        nulls = None
        if self._nulls is not None and any(self._nulls):
            nulls = np.frombuffer(self._nulls, dtype=np.bool_)
        data, self._data = self._data, bytearray()  # the Blob owns the buffer now: no copy
        return Blob(data, offsets, nulls, self.text)


# ------------------------------------------------------------------------------------ joins
_INT32_ROWS = 2**31


@dataclass(frozen=True, eq=False)
class SortedIndex:
    """Rows of a table ordered by one key column, for vectorised look-ups.

    Rows without a key (NO_KEY) are left out. Among rows sharing a key the first in ``order`` wins
    a look-up, so a caller that wants a preference (e.g. "the record that got furthest") passes a
    ``preference`` ranking: lower ranks come first.
    """

    keys: U64  # sorted
    order: I64  # the row of each entry of `keys` (int32 when the table has fewer than 2^31 rows)

    @staticmethod
    def build(keys: U64, preference: npt.NDArray[np.int64] | None = None) -> SortedIndex:
        step_aside()
        rows = np.flatnonzero(keys != NO_KEY).astype(np.int64)
        if preference is not None:
            rows = rows[np.argsort(preference[rows], kind="stable")]
        ordered = rows[np.argsort(keys[rows], kind="stable")]
        # Rows as int32 where they fit: half the memory of the order array, and an estate holds a
        # dozen indexes (twice while a refresh's new tables are evaluated beside the served ones).
        order = ordered.astype(np.int32) if len(keys) < _INT32_ROWS else ordered
        return SortedIndex(keys=keys[ordered], order=order)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.keys)

    def lookup(self, probe: U64) -> I64:
        """For each probe key, the preferred row with that key, or -1."""
        step_aside()
        result = np.full(len(probe), -1, dtype=np.int64)
        if len(self.keys) == 0 or len(probe) == 0:
            return result
        position = np.searchsorted(self.keys, probe, side="left")
        clipped = np.minimum(position, len(self.keys) - 1)
        hit = (self.keys[clipped] == probe) & (probe != NO_KEY)
        result[hit] = self.order[clipped[hit]]
        return result

    def lookup_sorted(self, probe: SortedIndex, size: int) -> I64:
        """Like :meth:`lookup` for every row of another table (``size`` rows) given that table's
        own index of the probe key: both sides sorted makes the search cache-friendly."""
        step_aside()
        result = np.full(size, -1, dtype=np.int64)
        if len(self.keys) == 0 or len(probe.keys) == 0:
            return result
        position = np.searchsorted(self.keys, probe.keys, side="left")
        clipped = np.minimum(position, len(self.keys) - 1)
        hit = self.keys[clipped] == probe.keys
        result[probe.order[hit]] = self.order[clipped[hit]]
        return result

    def contains(self, probe: U64) -> Bools:
        if len(self.keys) == 0 or len(probe) == 0:
            return np.zeros(len(probe), dtype=np.bool_)
        position = np.searchsorted(self.keys, probe, side="left")
        clipped = np.minimum(position, len(self.keys) - 1)
        return (self.keys[clipped] == probe) & (probe != NO_KEY)

    def rows_with(self, key: int) -> I64:
        """Every row with this key, in preference order."""
        if key == NO_KEY or len(self.keys) == 0:
            return np.zeros(0, dtype=np.int64)
        target = np.uint64(key)
        low = np.searchsorted(self.keys, target, side="left")
        high = np.searchsorted(self.keys, target, side="right")
        return self.order[low:high].astype(np.int64)


def safe_take(values: Array, rows: I64, fill: Any) -> Array:
    """values[rows] where rows may be -1 (giving ``fill``)."""
    if len(values) == 0:
        return np.full(len(rows), fill, dtype=values.dtype)
    taken = values[np.maximum(rows, 0)]
    if (rows < 0).any():
        taken = taken.copy()
        taken[rows < 0] = fill
    return taken
