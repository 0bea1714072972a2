"""Scrape latency while another thread of the exporter process computes: the GIL convoy.

Not a test: run ``python3 benchmarks/bench_convoy.py``. It serves a 10 KB body from the exporter's
own HTTP server (``exporter.httpserver``) in this process, starts background threads that compute
the way a refresh in the serving process does (``python``: a pure-Python loop, as decoding LDAP or
JSON; ``numpy``: array operations that release the GIL inside, as the evaluation), and sends bursts
of 20 new connections at once with ``curl --parallel`` (a client outside this process's GIL), for
each switch interval given.

Why the switch interval matters so much: a request gives the GIL up at every socket call (accept,
recv, send, close); the background thread takes it each time, and the serving thread gets it back
only after the background thread has held it for one switch interval. The accepting thread pays
that once or twice per connection, one connection after another, so the last connection of a
burst of twenty waits about forty switch intervals.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from exporter.httpserver import ExporterHTTPServer, Request, Response, serve_forever_in_thread
from exporter.turns import step_aside
from exporter.webconfig import WebConfig

BODY = b"# a /metrics body of the demo's size\n" * 280


def _python_work(stop: threading.Event, step: Callable[[], None] = lambda: None) -> None:
    while not stop.is_set():
        step()
        table = {}
        for number in range(2000):
            table[number] = str(number)


def _numpy_work(stop: threading.Event, step: Callable[[], None] = lambda: None) -> None:
    import numpy as np

    keys = np.random.default_rng(1).integers(0, 1 << 60, 500_000)
    while not stop.is_set():
        step()
        np.unique(keys, return_inverse=True)
        step()
        np.cumsum(keys)
        step()
        keys[keys % 7 == 0].sum()


# "-turns": the same work stepping aside between steps while connections are served (exporter.turns)
WORK: dict[str, Callable[[threading.Event], None]] = {
    "python": _python_work,
    "numpy": _numpy_work,
    "python-turns": functools.partial(_python_work, step=step_aside),
    "numpy-turns": functools.partial(_numpy_work, step=step_aside),
}


def burst(url: str, connections: int) -> list[float]:
    command = ["curl", "--silent", "--parallel", "--parallel-immediate", "--parallel-max", str(connections)]
    command += ["--write-out", "%{json}\\n"]
    for _ in range(connections):
        command += ["--output", "/dev/null", url]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return [json.loads(line)["time_total"] for line in output.splitlines() if line.strip()]


def measure(url: str, switch_interval: float, work: list[str], bursts: int, connections: int) -> str:
    sys.setswitchinterval(switch_interval)
    stop = threading.Event()
    threads = [threading.Thread(target=WORK[name], args=(stop,), daemon=True) for name in work]
    for thread in threads:
        thread.start()
    try:
        burst(url, connections)  # the server's connection threads exist from here on
        times: list[float] = []
        slowest: list[float] = []
        for _ in range(bursts):
            answered = burst(url, connections)
            times += answered
            slowest.append(max(answered))
            time.sleep(0.2)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    times.sort()

    def ms(fraction: float) -> str:
        return f"{times[min(len(times) - 1, int(fraction * len(times)))] * 1000:.1f}"

    background = "+".join(work) or "none"
    return (
        f"| {switch_interval * 1000:g} ms | {background} | {len(times)} | {ms(0.5)} | {ms(0.9)} | {ms(0.99)} "
        f"| {statistics.median(slowest) * 1000:.1f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--switch-intervals", default="0.005,0.001,0.0005,0.0002", help="seconds, comma-separated"
    )
    parser.add_argument(
        "--work", default="none,python,numpy,python+numpy", help="background work of each row set"
    )
    parser.add_argument("--bursts", type=int, default=30)
    parser.add_argument("--connections", type=int, default=20)
    args = parser.parse_args()

    def app(request: Request) -> Response:
        return Response(200, BODY, "text/plain; version=0.0.4")

    server = ExporterHTTPServer(("127.0.0.1", 0), app, WebConfig())
    serve_forever_in_thread(server)
    url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
    print(f"{args.connections} new connections per burst, {args.bursts} bursts per row")
    print(
        "| switch interval | background | requests | p50 ms | p90 ms | p99 ms | slowest of a burst (median) |"
    )
    print("|---|---|---|---|---|---|---|")
    for work in args.work.split(","):
        names = [] if work == "none" else work.split("+")
        for interval in args.switch_intervals.split(","):
            print(measure(url, float(interval), names, args.bursts, args.connections), flush=True)
    server.shutdown()
    server.server_close()


if __name__ == "__main__":
    main()
