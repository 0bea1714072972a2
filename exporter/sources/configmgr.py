"""The ConfigMgr (MECM/SCCM) site database source.

One refresh opens a fresh ODBC connection, runs four queries and closes it again:

1. ``v_Collection``: the configured ``intune_collection_ids`` must exist and be user collections;
2. ``v_FullCollectionMembership``: the user (ResourceType 4) members of those collections;
3. ``v_R_User``: every user record, streamed with ``fetchmany`` and converted row by row;
4. ``v_ComponentSummarizer``: the status of the Intune connector and discovery components.

The SQL is deliberately plain (``?`` parameters, no TOP/NOLOCK/brackets) so that the same queries
run on SQL Server, SQLite and PostgreSQL; column names are matched case-insensitively through
``cursor.description`` (the PostgreSQL driver lower-cases them) and every value is normalised in
Python, whatever type the driver hands back.

Bad data policy: a user or component row whose values cannot be converted (a GUID that is not a
GUID, a date that is not a date, a NULL ResourceID) is skipped, counted in
:attr:`ConfigMgrSource.last_skipped_rows` and reported in one warning per refresh. A result set
that is malformed as a whole (a required column missing, or rows read but none convertible) fails
the refresh with reason ``data``, as does a configured collection id that does not exist or that
is a device collection.

``pyodbc`` is imported on first use, so the rest of the exporter runs on a machine without
unixODBC. Error messages name the server and database, never the connection string or a password.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import re
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from types import ModuleType
from typing import Any

from exporter.config import ConfigMgrConfig
from exporter.ids import epoch_seconds, guid_bytes, guid_text, sid_text
from exporter.model import CmComponent, CmTable, CmTableBuilder, CmUser, ErrorReason, SourceData, SourceKind
from exporter.odbc import attribute_value as _first
from exporter.odbc import (
    build_connection_string,
    connection_secrets,
    connection_target,
    parse_connection_string,
)
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


USERS_SQL = f"SELECT {', '.join(USER_COLUMNS)} FROM v_R_User"
COMPONENTS_SQL = (
    f"SELECT {', '.join(COMPONENT_COLUMNS)} FROM v_ComponentSummarizer"
    f" WHERE ComponentName IN ({_placeholders(len(COMPONENT_NAMES))})"
)


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


def _text(value: object, column: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes | bytearray | memoryview):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise RowError(column, "binary value where text was expected") from None
    text = str(value).strip()
    return text or None


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


def security_identifier(value: object, column: str = "SID0") -> str | None:
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


def user_from_row(values: Sequence[Any], index: dict[str, int], members: Members) -> CmUser:
    """One v_R_User row as a CmUser; raises RowError when a value cannot be converted."""
    resource_id = _integer(values[index["ResourceID"]], "ResourceID")
    if resource_id is None:
        raise RowError("ResourceID", "NULL")
    return CmUser(
        resource_id=resource_id,
        unique_user_name=_text(values[index["Unique_User_Name0"]], "Unique_User_Name0"),
        user_principal_name=_text(values[index["User_Principal_Name0"]], "User_Principal_Name0"),
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


def scrub(text: str, secrets: Iterable[str], limit: int = 400) -> str:
    """One line of driver text without secrets, at most ``limit`` characters."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "<secret>")
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
        self._secrets = connection_secrets(attributes, password)
        self._connection_string = build_connection_string(
            config.connection_string.value, config.username, password
        )
        self._collection_ids = tuple(dict.fromkeys(c.strip().upper() for c in config.intune_collection_ids))
        self._timeout_seconds = max(1, math.ceil(config.query_timeout))
        # The lock guards the cursor of the running query and the cancel flag, which close()
        # uses from another thread. The connection itself only lives inside refresh().
        self._lock = threading.Lock()
        self._cursor: Any = None
        self._cancelled = False
        self._warned_no_query_timeout = False
        self.last_skipped_rows = 0  # rows skipped as unconvertible in the last refresh

    # -- Source protocol
    def describe(self) -> str:
        return f"configmgr {self._target}"

    def refresh(self, previous: SourceData | None, deadline: float | None = None) -> CmTable:
        """Read everything afresh (``previous`` is not needed: one full read is cheap enough)."""
        with self._lock:
            self._cancelled = False
        try:
            pyodbc = self._load_pyodbc()
            self._check_driver(pyodbc)
            return self._read(pyodbc)
        except SourceError as exc:
            # The engine logs every failed refresh once, with the estate; this is only for tracing.
            log.debug("%s", exc.message)
            raise

    def close(self) -> None:
        """Cancel a refresh in progress; that refresh then fails and closes its connection.

        Every refresh opens and closes its own connection, so nothing stays open between
        refreshes, and a later refresh works again.
        """
        with self._lock:
            self._cancelled = True
            if self._cursor is not None:
                try:
                    self._cursor.cancel()  # SQLCancel: the one ODBC call meant for another thread
                except Exception:
                    log.debug("%s: cancelling the running query failed", self.describe())

    def preflight(self) -> None:
        """Raise ConfigurationError when pyodbc, unixODBC or the named driver is missing, for a
        caller that prefers refusing to start over reporting a failing source."""
        try:
            self._check_driver(self._load_pyodbc())
        except SourceError as exc:
            raise ConfigurationError(exc.message) from None

    # -- environment
    def _fail(self, reason: ErrorReason, text: str) -> SourceError:
        return SourceError(reason, f"{self.describe()}: {text}")

    def _load_pyodbc(self) -> ModuleType:
        try:
            return importlib.import_module("pyodbc")
        except ImportError as exc:
            detail = str(exc)
            if "libodbc" in detail:
                raise self._fail("other", "pyodbc cannot load libodbc.so.2: install unixODBC") from None
            raise self._fail("other", f"pyodbc cannot be imported ({scrub(detail, ())})") from None

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

    # -- reading
    def _read(self, pyodbc: ModuleType) -> CmTable:
        self.last_skipped_rows = 0
        phase = "connecting"
        connection: Any = None
        try:
            connection = pyodbc.connect(
                self._connection_string, timeout=self._timeout_seconds, autocommit=True
            )
            self._apply_query_timeout(pyodbc, connection)
            phase = "reading v_Collection"
            self._check_collections(connection)
            phase = "reading v_FullCollectionMembership"
            members = self._read_members(connection)
            phase = "reading v_R_User"
            builder = CmTableBuilder(self._collection_ids)
            self._read_users(connection, members, builder)
            phase = "reading v_ComponentSummarizer"
            builder.components = list(self._read_components(connection))
            table = builder.build()
            table.meta["read"] = "full"
            return table.prepare()
        except pyodbc.Error as exc:
            raise self._translate(exc, phase) from None
        except MalformedResultError as exc:
            raise self._fail("data", str(exc)) from None
        finally:
            with self._lock:
                self._cursor = None
            if connection is not None:
                _close_quietly(connection)

    def _translate(self, exc: BaseException, phase: str) -> SourceError:
        with self._lock:
            cancelled = self._cancelled
        if cancelled:
            return self._fail("other", f"refresh cancelled while {phase}: the source was closed")
        sqlstate, text = odbc_error_parts(exc)
        reason = classify_odbc_error(sqlstate, text, connecting=phase == "connecting")
        what = _REASON_TEXT[reason]
        if reason == "timeout" and phase != "connecting":
            what = f"query timed out (query_timeout {self._timeout_seconds}s)"
        return self._fail(reason, f"{what} while {phase}: {scrub(text, self._secrets)}")

    def _apply_query_timeout(self, pyodbc: ModuleType, connection: Any) -> None:
        """``connection.timeout`` becomes SQL_ATTR_QUERY_TIMEOUT of every statement. The
        PostgreSQL driver rejects the attribute, so there the server's statement_timeout does it."""
        try:
            connection.timeout = self._timeout_seconds
            return
        except pyodbc.Error:
            pass
        dbms = str(connection.getinfo(pyodbc.SQL_DBMS_NAME) or "")
        if dbms.casefold() == "postgresql":
            connection.execute(f"SET statement_timeout = {self._timeout_seconds * 1000}")
        elif not self._warned_no_query_timeout:
            self._warned_no_query_timeout = True
            log.warning("%s: the ODBC driver does not support a query timeout (%s)", self.describe(), dbms)

    def _execute(self, connection: Any, sql: str, params: Sequence[object]) -> Any:
        cursor = connection.cursor()
        with self._lock:
            if self._cancelled:
                cursor.close()
                raise self._fail("other", "refresh cancelled: the source was closed")
            self._cursor = cursor
        cursor.execute(sql, *params)
        return cursor

    def _rows(self, cursor: Any) -> Iterator[Sequence[Any]]:
        """Stream a result set in batches of fetch_size; the caller converts each row at once
        and keeps no pyodbc Row."""
        try:
            while True:
                batch = cursor.fetchmany(self._config.fetch_size)
                if not batch:
                    return
                yield from batch
        finally:
            with self._lock:
                self._cursor = None
            _close_quietly(cursor)

    def _check_collections(self, connection: Any) -> None:
        ids = self._collection_ids
        if not ids:
            return  # the config requires at least one; an empty IN () would not even parse
        cursor = self._execute(connection, collections_sql(len(ids)), ids)
        index = column_index(cursor.description, COLLECTION_COLUMNS, "v_Collection")
        found: dict[str, object] = {}
        for row in self._rows(cursor):
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
                    f"(CollectionType {found[collection_id]!r})",
                )

    def _read_members(self, connection: Any) -> Members:
        ids = self._collection_ids
        if not ids:
            return {}
        cursor = self._execute(connection, members_sql(len(ids)), ids)
        index = column_index(cursor.description, MEMBER_COLUMNS, "v_FullCollectionMembership")
        members: dict[int, set[str]] = {}
        skipped = 0
        for row in self._rows(cursor):
            try:
                resource_id = _integer(row[index["ResourceID"]], "ResourceID")
                collection = _text(row[index["CollectionID"]], "CollectionID")
            except RowError:
                resource_id = None
                collection = None
            if resource_id is None or collection is None:
                skipped += 1
            else:
                members.setdefault(resource_id, set()).add(collection.upper())
        if skipped:
            log.warning(
                "%s: skipped %d membership rows without a usable ResourceID", self.describe(), skipped
            )
        return {rid: tuple(sorted(names)) for rid, names in members.items()}

    def _read_users(self, connection: Any, members: Members, users: CmTableBuilder) -> None:
        """Stream v_R_User into the table builder (no list of records is ever held)."""
        cursor = self._execute(connection, USERS_SQL, ())
        index = column_index(cursor.description, USER_COLUMNS, "v_R_User")
        skipped = 0
        first_problem = ""
        for row in self._rows(cursor):
            try:
                users.add(user_from_row(row, index, members))
            except RowError as exc:
                skipped += 1
                if not first_problem:
                    first_problem = f"ResourceID {_short(row[index['ResourceID']])}, {_short(str(exc), 200)}"
        self.last_skipped_rows = skipped
        if skipped and not users.rows:
            raise self._fail(
                "data", f"none of the {skipped} v_R_User rows could be converted (first: {first_problem})"
            )
        if skipped:
            log.warning(
                "%s: skipped %d v_R_User rows that could not be converted (first: %s)",
                self.describe(),
                skipped,
                first_problem,
            )

    def _read_components(self, connection: Any) -> tuple[CmComponent, ...]:
        cursor = self._execute(connection, COMPONENTS_SQL, COMPONENT_NAMES)
        index = column_index(cursor.description, COMPONENT_COLUMNS, "v_ComponentSummarizer")
        rows: list[ComponentRow] = []
        skipped = 0
        for row in self._rows(cursor):
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
    "object_guid",
    "parse_connection_string",
    "select_components",
    "user_from_row",
]
