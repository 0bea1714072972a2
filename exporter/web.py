"""HTTP endpoints, with TLS and basic auth from an exporter-toolkit style web config file.

``/metrics`` (Prometheus text or OpenMetrics, gzip when asked), ``/`` (landing page with per-source
status), ``/-/healthy``, ``/-/ready`` and ``/stuck`` (JSON). A request never reaches a backend: every
handler reads the engine's current snapshot.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import html
import json
import logging
import re
import socket
import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

import exporter
from exporter.engine import EstateSnapshot, Snapshot
from exporter.model import STAGES, WAITING_STAGES
from exporter.stages import user_label_value

log = logging.getLogger(__name__)

_TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
_CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_OPTIONAL,
    "RequireAnyClientCert": ssl.CERT_REQUIRED,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}


class WebConfigError(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class WebConfig:
    ssl_context: ssl.SSLContext | None = None
    basic_auth_users: Mapping[str, bytes] = field(default_factory=dict)  # user -> bcrypt hash
    headers: Mapping[str, str] = field(default_factory=dict)


def load_web_config(path: str | None) -> WebConfig:
    """Parse the exporter-toolkit web config format; raise WebConfigError naming each bad key."""
    if not path:
        return WebConfig()
    prefix = "--web.config.file"
    file = Path(path)
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise WebConfigError([f"{prefix}: cannot read {path}: {exc.strerror}"]) from None
    except yaml.YAMLError:
        raise WebConfigError([f"{prefix}: not valid YAML"]) from None
    problems: list[str] = []
    if not isinstance(data, dict):
        raise WebConfigError([f"{prefix}: must be a mapping"])
    for key in data:
        if key not in ("tls_server_config", "basic_auth_users", "http_server_config"):
            problems.append(f"{prefix}: {key}: unknown key")
    context = _tls_context(data.get("tls_server_config"), file.parent, problems)
    users: dict[str, bytes] = {}
    raw_users = data.get("basic_auth_users") or {}
    if not isinstance(raw_users, dict):
        problems.append(f"{prefix}: basic_auth_users: must map user names to bcrypt hashes")
    else:
        for user, hashed in raw_users.items():
            if not isinstance(hashed, str) or not re.match(r"^\$2[abxy]?\$\d\d\$", hashed):
                problems.append(f"{prefix}: basic_auth_users.{user}: must be a bcrypt hash")
            else:
                users[str(user)] = hashed.encode()
    headers: dict[str, str] = {}
    server = data.get("http_server_config") or {}
    if isinstance(server, dict):
        for key in server:
            if key not in ("headers", "http2"):
                problems.append(f"{prefix}: http_server_config.{key}: unknown key")
        for name, value in (server.get("headers") or {}).items():
            headers[str(name)] = str(value)
    if problems:
        raise WebConfigError(problems)
    return WebConfig(ssl_context=context, basic_auth_users=users, headers=headers)


def _tls_context(raw: Any, base: Path, problems: list[str]) -> ssl.SSLContext | None:
    if not raw:
        return None
    prefix = "--web.config.file: tls_server_config"
    allowed = {"cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version", "max_version"}
    for key in raw:
        if key not in allowed:
            problems.append(f"{prefix}.{key}: unknown key")

    def path_of(key: str, required: bool) -> str | None:
        value = raw.get(key)
        if not value:
            if required:
                problems.append(f"{prefix}.{key}: required")
            return None
        resolved = Path(value) if Path(value).is_absolute() else base / value
        if not resolved.is_file():
            problems.append(f"{prefix}.{key}: file not found: {value}")
            return None
        return str(resolved)

    cert, key = path_of("cert_file", True), path_of("key_file", True)
    client_ca = path_of("client_ca_file", False)
    auth_type = raw.get("client_auth_type", "NoClientCert")
    if auth_type not in _CLIENT_AUTH:
        problems.append(f"{prefix}.client_auth_type: must be one of {', '.join(_CLIENT_AUTH)}")
        auth_type = "NoClientCert"
    needs_ca = auth_type in ("RequireAndVerifyClientCert", "VerifyClientCertIfGiven")
    if needs_ca and client_ca is None and not any(p.startswith(f"{prefix}.client_ca_file") for p in problems):
        problems.append(f"{prefix}.client_ca_file: required for client_auth_type {auth_type}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    for bound in ("min_version", "max_version"):
        if raw.get(bound) is None:
            continue
        if raw[bound] not in _TLS_VERSIONS:
            problems.append(f"{prefix}.{bound}: must be one of {', '.join(_TLS_VERSIONS)}")
        else:
            setattr(
                context,
                "minimum_version" if bound == "min_version" else "maximum_version",
                _TLS_VERSIONS[raw[bound]],
            )
    if raw.get("min_version") is None:
        context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert and key:
        try:
            context.load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as exc:
            problems.append(f"{prefix}.cert_file: cannot load certificate and key: {exc}")
    context.verify_mode = _CLIENT_AUTH[auth_type]
    if client_ca:
        try:
            context.load_verify_locations(client_ca)
        except (ssl.SSLError, OSError) as exc:
            problems.append(f"{prefix}.client_ca_file: cannot load: {exc}")
    return context


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


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def stuck_document(snapshot: Snapshot, user_label: str) -> dict[str, Any]:
    """The /stuck JSON: stuck users per estate and stage, longest-waiting first."""
    now = snapshot.taken_at
    estates = []
    for estate in snapshot.estates:
        view = estate.view
        entry: dict[str, Any] = {
            "estate": estate.name,
            "evaluated_at": _iso(view.evaluated_at if view else None),
        }
        stages: dict[str, Any] = {}
        for stage in WAITING_STAGES:
            stuck = [s for s in view.stuck_users if s.stage == stage] if view else []
            item: dict[str, Any] = {
                "stuck_after_seconds": estate.stuck_after.get(stage),
                "count": len(stuck),
            }
            if user_label != "none":
                item["users"] = [
                    {
                        "user": user_label_value(
                            user_label, s.sam_account_name, s.user_principal_name, s.user_key
                        ),
                        "entered_stage_at": _iso(s.entered),
                        "waiting_seconds": round(max(0.0, now - s.entered), 1),
                    }
                    for s in stuck
                ]
            stages[stage] = item
        entry["available"] = view is not None
        entry["stages"] = stages
        estates.append(entry)
    return {"generated_at": _iso(now), "estates": estates}


def landing_page(snapshot: Snapshot, title: str) -> str:
    rows = []
    for estate in snapshot.estates:
        for kind, status in estate.sources.items():
            state = "up" if status.up else ("down" if status.refreshed else "waiting")
            rows.append(
                "<tr>"
                + "".join(
                    f"<td>{html.escape(str(cell))}</td>"
                    for cell in (
                        estate.name,
                        kind,
                        status.description,
                        state,
                        _iso(status.last_success) or "never",
                        "" if status.records is None else status.records,
                        status.last_error or "",
                    )
                )
                + "</tr>"
            )
    ready = "ready" if snapshot.ready else "not ready yet (waiting for the first refresh)"
    pipeline = "".join(_pipeline_table(estate) for estate in snapshot.estates)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}</style></head>
<body><h1>{html.escape(title)}</h1>
<p>Version {html.escape(exporter.__version__)}; {html.escape(ready)};
snapshot taken {_iso(snapshot.taken_at)}.</p>
<ul><li><a href="metrics">Metrics</a></li><li><a href="stuck">Stuck users (JSON)</a></li>
<li><a href="-/healthy">Health</a></li><li><a href="-/ready">Readiness</a></li></ul>
{pipeline}
<h2>Sources</h2>
<table><tr><th>Estate</th><th>Source</th><th>Reads from</th><th>State</th><th>Last success</th>
<th>Records</th><th>Last error</th></tr>
{"".join(rows)}
</table></body></html>
"""


def _pipeline_table(estate: EstateSnapshot) -> str:
    view = estate.view
    if view is None:
        return ""
    cells = "".join(
        f"<tr><td>{stage}</td><td>{view.users[stage]}</td><td>{view.stuck[stage]}</td></tr>"
        for stage in STAGES
    )
    return (
        f"<h2>Pipeline: {html.escape(estate.name)}</h2>"
        "<table><tr><th>Stage</th><th>Users</th><th>Stuck</th></tr>"
        f"{cells}</table>"
    )


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
