"""Benchmark of one ConfigMgr refresh over a 100k-user SQLite ConfigMgr database.

Run from the repository root: ``python benchmarks/bench_configmgr.py [--users N]``. It builds the
database in a temporary directory (the same schema and data generator as the tests), then prints,
for several fetch sizes, the rows per second of a refresh and the peak Python memory it allocates
(tracemalloc, measured in a separate run because tracing slows Python down). Needs unixODBC,
pyodbc and the SQLite3 ODBC driver (libsqliteodbc).
"""

from __future__ import annotations

import argparse
import gc
import sqlite3
import sys
import tempfile
import time
import tracemalloc
from contextlib import closing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.configmgr import cmdb  # (after the sys.path line: needs the repository root)

FETCH_SIZES = (1000, 5000, 50000)


def build_database(path: Path, users: int) -> float:
    started = time.perf_counter()
    with closing(sqlite3.connect(path)) as connection:
        cmdb.populate_bulk(connection, "sqlite", users)
    return time.perf_counter() - started


def timed_refresh(connection_string: str, fetch_size: int) -> tuple[float, int]:
    source = cmdb.make_source(connection_string, (cmdb.INTUNE,), fetch_size=fetch_size)
    gc.collect()
    started = time.perf_counter()
    data = source.refresh(None)
    return time.perf_counter() - started, data.records


def peak_memory(connection_string: str, fetch_size: int) -> int:
    source = cmdb.make_source(connection_string, (cmdb.INTUNE,), fetch_size=fetch_size)
    gc.collect()
    tracemalloc.start()
    try:
        data = source.refresh(None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del data
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument(
        "--repeat", type=int, default=3, help="timed refreshes per fetch size (best is shown)"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-configmgr-") as directory:
        path = Path(directory) / "cm.sqlite"
        build_seconds = build_database(path, args.users)
        connection_string = f"DRIVER={{SQLite3}};Database={path}"
        size_mib = path.stat().st_size >> 20
        print(f"built a {args.users}-user ConfigMgr database in {build_seconds:.1f} s ({size_mib} MiB)")
        print(f"{'fetch_size':>10}  {'best s':>7}  {'rows/s':>9}  {'peak MiB':>8}  {'bytes/user':>10}")
        for fetch_size in FETCH_SIZES:
            runs = [timed_refresh(connection_string, fetch_size) for _ in range(args.repeat)]
            seconds = min(run[0] for run in runs)
            records = runs[0][1]
            assert records == args.users, f"read {records} users, expected {args.users}"
            peak = peak_memory(connection_string, fetch_size)
            print(
                f"{fetch_size:>10}  {seconds:>7.2f}  {records / seconds:>9,.0f}  {peak / 2**20:>8.1f}"
                f"  {peak / records:>10,.0f}"
            )


if __name__ == "__main__":
    main()
