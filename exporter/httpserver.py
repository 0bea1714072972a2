"""HTTP endpoints, with TLS and basic auth from an exporter-toolkit style web config file.

``/metrics`` (Prometheus text or OpenMetrics, gzip when asked), ``/`` (landing page with per-source
status), ``/-/healthy``, ``/-/ready`` and ``/stuck`` (JSON). A request never reaches a backend: every
handler reads the engine's current snapshot.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import logging
import re
import socket
import ssl
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

import exporter
from exporter.engine import Snapshot
from exporter.pages import landing_page, stuck_document
from exporter.webconfig import WebConfig

log = logging.getLogger(__name__)


class BasicAuth:
    """bcrypt checks are slow by design; successful checks are cached by a hash of the credentials
    so that a scrape every few seconds does not spend a core on bcrypt."""

    def __init__(self, users: Mapping[str, bytes]) -> None:
        self.users = users
        self._cache: dict[str, bool] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self.users)

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


class ExporterHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        registry: CollectorRegistry,
        snapshot: Callable[[], Snapshot],
        web_config: WebConfig,
        user_label: str,
        landing_title: str = "intune-provisioning-exporter",
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _Handler)
        self.registry = registry
        self.snapshot = snapshot
        self.web_config = web_config
        self.auth = BasicAuth(web_config.basic_auth_users)
        self.user_label = user_label
        self.landing_title = landing_title

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
        path = self.path.split("?", 1)[0]
        if not self.server.auth.check(self.headers.get("Authorization")):
            self._send(401, b"Unauthorized\n", "text/plain", {"WWW-Authenticate": 'Basic realm="exporter"'})
            return
        routes = {
            "/metrics": self._metrics,
            "/": self._landing,
            "/-/healthy": self._healthy,
            "/-/ready": self._ready,
            "/stuck": self._stuck,
        }
        handler = routes.get(path)
        if handler is None:
            self._send(404, b"Not Found\n", "text/plain")
            return
        try:
            handler()
        except Exception:
            log.exception("error while serving %s", path)
            self._send(500, b"Internal Server Error\n", "text/plain")

    def do_HEAD(self) -> None:
        self.do_GET()

    def _send(
        self, code: int, body: bytes, content_type: str, headers: Mapping[str, str] | None = None
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        for name, value in {**self.server.web_config.headers, **(headers or {})}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _metrics(self) -> None:
        encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
        body = encoder(self.server.registry)
        headers = {}
        if "gzip" in self.headers.get("Accept-Encoding", ""):
            body = gzip.compress(body)
            headers["Content-Encoding"] = "gzip"
        self._send(200, body, content_type, headers)

    def _healthy(self) -> None:
        self._send(200, b"Healthy\n", "text/plain; charset=utf-8")

    def _ready(self) -> None:
        if self.server.snapshot().ready:
            self._send(200, b"Ready\n", "text/plain; charset=utf-8")
        else:
            self._send(503, b"Not ready: waiting for the first refresh of every source\n", "text/plain")

    def _stuck(self) -> None:
        body = json.dumps(stuck_document(self.server.snapshot(), self.server.user_label), indent=2)
        self._send(200, body.encode(), "application/json")

    def _landing(self) -> None:
        page = landing_page(self.server.snapshot(), self.server.landing_title)
        self._send(200, page.encode(), "text/html; charset=utf-8")


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
