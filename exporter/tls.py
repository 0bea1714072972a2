"""Server-side TLS with exporter-toolkit's client certificate policies, on pyOpenSSL.

Python's ``ssl`` module verifies every client certificate it asks for against the loaded CAs, so it
cannot express Go's ``RequestClientCert`` / ``RequireAnyClientCert`` (ask for a certificate, accept
any). pyOpenSSL exposes OpenSSL's verify callback, which decides per certificate: it accepts
unverified certificates in those two modes, keeps OpenSSL's verdict in the ``...Verify...`` modes,
and checks ``client_allowed_sans`` on the client's own certificate.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from OpenSSL import SSL, crypto

log = logging.getLogger(__name__)

TLS_VERSIONS = {
    "TLS10": SSL.TLS1_VERSION,
    "TLS11": SSL.TLS1_1_VERSION,
    "TLS12": SSL.TLS1_2_VERSION,
    "TLS13": SSL.TLS1_3_VERSION,
}
# Go's names (crypto/tls.CipherSuites) of the TLS 1.0-1.2 suites, with OpenSSL's names. TLS 1.3
# suites are not configurable in Go either: listed so that a config that names them is accepted.
CIPHER_SUITES = {
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_AES_128_GCM_SHA256": "",
    "TLS_AES_256_GCM_SHA384": "",
    "TLS_CHACHA20_POLY1305_SHA256": "",
}
CURVES = {"CurveP256": "P-256", "CurveP384": "P-384", "CurveP521": "P-521", "X25519": "X25519"}

# exporter-toolkit's client_auth_type values ("RequireClientCert" is its old spelling of RequireAny).
CLIENT_AUTH_TYPES = (
    "NoClientCert",
    "RequestClientCert",
    "RequireAnyClientCert",
    "RequireClientCert",
    "VerifyClientCertIfGiven",
    "RequireAndVerifyClientCert",
)
VERIFYING_AUTH_TYPES = frozenset({"VerifyClientCertIfGiven", "RequireAndVerifyClientCert"})
_REQUIRING_AUTH_TYPES = frozenset({"RequireAnyClientCert", "RequireClientCert", "RequireAndVerifyClientCert"})


class TLSConfigError(ValueError):
    """A TLS setting that OpenSSL refused; the message names the web config key."""


@dataclass(frozen=True)
class TLSSettings:
    """The validated ``tls_server_config``, with certificates and key already parsed."""

    chain: Sequence[x509.Certificate]
    key: PrivateKeyTypes
    client_auth_type: str = "NoClientCert"
    client_cas: Sequence[x509.Certificate] = ()
    client_allowed_sans: frozenset[str] | None = None
    min_version: str = "TLS12"
    max_version: str = "TLS13"
    cipher_suites: Sequence[str] = ()
    prefer_server_cipher_suites: bool = True
    curve_preferences: Sequence[str] = ()


class ServerTLS:
    """One OpenSSL context for the server; :meth:`accept` runs the handshake on a new connection."""

    def __init__(self, settings: TLSSettings) -> None:
        self.settings = settings
        self.context = _build_context(settings)

    def accept(self, sock: socket.socket) -> TLSStream:
        connection = SSL.Connection(self.context, sock)
        connection.set_accept_state()
        stream = TLSStream(connection, sock)
        stream.handshake()
        return stream


class TLSStream:
    """A TLS connection with the socket interface the HTTP transport uses (``recv``/``sendall``/
    ``close``); every TLS failure surfaces as a :class:`ConnectionError` (the client went away or
    spoke badly), so the transport handles plain and TLS connections alike."""

    def __init__(self, connection: SSL.Connection, sock: socket.socket) -> None:
        self._connection = connection
        self._sock = sock

    def handshake(self) -> None:
        try:
            self._connection.do_handshake()
        except SSL.Error as exc:
            raise ConnectionError(f"TLS handshake failed: {_describe(exc)}") from None

    def recv(self, size: int) -> bytes:
        try:
            return self._connection.recv(size)
        except SSL.ZeroReturnError:
            return b""
        except SSL.SysCallError as exc:
            if exc.args and exc.args[0] == -1:  # the peer closed the TCP connection without close_notify
                return b""
            raise ConnectionError(f"TLS read failed: {_describe(exc)}") from None
        except SSL.Error as exc:
            raise ConnectionError(f"TLS read failed: {_describe(exc)}") from None

    def sendall(self, data: bytes) -> None:
        try:
            self._connection.sendall(data)
        except SSL.Error as exc:
            raise ConnectionError(f"TLS write failed: {_describe(exc)}") from None

    def close(self) -> None:
        with contextlib.suppress(SSL.Error, OSError):  # close_notify, best effort: the peer may be gone
            self._connection.shutdown()
        self._sock.close()


def _describe(exc: Exception) -> str:
    return (
        str(exc.args[0]) if exc.args and not isinstance(exc.args[0], list) else str(exc) or type(exc).__name__
    )


def _build_context(settings: TLSSettings) -> SSL.Context:
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    _set(context.set_min_proto_version, TLS_VERSIONS[settings.min_version], "min_version")
    _set(context.set_max_proto_version, TLS_VERSIONS[settings.max_version], "max_version")
    # Session resumption with client certificates needs a session id context (else OpenSSL fails
    # the resumed handshake).
    context.set_session_id(b"intune-provisioning-exporter")
    _load_identity(context, settings)
    _set_ciphers(context, settings)
    _set_curves(context, settings.curve_preferences)
    _set_client_auth(context, settings)
    return context


def _set(setter: Callable[[Any], None], value: object, key: str) -> None:
    try:
        setter(value)
    except SSL.Error as exc:
        raise TLSConfigError(f"{key}: {_describe(exc)}") from None


def _load_identity(context: SSL.Context, settings: TLSSettings) -> None:
    leaf, *intermediates = settings.chain
    try:
        context.use_certificate(leaf)
        for certificate in intermediates:
            context.add_extra_chain_cert(certificate)
        context.use_privatekey(settings.key)  # type: ignore[arg-type]
        context.check_privatekey()
    except (SSL.Error, TypeError, ValueError) as exc:
        raise TLSConfigError(
            f"key_file: the key does not match the certificate or cannot be used: {exc}"
        ) from None


def _set_ciphers(context: SSL.Context, settings: TLSSettings) -> None:
    names = [CIPHER_SUITES[name] for name in settings.cipher_suites if CIPHER_SUITES[name]]
    if names:
        _set(context.set_cipher_list, ":".join(names).encode(), "cipher_suites")
    if settings.prefer_server_cipher_suites:
        context.set_options(SSL.OP_CIPHER_SERVER_PREFERENCE)


def _set_curves(context: SSL.Context, curves: Sequence[str]) -> None:
    if not curves:
        return
    # pyOpenSSL has no public call for a list of groups; its OpenSSL binding has the C function.
    from OpenSSL.SSL import _ffi, _lib

    groups = ":".join(CURVES[name] for name in curves).encode()
    if _lib.SSL_CTX_set1_curves_list(context._context, _ffi.new("char[]", groups)) != 1:
        raise TLSConfigError("curve_preferences: OpenSSL refused the list")


def _set_client_auth(context: SSL.Context, settings: TLSSettings) -> None:
    mode = settings.client_auth_type
    if mode == "NoClientCert":
        context.set_verify(SSL.VERIFY_NONE)
        return
    store = context.get_cert_store()
    assert store is not None
    for ca in settings.client_cas:
        store.add_cert(crypto.X509.from_cryptography(ca))
        # The CA names go into the certificate request, so that a client with several certificates
        # picks one of the right issuer (as Go does with ClientCAs).
        context.add_client_ca(ca)
    flags = SSL.VERIFY_PEER
    if mode in _REQUIRING_AUTH_TYPES or settings.client_allowed_sans is not None:
        flags |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
    context.set_verify(flags, _verify_callback(mode in VERIFYING_AUTH_TYPES, settings.client_allowed_sans))


VerifyCallback = Callable[[SSL.Connection, crypto.X509, int, int, int], bool]


def _verify_callback(verify_chain: bool, allowed_sans: frozenset[str] | None) -> VerifyCallback:
    """OpenSSL calls this once per certificate of the client's chain, the client's own (depth 0)
    last; ``ok`` is OpenSSL's verdict against the client CAs."""

    def callback(connection: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int) -> bool:
        if verify_chain and not ok:
            log.debug("client certificate rejected at depth %d: OpenSSL error %d", depth, errno)
            return False
        if depth == 0 and allowed_sans is not None:
            names = subject_alternative_names(cert.to_cryptography())
            if names.isdisjoint(allowed_sans):
                log.debug("client certificate has none of the allowed SANs (it has %s)", sorted(names))
                return False
        return True

    return callback


def subject_alternative_names(certificate: x509.Certificate) -> set[str]:
    """DNS names, e-mail addresses, IP addresses and URIs, as exporter-toolkit compares them."""
    try:
        extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    names: set[str] = set()
    for kind in (x509.DNSName, x509.RFC822Name, x509.UniformResourceIdentifier):
        names.update(extension.get_values_for_type(kind))
    names.update(str(ip) for ip in extension.get_values_for_type(x509.IPAddress))
    return names
