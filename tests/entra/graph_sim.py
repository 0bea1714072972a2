"""A Microsoft identity platform + Microsoft Graph v1.0 simulator over HTTPS on loopback.

One port serves what the exporter talks to:

- identity platform: ``GET /{tenant}/v2.0/.well-known/openid-configuration``, ``POST
  /{tenant}/oauth2/v2.0/token`` (client secret or certificate assertion; :mod:`tests.entra.sim_identity`);
- Graph, with bearer tokens and per-app application permissions: ``/v1.0/users`` (``$select``, ``$top``,
  ``$filter``, ``$count``), ``/v1.0/users/$count``, ``/v1.0/users/{id|upn}``, ``/v1.0/users/delta``,
  ``/v1.0/groups/{id}``, ``/v1.0/deviceManagement/managedDevices[/{id}]``, ``/v1.0/organization``,
  ``/v1.0/subscribedSkus``, ``/v1.0/directory/subscriptions`` (:mod:`tests.entra.sim_graph`,
  :mod:`tests.entra.sim_delta`, filter rules in :mod:`tests.entra.sim_filter`);
- throttling headers and optional 429s as Graph sends them (:mod:`tests.entra.sim_throttle`);
- ``/_sim/...``: unauthenticated admin endpoints for out-of-process drivers (:mod:`tests.entra.sim_admin`).

Python API (every method is thread-safe):

- lifecycle: ``start()``, ``stop()``, ``pause()`` / ``resume()`` (stop listening and cut open
  connections, then listen again on the same port), ``port``, ``base_url``;
- data: ``add_tenant(SimTenant)``, ``tenants[id]``; ``upsert_user(tenant_id, user)``,
  ``patch_user(tenant_id, id, **props)``, ``delete_user(tenant_id, id, hard=False)``,
  ``restore_user(tenant_id, id)``, ``user_version(tenant_id, id)``; ``upsert_device``, ``patch_device``,
  ``delete_device``; assigning ``tenant.users = [...]`` replaces all users (differences are logged);
- delta: ``delta_page_size`` (200), ``delta_token_lifetime`` (7 days), ``delta_expired_status`` (400 or
  410), ``delta_partial``, ``delta_replay``, ``delta_duplicates``; ``invalidate_delta_tokens()``;
  ``now()`` / ``advance(seconds)`` (the simulator clock that delta tokens age on; bearer tokens age in
  real time, as msal caches them by real time);
- other knobs: ``token_lifetime``, ``subscriptions_page_size``, ``devices_page_size`` (1000),
  ``resource_url``, ``throttle`` (a :class:`ThrottleModel`: headers per endpoint, enforcement);
- faults: ``add_fault(endpoint, nth, kind, **options)`` (kinds in :class:`Fault`), ``clear_faults()``,
  ``expire_tokens()``;
- observation: ``log`` / ``requests_to(endpoint)`` (:class:`RequestRecord`), ``request_counts()``,
  ``status_counts()``, ``reset_counters()``, ``issued_tokens()``; ``reset()`` forgets everything.

Endpoint names (for faults, the log and the counters): ``openid``, ``token``, ``users``, ``usersCount``,
``user``, ``usersDelta``, ``group``, ``managedDevices``, ``managedDevice``, ``organization``,
``subscribedSkus``, ``subscriptions``.

Standalone: ``python -m tests.entra.graph_sim serve --port P --cert-dir D (--tenant-file F.json[l] |
--synthetic-users N --seed S)`` (see :mod:`tests.entra.sim_server`).
"""

from __future__ import annotations

import math
import re
import secrets
import socket
import ssl
import threading
import time
from collections import OrderedDict, deque
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from tests.entra import sim_admin, sim_delta, sim_graph, sim_identity
from tests.entra.sim_http import Exchange, Handler, Reply, Server, graph_error, intune_error
from tests.entra.sim_identity import b64url
from tests.entra.sim_model import (
    DEFAULT_USER_PROPERTIES,
    GRANTING_PERMISSIONS,
    MANAGED_DEVICE_PROPERTIES,
    USER_PROPERTIES,
    Fault,
    RequestRecord,
    SimApp,
    SimTenant,
)
from tests.entra.sim_store import Change
from tests.entra.sim_throttle import INTUNE_ENDPOINTS, ThrottleModel

if TYPE_CHECKING:
    import trustme

__all__ = [
    "DEFAULT_USER_PROPERTIES",
    "GRANTING_PERMISSIONS",
    "MANAGED_DEVICE_PROPERTIES",
    "USER_PROPERTIES",
    "Fault",
    "GraphSimulator",
    "RequestRecord",
    "SimApp",
    "SimTenant",
    "b64url",
]

_ROUTES = (
    (re.compile(r"^/v1\.0/users$"), "users"),
    (re.compile(r"^/v1\.0/users/\$count$"), "usersCount"),
    (re.compile(r"^/v1\.0/users/(?:microsoft\.graph\.)?delta(?:\(\))?$"), "usersDelta"),
    (re.compile(r"^/v1\.0/users/([^/]+)$"), "user"),
    (re.compile(r"^/v1\.0/organization$"), "organization"),
    (re.compile(r"^/v1\.0/subscribedSkus$"), "subscribedSkus"),
    (re.compile(r"^/v1\.0/directory/subscriptions$"), "subscriptions"),
    (re.compile(r"^/v1\.0/groups/([^/]+)$"), "group"),
    (re.compile(r"^/v1\.0/deviceManagement/managedDevices$"), "managedDevices"),
    (re.compile(r"^/v1\.0/deviceManagement/managedDevices/([^/]+)$"), "managedDevice"),
    (re.compile(r"^/([^/]+)/v2\.0/\.well-known/openid-configuration$"), "openid"),
    (re.compile(r"^/([^/]+)/oauth2/v2\.0/token$"), "token"),
    (re.compile(r"^/_sim/(.+)$"), "admin"),
)
_CURSOR_PREFIX = "RFNwdAIAAQAAA"


@dataclass
class _Token:
    tenant_id: str
    client_id: str
    permissions: frozenset[str]
    expires_at: float


class GraphSimulator:
    def __init__(self, ca: trustme.CA, *, port: int = 0) -> None:
        self._cert = ca.issue_cert("127.0.0.1", "localhost")
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._paused = threading.Event()
        self._server: Server | None = None
        self._thread: threading.Thread | None = None
        self._port = port
        self.tenants: dict[str, SimTenant] = {}
        self.log: deque[RequestRecord] = deque()
        self.delta_states: dict[str, sim_delta.DeltaState] = {}
        self.throttle = ThrottleModel()
        self.release_event = threading.Event()
        self._tokens: dict[str, _Token] = {}
        self._cursors: OrderedDict[str, object] = OrderedDict()
        self._faults: list[Fault] = []
        self._counts: dict[str, int] = {}
        self._status_counts: dict[str, dict[str, int]] = {}
        self._clock_offset = 0.0
        self._set_defaults()

    def _set_defaults(self) -> None:
        self.token_lifetime = 3600
        self.subscriptions_page_size = 100
        self.devices_page_size = 1000
        # The Graph resource whose "/.default" scope tokens are issued for (default: this server).
        self.resource_url: str | None = None
        self.delta_page_size = 200
        self.delta_token_lifetime = 7 * 86400.0
        self.delta_expired_status = 400
        self.delta_partial = False
        self.delta_replay = 0
        self.delta_duplicates = 0
        self.max_cursors = 200_000

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._stop.clear()
        self._paused.clear()
        self._listen(self._port)

    def stop(self) -> None:
        self._stop.set()
        self.release_event.set()
        self._close_server()

    def pause(self) -> None:
        """Stop listening and cut every open connection: clients now get "connection refused"."""
        self._paused.set()
        self._close_server()

    def resume(self) -> None:
        """Listen again, on the same port."""
        self._paused.clear()
        self._listen(self._port)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set() or self._paused.is_set()

    @property
    def lock(self) -> AbstractContextManager[Any]:
        """The lock every request and mutation holds; hold it to read several things consistently."""
        return self._lock

    @property
    def port(self) -> int:
        return self._port

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def _listen(self, port: int) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._cert.configure_cert(context)
        server = Server(("127.0.0.1", port), Handler, context, self)
        self._port = int(server.server_address[1])
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="graph-sim", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while True:  # ready once a TCP connection is accepted
            try:
                with socket.create_connection(("127.0.0.1", self._port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _close_server(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
            server.cut_connections()
        if thread is not None:
            thread.join(timeout=5)

    # ------------------------------------------------------------------ scripting
    def reset(self) -> None:
        with self._lock:
            self.tenants.clear()
            self._tokens.clear()
            self._cursors.clear()
            self.delta_states.clear()
            self._counts.clear()
            self._status_counts.clear()
            self.log.clear()
            self.throttle.reset()
            self._clock_offset = 0.0
            self._set_defaults()
        self.clear_faults()
        if self._paused.is_set() and not self._stop.is_set():  # a test that paused and failed
            self.resume()

    def add_tenant(self, tenant: SimTenant) -> SimTenant:
        with self._lock:
            self.tenants[tenant.tenant_id] = tenant
        return tenant

    def add_fault(self, endpoint: str, nth: int, kind: str, **options: Any) -> None:
        with self._lock:
            self._faults.append(Fault(endpoint, nth, kind, **options))

    def clear_faults(self) -> None:
        """Remove every fault; requests hanging or trickling because of one go on normally."""
        with self._lock:
            self._faults.clear()
            released, self.release_event = self.release_event, threading.Event()
        released.set()

    def expire_tokens(self) -> None:
        with self._lock:
            for token in self._tokens.values():
                token.expires_at = 0.0

    def requests_to(self, endpoint: str) -> list[RequestRecord]:
        with self._lock:
            return [record for record in self.log if record.endpoint == endpoint]

    def issued_tokens(self) -> int:
        with self._lock:
            return len(self._tokens)

    def request_counts(self) -> dict[str, int]:
        """Requests per endpoint since the last reset (fault `nth` counts the same way)."""
        with self._lock:
            return dict(self._counts)

    def status_counts(self) -> dict[str, dict[str, int]]:
        """Answers per endpoint and status ("none": no answer) since the last reset."""
        with self._lock:
            return {endpoint: dict(counts) for endpoint, counts in self._status_counts.items()}

    def reset_counters(self) -> None:
        with self._lock:
            self._counts.clear()
            self._status_counts.clear()

    # ------------------------------------------------------------------ clock
    def now(self) -> float:
        """The simulator clock (epoch seconds): real time plus what `advance` added."""
        return time.time() + self._clock_offset

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._clock_offset += seconds

    # ------------------------------------------------------------------ data
    def upsert_user(self, tenant_id: str, user: dict[str, Any]) -> Change | None:
        """Create or replace a user; returns the logged change (None: nothing tracked changed)."""
        with self._lock:
            tenant = self.tenants[tenant_id]
            return tenant.directory.upsert(dict(user), tenant.untracked)

    def patch_user(self, tenant_id: str, user_id: str, **props: Any) -> Change | None:
        with self._lock:
            tenant = self.tenants[tenant_id]
            return tenant.directory.patch(user_id, props, tenant.untracked)

    def delete_user(self, tenant_id: str, user_id: str, hard: bool = False) -> Change:
        """Soft delete (restorable; delta says reason "changed") or hard delete (reason "deleted")."""
        with self._lock:
            return self.tenants[tenant_id].directory.delete(user_id, hard=hard)

    def restore_user(self, tenant_id: str, user_id: str) -> Change:
        with self._lock:
            return self.tenants[tenant_id].directory.restore(user_id)

    def user_version(self, tenant_id: str, user_id: str) -> int:
        with self._lock:
            return self.tenants[tenant_id].directory.user_version(user_id)

    def upsert_device(self, tenant_id: str, device: dict[str, Any]) -> None:
        with self._lock:
            self.tenants[tenant_id].device_store.put(device)

    def patch_device(self, tenant_id: str, device_id: str, **props: Any) -> None:
        with self._lock:
            store = self.tenants[tenant_id].device_store
            current = store.get(device_id)
            if current is None:
                raise KeyError(device_id)
            store.put({**current, **props, "id": device_id})

    def delete_device(self, tenant_id: str, device_id: str) -> None:
        with self._lock:
            if self.tenants[tenant_id].device_store.remove(device_id) is None:
                raise KeyError(device_id)

    def invalidate_delta_tokens(self, tenant_id: str | None = None, status: int = 400) -> int:
        """Make every delta token (and round under way) answer `status` (400 or 410); returns how many."""
        with self._lock:
            states = list(self.delta_states.values())
            states += [c.state for c in self._cursors.values() if isinstance(c, sim_delta.DeltaRound)]
            hit = {id(s): s for s in states if tenant_id is None or s.tenant_id == tenant_id}
            for state in hit.values():
                state.invalid_status = status
            return len(hit)

    # ------------------------------------------------------------------ used by the handlers
    def issue_token(self, tenant_id: str, app: SimApp) -> str:
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[token] = _Token(
                tenant_id, app.client_id, app.permissions, time.time() + self.token_lifetime
            )
        return token

    def store_cursor(self, cursor: object) -> str:
        token = _CURSOR_PREFIX + secrets.token_urlsafe(24)
        with self._lock:
            self._cursors[token] = cursor
            while len(self._cursors) > self.max_cursors:
                self._cursors.popitem(last=False)
        return token

    def load_cursor(self, token: str) -> object | None:
        with self._lock:
            return self._cursors.get(token)

    def wait_for_release(self, timeout: float | None, event: threading.Event) -> bool:
        """Wait up to `timeout` seconds (None: no limit); True once `event` is set or the server stops."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not (event.is_set() or self.stopping):
            remaining = 0.05 if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                return False
            event.wait(min(remaining, 0.05))
        return True

    def record(self, record: RequestRecord) -> None:
        if record.endpoint == "admin":
            return
        with self._lock:
            self.log.append(record)
            status = "none" if record.status is None else str(record.status)
            counts = self._status_counts.setdefault(record.endpoint, {})
            counts[status] = counts.get(status, 0) + 1

    # ------------------------------------------------------------------ dispatch
    def handle(self, handler: Handler, method: str) -> None:
        split = urlsplit(handler.path)
        query = {key: values[-1] for key, values in parse_qs(split.query, keep_blank_values=True).items()}
        endpoint, param = _classify(unquote(split.path))
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        content_type = str(handler.headers.get("Content-Type", ""))
        form: dict[str, str] = {}
        if body and not content_type.startswith("application/json"):
            form = {k: v[-1] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
        exchange = Exchange(handler, method, endpoint, split.path, query, form, self)
        if endpoint == "admin":
            exchange.reply(sim_admin.handle(self, exchange, param or "", body))
            return
        with self._lock:
            self._counts[endpoint] = count = self._counts.get(endpoint, 0) + 1
            fault = next(
                (f for f in self._faults if f.endpoint == endpoint and f.nth <= count < f.nth + f.times), None
            )
        if fault is not None and self._apply_fault(exchange, fault):
            return
        if endpoint == "openid" and method == "GET":
            sim_identity.openid_configuration(self, exchange, param or "")
        elif endpoint == "token" and method == "POST":
            sim_identity.token(self, exchange, param or "")
        elif endpoint in GRANTING_PERMISSIONS and method == "GET":
            self._graph(exchange, endpoint, param)
        else:
            exchange.graph_error(404, "Request_ResourceNotFound", f"Resource '{split.path}' does not exist.")

    def _apply_fault(self, exchange: Exchange, fault: Fault) -> bool:
        """Apply a fault; True when it answered the request (or dropped it)."""
        kind = fault.kind
        if kind == "reset":
            exchange.reset()
            return True
        if kind == "hang":
            self.wait_for_release(None, exchange.release)
            if self.stopping:
                exchange.drop()
                return True
            return False
        if kind in {"delay", "expire_tokens", "trickle", "malformed", "truncate"}:
            if kind == "delay":
                self._stop.wait(fault.delay)
            elif kind == "expire_tokens":
                self.expire_tokens()
            elif kind == "trickle":
                exchange.trickle = fault
            else:
                setattr(exchange, kind, True)
            return False
        if kind == "garbage":
            exchange.send(200, b"<html>this is not JSON", content_type="text/html")
            return True
        status = int(kind)
        headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else {}
        codes = {
            429: "TooManyRequests",
            503: "serviceNotAvailable",
            500: "generalException",
            502: "badGateway",
            403: "Authorization_RequestDenied",
            401: "InvalidAuthenticationToken",
        }
        exchange.graph_error(status, codes.get(status, "error"), "Scripted fault.", headers=headers)
        return True

    def _graph(self, exchange: Exchange, endpoint: str, param: str | None) -> None:
        token = self._authenticate(exchange)
        if token is None:
            return
        if not GRANTING_PERMISSIONS[endpoint] & token.permissions:
            if endpoint in INTUNE_ENDPOINTS:
                exchange.reply(
                    intune_error(403, "Forbidden", sim_graph.DEVICE_PERMISSION_MESSAGE, exchange.path)
                )
            else:
                exchange.graph_error(
                    403, "Authorization_RequestDenied", "Insufficient privileges to complete the operation."
                )
            return
        with self._lock:
            tenant = self.tenants[token.tenant_id]
            verdict = self.throttle.meter(
                endpoint,
                exchange.query,
                tenant_id=tenant.tenant_id,
                app_id=token.client_id,
                user_count=len(tenant.directory),
                now=time.monotonic(),
            )
            exchange.extra_headers.update(verdict.headers)
            if verdict.throttled:
                retry = {"Retry-After": str(math.ceil(verdict.retry_after))}
                reply = graph_error(429, "TooManyRequests", "Too many requests, retry later.", retry)
            else:
                reply = self._resource(exchange, endpoint, tenant, param or "")
        exchange.reply(reply)

    def _resource(self, exchange: Exchange, endpoint: str, tenant: SimTenant, param: str) -> Reply:
        if endpoint == "users":
            return sim_graph.list_users(self, exchange, tenant)
        if endpoint == "usersCount":
            return sim_graph.count_users(self, exchange, tenant)
        if endpoint == "user":
            return sim_graph.get_user(self, exchange, tenant, param)
        if endpoint == "usersDelta":
            return sim_delta.users_delta(self, exchange, tenant)
        if endpoint == "group":
            return sim_graph.get_group(self, exchange, tenant, param)
        if endpoint == "managedDevices":
            return sim_graph.list_devices(self, exchange, tenant)
        if endpoint == "managedDevice":
            return sim_graph.get_device(self, exchange, tenant, param)
        if endpoint == "subscribedSkus":
            return sim_graph.subscribed_skus(self, exchange, tenant)
        if endpoint == "subscriptions":
            return sim_graph.subscriptions(self, exchange, tenant)
        return sim_graph.organization(self, exchange, tenant)

    def _authenticate(self, exchange: Exchange) -> _Token | None:
        header = exchange.header("Authorization")
        value = header[7:] if header.startswith("Bearer ") else ""
        exchange.token = value or None
        if not value:
            exchange.graph_error(401, "InvalidAuthenticationToken", "Access token is empty.")
            return None
        with self._lock:
            token = self._tokens.get(value)
        if token is None:
            exchange.graph_error(401, "InvalidAuthenticationToken", "IDX14100: JWT is not well formed.")
            return None
        if token.expires_at <= time.time():
            exchange.graph_error(
                401, "InvalidAuthenticationToken", "Lifetime validation failed, the token is expired."
            )
            return None
        return token


def _classify(path: str) -> tuple[str, str | None]:
    for pattern, endpoint in _ROUTES:
        match = pattern.match(path)
        if match:
            return endpoint, (match.group(1) if match.groups() else None)
    return "unknown", None


if __name__ == "__main__":
    from tests.entra.sim_server import main

    raise SystemExit(main())
