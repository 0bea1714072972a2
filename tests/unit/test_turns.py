"""Heavy work in the serving process steps aside while connections are served (exporter.turns)."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

from exporter import turns
from exporter.httpserver import ExporterHTTPServer, Request, Response, serve_forever_in_thread
from exporter.webconfig import WebConfig


@contextmanager
def request_in_flight(requests: turns.Requests) -> Iterator[threading.Event]:
    """A connection being served (in another thread) until the returned event is set."""
    answering, answer = threading.Event(), threading.Event()

    def serve() -> None:
        with requests.serving():
            answering.set()
            answer.wait(10)

    thread = threading.Thread(target=serve)
    thread.start()
    answering.wait(5)
    try:
        yield answer
    finally:
        answer.set()
        thread.join(5)


def test_without_requests_a_step_does_not_wait():
    requests = turns.Requests()
    started = time.monotonic()
    for _ in range(10_000):
        requests.step_aside()
    assert time.monotonic() - started < 1.0  # ten thousand steps, no wait among them


def test_a_step_waits_until_the_request_in_flight_is_answered():
    requests = turns.Requests()
    with request_in_flight(requests) as answer:
        stepped: list[float] = []
        worker = threading.Thread(target=lambda: (requests.step_aside(), stepped.append(time.monotonic())))
        worker.start()
        worker.join(turns.MAX_WAIT / 5)
        assert not stepped  # still waiting for the answer
        answered = time.monotonic()
        answer.set()
        worker.join(5)
    assert stepped and stepped[0] >= answered
    assert requests.active == 0


def test_a_request_that_never_ends_delays_each_step_only_so_long():
    requests = turns.Requests()
    with request_in_flight(requests):
        started = time.monotonic()
        requests.step_aside()
        waited = time.monotonic() - started
    assert turns.MAX_WAIT * 0.8 <= waited < 1.0


def test_heavy_work_waits_at_most_its_share_of_a_second():
    """Clients that connect and never ask (or a flood of them) slow heavy work down, never stop it."""
    requests = turns.Requests()
    with request_in_flight(requests):
        started = time.monotonic()
        steps = 0
        while time.monotonic() - started < turns.WINDOW * 0.9:
            requests.step_aside()
            steps += 1
    # Waiting stopped after SHARE of the window: the remaining steps ran without waiting.
    assert steps > turns.SHARE * turns.WINDOW / turns.MAX_WAIT + 1000


def test_the_thread_serving_a_connection_never_waits_for_itself():
    requests = turns.Requests()
    with requests.serving():
        started = time.monotonic()
        requests.step_aside()
        assert time.monotonic() - started < turns.MAX_WAIT / 2


def test_the_http_server_counts_a_new_connection_until_its_answer_is_sent():
    seen: list[int] = []

    def app(request: Request) -> Response:
        seen.append(turns.REQUESTS.active)
        return Response(200, b"ok\n", "text/plain")

    server = ExporterHTTPServer(("127.0.0.1", 0), app, WebConfig())
    serve_forever_in_thread(server)
    try:
        port = server.server_address[1]
        for _ in range(2):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                assert response.read() == b"ok\n"
    finally:
        server.shutdown()
        server.server_close()
    assert seen == [2, 2]  # the new connection, and the request it carries
    deadline = time.monotonic() + 5
    while turns.REQUESTS.active and time.monotonic() < deadline:
        time.sleep(0.01)  # the connection closes after the answer is read
    assert turns.REQUESTS.active == 0
