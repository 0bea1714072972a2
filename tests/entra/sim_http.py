"""Transport of the Graph simulator: a threading HTTPS server whose connections it can cut, and the
exchange object through which every request is answered (and logged), slowly or broken if a fault says so.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from tests.entra.sim_model import Fault, RequestRecord

if TYPE_CHECKING:
    from tests.entra.graph_sim import GraphSimulator

LOGGED_REQUEST_HEADERS = ("ConsistencyLevel", "Prefer")
JSON = "application/json; charset=utf-8"


@dataclass
class Reply:
    """An answer built (under the simulator's lock) before it is sent (outside it)."""

    status: int
    body: Any  # JSON-able, or bytes sent as they are
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = JSON


def graph_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Reply:
    inner = {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "request-id": secrets.token_hex(8)}
    return Reply(status, {"error": {"code": code, "message": message, "innerError": inner}}, headers or {})


def intune_error(status: int, code: str, message: str, path: str) -> Reply:
    """Intune wraps its own JSON error document, as text, in the Graph error message."""
    url = f"https://fef.msua01.manage.microsoft.com/DeviceFE/StatelessDeviceFEService{path[5:]}"
    activity = "-".join(secrets.token_hex(n) for n in (4, 2, 2, 2, 6))
    document = {
        "_version": 3,
        "Message": f"{message} - Operation ID (for customer support): 00000000-0000-0000-0000-000000000000"
        f" - Activity ID: {activity} - Url: {url}?api-version=2024-06-14",
        "CustomApiErrorPhrase": "",
        "RetryAfter": None,
        "ErrorSourceService": "",
        "HttpHeaders": "{}",
    }
    return graph_error(status, code, json.dumps(document, indent=2).replace("\n", "\r\n"))


class Exchange:
    """One request and its answer (every answer is logged)."""

    def __init__(
        self,
        handler: Handler,
        method: str,
        endpoint: str,
        path: str,
        query: dict[str, str],
        form: dict[str, str],
        sim: GraphSimulator,
    ) -> None:
        self.handler = handler
        self.method = method
        self.endpoint = endpoint
        self.path = path
        self.query = query
        self.form = form
        self.sim = sim
        self.token: str | None = None
        self.extra_headers: dict[str, str] = {}
        self.trickle: Fault | None = None
        self.malformed = False
        self.truncate = False
        self.release = sim.release_event  # set when the faults are cleared (ends hangs and trickles)

    @property
    def headers(self) -> Any:
        return self.handler.headers

    def header(self, name: str) -> str:
        return str(self.handler.headers.get(name, ""))

    def _record(self, status: int | None) -> None:
        safe_form = {k: v for k, v in self.form.items() if k not in {"client_secret", "client_assertion"}}
        headers = {name: self.header(name) for name in LOGGED_REQUEST_HEADERS if self.header(name)}
        self.sim.record(
            RequestRecord(
                self.method,
                self.endpoint,
                self.path,
                dict(self.query),
                status,
                self.token,
                safe_form,
                headers,
            )
        )

    def send(
        self, status: int, body: bytes, *, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        if self.malformed and content_type.startswith("application/json"):
            body = body[: len(body) // 2]
        self._record(status)
        handler = self.handler
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        for name, value in {**self.extra_headers, **(headers or {})}.items():
            handler.send_header(name, value)
        handler.end_headers()
        if self.trickle is not None:
            self._send_slowly(body, self.trickle)
        else:
            handler.wfile.write(body)

    def _send_slowly(self, body: bytes, fault: Fault) -> None:
        deadline = None if fault.duration is None else time.monotonic() + fault.duration
        sent = 0
        while sent < len(body) and (deadline is None or time.monotonic() < deadline):
            self.handler.wfile.write(body[sent : sent + 1])
            sent += 1
            if self.sim.wait_for_release(fault.interval, self.release):
                break
        if sent < len(body):
            if fault.then == "close" or self.sim.stopping:
                self.close()
                return
            self.handler.wfile.write(body[sent:])

    def send_json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        self.send(status, json.dumps(body).encode("utf-8"), content_type=JSON, headers=headers)

    def reply(self, reply: Reply) -> None:
        body = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode("utf-8")
        self.send(reply.status, body, content_type=reply.content_type, headers=reply.headers)

    def graph_error(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        self.reply(graph_error(status, code, message, headers))

    def aad_error(self, status: int, error: str, code: int, description: str) -> None:
        self.send_json(
            status,
            {
                "error": error,
                "error_description": f"AADSTS{code}: {description} Trace ID: {secrets.token_hex(8)}",
                "error_codes": [code],
                "timestamp": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
                "trace_id": secrets.token_hex(8),
                "correlation_id": secrets.token_hex(8),
            },
        )

    def reset(self) -> None:
        """Drop the connection with a TCP reset instead of answering."""
        self._record(None)
        connection = self.handler.connection
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close()

    def close(self) -> None:
        """Close the connection (an answer, if one was started, stays incomplete)."""
        with contextlib.suppress(OSError):
            self.handler.connection.close()
        self.handler.close_connection = True

    def drop(self) -> None:
        """Close the connection without any answer (logged with status None)."""
        self._record(None)
        self.close()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30
    server: Server

    def do_GET(self) -> None:
        self.server.sim.handle(self, "GET")

    def do_POST(self) -> None:
        self.server.sim.handle(self, "POST")

    def do_PATCH(self) -> None:
        self.server.sim.handle(self, "PATCH")

    def do_DELETE(self) -> None:
        self.server.sim.handle(self, "DELETE")

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self, address: tuple[str, int], handler: type[Handler], context: ssl.SSLContext, sim: GraphSimulator
    ) -> None:
        super().__init__(address, handler)
        self.context = context
        self.sim = sim
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()

    def finish_request(self, request: Any, client_address: Any) -> None:
        # TLS is set up here, in the connection's own thread, so a slow handshake blocks no one.
        request.settimeout(10)
        try:
            connection = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return
        # Tracked from here (wrapping detached `request`), so that cut_connections can end keep-alives.
        with self._connections_lock:
            self._connections.add(connection)
        try:
            Handler(connection, client_address, self)
        finally:
            with self._connections_lock:
                self._connections.discard(connection)
            connection.close()

    def cut_connections(self) -> None:
        """Shut every open connection down, as a server that goes away does."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:  # resets and timeouts are expected
        pass
