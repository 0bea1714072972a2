"""Failures of the ConfigMgr source with real drivers and servers: each maps to its reason, and
no message or log line carries a password or the connection string."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from contextlib import closing
from pathlib import Path

import pytest

from exporter.config import Config, EstateConfig
from exporter.engine import Engine
from exporter.sources.base import ConfigurationError, SourceError
from tests.configmgr import cmdb, postgres
from tests.configmgr.conftest import DatabaseFactory, odbc_drivers, require_odbc_driver
from tests.conftest import require_component

REPO = Path(__file__).resolve().parents[2]
SECRET = "Tr0ub4dor&3;x}y"


def refresh_error(source: object, caplog: pytest.LogCaptureFixture) -> SourceError:
    """Refresh, expect a SourceError, and check the one log line the engine writes for it."""
    with pytest.raises(SourceError) as caught:
        source.refresh(None, time.monotonic() + 60)  # type: ignore[attr-defined]
    assert "\n" not in caught.value.message
    caplog.clear()
    engine = Engine(Config(estates=(EstateConfig(name="t"),)), {"t": [source]})  # type: ignore[list-item]
    with caplog.at_level(logging.WARNING, logger="exporter"):
        engine.refresh("t", "configmgr")
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and caught.value.message in lines[0], lines
    assert f"({caught.value.reason})" in lines[0]
    return caught.value


def assert_no_secret(error: SourceError, *secrets: str) -> None:
    text = f"{error.message} {error!s} {error.args!r}"
    for secret in secrets:
        assert secret not in text
        assert secret.replace("}", "}}") not in text
    assert "PWD" not in text.upper()


# ------------------------------------------------------------------------- FreeTDS (SQL Server)
@pytest.fixture
def freetds() -> None:
    require_odbc_driver("FreeTDS", "tdsodbc")


def test_freetds_closed_port_is_a_network_error(freetds: None, caplog: pytest.LogCaptureFixture) -> None:
    port = postgres.free_port()  # bound and released: nothing listens there
    connection_string = (
        f"DRIVER={{FreeTDS}};SERVER=127.0.0.1;PORT={port};TDS_Version=7.4;DATABASE=CM_PS1;"
        f"UID=cm_reader;PWD={{{SECRET.replace('}', '}}')}}}"
    )
    source = cmdb.make_source(connection_string, query_timeout=5)
    error = refresh_error(source, caplog)
    assert error.reason == "network"
    assert "127.0.0.1/CM_PS1" in error.message
    assert "(20009)" in error.message
    assert_no_secret(error, SECRET)
    assert connection_string not in error.message


def test_freetds_with_configured_user_and_password(freetds: None, caplog: pytest.LogCaptureFixture) -> None:
    port = postgres.free_port()
    source = cmdb.make_source(
        f"DRIVER={{FreeTDS}};SERVER=127.0.0.1;PORT={port};TDS_Version=7.4;DATABASE=CM_PS1",
        username="CONTOSO\\svc-cm",
        password=SECRET,
        query_timeout=5,
    )
    error = refresh_error(source, caplog)
    assert error.reason == "network"
    assert_no_secret(error, SECRET)
    assert source.describe() == "configmgr 127.0.0.1/CM_PS1"


# ------------------------------------------------------------------------- drivers and libraries
def test_driver_not_installed_is_other_and_lists_the_installed_drivers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    installed = odbc_drivers()
    require_component("pyodbc with unixODBC", bool(installed), "apt-get install unixodbc; pip install pyodbc")
    source = cmdb.make_source(
        "DRIVER={ODBC Driver 18 for SQL Server};SERVER=cm01;DATABASE=CM_PS1;UID=svc;PWD={" + SECRET + "}"
    )
    error = refresh_error(source, caplog)
    assert error.reason == "other"
    assert (
        "ODBC driver 'ODBC Driver 18 for SQL Server' is not installed; installed drivers: " in error.message
    )
    for name in installed:
        assert name in error.message
    assert error.message.startswith("configmgr cm01/CM_PS1: ")
    with pytest.raises(ConfigurationError, match="is not installed"):
        source.preflight()


def test_pyodbc_missing_is_other(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "pyodbc", None)  # what `import pyodbc` sees when it is absent
    error = refresh_error(cmdb.make_source("DRIVER={SQLite3};Database=/nonexistent.sqlite"), caplog)
    assert error.reason == "other"
    assert "pyodbc cannot be imported" in error.message


def test_without_a_loadable_libodbc_the_exporter_imports_and_the_source_fails_cleanly(tmp_path: Path) -> None:
    """A libodbc.so.2 that cannot be loaded (found first through LD_LIBRARY_PATH) breaks
    `import pyodbc` exactly as a machine without unixODBC does."""
    require_component("pyodbc", bool(odbc_drivers()), "pip install pyodbc")
    (tmp_path / "libodbc.so.2").write_bytes(b"not a shared object")
    script = """
import sys
import exporter.sources.configmgr as module
assert "pyodbc" not in sys.modules, "importing the source must not import pyodbc"
from exporter.sources.base import SourceError
from tests.configmgr import cmdb
source = cmdb.make_source("DRIVER={SQLite3};Database=/x.sqlite")
try:
    source.refresh(None)
except SourceError as exc:
    print(exc.reason, "|", exc.message)
"""
    env = dict(os.environ, LD_LIBRARY_PATH=str(tmp_path), PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert (
        result.stdout.strip()
        == "other | configmgr /x.sqlite: pyodbc cannot load libodbc.so.2: install unixODBC"
    )


# ---------------------------------------------------------------------------------- PostgreSQL
@pytest.fixture(scope="module")
def pg_factory(pg_server: postgres.PostgresServer) -> DatabaseFactory:
    return DatabaseFactory("postgresql", Path(), pg_server)


@pytest.fixture(scope="module")
def pg_cases(pg_factory: DatabaseFactory) -> str:
    return pg_factory.create("cm_err_cases", cmdb.populate_cases)


@pytest.fixture(scope="module")
def pg_slow(pg_factory: DatabaseFactory) -> str:
    return pg_factory.create("cm_slow", lambda c, b: cmdb.populate_cases(c, b, slow_user_view_seconds=30))


def test_postgres_password_login_with_special_characters(
    pg_server: postgres.PostgresServer, pg_cases: str
) -> None:
    source = cmdb.make_source(
        pg_server.connection_string("cm_err_cases", user="nobody"),
        username=postgres.PASSWORD_ROLE,
        password=postgres.ROLE_PASSWORD,
    )
    assert source.refresh(None, time.monotonic() + 60).records == len(cmdb.CASE_USERS) - 1


def test_postgres_wrong_password_is_auth(
    pg_server: postgres.PostgresServer, pg_cases: str, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "wrong;pass}word"
    source = cmdb.make_source(
        pg_server.connection_string("cm_err_cases"), username=postgres.PASSWORD_ROLE, password=wrong
    )
    error = refresh_error(source, caplog)
    assert error.reason == "auth"
    assert "password authentication failed" in error.message
    assert error.message.startswith("configmgr 127.0.0.1/cm_err_cases: ")
    assert_no_secret(error, wrong)


def test_postgres_wrong_password_in_the_connection_string_is_auth(
    pg_server: postgres.PostgresServer, pg_cases: str, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "not-" + postgres.ROLE_PASSWORD
    connection_string = pg_server.connection_string(
        "cm_err_cases", user=postgres.PASSWORD_ROLE, password=wrong
    )
    error = refresh_error(cmdb.make_source(connection_string), caplog)
    assert error.reason == "auth"
    assert_no_secret(error, wrong)


def test_postgres_closed_port_is_network(
    pg_server: postgres.PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    connection_string = pg_server.connection_string("cm_err_cases").replace(
        f"Port={pg_server.port}", f"Port={postgres.free_port()}"
    )
    error = refresh_error(cmdb.make_source(connection_string, query_timeout=5), caplog)
    assert error.reason == "network"
    assert "127.0.0.1/cm_err_cases" in error.message


def test_postgres_query_timeout(pg_slow: str, caplog: pytest.LogCaptureFixture) -> None:
    source = cmdb.make_source(pg_slow, query_timeout=1)
    started = time.monotonic()
    error = refresh_error(source, caplog)
    assert error.reason == "timeout"
    assert "v_R_User" in error.message and "query_timeout 1s" in error.message
    assert time.monotonic() - started < 10


def _stop_while_reading_v_r_user(pg_server: postgres.PostgresServer, pg_slow: str, stop: str) -> object:
    source = cmdb.make_source(pg_slow, query_timeout=60)
    outcome: list[BaseException | object] = []

    def run() -> None:
        try:
            outcome.append(source.refresh(None, time.monotonic() + 120))
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 15
    with closing(pg_server.admin()) as admin:
        while not admin.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE query LIKE '%FROM v_R_User%' AND pid <> pg_backend_pid()"
        ).fetchval():
            assert time.monotonic() < deadline, "the refresh never reached v_R_User"
            time.sleep(0.05)
    stopped_at = time.monotonic()
    getattr(source, stop)()
    worker.join(timeout=15)
    assert not worker.is_alive()
    assert time.monotonic() - stopped_at < 5
    assert len(outcome) == 1
    return outcome[0]


def test_close_cancels_a_running_refresh(pg_server: postgres.PostgresServer, pg_slow: str) -> None:
    outcome = _stop_while_reading_v_r_user(pg_server, pg_slow, "close")
    assert isinstance(outcome, SourceError)
    assert (
        outcome.reason == "other"
        and "cancelled" in outcome.message
        and "source was closed" in outcome.message
    )


def test_abort_at_the_deadline_is_a_timeout(pg_server: postgres.PostgresServer, pg_slow: str) -> None:
    outcome = _stop_while_reading_v_r_user(pg_server, pg_slow, "abort")
    assert isinstance(outcome, SourceError)
    assert outcome.reason == "timeout" and "the refresh deadline passed while" in outcome.message
