"""The ConfigMgr site database on PostgreSQL 15, bulk-loaded with ``COPY``.

The tables and the v_* views are the test suite's (tests/configmgr/cmdb.py), so the exporter runs
exactly the SQL it runs against SQL Server, through the ``PostgreSQL Unicode`` ODBC driver. The
server runs as the ``postgres`` user (PostgreSQL refuses root) in a directory of the caller's
choosing, with fsync off: this is a read benchmark.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.scale.estate import EstateFiles
from benchmarks.scale.priority import niced
from benchmarks.scale.slapd import free_port
from tests.configmgr.cmdb import USER_DISC_COLUMNS, schema

BIN_DIR = Path("/usr/lib/postgresql/15/bin")
DATABASE = "cm_ps1"
DRIVER = "PostgreSQL Unicode"
_COPIES: tuple[tuple[str, str, Sequence[str]], ...] = (
    (EstateFiles.CM_USERS, "User_DISC", USER_DISC_COLUMNS),
    (EstateFiles.CM_MEMBERS, "CollectionMembers", ("CollectionID", "ResourceID", "ResourceType")),
    (EstateFiles.CM_COLLECTIONS, "Collections_G", ("CollectionID", "Name", "CollectionType", "MemberCount")),
    (
        EstateFiles.CM_COMPONENTS,
        "Summarizer_Components",
        ("SiteCode", "MachineName", "ComponentName", "Status", "State", "TallyInterval"),
    ),
)


class PostgresServer:
    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = root
        self.port = port or free_port()
        self.data_dir = root / "data"
        self._as_postgres = os.geteuid() == 0
        self._started = False

    def _run(self, *args: str, stdin: Any = None, timeout: float = 600) -> subprocess.CompletedProcess[bytes]:
        command = niced(list(args))
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, check=True, capture_output=True, stdin=stdin, timeout=timeout)

    def start(self) -> None:
        """A fresh cluster (any previous one in ``root`` is removed)."""
        if self.data_dir.exists():
            shutil.rmtree(self.data_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        if self._as_postgres:
            entry = pwd.getpwnam("postgres")
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self.root.chmod(0o700)
        self._run(
            str(BIN_DIR / "initdb"),
            "-D",
            str(self.data_dir),
            "--auth=trust",
            "--username=postgres",
            "--encoding=UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
        )
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.root}"
            " -c fsync=off -c full_page_writes=off -c synchronous_commit=off -c shared_buffers=256MB"
            " -c max_wal_size=4GB"
        )
        self._run(
            str(BIN_DIR / "pg_ctl"),
            "-D",
            str(self.data_dir),
            "-o",
            options,
            "-l",
            str(self.root / "server.log"),
            "-w",
            "-t",
            "60",
            "start",
            timeout=90,
        )
        self._started = True

    def stop(self) -> None:
        if self._started:
            self._run(str(BIN_DIR / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop")
            self._started = False

    @property
    def pid(self) -> int | None:
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def psql(self, sql: str, *, database: str = DATABASE, stdin: Any = None) -> bytes:
        result = self._run(
            str(BIN_DIR / "psql"),
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            "postgres",
            "-d",
            database,
            "-c",
            sql,
            stdin=stdin,
        )
        return result.stdout

    def connection_string(self, *, declare_fetch: bool = True) -> str:
        text = f"DRIVER={{{DRIVER}}};Server=127.0.0.1;Port={self.port};Database={DATABASE};UID=postgres"
        if declare_fetch:
            # psqlODBC reads a whole result set into client memory unless it fetches through a
            # cursor; SQL Server's driver streams. Fetching 472,250 v_R_User rows with pyodbc alone
            # peaked at 294 MiB without this and 72 MiB with it (and took less CPU).
            text += ";UseDeclareFetch=1;Fetch=5000"
        return text

    def load(self, directory: Path, log: Callable[[str], None] = print) -> None:
        """Create the database, the ConfigMgr tables and views, and COPY the generated rows in."""
        self.psql(f"CREATE DATABASE {DATABASE}", database="postgres")
        for statement in schema("postgresql"):
            self.psql(statement)
        for file_name, table, columns in _COPIES:
            started = time.monotonic()
            with (directory / file_name).open("rb") as handle:
                self.psql(f"COPY {table} ({', '.join(columns)}) FROM STDIN WITH (FORMAT csv)", stdin=handle)
            log(f"COPY {table}: {time.monotonic() - started:.1f}s")
        # What a site database has: the membership view is read by collection.
        self.psql("CREATE INDEX ix_members_collection ON CollectionMembers (CollectionID, ResourceType)")
        self.psql("VACUUM ANALYZE")

    def connect(self) -> Any:
        import pyodbc

        return pyodbc.connect(self.connection_string(), autocommit=False, timeout=10)
