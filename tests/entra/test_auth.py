"""Authentication with msal against the simulated identity platform: secrets, certificates, errors."""

from __future__ import annotations

import datetime
import socket
from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from exporter.config import Secret
from exporter.sources.base import ConfigurationError, SourceError
from exporter.sources.graph import GraphClient
from tests.entra import tenant_data
from tests.entra.conftest import Harness
from tests.entra.graph_sim import GraphSimulator, SimApp

CERT_CLIENT_ID = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"


def _self_signed(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> x509.Certificate:
    """A certificate like the ones admins upload to an app registration (self-signed)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "intune-provisioning-exporter")])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .sign(key, hashes.SHA256())
    )


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, *certs: x509.Certificate) -> bytes:
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem + b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs)


def _thumbprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA1()).hex().upper()


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _auth_error(entra: Harness, **config: object) -> SourceError:
    with pytest.raises(SourceError) as failure:
        entra.users(entra.config(**config)).refresh(None)
    assert tenant_data.CLIENT_SECRET not in failure.value.message
    assert "wrong-secret-value" not in failure.value.message
    return failure.value


def test_wrong_secret(sim: GraphSimulator, entra: Harness) -> None:
    error = _auth_error(entra, client_secret=Secret("wrong-secret-value"))
    assert error.reason == "auth"
    assert "invalid_client" in error.message
    assert "AADSTS7000215" in error.message
    assert "client secret is wrong" in error.message
    assert sim.requests_to("users") == []


def test_unknown_tenant(sim: GraphSimulator, entra: Harness) -> None:
    error = _auth_error(entra, tenant_id="11111111-2222-3333-4444-555555555555")
    assert error.reason == "auth"
    assert "11111111-2222-3333-4444-555555555555" in error.message
    assert "tenant" in error.message


def test_unknown_client_id(sim: GraphSimulator, entra: Harness) -> None:
    error = _auth_error(entra, client_id="00000000-0000-0000-0000-00000000beef")
    assert error.reason == "auth"
    assert "AADSTS700016" in error.message


def test_scope_follows_graph_url(sim: GraphSimulator, entra: Harness) -> None:
    # Same server, other name: the token is asked for https://localhost:PORT, which this tenant
    # does not know, so the scope demonstrably comes from graph_url (sovereign clouds).
    error = _auth_error(entra, graph_url=f"https://localhost:{sim.port}")
    assert error.reason == "auth"
    assert "AADSTS500011" in error.message
    (token_request,) = sim.requests_to("token")
    assert token_request.form["scope"] == f"https://localhost:{sim.port}/.default"


def test_unreachable_authority_host(sim: GraphSimulator, entra: Harness) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    error = _auth_error(entra, authority_host=f"https://127.0.0.1:{closed_port}")
    assert error.reason == "network"
    assert "127.0.0.1" in error.message


def test_token_endpoint_outage_is_a_network_error_and_recovers(sim: GraphSimulator, entra: Harness) -> None:
    sim.add_fault("token", 1, "500")
    client = entra.client()
    source = entra.users(client=client)
    with pytest.raises(SourceError) as failure:
        source.refresh(None)
    assert failure.value.reason == "network"
    sim.reset()  # msal remembers 5xx answers for a few seconds; a new client retries at once
    sim.add_tenant(tenant_data.tenant())
    assert entra.users().refresh(None).records == 10


def test_certificate_credential(
    sim: GraphSimulator, entra: Harness, rsa_key: rsa.RSAPrivateKey, write_file: Callable[[str, bytes], str]
) -> None:
    cert = _self_signed(rsa_key)
    sim.tenants[tenant_data.TENANT_ID].apps[CERT_CLIENT_ID] = SimApp(CERT_CLIENT_ID, None, cert)
    path = write_file("app.pem", _pem(rsa_key, cert))
    config = entra.config(
        client_id=CERT_CLIENT_ID,
        client_secret=None,
        certificate_file=path,
        certificate_thumbprint=_thumbprint(cert),
    )
    assert entra.users(config).refresh(None).records == 10
    (token_request,) = sim.requests_to("token")
    assert token_request.status == 200
    assert (
        token_request.form["client_assertion_type"]
        == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    )
    assert "client_secret" not in token_request.form


def test_certificate_not_registered_on_the_app(
    sim: GraphSimulator, entra: Harness, rsa_key: rsa.RSAPrivateKey, write_file: Callable[[str, bytes], str]
) -> None:
    registered = _self_signed(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    sim.tenants[tenant_data.TENANT_ID].apps[CERT_CLIENT_ID] = SimApp(CERT_CLIENT_ID, None, registered)
    ours = _self_signed(rsa_key)
    path = write_file("other.pem", _pem(rsa_key, ours))
    error = _auth_error(
        entra,
        client_id=CERT_CLIENT_ID,
        client_secret=None,
        certificate_file=path,
        certificate_thumbprint=_thumbprint(ours),
    )
    assert error.reason == "auth"
    assert "AADSTS700027" in error.message


def test_certificate_file_problems_are_configuration_errors(
    entra: Harness, rsa_key: rsa.RSAPrivateKey, write_file: Callable[[str, bytes], str]
) -> None:
    cert = _self_signed(rsa_key)
    other = _self_signed(rsa.generate_private_key(public_exponent=65537, key_size=2048))

    def build(data: bytes, thumbprint: str) -> str:
        config = entra.config(
            client_secret=None, certificate_file=write_file("c.pem", data), certificate_thumbprint=thumbprint
        )
        with pytest.raises(ConfigurationError) as failure:
            GraphClient(config)
        return str(failure.value)

    assert "is not the certificate's SHA-1 thumbprint" in build(_pem(rsa_key, cert), _thumbprint(other))
    assert "no certificate in the file matches" in build(_pem(rsa_key, other), _thumbprint(other))
    assert "no PEM private key" in build(cert.public_bytes(serialization.Encoding.PEM), _thumbprint(cert))
    ec_key = ec.generate_private_key(ec.SECP256R1())
    assert "RSA" in build(_pem(ec_key, _self_signed(ec_key)), _thumbprint(_self_signed(ec_key)))


def test_certificate_with_chain_and_colon_thumbprint(
    sim: GraphSimulator, entra: Harness, rsa_key: rsa.RSAPrivateKey, write_file: Callable[[str, bytes], str]
) -> None:
    cert = _self_signed(rsa_key)
    unrelated = _self_signed(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    sim.tenants[tenant_data.TENANT_ID].apps[CERT_CLIENT_ID] = SimApp(CERT_CLIENT_ID, None, cert)
    thumbprint = ":".join(_thumbprint(cert)[i : i + 2] for i in range(0, 40, 2))
    path = write_file("chain.pem", _pem(rsa_key, unrelated, cert))
    config = entra.config(
        client_id=CERT_CLIENT_ID, client_secret=None, certificate_file=path, certificate_thumbprint=thumbprint
    )
    assert entra.users(config).refresh(None).records == 10


def test_ca_file_wins_over_requests_ca_bundle(
    sim: GraphSimulator,
    entra: Harness,
    monkeypatch: pytest.MonkeyPatch,
    write_file: Callable[[str, bytes], str],
) -> None:
    # The system bundle does not hold the simulator's CA: with REQUESTS_CA_BUNDLE honoured the
    # configured ca_file would be ignored and TLS would fail.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    monkeypatch.setenv("CURL_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    assert entra.users().refresh(None).records == 10


def test_without_ca_file_the_simulator_is_not_trusted(
    sim: GraphSimulator, entra: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", entra.ca_file)  # must not be used either
    error = _auth_error(entra, ca_file=None)
    assert error.reason == "network"
    assert "TLS" in error.message or "certificate" in error.message
