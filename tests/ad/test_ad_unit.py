"""Fast tests of the AD source that need no directory: parsing, configuration, error mapping.

ldap3's MOCK_SYNC strategy stands in for a directory in a few of them (it cannot evaluate AD's
extensible-match filter, so those use a plain filter); the real-directory tests are in
test_ad_samba.py.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import ldap3
import pytest
from ldap3.core import exceptions as ldap_errors

from exporter.config import ActiveDirectoryConfig, Secret
from exporter.ids import sid_to_bytes
from exporter.model import AdTable, AdUser
from exporter.sources.ad import (
    ActiveDirectorySource,
    build_ssl_context,
    classify,
    generalized_time_seconds,
    parse_endpoint,
    stream_users,
    user_attributes,
)
from exporter.sources.ad_ldap import LdapSession
from exporter.sources.ad_sync import DcState, RootDse, Scope, full_read_reason, untracked_filter_reason
from exporter.sources.ad_trace import domain_root, guid_from_text, parse_query
from exporter.sources.base import ConfigurationError, SourceError
from tests.ad.fake_ldap import SEARCH_REQUEST, Request, fake_ldap, search_done, search_entry, serve_searches

PASSWORD = "S3cret-Value!"
SID = "S-1-5-21-1004336348-1177238915-682003330-1105"
BASE = "OU=Staff,DC=contoso,DC=com"


def config(**overrides: Any) -> ActiveDirectoryConfig:
    values: dict[str, Any] = {
        "url": "ldaps://dc01.contoso.com",
        "bind_user": "svc-intune@contoso.com",
        "bind_password": Secret(PASSWORD),
        "search_bases": (BASE,),
        "timeout": 7.5,
    }
    values.update(overrides)
    return ActiveDirectoryConfig(**values)


# ---------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("20240131235959.0Z", datetime(2024, 1, 31, 23, 59, 59, tzinfo=UTC).timestamp()),
        ("20240131235959Z", datetime(2024, 1, 31, 23, 59, 59, tzinfo=UTC).timestamp()),
        ("20240131235959.25Z", datetime(2024, 1, 31, 23, 59, 59, tzinfo=UTC).timestamp() + 0.25),
        ("20240201010000+0100", datetime(2024, 2, 1, 0, 0, 0, tzinfo=UTC).timestamp()),
        ("20240131220000-0200", datetime(2024, 2, 1, 0, 0, 0, tzinfo=UTC).timestamp()),
    ],
)
def test_generalized_time(text: str, expected: float) -> None:
    assert generalized_time_seconds(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "2024-01-31T23:59:59Z", "20241301000000.0Z", "2024013123595.0Z"])
def test_generalized_time_rejects_other_forms(text: str) -> None:
    with pytest.raises(ValueError):
        generalized_time_seconds(text)


@pytest.mark.parametrize(
    ("url", "start_tls", "described"),
    [
        ("ldaps://dc01.contoso.com", False, "ldaps://dc01.contoso.com:636"),
        ("ldaps://dc01.contoso.com:3269", False, "ldaps://dc01.contoso.com:3269"),
        ("LDAP://DC01.contoso.com", True, "ldap://dc01.contoso.com:389 (StartTLS)"),
        ("ldap://10.0.0.4:389", False, "ldap://10.0.0.4:389"),
        ("ldaps://[fd00::4]", False, "ldaps://[fd00::4]:636"),
    ],
)
def test_describe(url: str, start_tls: bool, described: str) -> None:
    assert ActiveDirectorySource(config(url=url, start_tls=start_tls)).describe() == described


def test_endpoint_rejects_other_schemes() -> None:
    with pytest.raises(ValueError):
        parse_endpoint("https://dc01.contoso.com", False)


def test_attributes_requested() -> None:
    # Only what the records hold: the model keeps no DN or userAccountControl.
    assert user_attributes("objectGUID") == [
        "objectGUID",
        "objectSid",
        "sAMAccountName",
        "userPrincipalName",
        "whenCreated",
    ]
    assert user_attributes("mS-DS-ConsistencyGuid")[-1] == "mS-DS-ConsistencyGuid"


# ---------------------------------------------------------------------------- configuration
def test_simple_bind_connection() -> None:
    conn = ActiveDirectorySource(config()).build_connection()
    assert conn.authentication == ldap3.SIMPLE
    assert conn.user == "svc-intune@contoso.com"
    assert conn.server.host == "dc01.contoso.com"
    assert conn.server.port == 636
    assert conn.server.ssl is True
    assert conn.server.connect_timeout == 7.5
    assert conn.receive_timeout == 8  # whole seconds, rounded up (ldap3 needs an int)


def test_connection_timeouts_shrink_to_the_deadline() -> None:
    conn = ActiveDirectorySource(config()).build_connection(deadline=time.monotonic() + 2.2)
    assert 2.0 < conn.server.connect_timeout <= 2.2
    assert conn.receive_timeout == 3
    assert conn.read_only is True
    assert conn.closed  # building does no network I/O


def test_ntlm_connection() -> None:
    # ldap3's NTLM bind does not work against Samba, so the configuration path is what is tested.
    source = ActiveDirectorySource(
        config(url="ldap://dc01.contoso.com", start_tls=True, authentication="ntlm", bind_user="CONTOSO\\svc")
    )
    conn = source.build_connection()
    assert conn.authentication == ldap3.NTLM
    assert conn.user == "CONTOSO\\svc"
    assert conn.password == PASSWORD
    assert conn.server.ssl is False
    assert conn.server.port == 389


def test_ntlm_hash_works_without_openssl_md4() -> None:
    # ldap3 computes the NT hash with MD4; OpenSSL 3 lacks it, so ldap3 falls back to pycryptodome.
    # Expected value: the NTOWFv2 test vector of MS-NLMP section 4.2.4.1.1.
    from ldap3.utils.ntlm import NtlmClient

    client = NtlmClient(domain="Domain", user_name="User", password="Password")
    assert client.ntowf_v2().hex() == "0c868a403bfd7a93a3001ef22ef02e3f"


def test_tls_settings() -> None:
    verifying = ActiveDirectorySource(config()).build_connection().server.tls
    assert verifying._context.verify_mode == ssl.CERT_REQUIRED
    assert verifying._context.check_hostname is True
    assert verifying._server_hostname == "dc01.contoso.com"

    lax = ActiveDirectorySource(config(tls_verify=False)).build_connection().server.tls
    assert lax._context.verify_mode == ssl.CERT_NONE
    assert lax._context.check_hostname is False

    plain = ActiveDirectorySource(config(url="ldap://dc01.contoso.com")).build_connection().server
    assert plain.tls is None


def test_simple_bind_without_tls_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        ActiveDirectorySource(config(url="ldap://dc01.contoso.com"))
    assert "clear text" in caplog.text
    assert PASSWORD not in caplog.text


# ------------------------------------------------------------------------------ MOCK_SYNC reads
def guid() -> bytes:
    return uuid.uuid4().bytes_le


def mock_connection(entries: dict[str, dict[str, Any]]) -> ldap3.Connection:
    # No schema, like the real source (get_info=NONE): an offline schema would make ldap3 reject
    # the rootDSE's operational attribute names before sending the request.
    server = ldap3.Server("mock-dc", get_info=ldap3.NONE)
    conn = ldap3.Connection(
        server,
        user="CN=svc,DC=contoso,DC=com",
        password=PASSWORD,
        client_strategy=ldap3.MOCK_SYNC,
        raise_exceptions=True,
    )
    conn.strategy.add_entry("CN=svc,DC=contoso,DC=com", {"userPassword": PASSWORD, "sAMAccountName": "svc"})
    for dn, attributes in entries.items():
        conn.strategy.add_entry(dn, {"objectClass": ["top", "person", "user"], **attributes})
    return conn


def user_entry(sam: str, object_guid: bytes, rid: int, **extra: Any) -> dict[str, Any]:
    return {
        "objectGUID": object_guid,
        "objectSid": sid_to_bytes(f"S-1-5-21-1-2-3-{rid}"),
        "sAMAccountName": sam,
        "whenCreated": "20240101120000.0Z",
        "userAccountControl": "512",
        **extra,
    }


@pytest.fixture
def directory() -> Iterator[tuple[ldap3.Connection, dict[str, bytes]]]:
    guids = {name: guid() for name in ("anna", "ben", "cara")}
    consistency = guid()
    conn = mock_connection(
        {
            f"CN=Anna,{BASE}": user_entry(
                "anna", guids["anna"], 1101, **{"mS-DS-ConsistencyGuid": consistency}
            ),
            f"CN=Ben,OU=Sub,{BASE}": user_entry(
                "ben", guids["ben"], 1102, userPrincipalName="ben@contoso.com"
            ),
            # An object the bind account cannot fully read: no objectSid.
            f"CN=Hidden,{BASE}": {"objectGUID": guid(), "sAMAccountName": "hidden"},
            "CN=Cara,OU=Other,DC=contoso,DC=com": user_entry("cara", guids["cara"], 1103),
        }
    )
    conn.bind()
    guids["anna-consistency"] = consistency
    yield conn, guids
    conn.unbind()


def session_of(conn: ldap3.Connection) -> LdapSession:
    return LdapSession(conn, timeout=5.0, deadline=None, start_tls=False)


def users_of(table: AdTable) -> list[AdUser]:
    return [table.record(row) for row in range(table.n)]


def test_consistency_guid_anchor_with_fallback(directory: tuple[ldap3.Connection, dict[str, bytes]]) -> None:
    conn, guids = directory
    found = stream_users(session_of(conn), [BASE], "(objectClass=user)", "mS-DS-ConsistencyGuid", page_size=1)
    users = {u.sam_account_name: u for u in found}
    assert set(users) == {"anna", "ben"}
    assert users["anna"].source_anchor == guids["anna-consistency"]
    assert users["anna"].object_guid == guids["anna"]
    assert users["ben"].source_anchor == guids["ben"]  # no consistency GUID: objectGUID, like AAD Connect


def test_object_guid_anchor(directory: tuple[ldap3.Connection, dict[str, bytes]]) -> None:
    conn, guids = directory
    found = stream_users(session_of(conn), [BASE], "(objectClass=user)", "objectGUID", 10)
    users = {u.sam_account_name: u for u in found}
    assert users["anna"].source_anchor == guids["anna"]
    assert users["ben"].user_principal_name == "ben@contoso.com"
    assert users["ben"].object_sid == "S-1-5-21-1-2-3-1102"
    assert users["ben"].when_created == datetime(2024, 1, 1, 12, tzinfo=UTC).timestamp()


def test_overlapping_bases_deduplicated(directory: tuple[ldap3.Connection, dict[str, bytes]]) -> None:
    conn, _ = directory
    bases = [BASE, f"OU=Sub,{BASE}", "DC=contoso,DC=com"]
    found = stream_users(session_of(conn), bases, "(objectClass=user)", "objectGUID", 2)
    assert sorted(u.sam_account_name for u in found) == ["anna", "ben", "cara"]


def test_refresh_with_mock_directory(
    directory: tuple[ldap3.Connection, dict[str, bytes]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    conn, _ = directory
    source = ActiveDirectorySource(config(user_filter="(objectClass=user)", netbios_domain="CONTOSO"))
    monkeypatch.setattr(source, "build_connection", lambda deadline=None: conn)
    with caplog.at_level(logging.WARNING):
        data = source.refresh(None)
    assert sorted(u.sam_account_name for u in users_of(data)) == ["anna", "ben"]
    assert data.netbios_domain == "CONTOSO"
    assert data.meta["read"] == "full"
    assert "dc" not in data.meta  # no rootDSE USN here: no incremental state either
    assert "skipped 1 entries" in caplog.text and "CN=Hidden" in caplog.text
    assert conn.closed  # unbound after the refresh


def test_refresh_missing_base_with_mock_directory(
    directory: tuple[ldap3.Connection, dict[str, bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    conn, _ = directory
    missing = "OU=Gone,DC=contoso,DC=com"
    source = ActiveDirectorySource(
        config(search_bases=(BASE, missing), user_filter="(objectClass=user)", netbios_domain="CONTOSO")
    )
    monkeypatch.setattr(source, "build_connection", lambda deadline=None: conn)
    with pytest.raises(SourceError) as caught:
        source.refresh(None)
    assert caught.value.reason == "data"
    assert missing in caught.value.message


class Leaky:
    """A connection whose library message carries the password (as some server messages do)."""

    closed = False

    def __init__(self, secret: str) -> None:
        self.secret = secret

    def open(self) -> None:
        raise ldap_errors.LDAPException(f"could not bind with password {self.secret}")

    def unbind(self) -> None:
        self.closed = True


@pytest.mark.parametrize("secret", [PASSWORD, "x", "Zq", "p@ss w0rd\\"])
def test_secret_never_leaks_from_a_library_message(monkeypatch: pytest.MonkeyPatch, secret: str) -> None:
    # Masked whatever its length (one SecretMask for the whole exporter).
    source = ActiveDirectorySource(config(bind_password=Secret(secret)))
    leaky = Leaky(secret)
    monkeypatch.setattr(source, "build_connection", lambda deadline=None: leaky)
    with pytest.raises(SourceError) as caught:
        source.refresh(None)
    assert "password <secret>" in caught.value.message
    assert caught.value.message.count("<secret>") == 1
    assert leaky.closed


# ----------------------------------------------------------------------------- error mapping
ENDPOINT = parse_endpoint("ldaps://dc01.contoso.com", False)


def test_ad_bind_subcodes_are_explained() -> None:
    exc = ldap_errors.LDAPOperationResult(
        result=49,
        description="invalidCredentials",
        message="80090308: LdapErr: DSID-0C09044E, comment: AcceptSecurityContext error, data 775, v4563",
    )
    error = classify(exc, ENDPOINT, "svc@contoso.com")
    assert error.reason == "auth"
    assert (
        error.message == "bind as svc@contoso.com to ldaps://dc01.contoso.com:636 failed: account locked out"
    )


@pytest.mark.parametrize(
    ("exc", "reason", "fragment"),
    [
        (ldap_errors.LDAPOperationResult(result=8, description="strongerAuthRequired"), "auth", "ldaps://"),
        (ldap_errors.LDAPOperationResult(result=50, description="insufficientAccessRights"), "auth", "svc"),
        (ldap_errors.LDAPOperationResult(result=3, description="timeLimitExceeded"), "timeout", "time limit"),
        (ldap_errors.LDAPOperationResult(result=51, description="busy"), "network", "unavailable"),
        (
            ldap_errors.LDAPOperationResult(result=1, description="operationsError"),
            "other",
            "operationsError",
        ),
        (ldap_errors.LDAPResponseTimeoutError("no response from server"), "timeout", "timed out"),
        (socket.gaierror(-2, "Name or service not known"), "network", "cannot resolve dc01.contoso.com"),
        (ConnectionResetError(104, "Connection reset by peer"), "network", "reset"),
        (ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"), "network", "TLS handshake"),
        (ldap_errors.LDAPStartTLSError("startTLS failed - protocolError"), "network", "StartTLS"),
    ],
)
def test_classify(exc: BaseException, reason: str, fragment: str) -> None:
    error = classify(exc, ENDPOINT, "svc")
    assert error.reason == reason
    assert fragment in error.message
    assert "dc01.contoso.com" in error.message


# ---------------------------------------------------------------------------------- timeouts
@pytest.fixture
def silent_server() -> Iterator[int]:
    """Accepts TCP connections and never answers: a hung DC."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join(timeout=5)
    for conn in held:
        conn.close()
    listener.close()


@pytest.mark.parametrize(("scheme", "start_tls"), [("ldaps", False), ("ldap", True)])
def test_hung_server_times_out(silent_server: int, scheme: str, start_tls: bool) -> None:
    source = ActiveDirectorySource(
        config(url=f"{scheme}://127.0.0.1:{silent_server}", start_tls=start_tls, timeout=1.0)
    )
    started = time.monotonic()
    with pytest.raises(SourceError) as caught:
        source.refresh(None)
    elapsed = time.monotonic() - started
    assert caught.value.reason == "timeout"
    assert f"127.0.0.1:{silent_server}" in caught.value.message
    assert elapsed < 5


# ------------------------------------------------------------------- CN-only DC certificates
def _cn_only_certificates(directory: Path) -> tuple[str, str, str]:
    """A CA and a server certificate with CN=localhost and no subjectAltName, like the
    self-signed certificate Samba generates and like DC certificates from old templates."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test Root CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .sign(ca_key, hashes.SHA256())
    )
    paths = (directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
    paths[0].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return str(paths[0]), str(paths[1]), str(paths[2])


@pytest.fixture
def cn_only_tls_server(tmp_path: Path) -> Iterator[tuple[int, str]]:
    """A loopback TLS server presenting a CN-only certificate; yields (port, CA file)."""
    ca_file, cert_file, key_file = _cn_only_certificates(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                raw, _ = listener.accept()
            except OSError:
                continue
            # The client may reject the certificate: that is what some tests expect.
            with raw, contextlib.suppress(ssl.SSLError, OSError):
                raw.settimeout(5)
                context.wrap_socket(raw, server_side=True).close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1], ca_file
    stop.set()
    thread.join(timeout=5)
    listener.close()


def _handshake(port: int, context: ssl.SSLContext, server_hostname: str) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        context.wrap_socket(raw, server_hostname=server_hostname).close()


def test_cn_only_certificate_verifies_against_its_name(cn_only_tls_server: tuple[int, str]) -> None:
    port, ca_file = cn_only_tls_server
    _handshake(port, build_ssl_context(ca_file, verify=True), "localhost")  # no exception: accepted


@pytest.mark.parametrize("name", ["127.0.0.1", "dc02.contoso.com"])
def test_cn_only_certificate_rejects_other_names(cn_only_tls_server: tuple[int, str], name: str) -> None:
    port, ca_file = cn_only_tls_server
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        _handshake(port, build_ssl_context(ca_file, verify=True), name)


def test_unverified_context_accepts_cn_only_certificate_by_ip(cn_only_tls_server: tuple[int, str]) -> None:
    port, _ = cn_only_tls_server
    _handshake(port, build_ssl_context(None, verify=False), "127.0.0.1")


def test_unresolvable_host_is_a_network_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_such_host(*args: Any, **kwargs: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_host)
    with pytest.raises(SourceError) as caught:
        ActiveDirectorySource(config(url="ldaps://dc09.contoso.com")).refresh(None)
    assert caught.value.reason == "network"
    assert caught.value.message.startswith("cannot resolve dc09.contoso.com")


# ---------------------------------------------------------------------- unusable configuration
def test_unusable_ca_file_is_a_configuration_error(tmp_path: Path) -> None:
    garbage = tmp_path / "ca.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigurationError, match="cannot load ca_file"):
        ActiveDirectorySource(config(ca_file=str(garbage)))


def test_ca_file_removed_after_start_fails_the_refresh(tmp_path: Path) -> None:
    import trustme

    ca_file = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca_file))
    source = ActiveDirectorySource(config(ca_file=str(ca_file)))
    ca_file.unlink()
    with pytest.raises(SourceError) as caught:
        source.refresh(None)
    assert caught.value.reason == "other"
    assert "cannot load ca_file" in caught.value.message and "dc01.contoso.com" in caught.value.message


def test_bad_port_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="port"):
        ActiveDirectorySource(config(url="ldaps://dc01.contoso.com:ssl"))


# ------------------------------------------------------------ searches that end without error
def _one_user_then(result: dict[str, Any]) -> Any:
    """Search answers of a directory whose user search ends with ``result`` after one entry."""
    entry = search_entry(
        f"CN=Anna,{BASE}",
        {
            "objectGUID": [guid()],
            "objectSid": [sid_to_bytes(SID)],
            "sAMAccountName": [b"anna"],
            "whenCreated": [b"20240101120000.0Z"],
        },
    )

    def answer(request: Request) -> list[bytes]:
        assert request.operation == SEARCH_REQUEST
        if request.search_base == "":
            return [search_done(0)]  # an empty rootDSE: no incremental state
        return [entry, search_done(result["result"], "", result.get("referrals") or ())]

    return serve_searches(answer)


@pytest.mark.parametrize(
    ("result", "reason", "fragment"),
    [
        (
            {"result": 10, "referrals": ["ldap://fabrikam.com/DC=fabrikam,DC=com"]},
            "data",
            "referred to ldap://fabrikam.com/DC=fabrikam,DC=com",
        ),
        ({"result": 3}, "timeout", "time limit"),
        ({"result": 4}, "data", "sizeLimitExceeded"),
    ],
)
def test_search_that_ends_early_fails_the_refresh(result: dict[str, Any], reason: str, fragment: str) -> None:
    with fake_ldap(_one_user_then(result)) as server:
        source = ActiveDirectorySource(
            config(url=f"ldap://127.0.0.1:{server.port}", netbios_domain="CONTOSO", timeout=5.0)
        )
        with pytest.raises(SourceError) as caught:
            source.refresh(None, deadline=time.monotonic() + 10)
    assert caught.value.reason == reason
    assert fragment in caught.value.message and BASE in caught.value.message


def test_complete_search_from_the_fake_server_is_read() -> None:
    # The same fake with a successful end: the failures above are about the result code alone.
    with fake_ldap(_one_user_then({"result": 0})) as server:
        source = ActiveDirectorySource(
            config(url=f"ldap://127.0.0.1:{server.port}", netbios_domain="CONTOSO", timeout=5.0)
        )
        table = source.refresh(None, deadline=time.monotonic() + 10)
    assert [user.sam_account_name for user in users_of(table)] == ["anna"]
    assert table.meta["entries_read"] == 1


# ------------------------------------------------------------------------------ trace queries
def test_guid_text_forms() -> None:
    raw = uuid.UUID("8f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0").bytes_le
    for text in (
        "8f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0",
        "{8F1E2D3C-4B5A-6978-8796-A5B4C3D2E1F0}",
        " {8f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0} ",
    ):
        assert guid_from_text(text) == raw
    for text in ("{8f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0", "8f1e2d3c4b5a69788796a5b4c3d2e1f0", "jdoe", ""):
        assert guid_from_text(text) is None


def test_query_terms_are_escaped_byte_by_byte() -> None:
    guid = bytes(range(16))
    query = parse_query("j*doe)(x", [SID], [guid], "CONTOSO", "ldaps://dc01")
    terms = query.terms()
    assert "(userPrincipalName=j\\2adoe\\29\\28x)" in terms and "(sAMAccountName=j\\2adoe\\29\\28x)" in terms
    assert "(objectGUID=" + "".join(f"\\{b:02x}" for b in guid) + ")" in terms
    sid_term = "(objectSid=" + "".join(f"\\{b:02x}" for b in sid_to_bytes(SID)) + ")"
    assert sid_term in terms


def test_domain_form_matches_sam_only_and_checks_the_domain() -> None:
    assert parse_query("contoso\\JDoe", [], [], "CONTOSO", "x").terms() == ["(sAMAccountName=JDoe)"]
    other = parse_query("FABRIKAM\\jdoe", [], [], "CONTOSO", "ldaps://dc01")
    assert other.terms() == []
    assert other.notes == ["FABRIKAM\\jdoe: FABRIKAM is not the NetBIOS domain CONTOSO of ldaps://dc01"]


def test_bad_sid_is_a_note_not_a_filter() -> None:
    query = parse_query(None, ["S-1-5-x"], [], "CONTOSO", "x")
    assert query.terms() == [] and query.notes == ["S-1-5-x: not a SID"]


def test_domain_root_without_default_naming_context() -> None:
    root = RootDse(default_nc=None, config_nc=None, service=None, usn=None, show_deleted=False)
    assert domain_root(root, ["OU=Staff, DC=contoso,DC=com"]) == "DC=contoso,DC=com"


# ------------------------------------------------------------------------- incremental plan
def _scope() -> Scope:
    return Scope((BASE,), "(objectClass=user)", "objectGUID", "CONTOSO", 1000)


def _previous(**meta: Any) -> AdTable:
    return AdTable.from_records((), "CONTOSO").derive(AdTable.empty().columns(), None, meta)


DC = DcState("CN=NTDS Settings,CN=DC01,CN=Servers", "ab" * 16, 5000)


def test_incremental_continues_from_matching_state() -> None:
    previous = _previous(dc=DC.to_meta(), scope=_scope().fingerprint(), containers=[])
    assert full_read_reason(previous, replace(DC, usn=5100), _scope()) is None
    assert full_read_reason(previous, DC, _scope()) is None  # nothing committed since


@pytest.mark.parametrize(
    ("meta", "dc", "fragment"),
    [
        ({"dc": "garbage"}, DC, "no incremental state"),
        ({"dc": {**DC.to_meta(), "usn": "5000"}}, DC, "no incremental state"),  # a damaged state file
        ({"dc": DC.to_meta(), "scope": "other"}, DC, "changed"),
        (
            {"dc": DC.to_meta()},
            replace(DC, service="CN=NTDS Settings,CN=DC02,CN=Servers"),
            "another domain controller",
        ),
        ({"dc": DC.to_meta()}, replace(DC, invocation_id="cd" * 16), "restored"),
        ({"dc": DC.to_meta()}, replace(DC, usn=4999), "backwards"),
        ({"dc": DC.to_meta(), "containers": "x"}, DC, "container"),
    ],
)
def test_full_read_reasons(meta: dict[str, Any], dc: DcState, fragment: str) -> None:
    meta = {"scope": _scope().fingerprint(), "containers": [], **meta}
    reason = full_read_reason(_previous(**meta), dc, _scope())
    assert reason is not None and fragment in reason


def test_no_previous_or_no_dc_state_reads_everything() -> None:
    assert full_read_reason(None, DC, _scope()) is not None
    previous = _previous(dc=DC.to_meta(), scope=_scope().fingerprint(), containers=[])
    assert full_read_reason(previous, None, _scope()) is not None


@pytest.mark.parametrize(
    ("user_filter", "untracked"),
    [
        ("(&(objectClass=user)(memberOf=CN=Intune,OU=Groups,DC=contoso,DC=com))", True),
        ("(memberof:1.2.840.113556.1.4.1941:=CN=Intune,DC=contoso,DC=com)", True),
        ("(&(objectCategory=person)(!(userAccountControl:1.2.840.113556.1.4.803:=2)))", False),
    ],
)
def test_filters_uSNChanged_cannot_follow(user_filter: str, untracked: bool) -> None:
    assert (untracked_filter_reason(user_filter) is not None) is untracked


# ------------------------------------------------ incremental against an AD imitation (OpenLDAP)
class ImitationDirectory:
    """A directory that imitates AD the way the OpenLDAP benchmark setup does: uSNChanged on
    entries, highestCommittedUSN/dsServiceName/invocationId in the rootDSE, no NTDS Settings
    object, no defaultNamingContext, no Show Deleted control."""

    SERVICE = "CN=NTDS Settings,CN=LDAP1,CN=Servers,CN=Default-First-Site-Name,CN=Sites,CN=Configuration"

    def __init__(self) -> None:
        self.usn = 100
        self.users: dict[str, tuple[bytes, int, bool]] = {}  # sam -> (guid, uSNChanged, enabled)
        self.ou_guid = guid()
        self.seen: list[str] = []

    def change(self, sam: str, enabled: bool = True) -> None:
        self.usn += 1
        known = self.users.get(sam)
        self.users[sam] = (known[0] if known else guid(), self.usn, enabled)

    def _entry(self, sam: str) -> bytes:
        object_guid, _, _ = self.users[sam]
        return search_entry(
            f"CN={sam},{BASE}",
            {
                "objectGUID": [object_guid],
                "objectSid": [sid_to_bytes(f"{SID[:-4]}{1000 + len(sam)}")],
                "sAMAccountName": [sam.encode()],
            },
        )

    def answer(self, request: Request) -> list[bytes]:
        body, base = request.body, request.search_base
        since = 0
        if b"uSNChanged" in body:
            since = self.usn_asked(body)
        if base == "":
            self.seen.append("rootDSE")
            root = {
                "highestCommittedUSN": [str(self.usn).encode()],
                "dsServiceName": [self.SERVICE.encode()],
                "invocationId": [b"\x01" * 16],
            }
            return [search_entry("", root), search_done(0)]
        if base == self.SERVICE:
            return [search_done(32, "no such object")]
        if b"organizationalUnit" in body:
            self.seen.append("containers" + (" changed" if since else ""))
            entries = [] if since else [search_entry(BASE, {"objectGUID": [self.ou_guid]})]
            return [*entries, search_done(0)]
        wants_users = b"sAMAccountName" in body
        self.seen.append(
            ("users" if wants_users else "changed objects") + (f" since {since}" if since else "")
        )
        found = [
            sam
            for sam, (_, changed, enabled) in self.users.items()
            if changed >= since and (enabled or not wants_users)
        ]
        if wants_users:
            return [*(self._entry(sam) for sam in found), search_done(0)]
        return [
            *(search_entry(f"CN={sam},{BASE}", {"objectGUID": [self.users[sam][0]]}) for sam in found),
            search_done(0),
        ]

    @staticmethod
    def usn_asked(body: bytes) -> int:
        # The assertion value follows the attribute name in the BER filter: 04 len "uSNChanged" 04 len value.
        at = body.index(b"uSNChanged") + len(b"uSNChanged")
        length = body[at + 1]
        return int(body[at + 2 : at + 2 + length])


def test_incremental_read_against_an_ad_imitation() -> None:
    directory = ImitationDirectory()
    for sam in ("anna", "bob"):
        directory.change(sam)
    with fake_ldap(serve_searches(directory.answer)) as server:
        source = ActiveDirectorySource(
            config(
                url=f"ldap://127.0.0.1:{server.port}",
                netbios_domain="CONTOSO",
                user_filter="(objectClass=user)",
            )
        )
        first = source.refresh(None, deadline=time.monotonic() + 10)
        assert first.meta["read"] == "full" and first.meta["deletions"] == "next full read"
        assert first.meta["dc"] == {
            "service": ImitationDirectory.SERVICE,
            "invocation_id": "01" * 16,
            "usn": 102,
        }
        directory.change("bob", enabled=False)
        directory.change("carol")
        directory.seen.clear()
        second = source.refresh(first, deadline=time.monotonic() + 10)
    assert second.meta["read"] == "incremental"
    assert sorted(u.sam_account_name for u in users_of(second)) == ["anna", "carol"]
    assert directory.seen == ["rootDSE", "changed objects since 103", "containers changed", "users since 103"]
    assert second.meta["entries_read"] == 1 + 2 + 0 + 1  # rootDSE, bob and carol changed, carol in scope
