"""The exporter-toolkit web configuration file (``--web.config.file``): TLS, basic auth, headers."""

from __future__ import annotations

import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

_TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
_CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_OPTIONAL,
    "RequireAnyClientCert": ssl.CERT_REQUIRED,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}


class WebConfigError(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class WebConfig:
    ssl_context: ssl.SSLContext | None = None
    basic_auth_users: Mapping[str, bytes] = field(default_factory=dict)  # user -> bcrypt hash
    headers: Mapping[str, str] = field(default_factory=dict)


def load_web_config(path: str | None) -> WebConfig:
    """Parse the exporter-toolkit web config format; raise WebConfigError naming each bad key."""
    if not path:
        return WebConfig()
    prefix = "--web.config.file"
    file = Path(path)
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise WebConfigError([f"{prefix}: cannot read {path}: {exc.strerror}"]) from None
    except yaml.YAMLError:
        raise WebConfigError([f"{prefix}: not valid YAML"]) from None
    problems: list[str] = []
    if not isinstance(data, dict):
        raise WebConfigError([f"{prefix}: must be a mapping"])
    for key in data:
        if key not in ("tls_server_config", "basic_auth_users", "http_server_config"):
            problems.append(f"{prefix}: {key}: unknown key")
    context = _tls_context(data.get("tls_server_config"), file.parent, problems)
    users: dict[str, bytes] = {}
    raw_users = data.get("basic_auth_users") or {}
    if not isinstance(raw_users, dict):
        problems.append(f"{prefix}: basic_auth_users: must map user names to bcrypt hashes")
    else:
        for user, hashed in raw_users.items():
            if not isinstance(hashed, str) or not re.match(r"^\$2[abxy]?\$\d\d\$", hashed):
                problems.append(f"{prefix}: basic_auth_users.{user}: must be a bcrypt hash")
            else:
                users[str(user)] = hashed.encode()
    headers: dict[str, str] = {}
    server = data.get("http_server_config") or {}
    if isinstance(server, dict):
        for key in server:
            if key not in ("headers", "http2"):
                problems.append(f"{prefix}: http_server_config.{key}: unknown key")
        for name, value in (server.get("headers") or {}).items():
            headers[str(name)] = str(value)
    if problems:
        raise WebConfigError(problems)
    return WebConfig(ssl_context=context, basic_auth_users=users, headers=headers)


def _tls_context(raw: Any, base: Path, problems: list[str]) -> ssl.SSLContext | None:
    if not raw:
        return None
    prefix = "--web.config.file: tls_server_config"
    allowed = {"cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version", "max_version"}
    for key in raw:
        if key not in allowed:
            problems.append(f"{prefix}.{key}: unknown key")

    def path_of(key: str, required: bool) -> str | None:
        value = raw.get(key)
        if not value:
            if required:
                problems.append(f"{prefix}.{key}: required")
            return None
        resolved = Path(value) if Path(value).is_absolute() else base / value
        if not resolved.is_file():
            problems.append(f"{prefix}.{key}: file not found: {value}")
            return None
        return str(resolved)

    cert, key = path_of("cert_file", True), path_of("key_file", True)
    client_ca = path_of("client_ca_file", False)
    auth_type = raw.get("client_auth_type", "NoClientCert")
    if auth_type not in _CLIENT_AUTH:
        problems.append(f"{prefix}.client_auth_type: must be one of {', '.join(_CLIENT_AUTH)}")
        auth_type = "NoClientCert"
    needs_ca = auth_type in ("RequireAndVerifyClientCert", "VerifyClientCertIfGiven")
    if needs_ca and client_ca is None and not any(p.startswith(f"{prefix}.client_ca_file") for p in problems):
        problems.append(f"{prefix}.client_ca_file: required for client_auth_type {auth_type}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    for bound in ("min_version", "max_version"):
        if raw.get(bound) is None:
            continue
        if raw[bound] not in _TLS_VERSIONS:
            problems.append(f"{prefix}.{bound}: must be one of {', '.join(_TLS_VERSIONS)}")
        else:
            setattr(
                context,
                "minimum_version" if bound == "min_version" else "maximum_version",
                _TLS_VERSIONS[raw[bound]],
            )
    if raw.get("min_version") is None:
        context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert and key:
        try:
            context.load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as exc:
            problems.append(f"{prefix}.cert_file: cannot load certificate and key: {exc}")
    context.verify_mode = _CLIENT_AUTH[auth_type]
    if client_ca:
        try:
            context.load_verify_locations(client_ca)
        except (ssl.SSLError, OSError) as exc:
            problems.append(f"{prefix}.client_ca_file: cannot load: {exc}")
    return context
