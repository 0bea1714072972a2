"""Active Directory source: the user accounts that start the provisioning chain.

Every refresh opens a fresh LDAP connection (LDAPS or StartTLS), binds with the service account,
streams the users under each search base with a paged search and unbinds again. Entries are
turned into :class:`AdUser` records page by page from the raw attribute bytes, so a directory of
any size never sits in memory as ldap3 ``Entry`` objects.

TLS: ldap3's own ``Tls`` switches OpenSSL's hostname check off and re-checks the name after the
handshake with ``ssl.match_hostname`` (deprecated since Python 3.7 and removed in 3.12, where
ldap3 falls back to an old backport that ignores IP address entries). We verify the chain and
the host name inside the handshake with a standard ``SSLContext`` instead: OpenSSL matches the
subjectAltName DNS and IP entries and, for certificates without a DNS name (older DC templates,
Samba's self-signed certificate), the subject CN, the same way on every Python version.
"""

from __future__ import annotations

import ast
import contextlib
import logging
import math
import re
import socket
import ssl
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import ldap3
from ldap3.core import exceptions as ldap_errors
from ldap3.utils.conv import escape_filter_chars

from exporter.config import ActiveDirectoryConfig
from exporter.ids import guid_bytes, sid_from_bytes
from exporter.model import AdTable, AdTableBuilder, AdUser, SourceData, SourceKind
from exporter.sources.base import ConfigurationError, SourceError

log = logging.getLogger(__name__)

CONSISTENCY_GUID = "mS-DS-ConsistencyGuid"
BASE_ATTRIBUTES: tuple[str, ...] = (
    "objectGUID",
    "objectSid",
    "sAMAccountName",
    "userPrincipalName",
    "whenCreated",
)
# LDAP result codes that mean "the server is there but cannot serve us right now".
_UNAVAILABLE_CODES = {51, 52, 80}  # busy, unavailable, other (AD's "server is shutting down")
_TIME_LIMIT_CODES = {3}  # timeLimitExceeded
_REFERRAL = 10
# AD appends "data <hex>" to invalidCredentials; these are the documented sub-codes.
_AD_BIND_SUBCODES = {
    "525": "user not found",
    "52e": "invalid credentials",
    "530": "logon not permitted at this time",
    "531": "logon not permitted from this workstation",
    "532": "password expired",
    "533": "account disabled",
    "701": "account expired",
    "773": "password must be reset",
    "775": "account locked out",
}
_GENERALIZED_TIME = re.compile(
    r"^(?P<date>\d{14})(?:[.,](?P<frac>\d+))?(?P<tz>Z|[+-]\d{4})?$",
)


# ---------------------------------------------------------------------------------- endpoint
@dataclass(frozen=True)
class Endpoint:
    """Where the directory is, parsed from ``url``."""

    scheme: str  # "ldap" | "ldaps"
    host: str  # without brackets for IPv6 literals
    port: int
    start_tls: bool

    @property
    def use_ssl(self) -> bool:
        return self.scheme == "ldaps"

    @property
    def encrypted(self) -> bool:
        return self.use_ssl or self.start_tls

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        suffix = " (StartTLS)" if self.start_tls else ""
        return f"{self.scheme}://{host}:{self.port}{suffix}"


def parse_endpoint(url: str, start_tls: bool) -> Endpoint:
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in ("ldap", "ldaps") or not parts.hostname:
        raise ValueError(f"not an ldap:// or ldaps:// URL: {url!r}")
    try:
        port = parts.port or (636 if scheme == "ldaps" else 389)
    except ValueError:
        raise ValueError(f"not a valid port in {url!r}") from None
    return Endpoint(scheme=scheme, host=parts.hostname, port=port, start_tls=start_tls and scheme == "ldap")


# --------------------------------------------------------------------------------------- TLS
def build_ssl_context(ca_file: str | None, verify: bool) -> ssl.SSLContext:
    """A client context: ``ca_file`` replaces the system trust store when given."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class _HandshakeVerifyingTls(ldap3.Tls):
    """An ldap3 ``Tls`` that wraps sockets with our own context (see the module docstring).

    ldap3 calls ``wrap_socket`` both for ldaps:// and after the StartTLS extended operation.
    """

    def __init__(self, context: ssl.SSLContext, server_hostname: str) -> None:
        super().__init__(validate=context.verify_mode)
        self._context = context
        self._server_hostname = server_hostname

    def wrap_socket(self, connection: Any, do_handshake: bool = False) -> None:
        wrapped = self._context.wrap_socket(
            connection.socket,
            server_side=False,
            do_handshake_on_connect=False,
            server_hostname=self._server_hostname,
        )
        connection.socket = wrapped
        if do_handshake:
            try:
                wrapped.do_handshake()
            except BaseException:
                # ldap3 moves on to the host's next address (or gives up) without closing it.
                wrapped.close()
                raise


# ------------------------------------------------------------------------------ conversions
def generalized_time_seconds(text: str) -> float:
    """POSIX seconds from LDAP GeneralizedTime (``20240131235959.0Z``; AD always sends UTC)."""
    match = _GENERALIZED_TIME.match(text.strip())
    if match is None:
        raise ValueError(f"not a GeneralizedTime value: {text!r}")
    moment = datetime.strptime(match["date"], "%Y%m%d%H%M%S").replace(tzinfo=UTC)
    seconds = moment.timestamp()
    if match["frac"]:
        seconds += float("0." + match["frac"])
    tz = match["tz"]
    if tz and tz != "Z":
        offset = int(tz[1:3]) * 3600 + int(tz[3:5]) * 60
        seconds -= offset if tz[0] == "+" else -offset
    return seconds


def _first(raw: Mapping[str, list[bytes]], name: str) -> bytes | None:
    values = raw.get(name)
    if not values:
        return None
    value = values[0]
    return value if value else None


def _text(raw: Mapping[str, list[bytes]], name: str) -> str | None:
    value = _first(raw, name)
    return None if value is None else value.decode("utf-8")


def user_from_raw(raw: Mapping[str, list[bytes]], dn: str, source_anchor: str) -> AdUser:
    """One AdUser from a search result's ``raw_attributes``; ValueError names what is wrong."""
    guid = guid_bytes(_first(raw, "objectGUID"))
    if guid is None:
        raise ValueError("objectGUID is missing (not readable by the bind account?)")
    sid_raw = _first(raw, "objectSid")
    if sid_raw is None:
        raise ValueError("objectSid is missing (not readable by the bind account?)")
    sam = _text(raw, "sAMAccountName")
    if not sam:
        raise ValueError("sAMAccountName is missing")
    anchor = guid
    if source_anchor == CONSISTENCY_GUID:
        # AAD Connect falls back to objectGUID for users whose consistency GUID is not set yet.
        anchor = _first(raw, CONSISTENCY_GUID) or guid
    created = _text(raw, "whenCreated")
    return AdUser(
        object_guid=guid,
        object_sid=sid_from_bytes(sid_raw),
        sam_account_name=sam,
        user_principal_name=_text(raw, "userPrincipalName"),
        source_anchor=anchor,
        when_created=generalized_time_seconds(created) if created else None,
    )


def user_attributes(source_anchor: str) -> list[str]:
    attributes = list(BASE_ATTRIBUTES)
    if source_anchor == CONSISTENCY_GUID:
        attributes.append(CONSISTENCY_GUID)
    return attributes


# --------------------------------------------------------------------------------- streaming
class _BaseNotFound(Exception):
    def __init__(self, base: str) -> None:
        super().__init__(base)
        self.base = base


class _IncompleteSearch(Exception):
    """The search ended with a result ldap3 does not raise for: a referral (the base belongs to
    another domain or partition), a server time limit (AD's MaxQueryDuration) or size limit. The
    entries read so far are not the whole answer, so the refresh must fail rather than report them."""

    def __init__(self, base: str, result: Mapping[str, Any]) -> None:
        super().__init__(base)
        self.base = base
        self.code = int(result.get("result") or 0)
        self.description = str(result.get("description") or "")
        self.referrals = list(result.get("referrals") or [])


def stream_entries(
    conn: Any, base: str, search_filter: str, attributes: Iterable[str], page_size: int
) -> Iterator[tuple[str, Mapping[str, list[bytes]]]]:
    """(dn, raw_attributes) of every entry under ``base`` matching ``search_filter``, page by page.

    Continuation references (other partitions, other domains) are skipped: the exporter reads one
    domain, from one DC. An incremental read would call this with a ``uSNChanged`` filter.
    """
    try:
        for item in conn.extend.standard.paged_search(
            search_base=base,
            search_filter=search_filter,
            search_scope=ldap3.SUBTREE,
            attributes=list(attributes),
            paged_size=page_size,
            generator=True,
        ):
            if item.get("type") == "searchResEntry":
                yield item["dn"], item["raw_attributes"]
    except ldap_errors.LDAPNoSuchObjectResult:
        raise _BaseNotFound(base) from None
    except ldap_errors.LDAPInvalidDnError:
        raise _BaseNotFound(base) from None
    last = conn.result or {}
    if last.get("result"):
        raise _IncompleteSearch(base, last)


@dataclass
class _SkippedEntries:
    count: int = 0
    example: str = ""


def stream_users(
    conn: Any,
    search_bases: Iterable[str],
    search_filter: str,
    source_anchor: str,
    page_size: int,
    skipped: _SkippedEntries | None = None,
) -> Iterator[AdUser]:
    """Users matching ``search_filter`` under every base, each once even when bases overlap."""
    seen: set[bytes] = set()
    attributes = user_attributes(source_anchor)
    for base in search_bases:
        for dn, raw in stream_entries(conn, base, search_filter, attributes, page_size):
            try:
                user = user_from_raw(raw, dn, source_anchor)
            except ValueError as exc:
                if skipped is not None:
                    skipped.count += 1
                    skipped.example = skipped.example or f"{dn}: {exc}"
                continue
            if user.object_guid in seen:
                continue
            seen.add(user.object_guid)
            yield user


def discover_netbios_domain(conn: Any) -> str:
    """nETBIOSName of the crossRef whose nCName is the domain's defaultNamingContext."""
    conn.search(
        "", "(objectClass=*)", ldap3.BASE, attributes=["defaultNamingContext", "configurationNamingContext"]
    )
    root = conn.response[0]["raw_attributes"] if conn.response else {}
    domain_nc = _text(root, "defaultNamingContext")
    config_nc = _text(root, "configurationNamingContext")
    if not domain_nc or not config_nc:
        raise ValueError("the rootDSE has no defaultNamingContext/configurationNamingContext")
    conn.search(
        f"CN=Partitions,{config_nc}",
        f"(&(objectClass=crossRef)(nCName={escape_filter_chars(domain_nc)})(nETBIOSName=*))",
        ldap3.LEVEL,
        attributes=["nETBIOSName"],
    )
    for item in conn.response or ():
        if item.get("type") == "searchResEntry":
            name = _text(item["raw_attributes"], "nETBIOSName")
            if name:
                return name.upper()
    raise ValueError(f"no crossRef with a nETBIOSName for {domain_nc} under CN=Partitions,{config_nc}")


# ------------------------------------------------------------------------------------ errors
def _causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception, what it wraps, and the per-address failures ldap3 collects when a host
    name resolves to several addresses (``LDAPSocketOpenError('unable to open socket', [...])``)."""
    pending: list[BaseException] = [exc]
    seen: set[int] = set()
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        for arg in current.args:
            if isinstance(arg, list):
                pending.extend(
                    item[0]
                    for item in arg
                    if isinstance(item, tuple) and item and isinstance(item[0], BaseException)
                )
        for linked in (current.__cause__, current.__context__):
            if linked is not None:
                pending.append(linked)


def _unwrap_tuple_reprs(text: str) -> str:
    """ldap3 rebuilds exceptions as ``type(e)(str(e))`` more than once; for OSError subclasses
    that nests the message in tuple reprs (``('("socket ssl wrapping error: ...",)',)``)."""
    for _ in range(8):
        if not (text.startswith("(") and text.endswith(",)")):
            break
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            break
        if not (isinstance(value, tuple) and len(value) == 1 and isinstance(value[0], str)):
            break
        text = value[0]
    return text


def _detail(exc: BaseException) -> str:
    text = _unwrap_tuple_reprs(str(exc).strip())
    # ldap3 prefixes the socket/ssl message with its own words; the rest is the useful part.
    for prefix in (
        "socket ssl wrapping error: ",
        "wrap socket error: ",
        "socket connection error while opening: ",
    ):
        text = text.replace(prefix, "")
    text = re.sub(r"\s*\(_ssl\.c:\d+\)", "", text)  # OpenSSL's source location: noise for operators
    return text or type(exc).__name__


def _bind_failure_detail(exc: BaseException) -> str:
    message = str(getattr(exc, "message", "") or "")
    match = re.search(r"\bdata ([0-9a-f]{3})\b", message, re.IGNORECASE)
    if match and match.group(1).lower() in _AD_BIND_SUBCODES:
        return _AD_BIND_SUBCODES[match.group(1).lower()]
    return str(getattr(exc, "description", "") or "invalid credentials")


def classify(exc: BaseException, endpoint: Endpoint, bind_user: str) -> SourceError:
    """Map an ldap3/socket/ssl failure to a SourceError that names the server (never the secret)."""
    causes = list(_causes(exc))
    for cause in causes:
        if isinstance(cause, ssl.SSLCertVerificationError | ldap_errors.LDAPCertificateError):
            return SourceError(
                "network",
                f"TLS certificate verification failed for {endpoint}: {_detail(cause)} "
                "(check ca_file, and that the URL uses a name in the server certificate)",
            )
    for cause in causes:
        if isinstance(cause, TimeoutError | ldap_errors.LDAPResponseTimeoutError):
            return SourceError("timeout", f"timed out talking to {endpoint}: {_detail(cause)}")
    for cause in causes:
        if isinstance(cause, ssl.SSLError):
            return SourceError("network", f"TLS handshake with {endpoint} failed: {_detail(cause)}")
    for cause in causes:
        if isinstance(cause, ldap_errors.LDAPStartTLSError):
            return SourceError("network", f"StartTLS with {endpoint} failed: {_detail(cause)}")
    if isinstance(exc, ldap_errors.LDAPInvalidCredentialsResult):
        return SourceError("auth", f"bind as {bind_user} to {endpoint} failed: {_bind_failure_detail(exc)}")
    if isinstance(exc, ldap_errors.LDAPStrongerAuthRequiredResult):
        return SourceError(
            "auth",
            f"{endpoint} refused the bind as {bind_user}: the server requires an encrypted or signed "
            "connection (use ldaps:// or start_tls: true)",
        )
    if isinstance(exc, ldap_errors.LDAPInsufficientAccessRightsResult):
        return SourceError("auth", f"{bind_user} may not read from {endpoint}: {exc.description}")
    if isinstance(exc, ldap_errors.LDAPOperationResult):
        if exc.result in _TIME_LIMIT_CODES:
            return SourceError("timeout", f"{endpoint} hit its time limit: {exc.description}")
        if exc.result in _UNAVAILABLE_CODES:
            return SourceError("network", f"{endpoint} is unavailable: {exc.description}")
        diagnostic = f": {exc.message}" if exc.message else ""
        return SourceError("other", f"{endpoint} answered {exc.description} ({exc.result}){diagnostic}")
    for cause in causes:
        if isinstance(cause, socket.gaierror):
            return SourceError("network", f"cannot resolve {endpoint.host}: {_detail(cause)}")
    if isinstance(exc, ldap_errors.LDAPSocketOpenError) and "invalid server address" in str(exc):
        # ldap3 swallows the resolver error and is left without any address to try.
        return SourceError("network", f"cannot resolve {endpoint.host} (no address to connect to {endpoint})")
    if isinstance(exc, ldap_errors.LDAPCommunicationError | OSError):
        return SourceError("network", f"connection to {endpoint} failed: {_connection_detail(causes)}")
    if isinstance(exc, ldap_errors.LDAPSSLConfigurationError):
        return SourceError("other", f"TLS configuration for {endpoint} is not usable: {exc}")
    return SourceError("other", f"LDAP error with {endpoint}: {type(exc).__name__}: {exc}")


def _connection_detail(causes: list[BaseException]) -> str:
    # The innermost per-address errors are the informative ones ("Connection refused").
    for cause in reversed(causes):
        if isinstance(cause, OSError) and str(cause):
            return _detail(cause)
    return _detail(causes[0])


# ------------------------------------------------------------------------------------ source
class ActiveDirectorySource:
    """Reads the users under ``search_bases`` from one domain controller."""

    kind: SourceKind = "ad"

    def __init__(self, config: ActiveDirectoryConfig) -> None:
        self.config = config
        try:
            self.endpoint = parse_endpoint(config.url, config.start_tls)
        except ValueError as exc:
            raise ConfigurationError(f"active_directory.url: {exc}") from None
        self._netbios_domain: str | None = config.netbios_domain
        self._lock = threading.Lock()
        self._active: Any = None  # the connection of a refresh in progress, for close()
        if self.endpoint.encrypted:
            try:
                self._ssl_context()
            except SourceError as exc:
                raise ConfigurationError(exc.message) from None
        elif config.authentication == "simple":
            log.warning(
                "Active Directory %s: simple bind without TLS sends the password in clear text; "
                "use ldaps:// or start_tls: true",
                self.endpoint,
            )

    def describe(self) -> str:
        return str(self.endpoint)

    # -- connection -------------------------------------------------------------------------
    def _ssl_context(self) -> ssl.SSLContext:
        # Loaded for every connection so that a renewed CA file is picked up without a restart.
        cfg = self.config
        try:
            return build_ssl_context(cfg.ca_file, cfg.tls_verify)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            message = f"cannot load ca_file {cfg.ca_file!r} for {self.endpoint}: {exc}"
            raise SourceError("other", message) from None

    def _tls(self) -> ldap3.Tls:
        cfg = self.config
        context = self._ssl_context()
        # The name the certificate must carry. When the URL holds an IP address or an alias the
        # certificate does not list, tls_server_name lets the operator name the DC explicitly
        # instead of turning verification off.
        name = cfg.tls_server_name or self.endpoint.host
        return _HandshakeVerifyingTls(context, name)

    def build_connection(self) -> ldap3.Connection:
        """The (not yet opened) connection, configured from the config; no network I/O."""
        cfg = self.config
        server = ldap3.Server(
            self.endpoint.host,
            port=self.endpoint.port,
            use_ssl=self.endpoint.use_ssl,
            tls=self._tls() if self.endpoint.encrypted else None,
            connect_timeout=cfg.timeout,
            get_info=ldap3.NONE,
        )
        return ldap3.Connection(
            server,
            user=cfg.bind_user,
            password=cfg.bind_password.value,
            authentication=ldap3.NTLM if cfg.authentication == "ntlm" else ldap3.SIMPLE,
            client_strategy=ldap3.SYNC,
            read_only=True,
            raise_exceptions=True,
            # ldap3 packs this into SO_RCVTIMEO as a C long on POSIX: it must be an int.
            receive_timeout=math.ceil(cfg.timeout),
            auto_referrals=False,
        )

    def _open(self) -> ldap3.Connection:
        conn = self.build_connection()
        with self._lock:
            self._active = conn
        conn.open()
        if self.endpoint.start_tls:
            conn.start_tls()
        conn.bind()
        return conn

    # -- refresh ----------------------------------------------------------------------------
    def refresh(self, previous: SourceData | None, deadline: float | None = None) -> AdTable:
        # Always a full read; ``previous`` would be the base of a uSNChanged incremental read.
        cfg = self.config
        skipped = _SkippedEntries()
        try:
            conn = self._open()
            domain = self._netbios(conn)
            builder = AdTableBuilder(domain)
            for user in stream_users(
                conn, cfg.search_bases, cfg.user_filter, cfg.source_anchor, cfg.page_size, skipped
            ):
                builder.add(user)
            users = builder.build()
        except SourceError as exc:
            raise self._scrubbed(exc) from None
        except _BaseNotFound as exc:
            raise self._scrubbed(
                SourceError(
                    "data",
                    f"search base {exc.base!r} does not exist on {self.endpoint} "
                    f"(or {cfg.bind_user} may not see it)",
                )
            ) from None
        except _IncompleteSearch as exc:
            raise self._scrubbed(self._incomplete(exc)) from None
        except (ldap_errors.LDAPException, OSError) as exc:
            raise self._scrubbed(classify(exc, self.endpoint, cfg.bind_user)) from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise self._scrubbed(
                SourceError("data", f"unexpected data from {self.endpoint}: {exc}")
            ) from None
        finally:
            self._release()
        if skipped.count:
            log.warning(
                "Active Directory %s: skipped %d entries without the attributes of a user account, e.g. %s",
                self.endpoint,
                skipped.count,
                skipped.example,
            )
        users.meta["read"] = "full"
        return users.prepare()

    def _netbios(self, conn: ldap3.Connection) -> str:
        if self._netbios_domain:
            return self._netbios_domain
        try:
            name = discover_netbios_domain(conn)
        except ValueError as exc:
            raise SourceError(
                "data",
                f"cannot discover the NetBIOS domain name from {self.endpoint}: {exc}; set netbios_domain",
            ) from None
        self._netbios_domain = name
        return name

    def _incomplete(self, exc: _IncompleteSearch) -> SourceError:
        where = f"search of {exc.base!r} on {self.endpoint}"
        if exc.code in _TIME_LIMIT_CODES:
            return SourceError("timeout", f"{where} hit the server's time limit (MaxQueryDuration)")
        if exc.code == _REFERRAL:
            targets = ", ".join(exc.referrals) or "another server"
            return SourceError(
                "data", f"{where} was referred to {targets}: the base is not in this DC's domain"
            )
        return SourceError("data", f"{where} ended early: {exc.description} ({exc.code})")

    def _scrubbed(self, error: SourceError) -> SourceError:
        """Belt and braces: a server or library message must never carry the bind password."""
        secret = self.config.bind_password.value
        if secret and secret in error.message:
            return SourceError(error.reason, error.message.replace(secret, "<secret>"))
        return error

    def _release(self) -> None:
        with self._lock:
            conn, self._active = self._active, None
        if conn is not None:
            _unbind_quietly(conn)

    def close(self) -> None:
        self._release()


def _unbind_quietly(conn: Any) -> None:
    try:
        conn.unbind()
    except (ldap_errors.LDAPException, OSError) as exc:  # the socket may already be gone
        log.debug("unbind failed: %s", type(exc).__name__)
    # ldap3 leaves the socket of a connection that failed while opening (refused TLS handshake,
    # timeout) unclosed, and unbind() skips connections that never opened.
    sock = getattr(conn, "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.close()


__all__ = [
    "BASE_ATTRIBUTES",
    "ActiveDirectorySource",
    "Endpoint",
    "build_ssl_context",
    "classify",
    "discover_netbios_domain",
    "generalized_time_seconds",
    "parse_endpoint",
    "stream_entries",
    "stream_users",
    "user_attributes",
    "user_from_raw",
]
