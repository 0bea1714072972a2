"""A throw-away PostgreSQL 15 server on 127.0.0.1 for the ConfigMgr source tests.

initdb and the server run as the ``postgres`` user (PostgreSQL refuses to run as root); the data
directory lives in a temporary directory owned by that user and is removed on stop. Every role
connects without a password (``trust``) except :data:`PASSWORD_ROLE`, which needs its password
(scram-sha-256), so that a wrong password is a real login failure.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import closing
from pathlib import Path
from typing import Any

BIN_DIR = Path("/usr/lib/postgresql/15/bin")
PASSWORD_ROLE = "cm_reader"
# Characters that need braces in an ODBC connection string, to prove the quoting.
ROLE_PASSWORD = "p;w}d={x} Ünï"


def available() -> bool:
    if not (BIN_DIR / "initdb").exists() or not (BIN_DIR / "pg_ctl").exists():
        return False
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return os.geteuid() != 0  # a non-root developer can run the server as themselves
    return True


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PostgresServer:
    def __init__(self) -> None:
        self.port = free_port()
        self.host = "127.0.0.1"
        self._root = Path(tempfile.mkdtemp(prefix="cm-postgres-"))
        self.data_dir = self._root / "data"
        self._as_postgres = os.geteuid() == 0
        self._started = False

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        command = list(args)
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, check=True, capture_output=True, text=True, timeout=timeout)

    def start(self) -> None:
        if self._as_postgres:
            entry = pwd.getpwnam("postgres")
            os.chown(self._root, entry.pw_uid, entry.pw_gid)
        self._root.chmod(0o700)
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
        hba = self.data_dir / "pg_hba.conf"
        # The first matching line wins: the password role must authenticate, everyone else is trusted.
        hba.write_text(
            f"host all {PASSWORD_ROLE} 127.0.0.1/32 scram-sha-256\n" + hba.read_text(encoding="utf-8"),
            encoding="utf-8",
        )
        options = (
            f"-c listen_addresses={self.host} -p {self.port} -c unix_socket_directories={self._root}"
            " -c fsync=off -c full_page_writes=off -c synchronous_commit=off"
        )
        # -w polls until the server accepts connections, -t bounds that wait.
        self._run(
            str(BIN_DIR / "pg_ctl"),
            "-D",
            str(self.data_dir),
            "-o",
            options,
            "-l",
            str(self._root / "server.log"),
            "-w",
            "-t",
            "60",
            "start",
            timeout=90,
        )
        self._started = True
        self._wait_until_ready(deadline=time.monotonic() + 30)

    def _wait_until_ready(self, deadline: float) -> None:
        import pyodbc

        while True:
            try:
                pyodbc.connect(self.connection_string("postgres"), timeout=2).close()
                return
            except pyodbc.Error:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.1)

    def stop(self) -> None:
        if self._started:
            self._run(str(BIN_DIR / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop")
            self._started = False
        shutil.rmtree(self._root, ignore_errors=True)

    def log_tail(self) -> str:
        try:
            return (self._root / "server.log").read_text(encoding="utf-8", errors="replace")[-2000:]
        except OSError:
            return ""

    def connection_string(self, database: str, user: str = "postgres", password: str | None = None) -> str:
        text = (
            f"DRIVER={{PostgreSQL Unicode}};Server={self.host};Port={self.port};"
            f"Database={database};UID={user}"
        )
        if password is not None:
            text += ";PWD={" + password.replace("}", "}}") + "}"
        return text

    def admin(self, database: str = "postgres") -> Any:
        import pyodbc

        return pyodbc.connect(self.connection_string(database), autocommit=True, timeout=10)

    def create_database(self, name: str) -> None:
        with closing(self.admin()) as connection:
            connection.execute(f"DROP DATABASE IF EXISTS {name}")
            connection.execute(f"CREATE DATABASE {name}")

    def create_password_role(self) -> None:
        with closing(self.admin()) as connection:
            escaped = ROLE_PASSWORD.replace("'", "''")
            connection.execute(f"CREATE ROLE {PASSWORD_ROLE} LOGIN PASSWORD '{escaped}'")
