"""client_auth_type as exporter-toolkit (Go's crypto/tls) defines it, over real TLS handshakes.

``RequestClientCert`` and ``RequireAnyClientCert`` accept any client certificate without verifying
it, also a self-signed one or one from a CA nobody configured; only the ``...Verify...`` modes check
the chain against ``client_ca_file``. ``client_allowed_sans`` checks the client's own certificate.
"""

from __future__ import annotations

import datetime
import http.client
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

NO_CERT, SELF_SIGNED, STRANGER, TRUSTED = "no certificate", "self-signed", "unrelated CA", "client CA"
ACCEPTED, REFUSED = True, False


def self_signed(directory, name="self-signed.example"):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "self-signed.pem", directory / "self-signed.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return str(cert_path), str(key_path)


def client_context(certificates, kind):
    context = ssl.create_default_context(cafile=str(certificates.directory / "server-ca.pem"))
    if kind == SELF_SIGNED:
        context.load_cert_chain(*self_signed(certificates.directory))
    elif kind == STRANGER:
        context.load_cert_chain(*certificates.client_pair(certificates.stranger_ca, "stranger"))
    elif kind == TRUSTED:
        context.load_cert_chain(*certificates.client_pair(certificates.client_ca, "trusted"))
    return context


def fetch(port, context):
    """The status of GET /, or None when the TLS handshake or the connection was refused."""
    connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
    try:
        connection.request("GET", "/")
        return connection.getresponse().status
    except (ssl.SSLError, ConnectionError):
        return None
    finally:
        connection.close()


def web_config(tmp_path, certificates, mode, extra=""):
    directory = certificates.directory
    text = (
        "tls_server_config:\n"
        f"  cert_file: {directory / 'server.pem'}\n  key_file: {directory / 'server.key'}\n"
        f"  client_auth_type: {mode}\n{extra}"
    )
    if "Verify" in mode:
        text += f"  client_ca_file: {directory / 'client-ca.pem'}\n"
    path = tmp_path / "web.yml"
    path.write_text(text)
    return str(path)


EXPECTED = {
    "NoClientCert": {NO_CERT: ACCEPTED, SELF_SIGNED: ACCEPTED, STRANGER: ACCEPTED, TRUSTED: ACCEPTED},
    "RequestClientCert": {NO_CERT: ACCEPTED, SELF_SIGNED: ACCEPTED, STRANGER: ACCEPTED, TRUSTED: ACCEPTED},
    "RequireAnyClientCert": {NO_CERT: REFUSED, SELF_SIGNED: ACCEPTED, STRANGER: ACCEPTED, TRUSTED: ACCEPTED},
    "RequireClientCert": {NO_CERT: REFUSED, SELF_SIGNED: ACCEPTED, STRANGER: ACCEPTED, TRUSTED: ACCEPTED},
    "VerifyClientCertIfGiven": {
        NO_CERT: ACCEPTED,
        SELF_SIGNED: REFUSED,
        STRANGER: REFUSED,
        TRUSTED: ACCEPTED,
    },
    "RequireAndVerifyClientCert": {
        NO_CERT: REFUSED,
        SELF_SIGNED: REFUSED,
        STRANGER: REFUSED,
        TRUSTED: ACCEPTED,
    },
}


@pytest.mark.parametrize("mode", list(EXPECTED))
def test_client_auth_type(start_server, certificates, tmp_path, mode):
    server = start_server(web_config(tmp_path, certificates, mode))
    port = server.server_address[1]
    outcome = {kind: fetch(port, client_context(certificates, kind)) == 200 for kind in EXPECTED[mode]}
    assert outcome == EXPECTED[mode]


def test_request_client_cert_with_a_ca_still_accepts_any(start_server, certificates, tmp_path):
    """With RequestClientCert a client_ca_file only names the issuers the server suggests."""
    path = web_config(
        tmp_path,
        certificates,
        "RequestClientCert",
        f"  client_ca_file: {certificates.directory / 'client-ca.pem'}\n",
    )
    port = start_server(path).server_address[1]
    assert fetch(port, client_context(certificates, STRANGER)) == 200


def test_client_allowed_sans(start_server, certificates, tmp_path):
    extra = "  client_allowed_sans: [scraper.example, prometheus@example.com]\n"
    port = start_server(
        web_config(tmp_path, certificates, "RequireAndVerifyClientCert", extra)
    ).server_address[1]

    def with_cert(*sans):
        context = ssl.create_default_context(cafile=str(certificates.directory / "server-ca.pem"))
        context.load_cert_chain(*certificates.client_pair(certificates.client_ca, "san", *sans))
        return fetch(port, context)

    assert with_cert("scraper.example") == 200
    assert with_cert("other.example", "prometheus@example.com") == 200
    assert with_cert("other.example") is None
    assert fetch(port, client_context(certificates, NO_CERT)) is None


def test_tls_versions(start_server, certificates, tmp_path):
    port = start_server(
        web_config(tmp_path, certificates, "NoClientCert", "  min_version: TLS13\n")
    ).server_address[1]
    old = client_context(certificates, NO_CERT)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    assert fetch(port, old) is None
    assert fetch(port, client_context(certificates, NO_CERT)) == 200
