"""The Microsoft Graph client shared by the Entra sources of one estate.

One :class:`GraphClient` per tenant holds one msal ``ConfidentialClientApplication`` (so the app
token is cached and renewed by msal) and one ``requests.Session`` used both by msal and for the
Graph calls. The two Entra sources (users, organization) may refresh at the same time from
different threads: token acquisition is serialised with a lock, statistics with another, and
everything a refresh needs to remember (its retry budget) lives in a :class:`RetryBudget` owned by
that refresh.

Resilience is per request, so that a failed page is retried on its own URL and paging never starts
over: 429 (and 503 with Retry-After) wait as told, other 5xx and connection failures back off
exponentially for a few attempts, a 401 renews the token once. Every wait of one refresh is taken
from its budget (``EntraConfig.max_retry_wait``); when the next wait would exceed it the refresh
fails instead of sleeping.
"""

from __future__ import annotations

import email.utils
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import msal
import requests
import requests.utils

from exporter.config import EntraConfig
from exporter.model import HttpStats
from exporter.sources.base import ConfigurationError, SourceError

log = logging.getLogger(__name__)

Endpoint = Literal["users", "organization", "subscribedSkus", "subscriptions", "token"]

# The least-privileged application permission each read needs; named in 403 messages.
REQUIRED_PERMISSION: dict[Endpoint, str] = {
    "users": "User.Read.All",
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


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long transient failures are retried (waits also count against the budget)."""

    attempts: int = 4  # total tries of one request on 5xx / connection errors
    backoff_base: float = 1.0  # first backoff in seconds, doubled on every further try
    backoff_max: float = 30.0
    throttled_answers: int = 50  # give up on a request answered 429 this many times, whatever the budget


class RetryBudget:
    """The waiting one refresh may still do before it gives up (EntraConfig.max_retry_wait).

    Owned by a single refresh (one thread), shared by all of that refresh's requests.
    """

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.spent = 0.0

    def allows(self, delay: float) -> bool:
        return self.spent + delay <= self.limit + 1e-9


class GraphClient:
    """msal authentication plus Graph GETs with retries, for one tenant; safe to share between threads."""

    def __init__(self, config: EntraConfig, *, retry: RetryPolicy | None = None) -> None:
        self._config = config
        self._retry = retry or RetryPolicy()
        self._graph = urlsplit(config.graph_url)
        self._authority_host = urlsplit(config.authority_host).hostname or config.authority_host
        self._credential = _client_credential(config)
        self._scope = f"{config.graph_url}/.default"
        self._session = _session(config.ca_file)
        self._token_http = _TokenHttp(self._session, config.timeout, self.proxies_for, self._count_token_http)
        self._app: msal.ConfidentialClientApplication | None = None
        self._token_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._stats = HttpStats()
        self._proxy_cache: dict[tuple[str, str], dict[str, str]] = {}
        self._closed = threading.Event()
        self._holders = 0

    # ------------------------------------------------------------------ public interface
    @property
    def graph_host(self) -> str:
        return self._graph.netloc

    def describe(self) -> str:
        return f"{self._graph.netloc} tenant {self._config.tenant_id}"

    def new_budget(self) -> RetryBudget:
        return RetryBudget(self._config.max_retry_wait)

    def url(self, path: str) -> str:
        """An absolute Graph URL for a path such as ``/v1.0/users?$top=999``."""
        return f"{self._config.graph_url}{path}"

    def get_json(self, endpoint: Endpoint, url: str, budget: RetryBudget) -> dict[str, Any]:
        """GET one Graph URL, retrying transient failures of that same URL; the decoded JSON object."""
        token_renewed = False
        failures = 0
        throttled = 0
        while True:
            token = self._access_token()
            response = self._send(endpoint, url, token)
            if isinstance(response, str):  # the connection failed; `response` says how
                failures += 1
                self._back_off(endpoint, url, failures, budget, f"connection failed: {response}")
                continue
            status = response.status_code
            if status == 200:
                return self._decode(endpoint, url, response)
            if status == 401 and not token_renewed:
                # The token may have expired or been revoked before msal's idea of its lifetime
                # ended: msal's cache would hand back the same one, so drop it and ask again once.
                log.info("Graph rejected the access token for %s (HTTP 401); renewing it once", endpoint)
                self._forget_token(token)
                token_renewed = True
                continue
            if status == 401:
                raise SourceError(
                    "auth",
                    f"Graph ({self.graph_host}) rejected a freshly issued token for GET {_path(url)}: "
                    f"{_graph_error(response)}",
                )
            if status == 403:
                raise SourceError("auth", self._forbidden_message(endpoint, url, response))
            retry_after = _retry_after(response)
            if status == 429 or (status == 503 and retry_after is not None):
                throttled += 1
                self._wait_throttled(endpoint, url, status, retry_after, throttled, budget)
                continue
            if status >= 500:
                failures += 1
                self._back_off(endpoint, url, failures, budget, f"HTTP {status}")
                continue
            raise SourceError(
                "other",
                f"Graph ({self.graph_host}) answered GET {_path(url)} with HTTP {status}: "
                f"{_graph_error(response)}",
            )

    def get_pages(self, endpoint: Endpoint, url: str, budget: RetryBudget) -> Iterator[list[dict[str, Any]]]:
        """The ``value`` of each page of a collection, following ``@odata.nextLink`` until absent."""
        next_url: str | None = url
        seen: set[str] = set()
        while next_url is not None:
            body = self.get_json(endpoint, next_url, budget)
            value = body.get("value")
            if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
                raise SourceError(
                    "data",
                    f"Graph ({self.graph_host}) GET {_path(next_url)}: 'value' is not a list of objects",
                )
            yield value
            link = body.get("@odata.nextLink")
            if link is None:
                return
            if not isinstance(link, str) or not self._is_graph_url(link):
                # Never send the bearer token anywhere but the configured Graph host.
                raise SourceError(
                    "data", f"Graph ({self.graph_host}) returned a nextLink outside {self._config.graph_url}"
                )
            if link in seen:
                raise SourceError("data", f"Graph ({self.graph_host}) returned the same nextLink twice")
            seen.add(link)
            next_url = link

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
        """Stop waits in progress and release the connections. Safe to call more than once."""
        self._closed.set()
        self._session.close()

    # ------------------------------------------------------------------ Graph requests
    def _send(self, endpoint: Endpoint, url: str, token: str) -> requests.Response | str:
        """The response, or why the connection failed (those are retried by the caller)."""
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        try:
            response = self._session.get(
                url, headers=headers, timeout=self._config.timeout, proxies=self.proxies_for(url)
            )
        except requests.exceptions.SSLError as exc:
            self._count(endpoint, "error")
            raise SourceError("network", f"TLS with {self.graph_host} failed: {_reason(exc)}") from None
        except requests.Timeout:
            self._count(endpoint, "timeout")
            raise SourceError(
                "timeout",
                f"Graph ({self.graph_host}) did not answer GET {_path(url)} within {self._config.timeout:g}s",
            ) from None
        except requests.RequestException as exc:
            self._count(endpoint, "error")
            return _reason(exc)
        self._count(endpoint, str(response.status_code))
        return response

    def _decode(self, endpoint: Endpoint, url: str, response: requests.Response) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            raise SourceError(
                "data", f"Graph ({self.graph_host}) GET {_path(url)} returned a body that is not JSON"
            ) from None
        if not isinstance(body, dict):
            raise SourceError("data", f"Graph ({self.graph_host}) GET {_path(url)} returned no JSON object")
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
        if answers > self._retry.throttled_answers or not budget.allows(delay):
            raise SourceError(
                "throttled",
                f"Graph ({self.graph_host}) throttled GET {_path(url)} (HTTP {status}, asked to wait "
                f"{delay:g}s); {budget.spent:g}s of max_retry_wait {budget.limit:g}s already spent",
            )
        log.warning("Graph throttled %s (HTTP %s): retrying in %gs", endpoint, status, delay)
        self._sleep(delay, budget)

    def _back_off(self, endpoint: Endpoint, url: str, failures: int, budget: RetryBudget, what: str) -> None:
        delay = self._backoff_delay(failures)
        if failures >= self._retry.attempts or not budget.allows(delay):
            raise SourceError(
                "network",
                f"Graph ({self.graph_host}) GET {_path(url)} failed {failures} time(s), last: {what}",
            )
        log.info("Graph %s: %s; retry %d in %gs", endpoint, what, failures, delay)
        self._sleep(delay, budget)

    def _backoff_delay(self, attempt: int) -> float:
        return float(min(self._retry.backoff_max, self._retry.backoff_base * 2 ** (attempt - 1)))

    def _sleep(self, delay: float, budget: RetryBudget) -> None:
        budget.spent += delay
        with self._stats_lock:
            self._stats.retry_wait_seconds += delay
        if self._closed.wait(delay):
            raise SourceError("other", f"the Graph client for {self.describe()} was closed")

    def _forbidden_message(self, endpoint: Endpoint, url: str, response: requests.Response) -> str:
        permission = REQUIRED_PERMISSION[endpoint]
        return (
            f"Graph ({self.graph_host}) denied GET {_path(url)} (HTTP 403, {_graph_error(response)}): "
            f"the app registration {self._config.client_id} needs the application permission "
            f"{permission} with admin consent"
        )

    def _is_graph_url(self, url: str) -> bool:
        parts = urlsplit(url)
        return (parts.scheme.lower(), parts.netloc.lower()) == (
            self._graph.scheme.lower(),
            self._graph.netloc.lower(),
        ) and parts.path.startswith(self._graph.path.rstrip("/") + "/")

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

    def _count(self, endpoint: Endpoint, code: str) -> None:
        with self._stats_lock:
            key = (endpoint, code)
            self._stats.requests[key] = self._stats.requests.get(key, 0) + 1

    def _count_token_http(self, code: str, token_request: bool) -> None:
        with self._stats_lock:
            key: tuple[str, str] = ("token", code)
            self._stats.requests[key] = self._stats.requests.get(key, 0) + 1
            if token_request:
                self._stats.token_requests += 1

    # ------------------------------------------------------------------ tokens (msal)
    def _access_token(self) -> str:
        with self._token_lock:
            app = self._application()
            result = self._msal_call(lambda: app.acquire_token_for_client(scopes=[self._scope]))
        token = result.get("access_token") if isinstance(result, dict) else None
        if isinstance(token, str) and token:
            return token
        raise self._token_error(result if isinstance(result, dict) else {})

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

    def _msal_call(self, call: Any, *, discovery: bool = False) -> Any:
        host = self._authority_host
        try:
            return call()
        except requests.exceptions.SSLError as exc:
            raise SourceError("network", f"TLS with {host} failed: {_reason(exc)}") from None
        except requests.Timeout:
            raise SourceError(
                "timeout", f"{host} did not answer a token request within {self._config.timeout:g}s"
            ) from None
        except requests.RequestException as exc:
            raise SourceError("network", f"cannot get a token from {host}: {_reason(exc)}") from None
        except msal.exceptions.MsalServiceError as exc:  # the token endpoint answered 5xx
            raise SourceError("network", f"{host} failed the token request: {exc}") from None
        except ValueError as exc:
            if discovery:
                # msal raises ValueError when the tenant's OpenID configuration is refused (4xx).
                log.debug("msal authority discovery failed: %s", exc)
                raise SourceError(
                    "auth",
                    f"{host} does not know tenant {self._config.tenant_id} (OpenID discovery failed); "
                    "check tenant_id and authority_host",
                ) from None
            raise SourceError(
                "data", f"{host} answered the token request with something that is not JSON"
            ) from None

    def _token_error(self, result: dict[str, Any]) -> SourceError:
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
        message = self._scrub("".join(parts))
        reason: Literal["auth", "network"] = "network" if error in _RETRYABLE_TOKEN_ERRORS else "auth"
        return SourceError(reason, message)

    def _scrub(self, text: str) -> str:
        secret = self._config.client_secret.value if self._config.client_secret else ""
        return text.replace(secret, "<secret>") if secret else text


class _TokenHttp:
    """The HTTP client given to msal: the shared session with our timeout, proxies and counters."""

    def __init__(
        self,
        session: requests.Session,
        timeout: float,
        proxies_for: Callable[[str], dict[str, str]],
        count: Callable[[str, bool], None],
    ) -> None:
        self._session = session
        self._timeout = timeout
        self._proxies_for = proxies_for
        self._count = count

    def get(self, url: str, **kwargs: Any) -> requests.Response:
        return self._request("GET", url, kwargs)

    def post(self, url: str, **kwargs: Any) -> requests.Response:
        return self._request("POST", url, kwargs)

    def close(self) -> None:  # msal may call it; the session belongs to GraphClient
        pass

    def _request(self, method: str, url: str, kwargs: dict[str, Any]) -> requests.Response:
        kwargs.setdefault("timeout", self._timeout)
        kwargs.setdefault("proxies", self._proxies_for(url))
        is_token_request = method == "POST"  # the rest is OpenID discovery
        try:
            response = self._session.request(method, url, **kwargs)
        except requests.Timeout:
            self._count("timeout", is_token_request)
            raise
        except requests.RequestException:
            self._count("error", is_token_request)
            raise
        self._count(str(response.status_code), is_token_request)
        return response


def _session(ca_file: str | None) -> requests.Session:
    session = requests.Session()
    # Without this, REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE in the environment replace `verify`.
    session.trust_env = False
    session.verify = ca_file if ca_file else True
    adapter = requests.adapters.HTTPAdapter(pool_maxsize=4, max_retries=0)
    session.mount("https://", adapter)
    return session


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


def _graph_error(response: requests.Response) -> str:
    """``code: message`` from a Graph error body, or the status text."""
    try:
        body = response.json()
    except ValueError:
        return response.reason or "no details"
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        code = error.get("code") or "error"
        message = str(error.get("message") or "").strip()
        return f"{code}: {message}" if message else str(code)
    return response.reason or "no details"


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
