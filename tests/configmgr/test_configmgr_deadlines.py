"""Deadlines, locks, hangs and aborts with the real drivers (issue 12).

What each driver does with a locked database, as measured here (Debian 12):

- SQLite (sqliteodbc): SQL_ATTR_QUERY_TIMEOUT is accepted and ignored; a database locked by another
  connection (BEGIN EXCLUSIVE) blocks for the driver's busy timeout, 100 s by default, at connect and
  once or twice per statement, and SQLCancel does not interrupt that wait (it does end a running
  query). The source therefore connects with ``Timeout=1`` and waits for a lock in short
  ``PRAGMA busy_timeout`` slices, retrying until the statement's limit is spent.
- PostgreSQL (psqlODBC): SQL_ATTR_QUERY_TIMEOUT is rejected; ``SET statement_timeout`` ends both a
  slow query and a wait for a locked table; SQLCancel works, but not against a backend that stopped
  answering, and SQLDisconnect from another thread waits for the blocked call: only shutting the
  connection's socket down ends that.

Each test would hang (or take the driver's 100 s) without the corresponding fix.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import pytest

from exporter.config import Config, EstateConfig
from exporter.engine import Engine
from exporter.model import CmTable
from exporter.sources.base import SourceError
from tests.configmgr import cmdb, postgres
from tests.configmgr.conftest import DatabaseFactory, require_odbc_driver

# Slack for a busy 2-core machine: a limit of N seconds may end a little after N.
SLACK = 1.5


def refresh_failure(source: Any, deadline_in: float) -> tuple[SourceError, float]:
    started = time.monotonic()
    with pytest.raises(SourceError) as caught:
        source.refresh(None, started + deadline_in)
    return caught.value, time.monotonic() - started


# ------------------------------------------------------------------------------------ SQLite
@pytest.fixture(scope="module")
def sqlite_factory(tmp_path_factory: pytest.TempPathFactory) -> DatabaseFactory:
    require_odbc_driver("SQLite3", "libsqliteodbc")
    return DatabaseFactory("sqlite", tmp_path_factory.mktemp("cm-locks"), None)


@pytest.fixture(scope="module")
def sqlite_cases(sqlite_factory: DatabaseFactory) -> str:
    return sqlite_factory.create("cm_lock_cases", cmdb.populate_cases)


@contextmanager
def sqlite_locked(connection_string: str) -> Iterator[None]:
    """Another connection holds an exclusive lock on the database file."""
    path = connection_string.split("Database=", 1)[1]
    locker = sqlite3.connect(path, isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        yield
    finally:
        locker.rollback()
        locker.close()


def test_sqlite_locked_database_fails_after_query_timeout(sqlite_cases: str) -> None:
    source = cmdb.make_source(sqlite_cases, query_timeout=2)
    with sqlite_locked(sqlite_cases):
        error, took = refresh_failure(source, deadline_in=60)
    assert error.reason == "timeout"
    assert "database is locked" in error.message
    assert "query timed out (query_timeout 2s) while reading v_Collection" in error.message
    assert 1.9 <= took < 2 + SLACK
    # The lock is gone: the next refresh opens a new connection and works.
    assert source.refresh(None, time.monotonic() + 60).records == len(cmdb.CASE_USERS) - 1


def test_sqlite_locked_database_fails_by_the_deadline_before_query_timeout(sqlite_cases: str) -> None:
    source = cmdb.make_source(sqlite_cases, query_timeout=60)
    with sqlite_locked(sqlite_cases):
        error, took = refresh_failure(source, deadline_in=3)
    assert error.reason == "timeout"
    # The statement's limit (the time left) and the watchdog end at the same moment: either reports it.
    assert "the time left before the refresh deadline" in error.message or "deadline passed" in error.message
    assert "database is locked" in error.message
    assert took < 3  # the source stops a moment before the deadline, so its own error is reported


def test_sqlite_abort_ends_a_lock_wait_within_a_slice(sqlite_cases: str) -> None:
    source = cmdb.make_source(sqlite_cases, query_timeout=60)
    with sqlite_locked(sqlite_cases):
        outcome = run_in_thread(lambda: source.refresh(None, time.monotonic() + 60))
        time.sleep(1.0)
        aborted_at = time.monotonic()
        source.abort()
        result = outcome.result(timeout=10)
        assert time.monotonic() - aborted_at < 1.0
    assert isinstance(result, SourceError) and result.reason == "timeout"
    assert "deadline passed while reading v_Collection" in result.message


def test_sqlite_running_query_is_cancelled_by_abort(sqlite_factory: DatabaseFactory) -> None:
    """SQLCancel interrupts a running SQLite query (it cannot interrupt a lock wait)."""

    def slow_view(connection: Any, backend: cmdb.Backend) -> None:
        cmdb.populate_cases(connection, backend)
        cursor = connection.cursor()
        cursor.execute("DROP VIEW v_R_User")
        # A three-way cross join of 4000 rows: minutes of work for SQLite, and one row per ResourceID.
        cursor.execute("CREATE TABLE Numbers (n INTEGER)")
        cursor.executemany("INSERT INTO Numbers VALUES (?)", [(n,) for n in range(4000)])
        cursor.execute(
            "CREATE VIEW v_R_User AS SELECT u.ItemKey AS ResourceID, u.Unique_User_Name0,"
            " u.User_Principal_Name0, u.SID0, u.Object_GUID0, u.Creation_Date0, u.CloudUserId"
            " FROM User_DISC u WHERE (SELECT count(*) FROM Numbers a, Numbers b, Numbers c) >= 0"
        )
        connection.commit()

    connection_string = sqlite_factory.create("cm_slow_query", slow_view)
    source = cmdb.make_source(connection_string, query_timeout=60)
    outcome = run_in_thread(lambda: source.refresh(None, time.monotonic() + 60))
    time.sleep(1.0)  # reading v_R_User by now (the earlier statements take milliseconds)
    aborted_at = time.monotonic()
    source.abort()
    result = outcome.result(timeout=10)
    assert time.monotonic() - aborted_at < 3
    assert isinstance(result, SourceError) and result.reason == "timeout"
    assert "deadline passed while reading v_R_User" in result.message


def test_engine_reports_the_locked_database_not_a_hung_refresh(sqlite_cases: str) -> None:
    source = cmdb.make_source(sqlite_cases, query_timeout=60)
    engine = Engine(
        Config(estates=(EstateConfig(name="t"),), refresh_timeout=4),
        {"t": [source]},  # type: ignore[list-item]
    )
    with sqlite_locked(sqlite_cases):
        started = time.monotonic()
        engine.refresh("t", "configmgr")
        took = time.monotonic() - started
    status = source_status(engine)
    assert took < 4.5
    assert status.last_error is not None and status.last_error.startswith("timeout: configmgr ")
    assert "database is locked" in status.last_error and "did not finish" not in status.last_error
    engine.refresh("t", "configmgr")  # the next refresh starts fresh
    status = source_status(engine)
    assert status.up and status.records == len(cmdb.CASE_USERS) - 1


def source_status(engine: Engine) -> Any:
    estate = engine.snapshot().estate("t")
    assert estate is not None
    return estate.sources["configmgr"]


class _Outcome:
    def __init__(self) -> None:
        self._done = threading.Event()
        self._value: object = None

    def set(self, value: object) -> None:
        self._value = value
        self._done.set()

    def result(self, timeout: float) -> object:
        assert self._done.wait(timeout), "the refresh did not end"
        return self._value


def run_in_thread(work: Any) -> _Outcome:
    outcome = _Outcome()

    def run() -> None:
        try:
            outcome.set(work())
        except BaseException as exc:
            outcome.set(exc)

    threading.Thread(target=run, daemon=True).start()
    return outcome


# -------------------------------------------------------------------------------- PostgreSQL
@pytest.fixture(scope="module")
def pg_factory(pg_server: postgres.PostgresServer) -> DatabaseFactory:
    return DatabaseFactory("postgresql", Path(), pg_server)


@pytest.fixture(scope="module")
def pg_cases(pg_factory: DatabaseFactory) -> str:
    return pg_factory.create("cm_lock_cases", cmdb.populate_cases)


@contextmanager
def pg_table_locked(server: postgres.PostgresServer, database: str) -> Iterator[None]:
    """Another session holds an ACCESS EXCLUSIVE lock on User_DISC (what ALTER TABLE or a
    VACUUM FULL would hold)."""
    import pyodbc

    locker = pyodbc.connect(server.connection_string(database), autocommit=False, timeout=10)
    try:
        locker.execute("LOCK TABLE User_DISC IN ACCESS EXCLUSIVE MODE")
        yield
    finally:
        locker.rollback()
        locker.close()


def lock_waiters(server: postgres.PostgresServer, database: str) -> list[int]:
    with closing(server.admin()) as admin:
        rows = admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = ? AND wait_event_type = 'Lock'", database
        ).fetchall()
    return [int(row[0]) for row in rows]


def wait_for_lock_waiter(server: postgres.PostgresServer, database: str) -> int:
    deadline = time.monotonic() + 15
    while True:
        waiters = lock_waiters(server, database)
        if waiters:
            return waiters[0]
        assert time.monotonic() < deadline, "the refresh never waited for the lock"
        time.sleep(0.05)


def test_postgres_locked_table_fails_after_query_timeout(
    pg_server: postgres.PostgresServer, pg_cases: str
) -> None:
    source = cmdb.make_source(pg_cases, query_timeout=1)
    with pg_table_locked(pg_server, "cm_lock_cases"):
        error, took = refresh_failure(source, deadline_in=60)
        assert not lock_waiters(pg_server, "cm_lock_cases"), "the statement was left waiting on the server"
    assert error.reason == "timeout"
    assert "query timed out (query_timeout 1s)" in error.message and "statement timeout" in error.message
    assert took < 1 + SLACK
    assert source.refresh(None, time.monotonic() + 60).records == len(cmdb.CASE_USERS) - 1


def test_postgres_locked_table_fails_by_the_deadline_before_query_timeout(
    pg_server: postgres.PostgresServer, pg_cases: str
) -> None:
    source = cmdb.make_source(pg_cases, query_timeout=60)
    with pg_table_locked(pg_server, "cm_lock_cases"):
        error, took = refresh_failure(source, deadline_in=3)
    assert error.reason == "timeout"
    assert "the time left before the refresh deadline" in error.message or "deadline passed" in error.message
    assert "checking v_R_User for changes" in error.message
    assert took < 3


def test_postgres_abort_cancels_a_lock_wait_at_once(
    pg_server: postgres.PostgresServer, pg_cases: str
) -> None:
    source = cmdb.make_source(pg_cases, query_timeout=60)
    with pg_table_locked(pg_server, "cm_lock_cases"):
        outcome = run_in_thread(lambda: source.refresh(None, time.monotonic() + 60))
        wait_for_lock_waiter(pg_server, "cm_lock_cases")
        aborted_at = time.monotonic()
        source.abort()
        result = outcome.result(timeout=10)
        assert time.monotonic() - aborted_at < 2
        assert not lock_waiters(pg_server, "cm_lock_cases")
    assert isinstance(result, SourceError) and result.reason == "timeout"
    assert "the refresh deadline passed while checking v_R_User for changes" in result.message


def test_postgres_hung_backend_is_cut_off_at_the_deadline(
    pg_server: postgres.PostgresServer, pg_cases: str
) -> None:
    """A server that stops answering mid-statement (its backend process stopped): statement_timeout
    and SQLCancel cannot reach it, close() would wait for the blocked call; the source shuts the
    connection's socket down and the refresh still ends by its deadline."""
    source = cmdb.make_source(pg_cases, query_timeout=60)
    stopped: list[int] = []
    try:
        with pg_table_locked(pg_server, "cm_lock_cases"):
            started = time.monotonic()
            outcome = run_in_thread(lambda: source.refresh(None, started + 4))
            backend = wait_for_lock_waiter(pg_server, "cm_lock_cases")
            os.kill(backend, signal.SIGSTOP)
            stopped.append(backend)
            result = outcome.result(timeout=15)
            took = time.monotonic() - started
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
    assert isinstance(result, SourceError) and result.reason == "timeout", result
    assert "the refresh deadline passed while checking v_R_User for changes" in result.message
    assert took < 4 + 0.5
    assert source.refresh(None, time.monotonic() + 60).records == len(cmdb.CASE_USERS) - 1


def test_postgres_engine_reports_the_source_error_and_recovers(
    pg_server: postgres.PostgresServer, pg_cases: str
) -> None:
    source = cmdb.make_source(pg_cases, query_timeout=60)
    engine = Engine(
        Config(estates=(EstateConfig(name="t"),), refresh_timeout=3),
        {"t": [source]},  # type: ignore[list-item]
    )
    with pg_table_locked(pg_server, "cm_lock_cases"):
        started = time.monotonic()
        engine.refresh("t", "configmgr")
        took = time.monotonic() - started
    status = source_status(engine)
    assert took < 3.5
    assert status.last_error is not None and "did not finish" not in status.last_error
    assert status.last_error.startswith("timeout: configmgr 127.0.0.1/cm_lock_cases: ")
    assert "checking v_R_User for changes" in status.last_error
    engine.refresh("t", "configmgr")
    status = source_status(engine)
    assert status.up and status.records == len(cmdb.CASE_USERS) - 1


def test_postgres_close_cancels_a_running_look_up(pg_server: postgres.PostgresServer, pg_cases: str) -> None:
    source = cmdb.make_source(pg_cases, query_timeout=60)
    with pg_table_locked(pg_server, "cm_lock_cases"):
        outcome = run_in_thread(
            lambda: source.find_related(upns=["alice@contoso.com"], deadline=time.monotonic() + 60)
        )
        wait_for_lock_waiter(pg_server, "cm_lock_cases")
        source.close()
        result = outcome.result(timeout=10)
    assert isinstance(result, SourceError) and result.reason == "other"
    assert "cancelled while looking up v_R_User by User_Principal_Name0" in result.message
    assert isinstance(
        source.find_related(upns=["alice@contoso.com"], deadline=time.monotonic() + 60), CmTable
    )


def test_no_handle_is_closed_while_a_cancel_runs_on_the_connection():
    """SQLCancel on a statement freed under it crashes the driver (a segfault seen with psqlODBC when
    a refresh ended while its cancel was still running): the cursor and the connection that the
    owning thread releases meanwhile are closed by the cancel thread once SQLCancel returns."""
    import types

    from exporter.sources.configmgr import Budget, Session

    events: list[str] = []
    cancel_entered, cancel_release = threading.Event(), threading.Event()

    class Handle:
        def __init__(self, name: str) -> None:
            self.name = name

        def cancel(self) -> None:
            cancel_entered.set()
            cancel_release.wait(5)
            events.append(f"cancel {self.name} returned")

        def close(self) -> None:
            events.append(f"close {self.name}")

    session = Session(types.ModuleType("pyodbc"), "", Budget.until(None, 60), 100, False)
    cursor, connection = Handle("cursor"), Handle("connection")
    session._connection = connection
    session._register(cursor)
    session.stop("deadline")
    assert cancel_entered.wait(5)
    session._release(cursor)  # the statement ended (the refresh thread's finally)
    session.close()
    assert events == []  # nothing freed under the running SQLCancel
    cancel_release.set()
    deadline = time.monotonic() + 5
    while len(events) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert events == ["cancel cursor returned", "close cursor", "close connection"]
    session._release(Handle("later"))  # no cancel running any more: closed at once
    assert events[-1] == "close later"
