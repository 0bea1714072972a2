"""The HTTP transport: serves an :data:`App` (``exporter.webapp`` builds the exporter's) with TLS and
basic auth from an exporter-toolkit style web config file.

The transport owns everything that is the same for every path: parsing, basic auth, the configured
response headers, HEAD, and turning an exception in the app into a 500.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import socket
import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

import exporter
from exporter.webconfig import WebConfig

log = logging.getLogger(__name__)


class BasicAuth:
    """bcrypt checks are slow by design; successful checks are cached by a hash of the credentials
    so that a scrape every few seconds does not spend a core on bcrypt."""

    def __init__(self, users: Mapping[str, bytes]) -> None:
        self.users = users
        self._cache: dict[str, bool] = {}
        self._lock = threading.Lock()

    def check(self, header: str | None) -> bool:
        if not self.users:
            return True
        if not header or not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:]).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        hashed = self.users.get(user)
        if hashed is None:
            return False
        cache_key = hashlib.sha256(hashed + b"\0" + password.encode()).hexdigest()
        with self._lock:
            cached = self._cache.get(cache_key)
        if cached is not None:
            return cached
        import bcrypt

        ok = bcrypt.checkpw(password.encode(), hashed)
        with self._lock:
            if len(self._cache) > 1000:
                self._cache.clear()
            self._cache[cache_key] = ok
        return ok


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

UNAUTHORIZED = Response(401, b"Unauthorized\n", "text/plain", {"WWW-Authenticate": 'Basic realm="exporter"'})
INTERNAL_ERROR = Response(500, b"Internal Server Error\n", "text/plain")


class ExporterHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], app: App, web_config: WebConfig) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _Handler)
        self.app = app
        self.web_config = web_config
        self.auth = BasicAuth(web_config.basic_auth_users)

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, addr = super().get_request()
        context = self.web_config.ssl_context
        if context is None:
            return conn, addr
        # The handshake happens in the request thread (do_handshake_on_connect), not here, so one
        # slow client cannot stall the accept loop.
        return context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False), addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("error serving %s", client_address, exc_info=True)

    def respond(self, request: Request) -> Response:
        if not self.auth.check(request.header("authorization") or None):
            return UNAUTHORIZED
        try:
            return self.app(request)
        except Exception:
            log.exception("error while serving %s", request.path)
            return INTERNAL_ERROR


class _Handler(BaseHTTPRequestHandler):
    server: ExporterHTTPServer
    protocol_version = "HTTP/1.1"
    server_version = f"intune-provisioning-exporter/{exporter.__version__}"

    def setup(self) -> None:
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(10)
            try:
                self.request.do_handshake()
            except (ssl.SSLError, OSError) as exc:
                log.debug("TLS handshake with %s failed: %s", self.client_address, exc)
                raise
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        request = Request(
            method=self.command,
            path=path,
            query=parse_qs(query, keep_blank_values=True),
            headers={name.lower(): value for name, value in self.headers.items()},
        )
        self._send(self.server.respond(request))

    def do_HEAD(self) -> None:
        self.do_GET()

    def _send(self, response: Response) -> None:
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        for name, value in {**self.server.web_config.headers, **response.headers}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)


def parse_listen_address(value: str) -> tuple[str, int]:
    """``:9863``, ``0.0.0.0:9863``, ``localhost:9863`` or ``[::1]:9863``."""
    match = re.fullmatch(r"(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:\[\]]*)):(?P<port>\d{1,5})", value.strip())
    if not match or not 0 <= int(match.group("port")) <= 65535:
        raise ValueError(f"--web.listen-address: expected HOST:PORT, got {value!r}")
    host = match.group("v6") or match.group("host") or ""
    return host or "0.0.0.0", int(match.group("port"))


def serve_forever_in_thread(server: ExporterHTTPServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    thread.start()
    return thread
