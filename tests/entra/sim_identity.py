"""The identity platform part of the simulator: OpenID metadata and the client-credentials token endpoint.

Client secrets and client assertions (JWT signed with the app's certificate: signature, ``x5t`` /
``x5t#S256`` thumbprint, audience, issuer and lifetime) are checked; errors carry the AADSTS codes that
Microsoft Entra ID uses (``invalid_client``/AADSTS7000215, ``invalid_tenant``/AADSTS90002, ...).
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.entra.sim_model import SimApp

if TYPE_CHECKING:
    from tests.entra.graph_sim import GraphSimulator
    from tests.entra.sim_http import Exchange


def openid_configuration(sim: GraphSimulator, exchange: Exchange, tenant_id: str) -> None:
    if tenant_id not in sim.tenants:
        exchange.aad_error(400, "invalid_tenant", 90002, f"Tenant '{tenant_id}' not found.")
        return
    base = f"{sim.base_url}/{tenant_id}"
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


def token(sim: GraphSimulator, exchange: Exchange, tenant_id: str) -> None:
    form = exchange.form
    tenant = sim.tenants.get(tenant_id)
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
    if form.get("scope") != f"{sim.resource_url or sim.base_url}/.default":
        exchange.aad_error(
            400,
            "invalid_resource",
            500011,
            f"The resource principal named {form.get('scope')} was not found.",
        )
        return
    problem = _check_credential(app, form, f"{sim.base_url}/{tenant_id}/oauth2/v2.0/token")
    if problem is not None:
        exchange.aad_error(401, "invalid_client", *problem)
        return
    access_token = sim.issue_token(tenant_id, app)
    exchange.send_json(
        200,
        {
            "token_type": "Bearer",
            "expires_in": sim.token_lifetime,
            "ext_expires_in": sim.token_lifetime,
            "access_token": access_token,
        },
    )


def _check_credential(app: SimApp, form: dict[str, str], audience: str) -> tuple[int, str] | None:
    if "client_secret" in form:
        if app.secret is None or not secrets.compare_digest(form["client_secret"], app.secret):
            return 7000215, f"Invalid client secret provided for app '{app.client_id}'."
        return None
    if "client_assertion" in form:
        if form.get("client_assertion_type") != "urn:ietf:params:oauth:client-assertion-type:jwt-bearer":
            return 7000219, "client_assertion_type is not jwt-bearer."
        problem = verify_assertion(form["client_assertion"], app, audience)
        return None if problem is None else (700027, f"Client assertion failed validation: {problem}.")
    return 7000218, "The request body must contain 'client_assertion' or 'client_secret'."


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def verify_assertion(assertion: str, app: SimApp, audience: str) -> str | None:
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
