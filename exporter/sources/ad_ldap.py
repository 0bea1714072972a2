"""LDAP transport of the Active Directory source: where the DC is, TLS, and one bounded session.

TLS: ldap3's own ``Tls`` switches OpenSSL's hostname check off and re-checks the name after the
handshake with ``ssl.match_hostname`` (deprecated since Python 3.7 and removed in 3.12, where
ldap3 falls back to an old backport that ignores IP address entries). We verify the chain and
the host name inside the handshake with a standard ``SSLContext`` instead: OpenSSL matches the
subjectAltName DNS and IP entries and, for certificates without a DNS name (older DC templates,
Samba's self-signed certificate), the subject CN, the same way on every Python version.

Deadlines: ldap3's timeouts apply to each socket read, so a DC that trickles one byte a second
never times out. :class:`LdapSession` therefore bounds every call by the time left until the
refresh deadline (socket timeouts derived from it, checked before every request and page) and
:meth:`LdapSession.abort` shuts the socket down from another thread, which makes a read that is
blocked right now return at once.
"""

from __future__ import annotations

import contextlib
import math
import socket
import ssl
import threading
import time
import traceback
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import ldap3
from ldap3.core import exceptions as ldap_errors
from ldap3.utils.conv import escape_filter_chars

from exporter.sources.ad_entries import EntryDiverter

RawAttributes = Mapping[str, list[bytes]]
Control = tuple[str, bool, bytes | None]

SHOW_DELETED = "1.2.840.113556.1.4.417"  # LDAP_SERVER_SHOW_DELETED_OID: also return tombstones
PAGED_RESULTS = "1.2.840.113556.1.4.319"
SHOW_DELETED_CONTROL: Control = (SHOW_DELETED, True, None)
# Never wait less than this for one call: a socket timeout of 0 would mean "non-blocking".
_MIN_CALL_TIMEOUT = 0.05


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


class HandshakeVerifyingTls(ldap3.Tls):
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


# ------------------------------------------------------------------------------------ filters
def escape_text(value: str) -> str:
    """A string as an LDAP filter assertion value (``*``, ``(``, ``)``, ``\\`` and NUL escaped)."""
    return str(escape_filter_chars(value))


def escape_binary(raw: bytes) -> str:
    """Binary values (objectGUID, objectSid) in a filter: every byte as ``\\xx``."""
    return "".join(f"\\{byte:02x}" for byte in raw)


def any_of(terms: Sequence[str]) -> str:
    """``(|t1 t2 ...)``; a single term stays as it is."""
    return terms[0] if len(terms) == 1 else "(|" + "".join(terms) + ")"


# ----------------------------------------------------------------------------- search failures
class BaseNotFound(Exception):
    def __init__(self, base: str) -> None:
        super().__init__(base)
        self.base = base


class IncompleteSearch(Exception):
    """The search ended with a result ldap3 does not raise for: a referral (the base belongs to
    another domain or partition), a server time limit (AD's MaxQueryDuration) or size limit. The
    entries read so far are not the whole answer, so the refresh must fail rather than report them."""

    def __init__(self, base: str, result: Mapping[str, Any]) -> None:
        super().__init__(base)
        self.base = base
        self.code = int(result.get("result") or 0)
        self.description = str(result.get("description") or "")
        self.referrals = list(result.get("referrals") or [])


class DeadlineReached(Exception):
    """The time of the operation ran out (or it was aborted) before ``activity`` could finish."""

    def __init__(self, activity: str) -> None:
        super().__init__(activity)
        self.activity = activity


class ProtocolError(Exception):
    """The server sent bytes ldap3 could not decode as LDAP messages."""

    def __init__(self, activity: str, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.activity = activity
        self.cause = cause


_LIBRARY_PACKAGES = ("/ldap3/", "/pyasn1/")


def raised_by_ldap_library(exc: BaseException) -> bool:
    """True when ``exc`` (not an ldap3 exception) was raised inside ldap3 or pyasn1: ldap3 decodes
    server messages with plain indexing and dict look-ups, so garbage from the server surfaces as
    KeyError, IndexError, TypeError or ValueError from deep inside the library."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return False
    filename = frames[-1].filename.replace("\\", "/")
    return any(package in filename for package in _LIBRARY_PACKAGES)


# ------------------------------------------------------------------------------------ session
class LdapSession:
    """One LDAP connection used by one refresh or look-up, bounded by a deadline.

    Every request first checks the time left and sets the socket timeout to the smaller of the
    configured per-call ``timeout`` and that time; :meth:`abort` may be called from any thread.
    ``entries_read`` counts the search result entries received (the cost of a read).
    """

    def __init__(
        self, connection: ldap3.Connection, timeout: float, deadline: float | None, start_tls: bool
    ) -> None:
        self.conn = connection
        self.timeout = timeout
        self.deadline = deadline
        self.start_tls = start_tls
        self.entries_read = 0
        self.activity = "connecting"
        self._aborted = threading.Event()
        self._closed = False
        # Entries are decoded by us (ad_entries): ldap3's generic decoder costs 8x more per entry.
        self._diverter = EntryDiverter(connection, lambda exc: ProtocolError(self.activity, exc))

    # -- time ---------------------------------------------------------------------------------
    @property
    def aborted(self) -> bool:
        return self._aborted.is_set()

    def time_left(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def call_timeout(self) -> float:
        left = self.time_left()
        budget = self.timeout if left is None else min(self.timeout, left)
        return max(_MIN_CALL_TIMEOUT, budget)

    def _arm(self, activity: str) -> None:
        """Start one request: refuse when the time is up, bound its socket reads by the time left."""
        self.activity = activity
        left = self.time_left()
        if self.aborted or (left is not None and left <= 0):
            raise DeadlineReached(activity)
        sock = getattr(self.conn, "socket", None)
        if sock is not None:
            with contextlib.suppress(OSError, ValueError):
                sock.settimeout(self.call_timeout())

    @contextlib.contextmanager
    def _request(self, activity: str) -> Iterator[None]:
        self._arm(activity)
        try:
            yield
        except (ldap_errors.LDAPException, OSError):
            if self.aborted:
                raise DeadlineReached(activity) from None
            raise
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            if self.aborted:
                raise DeadlineReached(activity) from None
            if raised_by_ldap_library(exc):
                raise ProtocolError(activity, exc) from exc
            raise
        except Exception as exc:  # pyasn1's errors, whatever the version names them
            if self.aborted:
                raise DeadlineReached(activity) from None
            if type(exc).__module__.startswith("pyasn1"):
                raise ProtocolError(activity, exc) from exc
            raise

    # -- operations ---------------------------------------------------------------------------
    def open(self) -> None:
        """Connect (TLS for ldaps://), StartTLS when configured, and bind."""
        with self._request("connecting"):
            self.conn.open()
        if self.start_tls:
            with self._request("starting TLS"):
                self.conn.start_tls()
        with self._request("binding"):
            self.conn.bind()

    def search(
        self,
        base: str,
        search_filter: str,
        attributes: Iterable[str],
        *,
        scope: str = ldap3.SUBTREE,
        page_size: int | None = None,
        controls: Sequence[Control] = (),
    ) -> Iterator[tuple[str, RawAttributes]]:
        """(dn, raw attributes) of each entry found (see :meth:`search_pages`)."""
        for page in self.search_pages(
            base, search_filter, attributes, scope=scope, page_size=page_size, controls=controls
        ):
            yield from page

    def search_pages(
        self,
        base: str,
        search_filter: str,
        attributes: Iterable[str],
        *,
        scope: str = ldap3.SUBTREE,
        page_size: int | None = None,
        controls: Sequence[Control] = (),
    ) -> Iterator[list[tuple[str, RawAttributes]]]:
        """(dn, raw attributes) of the entries found, one list per page (one request each).

        Continuation references (other partitions, other domains) are skipped: the exporter reads
        one domain, from one DC. A missing base raises :class:`BaseNotFound`, a search that ended
        with a referral or a server limit :class:`IncompleteSearch`.
        """
        attributes = list(attributes)
        cookie: bytes | None = None
        while True:
            with self._request(f"searching {base or 'the rootDSE'}"):
                self._diverter.collect(attributes)
                try:
                    self.conn.search(
                        search_base=base,
                        search_filter=search_filter,
                        search_scope=scope,
                        attributes=attributes,
                        paged_size=page_size,
                        paged_cookie=cookie,
                        controls=list(controls) or None,
                    )
                except (ldap_errors.LDAPNoSuchObjectResult, ldap_errors.LDAPInvalidDnError):
                    raise BaseNotFound(base) from None
                finally:
                    diverted = self._diverter.stop()
                response = list(self.conn.response or ())
                result = dict(self.conn.result or {})
            page: list[tuple[str, RawAttributes]] = [
                (dn.decode("utf-8", "replace"), values) for dn, values in diverted
            ]
            del diverted
            # Entries ldap3 decoded itself (when the diverter could not be installed).
            page.extend(
                (item["dn"], item["raw_attributes"])
                for item in response
                if item.get("type") == "searchResEntry"
            )
            self.entries_read += len(page)
            yield page
            if result.get("result"):
                raise IncompleteSearch(base, result)
            cookie = _paged_cookie(result) if page_size else None
            if not cookie:
                return

    def read(
        self, dn: str, attributes: Iterable[str], controls: Sequence[Control] = ()
    ) -> RawAttributes | None:
        """The raw attributes of one entry, None when it does not exist (or cannot be seen)."""
        try:
            for _, raw in self.search(dn, "(objectClass=*)", attributes, scope=ldap3.BASE, controls=controls):
                return raw
        except BaseNotFound:
            return None
        return None

    def abort(self) -> None:
        """Interrupt the session from another thread: a blocked read returns at once.

        Only shuts the socket down (which wakes a reader blocked on it); closing it is left to the
        thread that owns it, so its descriptor is never reused under that thread's feet.
        """
        self._aborted.set()
        sock = getattr(self.conn, "socket", None)
        if sock is not None:
            with contextlib.suppress(OSError, ValueError):
                # The plain socket's shutdown: SSLSocket.shutdown would also drop its SSL object,
                # which the blocked reader is still using.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        _unbind_quietly(self.conn, send=not self.aborted)


def _paged_cookie(result: Mapping[str, Any]) -> bytes | None:
    try:
        cookie = result["controls"][PAGED_RESULTS]["value"]["cookie"]
    except (KeyError, TypeError):
        return None
    return bytes(cookie) if cookie else None


def _unbind_quietly(conn: Any, send: bool = True) -> None:
    if send:
        # The socket may already be gone.
        with contextlib.suppress(ldap_errors.LDAPException, OSError, ValueError):
            conn.unbind()
    # ldap3 leaves the socket of a connection that failed while opening (refused TLS handshake,
    # timeout) unclosed, and unbind() skips connections that never opened.
    sock = getattr(conn, "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.close()
    with contextlib.suppress(AttributeError):
        conn.closed = True


def receive_timeout(timeout: float, deadline: float | None) -> int:
    """ldap3 packs its receive timeout into SO_RCVTIMEO as a C long on POSIX: whole seconds."""
    left = timeout if deadline is None else min(timeout, deadline - time.monotonic())
    return max(1, math.ceil(left))


def connect_timeout(timeout: float, deadline: float | None) -> float:
    left = timeout if deadline is None else min(timeout, deadline - time.monotonic())
    return max(_MIN_CALL_TIMEOUT, left)


__all__ = [
    "SHOW_DELETED_CONTROL",
    "BaseNotFound",
    "DeadlineReached",
    "Endpoint",
    "HandshakeVerifyingTls",
    "IncompleteSearch",
    "LdapSession",
    "ProtocolError",
    "RawAttributes",
    "any_of",
    "build_ssl_context",
    "connect_timeout",
    "escape_binary",
    "escape_text",
    "parse_endpoint",
    "raised_by_ldap_library",
    "receive_timeout",
]
