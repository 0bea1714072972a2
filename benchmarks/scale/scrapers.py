"""Concurrent scrapers in a process of their own (so they share no GIL with the driver).

    python -m benchmarks.scale.scrapers --url http://127.0.0.1:9863/metrics --out FILE

Every ``--every`` seconds, ``--concurrency`` threads each open a NEW connection and GET the URL at
the same moment (a barrier releases them together), as that many Prometheus servers would. One
JSON line per request: start time, connect seconds, total seconds (connect included), status,
body bytes, or the error. Runs until stdin closes.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import threading
import time
from typing import Any, TextIO
from urllib.parse import urlsplit


def scrape(host: str, port: int, path: str, timeout: float) -> dict[str, Any]:
    started = time.time()
    t0 = time.perf_counter()
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.connect()
        connected = time.perf_counter()
        connection.request("GET", path, headers={"Accept-Encoding": "identity"})
        response = connection.getresponse()
        body = response.read()
        done = time.perf_counter()
        return {
            "t": started,
            "connect": connected - t0,
            "total": done - t0,
            "status": response.status,
            "bytes": len(body),
        }
    except OSError as exc:
        return {"t": started, "total": time.perf_counter() - t0, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        connection.close()


class Bursts:
    def __init__(self, url: str, concurrency: int, out: TextIO, timeout: float) -> None:
        parts = urlsplit(url)
        self.host, self.port, self.path = parts.hostname or "127.0.0.1", parts.port or 80, parts.path or "/"
        self.concurrency = concurrency
        self.timeout = timeout
        self.out = out
        self.lock = threading.Lock()
        self.barrier = threading.Barrier(concurrency + 1)
        self.stopping = threading.Event()

    def worker(self) -> None:
        while True:
            try:
                self.barrier.wait()
            except threading.BrokenBarrierError:
                return
            if self.stopping.is_set():
                return
            result = scrape(self.host, self.port, self.path, self.timeout)
            with self.lock:
                self.out.write(json.dumps(result) + "\n")
                self.out.flush()

    def run(self, every: float) -> None:
        threads = [threading.Thread(target=self.worker, daemon=True) for _ in range(self.concurrency)]
        for thread in threads:
            thread.start()
        stop_reader = threading.Thread(target=self._wait_for_stdin, daemon=True)
        stop_reader.start()
        next_burst = time.monotonic()
        while not self.stopping.is_set():
            try:
                # Waits until every worker finished its previous request, so a slow exporter
                # gets at most `concurrency` scrapes in flight, never a growing queue.
                self.barrier.wait()
            except threading.BrokenBarrierError:
                break
            next_burst += every
            self.stopping.wait(max(0.0, next_burst - time.monotonic()))
        self.barrier.abort()

    def _wait_for_stdin(self) -> None:
        sys.stdin.read()
        self.stopping.set()
        self.barrier.abort()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--every", type=float, default=1.0)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    with open(args.out, "a", encoding="utf-8") as out:
        Bursts(args.url, args.concurrency, out, args.timeout).run(args.every)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
