"""The Microsoft Graph client shared by the Graph sources of one estate (users, organization, devices).

One :class:`GraphClient` per tenant holds one msal ``ConfidentialClientApplication`` (so the app
token is cached and renewed by msal), the request statistics and the secret mask. Each source opens
a :class:`GraphSession` of its own: its own ``requests.Session`` whose sockets can be cut from
another thread, so that aborting one source (at its refresh deadline) never breaks another source's
request in flight. Token requests go over the session of the refresh that asks for the token.

Resilience is per request, so that a failed page is retried on its own URL and paging never starts
over: 429 (and 503 with Retry-After) wait as told, other 5xx and connection failures back off
exponentially for a few attempts, a 401 renews the token once. Every wait of one refresh is taken
from its :class:`RetryBudget` (``EntraConfig.max_retry_wait``) and must end before the refresh
deadline; when the next wait would not, the refresh fails at once with the error that caused the
retry ("connection refused after 3 attempts"), not with a timeout.

Deadlines: requests' ``timeout`` applies to each socket read, so a server that trickles a byte a
second never times out. Each refresh therefore runs under :meth:`GraphSession.scope`, which cuts
the session's sockets when the deadline passes (and ``abort()`` does the same from the engine's
thread); a blocked read then returns at once, the refresh fails with reason ``timeout`` and the
next refresh opens new connections.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import logging
import math
import re
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import msal
import requests
import requests.adapters
import requests.utils

from exporter.config import EntraConfig
from exporter.model import ErrorReason, HttpStats
from exporter.secrets import SecretMask
from exporter.sources.base import ConfigurationError, SourceError

log = logging.getLogger(__name__)

Endpoint = Literal[
    "users",
    "usersDelta",
    "usersCount",
    "group",
    "managedDevices",
    "organization",
    "subscribedSkus",
    "subscriptions",
    "token",
]

# The least-privileged application permission each read needs; named in 403 messages.
REQUIRED_PERMISSION: dict[Endpoint, str] = {
    "users": "User.Read.All",
    "usersDelta": "User.Read.All",
    "usersCount": "User.Read.All",
    "group": "GroupMember.Read.All",
    "managedDevices": "DeviceManagementManagedDevices.Read.All",
    "organization": "Organization.Read.All",
    "subscribedSkus": "Organization.Read.All",
    "subscriptions": "Organization.Read.All",
    "token": "",
}

# msal validates any other authority host against login.microsoftonline.com ("instance
# discovery"), which fails for private test servers and is pointless for these.
MICROSOFT_AUTHORITY_HOSTS = frozenset(
    {
        "login.microsoftonline.com",
        "login.microsoft.com",
        "login.windows.net",
        "sts.windows.net",
        "login.microsoftonline.us",
        "login-us.microsoftonline.com",
        "login.usgovcloudapi.net",
        "login.chinacloudapi.cn",
        "login.partner.microsoftonline.cn",
        "login.microsoftonline.de",
    }
)

# AADSTS codes worth a plain-language hint (the codes are public; the descriptions never hold
# the secret, but only the code and our hint are shown).
_AADSTS_HINTS = {
    "7000215": "the client secret is wrong (configure the secret's value, not its ID)",
    "7000222": "the client secret has expired",
    "700016": "no application with this client_id exists in the tenant",
    "90002": "the tenant does not exist at this authority",
    "700027": "the certificate is not registered on the app or the assertion is invalid",
    "700024": "the client assertion is not within its valid time range (check the clock)",
    "500011": "Graph is not known to this tenant under the configured graph_url",
    "1002012": "the requested scope is invalid (check graph_url)",
}
_RETRYABLE_TOKEN_ERRORS = {"temporarily_unavailable", "server_error"}
# Never give one request less than this: a socket timeout of 0 would mean "non-blocking".
_MIN_REQUEST_TIMEOUT = 0.05


class GraphError(SourceError):
    """A failed Graph request, with the HTTP status and Graph error code when there was an answer
    (callers fall back on some of them, e.g. an expired delta token or an unsupported filter)."""

    def __init__(
        self, reason: ErrorReason, message: str, *, status: int | None = None, code: str = ""
    ) -> None:
        super().__init__(reason, message)
        self.status = status
        self.code = code


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long transient failures are retried (waits also count against the budget)."""

    attempts: int = 4  # total tries of one request on 5xx / connection errors
    backoff_base: float = 1.0  # first backoff in seconds, doubled on every further try
    backoff_max: float = 30.0
    throttled_answers: int = 50  # give up on a request answered 429 this many times, whatever the budget


class RetryBudget:
    """What one refresh may still spend: retry waiting (max_retry_wait) and time (its deadline).

    Owned by a single refresh (one thread), shared by all of that refresh's requests.
    """

    def __init__(
        self, limit: float, *, deadline: float | None = None, session: GraphSession | None = None
    ) -> None:
        self.limit = limit
        self.spent = 0.0
        self.deadline = deadline
        self.session = session

    def allows(self, delay: float) -> bool:
        """The wait fits into max_retry_wait."""
        return self.spent + delay <= self.limit + 1e-9

    def remaining(self) -> float:
        """Seconds until the refresh deadline (infinite without one)."""
        return math.inf if self.deadline is None else self.deadline - time.monotonic()

    def fits(self, delay: float) -> bool:
        """The wait ends before the refresh deadline (with a moment left for the retry itself)."""
        return delay + _MIN_REQUEST_TIMEOUT < self.remaining()


# ---------------------------------------------------------------------------- sessions
class _CuttableAdapter(requests.adapters.HTTPAdapter):
    """An HTTPAdapter that remembers the connections it opens, so that their sockets can be shut
    down from another thread (which makes a read blocked on them return at once)."""

    def __init__(self) -> None:
        self._connections: weakref.WeakSet[Any] = weakref.WeakSet()
        self._connections_lock = threading.Lock()
        self._pool_classes: dict[type, type] = {}
        super().__init__(pool_maxsize=4, max_retries=0)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self._track(self.poolmanager)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        self._track(manager)
        return manager

    def cut(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            sock = getattr(connection, "sock", None)
            sock = getattr(sock, "socket", sock)  # TLS-in-TLS (HTTPS proxy) wraps the socket
            if isinstance(sock, socket.socket):
                # The plain socket's shutdown: SSLSocket.shutdown would also drop its SSL object
                # under the feet of the thread that is reading from it.
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def _track(self, manager: Any) -> None:
        if getattr(manager, "_cuttable", False):
            return
        manager.pool_classes_by_scheme = {
            scheme: self._tracking_pool(pool_class)
            for scheme, pool_class in manager.pool_classes_by_scheme.items()
        }
        manager._cuttable = True

    def _tracking_pool(self, base: type) -> type:
        if base not in self._pool_classes:
            register = self._register

            def new_conn(pool: Any) -> Any:
                connection = base._new_conn(pool)  # type: ignore[attr-defined]
                register(connection)
                return connection

            self._pool_classes[base] = type(f"Cuttable{base.__name__}", (base,), {"_new_conn": new_conn})
        return self._pool_classes[base]

    def _register(self, connection: Any) -> None:
        with self._connections_lock:
            self._connections.add(connection)


class GraphSession:
    """The HTTP connections of one source, and whether its refresh in progress was cut off.

    ``interrupted`` is None while requests may run, else why they may not: ``"deadline"`` (the
    refresh's deadline passed), ``"aborted"`` (``abort()`` from the engine) or ``"closed"``
    (for good). A new refresh (:meth:`scope`) starts with fresh connections and clears the first two.
    """

    def __init__(self, ca_file: str | None) -> None:
        self._adapter = _CuttableAdapter()
        self.http = requests.Session()
        # Without this, REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE in the environment replace `verify`.
        self.http.trust_env = False
        self.http.verify = ca_file if ca_file else True
        self.http.mount("https://", self._adapter)
        self.http.mount("http://", self._adapter)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._why: str | None = None
        self._timer: threading.Timer | None = None

    @property
    def interrupted(self) -> str | None:
        return self._why

    @contextlib.contextmanager
    def scope(self, deadline: float | None) -> Iterator[None]:
        """One refresh: connections are cut when ``deadline`` (time.monotonic()) passes."""
        with self._lock:
            if self._why != "closed":
                self._why = None
                self._wake.clear()
            if deadline is not None:
                self._timer = threading.Timer(
                    max(0.0, deadline - time.monotonic()), self.interrupt, ("deadline",)
                )
                self._timer.daemon = True
                self._timer.start()
        try:
            yield
        finally:
            with self._lock:
                timer, self._timer = self._timer, None
            if timer is not None:
                timer.cancel()

    def interrupt(self, why: str) -> None:
        """Stop the refresh in progress: wake its waits and shut its sockets down. Thread-safe."""
        with self._lock:
            if self._why is None or why == "closed":
                self._why = why
            self._wake.set()
        self._adapter.cut()
        self.http.close()  # drops the pools: the next request opens a new connection

    def wait(self, seconds: float) -> bool:
        """Sleep; True when interrupted before the time was up."""
        return self._wake.wait(seconds)

    def close(self) -> None:
        self.interrupt("closed")


# ---------------------------------------------------------------------------- the client
class GraphClient:
    """msal authentication plus Graph GETs with retries, for one tenant; safe to share between threads."""

    def __init__(
        self, config: EntraConfig, *, retry: RetryPolicy | None = None, mask: SecretMask | None = None
    ) -> None:
        self._config = config
        self._retry = retry or RetryPolicy()
        self._graph = urlsplit(config.graph_url)
        self._authority_host = urlsplit(config.authority_host).hostname or config.authority_host
        self._mask = mask if mask is not None else SecretMask(config.secrets())
        self._credential = _client_credential(config)
        self._scope = f"{config.graph_url}/.default"
        self._sessions: weakref.WeakSet[GraphSession] = weakref.WeakSet()
        self._closed = False
        self._default_session = self.open_session()
        self._local = threading.local()  # the budget of the refresh asking for a token (msal's HTTP)
        self._token_http = _TokenHttp(self)
        self._app: msal.ConfidentialClientApplication | None = None
        self._token_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._stats = HttpStats()
        self._proxy_cache: dict[tuple[str, str], dict[str, str]] = {}
        self._holders = 0

    # ------------------------------------------------------------------ public interface
    @property
    def config(self) -> EntraConfig:
        return self._config

    @property
    def graph_host(self) -> str:
        return self._graph.netloc

    def describe(self) -> str:
        return f"{self._graph.netloc} tenant {self._config.tenant_id}"

    def open_session(self) -> GraphSession:
        """A session of its own for one source (cut without touching the other sources)."""
        session = GraphSession(self._config.ca_file)
        if self._closed:
            session.close()
        self._sessions.add(session)
        return session

    def new_budget(self, deadline: float | None = None, session: GraphSession | None = None) -> RetryBudget:
        return RetryBudget(self._config.max_retry_wait, deadline=deadline, session=session)

    def url(self, path: str) -> str:
        """An absolute Graph URL for a path such as ``/v1.0/users?$top=999``."""
        return f"{self._config.graph_url}{path}"

    def is_graph_url(self, url: str) -> bool:
        """The URL points at the configured Graph (the bearer token is never sent anywhere else)."""
        parts = urlsplit(url)
        return (parts.scheme.lower(), parts.netloc.lower()) == (
            self._graph.scheme.lower(),
            self._graph.netloc.lower(),
        ) and parts.path.startswith(self._graph.path.rstrip("/") + "/")

    def get_json(
        self, endpoint: Endpoint, url: str, budget: RetryBudget, *, headers: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """GET one Graph URL, retrying transient failures of that same URL; the decoded JSON object."""
        return self._decode(self._fetch(endpoint, url, budget, headers))

    def get_text(
        self, endpoint: Endpoint, url: str, budget: RetryBudget, *, headers: Mapping[str, str] | None = None
    ) -> str:
        """GET one Graph URL answered with text (``/users/$count``)."""
        return self._fetch(endpoint, url, budget, headers).text

    def iter_bodies(
        self, endpoint: Endpoint, url: str, budget: RetryBudget, *, headers: Mapping[str, str] | None = None
    ) -> Iterator[dict[str, Any]]:
        """Each page of a collection (the whole JSON object), following ``@odata.nextLink`` until absent;
        ``value`` is checked to be a list of objects."""
        next_url: str | None = url
        seen: set[str] = set()
        while next_url is not None:
            body = self.get_json(endpoint, next_url, budget, headers=headers)
            page_values(body, self.graph_host, next_url)
            yield body
            next_url = self.next_link(body, "@odata.nextLink", seen)

    def get_pages(
        self, endpoint: Endpoint, url: str, budget: RetryBudget, *, headers: Mapping[str, str] | None = None
    ) -> Iterator[list[dict[str, Any]]]:
        """The ``value`` of each page of a collection, following ``@odata.nextLink`` until absent."""
        for body in self.iter_bodies(endpoint, url, budget, headers=headers):
            yield body["value"]

    def next_link(self, body: Mapping[str, Any], name: str, seen: set[str]) -> str | None:
        """A paging link of a page (None when absent), checked: on the Graph host, not seen before."""
        link = body.get(name)
        if link is None:
            return None
        if not isinstance(link, str) or not self.is_graph_url(link):
            raise GraphError(
                "data", f"Graph ({self.graph_host}) returned a {name} outside {self._config.graph_url}"
            )
        if link in seen:
            raise GraphError("data", f"Graph ({self.graph_host}) returned the same {name} twice")
        seen.add(link)
        return link

    def http_stats(self) -> HttpStats:
        with self._stats_lock:
            return self._stats.copy()

    def retain(self) -> None:
        """A source starts using this client (see release)."""
        with self._stats_lock:
            self._holders += 1

    def release(self) -> None:
        """A source stops using this client; the last one closes it."""
        with self._stats_lock:
            self._holders -= 1
            last = self._holders <= 0
        if last:
            self.close()

    def close(self) -> None:
        """Stop every request and wait in progress and release the connections. Safe to call again."""
        self._closed = True
        for session in list(self._sessions):
            session.close()

    def mask(self, text: str) -> str:
        return self._mask.mask(text)

    # ------------------------------------------------------------------ Graph requests
    def _fetch(
        self, endpoint: Endpoint, url: str, budget: RetryBudget, headers: Mapping[str, str] | None
    ) -> requests.Response:
        """The 200 answer to GET ``url``, after the retries the failures allow."""
        session = budget.session or self._default_session
        token_renewed = False
        failures = 0
        throttled = 0
        while True:
            self._check_interrupted(session, url)
            token = self._access_token(budget)
            response = self._send(endpoint, url, token, budget, headers)
            if isinstance(response, str):  # the connection failed; `response` says how
                self._check_interrupted(session, url)  # a cut connection is the abort, not a fault
                failures += 1
                self._back_off(endpoint, url, failures, budget, f"connection failed: {response}")
                continue
            status = response.status_code
            if status == 200:
                return response
            if status == 401 and not token_renewed:
                # The token may have expired or been revoked before msal's idea of its lifetime
                # ended: msal's cache would hand back the same one, so drop it and ask again once.
                log.info("Graph rejected the access token for %s (HTTP 401); renewing it once", endpoint)
                self._forget_token(token)
                token_renewed = True
                continue
            code, detail = _graph_error(response)
            if status == 401:
                raise self._error(
                    "auth",
                    f"Graph ({self.graph_host}) rejected a freshly issued token for GET {_path(url)}: "
                    + detail,
                    status,
                    code,
                )
            if status == 403:
                raise self._error("auth", self._forbidden_message(endpoint, url, detail), status, code)
            retry_after = _retry_after(response)
            if status == 429 or (status == 503 and retry_after is not None):
                throttled += 1
                self._wait_throttled(endpoint, url, status, retry_after, throttled, budget)
                continue
            if status >= 500:
                failures += 1
                self._back_off(endpoint, url, failures, budget, f"HTTP {status} ({detail})")
                continue
            raise self._error(
                "other",
                f"Graph ({self.graph_host}) answered GET {_path(url)} with HTTP {status}: {detail}",
                status,
                code,
            )

    def _send(
        self,
        endpoint: Endpoint,
        url: str,
        token: str,
        budget: RetryBudget,
        extra_headers: Mapping[str, str] | None,
    ) -> requests.Response | str:
        """The response, or why the connection failed (those are retried by the caller)."""
        session = budget.session or self._default_session
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json", **(extra_headers or {})}
        timeout, bounded = self._request_timeout(url, budget)
        try:
            response = session.http.get(url, headers=headers, timeout=timeout, proxies=self.proxies_for(url))
        except requests.exceptions.SSLError as exc:
            self._count(endpoint, "error")
            self._check_interrupted(session, url)
            raise self._error("network", f"TLS with {self.graph_host} failed: {_reason(exc)}") from None
        except requests.Timeout:
            self._count(endpoint, "timeout")
            self._check_interrupted(session, url)
            within = "before the refresh deadline" if bounded else f"within {self._config.timeout:g}s"
            raise self._error(
                "timeout", f"Graph ({self.graph_host}) did not answer GET {_path(url)} {within}"
            ) from None
        except requests.RequestException as exc:
            self._count(endpoint, "error")
            return _reason(exc)
        self._observe(endpoint, response)
        return response

    def _request_timeout(self, url: str, budget: RetryBudget) -> tuple[float, bool]:
        """The socket timeout of the next request, and whether the refresh deadline set it."""
        remaining = budget.remaining()
        if remaining <= 0:
            raise self._error(
                "timeout", f"Graph ({self.graph_host}): the refresh deadline passed before GET {_path(url)}"
            )
        if remaining < self._config.timeout:
            return max(_MIN_REQUEST_TIMEOUT, remaining), True
        return self._config.timeout, False

    def _check_interrupted(self, session: GraphSession, url: str) -> None:
        why = session.interrupted
        if why is None:
            return
        if why == "closed":
            raise self._error("other", f"the Graph client for {self.describe()} was closed")
        when = "at the refresh deadline" if why == "deadline" else "(aborted at the refresh deadline)"
        raise self._error(
            "timeout",
            f"Graph ({self.graph_host}) GET {_path(url)} was cut off {when}; the connection was closed and "
            "the next refresh opens a new one",
        )

    def _decode(self, response: requests.Response) -> dict[str, Any]:
        url = response.url
        try:
            body = response.json()
        except ValueError:
            raise self._error(
                "data", f"Graph ({self.graph_host}) GET {_path(url)} returned a body that is not JSON"
            ) from None
        if not isinstance(body, dict):
            raise self._error("data", f"Graph ({self.graph_host}) GET {_path(url)} returned no JSON object")
        return body

    def _wait_throttled(
        self,
        endpoint: Endpoint,
        url: str,
        status: int,
        retry_after: float | None,
        answers: int,
        budget: RetryBudget,
    ) -> None:
        with self._stats_lock:
            self._stats.throttled += 1
        delay = retry_after if retry_after is not None else self._backoff_delay(answers)
        asked = (
            f"Graph ({self.graph_host}) throttled GET {_path(url)} (HTTP {status}, asked to wait {delay:g}s)"
        )
        if answers > self._retry.throttled_answers or not budget.allows(delay):
            raise self._error(
                "throttled",
                f"{asked}; {budget.spent:g}s of max_retry_wait {budget.limit:g}s already spent",
                status,
            )
        if not budget.fits(delay):
            raise self._error("throttled", f"{asked}: the wait would pass the refresh deadline", status)
        log.warning("Graph throttled %s (HTTP %s): retrying in %gs", endpoint, status, delay)
        self._sleep(delay, budget, url)

    def _back_off(self, endpoint: Endpoint, url: str, failures: int, budget: RetryBudget, what: str) -> None:
        delay = self._backoff_delay(failures)
        failed = f"Graph ({self.graph_host}) GET {_path(url)}: {what} after {failures} attempt(s)"
        if failures >= self._retry.attempts:
            raise self._error("network", failed)
        if not budget.allows(delay):
            raise self._error("network", f"{failed} (max_retry_wait {budget.limit:g}s spent)")
        if not budget.fits(delay):
            raise self._error(
                "network", f"{failed} (no time for another attempt before the refresh deadline)"
            )
        log.info("Graph %s: %s; retry %d in %gs", endpoint, what, failures, delay)
        self._sleep(delay, budget, url)

    def _backoff_delay(self, attempt: int) -> float:
        return float(min(self._retry.backoff_max, self._retry.backoff_base * 2 ** (attempt - 1)))

    def _sleep(self, delay: float, budget: RetryBudget, url: str) -> None:
        budget.spent += delay
        with self._stats_lock:
            self._stats.retry_wait_seconds += delay
        session = budget.session or self._default_session
        if session.wait(delay):
            self._check_interrupted(session, url)

    def _forbidden_message(self, endpoint: Endpoint, url: str, detail: str) -> str:
        permission = REQUIRED_PERMISSION[endpoint]
        return (
            f"Graph ({self.graph_host}) denied GET {_path(url)} (HTTP 403, {detail}): "
            f"the app registration {self._config.client_id} needs the application permission "
            f"{permission} with admin consent"
        )

    def _error(
        self, reason: ErrorReason, message: str, status: int | None = None, code: str = ""
    ) -> GraphError:
        return GraphError(reason, self._mask.mask(message), status=status, code=code)

    def proxies_for(self, url: str) -> dict[str, str]:
        """Proxies from the environment (HTTPS_PROXY, NO_PROXY) for a URL.

        The session ignores the environment (``trust_env = False``) so that REQUESTS_CA_BUNDLE cannot
        replace the configured ca_file; proxies are the part of the environment worth keeping.
        """
        parts = urlsplit(url)
        key = (parts.scheme, parts.netloc)
        cached = self._proxy_cache.get(key)
        if cached is None:
            cached = requests.utils.get_environ_proxies(url)
            self._proxy_cache[key] = cached
        return cached

    # ------------------------------------------------------------------ statistics
    def _count(self, endpoint: str, code: str) -> None:
        with self._stats_lock:
            key = (endpoint, code)
            self._stats.requests[key] = self._stats.requests.get(key, 0) + 1

    def _observe(self, endpoint: Endpoint, response: requests.Response) -> None:
        """Count the answer and record Graph's throttling headers for this endpoint."""
        units = _header_number(response, "x-ms-resource-unit")
        ratio = _header_number(response, "x-ms-throttle-limit-percentage")
        with self._stats_lock:
            key = (endpoint, str(response.status_code))
            self._stats.requests[key] = self._stats.requests.get(key, 0) + 1
            if units is not None:
                self._stats.resource_units[endpoint] = self._stats.resource_units.get(endpoint, 0.0) + units
            # Graph sends the header (a ratio of the limit, 0.8 to 1.8) only while the app uses more
            # than 80% of its budget; stored as percent. A successful answer without it means the
            # usage fell below 80%: the endpoint's value is dropped rather than left stale.
            if ratio is not None:
                self._stats.throttle_limit_percentage[endpoint] = ratio * 100.0
            elif response.status_code < 300:
                self._stats.throttle_limit_percentage.pop(endpoint, None)

    def absorb(self, other: HttpStats) -> None:
        """Add what a refresh run in a child process counted (exporter.sources.isolated): counts add
        up; an endpoint's throttle percentage is the child's latest (dropped when the child got a
        successful answer without one, as :meth:`_observe` does)."""
        with self._stats_lock:
            stats = self._stats
            for key, count in other.requests.items():
                stats.requests[key] = stats.requests.get(key, 0) + count
            stats.throttled += other.throttled
            stats.retry_wait_seconds += other.retry_wait_seconds
            stats.token_requests += other.token_requests
            for endpoint, units in other.resource_units.items():
                stats.resource_units[endpoint] = stats.resource_units.get(endpoint, 0.0) + units
            answered = {endpoint for endpoint, code in other.requests if code.startswith("2")}
            for endpoint in answered - set(other.throttle_limit_percentage):
                stats.throttle_limit_percentage.pop(endpoint, None)
            stats.throttle_limit_percentage.update(other.throttle_limit_percentage)

    def _count_token_http(self, code: str, token_request: bool) -> None:
        with self._stats_lock:
            key: tuple[str, str] = ("token", code)
            self._stats.requests[key] = self._stats.requests.get(key, 0) + 1
            if token_request:
                self._stats.token_requests += 1

    # ------------------------------------------------------------------ tokens (msal)
    def _access_token(self, budget: RetryBudget) -> str:
        remaining = budget.remaining()
        if not self._token_lock.acquire(timeout=-1 if math.isinf(remaining) else max(0.0, remaining)):
            raise self._error(
                "timeout",
                f"waited for another refresh's token request at {self._authority_host} until the "
                "refresh deadline",
            )
        try:
            self._local.budget = budget
            app = self._application()
            result = self._msal_call(lambda: app.acquire_token_for_client(scopes=[self._scope]))
        finally:
            self._local.budget = None
            self._token_lock.release()
        token = result.get("access_token") if isinstance(result, dict) else None
        if isinstance(token, str) and token:
            return token
        raise self._token_error(result if isinstance(result, dict) else {})

    def token_request_context(self) -> tuple[GraphSession, float]:
        """The session and socket timeout for msal's HTTP request in this thread."""
        budget: RetryBudget | None = getattr(self._local, "budget", None)
        if budget is None:
            return self._default_session, self._config.timeout
        session = budget.session or self._default_session
        remaining = budget.remaining()
        return session, max(_MIN_REQUEST_TIMEOUT, min(self._config.timeout, remaining))

    def _forget_token(self, token: str) -> None:
        with self._token_lock:
            if self._app is None:
                return
            cache = self._app.token_cache
            stale = [
                entry
                for entry in cache.search(msal.TokenCache.CredentialType.ACCESS_TOKEN)
                if entry.get("secret") == token
            ]
            for entry in stale:
                cache.remove_at(entry)

    def _application(self) -> msal.ConfidentialClientApplication:
        # Built lazily (the caller holds _token_lock): msal fetches the tenant's OpenID
        # configuration in the constructor, which must not happen at start-up.
        if self._app is None:
            known = self._authority_host.lower() in MICROSOFT_AUTHORITY_HOSTS
            authority = f"{self._config.authority_host}/{self._config.tenant_id}"
            self._app = self._msal_call(
                lambda: msal.ConfidentialClientApplication(
                    self._config.client_id,
                    client_credential=self._credential,
                    authority=authority,
                    http_client=self._token_http,
                    instance_discovery=None if known else False,
                    token_cache=msal.TokenCache(),
                ),
                discovery=True,
            )
        return self._app

    def _msal_call(self, call: Callable[[], Any], *, discovery: bool = False) -> Any:
        host = self._authority_host
        try:
            return call()
        except requests.RequestException as exc:
            session, _ = self.token_request_context()
            self._check_interrupted(session, f"{self._config.authority_host}/")
            if isinstance(exc, requests.exceptions.SSLError):
                raise self._error("network", f"TLS with {host} failed: {_reason(exc)}") from None
            if isinstance(exc, requests.Timeout):
                raise self._error(
                    "timeout", f"{host} did not answer a token request within {self._config.timeout:g}s"
                ) from None
            raise self._error("network", f"cannot get a token from {host}: {_reason(exc)}") from None
        except msal.exceptions.MsalServiceError as exc:  # the token endpoint answered 5xx
            raise self._error("network", f"{host} failed the token request: {exc}") from None
        except ValueError as exc:
            if discovery:
                # msal raises ValueError when the tenant's OpenID configuration is refused (4xx).
                log.debug("msal authority discovery failed: %s", self._mask.mask(str(exc)))
                raise self._error(
                    "auth",
                    f"{host} does not know tenant {self._config.tenant_id} (OpenID discovery failed); "
                    "check tenant_id and authority_host",
                ) from None
            raise self._error(
                "data", f"{host} answered the token request with something that is not JSON"
            ) from None

    def _token_error(self, result: dict[str, Any]) -> GraphError:
        error = str(result.get("error") or "no access token in the answer")
        codes = result.get("error_codes") or []
        code = str(codes[0]) if codes else _aadsts_code(str(result.get("error_description") or ""))
        hint = _AADSTS_HINTS.get(code or "", "")
        if not hint and error == "invalid_tenant":
            hint = _AADSTS_HINTS["90002"]
        parts = [f"token request for client_id {self._config.client_id} in tenant {self._config.tenant_id}"]
        parts.append(f" at {self._authority_host} failed: {error}")
        if code:
            parts.append(f" (AADSTS{code})")
        if hint:
            parts.append(f": {hint}")
        reason: ErrorReason = "network" if error in _RETRYABLE_TOKEN_ERRORS else "auth"
        return self._error(reason, "".join(parts))


class GraphSource:
    """What every Graph source shares: the tenant's client (closed by its last source) and a session
    of its own, which ``abort()`` cuts without touching the other sources' requests."""

    def __init__(self, config: EntraConfig, client: GraphClient) -> None:
        self.config = config
        self.client = client
        self.session = client.open_session()
        self._closed = False
        client.retain()

    def describe(self) -> str:
        return self.client.describe()

    def http_stats(self) -> HttpStats:
        """Cumulative statistics of the Graph client, shared by the sources of the tenant."""
        return self.client.http_stats()

    def abort(self) -> None:
        """Cut the refresh in progress (called from the engine's thread at the deadline)."""
        self.session.interrupt("aborted")

    def close(self) -> None:
        if not self._closed:  # the client is shared: it closes when its last source does
            self._closed = True
            self.session.close()
            self.client.release()

    @contextlib.contextmanager
    def refreshing(self, deadline: float | None) -> Iterator[RetryBudget]:
        """The budget of one refresh (or look-up), whose connections are cut at ``deadline``."""
        with self.session.scope(deadline):
            yield self.client.new_budget(deadline, self.session)


class _TokenHttp:
    """The HTTP client given to msal: the asking refresh's session, timeout, proxies and counters."""

    def __init__(self, client: GraphClient) -> None:
        self._client = client

    def get(self, url: str, **kwargs: Any) -> requests.Response:
        return self._request("GET", url, kwargs)

    def post(self, url: str, **kwargs: Any) -> requests.Response:
        return self._request("POST", url, kwargs)

    def close(self) -> None:  # msal may call it; the sessions belong to the sources
        pass

    def _request(self, method: str, url: str, kwargs: dict[str, Any]) -> requests.Response:
        session, timeout = self._client.token_request_context()
        kwargs["timeout"] = min(float(kwargs.get("timeout") or timeout), timeout)
        kwargs.setdefault("proxies", self._client.proxies_for(url))
        is_token_request = method == "POST"  # the rest is OpenID discovery
        try:
            response = session.http.request(method, url, **kwargs)
        except requests.Timeout:
            self._client._count_token_http("timeout", is_token_request)
            raise
        except requests.RequestException:
            self._client._count_token_http("error", is_token_request)
            raise
        self._client._count_token_http(str(response.status_code), is_token_request)
        return response


# ---------------------------------------------------------------------------- credentials
_PEM_KEY = re.compile(rb"-----BEGIN ((?:RSA |EC |ENCRYPTED )?PRIVATE KEY)-----.+?-----END \1-----", re.DOTALL)
_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


def _client_credential(config: EntraConfig) -> str | dict[str, str]:
    if config.certificate_file:
        return certificate_credential(config.certificate_file, config.certificate_thumbprint)
    if config.client_secret is None or not config.client_secret.value:
        raise ConfigurationError(f"entra tenant {config.tenant_id}: set client_secret or certificate_file")
    return config.client_secret.value


def certificate_credential(path: str, thumbprint: str | None) -> dict[str, str]:
    """msal's credential for a PEM file holding the private key and its certificate.

    Checks that the key is an unencrypted RSA key, that a certificate in the file belongs to it and
    that the configured SHA-1 thumbprint is that certificate's; Entra would otherwise only say
    "invalid client" at the first token request.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"certificate_file {path}: cannot read it ({exc.strerror})") from None
    key_match = _PEM_KEY.search(data)
    if key_match is None:
        raise ConfigurationError(f"certificate_file {path}: no PEM private key in the file")
    if key_match.group(1).startswith(b"ENCRYPTED"):
        raise ConfigurationError(
            f"certificate_file {path}: the private key is encrypted; store it unencrypted"
        )
    try:
        key = serialization.load_pem_private_key(key_match.group(0), password=None)
    except (ValueError, TypeError):
        raise ConfigurationError(f"certificate_file {path}: the private key cannot be read") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ConfigurationError(f"certificate_file {path}: Entra ID needs an RSA key")
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    certificate = None
    for block in _PEM_CERT.findall(data):
        try:
            candidate = x509.load_pem_x509_certificate(block)
        except ValueError:
            continue
        candidate_spki = candidate.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if candidate_spki == spki:
            certificate = candidate
            break
    if certificate is None:
        raise ConfigurationError(
            f"certificate_file {path}: no certificate in the file matches the private key"
        )
    actual = certificate.fingerprint(hashes.SHA1()).hex()
    if thumbprint and thumbprint.replace(":", "").lower() != actual:
        raise ConfigurationError(
            f"certificate_file {path}: certificate_thumbprint {thumbprint} is not the certificate's "
            f"SHA-1 thumbprint {actual.upper()}"
        )
    return {"private_key": key_match.group(0).decode("ascii"), "thumbprint": actual}


# ---------------------------------------------------------------------------- helpers
def page_values(body: Mapping[str, Any], host: str, url: str) -> list[dict[str, Any]]:
    """The ``value`` of a collection page, which must be a list of objects."""
    value = body.get("value")
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise GraphError("data", f"Graph ({host}) GET {_path(url)}: 'value' is not a list of objects")
    return value


def _retry_after(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _header_number(response: requests.Response, name: str) -> float | None:
    value = response.headers.get(name)
    if value is None:
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


def _graph_error(response: requests.Response) -> tuple[str, str]:
    """(Graph error code, ``code: message`` for messages) from an error answer."""
    try:
        body = response.json()
    except ValueError:
        return "", response.reason or "no details"
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        code = str(error.get("code") or "error")
        message = _intune_message(str(error.get("message") or "").strip())
        return code, f"{code}: {message}" if message else code
    return "", response.reason or "no details"


def _intune_message(message: str) -> str:
    """Intune puts its own JSON error document, as text, into the Graph error message: its
    ``Message`` without the operation and activity ids that follow, or the message as it is."""
    if not message.startswith("{"):
        return message
    try:
        document = json.loads(message)
    except ValueError:
        return message
    inner = document.get("Message") if isinstance(document, dict) else None
    if not isinstance(inner, str):
        return message
    return inner.split(" - Operation ID", 1)[0].strip()


def _aadsts_code(description: str) -> str | None:
    match = re.search(r"AADSTS(\d+)", description)
    return match.group(1) if match else None


def _path(url: str) -> str:
    """The path of a Graph URL without its query (skip tokens are long and say nothing)."""
    return urlsplit(url).path or "/"


def _reason(exc: BaseException) -> str:
    """The innermost cause of a requests exception, short enough for a log line."""
    inner: BaseException = exc
    for _ in range(10):
        nested = inner.args[0] if inner.args and isinstance(inner.args[0], BaseException) else None
        nested = nested or getattr(inner, "reason", None) or inner.__cause__ or inner.__context__
        if not isinstance(nested, BaseException) or nested is inner:
            break
        inner = nested
    text = str(inner) or type(inner).__name__
    return text if len(text) <= 200 else text[:197] + "..."
