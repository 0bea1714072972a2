"""The ConfigMgr (MECM/SCCM) site database source.

One refresh opens a fresh ODBC connection, runs a handful of queries and closes it again:

1. ``v_Collection``: the configured ``intune_collection_ids`` must exist and be user collections;
2. a change check (PostgreSQL and SQL Server): one aggregate row summarising v_R_User and the
   memberships; when it equals the one stored with the previous table, only the components are read
   and the previous table itself is returned, so the engine neither re-evaluates nor rewrites state;
3. ``v_FullCollectionMembership``: the user (ResourceType 4) members of those collections;
4. ``v_R_User``: every user record, streamed with ``fetchmany`` into the table builder;
5. ``v_ComponentSummarizer``: the status of the Intune connector and discovery components.

A full read whose result equals the previous table (every column, the components) also returns the
previous table, so "nothing changed" costs no evaluation and no state write on any database.

The SQL is deliberately plain (``?`` parameters, no TOP/NOLOCK/brackets) so that the same queries
run on SQL Server, SQLite and PostgreSQL; column names are matched case-insensitively through
``cursor.description`` (the PostgreSQL driver lower-cases them) and every value is normalised in
Python, whatever type the driver hands back. Text longer than ``MAX_TEXT_BYTES`` is cut (no
identifier is that long; garbage can be) and counted in one warning per refresh.

Deadlines: ``refresh(previous, deadline)`` and ``find_related(..., deadline)`` end by ``deadline``.
Every statement gets the smaller of ``query_timeout`` and the time left, in the form the driver
honours (measured with the drivers on Debian 12):

- SQL Server drivers (Microsoft, FreeTDS) and others: ``SQL_ATTR_QUERY_TIMEOUT``
  (``connection.timeout``), whole seconds;
- PostgreSQL (psqlODBC rejects SQL_ATTR_QUERY_TIMEOUT): ``SET statement_timeout`` before each
  statement; it also ends waits for a locked table;
- SQLite (sqliteodbc accepts SQL_ATTR_QUERY_TIMEOUT and ignores it; a locked database waits for the
  driver's busy timeout, 100 s by default, at connect and again (once or twice) per statement, and
  SQLCancel does not interrupt that wait): the connection is opened with ``Timeout=1``, and a
  statement that meets a lock waits in short ``PRAGMA busy_timeout`` slices and is retried until its
  limit is spent (a stop is noticed between two slices). SQLCancel does end a running query.

A watchdog stops the session shortly before the deadline, and :meth:`ConfigMgrSource.abort` (the
engine calls it from another thread at the deadline) does the same: SQLCancel on the running
statement (PostgreSQL and SQLite end a running query at once), then, if the statement is still
blocked a moment later (a server that stopped answering ignores the cancel, and SQLDisconnect waits
for the blocked call), the connection's TCP socket is shut down, which makes the driver's blocked
read fail at once. ODBC does not expose that socket, so it is identified when the connection is
opened: the one stream socket the driver opened meanwhile (Linux ``/proc/self/fd``; where it cannot
be told apart, only the cancel is tried). Between fetched batches the deadline is checked too. The
next refresh always opens a new connection.

Bad data policy: a user or component row whose values cannot be converted (a GUID that is not a
GUID, a date that is not a date, a NULL ResourceID) is skipped, counted in
:attr:`ConfigMgrSource.last_skipped_rows` and reported in one warning per refresh. A result set
that is malformed as a whole (a required column missing, or rows read but none convertible) fails
the refresh with reason ``data``, as does a configured collection id that does not exist or that
is a device collection.

``pyodbc`` is imported on first use, so the rest of the exporter runs on a machine without
unixODBC. Error messages name the server and database; every message goes through the one secret
mask (the connection string, any password in it, the configured password).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import math
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from types import ModuleType
from typing import Any, Literal

import numpy as np

from exporter.columns import GUID as GUID_DTYPE
from exporter.columns import MAX_TEXT_BYTES, Blob, guid_keys, same_bytes, text_keys
from exporter.config import ConfigMgrConfig
from exporter.ids import epoch_seconds, guid_bytes, guid_text, sid_text
from exporter.model import CmComponent, CmTable, CmTableBuilder, CmUser, ErrorReason, SourceData, SourceKind
from exporter.odbc import attribute_value as _first
from exporter.odbc import (
    build_connection_string,
    connection_target,
    parse_connection_string,
)
from exporter.secrets import SecretMask
from exporter.sources.base import ConfigurationError, SourceError

log = logging.getLogger(__name__)

USER_RESOURCE_TYPE = 4
USER_COLLECTION_TYPE = 1
DEVICE_COLLECTION_TYPE = 2
# v_ComponentSummarizer keeps one row per tally interval; this one counts messages since midnight.
SINCE_MIDNIGHT_TALLY = "0001128000100008"
COMPONENT_NAMES: tuple[str, ...] = (
    "SMS_CLOUD_USERSYNC",
    "SMS_DMP_UPLOADER",
    "SMS_DMP_DOWNLOADER",
    "SMS_OUTGOING_CONTENT_MANAGER",
    "SMS_AD_USER_DISCOVERY_AGENT",
    "SMS_AZUREAD_DISCOVERY_AGENT",
    "SMS_COLLECTION_EVALUATOR",
)
USER_COLUMNS: tuple[str, ...] = (
    "ResourceID",
    "Unique_User_Name0",
    "User_Principal_Name0",
    "SID0",
    "Object_GUID0",
    "Creation_Date0",
    "CloudUserId",
)
COLLECTION_COLUMNS: tuple[str, ...] = ("CollectionID", "CollectionType")
MEMBER_COLUMNS: tuple[str, ...] = ("CollectionID", "ResourceID")
COMPONENT_COLUMNS: tuple[str, ...] = ("SiteCode", "MachineName", "ComponentName", "Status", "TallyInterval")
# Values per IN (...) list of a look-up: far below SQL Server's 2100 parameters per statement.
LOOKUP_CHUNK = 200

# Stop this long before the deadline (at most), so that the source's own error, not the engine's
# "did not finish", reports what was running; a tenth of the budget for short budgets.
DEADLINE_MARGIN = 1.0
DEADLINE_MARGIN_SHARE = 0.1
# After a cancel, how long a blocked statement may take to return before its socket is shut down.
CANCEL_GRACE = 0.5
# SQLite: the longest single wait for a lock; the source retries until the statement's limit is spent.
SQLITE_LOCK_SLICE = 0.25


def _placeholders(count: int) -> str:
    return ", ".join("?" * count)


def collections_sql(count: int) -> str:
    return (
        "SELECT CollectionID, CollectionType FROM v_Collection"
        f" WHERE CollectionID IN ({_placeholders(count)})"
    )


def members_sql(count: int) -> str:
    return (
        "SELECT DISTINCT CollectionID, ResourceID FROM v_FullCollectionMembership"
        f" WHERE ResourceType = {USER_RESOURCE_TYPE} AND CollectionID IN ({_placeholders(count)})"
    )


def members_of_sql(collections: int, resources: int) -> str:
    """The memberships of some records only (trace look-ups)."""
    return members_sql(collections) + f" AND ResourceID IN ({_placeholders(resources)})"


# Ordered, so that two reads of unchanged data give identical tables (ResourceID is User_DISC's
# clustered key in a site database: the order costs SQL Server nothing).
USERS_SQL = f"SELECT {', '.join(USER_COLUMNS)} FROM v_R_User ORDER BY ResourceID"
COMPONENTS_SQL = (
    f"SELECT {', '.join(COMPONENT_COLUMNS)} FROM v_ComponentSummarizer"
    f" WHERE ComponentName IN ({_placeholders(len(COMPONENT_NAMES))})"
)


def users_where_sql(condition: str) -> str:
    return f"SELECT {', '.join(USER_COLUMNS)} FROM v_R_User WHERE {condition}"


def text_lookup_sql(column: str, count: int) -> str:
    """Records whose ``column`` equals one of ``count`` values, case-insensitively (the database's
    UPPER on both sides, so both are folded the same way)."""
    return users_where_sql(f"UPPER({column}) IN ({', '.join(['UPPER(?)'] * count)})")


def guid_lookup_sql(count: int) -> str:
    return users_where_sql(f"Object_GUID0 IN ({_placeholders(count)})")


# ---------------------------------------------------------------------------- change check
Dialect = Literal["sqlserver", "postgresql", "sqlite", "other"]


def dialect_of(dbms_name: str) -> Dialect:
    """The SQL dialect from the driver's SQL_DBMS_NAME."""
    name = dbms_name.casefold()
    if "sql server" in name:
        return "sqlserver"
    if "postgres" in name:
        return "postgresql"
    if "sqlite" in name:
        return "sqlite"
    return "other"


# One aggregate row over every column the source reads: the row count and the sum of a 60-bit
# (PostgreSQL) or two 32-bit (SQL Server) hashes per row. The sum does not depend on row order;
# a changed, added or removed row changes it unless two random hashes happen to cancel out.
_PG_ROW_HASH = "('x' || substr(md5(ROW({columns})::text), 1, 15))::bit(60)::bigint"
_MSSQL_ROW_HASH = "HASHBYTES('SHA2_256', CONCAT({columns}))"


def _mssql_text(column: str) -> str:
    if column == "Object_GUID0":  # varbinary or uniqueidentifier: hex of the 16 bytes either way
        return "CONVERT(varchar(40), CAST(Object_GUID0 AS varbinary(16)), 2)"
    if column == "Creation_Date0":  # CONCAT's own datetime text drops the seconds
        return "CONVERT(varchar(40), Creation_Date0, 126)"
    return column


def _mssql_fingerprint(table: str, where: str, columns: Sequence[str]) -> str:
    parts = ", CHAR(31), ".join(_mssql_text(c) for c in columns)
    return (
        "SELECT COUNT_BIG(*), SUM(CAST(CAST(SUBSTRING(x.h, 1, 4) AS int) AS bigint)),"
        " SUM(CAST(CAST(SUBSTRING(x.h, 5, 4) AS int) AS bigint))"
        f" FROM {table} CROSS APPLY (SELECT {_MSSQL_ROW_HASH.format(columns=parts)} AS h) AS x{where}"
    )


def _pg_fingerprint(table: str, where: str, columns: Sequence[str]) -> str:
    row_hash = _PG_ROW_HASH.format(columns=", ".join(columns))
    return f"SELECT COUNT(*), COALESCE(SUM({row_hash}), 0) FROM {table}{where}"


def fingerprint_sql(dialect: Dialect, collections: int) -> tuple[str, str] | None:
    """(users, memberships) change-check statements of a dialect; None where there is none (SQLite
    has no hash function: there a full read is compared with the previous table instead)."""
    members = f" WHERE ResourceType = {USER_RESOURCE_TYPE} AND CollectionID IN ({_placeholders(collections)})"
    if dialect == "postgresql":
        return (
            _pg_fingerprint("v_R_User", "", USER_COLUMNS),
            _pg_fingerprint("v_FullCollectionMembership", members, MEMBER_COLUMNS),
        )
    if dialect == "sqlserver":
        return (
            _mssql_fingerprint("v_R_User", "", USER_COLUMNS),
            _mssql_fingerprint("v_FullCollectionMembership", members, MEMBER_COLUMNS),
        )
    return None


# --------------------------------------------------------------------------- row conversion
class RowError(ValueError):
    """A value of one row could not be converted; the row is skipped."""

    def __init__(self, column: str, problem: str) -> None:
        super().__init__(f"column {column}: {problem}")
        self.column = column


class MalformedResultError(ValueError):
    """A result set as a whole does not have the expected shape; the refresh fails ("data")."""


def column_index(
    description: Sequence[Sequence[Any]] | None, wanted: Sequence[str], view: str
) -> dict[str, int]:
    """Position of each wanted column in a result set, matched case-insensitively."""
    if not description:
        raise MalformedResultError(f"{view} returned no result set")
    positions: dict[str, int] = {}
    for position, column in enumerate(description):
        positions.setdefault(str(column[0]).casefold(), position)
    missing = [name for name in wanted if name.casefold() not in positions]
    if missing:
        raise MalformedResultError(f"{view} has no column {', '.join(missing)}")
    return {name: positions[name.casefold()] for name in wanted}


class RowNotes:
    """What converting the rows of one result set noticed: text values cut to MAX_TEXT_BYTES."""

    __slots__ = ("clipped", "first_clipped")

    def __init__(self) -> None:
        self.clipped = 0
        self.first_clipped = ""


def clip_text(text: str) -> str:
    """At most MAX_TEXT_BYTES of UTF-8, cut at a character boundary (as the table builder cuts)."""
    if len(text) * 4 <= MAX_TEXT_BYTES:  # even four bytes per character fit: the usual case
        return text
    encoded = text.encode("utf-8", "surrogatepass")
    if len(encoded) <= MAX_TEXT_BYTES:
        return text
    return encoded[:MAX_TEXT_BYTES].decode("utf-8", "ignore")


def _text(value: object, column: str, notes: RowNotes | None = None) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes | bytearray | memoryview):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise RowError(column, "binary value where text was expected") from None
    text = str(value).strip()
    if not text:
        return None
    clipped = clip_text(text)
    if clipped is not text and notes is not None:
        if not notes.clipped:
            notes.first_clipped = f"{column}, {len(text.encode('utf-8', 'surrogatepass')):,} bytes"
        notes.clipped += 1
    return clipped


def _integer(value: object, column: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise RowError(column, "boolean where an integer was expected")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        if re.fullmatch(r"[+-]?\d+", text):
            return int(text)
    elif isinstance(value, Decimal | float) and math.isfinite(value) and value == int(value):
        return int(value)
    raise RowError(column, f"not an integer: {value!r}")


def _guid_text_of_bytes(raw: bytes) -> str | None:
    """GUID text that a driver returned as bytes (e.g. SQLite text in a BLOB column)."""
    if len(raw) in (32, 36, 38) and raw.isascii():
        return raw.decode("ascii")
    return None


def object_guid(value: object, column: str = "Object_GUID0") -> bytes | None:
    """Raw 16 bytes in AD order from binary or GUID text (any case, with or without braces)."""
    if isinstance(value, bytearray | memoryview):
        value = bytes(value)
    if isinstance(value, bytes):
        value = _guid_text_of_bytes(value) or value
    try:
        return guid_bytes(value)
    except ValueError as exc:
        raise RowError(column, str(exc)) from None


def cloud_user_id(value: object, column: str = "CloudUserId") -> str | None:
    """Lower-case GUID text without braces; None for NULL or empty."""
    if isinstance(value, bytearray | memoryview):
        value = bytes(value)
    if isinstance(value, bytes):
        value = _guid_text_of_bytes(value) or value
        if isinstance(value, bytes) and len(value) not in (0, 16):
            raise RowError(column, f"a GUID has 16 bytes, got {len(value)}")
    try:
        return guid_text(value)
    except ValueError as exc:
        raise RowError(column, str(exc)) from None


MAX_SID_CHARS = 200  # S-1-, the authority and 15 sub-authorities of 10 digits: 184 characters


def security_identifier(value: object, column: str = "SID0") -> str | None:
    if isinstance(value, str) and len(value) > MAX_SID_CHARS:
        raise RowError(column, f"{len(value):,} characters, longer than any SID")
    try:
        return sid_text(value)
    except ValueError as exc:
        raise RowError(column, str(exc)) from None


def timestamp(value: object, column: str) -> float | None:
    """POSIX seconds; a naive datetime or text without offset is UTC (ConfigMgr stores UTC)."""
    try:
        return epoch_seconds(value)
    except ValueError as exc:
        raise RowError(column, str(exc)) from None


Members = Mapping[int, tuple[str, ...]]  # ResourceID -> the configured collections it is a member of


def user_from_row(
    values: Sequence[Any], index: dict[str, int], members: Members, notes: RowNotes | None = None
) -> CmUser:
    """One v_R_User row as a CmUser; raises RowError when a value cannot be converted."""
    resource_id = _integer(values[index["ResourceID"]], "ResourceID")
    if resource_id is None:
        raise RowError("ResourceID", "NULL")
    return CmUser(
        resource_id=resource_id,
        unique_user_name=_text(values[index["Unique_User_Name0"]], "Unique_User_Name0", notes),
        user_principal_name=_text(values[index["User_Principal_Name0"]], "User_Principal_Name0", notes),
        sid=security_identifier(values[index["SID0"]]),
        object_guid=object_guid(values[index["Object_GUID0"]]),
        creation_date=timestamp(values[index["Creation_Date0"]], "Creation_Date0"),
        cloud_user_id=cloud_user_id(values[index["CloudUserId"]]),
        collections=members.get(resource_id, ()),
    )


@dataclass(frozen=True, slots=True)
class ComponentRow:
    site_code: str
    machine_name: str
    component_name: str
    status: int
    tally_interval: str | None


def component_row(values: Sequence[Any], index: dict[str, int]) -> ComponentRow:
    site = _text(values[index["SiteCode"]], "SiteCode")
    machine = _text(values[index["MachineName"]], "MachineName")
    component = _text(values[index["ComponentName"]], "ComponentName")
    status = _integer(values[index["Status"]], "Status")
    if site is None or component is None:
        raise RowError("SiteCode" if site is None else "ComponentName", "NULL")
    if status is None:
        raise RowError("Status", "NULL")
    return ComponentRow(
        site_code=site.upper(),
        machine_name=machine or "",
        component_name=component.upper(),
        status=status,
        tally_interval=_text(values[index["TallyInterval"]], "TallyInterval"),
    )


def select_components(rows: Iterable[ComponentRow]) -> tuple[CmComponent, ...]:
    """One status per (site, machine, component).

    The since-midnight tally row wins; a database with a single row per component gives that
    row; several rows of other intervals give the worst status (an alert is better than silence).
    """
    grouped: dict[tuple[str, str, str], list[ComponentRow]] = {}
    for row in rows:
        grouped.setdefault((row.site_code, row.machine_name.casefold(), row.component_name), []).append(row)
    components = []
    for (site, _, name), group in grouped.items():
        midnight = [r for r in group if r.tally_interval == SINCE_MIDNIGHT_TALLY]
        chosen = midnight or group
        status = max(r.status for r in chosen)
        components.append(CmComponent(site, group[0].machine_name, name, status))
    return tuple(sorted(components, key=lambda c: (c.site_code, c.component_name, c.machine_name.casefold())))


# ------------------------------------------------------------------------ column building
class NotFast(Exception):
    """A batch holds a value the column-wise conversion does not handle; convert it row by row."""


def _fast_resource_ids(values: Sequence[Any]) -> np.ndarray[Any, np.dtype[np.int64]]:
    if not all(value.__class__ is int for value in values):
        raise NotFast()
    return np.fromiter(values, dtype=np.int64, count=len(values))


def _fast_texts(values: Sequence[Any], column: str, notes: RowNotes) -> list[str | None]:
    texts: list[str | None] = []
    append = texts.append
    for value in values:
        if value is None:
            append(None)
            continue
        if value.__class__ is not str:
            raise NotFast()
        text = value.strip()
        if not text:
            append(None)
        elif len(text) * 4 <= MAX_TEXT_BYTES:
            append(text)
        else:
            append(_text(text, column, notes))
    return texts


def _fast_sids(values: Sequence[Any]) -> list[str | None]:
    sids: list[str | None] = []
    append = sids.append
    for value in values:
        if value is None:
            append(None)
            continue
        if value.__class__ is not str or len(value) > MAX_SID_CHARS:
            raise NotFast()
        text = value.strip().upper()
        if not text:
            append(None)
        elif text.startswith("S-1-"):
            append(text)
        else:
            raise NotFast()
    return sids


def _fast_guids(values: Sequence[Any]) -> list[bytes | None]:
    for value in values:
        if value is not None and (value.__class__ is not bytes or len(value) != 16):
            raise NotFast()
    return list(values)


def _fast_times(values: Sequence[Any]) -> np.ndarray[Any, np.dtype[np.float64]]:
    """POSIX seconds; naive datetimes are UTC (as :func:`timestamp` reads them)."""
    if all(value is None or (value.__class__ is datetime and value.tzinfo is None) for value in values):
        micros = np.array(values, dtype="datetime64[us]")
        seconds = micros.astype(np.int64) / 1e6
        seconds[np.isnat(micros)] = np.nan
        return seconds
    times = np.empty(len(values), dtype=np.float64)
    for position, value in enumerate(values):
        try:
            converted = epoch_seconds(value)
        except ValueError:
            raise NotFast() from None
        times[position] = np.nan if converted is None else converted
    return times


def _fast_cloud_ids(values: Sequence[Any]) -> list[bytes | None]:
    """16 bytes in RFC 4122 order (as the table keeps CloudUserIDs) from canonical GUID text."""
    ids: list[bytes | None] = []
    append = ids.append
    for value in values:
        if value is None:
            append(None)
            continue
        if value.__class__ is not str:
            raise NotFast()
        text = value.strip()
        if not text:
            append(None)
            continue
        if text[0] == "{" and text[-1] == "}":
            text = text[1:-1]
        if len(text) != 36 or text[8] != "-" or text[13] != "-" or text[18] != "-" or text[23] != "-":
            raise NotFast()
        try:
            append(bytes.fromhex(text.replace("-", "")))
        except ValueError:
            raise NotFast() from None
    return ids


def _text_blob(texts: Sequence[str | None]) -> Blob:
    encoded = [b"" if text is None else text.encode("utf-8", "surrogatepass") for text in texts]
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)), out=offsets[1:])
    nulls = np.fromiter((text is None for text in texts), dtype=np.bool_, count=len(texts))
    return Blob(b"".join(encoded), offsets, nulls if nulls.any() else None, True)


def _guid_column(values: Sequence[bytes | None]) -> tuple[bytes, np.ndarray[Any, np.dtype[np.bool_]]]:
    present = np.fromiter((value is not None for value in values), dtype=np.bool_, count=len(values))
    return b"".join(_NO_GUID if value is None else value for value in values), present


_NO_GUID = bytes(16)


class MaskedMembers(Mapping[int, tuple[str, ...]]):
    """Memberships kept as one bit mask per record, read as the collections' names."""

    def __init__(self, masks: dict[int, int], collection_ids: tuple[str, ...]) -> None:
        self.masks = masks
        self.names = collection_ids  # bit i is names[i]

    def __getitem__(self, resource_id: int) -> tuple[str, ...]:
        mask = self.masks[resource_id]
        return tuple(sorted(name for bit, name in enumerate(self.names) if mask >> bit & 1))

    def __iter__(self) -> Iterator[int]:
        return iter(self.masks)

    def __len__(self) -> int:
        return len(self.masks)


class UserColumns:
    """Builds the CmTable of a full read a batch at a time, one column at a time.

    Row by row (a CmUser per row, then :class:`CmTableBuilder`) a 500,000-user read costs ~30 µs of
    Python per row; converting each column of a fetched batch in one pass costs a few. The result
    is the table ``CmTable.from_records`` builds from the same records (the tests compare the two on
    every kind of value); a batch holding a value this path does not handle (bytes where text is
    usual, a malformed value) goes through the row-by-row conversion, which also skips bad rows.
    """

    def __init__(self, collection_ids: Sequence[str], members: Members) -> None:
        self.collection_ids = [c.upper() for c in collection_ids][: CmTableBuilder.MAX_COLLECTIONS]
        known = tuple(self.collection_ids)
        if isinstance(members, MaskedMembers) and members.names[: len(known)] == known:
            # Read as masks in the same bit order: only bits of other names (not expected) go.
            keep = (1 << len(known)) - 1
            same = len(members.names) == len(known)
            self._masks = members.masks if same else {r: m & keep for r, m in members.masks.items()}
        else:
            bits = {name: 1 << position for position, name in enumerate(known)}
            self._masks = {
                resource_id: sum(bits.get(name.upper(), 0) for name in set(names))
                for resource_id, names in members.items()
            }
        self.members: Members = MaskedMembers(self._masks, known)
        self._parts: list[dict[str, Any]] = []
        self.rows = 0

    def add_batch(self, rows: Sequence[Sequence[Any]], index: Mapping[str, int], notes: RowNotes) -> None:
        """Append a fetched batch; raises NotFast (appending nothing) when it needs the row path."""
        columns = list(zip(*rows, strict=True)) if rows else []
        if not columns:
            return
        trial = RowNotes()
        resource_ids = _fast_resource_ids(columns[index["ResourceID"]])
        names = _fast_texts(columns[index["Unique_User_Name0"]], "Unique_User_Name0", trial)
        upns = _fast_texts(columns[index["User_Principal_Name0"]], "User_Principal_Name0", trial)
        sids = _fast_sids(columns[index["SID0"]])
        guids = _fast_guids(columns[index["Object_GUID0"]])
        created = _fast_times(columns[index["Creation_Date0"]])
        clouds = _fast_cloud_ids(columns[index["CloudUserId"]])
        if trial.clipped:
            if not notes.clipped:
                notes.first_clipped = trial.first_clipped
            notes.clipped += trial.clipped
        self._append(resource_ids, names, upns, sids, guids, created, clouds)

    def add(self, user: CmUser) -> None:
        """Append one record converted row by row (as CmTableBuilder.add would)."""
        self._append(
            np.array([user.resource_id], dtype=np.int64),
            [user.unique_user_name],
            [user.user_principal_name],
            [user.sid],
            [user.object_guid],
            np.array([np.nan if user.creation_date is None else user.creation_date], dtype=np.float64),
            [uuid.UUID(user.cloud_user_id).bytes if user.cloud_user_id else None],
        )

    def _append(
        self,
        resource_ids: np.ndarray[Any, np.dtype[np.int64]],
        names: list[str | None],
        upns: list[str | None],
        sids: list[str | None],
        guids: list[bytes | None],
        created: np.ndarray[Any, np.dtype[np.float64]],
        clouds: list[bytes | None],
    ) -> None:
        masks = self._masks
        guid_data, has_guid = _guid_column(guids)
        cloud_data, has_cloud = _guid_column(clouds)
        self._parts.append(
            {
                "resource_id": resource_ids,
                "name": _text_blob(names),
                "upn": _text_blob(upns),
                "sid": _text_blob(sids),
                "guid": np.frombuffer(guid_data, dtype=GUID_DTYPE),
                "has_guid": has_guid,
                "created": created,
                "cloud": np.frombuffer(cloud_data, dtype=GUID_DTYPE),
                "has_cloud": has_cloud,
                "collections": np.fromiter(
                    (masks.get(r, 0) for r in resource_ids.tolist()), dtype=np.uint64, count=len(resource_ids)
                ),
                "k_sid": text_keys(sids),
                "k_name": text_keys([n if n is not None and "\\" in n else None for n in names]),
                "k_upn": text_keys(upns),
            }
        )
        self.rows += len(resource_ids)

    def build(self, components: Sequence[CmComponent]) -> CmTable:
        if not self._parts:
            table = CmTableBuilder(self.collection_ids, components).build()
            return table
        columns: dict[str, Any] = {}
        for column in CmTable.COLUMNS:
            if column.name in ("k_guid", "k_cloud"):
                continue
            # Each column's parts are released once joined: the peak is the parts plus one column.
            parts = [part.pop(column.name) for part in self._parts]
            columns[column.name] = Blob.concat(parts) if column.kind == "text" else np.concatenate(parts)
            del parts
        self._parts = []
        columns["k_guid"] = guid_keys(columns["guid"], columns["has_guid"])
        columns["k_cloud"] = guid_keys(columns["cloud"], columns["has_cloud"])
        meta = {"collection_ids": list(self.collection_ids), "components": _component_meta(components)}
        return CmTable(columns, meta=meta)


# ------------------------------------------------------------------------------ ODBC errors
_AUTH_MARKERS = (
    "login failed",
    "password authentication failed",
    "authentication failed",
    "no pg_hba.conf entry",
    "invalid authorization",
    "(18456)",  # SQL Server: login failed
    "(4060)",  # SQL Server: cannot open database requested by the login
    "permission denied",
    "permission was denied",  # SQL Server 229: The SELECT permission was denied on the object
    "(229)",
)
_NETWORK_MARKERS = (
    "(20009)",  # FreeTDS: server unavailable or does not exist
    "(20002)",  # FreeTDS: adaptive server connection failed
    "(20004)",  # FreeTDS: read from the server failed
    "(20006)",  # FreeTDS: write to the server failed
    "connection refused",
    "could not connect",
    "could not translate host name",
    "communication link failure",
    "server closed the connection",
    "tcp provider",
)
_TIMEOUT_MARKERS = (
    "statement timeout",
    "timeout expired",
    "query timeout",
    "login timeout",
    "(20003)",  # FreeTDS: adaptive server connection timed out
    # SQLite: the busy timeout (the source derives it from the query timeout) ran out while
    # another connection held the lock.
    "database is locked",
    "database table is locked",
)
_DATA_MARKERS = (
    "no such table",
    "no such column",
    "invalid object name",
    "invalid column name",
)
_DATA_STATES = frozenset({"42S02", "42S22", "42P01", "42703"})


def classify_odbc_error(sqlstate: str, text: str, connecting: bool) -> ErrorReason:
    """Map an ODBC SQLSTATE and driver message to a bounded error reason."""
    state = sqlstate.upper()
    low = text.lower()
    if state in ("HYT00", "HYT01", "57014") or any(m in low for m in _TIMEOUT_MARKERS):
        return "timeout"
    if state in ("28000", "28P01", "42501") or any(m in low for m in _AUTH_MARKERS):
        return "auth"
    if connecting and re.search(r'(role|user|database) "[^"]*" does not exist', low):
        return "auth"  # PostgreSQL's wording of SQL Server's "login failed" (18456/4060)
    if state.startswith("08") or any(m in low for m in _NETWORK_MARKERS):
        return "network"
    if state in _DATA_STATES or state.startswith("22") or any(m in low for m in _DATA_MARKERS):
        return "data"
    return "other"


_REASON_TEXT: dict[ErrorReason, str] = {
    "auth": "login or permission refused",
    "timeout": "timed out",
    "network": "cannot reach the database server",
    "data": "unexpected database content",
    "throttled": "throttled",
    "other": "ODBC error",
}


def odbc_error_parts(exc: BaseException) -> tuple[str, str]:
    """(SQLSTATE, driver message) of a pyodbc error."""
    args: tuple[object, ...] = tuple(exc.args)
    if len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        return args[0], args[1]
    return "", " ".join(str(a) for a in args) or type(exc).__name__


# pyodbc's text for an error without diagnostic records (seen after SQLCancel).
_NO_DIAGNOSTICS = "The driver did not supply an error"


def scrub(text: str, mask: SecretMask, limit: int = 400) -> str:
    """One line of driver text without secrets (masked before it is cut), at most ``limit`` characters."""
    text = " ".join(mask.mask(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------- time limits
class DeadlineReached(Exception):
    """The refresh's deadline came before the next statement or batch could start."""


@dataclass(frozen=True)
class StatementLimit:
    seconds: float
    cause: Literal["query_timeout", "deadline"]

    @property
    def whole_seconds(self) -> int:
        """For ODBC attributes that take whole seconds (0 would mean "no limit")."""
        return max(1, int(self.seconds))

    def describe(self) -> str:
        if self.cause == "query_timeout":
            return f"query_timeout {self.seconds:g}s"
        return f"{self.seconds:.1f}s, the time left before the refresh deadline"


@dataclass(frozen=True)
class Budget:
    """How long one refresh or look-up may run; every statement's limit derives from it."""

    query_timeout: float
    end: float | None  # time.monotonic() by which the session stops; None: no deadline
    started: float

    @staticmethod
    def until(deadline: float | None, query_timeout: float) -> Budget:
        now = time.monotonic()
        if deadline is None:
            return Budget(query_timeout, None, now)
        margin = min(DEADLINE_MARGIN, max(0.0, deadline - now) * DEADLINE_MARGIN_SHARE)
        return Budget(query_timeout, deadline - margin, now)

    def left(self) -> float | None:
        return None if self.end is None else self.end - time.monotonic()

    def check(self) -> None:
        left = self.left()
        if left is not None and left <= 0:
            raise DeadlineReached()

    def limit(self) -> StatementLimit:
        """The limit of the next statement: query_timeout, or less when the deadline is nearer."""
        left = self.left()
        if left is None or left >= self.query_timeout:
            return StatementLimit(self.query_timeout, "query_timeout")
        if left <= 0:
            raise DeadlineReached()
        return StatementLimit(left, "deadline")

    def describe(self) -> str:
        if self.end is None:
            return f"query_timeout {self.query_timeout:g}s"
        return f"{self.end - self.started:.1f}s for the whole operation"


# ------------------------------------------------------------------------- the socket
def _socket_inodes() -> dict[int, int]:
    """Open socket descriptors of this process and their inodes (Linux; empty elsewhere)."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return {}
    found: dict[int, int] = {}
    for name in names:
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:[") and target.endswith("]"):
            found[int(name)] = int(target[8:-1])
    return found


@dataclass(frozen=True)
class SocketRef:
    """The stream socket an ODBC driver opened for one connection, to shut it down at an abort."""

    fd: int
    inode: int

    def shutdown(self) -> bool:
        """Shut the socket down so that a read blocked on it fails at once; the driver still owns
        and closes the descriptor. False when the descriptor no longer is that socket."""
        try:
            duplicate = os.dup(self.fd)
        except OSError:
            return False
        try:
            if os.fstat(duplicate).st_ino != self.inode:
                return False  # closed and the number reused meanwhile
            probe = socket.socket(fileno=duplicate)
            duplicate = -1  # the socket object owns it now
            try:
                probe.shutdown(socket.SHUT_RDWR)
            finally:
                probe.close()
            return True
        except OSError:
            return False
        finally:
            if duplicate >= 0:
                os.close(duplicate)


def new_stream_socket(before: Iterable[int], local_port: int | None = None) -> SocketRef | None:
    """The connected stream socket opened since ``before`` (inodes) was taken: the one with
    ``local_port`` when the server told it, else the only one. None when it cannot be told apart
    (another thread opened one meanwhile: better no shutdown than a wrong one)."""
    known = set(before)
    candidates: list[tuple[SocketRef, Any]] = []
    for fd, inode in _socket_inodes().items():
        if inode in known:
            continue
        try:
            probe = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            if probe.type == socket.SOCK_STREAM:
                probe.getpeername()  # connected (raises otherwise)
                candidates.append((SocketRef(fd, inode), probe.getsockname()))
        except OSError:
            pass
        finally:
            probe.close()
    if local_port is not None:
        candidates = [c for c in candidates if isinstance(c[1], tuple) and c[1][1] == local_port]
    return candidates[0][0] if len(candidates) == 1 else None


# The client's TCP port as the server sees it, to tell the connection's socket from others opened
# meanwhile. SQL Server shows other sessions' rows only with VIEW SERVER STATE, but a session's own
# row to anyone (where it fails, the source falls back to "the only new socket").
CLIENT_PORT_SQL: dict[str, str] = {
    "postgresql": "SELECT inet_client_port()",
    "sqlserver": "SELECT client_tcp_port FROM sys.dm_exec_connections WHERE session_id = @@SPID",
}


# ------------------------------------------------------------------------- one connection
StopReason = Literal["deadline", "closed"]


class Stopped(Exception):
    """The session was stopped (deadline or close) before a statement could start."""


class Session:
    """One ODBC connection of one refresh or look-up, bounded by a budget, stoppable from another
    thread (:meth:`stop`). Only the owning thread runs statements and closes the connection."""

    def __init__(
        self, pyodbc: ModuleType, connection_string: str, budget: Budget, fetch_size: int, sqlite_driver: bool
    ) -> None:
        self.pyodbc = pyodbc
        self.budget = budget
        self.phase = "connecting"
        self.limit: StatementLimit | None = None
        self.stop_reason: StopReason | None = None
        self.rows_fetched = 0
        self.dialect: Dialect = "other"
        self.dbms = ""
        self.query_timeout_rejected = False
        self.waiting_for: str | None = None  # the driver's last word on a wait (a lock) of this statement
        self._connection_string = connection_string
        self._fetch_size = fetch_size
        self._sqlite_driver = sqlite_driver
        self._lock = threading.Lock()
        self._connection: Any = None
        self._cursor: Any = None
        self._socket: SocketRef | None = None
        self._finished = False
        # While SQLCancel runs in the cancel thread, no handle of this connection is closed (the
        # driver crashes when the statement it cancels is freed under it): they wait here and the
        # cancel thread closes them when SQLCancel returns.
        self._cancelling = False
        self._close_after_cancel: list[Any] = []

    # -- the owning thread
    def open(self) -> None:
        limit = self._start("connecting")
        text = self._connection_string
        if self._sqlite_driver:
            # sqliteodbc waits this long (ms) for a lock at connect and on top of the busy handler
            # of every statement; PRAGMA busy_timeout then bounds each statement (see _arm).
            text = with_attribute(text, "Timeout", "1")
        before = _socket_inodes().values()
        connection = self.pyodbc.connect(text, timeout=limit.whole_seconds, autocommit=True)
        with self._lock:
            self._connection = connection
        self.dbms = str(connection.getinfo(self.pyodbc.SQL_DBMS_NAME) or "")
        self.dialect = dialect_of(self.dbms)
        if self.dialect != "sqlite":
            self._socket = new_stream_socket(before, self._client_port())
        self._check_stopped()

    def _client_port(self) -> int | None:
        sql = CLIENT_PORT_SQL.get(self.dialect)
        if sql is None:
            return None
        try:
            (port,) = self.single_row(sql, (), "connecting")
            return int(port) if port is not None else None
        except (self.pyodbc.Error, MalformedResultError, TypeError, ValueError) as exc:
            if self.stop_reason is not None:
                raise
            log.debug("the client port of a ConfigMgr connection is unknown: %s", exc)
            return None

    def execute(self, sql: str, params: Sequence[object], phase: str) -> Any:
        """Run one statement under the current limit; the cursor is cancellable by stop()."""
        limit = self._start(phase)
        if self.dialect == "sqlite":
            return self._execute_sqlite(sql, params, limit)
        self._arm(limit)
        cursor = self._register(self._connection.cursor())
        cursor.execute(sql, *params)
        return cursor

    def _execute_sqlite(self, sql: str, params: Sequence[object], limit: StatementLimit) -> Any:
        """SQLite: wait for a lock in short busy waits (which nothing can interrupt) and retry
        until the statement's limit is spent, so that the limit holds to a fraction of a second and
        a stop() is noticed between two waits."""
        ends = time.monotonic() + limit.seconds
        while True:
            left = ends - time.monotonic()
            # The driver waits for the busy handler twice when its prepare has to wait too.
            self._set(f"PRAGMA busy_timeout = {max(1, int(min(left, SQLITE_LOCK_SLICE) * 500))}")
            cursor = self._register(self._connection.cursor())
            try:
                cursor.execute(sql, *params)
                return cursor
            except self.pyodbc.Error as exc:
                self._release(cursor)
                text = odbc_error_parts(exc)[1]
                locked = "database is locked" in text
                if locked:
                    self.waiting_for = text  # what a stop in the middle of the waits interrupted
                if not locked or time.monotonic() >= ends:
                    raise
                self._check_stopped()
                self.budget.check()

    def _register(self, cursor: Any) -> Any:
        with self._lock:
            stopped = self.stop_reason is not None
            if not stopped:
                self._cursor = cursor
        if stopped:
            self._release(cursor)
            raise Stopped()
        return cursor

    def _release(self, cursor: Any) -> None:
        """Forget a statement and close its cursor (after a running cancel, see ``__init__``)."""
        with self._lock:
            if self._cursor is cursor:
                self._cursor = None
            if self._cancelling:
                self._close_after_cancel.append(cursor)
                return
        _close_quietly(cursor)

    def batches(self, cursor: Any) -> Iterator[list[Sequence[Any]]]:
        """Stream a result set in batches of fetch_size (no fetchall: the caller converts each
        batch at once and keeps no pyodbc Row); the deadline is checked before every batch."""
        try:
            while True:
                self._check_stopped()
                self.budget.check()
                batch = cursor.fetchmany(self._fetch_size)
                if not batch:
                    return
                self.rows_fetched += len(batch)
                yield batch
        finally:
            self._release(cursor)

    def rows(self, cursor: Any) -> Iterator[Sequence[Any]]:
        for batch in self.batches(cursor):
            yield from batch

    def single_row(self, sql: str, params: Sequence[object], phase: str) -> tuple[Any, ...]:
        rows = list(self.rows(self.execute(sql, params, phase)))
        if len(rows) != 1:
            raise MalformedResultError(f"{phase}: expected one row, got {len(rows)}")
        return tuple(rows[0])

    def close(self) -> None:
        with self._lock:
            self._finished = True
            handles = [handle for handle in (self._cursor, self._connection) if handle is not None]
            self._cursor = self._connection = None
            if self._cancelling:
                self._close_after_cancel += handles
                handles = []
        for handle in handles:
            _close_quietly(handle)

    def _start(self, phase: str) -> StatementLimit:
        self.phase = phase
        self.waiting_for = None
        self._check_stopped()
        self.limit = self.budget.limit()
        return self.limit

    def _check_stopped(self) -> None:
        if self.stop_reason is not None:
            raise Stopped()

    def _arm(self, limit: StatementLimit) -> None:
        """Give the next statement ``limit`` in the form this driver honours (module docstring)."""
        milliseconds = max(1, int(limit.seconds * 1000))
        if self.dialect == "postgresql":
            self._set(f"SET statement_timeout = {milliseconds}")
        elif not self.query_timeout_rejected:
            try:
                self._connection.timeout = limit.whole_seconds  # SQL_ATTR_QUERY_TIMEOUT of new cursors
            except self.pyodbc.Error:
                self.query_timeout_rejected = True

    def _set(self, statement: str) -> None:
        cursor = self._connection.cursor()
        with self._lock:
            self._cursor = cursor
        try:
            cursor.execute(statement)
        finally:
            self._release(cursor)

    # -- any thread
    def stop(self, reason: StopReason) -> None:
        """Make the running statement end: SQLCancel now, the socket shut down if that is not enough."""
        with self._lock:
            if self._finished or self.stop_reason is not None:
                return
            self.stop_reason = reason
            cursor = self._cursor
            self._cancelling = cursor is not None
        if cursor is not None:
            # SQLCancel may itself block on a server that stopped answering: never in the caller's
            # thread (the engine's, or the watchdog that must still shut the socket down).
            canceller = threading.Thread(
                target=self._cancel, args=(cursor,), name="configmgr-cancel", daemon=True
            )
            canceller.start()
        if self._socket is not None:
            timer = threading.Timer(CANCEL_GRACE, self._shutdown_if_still_running)
            timer.daemon = True
            timer.start()

    def _cancel(self, cursor: Any) -> None:
        _cancel_quietly(cursor)
        with self._lock:
            self._cancelling = False
            handles, self._close_after_cancel = self._close_after_cancel, []
        for handle in handles:  # cursors before their connection, in the order they were released
            _close_quietly(handle)

    def _shutdown_if_still_running(self) -> None:
        with self._lock:
            if self._finished or self._socket is None:
                return
            sock = self._socket
        if sock.shutdown():
            log.debug("shut down the socket of a ConfigMgr connection that ignored the cancel")


def with_attribute(connection_string: str, key: str, value: str) -> str:
    """The connection string with ``key`` set to ``value`` (replacing any such attribute)."""
    kept = [a.raw for a in parse_connection_string(connection_string) if a.key.upper() != key.upper()]
    return ";".join([*kept, f"{key}={value}"])


def _cancel_quietly(cursor: Any) -> None:
    try:
        cursor.cancel()  # SQLCancel: the one ODBC call meant for another thread
    except Exception:
        log.debug("cancelling a ConfigMgr query failed", exc_info=True)


# ----------------------------------------------------------------------------------- source
class ConfigMgrSource:
    """Reads ConfigMgr user records, Intune collection membership and component status."""

    kind: SourceKind = "configmgr"

    def __init__(self, config: ConfigMgrConfig) -> None:
        self._config = config
        attributes = parse_connection_string(config.connection_string.value)
        self._target = connection_target(attributes)
        self._driver = _first(attributes, ("DRIVER",))
        password = config.password.value if config.password is not None else None
        self._mask = SecretMask(config.secrets())
        self._connection_string = build_connection_string(
            config.connection_string.value, config.username, password
        )
        self._mask.add([self._connection_string])
        self._collection_ids = tuple(dict.fromkeys(c.strip().upper() for c in config.intune_collection_ids))
        self._query_timeout = float(config.query_timeout)
        # Sessions in progress (a refresh, a look-up), for abort() and close() from other threads.
        self._lock = threading.Lock()
        self._sessions: set[Session] = set()
        self._warned: set[str] = set()
        self.last_skipped_rows = 0  # rows skipped as unconvertible in the last refresh
        self.last_clipped_values = 0  # text values cut to MAX_TEXT_BYTES in the last refresh
        self.last_rows_fetched = 0  # rows fetched by the last refresh or look-up, every statement
        self.last_change_check: str | None = None  # "unchanged", "changed" or None (not available)

    # -- Source protocol
    def describe(self) -> str:
        return f"configmgr {self._target}"

    def refresh(self, previous: SourceData | None, deadline: float | None = None) -> CmTable:
        """Read the site database; return ``previous`` itself when nothing it holds has changed."""
        try:
            with self._session(deadline) as session:
                return self._refresh(session, previous if isinstance(previous, CmTable) else None)
        except SourceError as exc:
            # The engine logs every failed refresh once, with the estate; this is only for tracing.
            log.debug("%s", exc.message)
            raise

    def find_related(
        self,
        *,
        sids: Sequence[str] = (),
        guids: Sequence[bytes] = (),
        names: Sequence[str] = (),
        upns: Sequence[str] = (),
        deadline: float | None = None,
    ) -> CmTable:
        """The records whose SID0 is one of ``sids``, whose Object_GUID0 is one of the 16-byte
        ``guids`` (AD order), or whose Unique_User_Name0 / User_Principal_Name0 equals one of
        ``names`` / ``upns`` (case-insensitive), with their memberships of the configured
        collections and the component rows. Point look-ups with parameters: never a full read."""
        with self._session(deadline) as session:
            found = self._find_users(session, sids, guids, names, upns)
            members = self._read_members_of(session, sorted(found))
            builder = CmTableBuilder(self._collection_ids)
            for resource_id in sorted(found):
                builder.add(dataclasses.replace(found[resource_id], collections=members.get(resource_id, ())))
            builder.components = list(self._read_components(session))
            return builder.build()

    def abort(self) -> None:
        """The refresh deadline passed: stop what runs now (any thread); it fails with ``timeout``."""
        self._stop_sessions("deadline")

    def close(self) -> None:
        """Stop a refresh in progress (it fails as cancelled). Every refresh opens and closes its
        own connection, so nothing stays open between refreshes and a later refresh works again."""
        self._stop_sessions("closed")

    def preflight(self) -> None:
        """Raise ConfigurationError when pyodbc, unixODBC or the named driver is missing, for a
        caller that prefers refusing to start over reporting a failing source."""
        try:
            self._check_driver(self._load_pyodbc())
        except SourceError as exc:
            raise ConfigurationError(exc.message) from None

    # -- environment
    def _fail(self, reason: ErrorReason, text: str) -> SourceError:
        return SourceError(reason, self._mask.mask(f"{self.describe()}: {text}"))

    def _load_pyodbc(self) -> ModuleType:
        try:
            return importlib.import_module("pyodbc")
        except ImportError as exc:
            detail = str(exc)
            if "libodbc" in detail:
                raise self._fail("other", "pyodbc cannot load libodbc.so.2: install unixODBC") from None
            raise self._fail("other", f"pyodbc cannot be imported ({scrub(detail, self._mask)})") from None

    def _check_driver(self, pyodbc: ModuleType) -> None:
        if not self._driver:
            return  # a DSN: the driver manager resolves it
        if "/" in self._driver:
            if not os.path.exists(self._driver):
                raise self._fail("other", f"ODBC driver library {self._driver} does not exist")
            return
        installed: list[str] = list(pyodbc.drivers())
        if self._driver.casefold() not in {name.casefold() for name in installed}:
            listed = ", ".join(installed) if installed else "none"
            raise self._fail(
                "other", f"ODBC driver '{self._driver}' is not installed; installed drivers: {listed}"
            )

    def _warn_once(self, key: str, message: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, self.describe(), *args)

    # -- sessions
    @contextlib.contextmanager
    def _session(self, deadline: float | None) -> Iterator[Session]:
        """An open session bounded by ``deadline``; every failure inside comes out as a SourceError."""
        pyodbc = self._load_pyodbc()
        self._check_driver(pyodbc)
        budget = Budget.until(deadline, self._query_timeout)
        sqlite_driver = bool(self._driver and "sqlite" in self._driver.casefold())
        session = Session(pyodbc, self._connection_string, budget, self._config.fetch_size, sqlite_driver)
        with self._lock:
            self._sessions.add(session)
        watchdog: threading.Timer | None = None
        if budget.end is not None:
            # The session ends by its deadline even when nobody calls abort().
            watchdog = threading.Timer(max(0.0, budget.end - time.monotonic()), session.stop, ("deadline",))
            watchdog.daemon = True
            watchdog.start()
        try:
            session.open()
            yield session
        except SourceError:
            raise
        except Exception as exc:
            error = self._translate(exc, session)
            if error is None:
                raise
            raise error from None
        finally:
            if watchdog is not None:
                watchdog.cancel()
            with self._lock:
                self._sessions.discard(session)
            session.close()
            self.last_rows_fetched = session.rows_fetched
            if session.query_timeout_rejected:
                self._warn_once(
                    "query-timeout",
                    "%s: the ODBC driver (%s) rejects a query timeout; statements are bounded by the"
                    " refresh deadline only (cancel, then the connection is shut down)",
                    session.dbms or "?",
                )

    def _stop_sessions(self, reason: StopReason) -> None:
        with self._lock:
            sessions = list(self._sessions)
        for session in sessions:
            session.stop(reason)

    def _translate(self, exc: BaseException, session: Session) -> SourceError | None:
        """The SourceError for a failure; None for a bug of ours (it propagates as it is)."""
        phase, stopped = session.phase, session.stop_reason
        if stopped == "closed":
            return self._fail("other", f"refresh cancelled while {phase}: the source was closed")
        if stopped == "deadline" or isinstance(exc, DeadlineReached | Stopped):
            text = f"the refresh deadline passed while {phase} ({session.budget.describe()})"
            detail = odbc_error_parts(exc)[1] if isinstance(exc, session.pyodbc.Error) else ""
            if not detail or _NO_DIAGNOSTICS in detail:  # SQLCancel may leave the driver speechless
                detail = session.waiting_for or ""
            if detail:  # what the statement was doing, e.g. waiting for a lock
                text += f": {scrub(detail, self._mask)}"
            return self._fail("timeout", text)
        if isinstance(exc, MalformedResultError):
            return self._fail("data", str(exc))
        if isinstance(exc, session.pyodbc.Error):
            sqlstate, text = odbc_error_parts(exc)
            reason = classify_odbc_error(sqlstate, text, connecting=phase == "connecting")
            what = _REASON_TEXT[reason]
            if reason == "timeout" and phase != "connecting" and session.limit is not None:
                what = f"query timed out ({session.limit.describe()})"
            return self._fail(reason, f"{what} while {phase}: {scrub(text, self._mask)}")
        return None

    # -- the refresh
    def _refresh(self, session: Session, previous: CmTable | None) -> CmTable:
        self.last_skipped_rows = self.last_clipped_values = 0
        self.last_change_check = None
        self._check_collections(session)
        fingerprint = self._fingerprint(session)
        comparable = previous is not None and list(previous.collection_ids) == list(self._collection_ids)
        if previous is not None and comparable and fingerprint is not None:
            if previous.meta.get("fingerprint") == fingerprint:
                self.last_change_check = "unchanged"
                return self._with_components(previous, self._read_components(session))
            self.last_change_check = "changed"
        table = self._read_everything(session, fingerprint)
        settled = self.settle(previous, table)
        assert isinstance(settled, CmTable)
        return settled.prepare()

    # -- a refresh in a child process (exporter.sources.isolated) ------------------------------
    def child_refresh(self, previous: SourceData | None) -> tuple[bool, SourceData | None]:
        """Always in a child: a change means a full read. It is given an empty table with the held
        table's meta (what the change check compares); :meth:`settle` compares the records."""
        if not isinstance(previous, CmTable):
            return True, None
        return True, CmTable.empty(meta=previous.meta)

    def settle(self, previous: SourceData | None, result: SourceData) -> SourceData:
        """``previous`` itself when a full read found the same records, memberships and components
        (with the new fingerprint when only that changed), else the new table."""
        if not isinstance(previous, CmTable) or not isinstance(result, CmTable) or result is previous:
            return result
        comparable = list(previous.collection_ids) == list(self._collection_ids)
        if result.meta.get("read") != "full" or not comparable or not same_content(previous, result):
            return result
        if previous.meta.get("fingerprint") == result.meta.get("fingerprint"):
            return previous
        # The same records, a new fingerprint to compare the next refresh with.
        return previous.derive(previous.columns(), meta={**previous.meta, **result.meta})

    def carry_over(self) -> dict[str, Any]:
        return {
            "warned": set(self._warned),
            "skipped": self.last_skipped_rows,
            "clipped": self.last_clipped_values,
            "fetched": self.last_rows_fetched,
            "change_check": self.last_change_check,
        }

    def take_over(self, memory: dict[str, Any]) -> None:
        self._warned |= set(memory.get("warned") or ())
        self.last_skipped_rows = int(memory.get("skipped") or 0)
        self.last_clipped_values = int(memory.get("clipped") or 0)
        self.last_rows_fetched = int(memory.get("fetched") or 0)
        self.last_change_check = memory.get("change_check")

    def _with_components(self, previous: CmTable, components: tuple[CmComponent, ...]) -> CmTable:
        if components == previous.components:
            return previous
        meta = {**previous.meta, "components": _component_meta(components), "read": "incremental"}
        return previous.derive(previous.columns(), meta=meta).prepare()

    def _read_everything(self, session: Session, fingerprint: str | None) -> CmTable:
        users = UserColumns(self._collection_ids, self._read_members(session))
        self._read_users(session, users)
        table = users.build(self._read_components(session))
        table.meta["read"] = "full"
        if fingerprint is not None:
            table.meta["fingerprint"] = fingerprint
        return table

    def _fingerprint(self, session: Session) -> str | None:
        """The change check's result, or None where the database has none or the check failed
        (then this refresh reads everything, which is always correct; the warning comes once)."""
        statements = fingerprint_sql(session.dialect, len(self._collection_ids))
        if statements is None or not self._collection_ids:
            return None
        users_sql, members_fingerprint_sql = statements
        try:
            users = session.single_row(users_sql, (), "checking v_R_User for changes")
            members = session.single_row(
                members_fingerprint_sql,
                self._collection_ids,
                "checking v_FullCollectionMembership for changes",
            )
        except session.pyodbc.Error as exc:
            sqlstate, text = odbc_error_parts(exc)
            if session.stop_reason is not None or classify_odbc_error(sqlstate, text, False) not in (
                "data",
                "other",
            ):
                raise
            self._warn_once(
                "fingerprint",
                "%s: the change check does not run on this database (%s); every refresh reads everything",
                scrub(text, self._mask, 200),
            )
            return None
        return f"{session.dialect}:" + ":".join(str(value) for value in (*users, *members))

    def _check_collections(self, session: Session) -> None:
        ids = self._collection_ids
        if not ids:
            return  # the config requires at least one; an empty IN () would not even parse
        cursor = session.execute(collections_sql(len(ids)), ids, "reading v_Collection")
        index = column_index(cursor.description, COLLECTION_COLUMNS, "v_Collection")
        found: dict[str, object] = {}
        for row in session.rows(cursor):
            collection_id = _text(row[index["CollectionID"]], "CollectionID")
            if collection_id is not None:
                found[collection_id.upper()] = row[index["CollectionType"]]
        missing = [c for c in ids if c not in found]
        if missing:
            raise self._fail("data", f"intune collection {', '.join(missing)} does not exist (v_Collection)")
        for collection_id in ids:
            try:
                kind = _integer(found[collection_id], "CollectionType")
            except RowError:
                kind = None
            if kind == DEVICE_COLLECTION_TYPE:
                raise self._fail(
                    "data", f"intune collection {collection_id} is a device collection, not a user collection"
                )
            if kind != USER_COLLECTION_TYPE:
                raise self._fail(
                    "data",
                    f"intune collection {collection_id} is not a user collection "
                    f"(CollectionType {_short(found[collection_id])})",
                )

    def _read_members(self, session: Session) -> Members:
        ids = self._collection_ids
        if not ids:
            return {}
        cursor = session.execute(members_sql(len(ids)), ids, "reading v_FullCollectionMembership")
        return self._collect_members(session, cursor)

    def _read_members_of(self, session: Session, resource_ids: Sequence[int]) -> Members:
        ids = self._collection_ids
        members: dict[int, tuple[str, ...]] = {}
        if not ids:
            return members
        for chunk in _chunks(resource_ids, LOOKUP_CHUNK):
            cursor = session.execute(
                members_of_sql(len(ids), len(chunk)), (*ids, *chunk), "reading v_FullCollectionMembership"
            )
            members.update(self._collect_members(session, cursor))
        return members

    def _collect_members(self, session: Session, cursor: Any) -> MaskedMembers:
        """ResourceID -> bit mask of its collections (bit i: the i-th configured collection).

        One int per member, not a set or tuple of names: at 500,000 members those are a million
        container objects for the garbage collector to walk while the read runs.
        """
        index = column_index(cursor.description, MEMBER_COLUMNS, "v_FullCollectionMembership")
        names = list(self._collection_ids)
        bits = {name: 1 << position for position, name in enumerate(names)}

        def bit_of(name: str) -> int:
            # The query selects the configured collections; any other name (not expected) gets a bit
            # of its own, so that nothing read is lost.
            bit = bits.get(name)
            if bit is None:
                bit = bits[name] = 1 << len(names)
                names.append(name)
            return bit

        masks: dict[int, int] = {}
        get = masks.get
        skipped = 0
        for batch in session.batches(cursor):
            columns = list(zip(*batch, strict=True))
            resource_ids, collections = columns[index["ResourceID"]], columns[index["CollectionID"]]
            if all(r.__class__ is int for r in resource_ids) and all(c.__class__ is str for c in collections):
                # The usual case, without a conversion per row: a few collection ids, integer ids.
                batch_bits = {c: bit_of(c.strip().upper()) for c in set(collections) if c.strip()}
                for resource_id, collection in zip(resource_ids, collections, strict=True):
                    bit = batch_bits.get(collection)
                    if bit:
                        masks[resource_id] = get(resource_id, 0) | bit
                    else:
                        skipped += 1
                continue
            for row in batch:
                try:
                    resource_id = _integer(row[index["ResourceID"]], "ResourceID")
                    collection = _text(row[index["CollectionID"]], "CollectionID")
                except RowError:
                    resource_id = None
                    collection = None
                if resource_id is None or collection is None:
                    skipped += 1
                else:
                    masks[resource_id] = get(resource_id, 0) | bit_of(collection.upper())
        if skipped:
            log.warning(
                "%s: skipped %d membership rows without a usable ResourceID", self.describe(), skipped
            )
        return MaskedMembers(masks, tuple(names))

    def _read_users(self, session: Session, users: UserColumns) -> None:
        """Stream v_R_User into table columns, a fetched batch at a time (no list of records)."""
        cursor = session.execute(USERS_SQL, (), "reading v_R_User")
        index = column_index(cursor.description, USER_COLUMNS, "v_R_User")
        members = users.members
        notes = RowNotes()
        skipped = 0
        first_problem = ""
        for batch in session.batches(cursor):
            try:
                users.add_batch(batch, index, notes)
                continue
            except NotFast:
                pass
            for row in batch:
                try:
                    users.add(user_from_row(row, index, members, notes))
                except RowError as exc:
                    skipped += 1
                    if not first_problem:
                        first_problem = (
                            f"ResourceID {_short(row[index['ResourceID']])}, {_short(str(exc), 200)}"
                        )
        self.last_skipped_rows = skipped
        self.last_clipped_values = notes.clipped
        if skipped and not users.rows:
            raise self._fail(
                "data", f"none of the {skipped} v_R_User rows could be converted (first: {first_problem})"
            )
        if skipped:
            log.warning(
                "%s: skipped %d v_R_User rows that could not be converted (first: %s)",
                self.describe(),
                skipped,
                self._mask.mask(first_problem),
            )
        if notes.clipped:
            log.warning(
                "%s: cut %d v_R_User text values to %d bytes (first: %s)",
                self.describe(),
                notes.clipped,
                MAX_TEXT_BYTES,
                notes.first_clipped,
            )

    def _read_components(self, session: Session) -> tuple[CmComponent, ...]:
        cursor = session.execute(COMPONENTS_SQL, COMPONENT_NAMES, "reading v_ComponentSummarizer")
        index = column_index(cursor.description, COMPONENT_COLUMNS, "v_ComponentSummarizer")
        rows: list[ComponentRow] = []
        skipped = 0
        for row in session.rows(cursor):
            try:
                rows.append(component_row(row, index))
            except RowError:
                skipped += 1
        if skipped:
            log.warning(
                "%s: skipped %d v_ComponentSummarizer rows that could not be converted",
                self.describe(),
                skipped,
            )
        self.last_skipped_rows += skipped
        return select_components(rows)

    # -- trace look-ups
    def _find_users(
        self,
        session: Session,
        sids: Sequence[str],
        guids: Sequence[bytes],
        names: Sequence[str],
        upns: Sequence[str],
    ) -> dict[int, CmUser]:
        found: dict[int, CmUser] = {}
        for column, values in (
            ("SID0", _distinct(sids)),
            ("Unique_User_Name0", _distinct(names)),
            ("User_Principal_Name0", _distinct(upns)),
        ):
            for chunk in _chunks(values, LOOKUP_CHUNK):
                sql = text_lookup_sql(column, len(chunk))
                self._collect_users(session, sql, chunk, f"looking up v_R_User by {column}", found)
        raw = [g for g in dict.fromkeys(bytes(g) for g in guids) if len(g) == 16]
        for forms, what in ((raw, "binary"), ([t for g in raw for t in _guid_text_forms(g)], "GUID text")):
            for chunk in _chunks(forms, LOOKUP_CHUNK):
                self._collect_guid_matches(session, chunk, what, found)
        return found

    def _collect_guid_matches(
        self, session: Session, values: Sequence[bytes], what: str, found: dict[int, CmUser]
    ) -> None:
        """Object_GUID0 compared with binary parameters. A driver or column type that cannot compare
        them (an error of class data/other) is tolerated: the records found by the other keys are
        still returned, and the evaluation matches their GUIDs in Python."""
        try:
            self._collect_users(
                session,
                guid_lookup_sql(len(values)),
                values,
                f"looking up v_R_User by Object_GUID0 ({what})",
                found,
            )
        except session.pyodbc.Error as exc:
            sqlstate, text = odbc_error_parts(exc)
            if session.stop_reason is not None or classify_odbc_error(sqlstate, text, False) not in (
                "data",
                "other",
            ):
                raise
            log.debug("%s: Object_GUID0 cannot be compared with %s values: %s", self.describe(), what, text)

    def _collect_users(
        self, session: Session, sql: str, params: Sequence[object], phase: str, found: dict[int, CmUser]
    ) -> None:
        cursor = session.execute(sql, params, phase)
        index = column_index(cursor.description, USER_COLUMNS, "v_R_User")
        for row in session.rows(cursor):
            try:
                user = user_from_row(row, index, {})
            except RowError as exc:
                log.warning("%s: a matching v_R_User row cannot be converted: %s", self.describe(), exc)
                continue
            found.setdefault(user.resource_id, user)


def _component_meta(components: Iterable[CmComponent]) -> list[list[object]]:
    return [[c.site_code, c.machine_name, c.component_name, c.status] for c in components]


def same_content(first: CmTable, second: CmTable) -> bool:
    """Whether two tables hold the same records, memberships and components (bit for bit)."""
    if first.n != second.n or first.collection_ids != second.collection_ids:
        return False
    if first.components != second.components:
        return False
    for column in CmTable.COLUMNS:
        a, b = first.column(column.name), second.column(column.name)
        if isinstance(a, Blob) and isinstance(b, Blob):
            if not same_bytes(a.data, b.data) or not np.array_equal(a.offsets, b.offsets):
                return False
            if not np.array_equal(a.null_mask(), b.null_mask()):
                return False
        elif isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
            # Bytes, not values: NaN (an unknown time) equals itself here.
            bytes_a, bytes_b = np.ascontiguousarray(a).data.cast("B"), np.ascontiguousarray(b).data.cast("B")
            if a.dtype != b.dtype or not same_bytes(bytes_a, bytes_b):
                return False
        else:
            return False
    return True


def _distinct(values: Iterable[str | None]) -> list[str]:
    return list(dict.fromkeys(v.strip() for v in values if v and v.strip()))


def _guid_text_forms(raw: bytes) -> list[bytes]:
    """GUID text as a database may store it in a binary or text column (ASCII bytes)."""
    text = str(uuid.UUID(bytes_le=raw))
    return [form.encode("ascii") for form in ("{" + text.upper() + "}", text.upper(), text, "{" + text + "}")]


def _chunks(values: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _close_quietly(handle: Any) -> None:
    try:
        handle.close()
    except Exception:
        log.debug("closing an ODBC handle failed", exc_info=True)


def _short(value: object, limit: int = 40) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = [
    "COMPONENT_NAMES",
    "SINCE_MIDNIGHT_TALLY",
    "ConfigMgrSource",
    "build_connection_string",
    "classify_odbc_error",
    "cloud_user_id",
    "column_index",
    "component_row",
    "connection_target",
    "fingerprint_sql",
    "object_guid",
    "parse_connection_string",
    "same_content",
    "select_components",
    "user_from_row",
]
