"""What the end-to-end tests share: AD accounts on the session's Samba DC, a Graph simulator, the
exporter as a subprocess, the ``trace`` command as a subprocess, and reading what they answer.

Nothing here knows what a test expects: every expected value is written in the test modules from
CONTRACT.md's tables, never computed with the exporter's own code.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import ldap3
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.ad.samba import DOMAIN_DN, USER_CLASSES, SambaDC
from tests.conftest import require_component
from tests.entra.graph_sim import GraphSimulator

ROOT = Path(__file__).resolve().parents[2]
START_DEADLINE = 45.0
NETBIOS = "TEST"  # the Samba domain's NetBIOS name (tests.ad.samba.NETBIOS)
USER_PASSWORD = "User!Accept-5678"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


# ------------------------------------------------------------------------------ Active Directory
@dataclass(frozen=True)
class AdAccount:
    """What Samba assigned to one user, read back as Administrator with ldap3's own formatting."""

    dn: str
    sam: str
    upn: str | None
    guid_raw: bytes  # objectGUID as stored (little-endian struct)
    guid_text: str  # ldap3's rendering: "{...}", lower case
    sid: str
    when_created: datetime

    @property
    def immutable_id(self) -> str:
        """Entra Connect's onPremisesImmutableId with sourceAnchor objectGUID."""
        return base64.b64encode(self.guid_raw).decode("ascii")


@dataclass(frozen=True)
class NewUser:
    ou: str
    sam: str
    upn: str | None
    enabled: bool = True


def add_ou(conn: ldap3.Connection, dn: str) -> None:
    conn.add(dn, ["top", "organizationalUnit"])


def add_user(conn: ldap3.Connection, user: NewUser, password: str = USER_PASSWORD) -> None:
    attributes: dict[str, Any] = {
        "sAMAccountName": user.sam,
        "unicodePwd": f'"{password}"'.encode("utf-16-le"),
        "userAccountControl": 512 if user.enabled else 514,
    }
    if user.upn:
        attributes["userPrincipalName"] = user.upn
    conn.add(f"CN={user.sam},{user.ou}", USER_CLASSES, attributes)


def create_users(samba_dc: SambaDC, ous: Sequence[str], users: Iterable[NewUser]) -> None:
    with samba_dc.admin() as conn:
        for ou in ous:
            add_ou(conn, ou)
        for user in users:
            add_user(conn, user)


def create_service_account(samba_dc: SambaDC, sam: str, password: str) -> str:
    """An ordinary domain user in CN=Users for the exporter to bind as; returns its UPN."""
    upn = f"{sam}@test.local"
    with samba_dc.admin() as conn:
        add_user(conn, NewUser(f"CN=Users,{DOMAIN_DN}", sam, upn), password)
    return upn


def read_accounts(samba_dc: SambaDC, bases: Iterable[str]) -> dict[str, AdAccount]:
    """Every user under ``bases`` by sAMAccountName."""
    accounts: dict[str, AdAccount] = {}
    attributes = ["sAMAccountName", "userPrincipalName", "objectGUID", "objectSid", "whenCreated"]
    with samba_dc.admin(schema=True) as conn:
        for base in bases:
            conn.search(base, "(objectClass=user)", ldap3.SUBTREE, attributes=attributes)
            for entry in conn.response:
                if entry["type"] != "searchResEntry":
                    continue
                values = entry["attributes"]
                accounts[values["sAMAccountName"]] = AdAccount(
                    dn=entry["dn"],
                    sam=values["sAMAccountName"],
                    upn=values.get("userPrincipalName") or None,
                    guid_raw=entry["raw_attributes"]["objectGUID"][0],
                    guid_text=values["objectGUID"],
                    sid=values["objectSid"],
                    when_created=values["whenCreated"],
                )
    return accounts


# ------------------------------------------------------------------------------ Graph simulator
@dataclass
class Graph:
    sim: GraphSimulator
    ca_file: str


def start_graph(directory: Path) -> Graph:
    try:
        import trustme
    except ImportError:
        trustme = None  # type: ignore[assignment]
    require_component("trustme", trustme is not None, "pip install trustme")
    ca = trustme.CA()
    ca_file = directory / "graph-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    sim = GraphSimulator(ca)
    sim.start()
    return Graph(sim, str(ca_file))


# ------------------------------------------------------------------------------ small helpers
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def odbc_drivers() -> list[str]:
    try:
        import pyodbc
    except ImportError:
        return []
    return list(pyodbc.drivers())


def require_sqlite_odbc() -> None:
    require_component("ODBC driver 'SQLite3'", "SQLite3" in odbc_drivers(), "apt-get install libsqliteodbc")


def epoch(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def plain_guid(text: str) -> str:
    """GUID text without braces, lower case (to compare renderings)."""
    return text.strip().strip("{}").lower()


# ------------------------------------------------------------------------------ the exporter
class Exporter:
    """``python -m exporter`` in a subprocess, its output in a file."""

    def __init__(
        self,
        config: Path,
        log_file: Path,
        env: dict[str, str] | None = None,
        web_config: Path | None = None,
        auth: tuple[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.log_file = log_file
        self.auth = auth
        command = [
            sys.executable,
            "-m",
            "exporter",
            "--config.file",
            str(config),
            "--web.listen-address",
            f"127.0.0.1:{self.port}",
            "--log.level",
            "debug",
        ]
        if web_config is not None:
            command += ["--web.config.file", str(web_config)]
        with log_file.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                cwd=ROOT,
                env={**os.environ, **(env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def get(self, path: str, auth: tuple[str, str] | bool | None = True) -> tuple[int, str]:
        """GET a path; ``auth`` True uses the exporter's credentials, None/False sends none."""
        credentials = self.auth if auth is True else (auth or None)
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}")
        if credentials:
            token = base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def get_json(self, path: str) -> Any:
        status, text = self.get(path)
        assert status == 200, (path, status, text[:2000])
        return json.loads(text)

    def trace(self, user: str, **params: str) -> tuple[int, Any]:
        """GET /trace?user=...&format=json; (status, parsed body)."""
        status, text = self.get("/trace?" + urlencode({"user": user, "format": "json", **params}))
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def wait_ready(self) -> float:
        """Poll /-/ready until 200; returns the seconds it took."""
        started = time.monotonic()
        last = "no answer"
        while time.monotonic() - started < START_DEADLINE:
            self._fail_if_exited()
            try:
                status, body = self.get("/-/ready")
                if status == 200:
                    return time.monotonic() - started
                last = f"{status} {body.strip()}"
            except (urllib.error.URLError, ConnectionError) as exc:
                last = repr(exc)
            time.sleep(0.1)
        pytest.fail(f"exporter not ready within {START_DEADLINE:.0f}s ({last}):\n{self.log()[-4000:]}")

    def wait_evaluated(self, estates: Sequence[str]) -> Samples:
        """After ready: wait until every estate was evaluated after its sources' last refresh and
        the result is stable for a second; returns that scrape."""
        deadline = time.monotonic() + START_DEADLINE
        previous: Any = None
        while time.monotonic() < deadline:
            self._fail_if_exited()
            samples = self.metrics()
            stuck = self.get_json("/stuck")
            current = (stage_metrics(samples), stuck_users_of(stuck))
            if all(_evaluated_after_sources(samples, stuck, name) for name in estates):
                if current == previous:
                    return samples
                previous = current
            time.sleep(1.0)
        pytest.fail(
            f"estates {list(estates)} not evaluated within {START_DEADLINE:.0f}s:\n{self.log()[-4000:]}"
        )

    def _fail_if_exited(self) -> None:
        if self.process.poll() is not None:
            pytest.fail(f"exporter exited with {self.process.returncode}:\n{self.log()[-4000:]}")

    def metrics(self) -> Samples:
        status, text = self.get("/metrics")
        assert status == 200, text
        return parse_metrics(text)

    def stop(self) -> int:
        """SIGTERM, as a service manager would; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
                pytest.fail(f"exporter ignored SIGTERM for 20s:\n{self.log()[-4000:]}")
        return self.process.returncode


def _evaluated_after_sources(samples: Samples, stuck: dict[str, Any], estate: str) -> bool:
    entry = next((e for e in stuck["estates"] if e["estate"] == estate), None)
    if entry is None or not entry.get("evaluated_at"):
        return False
    successes = [
        v
        for (name, labels), v in samples.items()
        if name == "intune_exporter_source_last_success_timestamp_seconds" and ("estate", estate) in labels
    ]
    return bool(successes) and epoch(entry["evaluated_at"]) >= int(max(successes))


def stage_metrics(samples: Samples) -> Samples:
    return {key: v for key, v in samples.items() if key[0].startswith("intune_provisioning_")}


def stuck_users_of(stuck: dict[str, Any]) -> list[tuple[str, str, str, str | None]]:
    """(estate, stage, user, reason) of every user /stuck lists."""
    return sorted(
        (estate["estate"], stage, user["user"], user.get("reason"))
        for estate in stuck["estates"]
        for stage, item in estate["stages"].items()
        for user in item.get("users", [])
    )


def parse_metrics(text: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, estate: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted({"estate": estate, **labels}.items()))))


def series(samples: Samples, name: str, estate: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every series of one metric in one estate, keyed by its labels other than estate."""
    found = {}
    for (sample_name, labels), v in samples.items():
        if sample_name == name and ("estate", estate) in labels:
            found[tuple(item for item in labels if item[0] != "estate")] = v
    return found


def write_web_config(directory: Path, user: str, password: str) -> Path:
    import bcrypt

    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    path = directory / "web-config.yml"
    path.write_text(f"basic_auth_users:\n  {user}: '{hashed}'\n")
    return path


# ------------------------------------------------------------------------------ the trace command
@dataclass(frozen=True)
class TraceRun:
    args: tuple[str, ...]
    code: int
    stdout: str
    stderr: str

    def document(self) -> Any:
        try:
            return json.loads(self.stdout)
        except ValueError:
            pytest.fail(
                f"trace {self.args} printed no JSON (exit {self.code}):\n{self.stdout}\n{self.stderr}"
            )

    def __str__(self) -> str:
        return f"trace {' '.join(self.args)} -> {self.code}\nstdout: {self.stdout[-1500:]}\nstderr: {self.stderr[-1500:]}"


def run_trace(args: Sequence[str], env: dict[str, str] | None = None, timeout: float = 90) -> TraceRun:
    """``intune-provisioning-exporter trace ARGS`` as a user runs it (``python -m exporter``)."""
    result = subprocess.run(
        [sys.executable, "-m", "exporter", "trace", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    return TraceRun(tuple(args), result.returncode, result.stdout, result.stderr)


def run_traces(
    arg_lists: Sequence[Sequence[str]], env: dict[str, str] | None = None, workers: int = 4
) -> list[TraceRun]:
    """Several trace commands, a few at a time (each one is a fresh Python process)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda args: run_trace(args, env), arg_lists))


def sql_statements(trace_file: Path) -> list[str]:
    """The SQL the SQLite ODBC driver prepared, from its ``Tracefile`` (one string per statement)."""
    statements: list[str] = []
    current: list[str] | None = None
    for line in trace_file.read_text(errors="replace").splitlines():
        if line.startswith("-- sqlite3_prepare_v2: "):
            if current is not None:
                statements.append(" ".join(current))
            current = [line.removeprefix("-- sqlite3_prepare_v2: ")]
        elif current is not None and not line.startswith("-- "):
            current.append(line)
        elif current is not None:
            statements.append(" ".join(current))
            current = None
    if current is not None:
        statements.append(" ".join(current))
    return statements
