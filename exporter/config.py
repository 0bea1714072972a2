"""The YAML configuration, validated into typed, immutable objects.

Every problem is collected with its key path (``estates[0].entra.client_id: required``) so that
``--config.check`` can list all of them at once. Values may reference the environment with
``${NAME}``; every secret has a ``*_file`` twin. Secret values are wrapped in :class:`Secret`, whose
``repr``/``str`` never shows the value, and are never copied into a problem message.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from exporter.durations import format_duration, parse_duration
from exporter.model import WAITING_STAGES, Stage

DEFAULT_USER_FILTER = (
    "(&(objectCategory=person)(objectClass=user)(!(userAccountControl:1.2.840.113556.1.4.803:=2)))"
)
DEFAULT_STUCK_AFTER: dict[Stage, float] = {
    "ad_created": 2 * 3600.0,
    "entra_synced": 3600.0,
    "cm_discovered": 4 * 3600.0,
    "in_intune_collection": 3600.0,
    "connector_synced": 3600.0,
}
UserLabel = Literal["upn", "sam", "hash", "none"]
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_ESTATE_NAME = re.compile(r"^[A-Za-z0-9_.:-]+$")


class Secret:
    """A secret string; it prints as ``<secret>`` so it cannot leak through logs or errors."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    @property
    def value(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret(<secret>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


class ConfigError(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class ActiveDirectoryConfig:
    url: str
    bind_user: str
    bind_password: Secret
    search_bases: tuple[str, ...]
    start_tls: bool = False
    authentication: Literal["simple", "ntlm"] = "simple"
    ca_file: str | None = None
    tls_verify: bool = True
    user_filter: str = DEFAULT_USER_FILTER
    source_anchor: Literal["objectGUID", "mS-DS-ConsistencyGuid"] = "objectGUID"
    page_size: int = 1000
    timeout: float = 60.0
    netbios_domain: str | None = None  # discovered from CN=Partitions when not set
    tls_server_name: str | None = None  # name to verify the DC certificate against (URL with an IP/alias)


@dataclass(frozen=True)
class EntraConfig:
    tenant_id: str
    client_id: str
    client_secret: Secret | None = None
    certificate_file: str | None = None  # PEM with private key and certificate
    certificate_thumbprint: str | None = None
    authority_host: str = "https://login.microsoftonline.com"
    graph_url: str = "https://graph.microsoft.com"
    ca_file: str | None = None
    timeout: float = 60.0
    max_retry_wait: float = 120.0  # total Retry-After/backoff wait in one refresh before giving up
    page_size: int = 999
    licenses: bool = True  # read organization, subscribedSkus and subscriptions


@dataclass(frozen=True)
class ConfigMgrConfig:
    connection_string: Secret  # may hold PWD=...; never logged (see exporter.sources.configmgr)
    intune_collection_ids: tuple[str, ...]
    query_timeout: float = 60.0
    username: str | None = None  # appended as UID= when set
    password: Secret | None = None  # appended as PWD= when set
    fetch_size: int = 5000


@dataclass(frozen=True)
class EstateConfig:
    name: str
    active_directory: ActiveDirectoryConfig | None = None
    entra: EntraConfig | None = None
    configmgr: ConfigMgrConfig | None = None
    stuck_after: Mapping[Stage, float] = field(default_factory=lambda: dict(DEFAULT_STUCK_AFTER))


@dataclass(frozen=True)
class Config:
    estates: tuple[EstateConfig, ...]
    refresh_interval: float = 300.0
    refresh_timeout: float | None = None  # hard limit of one refresh; default: refresh_interval
    state_file: str | None = None
    stuck_users_listed: int = 25
    user_label: UserLabel = "upn"

    @property
    def effective_refresh_timeout(self) -> float:
        return self.refresh_timeout or self.refresh_interval

    def secrets(self) -> list[str]:
        """Every secret value, for the log filter that masks them should one slip into a message."""
        values: list[str] = []
        for estate in self.estates:
            for section in (estate.active_directory, estate.entra, estate.configmgr):
                if section is None:
                    continue
                for item in vars(section).values():
                    if isinstance(item, Secret) and item.value:
                        values.append(item.value)
            if estate.configmgr is not None:
                # The ODBC parser of the ConfigMgr client (braces, doubled "}"), not a second one here.
                from exporter.sources.configmgr import connection_secrets, parse_connection_string

                attributes = parse_connection_string(estate.configmgr.connection_string.value)
                values.extend(connection_secrets(attributes, None))
        return values


# ---------------------------------------------------------------------------------- parsing
class _Checker:
    """Reads values out of a YAML tree, recording each problem with its key path."""

    def __init__(self, base_dir: Path, environ: Mapping[str, str]) -> None:
        self.problems: list[str] = []
        self.base_dir = base_dir
        self.environ = environ

    def problem(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def mapping(self, node: Any, path: str, allowed: tuple[str, ...]) -> dict[str, Any] | None:
        if node is None:
            return None
        if not isinstance(node, dict):
            self.problem(path, f"must be a mapping, got {_kind(node)}")
            return None
        for key in node:
            if not isinstance(key, str) or key not in allowed:
                hint = difflib.get_close_matches(str(key), allowed, n=1)
                suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
                self.problem(_join(path, str(key)), f"unknown key{suggestion}")
        return node

    def expand(self, value: str, path: str) -> str | None:
        missing = [name for name in _ENV_REF.findall(value) if name not in self.environ]
        if missing:
            self.problem(path, "environment variable " + ", ".join(missing) + " is not set")
            return None
        return _ENV_REF.sub(lambda m: self.environ[m.group(1)], value)

    def string(
        self, m: dict[str, Any], key: str, path: str, *, required: bool = False, default: str | None = None
    ) -> str | None:
        value = m.get(key)
        if value is None:
            if required:
                self.problem(_join(path, key), "required")
            return default
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            self.problem(_join(path, key), f"must be a string, got {_kind(value)}")
            return default
        text = self.expand(str(value), _join(path, key))
        if text is None:
            return default
        if required and not text.strip():
            self.problem(_join(path, key), "must not be empty")
            return default
        return text

    def secret(self, m: dict[str, Any], key: str, path: str, *, required: bool) -> Secret | None:
        file_key = key + "_file"
        inline, from_file = m.get(key), m.get(file_key)
        if inline is not None and from_file is not None:
            self.problem(_join(path, key), f"set either {key} or {file_key}, not both")
            return None
        if from_file is not None:
            file_name = self.file(m, file_key, path)
            if file_name is None:
                return None
            try:
                text = Path(file_name).read_text(encoding="utf-8").strip()
            except OSError as exc:
                self.problem(_join(path, file_key), f"cannot read file: {exc.strerror}")
                return None
            if not text:
                self.problem(_join(path, file_key), "file is empty")
                return None
            return Secret(text)
        if inline is None:
            if required:
                self.problem(_join(path, key), f"required (or {file_key})")
            return None
        if not isinstance(inline, str):
            self.problem(_join(path, key), f"must be a string, got {_kind(inline)}")
            return None
        expanded = self.expand(inline, _join(path, key))
        if expanded is None:
            return None
        if not expanded:
            self.problem(_join(path, key), "must not be empty")
            return None
        return Secret(expanded)

    def file(self, m: dict[str, Any], key: str, path: str) -> str | None:
        name = self.string(m, key, path)
        if name is None:
            return None
        resolved = Path(name) if os.path.isabs(name) else self.base_dir / name
        if not resolved.is_file():
            self.problem(_join(path, key), f"file not found: {name}")
            return None
        return str(resolved)

    def boolean(self, m: dict[str, Any], key: str, path: str, default: bool) -> bool:
        value = m.get(key)
        if value is None:
            return default
        if isinstance(value, str):
            expanded = self.expand(value, _join(path, key))
            lowered = (expanded or "").strip().lower()
            if lowered in {"true", "yes", "1"}:
                return True
            if lowered in {"false", "no", "0"}:
                return False
        if isinstance(value, bool):
            return value
        self.problem(_join(path, key), f"must be true or false, got {value!r}")
        return default

    def integer(self, m: dict[str, Any], key: str, path: str, default: int, low: int, high: int) -> int:
        value = m.get(key)
        if value is None:
            return default
        if isinstance(value, str):
            expanded = self.expand(value, _join(path, key))
            if expanded is not None and expanded.strip().isdigit():
                value = int(expanded)
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(_join(path, key), f"must be an integer, got {value!r}")
            return default
        if not low <= value <= high:
            self.problem(_join(path, key), f"must be between {low} and {high}, got {value}")
            return default
        return value

    def duration(
        self, m: dict[str, Any], key: str, path: str, default: float | None, minimum: float = 0.0
    ) -> float | None:
        value = m.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, str | int):
            self.problem(_join(path, key), f"must be a duration like 30s, 5m or 2h, got {value!r}")
            return default
        text = self.expand(str(value), _join(path, key))
        if text is None:
            return default
        try:
            seconds = parse_duration(text)
        except ValueError as exc:
            self.problem(_join(path, key), str(exc))
            return default
        if seconds < minimum:
            self.problem(_join(path, key), f"must be at least {format_duration(minimum)}")
            return default
        return seconds

    def choice(self, m: dict[str, Any], key: str, path: str, choices: tuple[str, ...], default: str) -> str:
        value = self.string(m, key, path, default=default)
        if value is None or value not in choices:
            self.problem(_join(path, key), f"must be one of {', '.join(choices)}, got {value!r}")
            return default
        return value

    def string_list(self, m: dict[str, Any], key: str, path: str, *, required: bool) -> tuple[str, ...]:
        value = m.get(key)
        if value is None:
            if required:
                self.problem(_join(path, key), "required")
            return ()
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            self.problem(_join(path, key), f"must be a list of strings, got {_kind(value)}")
            return ()
        items: list[str] = []
        for index, item in enumerate(value):
            item_path = f"{_join(path, key)}[{index}]"
            if not isinstance(item, str) or not item.strip():
                self.problem(item_path, "must be a non-empty string")
                continue
            expanded = self.expand(item, item_path)
            if expanded is not None:
                items.append(expanded)
        if required and not items and not any(p.startswith(_join(path, key)) for p in self.problems):
            self.problem(_join(path, key), "must list at least one entry")
        return tuple(items)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(value: object) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


_TOP_KEYS = (
    "refresh_interval",
    "refresh_timeout",
    "state_file",
    "stuck_users_listed",
    "user_label",
    "estates",
)
_ESTATE_KEYS = ("name", "active_directory", "entra", "configmgr", "stuck_after")
_AD_KEYS = (
    "url",
    "start_tls",
    "authentication",
    "bind_user",
    "bind_password",
    "bind_password_file",
    "ca_file",
    "tls_verify",
    "search_bases",
    "user_filter",
    "source_anchor",
    "page_size",
    "timeout",
    "netbios_domain",
    "tls_server_name",
)
_ENTRA_KEYS = (
    "tenant_id",
    "client_id",
    "client_secret",
    "client_secret_file",
    "certificate_file",
    "certificate_thumbprint",
    "authority_host",
    "graph_url",
    "ca_file",
    "timeout",
    "max_retry_wait",
    "page_size",
    "licenses",
)
_CM_KEYS = (
    "connection_string",
    "connection_string_file",
    "intune_collection_ids",
    "query_timeout",
    "username",
    "password",
    "password_file",
    "fetch_size",
)


def parse_config(data: Any, base_dir: Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Validate a parsed YAML document; raise ConfigError listing every problem."""
    check = _Checker(base_dir or Path.cwd(), os.environ if environ is None else environ)
    if data is None:
        data = {}
    top = check.mapping(data, "", _TOP_KEYS)
    if top is None:
        raise ConfigError(check.problems or ["config: must be a mapping"])
    refresh_interval = check.duration(top, "refresh_interval", "", 300.0, minimum=1.0) or 300.0
    refresh_timeout = check.duration(top, "refresh_timeout", "", None, minimum=1.0)
    state_file = check.string(top, "state_file", "")
    listed = check.integer(top, "stuck_users_listed", "", 25, 0, 10_000)
    user_label = check.choice(top, "user_label", "", ("upn", "sam", "hash", "none"), "upn")

    estates: list[EstateConfig] = []
    raw_estates = top.get("estates")
    if raw_estates is None:
        check.problem("estates", "required: list at least one estate")
    elif not isinstance(raw_estates, list) or not raw_estates:
        check.problem("estates", "must be a non-empty list of estates")
    else:
        names: set[str] = set()
        for index, raw in enumerate(raw_estates):
            estate = _parse_estate(check, raw, f"estates[{index}]")
            if estate is None:
                continue
            if estate.name in names:
                check.problem(f"estates[{index}].name", f"duplicate estate name {estate.name!r}")
            names.add(estate.name)
            estates.append(estate)

    if check.problems:
        raise ConfigError(check.problems)
    return Config(
        estates=tuple(estates),
        refresh_interval=refresh_interval,
        refresh_timeout=refresh_timeout,
        state_file=state_file,
        stuck_users_listed=listed,
        user_label=user_label,  # type: ignore[arg-type]
    )


def _parse_estate(check: _Checker, raw: Any, path: str) -> EstateConfig | None:
    m = check.mapping(raw, path, _ESTATE_KEYS)
    if m is None:
        if raw is None:
            check.problem(path, "must be a mapping")
        return None
    name = check.string(m, "name", path, required=True)
    if name is not None and not _ESTATE_NAME.match(name):
        check.problem(_join(path, "name"), "may only contain letters, digits, '_', '.', ':' and '-'")
    ad = _parse_ad(check, m.get("active_directory"), _join(path, "active_directory"))
    entra = _parse_entra(check, m.get("entra"), _join(path, "entra"))
    cm = _parse_configmgr(check, m.get("configmgr"), _join(path, "configmgr"))
    if not any(key in m and m[key] is not None for key in ("active_directory", "entra", "configmgr")):
        check.problem(path, "configure at least one of active_directory, entra, configmgr")
    stuck_after = dict(DEFAULT_STUCK_AFTER)
    sa = check.mapping(m.get("stuck_after"), _join(path, "stuck_after"), WAITING_STAGES)
    if sa is not None:
        for stage in WAITING_STAGES:
            value = check.duration(sa, stage, _join(path, "stuck_after"), None, minimum=0.0)
            if value is not None:
                stuck_after[stage] = value
    if name is None:
        return None
    return EstateConfig(name=name, active_directory=ad, entra=entra, configmgr=cm, stuck_after=stuck_after)


def _parse_ad(check: _Checker, raw: Any, path: str) -> ActiveDirectoryConfig | None:
    m = check.mapping(raw, path, _AD_KEYS)
    if m is None:
        return None
    before = len(check.problems)
    url = check.string(m, "url", path, required=True)
    if url is not None and not re.match(r"^ldaps?://[^/\s]+", url, re.IGNORECASE):
        check.problem(_join(path, "url"), f"must be ldap://host[:port] or ldaps://host[:port], got {url!r}")
    start_tls = check.boolean(m, "start_tls", path, False)
    if url is not None and start_tls and url.lower().startswith("ldaps://"):
        check.problem(_join(path, "start_tls"), "start_tls needs an ldap:// url (ldaps:// is TLS already)")
    authentication = check.choice(m, "authentication", path, ("simple", "ntlm"), "simple")
    bind_user = check.string(m, "bind_user", path, required=True)
    if bind_user and authentication == "ntlm" and "\\" not in bind_user:
        check.problem(_join(path, "bind_user"), "NTLM needs DOMAIN\\user")
    password = check.secret(m, "bind_password", path, required=True)
    ca_file = check.file(m, "ca_file", path)
    tls_verify = check.boolean(m, "tls_verify", path, True)
    search_bases = check.string_list(m, "search_bases", path, required=True)
    user_filter = check.string(m, "user_filter", path, default=DEFAULT_USER_FILTER) or DEFAULT_USER_FILTER
    if user_filter.count("(") != user_filter.count(")") or not user_filter.startswith("("):
        check.problem(_join(path, "user_filter"), "is not a valid LDAP filter (unbalanced parentheses)")
    anchor = check.choice(m, "source_anchor", path, ("objectGUID", "mS-DS-ConsistencyGuid"), "objectGUID")
    page_size = check.integer(m, "page_size", path, 1000, 1, 100_000)
    timeout = check.duration(m, "timeout", path, 60.0, minimum=1.0) or 60.0
    netbios = check.string(m, "netbios_domain", path)
    tls_server_name = check.string(m, "tls_server_name", path)
    if len(check.problems) > before or url is None or bind_user is None or password is None:
        return None
    return ActiveDirectoryConfig(
        url=url,
        bind_user=bind_user,
        bind_password=password,
        search_bases=search_bases,
        start_tls=start_tls,
        authentication=authentication,  # type: ignore[arg-type]
        ca_file=ca_file,
        tls_verify=tls_verify,
        user_filter=user_filter,
        source_anchor=anchor,  # type: ignore[arg-type]
        page_size=page_size,
        timeout=timeout,
        netbios_domain=netbios.upper() if netbios else None,
        tls_server_name=tls_server_name,
    )


def _parse_entra(check: _Checker, raw: Any, path: str) -> EntraConfig | None:
    m = check.mapping(raw, path, _ENTRA_KEYS)
    if m is None:
        return None
    before = len(check.problems)
    tenant = check.string(m, "tenant_id", path, required=True)
    client = check.string(m, "client_id", path, required=True)
    has_cert = m.get("certificate_file") is not None
    secret = check.secret(m, "client_secret", path, required=not has_cert)
    cert_file = check.file(m, "certificate_file", path)
    thumbprint = check.string(m, "certificate_thumbprint", path, required=has_cert)
    if has_cert and (m.get("client_secret") is not None or m.get("client_secret_file") is not None):
        check.problem(path, "set either client_secret or certificate_file, not both")
    if thumbprint is not None and not re.fullmatch(r"[0-9A-Fa-f:]{40,95}", thumbprint):
        check.problem(
            _join(path, "certificate_thumbprint"), "must be the certificate's SHA-1 thumbprint in hex"
        )
    authority = check.string(m, "authority_host", path, default="https://login.microsoftonline.com")
    graph = check.string(m, "graph_url", path, default="https://graph.microsoft.com")
    for key, value in (("authority_host", authority), ("graph_url", graph)):
        if value is not None and not value.lower().startswith("https://"):
            check.problem(_join(path, key), f"must be an https:// URL, got {value!r}")
    ca_file = None if m.get("ca_file") is None else check.file(m, "ca_file", path)
    timeout = check.duration(m, "timeout", path, 60.0, minimum=1.0) or 60.0
    max_wait = check.duration(m, "max_retry_wait", path, 120.0, minimum=0.0)
    page_size = check.integer(m, "page_size", path, 999, 1, 999)
    licenses = check.boolean(m, "licenses", path, True)
    if len(check.problems) > before or tenant is None or client is None:
        return None
    return EntraConfig(
        tenant_id=tenant,
        client_id=client,
        client_secret=secret,
        certificate_file=cert_file,
        certificate_thumbprint=thumbprint.replace(":", "") if thumbprint else None,
        authority_host=(authority or "").rstrip("/"),
        graph_url=(graph or "").rstrip("/"),
        ca_file=ca_file,
        timeout=timeout,
        max_retry_wait=120.0 if max_wait is None else max_wait,
        page_size=page_size,
        licenses=licenses,
    )


def _parse_configmgr(check: _Checker, raw: Any, path: str) -> ConfigMgrConfig | None:
    m = check.mapping(raw, path, _CM_KEYS)
    if m is None:
        return None
    before = len(check.problems)
    conn = check.secret(m, "connection_string", path, required=True)
    if conn is not None and "=" not in conn.value:
        check.problem(_join(path, "connection_string"), "is not an ODBC connection string (KEY=value;...)")
    collections = check.string_list(m, "intune_collection_ids", path, required=True)
    timeout = check.duration(m, "query_timeout", path, 60.0, minimum=1.0) or 60.0
    username = check.string(m, "username", path)
    password = check.secret(m, "password", path, required=False)
    fetch_size = check.integer(m, "fetch_size", path, 5000, 1, 1_000_000)
    if len(check.problems) > before or conn is None:
        return None
    return ConfigMgrConfig(
        connection_string=conn,
        intune_collection_ids=tuple(c.strip().upper() for c in collections),
        query_timeout=timeout,
        username=username,
        password=password,
        fetch_size=fetch_size,
    )


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"--config.file: file not found: {file}"]) from None
    except OSError as exc:
        raise ConfigError([f"--config.file: cannot read {file}: {exc.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError([f"--config.file: not valid YAML{where}"]) from None
    return parse_config(data, base_dir=file.resolve().parent, environ=environ)
