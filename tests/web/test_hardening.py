"""The exporter process (--demo) against hostile and careless clients, over real sockets (issue 12).

Each test starts the real command in a subprocess, so what is measured is what a user runs: its
descriptor limit, its listen backlog, its log output. Timing assertions are loose on purpose
("answers within a few seconds"); the defects they catch cost far more than that.
"""

from __future__ import annotations

import base64
import http.client
import os
import resource
import select
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import pytest
import trustme

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = b"scrape-pass"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Exporter:
    """``python -m exporter --demo`` on a free loopback port, its log in a file."""

    def __init__(self, directory: Path, web_config: str | None = None, nofile: int | None = None) -> None:
        self.port = free_port()
        self.log_path = directory / f"exporter-{self.port}.log"
        self.context: ssl.SSLContext | None = None
        args = [sys.executable, "-m", "exporter", "--demo", "--web.listen-address", f"127.0.0.1:{self.port}"]
        if web_config is not None:
            (directory / "web.yml").write_text(web_config)
            args += ["--web.config.file", str(directory / "web.yml")]

        def limit_descriptors() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, preexec_fn=limit_descriptors
            )

    def connection(self, timeout: float = 5.0) -> http.client.HTTPConnection:
        if self.context is not None:
            return http.client.HTTPSConnection("127.0.0.1", self.port, timeout=timeout, context=self.context)
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def get(
        self, path: str, headers: dict[str, str] | None = None, timeout: float = 5.0
    ) -> tuple[int, bytes]:
        connection = self.connection(timeout)
        try:
            connection.request("GET", path, headers=headers or {})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def wait_ready(self, headers: dict[str, str] | None = None, deadline: float = 60.0) -> None:
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            assert self.process.poll() is None, self.log()
            try:
                if self.get("/-/ready", headers, timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"the exporter was not ready within {deadline}s:\n{self.log()}")

    def open_descriptors(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def assert_no_error_logged(exporter: Exporter) -> None:
    text = exporter.log()
    assert "Traceback" not in text and "level=error" not in text, text[-5000:]


@pytest.fixture
def plain_exporter(tmp_path: Path) -> Iterator[Exporter]:
    exporter = Exporter(tmp_path, nofile=256)
    try:
        exporter.wait_ready()
        yield exporter
    finally:
        exporter.stop()


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def test_idle_and_half_sent_connections_do_not_lock_out_scrapers(plain_exporter):
    """300 connections that send nothing or half a request, against a 256-descriptor limit:
    /metrics still answers, and the exporter never holds more descriptors than its limit."""
    held = []
    try:
        for index in range(300):
            sock = connect(plain_exporter.port)
            if index % 2:
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: exporter\r\nX-Slow: ")
            held.append(sock)
        for _ in range(3):
            status, body = plain_exporter.get("/metrics", timeout=5)
            assert status == 200 and b"intune_provisioning_users{" in body
        assert plain_exporter.open_descriptors() < 256
    finally:
        for sock in held:
            sock.close()
    assert plain_exporter.get("/-/healthy")[0] == 200
    assert_no_error_logged(plain_exporter)


def test_half_sent_request_is_cut_off(plain_exporter):
    """A slowloris client (a byte now and then, never the end of its headers) is disconnected
    once the header timeout (10 s) has passed, however steadily it trickles."""
    sock = connect(plain_exporter.port)
    sock.sendall(b"GET /metrics HTTP/1.1\r\n")
    start = time.monotonic()
    closed = False
    while time.monotonic() - start < 25:
        try:
            sock.sendall(b"X")
            ready, _, _ = select.select([sock], [], [], 1.0)
            if ready and sock.recv(4096) == b"":
                closed = True
                break
        except OSError:
            closed = True
            break
    sock.close()
    assert closed, "the server kept a half-sent request open for 25 s"
    assert plain_exporter.get("/-/healthy")[0] == 200


def test_keep_alive_small_responses_are_not_delayed(plain_exporter):
    """Headers and body leave in one write: no 40 ms Nagle / delayed-ACK stall per response
    (that made 200 keep-alive health checks take about 9 s)."""
    connection = plain_exporter.connection()
    connection.request("GET", "/-/healthy")
    connection.getresponse().read()
    first_socket = connection.sock
    start = time.monotonic()
    for path in ["/-/healthy"] * 200 + ["/metrics"] * 50:
        connection.request("GET", path)
        response = connection.getresponse()
        assert response.status == 200 and response.read()
    elapsed = time.monotonic() - start
    assert connection.sock is first_socket, "keep-alive was not kept"
    connection.close()
    assert elapsed < 4.0, f"250 keep-alive requests took {elapsed:.1f}s"


def test_listen_backlog_absorbs_a_burst(plain_exporter):
    """While the process cannot accept (stopped), the kernel queues connections up to the
    backlog: 100 clients must all get connected, not wait for SYN retries (backlog was 5)."""
    os.kill(plain_exporter.process.pid, signal.SIGSTOP)
    sockets = []
    try:
        for _ in range(100):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", plain_exporter.port))
            sockets.append(sock)
        end = time.monotonic() + 2.0
        pending = list(sockets)
        while pending and time.monotonic() < end:
            _, writable, _ = select.select([], pending, [], 0.1)
            pending = [s for s in pending if s not in writable]
        connected = [
            s for s in sockets if s not in pending and s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        ]
        assert len(connected) == 100, f"only {len(connected)} of 100 connections were queued"
    finally:
        os.kill(plain_exporter.process.pid, signal.SIGCONT)
    for sock in sockets:
        sock.setblocking(True)
        sock.settimeout(10)
        sock.sendall(b"GET /-/healthy HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    for sock in sockets:
        assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
        sock.close()


def reset_on_close(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def test_clients_that_go_away_are_not_errors(plain_exporter):
    """Clients that disconnect at every point of an exchange: the exporter logs no error and no
    traceback (a reset during a large response used to log an error-level BrokenPipe traceback)."""
    for _ in range(5):
        # Pipelined requests for large responses that the client never reads, then a reset:
        # the server is blocked writing when the connection dies under it.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", plain_exporter.port))
        sock.sendall(b"GET /stuck HTTP/1.1\r\nHost: x\r\n\r\n" * 50)
        time.sleep(0.3)
        reset_on_close(sock)
        sock.close()
        # A health probe that gives up before the answer; one that connects and says nothing.
        sock = connect(plain_exporter.port)
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        reset_on_close(sock)
        sock.close()
        sock = connect(plain_exporter.port)
        sock.close()
    time.sleep(0.5)
    assert plain_exporter.get("/-/healthy")[0] == 200
    assert_no_error_logged(plain_exporter)


@pytest.fixture(scope="module")
def tls_exporter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Exporter]:
    directory = tmp_path_factory.mktemp("tls-exporter")
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    issued.private_key_pem.write_to_path(str(directory / "key.pem"))
    issued.cert_chain_pems[0].write_to_path(str(directory / "cert.pem"))
    hashed = bcrypt.hashpw(PASSWORD, bcrypt.gensalt(rounds=4)).decode()
    web = f"tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\nbasic_auth_users:\n  prometheus: '{hashed}'\n"
    exporter = Exporter(directory, web_config=web)
    exporter.context = ssl.create_default_context()
    ca.configure_trust(exporter.context)
    try:
        exporter.wait_ready(basic("prometheus", PASSWORD))
        yield exporter
    finally:
        exporter.stop()


def basic(user: str, password: bytes) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(user.encode() + b":" + password).decode()}


@pytest.mark.parametrize(
    "headers",
    [
        basic("prometheus", PASSWORD + b"x" * 80),  # > 72 bytes: bcrypt refuses it
        basic(
            "prometheus", PASSWORD + b"\0" * (72 - len(PASSWORD)) + b"tail"
        ),  # first 72 bytes are not enough
        basic("prometheus", b"x" * 1000),
        basic("prometheus", b"wrong"),
        basic("grafana", PASSWORD),
        basic("", b""),
        {"Authorization": "Basic not-base64!"},
        {"Authorization": "Basic " + base64.b64encode(b"no-colon").decode()},
        {"Authorization": "Basic " + base64.b64encode(b"\xff\xfe:x").decode()},
        {"Authorization": "Bearer abc"},
        {"Authorization": "Basic"},
        {},
    ],
)
def test_bad_credentials_get_401(tls_exporter, headers):
    status, _ = tls_exporter.get("/metrics", headers)
    assert status == 401


def test_right_credentials_over_tls(tls_exporter):
    status, body = tls_exporter.get("/metrics", basic("prometheus", PASSWORD))
    assert status == 200 and b"intune_exporter_build_info" in body
    plain = http.client.HTTPConnection("127.0.0.1", tls_exporter.port, timeout=5)
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        plain.request("GET", "/metrics")  # plain HTTP against the TLS port
        plain.getresponse()
    plain.close()
    # TLS clients that go away mid-handshake or mid-request are not errors either.
    for _ in range(3):
        sock = connect(tls_exporter.port)
        sock.sendall(b"\x16\x03\x01\x00\xff")  # the start of a ClientHello, then nothing
        reset_on_close(sock)
        sock.close()
    assert tls_exporter.get("/-/healthy", basic("prometheus", PASSWORD))[0] == 200
    assert_no_error_logged(tls_exporter)
