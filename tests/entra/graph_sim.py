"""A Microsoft identity platform + Microsoft Graph simulator over HTTPS on loopback.

It serves, on one port, what the exporter talks to:

- ``GET /{tenant}/v2.0/.well-known/openid-configuration`` and ``POST /{tenant}/oauth2/v2.0/token``
  (client credentials with a client secret, or a client assertion JWT signed with the app's
  certificate: signature, ``x5t``/``x5t#S256`` thumbprint, audience, issuer and lifetime are checked);
- ``GET /v1.0/users``, ``/v1.0/organization``, ``/v1.0/subscribedSkus`` and
  ``/v1.0/directory/subscriptions`` with bearer-token checks, per-app application permissions,
  ``$select`` semantics (without it only the default user properties), ``$top`` bounds (1..999) and
  opaque ``$skiptoken`` paging.

Faults are scripted per endpoint and per request number (429/503 with Retry-After, 500, connection
reset, delay, token expiry, a body that is not JSON), and every request is logged so that tests can
assert what the client really did. Errors use the services' documented shapes and codes
(``invalid_client``/AADSTS7000215, ``invalid_tenant``/AADSTS90002, ``InvalidAuthenticationToken``,
``Authorization_RequestDenied``).
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlencode, urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

if TYPE_CHECKING:
    import trustme

DEFAULT_USER_PROPERTIES = (
    "businessPhones",
    "displayName",
    "givenName",
    "jobTitle",
    "mail",
    "mobilePhone",
    "officeLocation",
    "preferredLanguage",
    "surname",
    "userPrincipalName",
    "id",
)
# Properties a $select may name (the subset of microsoft.graph.user the simulator knows).
USER_PROPERTIES = frozenset(
    (
        *DEFAULT_USER_PROPERTIES,
        "accountEnabled",
        "createdDateTime",
        "onPremisesSyncEnabled",
        "onPremisesImmutableId",
        "onPremisesSecurityIdentifier",
        "onPremisesSamAccountName",
        "onPremisesLastSyncDateTime",
        "onPremisesProvisioningErrors",
        "onPremisesDomainName",
        "onPremisesDistinguishedName",
        "assignedLicenses",
        "assignedPlans",
        "department",
    )
)
# Application permissions that grant each read (least privileged first).
GRANTING_PERMISSIONS = {
    "users": {"User.Read.All", "User.ReadWrite.All", "Directory.Read.All", "Directory.ReadWrite.All"},
    "organization": {"Organization.Read.All", "Organization.ReadWrite.All", "Directory.Read.All"},
    "subscribedSkus": {"Organization.Read.All", "Organization.ReadWrite.All", "Directory.Read.All"},
    "subscriptions": {"Organization.Read.All", "Organization.ReadWrite.All", "Directory.Read.All"},
}
GRAPH_PATHS = {
    "/v1.0/users": "users",
    "/v1.0/organization": "organization",
    "/v1.0/subscribedSkus": "subscribedSkus",
    "/v1.0/directory/subscriptions": "subscriptions",
}
_OPENID = re.compile(r"^/([^/]+)/v2\.0/\.well-known/openid-configuration$")
_TOKEN = re.compile(r"^/([^/]+)/oauth2/v2\.0/token$")


@dataclass
class SimApp:
    client_id: str
    secret: str | None = None
    certificate: x509.Certificate | None = None
    permissions: frozenset[str] = frozenset({"User.Read.All", "Organization.Read.All"})


@dataclass
class SimTenant:
    tenant_id: str
    users: list[dict[str, Any]] = field(default_factory=list)
    organization: dict[str, Any] = field(default_factory=dict)
    skus: list[dict[str, Any]] = field(default_factory=list)
    subscriptions: list[dict[str, Any]] = field(default_factory=list)
    apps: dict[str, SimApp] = field(default_factory=dict)


@dataclass
class Fault:
    """Applied to requests number nth .. nth+times-1 (1-based) of an endpoint since the last reset.

    kind: "429", "503", "500", "502", "403", "401" (answered with that status and a Graph error
    body, Retry-After if retry_after is set), "reset" (TCP reset, no answer), "delay" (sleep `delay` seconds, then answer normally),
    "expire_tokens" (every issued token expires, then the request is handled), "garbage" (200
    with a body that is not JSON).
    """

    endpoint: str
    nth: int
    kind: str
    retry_after: float | None = None
    times: int = 1
    delay: float = 0.0


@dataclass
class RequestRecord:
    method: str
    endpoint: str
    path: str
    query: dict[str, str]
    status: int | None  # None: the connection was reset
    token: str | None = None
    form: dict[str, str] = field(default_factory=dict)


@dataclass
class _Token:
    tenant_id: str
    client_id: str
    permissions: frozenset[str]
    expires_at: float


@dataclass
class _Cursor:
    tenant_id: str
    endpoint: str
    offset: int
    top: int
    select: tuple[str, ...] | None


class GraphSimulator:
    def __init__(self, ca: trustme.CA) -> None:
        self._cert = ca.issue_cert("127.0.0.1", "localhost")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.tenants: dict[str, SimTenant] = {}
        self.token_lifetime = 3600
        self.subscriptions_page_size = 100
        # The Graph resource whose "/.default" scope tokens are issued for (default: this server).
        self.resource_url: str | None = None
        self._tokens: dict[str, _Token] = {}
        self._cursors: dict[str, _Cursor] = {}
        self._faults: list[Fault] = []
        self._counts: dict[str, int] = {}
        self.log: list[RequestRecord] = []

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._cert.configure_cert(context)
        self._server = _Server(("127.0.0.1", 0), _Handler, context, self)
        self._thread = threading.Thread(target=self._server.serve_forever, name="graph-sim", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while True:  # ready once a TCP connection is accepted
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ scripting
    def reset(self) -> None:
        with self._lock:
            self.tenants.clear()
            self._tokens.clear()
            self._cursors.clear()
            self._faults.clear()
            self._counts.clear()
            self.log.clear()
            self.token_lifetime = 3600
            self.subscriptions_page_size = 100
            self.resource_url = None

    def add_tenant(self, tenant: SimTenant) -> SimTenant:
        with self._lock:
            self.tenants[tenant.tenant_id] = tenant
        return tenant

    def add_fault(self, endpoint: str, nth: int, kind: str, **options: Any) -> None:
        with self._lock:
            self._faults.append(Fault(endpoint, nth, kind, **options))

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

    # ------------------------------------------------------------------ dispatch
    def handle(self, handler: _Handler, method: str) -> None:
        split = urlsplit(handler.path)
        query = {key: values[-1] for key, values in parse_qs(split.query, keep_blank_values=True).items()}
        endpoint, tenant_in_path = _classify(split.path)
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        form = {k: v[-1] for k, v in parse_qs(body.decode("utf-8", "replace")).items()} if body else {}
        exchange = _Exchange(handler, method, endpoint, split.path, query, form, self)
        with self._lock:
            self._counts[endpoint] = count = self._counts.get(endpoint, 0) + 1
            fault = next(
                (f for f in self._faults if f.endpoint == endpoint and f.nth <= count < f.nth + f.times), None
            )
        if fault is not None and self._apply_fault(exchange, fault):
            return
        if endpoint == "openid" and method == "GET":
            self._openid(exchange, tenant_in_path or "")
        elif endpoint == "token" and method == "POST":
            self._token(exchange, tenant_in_path or "")
        elif endpoint in GRANTING_PERMISSIONS and method == "GET":
            self._graph(exchange, endpoint)
        else:
            exchange.graph_error(404, "Request_ResourceNotFound", f"Resource '{split.path}' does not exist.")

    def _apply_fault(self, exchange: _Exchange, fault: Fault) -> bool:
        """Apply a fault; True when it answered the request (or dropped it)."""
        if fault.kind == "reset":
            exchange.reset()
            return True
        if fault.kind == "delay":
            self._stop.wait(fault.delay)
            return False
        if fault.kind == "expire_tokens":
            self.expire_tokens()
            return False
        if fault.kind == "garbage":
            exchange.send(200, b"<html>this is not JSON", content_type="text/html")
            return True
        status = int(fault.kind)
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

    # ------------------------------------------------------------------ identity platform
    def _openid(self, exchange: _Exchange, tenant_id: str) -> None:
        if tenant_id not in self.tenants:
            exchange.aad_error(400, "invalid_tenant", 90002, f"Tenant '{tenant_id}' not found.")
            return
        base = f"{self.base_url}/{tenant_id}"
        exchange.send_json(
            200,
            {
                "issuer": f"{base}/v2.0",
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "token_endpoint": f"{base}/oauth2/v2.0/token",
                "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt"],
                "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
                "tenant_region_scope": "EU",
            },
        )

    def _token(self, exchange: _Exchange, tenant_id: str) -> None:
        form = exchange.form
        tenant = self.tenants.get(tenant_id)
        if tenant is None:
            exchange.aad_error(400, "invalid_tenant", 90002, f"Tenant '{tenant_id}' not found.")
            return
        if form.get("grant_type") != "client_credentials":
            exchange.aad_error(
                400, "unsupported_grant_type", 70003, "The app requested an unsupported grant type."
            )
            return
        app = tenant.apps.get(form.get("client_id", ""))
        if app is None:
            exchange.aad_error(
                400,
                "unauthorized_client",
                700016,
                f"Application with identifier '{form.get('client_id')}' was not found in the directory.",
            )
            return
        if form.get("scope") != f"{self.resource_url or self.base_url}/.default":
            exchange.aad_error(
                400,
                "invalid_resource",
                500011,
                f"The resource principal named {form.get('scope')} was not found.",
            )
            return
        problem = self._check_credential(app, form, f"{self.base_url}/{tenant_id}/oauth2/v2.0/token")
        if problem is not None:
            exchange.aad_error(401, "invalid_client", *problem)
            return
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[token] = _Token(
                tenant_id, app.client_id, app.permissions, time.time() + self.token_lifetime
            )
        exchange.send_json(
            200,
            {
                "token_type": "Bearer",
                "expires_in": self.token_lifetime,
                "ext_expires_in": self.token_lifetime,
                "access_token": token,
            },
        )

    def _check_credential(self, app: SimApp, form: dict[str, str], audience: str) -> tuple[int, str] | None:
        if "client_secret" in form:
            if app.secret is None or not secrets.compare_digest(form["client_secret"], app.secret):
                return 7000215, f"Invalid client secret provided for app '{app.client_id}'."
            return None
        if "client_assertion" in form:
            if form.get("client_assertion_type") != "urn:ietf:params:oauth:client-assertion-type:jwt-bearer":
                return 7000219, "client_assertion_type is not jwt-bearer."
            problem = _verify_assertion(form["client_assertion"], app, audience)
            return None if problem is None else (700027, f"Client assertion failed validation: {problem}.")
        return 7000218, "The request body must contain 'client_assertion' or 'client_secret'."

    # ------------------------------------------------------------------ Graph
    def _graph(self, exchange: _Exchange, endpoint: str) -> None:
        token = self._authenticate(exchange)
        if token is None:
            return
        if not GRANTING_PERMISSIONS[endpoint] & token.permissions:
            exchange.graph_error(
                403, "Authorization_RequestDenied", "Insufficient privileges to complete the operation."
            )
            return
        tenant = self.tenants[token.tenant_id]
        unknown = [
            key
            for key in exchange.query
            if key.startswith("$") and key not in {"$select", "$top", "$skiptoken"}
        ]
        if unknown:
            exchange.graph_error(400, "Request_UnsupportedQuery", f"Unsupported query option {unknown[0]}.")
            return
        if endpoint == "users":
            self._collection(
                exchange, tenant, "users", tenant.users, USER_PROPERTIES, DEFAULT_USER_PROPERTIES
            )
        elif endpoint == "subscriptions":
            self._collection(exchange, tenant, "subscriptions", tenant.subscriptions, None, None)
        elif endpoint == "subscribedSkus":
            exchange.send_json(
                200,
                {"@odata.context": f"{self.base_url}/v1.0/$metadata#subscribedSkus", "value": tenant.skus},
            )
        else:
            select = _select(exchange.query)
            organization = _project(tenant.organization, select) if select else tenant.organization
            exchange.send_json(
                200,
                {"@odata.context": f"{self.base_url}/v1.0/$metadata#organization", "value": [organization]},
            )

    def _authenticate(self, exchange: _Exchange) -> _Token | None:
        header = exchange.handler.headers.get("Authorization", "")
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

    def _collection(
        self,
        exchange: _Exchange,
        tenant: SimTenant,
        endpoint: str,
        items: list[dict[str, Any]],
        known: frozenset[str] | None,
        defaults: tuple[str, ...] | None,
    ) -> None:
        query = exchange.query
        if "$skiptoken" in query:
            with self._lock:
                cursor = self._cursors.get(query["$skiptoken"])
            if cursor is None or cursor.tenant_id != tenant.tenant_id or cursor.endpoint != endpoint:
                exchange.graph_error(
                    400, "Directory_ExpiredPageToken", "The specified page token value has expired."
                )
                return
        else:
            select = _select(query)
            if select is not None and known is not None:
                bad = [name for name in select if name not in known]
                if bad:
                    exchange.graph_error(
                        400,
                        "Request_BadRequest",
                        f"Could not find a property named '{bad[0]}' on type 'microsoft.graph.user'.",
                    )
                    return
            default_top = 100 if endpoint == "users" else self.subscriptions_page_size
            top_text = query.get("$top", str(default_top))
            if not top_text.isdigit() or not 1 <= int(top_text) <= 999:
                exchange.graph_error(
                    400,
                    "Request_BadRequest",
                    f"Invalid page size specified: '{top_text}'. Must be between 1 and 999 inclusive.",
                )
                return
            cursor = _Cursor(tenant.tenant_id, endpoint, 0, int(top_text), select or defaults)
        page = items[cursor.offset : cursor.offset + cursor.top]
        fields = cursor.select
        body: dict[str, Any] = {
            "@odata.context": f"{self.base_url}/v1.0/$metadata#{endpoint}",
            "value": [_project(item, fields) if fields else item for item in page],
        }
        if cursor.offset + cursor.top < len(items):
            following = _Cursor(
                tenant.tenant_id, endpoint, cursor.offset + cursor.top, cursor.top, cursor.select
            )
            skiptoken = "RFNwdAIAAQAAA" + secrets.token_urlsafe(24)
            with self._lock:
                self._cursors[skiptoken] = following
            params: dict[str, str] = {}
            if cursor.select and cursor.select != defaults:
                params["$select"] = ",".join(cursor.select)
            params["$top"] = str(cursor.top)
            params["$skiptoken"] = skiptoken
            path = "/v1.0/users" if endpoint == "users" else "/v1.0/directory/subscriptions"
            body["@odata.nextLink"] = f"{self.base_url}{path}?{urlencode(params, safe='$,')}"
        exchange.send_json(200, body)

    def record(self, record: RequestRecord) -> None:
        with self._lock:
            self.log.append(record)


class _Exchange:
    """One request and its answer (every answer is logged)."""

    def __init__(
        self,
        handler: _Handler,
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

    def _record(self, status: int | None) -> None:
        safe_form = {k: v for k, v in self.form.items() if k not in {"client_secret", "client_assertion"}}
        self.sim.record(
            RequestRecord(
                self.method, self.endpoint, self.path, dict(self.query), status, self.token, safe_form
            )
        )

    def send(
        self, status: int, body: bytes, *, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        self._record(status)
        handler = self.handler
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(body)

    def send_json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        payload = json.dumps(body).encode("utf-8")
        self.send(status, payload, content_type="application/json; charset=utf-8", headers=headers)

    def graph_error(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        inner = {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "request-id": secrets.token_hex(8)}
        self.send_json(status, {"error": {"code": code, "message": message, "innerError": inner}}, headers)

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
        connection.close()
        self.handler.close_connection = True


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30
    server: _Server

    def do_GET(self) -> None:
        self.server.sim.handle(self, "GET")

    def do_POST(self) -> None:
        self.server.sim.handle(self, "POST")

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], handler: type[_Handler], context: ssl.SSLContext, sim: GraphSimulator
    ) -> None:
        super().__init__(address, handler)
        self.context = context
        self.sim = sim

    def finish_request(self, request: Any, client_address: Any) -> None:
        # TLS is set up here, in the connection's own thread, so a slow handshake blocks no one.
        request.settimeout(10)
        try:
            connection = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return
        try:
            _Handler(connection, client_address, self)
        finally:
            connection.close()

    def handle_error(self, request: Any, client_address: Any) -> None:  # resets and timeouts are expected
        pass


# ---------------------------------------------------------------------------- helpers
def _classify(path: str) -> tuple[str, str | None]:
    if path in GRAPH_PATHS:
        return GRAPH_PATHS[path], None
    match = _OPENID.match(path)
    if match:
        return "openid", match.group(1)
    match = _TOKEN.match(path)
    if match:
        return "token", match.group(1)
    return "unknown", None


def _select(query: dict[str, str]) -> tuple[str, ...] | None:
    if "$select" not in query:
        return None
    return tuple(name.strip() for name in query["$select"].split(",") if name.strip())


def _project(item: dict[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
    return {name: item.get(name) for name in fields}


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _verify_assertion(assertion: str, app: SimApp, audience: str) -> str | None:
    """Why a client assertion is not acceptable for this app, or None if it is."""
    if app.certificate is None:
        return "the app has no certificate"
    try:
        header_part, payload_part, signature_part = assertion.split(".")
        header = json.loads(_b64url_decode(header_part))
        payload = json.loads(_b64url_decode(payload_part))
        signature = _b64url_decode(signature_part)
    except ValueError:
        return "not a JWT"
    certificate = app.certificate
    public_key = certificate.public_key()
    if not isinstance(public_key, rsa.RSAPublicKey):
        return "the app's certificate has no RSA key"
    algorithm = header.get("alg")
    scheme: padding.AsymmetricPadding
    if algorithm == "RS256":
        # msal keeps the base64 padding, other libraries drop it; Entra accepts both.
        if str(header.get("x5t", "")).rstrip("=") != b64url(certificate.fingerprint(hashes.SHA1())):
            return "x5t does not match a certificate of the app"
        scheme = padding.PKCS1v15()
    elif algorithm == "PS256":
        if str(header.get("x5t#S256", "")).rstrip("=") != b64url(certificate.fingerprint(hashes.SHA256())):
            return "x5t#S256 does not match a certificate of the app"
        scheme = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)
    else:
        return f"unsupported alg {algorithm!r}"
    try:
        public_key.verify(signature, f"{header_part}.{payload_part}".encode("ascii"), scheme, hashes.SHA256())
    except InvalidSignature:
        return "the signature does not verify"
    now = time.time()
    if payload.get("aud") != audience:
        return f"aud {payload.get('aud')!r} is not the token endpoint"
    if payload.get("iss") != app.client_id or payload.get("sub") != app.client_id:
        return "iss/sub is not the client id"
    if not isinstance(payload.get("exp"), int | float) or payload["exp"] < now:
        return "the assertion has expired"
    if isinstance(payload.get("nbf"), int | float) and payload["nbf"] > now + 300:
        return "the assertion is not valid yet"
    return None
