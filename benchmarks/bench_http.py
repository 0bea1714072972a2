"""HTTP latency of the exporter process: /metrics p50/p95/p99 for plain HTTP and TLS + basic auth,
with 1 and 20 concurrent scrapers, each on keep-alive connections and on a new connection per scrape.

Not a test: run ``python3 benchmarks/bench_http.py [--requests N]``. It starts ``--demo`` twice (plain,
and with a web config for TLS + bcrypt basic auth) on loopback, waits until ready, then drives each
scenario. By default the scrapers run a closed loop (each sends its next request as soon as it has the
previous answer): that saturates both cores, client and server together, so it measures throughput
as much as latency. ``--interval 0.1`` paces each scraper (20 scrapers at 10 scrapes/s each, out of
phase), still far denser than Prometheus scraping every 15 s; ``--burst`` sends every scraper's
requests at the same moments. Each scraper is a process of its own and keeps its TLS context, so
that neither a client's GIL nor its OpenSSL set-up counts as the exporter's latency (both did: a
threaded client measured p99 42 ms for TLS keep-alive where one process per scraper measures 5).
"""

from __future__ import annotations

import argparse
import base64
import functools
import http.client
import multiprocessing
import os
import random
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bcrypt
import trustme

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = b"bench-pass"
SCRAPERS = (1, 20)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_exporter(port: int, web_config: Path | None) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "exporter", "--demo", "--web.listen-address", f"127.0.0.1:{port}"]
    if web_config is not None:
        args += ["--web.config.file", str(web_config)]
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@functools.cache
def client_context(ca_file: str) -> ssl.SSLContext:
    # One context per client process, as a scraper keeps its TLS configuration: building an OpenSSL 3
    # context (and parsing the CA file) costs milliseconds of the client's CPU, which this benchmark
    # would otherwise count as the exporter's latency.
    return ssl.create_default_context(cafile=ca_file)


def connect(port: int, ca_file: str | None) -> http.client.HTTPConnection:
    if ca_file is None:
        return http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    return http.client.HTTPSConnection("127.0.0.1", port, timeout=30, context=client_context(ca_file))


def scrape(connection: http.client.HTTPConnection, headers: dict[str, str]) -> None:
    connection.request("GET", "/metrics", headers=headers)
    response = connection.getresponse()
    body = response.read()
    if response.status != 200 or not body:
        raise RuntimeError(f"/metrics answered {response.status}")


def wait_ready(port: int, ca_file: str | None, headers: dict[str, str]) -> None:
    end = time.monotonic() + 60
    while time.monotonic() < end:
        try:
            connection = connect(port, ca_file)
            connection.request("GET", "/-/ready", headers=headers)
            response = connection.getresponse()
            response.read()
            if response.status == 200:
                scrape(connection, headers)  # warm up: the first bcrypt check is slow by design
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"exporter on port {port} was not ready within 60 s")


def scraper(
    port: int,
    ca_file: str | None,
    headers: dict[str, str],
    keep_alive: bool,
    count: int,
    interval: float,
    burst_at: float | None = None,
) -> list[float]:
    latencies = []
    connection = connect(port, ca_file) if keep_alive else None
    # Out of phase, as in real life; or every scraper at the same ticks, the worst case.
    due = time.perf_counter() + random.uniform(0, interval) if burst_at is None else burst_at
    for _ in range(count):
        if interval:
            time.sleep(max(0.0, due - time.perf_counter()))
            due += interval
        start = time.perf_counter()
        if keep_alive:
            assert connection is not None
            scrape(connection, headers)
        else:
            fresh = connect(port, ca_file)
            scrape(fresh, headers)
            fresh.close()
        latencies.append(time.perf_counter() - start)
    if connection is not None:
        connection.close()
    return latencies


def client_process(
    args: tuple[int, str | None, dict[str, str], bool, int, float, float | None],
) -> list[float]:
    """One scraper in a process of the pool (a process per scraper: no client GIL shared)."""
    return scraper(*args)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def run_scenario(
    pool: multiprocessing.pool.Pool,
    port: int,
    ca_file: str | None,
    headers: dict[str, str],
    concurrency: int,
    keep_alive: bool,
    total: int,
    interval: float,
    burst: bool = False,
) -> list[float]:
    per_scraper = max(1, total // concurrency)
    # perf_counter is CLOCK_MONOTONIC here: one clock for every client process.
    burst_at = time.perf_counter() + 1.0 if burst else None
    jobs = [(port, ca_file, headers, keep_alive, per_scraper, interval, burst_at)] * concurrency
    return [latency for result in pool.map(client_process, jobs) for latency in result]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per scenario (default 2000)")
    parser.add_argument(
        "--interval",
        type=float,
        default=0.0,
        help="seconds between one scraper's requests (default 0: closed loop, each scraper sends its next "
        "request as soon as it has the answer, which saturates this machine's cores)",
    )
    parser.add_argument("--setup", choices=("plain", "tls+auth"), action="append", help="only these setups")
    parser.add_argument("--scrapers", type=int, action="append", help="only these concurrencies (1, 20)")
    parser.add_argument(
        "--connection", choices=("keep-alive", "new"), action="append", help="only these connection modes"
    )
    parser.add_argument(
        "--burst",
        action="store_true",
        help="with --interval: every scraper sends at the same moments (as many Prometheus servers with "
        "the same scrape offset), instead of out of phase",
    )
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        folder = Path(directory)
        ca = trustme.CA()
        issued = ca.issue_cert("127.0.0.1")
        issued.cert_chain_pems[0].write_to_path(str(folder / "cert.pem"))
        issued.private_key_pem.write_to_path(str(folder / "key.pem"))
        ca.cert_pem.write_to_path(str(folder / "ca.pem"))
        hashed = bcrypt.hashpw(PASSWORD, bcrypt.gensalt(rounds=10)).decode()
        (folder / "web.yml").write_text(
            "tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\n"
            f"basic_auth_users:\n  prometheus: '{hashed}'\n"
        )
        auth = {"Authorization": "Basic " + base64.b64encode(b"prometheus:" + PASSWORD).decode()}
        plain_port, tls_port = free_port(), free_port()
        configs = {
            "plain": (plain_port, None, {}, None),
            "tls+auth": (tls_port, str(folder / "ca.pem"), auth, folder / "web.yml"),
        }
        setups = {
            name: (port, ca_file, headers, start_exporter(port, web_config))
            for name, (port, ca_file, headers, web_config) in configs.items()
            if name in (options.setup or configs)
        }
        try:
            for port, ca_file, headers, _ in setups.values():
                wait_ready(port, ca_file, headers)
            pacing = f"each scraper every {options.interval:g} s" if options.interval else "closed loop"
            pacing += ", all at the same moments" if options.burst and options.interval else ""
            print(
                f"/metrics latency, {options.requests} requests per scenario, {pacing}, {os.cpu_count()} CPUs"
            )
            columns = ("scrapers", "connection", "req/s", "p50 ms", "p95 ms", "p99 ms")
            print(f"{'setup':9} " + " ".join(f"{c:>{max(7, len(c))}}" for c in columns))
            with multiprocessing.Pool(max(options.scrapers or SCRAPERS)) as pool:
                for name, (port, ca_file, headers, _) in setups.items():
                    for concurrency in options.scrapers or SCRAPERS:
                        for keep_alive in [
                            m == "keep-alive" for m in options.connection or ("keep-alive", "new")
                        ]:
                            start = time.perf_counter()
                            latencies = run_scenario(
                                pool,
                                port,
                                ca_file,
                                headers,
                                concurrency,
                                keep_alive,
                                options.requests,
                                options.interval,
                                options.burst,
                            )
                            rate = len(latencies) / (time.perf_counter() - start)
                            p50, p95, p99 = (percentile(latencies, f) * 1000 for f in (0.5, 0.95, 0.99))
                            mode = "keep-alive" if keep_alive else "new"
                            figures = f"{rate:7.0f} {p50:7.1f} {p95:7.1f} {p99:7.1f}"
                            print(f"{name:9} {concurrency:8} {mode:>10} {figures}")
        finally:
            for _, _, _, process in setups.values():
                process.terminate()
                process.wait(timeout=10)


if __name__ == "__main__":
    main()
