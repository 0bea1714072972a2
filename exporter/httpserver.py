"""The HTTP transport: serves an :data:`App` (``exporter.webapp`` builds the exporter's) with TLS,
basic auth, response headers and a rate limit from an exporter-toolkit style web config file.

The transport owns everything that is the same for every path: parsing, basic auth, the configured
response headers, HEAD, and turning an exception in the app into a 500. It is built to stay
reachable when clients misbehave:

- one thread per connection (kept for the next connection when it ends), at most
  ``max_connections`` of them (bounded below the descriptor limit); when a new client arrives at
  the limit, the connection that has waited longest for a request is closed, so idle or half-sent
  connections can never lock scrapers out;
- a watchdog closes connections that take too long to send their request headers (slowloris), sit
  idle between keep-alive requests, or do not read their response;
- each response leaves in one write with TCP_NODELAY (no Nagle / delayed-ACK stall on small
  responses), the listen backlog is large, keep-alive is kept;
- a client that goes away is a debug line; only an exception in the app is an error.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import logging
import queue
import re
import resource
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from typing import Protocol
from urllib.parse import parse_qs, urlsplit

import bcrypt

import exporter
from exporter.turns import serving
from exporter.webconfig import RateLimit, WebConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Request:
    """One parsed HTTP request. Header names are lower-case; ``query`` maps each parameter to
    every value it was given (``?user=a&user=b`` -> ``{"user": ["a", "b"]}``)."""

    method: str
    path: str
    query: Mapping[str, list[str]] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)

    def header(self, name: str, default: str = "") -> str:
        return self.headers.get(name.lower(), default)


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str
    headers: Mapping[str, str] = field(default_factory=dict)


App = Callable[[Request], Response]

TEXT = "text/plain; charset=utf-8"
UNAUTHORIZED = Response(401, b"Unauthorized\n", TEXT, {"WWW-Authenticate": 'Basic realm="exporter"'})
INTERNAL_ERROR = Response(500, b"Internal Server Error\n", TEXT)
TOO_MANY_REQUESTS = Response(429, b"Too Many Requests\n", TEXT)
METHOD_NOT_ALLOWED = Response(405, b"Method Not Allowed\n", TEXT, {"Allow": "GET, HEAD"})


@dataclass(frozen=True)
class Limits:
    """How long and how much a client may take. ``max_connections`` is further bounded by half the
    process's descriptor limit, so that accepting can never starve the backends of descriptors."""

    max_connections: int = 128
    header_timeout: float = 10.0  # connect (and TLS handshake) to complete request headers
    idle_timeout: float = 120.0  # keep-alive connection waiting for its next request
    write_timeout: float = 60.0  # a response must be taken within this
    max_header_bytes: int = 32 * 1024
    max_body_bytes: int = 64 * 1024  # bodies are read and ignored: no route takes one

    def connection_limit(self) -> int:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return self.max_connections
        return max(4, min(self.max_connections, soft // 2))


class Stream(Protocol):
    """A connected client: a plain socket or a :class:`exporter.tls.TLSStream`."""

    def recv(self, size: int, /) -> bytes: ...

    def sendall(self, data: bytes, /) -> None: ...

    def close(self) -> None: ...


class ClientError(Exception):
    """The request cannot be served; answered with ``status`` and the connection closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# --- authentication and rate limiting -------------------------------------------------------------


class BasicAuth:
    """bcrypt checks are slow by design. Successful checks are remembered (under a keyed digest, so
    the memory holds nothing an attacker could brute-force offline) so that a scrape every few
    seconds does not spend a core on bcrypt; bcrypt runs one at a time so that a flood of wrong
    passwords costs at most one core."""

    MAX_PASSWORD_BYTES = 72  # bcrypt's limit; bcrypt >= 4.1 raises on longer input

    def __init__(self, users: Mapping[str, bytes]) -> None:
        self.users = users
        self._key = secrets.token_bytes(32)
        self._verified: set[bytes] = set()
        self._lock = threading.Lock()
        self._bcrypt_lock = threading.Lock()

    def check(self, header: str) -> bool:
        if not self.users:
            return True
        credentials = _basic_credentials(header)
        if credentials is None:
            return False
        user, password = credentials
        hashed = self.users.get(user)
        if hashed is None or len(password) > self.MAX_PASSWORD_BYTES:
            # Same work as a known user, so that timing does not tell which user names exist.
            hashed, user = next(iter(self.users.values())), ""
        digest = hmac.new(
            self._key, user.encode() + b"\0" + hashed + b"\0" + password, hashlib.sha256
        ).digest()
        with self._lock:
            if digest in self._verified:
                return True
        with self._bcrypt_lock:
            ok = bcrypt.checkpw(password[: self.MAX_PASSWORD_BYTES], hashed) and bool(user)
        if ok and len(password) <= self.MAX_PASSWORD_BYTES:
            with self._lock:
                if len(self._verified) >= 1000:
                    self._verified.clear()
                self._verified.add(digest)
            return True
        return False


def _basic_credentials(header: str) -> tuple[str, bytes] | None:
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except ValueError:
        return None
    user, colon, password = decoded.partition(b":")
    if not colon:
        return None
    try:
        return user.decode("utf-8"), password
    except UnicodeDecodeError:
        return None


class TokenBucket:
    """exporter-toolkit's ``rate_limit``: ``burst`` requests at once, refilled one per interval."""

    def __init__(self, limit: RateLimit) -> None:
        self.limit = limit
        self._tokens = float(limit.burst)
        self._updated = time.monotonic()
        self._lock = threading.Lock()

    def allow(self) -> bool:
        with self._lock:
            now = time.monotonic()
            refill = (now - self._updated) / self.limit.interval
            self._tokens = min(float(self.limit.burst), self._tokens + refill)
            self._updated = now
            if self._tokens >= 1:
                self._tokens -= 1
                return True
            return False


# --- connection bookkeeping ---------------------------------------------------------------------


class _Connection:
    def __init__(self, sock: socket.socket, address: object, deadline: float) -> None:
        self.sock = sock
        self.address = address
        self.deadline = deadline  # monotonic; the watchdog closes the connection after it
        self.waiting_since: float | None = time.monotonic()  # waiting for a request: may be evicted
        self.aborted = False

    def abort(self, why: str) -> None:
        """Wake the connection's thread: its blocked read or write fails and it closes."""
        if self.aborted:
            return
        self.aborted = True
        log.debug("closing connection from %s: %s", self.address, why)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


class _Connections:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: set[_Connection] = set()
        self._lock = threading.Lock()

    def add(self, connection: _Connection) -> bool:
        """Admit a new connection; at the limit, make room by closing the one that has waited
        longest for a request. False when every connection is busy with a response."""
        with self._lock:
            live = [c for c in self._items if not c.aborted]
            if len(live) >= self.limit:
                waiting = [c for c in live if c.waiting_since is not None]
                if not waiting:
                    return False
                min(waiting, key=lambda c: c.waiting_since or 0.0).abort("connection limit reached")
            self._items.add(connection)
            return True

    def remove(self, connection: _Connection) -> None:
        with self._lock:
            self._items.discard(connection)

    def expire(self, now: float) -> None:
        with self._lock:
            expired = [c for c in self._items if c.deadline <= now]
        for connection in expired:
            connection.abort("timed out")

    def abort_all(self) -> None:
        with self._lock:
            items = list(self._items)
        for connection in items:
            connection.abort("server shutting down")

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


READY_WORKERS = 20  # threads that always wait for a connection (see _Workers)
_STOP = object()  # a standing thread that takes this from the queue ends


class _Workers:
    """The threads that serve connections, one connection at a time each. ``ready`` threads are
    started up front and always wait for the next connection; a thread started for a connection
    beyond them waits ``idle_seconds`` for the next one before it ends. Starting a thread makes the
    accepting thread wait until the new one runs, a GIL hand-over per connection that twenty
    connections arriving together pay one after another: the first burst of twenty scrapers, 0.5 s
    after the start while the source libraries are imported, took 16-56 ms (median 40) without
    threads waiting and 8-16 ms (median 15) with twenty. There are never more threads than
    connections being served plus idle ones (the connection limit bounds both)."""

    def __init__(
        self, serve: Callable[[_Connection], None], idle_seconds: float = 60.0, ready: int = 0
    ) -> None:
        self._serve = serve
        self._idle_seconds = idle_seconds
        self._ready = ready
        self._queue: queue.SimpleQueue[_Connection | object] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0  # threads waiting for a connection and not yet promised one
        self._standing = 0  # threads started up front and not stopped

    def start(self) -> None:
        """Start the ``ready`` threads, from a thread of their own: each start waits until the new
        thread runs, and the accepting thread should not wait for twenty such starts at the moment
        the exporter starts importing its source libraries."""
        threading.Thread(target=self._start_standing, name="http-workers-start", daemon=True).start()

    def _start_standing(self) -> None:
        for _ in range(self._ready):
            with self._lock:
                if self._standing >= self._ready:  # stopped meanwhile
                    return
                self._standing += 1
                self._idle += 1
            threading.Thread(target=self._work, args=(None,), name="http-worker", daemon=True).start()

    def stop(self) -> None:
        """End the threads started up front (the others end when idle)."""
        with self._lock:
            count, self._standing, self._ready = self._standing, 0, 0
        for _ in range(count):
            self._queue.put(_STOP)

    def submit(self, connection: _Connection) -> None:
        with self._lock:
            if self._idle:
                self._idle -= 1
                self._queue.put(connection)
                return
        threading.Thread(target=self._work, args=(connection,), name="http-worker", daemon=True).start()

    def _work(self, connection: _Connection | None) -> None:
        while True:
            if connection is not None:
                self._serve(connection)
                with self._lock:
                    self._idle += 1
            try:
                item = self._queue.get(timeout=self._idle_seconds)
            except queue.Empty:
                with self._lock:  # a connection may have been promised to this thread meanwhile
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        if self._idle <= self._ready:  # one of the threads that always wait
                            connection = None
                            continue
                        self._idle -= 1
                        return
            if item is _STOP:
                with self._lock:
                    self._idle -= 1
                return
            connection = item  # type: ignore[assignment]


# --- the server -----------------------------------------------------------------------------------


class ExporterHTTPServer:
    """Listens at construction (so a busy port fails early); :meth:`serve_forever` accepts."""

    def __init__(
        self, address: tuple[str, int], app: App, web_config: WebConfig, limits: Limits | None = None
    ) -> None:
        self.app = app
        self.web_config = web_config
        self.limits = limits or Limits()
        self.auth = BasicAuth(web_config.basic_auth_users)
        self.rate_limit = TokenBucket(web_config.rate_limit) if web_config.rate_limit else None
        self.connections = _Connections(self.limits.connection_limit())
        ready = min(READY_WORKERS, self.limits.connection_limit())
        self._workers = _Workers(self._serve_connection, ready=ready)
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()
        self._listener = _listen(address)
        self.server_address: tuple[str, int] = self._listener.getsockname()[:2]

    @property
    def scheme(self) -> str:
        return "https" if self.web_config.tls else "http"

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Accept until :meth:`shutdown`; a watchdog thread enforces the deadlines meanwhile."""
        self._stopped.clear()
        watchdog = threading.Thread(target=self._watch, name="http-watchdog", daemon=True)
        watchdog.start()
        self._workers.start()
        self._listener.settimeout(poll_interval)
        try:
            while not self._stop.is_set():
                self._accept_one()
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        self._stop.set()
        self._stopped.wait()

    def server_close(self) -> None:
        self._stop.set()
        self._listener.close()
        self.connections.abort_all()
        self._workers.stop()

    def _accept_one(self) -> None:
        try:
            sock, address = self._listener.accept()
        except TimeoutError:
            return
        except OSError as exc:
            if self._stop.is_set():
                return
            # Out of descriptors (EMFILE/ENFILE) or a connection reset while queued: pause instead
            # of spinning on a listener that stays readable.
            log.warning("cannot accept a connection: %s", exc.strerror or exc)
            time.sleep(0.1)
            return
        sock.settimeout(None)  # deadlines are the watchdog's: TLS needs a blocking socket
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connection = _Connection(sock, address, time.monotonic() + self.limits.header_timeout)
        if not self.connections.add(connection):
            log.debug("refusing %s: all %d connections are busy", address, self.connections.limit)
            sock.close()
            return
        self._workers.submit(connection)

    def _watch(self) -> None:
        while not self._stopped.wait(0.25):
            self.connections.expire(time.monotonic())

    def _serve_connection(self, connection: _Connection) -> None:
        stream: Stream = connection.sock
        # Heavy work in this process steps aside while a new connection is served, up to its first
        # answer (TLS handshake included), and while a kept-alive one answers (exporter.turns).
        first_answer = contextlib.ExitStack()
        first_answer.enter_context(serving())
        try:
            if self.web_config.tls is not None:
                stream = self.web_config.tls.accept(connection.sock)
            _Exchange(self, connection, stream, first_answer).run()
        except (ConnectionError, TimeoutError, OSError) as exc:
            log.debug("connection from %s ended: %s", connection.address, exc)
        except Exception:
            log.exception("unexpected error on the connection from %s", connection.address)
        finally:
            first_answer.close()
            with contextlib.suppress(OSError):
                stream.close()
            self.connections.remove(connection)

    def respond(self, request: Request) -> Response:
        """Everything between a parsed request and its response: method, rate limit, auth, app."""
        if request.method not in ("GET", "HEAD"):
            return METHOD_NOT_ALLOWED
        if self.rate_limit is not None and not self.rate_limit.allow():
            return TOO_MANY_REQUESTS
        if not self.auth.check(request.header("authorization")):
            return UNAUTHORIZED
        try:
            return self.app(request)
        except Exception:
            log.exception("error while serving %s", request.path)
            return INTERNAL_ERROR


def _listen(address: tuple[str, int]) -> socket.socket:
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        # A burst of scrapers (or a restart of many Prometheus servers) must not wait for the kernel
        # to retry dropped SYNs: the default of 5 made 50 simultaneous connects take about a second.
        listener.listen(1024)
    except OSError:
        listener.close()
        raise
    return listener


# --- one connection: read requests, write responses -------------------------------------------


_HEAD_END = re.compile(rb"\r?\n\r?\n")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(r"HTTP/1\.([01])")


class _Exchange:
    """The request/response loop of one connection (HTTP/1.1 with keep-alive, or HTTP/1.0)."""

    def __init__(
        self,
        server: ExporterHTTPServer,
        connection: _Connection,
        stream: Stream,
        first_answer: contextlib.ExitStack[bool | None],
    ) -> None:
        self.first_answer = first_answer  # closed once the first answer is sent
        self.server = server
        self.connection = connection
        self.stream = stream
        self.limits = server.limits
        self.buffer = bytearray()

    def run(self) -> None:
        while True:
            try:
                head = self._read_head()
                if head is None:
                    return
                request, keep_alive = _parse_head(head)
                self._skip_body(request)
            except ClientError as exc:
                log.debug("bad request from %s: %s", self.connection.address, exc)
                self._send(Response(exc.status, f"{exc}\n".encode(), TEXT), head_only=False, keep_alive=False)
                self.first_answer.close()
                self._drain()
                return
            self.connection.waiting_since = None
            self.connection.deadline = float("inf")  # the app's time is ours, not the client's
            with serving():
                response = self.server.respond(request)
                self.connection.deadline = time.monotonic() + self.limits.write_timeout
                self._send(response, head_only=request.method == "HEAD", keep_alive=keep_alive)
            self.first_answer.close()
            if not keep_alive or self.connection.aborted:
                return
            self.connection.waiting_since = time.monotonic()
            self.connection.deadline = time.monotonic() + self.limits.idle_timeout

    def _read_head(self) -> bytes | None:
        """The request line and headers; None when the client closed between requests."""
        while True:
            match = _HEAD_END.search(self.buffer)
            if match:
                head = bytes(self.buffer[: match.start()])
                del self.buffer[: match.end()]
                return head
            if len(self.buffer) > self.limits.max_header_bytes:
                raise ClientError(431, "Request Header Fields Too Large")
            chunk = self.stream.recv(65536)
            if not chunk:
                if self.buffer.strip():
                    raise ConnectionError("client closed the connection in the middle of a request")
                return None
            if not self.buffer:
                # A keep-alive client started its next request: it has the header timeout from now.
                self.connection.deadline = min(
                    self.connection.deadline, time.monotonic() + self.limits.header_timeout
                )
            self.buffer += chunk

    def _skip_body(self, request: Request) -> None:
        """No route takes a body; read a small one so the connection stays usable."""
        if "transfer-encoding" in request.headers:
            raise ClientError(501, "Transfer-Encoding is not supported")
        length_text = request.header("content-length", "0").strip()
        if not length_text.isdigit():
            raise ClientError(400, "invalid Content-Length")
        length = int(length_text)
        if length > self.limits.max_body_bytes:
            raise ClientError(413, "Content Too Large")
        while len(self.buffer) < length:
            chunk = self.stream.recv(65536)
            if not chunk:
                raise ConnectionError("client closed the connection in the middle of a request body")
            self.buffer += chunk
        del self.buffer[:length]

    def _drain(self) -> None:
        """Close after an error without losing the answer: closing with unread input makes the
        kernel send a reset, which can destroy the response before the client reads it. So signal
        the end of the response, then read (and drop) what the client still sends, for a moment."""
        self.connection.sock.shutdown(socket.SHUT_WR)
        self.connection.deadline = min(self.connection.deadline, time.monotonic() + 1.0)
        received = 0
        while received < 1 << 20:
            chunk = self.stream.recv(65536)
            if not chunk:
                return
            received += len(chunk)

    def _send(self, response: Response, head_only: bool, keep_alive: bool) -> None:
        self.stream.sendall(_encode(response, self.server.web_config.headers, head_only, keep_alive))


def _parse_head(head: bytes) -> tuple[Request, bool]:
    """Parse the request line and headers; the bool says whether the connection stays open."""
    lines = head.decode("latin-1").lstrip("\r\n").split("\n")
    parts = lines[0].rstrip("\r").split(" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]):
        raise ClientError(400, "malformed request line")
    method, target, version_text = parts
    version = _VERSION.fullmatch(version_text)
    if version is None:
        raise ClientError(
            505 if version_text.startswith("HTTP/") else 400, "only HTTP/1.0 and HTTP/1.1 are served"
        )
    headers: dict[str, str] = {}
    for raw in lines[1:]:
        line = raw.rstrip("\r")
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.fullmatch(name):
            raise ClientError(400, "malformed header line")
        key = name.lower()
        value = value.strip(" \t")
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    path, query = _split_target(target)
    connection = {token.strip().lower() for token in headers.get("connection", "").split(",")}
    keep_alive = "close" not in connection if version.group(1) == "1" else "keep-alive" in connection
    return Request(method=method, path=path, query=query, headers=headers), keep_alive


def _split_target(target: str) -> tuple[str, dict[str, list[str]]]:
    if target.startswith("/"):
        path, _, query = target.partition("?")
    elif target.startswith(("http://", "https://")):
        parts = urlsplit(target)
        path, query = parts.path or "/", parts.query
    else:
        raise ClientError(400, "malformed request target")
    try:
        return path, parse_qs(query, keep_blank_values=True, max_num_fields=100)
    except ValueError:
        raise ClientError(400, "too many query parameters") from None


_SERVER = f"intune-provisioning-exporter/{exporter.__version__}"


def _encode(response: Response, configured: Mapping[str, str], head_only: bool, keep_alive: bool) -> bytes:
    """The whole response as one buffer: one write, so no small segment waits for an ACK."""
    try:
        reason = HTTPStatus(response.status).phrase
    except ValueError:
        reason = ""
    lines = [
        f"HTTP/1.1 {response.status} {reason}",
        f"Date: {formatdate(usegmt=True)}",
        f"Server: {_SERVER}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
    ]
    for name, value in {**configured, **response.headers}.items():
        if any(char in name or char in value for char in "\r\n"):
            raise ValueError(f"response header {name!r} spans lines")
        lines.append(f"{name}: {value}")
    if not keep_alive:
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + response.body


def parse_listen_address(value: str) -> tuple[str, int]:
    """``:9863``, ``0.0.0.0:9863``, ``localhost:9863`` or ``[::1]:9863``."""
    match = re.fullmatch(r"(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:\[\]]*)):(?P<port>\d{1,5})", value.strip())
    if not match or not 0 <= int(match.group("port")) <= 65535:
        raise ValueError(f"--web.listen-address: expected HOST:PORT, got {value!r}")
    host = match.group("v6") or match.group("host") or ""
    return host or "0.0.0.0", int(match.group("port"))


def serve_forever_in_thread(server: ExporterHTTPServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    thread.name = "http-accept"
    thread.start()
    return thread
