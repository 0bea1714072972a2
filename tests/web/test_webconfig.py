"""The web config file: exporter-toolkit's format, every mistake named by key and exit 2 at start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import bcrypt
import pytest

from exporter.webconfig import WebConfigError, load_web_config

ROOT = Path(__file__).resolve().parents[2]
HASH = bcrypt.hashpw(b"secret", bcrypt.gensalt(rounds=4)).decode()
TLS = "tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n"


@pytest.fixture
def web_dir(certificates, tmp_path):
    """A directory with the server certificate, key and client CA beside the config file."""
    for name in ("server.pem", "server.key", "client-ca.pem"):
        (tmp_path / name).write_bytes((certificates.directory / name).read_bytes())
    return tmp_path


def problems_of(directory: Path, text: str | bytes) -> list[str]:
    path = directory / "web.yml"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    with pytest.raises(WebConfigError) as info:
        load_web_config(str(path))
    return info.value.problems


BAD_CONFIGS = [
    ("tls_server_config: [cert.pem]\n", "tls_server_config: must be a mapping"),
    ("tls_server_config: server.pem\n", "tls_server_config: must be a mapping"),
    (
        "tls_server_config:\n  cert_file: [a.pem]\n  key_file: server.key\n",
        "tls_server_config.cert_file: must be a string",
    ),
    ("http_server_config:\n  headers: [X-Frame-Options]\n", "http_server_config.headers: must be a mapping"),
    ("basic_auth_users: [prometheus]\n", "basic_auth_users: must be a mapping"),
    ("basic_auth_users:\n  prometheus: $2b$10$short\n", "basic_auth_users.prometheus: must be a bcrypt hash"),
    (
        f"basic_auth_users:\n  prometheus: '{HASH[:-1]}'\n",
        "basic_auth_users.prometheus: must be a bcrypt hash",
    ),
    (
        f"basic_auth_users:\n  prometheus: '{HASH[:4]}99{HASH[6:]}'\n",
        "basic_auth_users.prometheus: must be a bcrypt hash",
    ),
    (
        "basic_auth_users:\n  prometheus: plain-password\n",
        "basic_auth_users.prometheus: must be a bcrypt hash",
    ),
    ("basic_auth_users:\n  prometheus: 12\n", "basic_auth_users.prometheus: must be a string"),
    (f"basic_auth_users:\n  'a:b': '{HASH}'\n", "basic_auth_users.a:b: a user name cannot"),
    ("tls_server_confg: {}\n", "tls_server_confg: unknown key (did you mean tls_server_config?)"),
    (TLS + "  cert_fil: x\n", "tls_server_config.cert_fil: unknown key (did you mean cert_file?)"),
    ("http_server_config:\n  header: {}\n", "http_server_config.header: unknown key (did you mean headers?)"),
    (
        TLS + "  client_auth_type: Sometimes\n",
        "tls_server_config.client_auth_type: must be one of NoClientCert,",
    ),
    (
        TLS + "  min_version: TLS14\n",
        "tls_server_config.min_version: must be one of TLS10, TLS11, TLS12, TLS13",
    ),
    (TLS + "  max_version: 1.3\n", "tls_server_config.max_version: must be a string"),
    (
        TLS + "  min_version: TLS13\n  max_version: TLS12\n",
        "tls_server_config.min_version: TLS13 is above max_version TLS12",
    ),
    (TLS + "  cipher_suites: [TLS_FAST]\n", "tls_server_config.cipher_suites[0]: must be one of"),
    (
        TLS + "  curve_preferences: [P-256]\n",
        "tls_server_config.curve_preferences[0]: must be one of CurveP256",
    ),
    (
        TLS + "  prefer_server_cipher_suites: maybe\n",
        "tls_server_config.prefer_server_cipher_suites: must be true or false",
    ),
    (
        "tls_server_config:\n  cert_file: missing.pem\n  key_file: server.key\n",
        "tls_server_config.cert_file: file not found: missing.pem",
    ),
    ("tls_server_config:\n  cert_file: server.pem\n", "tls_server_config.key_file: required"),
    ("tls_server_config:\n  key_file: server.key\n", "tls_server_config.cert_file: required"),
    (
        "tls_server_config:\n  client_auth_type: RequireAnyClientCert\n",
        "tls_server_config.cert_file: required",
    ),
    (
        "tls_server_config:\n  cert_file: server.key\n  key_file: server.key\n",
        "tls_server_config.cert_file: no PEM certificate",
    ),
    (
        "tls_server_config:\n  cert_file: server.pem\n  key_file: server.pem\n",
        "tls_server_config.key_file: no PEM private key",
    ),
    (
        "tls_server_config:\n  cert_file: /dev/zero\n  key_file: server.key\n",
        "tls_server_config.cert_file: cannot read /dev/zero: not a regular file",
    ),
    (
        "tls_server_config:\n  cert_file: /\n  key_file: server.key\n",
        "tls_server_config.cert_file: cannot read /",
    ),
    (TLS + "  cert: inline\n", "tls_server_config.cert_file: give either cert or cert_file, not both"),
    (
        TLS + "  client_auth_type: RequireAndVerifyClientCert\n",
        "tls_server_config.client_ca_file: required to verify client certificates",
    ),
    (
        TLS + "  client_auth_type: VerifyClientCertIfGiven\n",
        "tls_server_config.client_ca_file: required to verify",
    ),
    (
        TLS + "  client_ca_file: client-ca.pem\n",
        "tls_server_config.client_ca_file: given, but client_auth_type NoClientCert",
    ),
    (
        TLS + "  client_auth_type: RequestClientCert\n  client_ca_file: nope.pem\n",
        "tls_server_config.client_ca_file: file not found: nope.pem",
    ),
    (
        TLS + "  client_allowed_sans: [a.example]\n",
        "tls_server_config.client_allowed_sans: needs a client_auth_type",
    ),
    (
        "http_server_config:\n  headers:\n    X-Powered-By: me\n",
        "http_server_config.headers.X-Powered-By: cannot be configured",
    ),
    (
        "http_server_config:\n  headers:\n    X-Frame-Options: allow\n",
        "http_server_config.headers.X-Frame-Options: must be one of deny, sameorigin",
    ),
    ("http_server_config:\n  http2: yes please\n", "http_server_config.http2: must be true or false"),
    ("rate_limit:\n  interval: 1 second\n  burst: 5\n", "rate_limit.interval: must be a duration"),
    ("rate_limit:\n  interval: 1s\n  burst: 0\n", "rate_limit.burst: must be at least 1"),
    ("rate_limit:\n  interval: 1s\n", "rate_limit.burst: required"),
    ("basic_auth_users:\n  a: x\n  a: y\n", "not valid YAML (line 3): duplicate key 'a'"),
    ("tls_server_config: [\n", "not valid YAML"),
    ("- tls_server_config\n", "must be a mapping of keys"),
    (b"basic_auth_users:\n  caf\xe9: x\n", "not UTF-8 text (byte"),
    (b"\xff\xfe\x00garbage", "not UTF-8 text (byte"),
]


@pytest.mark.parametrize(("text", "expected"), BAD_CONFIGS)
def test_bad_web_config_names_the_key(web_dir, text, expected):
    problems = problems_of(web_dir, text)
    assert any(p.startswith("--web.config.file: ") and expected in p for p in problems), problems


def test_unreadable_and_missing_files(tmp_path):
    with pytest.raises(WebConfigError, match=r"cannot read .*nope\.yml: No such file"):
        load_web_config(str(tmp_path / "nope.yml"))
    fifo = tmp_path / "fifo.yml"
    os.mkfifo(fifo)  # must not block waiting for a writer
    with pytest.raises(WebConfigError, match="not a regular file"):
        load_web_config(str(fifo))


def test_good_configs(web_dir, certificates):
    empty = web_dir / "empty.yml"
    empty.write_text("")
    assert load_web_config(str(empty)).tls is None
    pem = (web_dir / "server.pem").read_text()
    key = (web_dir / "server.key").read_text()
    inline = web_dir / "inline.yml"
    indent = "\n    ".join
    inline.write_text(
        "tls_server_config:\n"
        f"  cert: |\n    {indent(pem.splitlines())}\n"
        f"  key: |\n    {indent(key.splitlines())}\n"
        "  client_auth_type: RequireClientCert\n"
        "  min_version: TLS13\n  max_version: TLS13\n"
        "  cipher_suites: [TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, TLS_AES_128_GCM_SHA256]\n"
        "  prefer_server_cipher_suites: false\n"
        "  curve_preferences: [X25519, CurveP256]\n"
        "http_server_config:\n  http2: false\n  headers:\n    X-Content-Type-Options: nosniff\n    X-XSS-Protection: ''\n"
        f"basic_auth_users:\n  1234: '{HASH}'\n"
        "rate_limit:\n  interval: 1.5s\n  burst: 3\n"
    )
    config = load_web_config(str(inline))
    assert config.tls is not None and config.tls.settings.client_auth_type == "RequireClientCert"
    assert dict(config.headers) == {"X-Content-Type-Options": "nosniff"}  # blank means unset
    assert set(config.basic_auth_users) == {"1234"}
    assert (
        config.rate_limit is not None and config.rate_limit.interval == 1.5 and config.rate_limit.burst == 3
    )
    off = web_dir / "off.yml"
    off.write_text("rate_limit:\n  interval: 0\n  burst: 0\n")
    assert load_web_config(str(off)).rate_limit is None  # exporter-toolkit: interval 0 disables it


def test_secrets_never_in_messages(web_dir):
    problems = problems_of(
        web_dir, "tls_server_config:\n  cert_file: server.pem\n  key: not-a-key-but-secret\n"
    )
    assert problems and not any("not-a-key-but-secret" in p for p in problems)


@pytest.mark.parametrize(
    "text",
    [
        "tls_server_config: [a]\n",
        "tls_server_config:\n  cert_file: [a]\n",
        "http_server_config:\n  headers: [a]\n",
        "basic_auth_users:\n  prometheus: $2b$10$short\n",
        "nonsense: 1\n",
    ],
)
def test_cli_exits_2_without_traceback(tmp_path, text):
    web = tmp_path / "web.yml"
    web.write_text(text)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "exporter",
            "--demo",
            "--web.listen-address",
            "127.0.0.1:0",
            "--web.config.file",
            str(web),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 2, result.stderr
    assert "--web.config.file: " in result.stderr and "Traceback" not in result.stderr
