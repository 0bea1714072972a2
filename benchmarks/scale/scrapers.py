"""Concurrent scrapers: bursts of new connections from curl, a client that costs no Python.

    python -m benchmarks.scale.scrapers --url http://127.0.0.1:9863/metrics --out FILE

Every ``--every`` seconds one ``curl --parallel --parallel-immediate`` opens ``--concurrency`` NEW
connections at the same moment and GETs the URL on each, as that many Prometheus servers with the
same scrape offset would. One JSON line per request: burst start time, connect seconds, total
seconds (connect included), status, body bytes, or the error. Runs until stdin closes; a burst that
takes longer than ``--every`` delays the next one (a slow exporter never sees a growing queue).

Why curl: the scrapers share this machine's two cores with the exporter. Python scrapers measured
their own work as the exporter's latency: twenty threads of one process queue for its GIL (p50
9.5 ms against the idle demo, whose answer takes 1 ms); twenty processes woken together compete
for the cores (p50 6.8 ms); curl's twenty transfers in one C event loop measured p50 4.7 ms, p99
19 ms, against the same exporter in the same minute.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from typing import Any, TextIO


def burst(url: str, concurrency: int, timeout: float) -> list[dict[str, Any]]:
    """One burst: ``concurrency`` requests on new connections, opened together."""
    started = time.time()
    command = ["curl", "--silent", "--parallel", "--parallel-immediate", "--parallel-max", str(concurrency)]
    command += ["--max-time", f"{timeout:g}", "--write-out", "%{json}\\n"]
    for _ in range(concurrency):
        command += ["--output", "/dev/null", url]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    results = [_record(json.loads(line), started) for line in completed.stdout.splitlines() if line.strip()]
    missing = concurrency - len(results)
    failure = {
        "t": started,
        "total": 0.0,
        "error": f"curl exited {completed.returncode}: {completed.stderr[:200]}",
    }
    return results + [dict(failure) for _ in range(max(0, missing))]


def _record(transfer: dict[str, Any], started: float) -> dict[str, Any]:
    if transfer.get("exitcode") or not transfer.get("http_code"):
        error = transfer.get("errormsg") or f"curl exit code {transfer.get('exitcode')}"
        return {"t": started, "total": transfer.get("time_total", 0.0), "error": error}
    return {
        "t": started,
        "connect": transfer["time_connect"],
        "total": transfer["time_total"],
        "status": transfer["http_code"],
        "bytes": transfer["size_download"],
    }


def run(url: str, concurrency: int, every: float, timeout: float, out: TextIO, stop: threading.Event) -> None:
    next_burst = time.monotonic()
    while not stop.is_set():
        for result in burst(url, concurrency, timeout):
            out.write(json.dumps(result) + "\n")
        out.flush()
        next_burst += every
        next_burst = max(next_burst, time.monotonic())  # late: start now, do not catch up
        stop.wait(next_burst - time.monotonic())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--every", type=float, default=1.0)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    with open(args.out, "a", encoding="utf-8") as out:
        run(args.url, args.concurrency, args.every, args.timeout, out, stop)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
