"""The HTTP transport in this process with a small app: protocol handling, limits, deadlines, the
app interface, rate limit, and shared /metrics renderings."""

from __future__ import annotations

import contextlib
import http.client
import logging
import socket
import threading
import time

import pytest

from exporter.httpserver import READY_WORKERS, Limits, Request, Response, _Workers
from exporter.webapp import SharedRendering
from exporter.webconfig import RateLimit, WebConfig


def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_request_reaches_the_app_parsed(start_server):
    seen: list[Request] = []

    def app(request: Request) -> Response:
        seen.append(request)
        return Response(200, b"ok\n", "text/plain", {"X-Route": "yes"})

    port = start_server(app=app).server_address[1]
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    connection.request("GET", "/trace?user=a%40b.com&user=c&empty=", headers={"X-Custom": "v"})
    response = connection.getresponse()
    assert response.status == 200 and response.read() == b"ok\n" and response.getheader("X-Route") == "yes"
    connection.request("HEAD", "/trace")
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("Content-Length") == "3" and response.read() == b""
    connection.close()
    request = seen[0]
    assert request.method == "GET" and request.path == "/trace"
    assert request.query == {"user": ["a@b.com", "c"], "empty": [""]}
    assert request.header("X-CUSTOM") == "v" and request.headers["x-custom"] == "v"
    assert seen[1].method == "HEAD"


PROTOCOL_CASES = {
    "POST with a body": (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
        b"405",
    ),
    "garbage": (b"GARBAGE\r\n\r\n", b"400"),
    "HTTP/2 preface": (b"GET / HTTP/2.0\r\n\r\n", b"505"),
    "header without colon": (b"GET / HTTP/1.1\r\nbad header\r\n\r\n", b"400"),
    "70 KB header": (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", b"431"),
    "chunked body": (b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", b"501"),
    "huge body": (b"GET / HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n", b"413"),
    "relative target": (b"GET nowhere HTTP/1.1\r\n\r\n", b"400"),
    "absolute target": (b"GET http://exporter/-/healthy HTTP/1.1\r\nConnection: close\r\n\r\n", b"200"),
    "HTTP/1.0": (b"GET / HTTP/1.0\r\n\r\n", b"200"),
    "bare LF line ends": (b"GET /x HTTP/1.1\nHost: x\nConnection: close\n\n", b"200"),
}


@pytest.mark.parametrize(("data", "status"), PROTOCOL_CASES.values(), ids=PROTOCOL_CASES.keys())
def test_protocol_errors_are_answered(start_server, data, status):
    port = start_server().server_address[1]
    answer = raw_exchange(port, data)
    assert answer.startswith(b"HTTP/1.1 " + status + b" "), answer[:200]


def test_pipelined_and_keep_alive_requests(start_server):
    port = start_server().server_address[1]
    answer = raw_exchange(
        port, b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\nGET /c HTTP/1.1\r\nConnection: close\r\n\r\n"
    )
    assert answer.count(b"HTTP/1.1 200 OK") == 3 and b"GET /c" in answer


def test_app_exception_is_a_500_and_logged(start_server, caplog):
    port = start_server().server_address[1]
    with caplog.at_level(logging.ERROR, logger="exporter.httpserver"):
        answer = raw_exchange(port, b"GET /boom HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 500 ")
    assert any("error while serving /boom" in r.message and r.exc_info for r in caplog.records)


def test_configured_headers_on_every_response(start_server):
    config = WebConfig(headers={"X-Frame-Options": "deny"}, basic_auth_users={})
    port = start_server(config).server_address[1]
    for path in (b"/", b"/boom"):
        answer = raw_exchange(port, b"GET " + path + b" HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert b"\r\nX-Frame-Options: deny\r\n" in answer.split(b"\r\n\r\n")[0]


def test_header_and_idle_deadlines(start_server):
    limits = Limits(header_timeout=1.0, idle_timeout=1.5)
    port = start_server(limits=limits).server_address[1]
    half = socket.create_connection(("127.0.0.1", port), timeout=10)
    half.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
    idle = socket.create_connection(("127.0.0.1", port), timeout=10)
    idle.sendall(b"GET / HTTP/1.1\r\n\r\n")
    assert idle.recv(65536).startswith(b"HTTP/1.1 200 ")
    start = time.monotonic()
    assert half.recv(100) == b"" and idle.recv(100) == b""  # both closed by the server
    assert time.monotonic() - start < 5
    half.close()
    idle.close()


def test_connection_limit_evicts_the_longest_waiting(start_server):
    server = start_server(limits=Limits(max_connections=8))
    port = server.server_address[1]
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(8)]
    time.sleep(0.2)
    assert raw_exchange(port, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").startswith(b"HTTP/1.1 200 ")
    assert idle[0].recv(100) == b""  # the oldest idle connection made room
    assert len(server.connections) <= 9
    for sock in idle:
        sock.close()


def test_connections_busy_with_responses_are_not_evicted(start_server):
    release = threading.Event()

    def slow(request: Request) -> Response:
        if request.path == "/slow":
            release.wait(10)
        return Response(200, b"done\n", "text/plain")

    port = start_server(app=slow, limits=Limits(max_connections=4)).server_address[1]
    busy = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(4)]
    for sock in busy:
        sock.sendall(b"GET /slow HTTP/1.1\r\nConnection: close\r\n\r\n")
    time.sleep(0.3)
    refused = socket.create_connection(("127.0.0.1", port), timeout=10)
    with contextlib.suppress(ConnectionResetError):  # closed with or without a reset, never answered
        assert refused.recv(100) == b""  # no room: the new client is closed, the busy ones finish
    release.set()
    for sock in busy:
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        sock.close()
    refused.close()


def test_rate_limit(start_server):
    port = start_server(WebConfig(rate_limit=RateLimit(interval=60.0, burst=2))).server_address[1]
    statuses = [raw_exchange(port, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")[9:12] for _ in range(4)]
    assert statuses == [b"200", b"200", b"429", b"429"]


def test_shared_rendering_runs_once_for_concurrent_requests():
    started, release = threading.Event(), threading.Event()
    calls = []

    def render() -> bytes:
        calls.append(1)
        started.set()
        release.wait(5)
        return f"rendering {len(calls)}".encode()

    shared = SharedRendering(render)
    results: list[bytes] = []
    first = threading.Thread(target=lambda: results.append(shared.get()))
    first.start()
    started.wait(5)
    joiners = [threading.Thread(target=lambda: results.append(shared.get())) for _ in range(5)]
    for thread in joiners:
        thread.start()
    time.sleep(0.2)
    release.set()
    for thread in [first, *joiners]:
        thread.join(5)
    assert results == [b"rendering 1"] * 6 and len(calls) == 1
    assert shared.get() == b"rendering 2"  # nothing is kept once delivered


def test_shared_rendering_passes_on_failures():
    def fail() -> bytes:
        raise RuntimeError("collector broke")

    with pytest.raises(RuntimeError, match="collector broke"):
        SharedRendering(fail).get()


def test_shared_rendering_reuse_follows_the_snapshot():
    """A rendering is reused while the snapshot is the same object (up to max_age), and a new
    snapshot is rendered at once."""
    snapshot = [object()]
    renders = []

    def render() -> bytes:
        renders.append(1)
        return f"rendering {len(renders)}".encode()

    shared = SharedRendering(render, lambda: snapshot[0], max_age=60.0)
    assert [shared.get(), shared.get()] == [b"rendering 1", b"rendering 1"]
    snapshot[0] = object()
    assert shared.get() == b"rendering 2"
    expiring = SharedRendering(render, lambda: snapshot[0], max_age=0.05)
    assert expiring.get() == b"rendering 3"
    time.sleep(0.1)
    assert expiring.get() == b"rendering 4"


def test_a_connection_thread_serves_the_next_connection_and_ends_when_idle():
    served: list[tuple[object, int]] = []
    release = threading.Event()
    release.set()
    done = threading.Semaphore(0)

    def serve(connection: object) -> None:
        release.wait(5)
        served.append((connection, threading.get_ident()))
        done.release()

    workers = _Workers(serve, idle_seconds=0.5)  # type: ignore[arg-type]
    workers.submit("first")  # type: ignore[arg-type]
    assert done.acquire(timeout=5)
    time.sleep(0.05)  # the thread is back waiting
    workers.submit("second")  # type: ignore[arg-type]
    assert done.acquire(timeout=5)
    assert served[0][1] == served[1][1]  # no new thread for the second connection

    release.clear()  # five connections at once: five threads
    for name in "abcde":
        workers.submit(name)  # type: ignore[arg-type]
    release.set()
    for _ in range(5):
        assert done.acquire(timeout=5)
    burst = {ident for _, ident in served[2:]}
    assert len(burst) == 5 and sorted(c for c, _ in served[2:]) == list("abcde")
    time.sleep(0.05)
    for name in "fghij":  # the next burst finds them waiting
        workers.submit(name)  # type: ignore[arg-type]
    for _ in range(5):
        assert done.acquire(timeout=5)
    assert {ident for _, ident in served[7:]} <= burst

    deadline = time.monotonic() + 5
    while any(t.ident in burst for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.ident in burst for t in threading.enumerate())  # idle threads end
    workers.submit("after")  # type: ignore[arg-type]
    assert done.acquire(timeout=5) and served[-1][0] == "after"


def _worker_threads() -> set[threading.Thread]:
    # Thread objects, not idents: a new thread may get the ident of one that ended.
    return {t for t in threading.enumerate() if t.name == "http-worker"}


def test_threads_started_up_front_serve_a_burst_and_stay_until_stopped():
    together = threading.Barrier(3, timeout=5)  # three connections served at the same time
    served: list[threading.Thread] = []
    done = threading.Semaphore(0)

    def serve(connection: object) -> None:
        together.wait()
        served.append(threading.current_thread())
        done.release()

    before = _worker_threads()
    workers = _Workers(serve, idle_seconds=0.1, ready=3)  # type: ignore[arg-type]
    workers.start()  # in the background
    deadline = time.monotonic() + 5
    while len(_worker_threads() - before) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    standing = _worker_threads() - before
    assert len(standing) == 3
    for name in "abc":  # a burst of three: the threads waiting serve it, none is started for it
        workers.submit(name)  # type: ignore[arg-type]
    for _ in range(3):
        assert done.acquire(timeout=5)
    assert set(served) == standing and _worker_threads() - before == standing

    time.sleep(0.5)  # five idle timeouts: they wait on
    assert all(thread.is_alive() for thread in standing)
    for name in "def":
        workers.submit(name)  # type: ignore[arg-type]
    for _ in range(3):
        assert done.acquire(timeout=5)
    assert set(served[3:]) == standing

    workers.stop()
    for thread in standing:
        thread.join(5)
    assert not any(thread.is_alive() for thread in standing)


def test_a_closed_server_leaves_no_worker_threads(start_server):
    before = _worker_threads()
    server = start_server()
    port = server.server_address[1]
    deadline = time.monotonic() + 5
    while len(_worker_threads() - before) < READY_WORKERS and time.monotonic() < deadline:
        time.sleep(0.01)
    started = _worker_threads() - before
    assert len(started) == READY_WORKERS  # waiting before the first connection
    request = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    assert raw_exchange(port, request).startswith(b"HTTP/1.1 200")
    server.shutdown()
    server.server_close()
    for thread in started:
        thread.join(5)
    assert not any(thread.is_alive() for thread in started)
