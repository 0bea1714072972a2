"""How failures of the Active Directory source are reported: one SourceError per cause, naming the
server and what to do, never a secret (the caller masks every message with the SecretMask)."""

from __future__ import annotations

import ast
import re
import socket
import ssl
from collections.abc import Iterator

from ldap3.core import exceptions as ldap_errors

from exporter.sources.ad_ldap import (
    BaseNotFound,
    DeadlineReached,
    Endpoint,
    IncompleteSearch,
    ProtocolError,
)
from exporter.sources.base import SourceError

# LDAP result codes that mean "the server is there but cannot serve us right now".
_UNAVAILABLE_CODES = {51, 52, 80}  # busy, unavailable, other (AD's "server is shutting down")
TIME_LIMIT_CODES = {3}  # timeLimitExceeded
_REFERRAL = 10
_INVALID_DN_SYNTAX = 34
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
    text = re.sub(r"^_ssl\.c:\d+:\s*", "", text)
    return text or type(exc).__name__


def _bind_failure_detail(exc: BaseException) -> str:
    message = str(getattr(exc, "message", "") or "")
    match = re.search(r"\bdata ([0-9a-f]{3})\b", message, re.IGNORECASE)
    if match and match.group(1).lower() in _AD_BIND_SUBCODES:
        return _AD_BIND_SUBCODES[match.group(1).lower()]
    return str(getattr(exc, "description", "") or "invalid credentials")


def _looks_like_upn(bind_user: str) -> bool:
    return "@" in bind_user and "=" not in bind_user and "\\" not in bind_user


def classify(exc: BaseException, endpoint: Endpoint, bind_user: str, activity: str = "") -> SourceError:
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
        return _operation_result(exc, endpoint, bind_user, activity)
    if isinstance(exc, ldap_errors.LDAPSessionTerminatedByServerError):
        return SourceError("network", f"{endpoint} closed the connection while {activity or 'talking to it'}")
    if isinstance(exc, ldap_errors.LDAPSocketReceiveError) and "messageid" in str(exc).lower():
        return SourceError(
            "data",
            f"{endpoint} sent an LDAP message that answers no request of ours ({_detail(exc)}) "
            f"while {activity or 'talking to it'}: is this an LDAP server?",
        )
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


def _operation_result(
    exc: ldap_errors.LDAPOperationResult, endpoint: Endpoint, bind_user: str, activity: str
) -> SourceError:
    if exc.result == _INVALID_DN_SYNTAX and activity == "binding":
        hint = (
            "this server wants the distinguished name of the account (CN=...,DC=...) as bind_user"
            if _looks_like_upn(bind_user)
            else "check the spelling of the distinguished name"
        )
        return SourceError(
            "auth",
            f"{endpoint} rejected bind_user {bind_user} as not a valid DN (invalidDNSyntax): {hint}, "
            "or use DOMAIN\\user with authentication: ntlm",
        )
    if exc.result in TIME_LIMIT_CODES:
        return SourceError("timeout", f"{endpoint} hit its time limit: {exc.description}")
    if exc.result in _UNAVAILABLE_CODES:
        return SourceError("network", f"{endpoint} is unavailable: {exc.description}")
    diagnostic = f": {exc.message}" if exc.message else ""
    return SourceError("other", f"{endpoint} answered {exc.description} ({exc.result}){diagnostic}")


def _connection_detail(causes: list[BaseException]) -> str:
    # The innermost per-address errors are the informative ones ("Connection refused").
    for cause in reversed(causes):
        if isinstance(cause, OSError) and str(cause):
            return _detail(cause)
    return _detail(causes[0])


def deadline_error(exc: DeadlineReached, endpoint: Endpoint) -> SourceError:
    return SourceError(
        "timeout",
        f"{endpoint} did not answer in time: the operation's deadline passed while {exc.activity} "
        "(the connection was closed; the next refresh opens a new one)",
    )


def protocol_error(exc: ProtocolError, endpoint: Endpoint) -> SourceError:
    return SourceError(
        "data",
        f"{endpoint} sent bytes that are not a valid LDAP message while {exc.activity} ({exc}): "
        "is this an LDAP server, and the right port?",
    )


def base_not_found(exc: BaseNotFound, endpoint: Endpoint, bind_user: str) -> SourceError:
    return SourceError(
        "data", f"search base {exc.base!r} does not exist on {endpoint} (or {bind_user} may not see it)"
    )


def incomplete_search(exc: IncompleteSearch, endpoint: Endpoint) -> SourceError:
    where = f"search of {exc.base!r} on {endpoint}"
    if exc.code in TIME_LIMIT_CODES:
        return SourceError("timeout", f"{where} hit the server's time limit (MaxQueryDuration)")
    if exc.code == _REFERRAL:
        targets = ", ".join(exc.referrals) or "another server"
        return SourceError("data", f"{where} was referred to {targets}: the base is not in this DC's domain")
    return SourceError("data", f"{where} ended early: {exc.description} ({exc.code})")


__all__ = [
    "TIME_LIMIT_CODES",
    "base_not_found",
    "classify",
    "deadline_error",
    "incomplete_search",
    "protocol_error",
]
