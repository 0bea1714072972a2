"""Benchmark of the ConfigMgr source on a large site database (issue 13), PostgreSQL over ODBC.

Run from the repository root (not part of the test run)::

    python benchmarks/bench_configmgr.py [--users 500000] [--backend postgresql|sqlite]

It starts a throw-away PostgreSQL 15 server (the test suite's, tests/configmgr/postgres.py) and fills
a ConfigMgr-shaped database on the server side (``generate_series``; the same rows as the tests'
bulk data set, half of them in the Intune collection), or builds a SQLite file. Every measurement
runs in a fresh Python process, so its peak RSS (VmHWM) belongs to that refresh alone:

- ``full``: ``refresh(None)``, a full read (what the engine asks for at start and every
  ``full_resync_interval``);
- ``unchanged``: a refresh with the previous table when nothing changed: the change check (one
  aggregate row per statement on PostgreSQL) returns the previous table itself; SQLite has no hash
  function, so there it is a full read compared with the previous table;
- ``changed``: the same after 1% of the records changed (CloudUserId set or cleared): a full read.

Printed per measurement: wall time, CPU seconds of the exporter process (user + system), peak RSS and
the RSS before the refresh (interpreter, numpy and pyodbc loaded), the rows fetched and the result.
Needs unixODBC, pyodbc, the ``PostgreSQL Unicode`` (odbc-postgresql) or ``SQLite3`` (libsqliteodbc)
driver, and PostgreSQL 15 for the PostgreSQL backend.
"""

from __future__ import annotations

import argparse
import json
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.configmgr import cmdb  # (after the sys.path line: needs the repository root)
from tests.configmgr.postgres import PostgresServer

SCENARIOS = ("full", "unchanged", "changed")
CHURN = 0.01  # share of the records the "changed" scenario changes


# ------------------------------------------------------------------------------ the child
def _memory_mib(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _change_records(connection_string: str, backend: str, path: str, users: int) -> int:
    """Set or clear the CloudUserId of CHURN of the records (not measured)."""
    step = max(1, round(1 / CHURN))
    sql = (
        "UPDATE User_DISC SET CloudUserId = CASE WHEN CloudUserId IS NULL"
        " THEN 'C0FFEE00-0000-4000-8000-000000000001' ELSE NULL END"
        f" WHERE (ItemKey - {cmdb.BULK_FIRST_ID}) % {step} = 7"
    )
    if backend == "sqlite":
        with closing(sqlite3.connect(path)) as connection:
            changed = connection.execute(sql).rowcount
            connection.commit()
        return int(changed)
    import pyodbc

    with closing(pyodbc.connect(connection_string, timeout=10)) as connection:
        changed = connection.execute(sql).rowcount
        connection.commit()
    return int(changed)


def child(
    connection_string: str, scenario: str, fetch_size: int, backend: str, path: str, users: int
) -> None:
    source = cmdb.make_source(connection_string, (cmdb.INTUNE,), fetch_size=fetch_size, query_timeout=600)
    previous = None
    if scenario != "full":
        previous = source.refresh(None, time.monotonic() + 3600)
        if scenario == "changed":
            _change_records(connection_string, backend, path, users)
    import gc

    gc.collect()
    baseline = _memory_mib("VmRSS")
    # VmHWM is the peak since the process started; reset it so that only this refresh counts.
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
        clear.write("5")
    cpu, wall = _cpu(), time.perf_counter()
    table = source.refresh(previous, time.monotonic() + 3600)
    wall, cpu = time.perf_counter() - wall, _cpu() - cpu
    result = "previous" if table is previous else table.meta.get("read", "?")
    print(
        json.dumps(
            {
                "scenario": scenario,
                "wall": wall,
                "cpu": cpu,
                "peak": _memory_mib("VmHWM"),
                "baseline": baseline,
                "records": table.records,
                "fetched": source.last_rows_fetched,
                "result": result,
            }
        )
    )


# ------------------------------------------------------------------------------ the parent
def build_postgres(server: PostgresServer, users: int) -> str:
    import pyodbc

    server.create_database("cm_bench")
    with closing(pyodbc.connect(server.connection_string("cm_bench"), timeout=10)) as connection:
        cmdb.populate_bulk_server_side(connection, users)
    with closing(server.admin("cm_bench")) as admin:
        admin.execute("VACUUM ANALYZE")
    return server.connection_string("cm_bench")


def build_sqlite(path: Path, users: int) -> str:
    with closing(sqlite3.connect(path)) as connection:
        cmdb.populate_bulk(connection, "sqlite", users)
    return f"DRIVER={{SQLite3}};Database={path}"


def measure(
    connection_string: str, scenario: str, fetch_size: int, backend: str, path: str, users: int
) -> dict[str, Any]:
    command = [
        sys.executable,
        __file__,
        "--child",
        scenario,
        "--connection-string",
        connection_string,
        "--fetch-size",
        str(fetch_size),
        "--backend",
        backend,
        "--path",
        path,
        "--users",
        str(users),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{scenario} failed:\n{done.stderr[-3000:]}")
    measured: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return measured


def report(label: str, rows: list[dict[str, Any]], users: int) -> None:
    print(f"\n{label}")
    print(
        f"{'scenario':<10} {'wall s':>7} {'CPU s':>7} {'peak MiB':>9} {'base MiB':>9} {'fetched':>9}"
        f" {'records':>8} {'users/CPU-s':>11}  result"
    )
    for row in rows:
        rate = users / row["cpu"] if row["cpu"] > 0 else float("inf")
        print(
            f"{row['scenario']:<10} {row['wall']:>7.2f} {row['cpu']:>7.2f} {row['peak']:>9.0f}"
            f" {row['baseline']:>9.0f} {row['fetched']:>9,} {row['records']:>8,} {rate:>11,.0f}"
            f"  {row['result']}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=500_000)
    parser.add_argument("--backend", choices=("postgresql", "sqlite"), default="postgresql")
    parser.add_argument("--fetch-size", type=int, default=5000)
    parser.add_argument("--child", choices=SCENARIOS, help=argparse.SUPPRESS)
    parser.add_argument("--connection-string", help=argparse.SUPPRESS)
    parser.add_argument("--path", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.connection_string, args.child, args.fetch_size, args.backend, args.path, args.users)
        return

    with tempfile.TemporaryDirectory(prefix="bench-configmgr-") as directory:
        started = time.perf_counter()
        server: PostgresServer | None = None
        try:
            if args.backend == "postgresql":
                server = PostgresServer()
                server.start()
                connection_string = build_postgres(server, args.users)
                variants = {
                    "PostgreSQL Unicode (psqlODBC reads the whole result set first)": connection_string,
                    "PostgreSQL Unicode, UseDeclareFetch=1 (a server cursor, fetch_size rows per trip)": (
                        f"{connection_string};UseDeclareFetch=1;Fetch={args.fetch_size}"
                    ),
                }
                path = ""
            else:
                path = str(Path(directory) / "cm.sqlite")
                connection_string = build_sqlite(Path(path), args.users)
                variants = {"SQLite3 ODBC driver": connection_string}
            built = time.perf_counter() - started
            print(f"built a {args.users:,}-user {args.backend} ConfigMgr database in {built:.1f} s")
            for label, text in variants.items():
                rows = []
                for scenario in SCENARIOS:
                    # "changed" toggles CloudUserIds in place: later variants read the toggled data.
                    rows.append(measure(text, scenario, args.fetch_size, args.backend, path, args.users))
                report(label, rows, args.users)
        finally:
            if server is not None:
                server.stop()


if __name__ == "__main__":
    main()
