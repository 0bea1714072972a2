"""Fixtures of the ConfigMgr source tests: real ODBC databases on two backends.

``database_factory`` is parametrized over SQLite (``SQLite3`` ODBC driver, a file) and PostgreSQL
(``PostgreSQL Unicode`` ODBC driver, a server started for the session), so every test that uses
it runs against both.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from tests.configmgr import cmdb, postgres
from tests.conftest import require_component

BULK_USERS = 100_000
Fill = Callable[[Any, cmdb.Backend], None]


def odbc_drivers() -> list[str]:
    try:
        import pyodbc
    except ImportError:
        return []
    return list(pyodbc.drivers())


def require_odbc_driver(name: str, package: str) -> None:
    require_component(f"ODBC driver {name!r}", name in odbc_drivers(), f"apt-get install unixodbc {package}")


class DatabaseFactory:
    def __init__(
        self, backend: cmdb.Backend, directory: Path, server: postgres.PostgresServer | None
    ) -> None:
        self.backend = backend
        self.directory = directory
        self.server = server

    def connect(self, name: str) -> Any:
        """A DB-API connection (``?`` parameters on both backends) to change a database the tests
        created: the stdlib sqlite3 module for SQLite, pyodbc for PostgreSQL. Commit explicitly."""
        if self.backend == "sqlite":
            return sqlite3.connect(self.directory / f"{name}.sqlite", timeout=30)
        assert self.server is not None
        import pyodbc

        return pyodbc.connect(self.server.connection_string(name), timeout=10)

    def change(self, name: str, *statements: tuple[str, Sequence[object]]) -> None:
        """Run statements (SQL, parameters) in one committed transaction."""
        with closing(self.connect(name)) as connection:
            cursor = connection.cursor()
            for sql, params in statements:
                cursor.execute(sql, params)
            connection.commit()

    def create(self, name: str, fill: Fill) -> str:
        """Build a database, fill it and return the ODBC connection string the source uses."""
        if self.backend == "sqlite":
            path = self.directory / f"{name}.sqlite"
            path.unlink(missing_ok=True)
            with closing(sqlite3.connect(path)) as connection:
                fill(connection, "sqlite")
            return f"DRIVER={{SQLite3}};Database={path}"
        assert self.server is not None
        import pyodbc

        self.server.create_database(name)
        with closing(pyodbc.connect(self.server.connection_string(name), timeout=10)) as connection:
            fill(connection, "postgresql")
            connection.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {postgres.PASSWORD_ROLE}")
            connection.commit()
        return self.server.connection_string(name)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[postgres.PostgresServer]:
    require_odbc_driver("PostgreSQL Unicode", "odbc-postgresql")
    require_component("PostgreSQL 15 server", postgres.available(), "apt-get install postgresql")
    server = postgres.PostgresServer()
    try:
        server.start()
        server.create_password_role()
    except Exception:
        log = server.log_tail()
        server.stop()
        pytest.fail(f"PostgreSQL did not start:\n{log}")
    yield server
    server.stop()


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def database_factory(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> DatabaseFactory:
    backend: cmdb.Backend = request.param
    if backend == "sqlite":
        require_odbc_driver("SQLite3", "libsqliteodbc")
        return DatabaseFactory("sqlite", tmp_path_factory.mktemp("cm-sqlite"), None)
    server = request.getfixturevalue("pg_server")
    return DatabaseFactory("postgresql", Path(), server)


@pytest.fixture(scope="session")
def cases_db(database_factory: DatabaseFactory) -> str:
    return database_factory.create("cm_cases", cmdb.populate_cases)


@pytest.fixture(scope="session")
def bulk_db(database_factory: DatabaseFactory) -> str:
    return database_factory.create("cm_bulk", lambda c, b: cmdb.populate_bulk(c, b, BULK_USERS))
