"""The exporter-toolkit web configuration file (``--web.config.file``): TLS, basic auth, headers,
rate limit.

The format and its meaning follow exporter-toolkit's ``docs/web-configuration.md`` so that a file
written for node_exporter works here. The structure is checked by pydantic models (unknown keys and
wrong types are errors); what needs the file system or a library (certificate files, bcrypt hashes)
is checked at load time too, so that every mistake stops the start with exit 2 and a message naming
the key, instead of failing on the first request.
"""

from __future__ import annotations

import difflib
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import bcrypt
import yaml
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    PlainValidator,
    SecretStr,
    ValidationError,
)

from exporter.tls import (
    CIPHER_SUITES,
    CLIENT_AUTH_TYPES,
    CURVES,
    TLS_VERSIONS,
    VERIFYING_AUTH_TYPES,
    ServerTLS,
    TLSConfigError,
    TLSSettings,
)

PREFIX = "--web.config.file"
MAX_FILE_BYTES = 1 << 20  # certificates, keys and the config itself are a few KiB
# exporter-toolkit allows only these response headers, some with a fixed set of values.
HEADER_VALUES: dict[str, tuple[str, ...]] = {
    "Strict-Transport-Security": (),
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": (),
    "Content-Security-Policy": (),
}
_BCRYPT = re.compile(rb"\$2[abxy]?\$(\d\d)\$[./A-Za-z0-9]{53}")
_GO_DURATION = re.compile(r"(?:(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h))+")
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class WebConfigError(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class RateLimit:
    """A token bucket: ``burst`` requests at once, then one more every ``interval`` seconds."""

    interval: float
    burst: int


@dataclass(frozen=True)
class WebConfig:
    tls: ServerTLS | None = None
    basic_auth_users: Mapping[str, bytes] = field(default_factory=dict)  # user -> bcrypt hash
    headers: Mapping[str, str] = field(default_factory=dict)
    rate_limit: RateLimit | None = None


# --- field checks (pydantic reports each under its key path) ------------------------------------


def _one_of(choices: tuple[str, ...], unset: str | None = None) -> AfterValidator:
    def check(value: str) -> str:
        if value not in choices and value != unset:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return value

    return AfterValidator(check)


def _bcrypt_hash(value: str) -> str:
    """Reject what bcrypt cannot use: today's requests would all fail with it, silently. The
    library parses the prefix and salt (at the cheapest cost, so loading stays fast)."""
    hashed = value.encode()
    match = _BCRYPT.fullmatch(hashed)
    if match is None or not 4 <= int(match.group(1)) <= 31:
        raise ValueError(
            "must be a bcrypt hash ($2y$10$ and 53 more characters, as `htpasswd -nBC 10` prints)"
        )
    try:
        bcrypt.hashpw(b"probe", hashed[:4] + b"04" + hashed[6:29])
    except ValueError:
        raise ValueError("must be a bcrypt hash (bcrypt cannot read its salt)") from None
    return value


def _user_names_as_text(value: Any) -> Any:
    # YAML reads `1234: hash` with an integer key; exporter-toolkit (Go) takes it as the name "1234".
    if isinstance(value, dict):
        return {str(k) if isinstance(k, int | float | bool) else k: v for k, v in value.items()}
    return value


def _user_name(value: str) -> str:
    if ":" in value or not value:
        raise ValueError(
            "a user name cannot be empty or contain ':' (basic auth separates user and password by ':')"
        )
    return value


def _go_duration(value: object) -> str:
    # A bare 0 (YAML reads it as a number) disables the limiter; other numbers have no unit.
    if value == 0 and not isinstance(value, bool):
        return "0"
    if not isinstance(value, str) or (value != "0" and _GO_DURATION.fullmatch(value) is None):
        raise ValueError("must be a duration such as 1s, 500ms or 1m30s")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, hide_input_in_errors=True)


CipherName = Annotated[str, _one_of(tuple(CIPHER_SUITES))]
CurveName = Annotated[str, _one_of(tuple(CURVES))]
TLSVersionName = Annotated[str, _one_of(tuple(TLS_VERSIONS))]


class TLSServerSection(_Section):
    cert: str | None = None
    key: SecretStr | None = None
    client_ca: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    client_auth_type: Annotated[str, _one_of(CLIENT_AUTH_TYPES, unset="")] | None = None
    client_ca_file: str | None = None
    client_allowed_sans: list[str] | None = None
    min_version: TLSVersionName | None = None
    max_version: TLSVersionName | None = None
    cipher_suites: list[CipherName] | None = None
    prefer_server_cipher_suites: bool | None = None
    curve_preferences: list[CurveName] | None = None

    def enabled(self) -> bool:
        """exporter-toolkit serves TLS as soon as any of these is set (and then needs cert and key)."""
        return any(
            (self.cert, self.key, self.client_ca, self.cert_file, self.key_file, self.client_ca_file)
        ) or bool(self.client_auth_type)


class HTTPServerSection(_Section):
    http2: bool | None = None  # accepted for compatibility; this server speaks HTTP/1.1
    headers: dict[str, str | None] | None = None


class RateLimitSection(_Section):
    interval: Annotated[str, PlainValidator(_go_duration)]
    burst: int


class WebConfigFile(_Section):
    tls_server_config: TLSServerSection | None = None
    http_server_config: HTTPServerSection | None = None
    basic_auth_users: (
        Annotated[
            dict[Annotated[str, AfterValidator(_user_name)], Annotated[str, AfterValidator(_bcrypt_hash)]],
            BeforeValidator(_user_names_as_text),
        ]
        | None
    ) = None
    rate_limit: RateLimitSection | None = None


# --- loading ------------------------------------------------------------------------------------


def load_web_config(path: str | None) -> WebConfig:
    """Parse the exporter-toolkit web config format; raise WebConfigError naming each bad key."""
    if not path:
        return WebConfig()
    data = _read_yaml(Path(path))
    try:
        parsed = WebConfigFile.model_validate(data)
    except ValidationError as exc:
        raise WebConfigError([f"{PREFIX}: {problem}" for problem in describe_errors(exc)]) from None
    problems: list[str] = []
    tls = _server_tls(parsed.tls_server_config, Path(path).parent, problems)
    headers = _headers(parsed.http_server_config, problems)
    rate_limit = _rate_limit(parsed.rate_limit, problems)
    if problems:
        raise WebConfigError([f"{PREFIX}: {problem}" for problem in problems])
    users = {user: hashed.encode() for user, hashed in (parsed.basic_auth_users or {}).items()}
    return WebConfig(tls=tls, basic_auth_users=users, headers=headers, rate_limit=rate_limit)


def _read_yaml(path: Path) -> Any:
    try:
        text = read_small_file(path).decode("utf-8")
    except OSError as exc:
        raise WebConfigError([f"{PREFIX}: cannot read {path}: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise WebConfigError([f"{PREFIX}: {path}: not UTF-8 text (byte {exc.start})"]) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise WebConfigError([f"{PREFIX}: not valid YAML{line}: {problem}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise WebConfigError(
            [f"{PREFIX}: must be a mapping of keys (tls_server_config, basic_auth_users, ...)"]
        )
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML would keep the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _UniqueKeyLoader.construct_mapping
)


def read_small_file(path: Path) -> bytes:
    """Read a regular file of at most MAX_FILE_BYTES; a FIFO or device would block or never end."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # opening a FIFO must not wait for a writer
    with os.fdopen(descriptor, "rb") as handle:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise OSError(0, "not a regular file")
        data = handle.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise OSError(0, f"larger than {MAX_FILE_BYTES} bytes")
    return data


_MESSAGES = {
    "missing": "required",
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "int_type": "must be an integer",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
    "list_type": "must be a list",
}


def describe_errors(error: ValidationError) -> list[str]:
    """pydantic's errors as ``key.path: message`` lines, with a did-you-mean for unknown keys."""
    problems = []
    for item in error.errors(include_url=False, include_input=False):
        location = _key_path(item["loc"])
        kind = item["type"]
        if kind == "extra_forbidden":
            message = "unknown key" + _did_you_mean(error, item["loc"])
        elif kind == "value_error":
            message = str(item.get("ctx", {}).get("error", item["msg"]))
        else:
            message = _MESSAGES.get(kind, item["msg"])
        problems.append(f"{location}: {message}" if location else message)
    return problems


def _key_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if part == "[key]":
            continue
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def _did_you_mean(error: ValidationError, loc: tuple[int | str, ...]) -> str:
    model: Any = WebConfigFile
    for part in loc[:-1]:
        fields = getattr(model, "model_fields", {})
        if part not in fields:
            return ""
        model = fields[part].annotation
        model = next(
            (arg for arg in getattr(model, "__args__", (model,)) if hasattr(arg, "model_fields")), None
        )
    known = list(getattr(model, "model_fields", {}))
    close = difflib.get_close_matches(str(loc[-1]), known, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


# --- checks that need files or libraries --------------------------------------------------------


def _server_tls(section: TLSServerSection | None, base: Path, problems: list[str]) -> ServerTLS | None:
    if section is None or not section.enabled():
        return None
    key = "tls_server_config"
    before = len(problems)
    mode = section.client_auth_type or "NoClientCert"
    chain = _certificates(section.cert, section.cert_file, "cert", base, problems, required=True)
    private_key = _private_key(section, base, problems)
    client_cas = _certificates(section.client_ca, section.client_ca_file, "client_ca", base, problems)
    if client_cas and mode == "NoClientCert":
        problems.append(
            f"{key}.client_ca_file: given, but client_auth_type NoClientCert asks for no certificate"
        )
    if mode in VERIFYING_AUTH_TYPES and not client_cas and not _mentions(problems[before:], "client_ca"):
        problems.append(f"{key}.client_ca_file: required to verify client certificates ({mode})")
    if section.client_allowed_sans is not None and mode == "NoClientCert":
        problems.append(f"{key}.client_allowed_sans: needs a client_auth_type that asks for a certificate")
    min_version, max_version = section.min_version or "TLS12", section.max_version or "TLS13"
    if TLS_VERSIONS[min_version] > TLS_VERSIONS[max_version]:
        problems.append(f"{key}.min_version: {min_version} is above max_version {max_version}")
    if len(problems) > before or not chain or private_key is None:
        return None
    settings = TLSSettings(
        chain=chain,
        key=private_key,
        client_auth_type=mode,
        client_cas=client_cas,
        client_allowed_sans=None
        if section.client_allowed_sans is None
        else frozenset(section.client_allowed_sans),
        min_version=min_version,
        max_version=max_version,
        cipher_suites=tuple(section.cipher_suites or ()),
        prefer_server_cipher_suites=section.prefer_server_cipher_suites is not False,
        curve_preferences=tuple(section.curve_preferences or ()),
    )
    try:
        return ServerTLS(settings)
    except TLSConfigError as exc:
        problems.append(f"{key}.{exc}")
        return None


def _mentions(problems: list[str], name: str) -> bool:
    return any(f".{name}" in problem for problem in problems)


def _pem_source(
    inline: str | None, file: str | None, name: str, base: Path, problems: list[str], required: bool
) -> tuple[str, bytes] | None:
    """The PEM text of ``name`` (inline) or ``name_file``, with the key to name in messages."""
    key = f"tls_server_config.{name}"
    if inline and file:
        problems.append(f"{key}_file: give either {name} or {name}_file, not both")
        return None
    if inline:
        return key, inline.encode()
    if not file:
        if required:
            problems.append(f"{key}_file: required (or {name} inline)")
        return None
    resolved = Path(file) if Path(file).is_absolute() else base / file
    try:
        return f"{key}_file", read_small_file(resolved)
    except FileNotFoundError:
        problems.append(f"{key}_file: file not found: {file}")
    except OSError as exc:
        problems.append(f"{key}_file: cannot read {file}: {exc.strerror or exc}")
    return None


def _certificates(
    inline: str | None, file: str | None, name: str, base: Path, problems: list[str], required: bool = False
) -> list[x509.Certificate]:
    source = _pem_source(inline, file, name, base, problems, required)
    if source is None:
        return []
    key, pem = source
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError:
        certificates = []
    if not certificates:
        problems.append(f"{key}: no PEM certificate could be read")
    return certificates


def _private_key(section: TLSServerSection, base: Path, problems: list[str]) -> Any:
    inline = section.key.get_secret_value() if section.key else None
    source = _pem_source(inline, section.key_file, "key", base, problems, required=True)
    if source is None:
        return None
    key, pem = source
    try:
        return load_pem_private_key(pem, password=None)
    except TypeError:
        problems.append(f"{key}: the private key is encrypted; give an unencrypted PEM key")
    except (ValueError, UnsupportedAlgorithm):
        problems.append(f"{key}: no PEM private key could be read")
    return None


def _headers(section: HTTPServerSection | None, problems: list[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in ((section.headers if section else None) or {}).items():
        key = f"http_server_config.headers.{name}"
        if name not in HEADER_VALUES:
            problems.append(f"{key}: cannot be configured (allowed: {', '.join(HEADER_VALUES)})")
        elif not value:
            continue  # blank means unset
        elif HEADER_VALUES[name] and value not in HEADER_VALUES[name]:
            problems.append(f"{key}: must be one of {', '.join(HEADER_VALUES[name])}")
        elif any(char in value for char in "\r\n\0"):
            problems.append(f"{key}: must be one line")
        else:
            headers[name] = value
    return headers


def _rate_limit(section: RateLimitSection | None, problems: list[str]) -> RateLimit | None:
    if section is None:
        return None
    interval = sum(
        float(number) * _GO_UNITS[unit]
        for number, unit in re.findall(r"([\d.]+)(ns|us|µs|ms|s|m|h)", section.interval)
    )
    if interval == 0:
        return None  # exporter-toolkit: an interval of 0 disables the limiter
    if section.burst < 1:
        problems.append("rate_limit.burst: must be at least 1 (with 0 no request would ever be served)")
        return None
    return RateLimit(interval=interval, burst=section.burst)
