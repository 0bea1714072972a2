"""Compact record stores of the Graph simulator: users (with the change log delta queries read) and devices.

A record is a JSON object with a string ``id``. Each one is kept as a single JSON array of its values in
the store's column order: 500,000 users as Python dicts take about 1 GB, as encoded arrays about a quarter
of that, and a page of 999 still decodes in a few milliseconds. A property a record lacks reads as null
(once some other record has it).

Rows are also deflated with a preset dictionary made of the store's first rows (records of a tenant look
alike): a synthetic user then takes about 60 bytes instead of 600, and inflating costs about a microsecond.

Records sit in slots in listing order. Removing one leaves a hole (None), so the slot numbers that paging
cursors hold stay valid; only :meth:`RecordStore.replace` renumbers, and bumps ``layout`` so that cursors
taken before can tell.
"""

from __future__ import annotations

import bisect
import json
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_PACKED = b"\x00"  # marks a deflated row (a plain row is a JSON array and starts with "[")
_DICTIONARY_AFTER = 16  # rows stored plain before the preset dictionary is taken from the first half
_WBITS = -12  # raw deflate with a 4 KiB window: small state, so that packing a row stays cheap


def index_key(value: Any) -> Any:
    """How an indexed value is compared: Graph matches directory strings case-insensitively."""
    return value.lower() if isinstance(value, str) else value


class RecordStore:
    """Records in listing order, stored compactly, with lazily built equality indexes per property."""

    def __init__(self, records: Iterable[Mapping[str, Any]] = ()) -> None:
        self.columns: list[str] = []
        self._column_of: dict[str, int] = {}
        self._rows: list[bytes | None] = []
        self._slot_of: dict[str, int] = {}
        self._indexes: dict[str, dict[Any, str | set[str]]] = {}
        self._zdict: bytes | None = None
        self._packer: Any = None  # a zlib compressor primed with the dictionary
        self.layout = 0
        for record in records:
            self._append(record)

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return len(self._slot_of)

    def __contains__(self, record_id: object) -> bool:
        return record_id in self._slot_of

    @property
    def slot_count(self) -> int:
        return len(self._rows)

    def get(self, record_id: str) -> dict[str, Any] | None:
        slot = self._slot_of.get(record_id)
        return None if slot is None else self.decode(self._rows[slot])

    def slot_of(self, record_id: str) -> int | None:
        return self._slot_of.get(record_id)

    def row(self, slot: int) -> bytes | None:
        return self._rows[slot] if 0 <= slot < len(self._rows) else None

    def decode(self, row: bytes | None) -> dict[str, Any]:
        assert row is not None
        return dict(zip(self.columns, json.loads(self._unpack(row)), strict=False))

    def project(self, row: bytes, fields: Iterable[str]) -> dict[str, Any]:
        """The named properties of a row (null where the record has none), in the order asked."""
        values = json.loads(self._unpack(row))
        count = len(values)
        projected: dict[str, Any] = {}
        for name in fields:
            column = self._column_of.get(name)
            projected[name] = values[column] if column is not None and column < count else None
        return projected

    def records(self) -> list[dict[str, Any]]:
        return [self.decode(row) for row in self._rows if row is not None]

    def ids(self) -> list[str]:
        return list(self._slot_of)

    def live_slots(self, start: int = 0) -> Iterator[int]:
        rows = self._rows
        for slot in range(max(start, 0), len(rows)):
            if rows[slot] is not None:
                yield slot

    def page(self, start: int, size: int) -> tuple[list[bytes], int | None]:
        """Up to `size` rows from slot `start` on, and the slot where the next page starts (None: no more)."""
        rows = self._rows
        found: list[bytes] = []
        slot = max(start, 0)
        end = len(rows)
        while slot < end and len(found) < size:
            row = rows[slot]
            if row is not None:
                found.append(row)
            slot += 1
        while slot < end and rows[slot] is None:
            slot += 1
        return found, (slot if slot < end else None)

    # ------------------------------------------------------------------ indexes
    # An index maps a value to the one id that has it (a str) or, when several do, to a set of ids: a
    # set per entry would cost ~200 bytes, for 500,000 mostly unique values ~100 MB.
    def lookup(self, prop: str, value: Any) -> set[str]:
        """Ids of the records whose `prop` equals `value` (strings compared case-insensitively)."""
        if prop == "id":  # ids are the store's keys; Graph's are lower-case GUIDs
            return {key for key in {value, index_key(value)} if isinstance(key, str) and key in self._slot_of}
        try:
            found = self._index(prop).get(index_key(value))
        except TypeError:
            return set()
        return set() if found is None else ({found} if isinstance(found, str) else set(found))

    def _index(self, prop: str) -> dict[Any, str | set[str]]:
        index = self._indexes.get(prop)
        if index is None:
            index = {}
            column = self._column_of.get(prop)
            if column is not None:
                for record_id, slot in self._slot_of.items():
                    values = json.loads(self._unpack(self._rows[slot] or b"[]"))
                    self._index_add(index, record_id, values[column] if column < len(values) else None)
            self._indexes[prop] = index
        return index

    @staticmethod
    def _index_add(index: dict[Any, str | set[str]], record_id: str, value: Any) -> None:
        try:
            key = index_key(value)
            found = index.get(key)
        except TypeError:  # lists and objects are not indexed
            return
        if found is None:
            index[key] = record_id
        elif isinstance(found, str):
            if found != record_id:
                index[key] = {found, record_id}
        else:
            found.add(record_id)

    @staticmethod
    def _index_remove(index: dict[Any, str | set[str]], record_id: str, value: Any) -> None:
        try:
            key = index_key(value)
            found = index.get(key)
        except TypeError:
            return
        if found == record_id:
            del index[key]
        elif isinstance(found, set):
            found.discard(record_id)
            if len(found) == 1:
                index[key] = next(iter(found))

    def _reindex(self, record_id: str, old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> None:
        for prop, index in self._indexes.items():
            if old is not None:
                self._index_remove(index, record_id, old.get(prop))
            if new is not None:
                self._index_add(index, record_id, new.get(prop))

    # ------------------------------------------------------------------ writing
    def encode(self, record: Mapping[str, Any]) -> bytes:
        for name in record:
            if name not in self._column_of:
                self._column_of[name] = len(self.columns)
                self.columns.append(name)
        values = [record.get(name) for name in self.columns]
        return _ENCODER.encode(values).encode("utf-8")

    def _pack(self, plain: bytes) -> bytes:
        if self._packer is None:
            return plain
        packer = self._packer.copy()  # copying a primed compressor beats loading the dictionary anew
        return _PACKED + packer.compress(plain) + packer.flush()

    def _unpack(self, row: bytes) -> bytes:
        if not row.startswith(_PACKED):
            return row
        assert self._zdict is not None
        return zlib.decompressobj(_WBITS, self._zdict).decompress(row[1:])

    def put(self, record: Mapping[str, Any]) -> dict[str, Any] | None:
        """Insert or replace a record; the previous version, or None if it is new."""
        record_id = _record_id(record)
        row = self._pack(self.encode(record))
        slot = self._slot_of.get(record_id)
        if slot is None:
            self._append_row(record_id, row)
            self._reindex(record_id, None, record)
            return None
        old = self.decode(self._rows[slot])
        self._rows[slot] = row
        self._reindex(record_id, old, record)
        return old

    def remove(self, record_id: str) -> dict[str, Any] | None:
        slot = self._slot_of.pop(record_id, None)
        if slot is None:
            return None
        old = self.decode(self._rows[slot])
        self._rows[slot] = None
        self._reindex(record_id, old, None)
        return old

    def replace(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Hold exactly these records, in this order (slots are renumbered)."""
        self._rows = []
        self._slot_of = {}
        self._indexes = {}
        self.layout += 1
        for record in records:
            self._append(record)

    def _append(self, record: Mapping[str, Any]) -> None:
        record_id = _record_id(record)
        if record_id in self._slot_of:
            raise ValueError(f"duplicate id {record_id!r}")
        self._append_row(record_id, self._pack(self.encode(record)))

    def _append_row(self, record_id: str, row: bytes) -> None:
        self._slot_of[record_id] = len(self._rows)
        self._rows.append(row)
        if self._zdict is None and len(self._rows) >= _DICTIONARY_AFTER:
            sample = [row for row in self._rows[:_DICTIONARY_AFTER] if row is not None]
            if len(sample) >= _DICTIONARY_AFTER // 2:
                self._zdict = b"".join(sample[: _DICTIONARY_AFTER // 2])[-(1 << -_WBITS) :]
                self._packer = zlib.compressobj(
                    1, zlib.DEFLATED, _WBITS, 3, zlib.Z_DEFAULT_STRATEGY, self._zdict
                )


@dataclass(frozen=True)
class Change:
    """One entry of the change log: what happened to a user at a version."""

    version: int
    user_id: str
    kind: str  # "created", "changed", "soft_deleted", "hard_deleted", "restored"
    properties: frozenset[str] = frozenset()


@dataclass(frozen=True)
class PendingChange:
    """A user's changes over a version window, as a delta round reports them."""

    user_id: str
    state: str  # "created" (full object), "changed" (properties), "soft_deleted", "hard_deleted"
    properties: frozenset[str]


class UserStore(RecordStore):
    """The users of a tenant, plus soft-deleted users and a change log with a version per change.

    Changes to `untracked` properties change the stored user but are not logged, so delta queries never
    surface them (Microsoft documents this for ``licenseAssignmentStates``).
    """

    def __init__(self, records: Iterable[Mapping[str, Any]] = ()) -> None:
        super().__init__(records)
        self.version = 0
        self._log_versions: list[int] = []
        self._log: list[Change] = []
        self._user_versions: dict[str, int] = {}
        self._deleted: dict[str, tuple[int, bytes]] = {}  # soft-deleted: id -> (old slot, row)

    def user_version(self, user_id: str) -> int:
        """The version of the user's last tracked change (0: unchanged since it was loaded)."""
        return self._user_versions.get(user_id, 0)

    def is_soft_deleted(self, user_id: str) -> bool:
        return user_id in self._deleted

    @property
    def deleted_count(self) -> int:
        return len(self._deleted)

    # ------------------------------------------------------------------ mutations (each logs its change)
    def upsert(self, record: Mapping[str, Any], untracked: frozenset[str]) -> Change | None:
        user_id = _record_id(record)
        if user_id in self._deleted:
            self._deleted.pop(user_id)
        old = self.put(record)
        if old is None:
            return self._log_change(user_id, "created", frozenset(record))
        changed = frozenset(name for name in {*old, *record} if old.get(name) != record.get(name))
        return self._log_change(user_id, "changed", changed - untracked) if changed - untracked else None

    def patch(self, user_id: str, props: Mapping[str, Any], untracked: frozenset[str]) -> Change | None:
        current = self.get(user_id)
        if current is None:
            raise KeyError(user_id)
        return self.upsert({**current, **props, "id": user_id}, untracked)

    def delete(self, user_id: str, *, hard: bool) -> Change:
        slot = self.slot_of(user_id)
        if slot is not None:
            row = self.row(slot)
            self.remove(user_id)
            if not hard:
                assert row is not None
                self._deleted[user_id] = (slot, row)
                return self._log_change(user_id, "soft_deleted", frozenset())
        elif user_id in self._deleted:
            if not hard:
                raise KeyError(f"{user_id} is already soft-deleted")
            del self._deleted[user_id]
        else:
            raise KeyError(user_id)
        return self._log_change(user_id, "hard_deleted", frozenset())

    def restore(self, user_id: str) -> Change:
        slot, row = self._deleted.pop(user_id)
        if self.row(slot) is None and slot < self.slot_count:
            self._rows[slot] = row
            self._slot_of[user_id] = slot
        else:
            self._append_row(user_id, row)
        self._reindex(user_id, None, self.decode(row))
        return self._log_change(user_id, "restored", frozenset())

    def replace_users(self, records: Iterable[Mapping[str, Any]], untracked: frozenset[str]) -> None:
        """Hold exactly these users in this order; what differs is logged like individual mutations."""
        new_records = [dict(record) for record in records]
        new_ids = {_record_id(record) for record in new_records}
        before = {user_id: self.get(user_id) for user_id in self.ids()}
        self.replace(new_records)
        self._deleted.clear()
        for user_id in before.keys() - new_ids:
            self._log_change(user_id, "hard_deleted", frozenset())
        for record in new_records:
            old = before.get(record["id"])
            if old is None:
                self._log_change(record["id"], "created", frozenset(record))
                continue
            changed = frozenset(n for n in {*old, *record} if old.get(n) != record.get(n)) - untracked
            if changed:
                self._log_change(record["id"], "changed", changed)

    def _log_change(self, user_id: str, kind: str, properties: frozenset[str]) -> Change:
        self.version += 1
        change = Change(self.version, user_id, kind, properties)
        self._log_versions.append(self.version)
        self._log.append(change)
        self._user_versions[user_id] = self.version
        return change

    # ------------------------------------------------------------------ delta
    def version_before(self, version: int, replay: int) -> int:
        """A version `replay` logged changes before `version` (to replay changes already delivered)."""
        position = bisect.bisect_right(self._log_versions, version) - replay
        return self._log_versions[position - 1] if position > 0 else 0

    def pending(self, since: int, until: int, ids: frozenset[str] | None = None) -> list[PendingChange]:
        """Each user changed in versions (since, until], by its state now, in order of first change."""
        start = bisect.bisect_right(self._log_versions, since)
        stop = bisect.bisect_right(self._log_versions, until)
        order: dict[str, list[Change]] = {}
        for change in self._log[start:stop]:
            if ids is None or change.user_id in ids:
                order.setdefault(change.user_id, []).append(change)
        result = []
        for user_id, changes in order.items():
            if user_id in self:
                recreated = any(c.kind in {"created", "restored"} for c in changes)
                props = frozenset().union(*(c.properties for c in changes))
                result.append(PendingChange(user_id, "created" if recreated else "changed", props))
            elif user_id in self._deleted:
                result.append(PendingChange(user_id, "soft_deleted", frozenset()))
            else:
                result.append(PendingChange(user_id, "hard_deleted", frozenset()))
        return result


def _record_id(record: Mapping[str, Any]) -> str:
    record_id = record.get("id")
    if not isinstance(record_id, str) or not record_id:
        raise ValueError(f"a record needs a string id: {dict(record)!r:.200}")
    return record_id
