"""The YAML configuration, validated by pydantic into typed, immutable objects.

Each key is written once: as a field of one of the pydantic dataclasses below, with its type, its
default, its bounds and its description (the README's reference is written from those). Reading a
file goes through three layers:

1. :func:`load_config` reads the file (a regular file of UTF-8 text) and parses the YAML, refusing
   duplicate keys and alias bombs;
2. :func:`parse_config` expands ``${NAME}`` in every string value from the environment;
3. pydantic validates the tree. Every section first resolves its ``*_file`` secret twins (read
   from a regular file, UTF-8, stripped) and its unknown keys (with a "did you mean" hint), then
   validates its fields, then runs its cross-key checks.

Every problem is collected with its key path (``estates[0].entra.client_id: required``) so that
``--config.check`` can list all of them at once. Secret values are wrapped in :class:`Secret`,
whose ``repr``/``str`` never shows the value, are never copied into a problem message, and any
that slipped into one through another key is masked.

Objects built in Python (tests, the demo) skip the file rules: durations are plain seconds there,
and paths and URLs are taken as given. Only values read from a file are bounded and checked.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import re
import stat
import types
import typing
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, NoReturn, Union

import yaml
from pydantic import (
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    ModelWrapValidatorHandler,
    SecretStr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic.dataclasses import dataclass
from pydantic_core import ArgsKwargs, InitErrorDetails, PydanticCustomError, core_schema

from exporter.durations import format_duration, parse_duration
from exporter.odbc import connection_secrets, parse_connection_string
from exporter.pipelines.definitions import (
    COMPLIANCE_STATES,
    DAY,
    DEFAULT_COMPLIANT_STATES,
    DEFAULT_DEVICE_STALE_AFTER,
    DEFAULT_INTUNE_SERVICE_PLANS,
    DEFAULT_PIPELINE,
    HOUR,
    PIPELINES,
    PipelineName,
)
from exporter.secrets import SecretMask

DEFAULT_USER_FILTER = (
    "(&(objectCategory=person)(objectClass=user)(!(userAccountControl:1.2.840.113556.1.4.803:=2)))"
)
# The default chain's thresholds, for callers that build an estate in Python (the demo).
DEFAULT_STUCK_AFTER: dict[str, float] = dict(PIPELINES[DEFAULT_PIPELINE].default_stuck_after)
UserLabel = Literal["upn", "sam", "hash", "none"]

# Upper bounds of durations read from the file: large enough for any real setting, small enough
# that no deadline or timestamp computed from them overflows.
MAX_TIMEOUT = DAY  # a backend call or one refresh
MAX_INTERVAL = 7 * DAY  # between two refreshes, between two full reads
MAX_STUCK_AFTER = 365 * DAY  # stuck_after thresholds, device_stale_after

MAX_CONFIG_BYTES = 16 * 2**20
MAX_SECRET_FILE_BYTES = 2**20
MAX_TEXT_LENGTH = 65_536
MAX_YAML_VALUES = 100_000  # after aliases are expanded
MIN_USER_LABEL_KEY_LENGTH = 16

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_ESTATE_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
_THUMBPRINT = re.compile(r"^[0-9A-Fa-f:]{40,95}$")
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # in a secret file
_TEXT_CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # in any other value

Loc = tuple[str | int, ...]
Problem = tuple[Loc, str]


class ConfigError(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class Secret(SecretStr):
    """A secret string; it prints as ``<secret>`` so it cannot leak through logs or errors."""

    @property
    def value(self) -> str:
        return self.get_secret_value()

    def _display(self) -> str:
        return "<secret>"

    def __repr__(self) -> str:
        return "Secret(<secret>)"

    __str__ = __repr__

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: type[Any], handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.with_info_after_validator_function(
            _accept_secret, super().__get_pydantic_core_schema__(source, handler)
        )


# ------------------------------------------------------------------------- validation context
@dataclasses.dataclass
class _FileContext:
    """Passed to pydantic while validating a file: where relative paths start, and every secret
    value seen (to mask them in problem messages)."""

    base_dir: Path
    secrets: list[str] = dataclasses.field(default_factory=list)


def _file_context(info: ValidationInfo) -> _FileContext | None:
    return info.context if isinstance(info.context, _FileContext) else None


@dataclasses.dataclass(frozen=True)
class _MissingEnv:
    """Stands in for a string whose ``${NAME}`` is not set; reported at its key by any validator."""

    names: tuple[str, ...]

    @property
    def message(self) -> str:
        noun = "variable" if len(self.names) == 1 else "variables"
        verb = "is" if len(self.names) == 1 else "are"
        return f"environment {noun} {', '.join(self.names)} {verb} not set"


class _Reported:
    """Stands in for a value whose problem is already reported (a ``*_file`` that cannot be read)."""


_REPORTED = _Reported()


def _accept_secret(value: Secret, info: ValidationInfo) -> Secret:
    if not value.value:
        _fail("must not be empty")
    context = _file_context(info)
    if context is not None:
        context.secrets.append(value.value)
    return value


# ------------------------------------------------------------------------------- problems
def _fail(message: str) -> NoReturn:
    raise PydanticCustomError("config", "{message}", {"message": message})


def _detail(loc: Loc, message: str) -> InitErrorDetails:
    return InitErrorDetails(
        type=PydanticCustomError("config", "{message}", {"message": message}), loc=loc, input=None
    )


def _fail_all(title: str, problems: list[Problem]) -> NoReturn:
    raise ValidationError.from_exception_data(
        title, [_detail(loc, message) for loc, message in problems], hide_input=True
    )


def _kind(value: object) -> str:
    names = {
        dict: "a mapping",
        list: "a list",
        tuple: "a list",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        type(None): "null",
    }
    return names.get(type(value), type(value).__name__)


def _shown(value: object, limit: int = 60) -> str:
    """A short repr for messages (a 5000-digit integer has no repr in Python 3.11)."""
    try:
        text = repr(value)
    except ValueError:
        return _kind(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _hint(key: object, choices: list[str] | tuple[str, ...] | set[str]) -> str:
    lowered = {choice.lower(): choice for choice in choices}
    exact = lowered.get(str(key).lower())
    match = [exact] if exact else difflib.get_close_matches(str(key), sorted(choices), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _path(loc: Loc) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "top level"


# ------------------------------------------------------------------------ field rules (types)
class _Rule:
    """Validation of one kind of value read from the file, with messages written for users.

    Used as ``Annotated[type, Rule(...)]`` metadata. Values built in Python (no file context)
    pass through :meth:`from_python`, which by default takes them as given.
    """

    json_schema: ClassVar[core_schema.CoreSchema] = core_schema.str_schema()

    def check(self, value: Any, context: _FileContext) -> Any:
        raise NotImplementedError

    def from_python(self, value: Any) -> Any:
        return value

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        def validate(value: Any, info: ValidationInfo) -> Any:
            if isinstance(value, _MissingEnv):
                _fail(value.message)
            context = _file_context(info)
            return self.from_python(value) if context is None else self.check(value, context)

        return core_schema.with_info_plain_validator_function(
            validate, json_schema_input_schema=self.json_schema
        )


def _text(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        _fail(f"must be a string, got {_kind(value)}")
    text = value if isinstance(value, str) else _shown(value)
    if len(text) > MAX_TEXT_LENGTH:
        _fail(f"is too long ({len(text)} characters, at most {MAX_TEXT_LENGTH})")
    if _TEXT_CONTROL_CHARACTERS.search(text):
        _fail(f"must not contain control characters (line breaks, NUL...), got {_shown(text)}")
    return text


@dataclasses.dataclass(frozen=True)
class Text(_Rule):
    """A string (a YAML number is taken as its text)."""

    non_blank: bool = False
    upper: bool = False

    def check(self, value: Any, context: _FileContext) -> str:
        text = _text(value)
        if self.non_blank and not text.strip():
            _fail("must not be empty")
        return text.upper() if self.upper else text


@dataclasses.dataclass(frozen=True)
class EstateName(_Rule):
    def check(self, value: Any, context: _FileContext) -> str:
        text = _text(value)
        if not text.strip():
            _fail("must not be empty")
        if not _ESTATE_NAME.match(text):
            _fail("may only contain letters, digits, '_', '.', ':' and '-' (at most 128)")
        return text


@dataclasses.dataclass(frozen=True)
class Flag(_Rule):
    """true/false; the strings true/yes/on/1 and false/no/off/0 too (an expanded ``${VAR}``)."""

    json_schema: ClassVar[core_schema.CoreSchema] = core_schema.bool_schema()
    _WORDS: ClassVar[dict[str, bool]] = {
        "true": True,
        "yes": True,
        "on": True,
        "1": True,
        "false": False,
        "no": False,
        "off": False,
        "0": False,
    }

    def check(self, value: Any, context: _FileContext) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in self._WORDS:
            return self._WORDS[value.strip().lower()]
        _fail(f"must be true or false, got {_shown(value)}")


@dataclasses.dataclass(frozen=True)
class Count(_Rule):
    """A whole number between ``low`` and ``high``."""

    low: int
    high: int

    def check(self, value: Any, context: _FileContext) -> int:
        if isinstance(value, str) and re.fullmatch(r"[+-]?[0-9]{1,18}", value.strip()):
            value = int(value.strip())
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(f"must be an integer, got {_shown(value)}")
        if not self.low <= value <= self.high:
            _fail(f"must be between {self.low} and {self.high}, got {_shown(value)}")
        return value


@dataclasses.dataclass(frozen=True)
class Seconds(_Rule):
    """A Prometheus duration (``30s``, ``5m``, ``2h``, ``1d``) between ``minimum`` and ``maximum``.

    Plain numbers are refused in the file (``timeout: 30``: seconds or minutes?) except ``0``;
    Python callers pass seconds as a number.
    """

    minimum: float
    maximum: float

    def check(self, value: Any, context: _FileContext) -> float:
        if isinstance(value, bool) or not isinstance(value, str | int):
            _fail(f"must be a duration like 30s, 5m or 2h, got {_shown(value)}")
        text = _shown(value) if isinstance(value, int) else value
        if text.strip().isdigit() and text.strip() != "0" and len(text.strip()) < 20:
            _fail(f"needs a unit, like {text.strip()}s or {text.strip()}m (Prometheus duration syntax)")
        try:
            seconds = parse_duration(text)
        except ValueError as exc:
            _fail(str(exc))
        if seconds < self.minimum:
            _fail(f"must be at least {format_duration(self.minimum)}, got {text.strip()}")
        if seconds > self.maximum:
            _fail(f"must be at most {format_duration(self.maximum)}, got {text.strip()}")
        return seconds

    def from_python(self, value: Any) -> float:
        if isinstance(value, str):
            try:
                return parse_duration(value)
            except ValueError as exc:
                _fail(str(exc))
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
            _fail(f"must be a finite number of seconds >= 0, got {_shown(value)}")
        return float(value)


@dataclasses.dataclass(frozen=True)
class Names(_Rule):
    """A list of non-empty strings (a single string is a list of one), optionally from ``choices``."""

    json_schema: ClassVar[core_schema.CoreSchema] = core_schema.list_schema(core_schema.str_schema())
    non_empty: bool = False
    choices: tuple[str, ...] = ()
    upper: bool = False

    def check(self, value: Any, context: _FileContext) -> tuple[str, ...]:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple):
            _fail(f"must be a list of strings, got {_kind(value)}")
        items: list[str] = []
        problems: list[Problem] = []
        for index, item in enumerate(value):
            if isinstance(item, _MissingEnv):
                problems.append(((index,), item.message))
            elif not isinstance(item, str) or not item.strip() or len(item) > MAX_TEXT_LENGTH:
                problems.append(((index,), f"must be a non-empty string, got {_shown(item)}"))
            elif self.choices and item.strip() not in self.choices:
                got = f"got {item.strip()!r}{_hint(item.strip(), self.choices)}"
                problems.append(((index,), f"must be one of {', '.join(self.choices)}, {got}"))
            else:
                items.append(item.strip().upper() if self.upper else item)
        if problems:
            _fail_all("list", problems)
        if self.non_empty and not items:
            _fail("must list at least one entry")
        return tuple(items)

    def from_python(self, value: Any) -> tuple[str, ...]:
        return tuple(value)


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _resolve_file(name: str, context: _FileContext) -> Path:
    """The path of a file that must exist and be a regular file (never opened here: a FIFO or a
    device would block or never end)."""
    shown = _short(name)
    path = Path(name)
    if not path.is_absolute():
        path = context.base_dir / path
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        _fail(f"file not found: {shown}")
    except ValueError:  # an embedded NUL byte
        _fail(f"not a valid file name: {_shown(name)}")
    except OSError as exc:
        _fail(f"cannot read {shown}: {exc.strerror or exc}")
    if not stat.S_ISREG(mode):
        _fail(f"not a regular file: {shown}")
    return path


@dataclasses.dataclass(frozen=True)
class ExistingFile(_Rule):
    """A regular file; a relative path starts at the config file's directory."""

    def check(self, value: Any, context: _FileContext) -> str:
        text = _text(value)
        if not text.strip():
            _fail("must not be empty")
        return str(_resolve_file(text, context))


@dataclasses.dataclass(frozen=True)
class WritableFile(_Rule):
    """A file the exporter writes: it need not exist, but its directory must, and it must not be
    a directory or a device."""

    def check(self, value: Any, context: _FileContext) -> str:
        text = _text(value)
        if not text.strip():
            _fail("must not be empty (leave the key out to run without one)")
        path = Path(text)
        try:
            if path.exists() and not path.is_file():
                _fail(f"not a regular file: {_short(text)}")
            if not path.parent.is_dir():
                _fail(f"directory {_short(str(path.parent))} does not exist")
        except OSError as exc:
            _fail(f"cannot use {_short(text)}: {exc.strerror or exc}")
        return text


@dataclasses.dataclass(frozen=True)
class LdapUrl(_Rule):
    def check(self, value: Any, context: _FileContext) -> str:
        text = _text(value)
        expected = f"must be ldap://host[:port] or ldaps://host[:port], got {_shown(text)}"
        parts = _url_parts(text, expected)
        if parts.scheme.lower() not in ("ldap", "ldaps") or not parts.hostname:
            _fail(expected)
        return text


@dataclasses.dataclass(frozen=True)
class HttpsUrl(_Rule):
    def check(self, value: Any, context: _FileContext) -> str:
        text = _text(value)
        expected = f"must be an https:// URL, got {_shown(text)}"
        parts = _url_parts(text, expected)
        if parts.scheme.lower() != "https" or not parts.hostname:
            _fail(expected)
        return text.rstrip("/")


def _url_parts(text: str, expected: str) -> urllib.parse.SplitResult:
    try:
        parts = urllib.parse.urlsplit(text.strip())
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in 0-65535
    except ValueError:
        _fail(expected)
    if any(char.isspace() for char in text.strip()):
        _fail(expected)
    return parts


@dataclasses.dataclass(frozen=True)
class LdapFilter(_Rule):
    def check(self, value: Any, context: _FileContext) -> str:
        text = _text(value)
        if not text.startswith("(") or text.count("(") != text.count(")"):
            _fail("is not a valid LDAP filter (unbalanced parentheses)")
        return text


@dataclasses.dataclass(frozen=True)
class Thumbprint(_Rule):
    def check(self, value: Any, context: _FileContext) -> str:
        text = _text(value).strip()
        if not _THUMBPRINT.match(text):
            _fail("must be the certificate's SHA-1 thumbprint in hex")
        return text.replace(":", "")


@dataclasses.dataclass(frozen=True)
class OnlyFor:
    """Marks a key that only applies to estates of these pipelines."""

    pipelines: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class RequiredFor:
    """Marks an optional section that estates of these pipelines must configure (an estate of any
    other pipeline needs at least one source)."""

    pipelines: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class WhenMissing:
    """What to tell a user who left out this required key."""

    hint: str


Timeout = Annotated[float, Seconds(1.0, MAX_TIMEOUT)]
StuckAfter = Annotated[float, Seconds(0.0, MAX_STUCK_AFTER)]
NonBlank = Annotated[str, Text(non_blank=True)]
OptionalText = Annotated[str, Text()] | None
OptionalFile = Annotated[str, ExistingFile()] | None
HttpsUrlText = Annotated[str, HttpsUrl()]
BoolFlag = Annotated[bool, Flag()]


def _read_secret_file(value: Any, context: _FileContext) -> str:
    if isinstance(value, _MissingEnv):
        _fail(value.message)
    if not isinstance(value, str):
        _fail(f"must be the name of a file, got {_kind(value)}")
    if not value.strip():
        _fail("must not be empty")
    path = _resolve_file(value, context)
    value = _short(value)
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_SECRET_FILE_BYTES + 1)
    except OSError as exc:
        _fail(f"cannot read {value}: {exc.strerror or exc}")
    if len(data) > MAX_SECRET_FILE_BYTES:
        _fail(f"file is larger than {MAX_SECRET_FILE_BYTES // 2**20} MiB: {value}")
    text = _decode_utf8(data, value).strip()
    if not text:
        _fail("file is empty")
    if _CONTROL_CHARACTERS.search(text):
        _fail(f"file holds control characters (is it a binary file?): {value}")
    context.secrets.append(text)
    return text


def _decode_utf8(data: bytes, name: str) -> str:
    """UTF-8 text (a UTF-8 byte order mark is dropped); a message naming the file otherwise."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        if data.startswith((b"\xff\xfe", b"\xfe\xff")):
            _fail(f"{name} is UTF-16 text; save it as UTF-8")
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        bad = data[exc.start : exc.start + 1].hex()
        _fail(f"{name} is not UTF-8 text (byte 0x{bad} at line {line}, column {column})")


# ---------------------------------------------------------------------------------- sections
_MODEL_CONFIG = ConfigDict(extra="forbid", hide_input_in_errors=True)


@dataclass(frozen=True, config=_MODEL_CONFIG)
class _Section:
    """Base of every config section: reads a mapping from the file into the dataclass.

    For a mapping from the file it drops ``null`` values (a key left empty takes its default),
    reports unknown keys with a hint, replaces each ``<secret>_file`` twin by the file's content,
    runs :meth:`_raw_problems` (checks on which keys are present), validates the fields and then
    runs :meth:`_problems` (checks across validated keys). Every problem comes out with the
    section-relative key path and a message for users.
    """

    def secrets(self) -> list[str]:
        """Every secret value of this section and the sections it contains."""
        values: list[str] = []
        for item in dataclasses.fields(self):
            _collect_secrets(getattr(self, item.name), values)
        return list(dict.fromkeys(values))

    @classmethod
    def _raw_problems(cls, data: dict[str, Any]) -> list[Problem]:
        return []

    def _problems(self) -> list[Problem]:
        return []

    @model_validator(mode="wrap")
    @classmethod
    def _validate_section(
        cls, data: Any, handler: ModelWrapValidatorHandler[Any], info: ValidationInfo
    ) -> Any:
        context = _file_context(info)
        if context is None or isinstance(data, ArgsKwargs | cls):
            return handler(data)
        if isinstance(data, _MissingEnv):
            _fail(data.message)
        if not isinstance(data, dict):
            _fail(f"must be a mapping, got {_kind(data)}")
        problems: list[Problem] = []
        clean = _known_keys(cls, data, problems)
        _resolve_secret_files(cls, clean, context, problems)
        problems += cls._raw_problems(clean)
        try:
            value = handler(clean)
        except ValidationError as exc:
            problems += [(tuple(e["loc"]), _message(cls, e)) for e in exc.errors() if _reportable(e)]
            if not problems:
                raise
            _fail_all(cls.__name__, problems)
        problems += value._problems()
        if problems:
            _fail_all(cls.__name__, problems)
        return value


def _collect_secrets(value: object, values: list[str]) -> None:
    if isinstance(value, Secret):
        values.append(value.value)
    elif isinstance(value, _Section):
        values.extend(value.secrets())
    elif isinstance(value, tuple):
        for item in value:
            _collect_secrets(item, values)


def _secret_fields(cls: type[_Section]) -> tuple[str, ...]:
    return tuple(name for name, info in _fields(cls).items() if _mentions(info.annotation, Secret))


def _fields(cls: type[_Section]) -> dict[str, Any]:
    return dict(cls.__pydantic_fields__)  # type: ignore[attr-defined]


def _mentions(annotation: Any, wanted: type) -> bool:
    """Whether a field's type is ``wanted`` (or a subclass), alone, optional or annotated."""
    if isinstance(annotation, type) and issubclass(annotation, wanted):
        return True
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType, Annotated):
        return any(_mentions(arg, wanted) for arg in typing.get_args(annotation))
    return False


def _marker(cls: type[_Section], name: str, kind: type[Any]) -> Any:
    return next((m for m in _fields(cls)[name].metadata if isinstance(m, kind)), None)


def _known_keys(cls: type[_Section], data: dict[Any, Any], problems: list[Problem]) -> dict[str, Any]:
    allowed = set(_fields(cls)) | {name + "_file" for name in _secret_fields(cls)}
    clean: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str) or key not in allowed:
            name = key if isinstance(key, str) else _shown(key)
            problems.append(((name,), f"unknown key{_hint(key, allowed)}"))
        elif value is not None:
            clean[key] = value
    return clean


def _resolve_secret_files(
    cls: type[_Section], data: dict[str, Any], context: _FileContext, problems: list[Problem]
) -> None:
    for name in _secret_fields(cls):
        twin = name + "_file"
        if twin not in data:
            continue
        file_name = data.pop(twin)
        if name in data:
            problems.append(((name,), f"set either {name} or {twin}, not both"))
            continue
        try:
            data[name] = Secret(_read_secret_file(file_name, context))
        except PydanticCustomError as exc:
            problems.append(((twin,), exc.message()))
            data[name] = _REPORTED


def _reportable(error: Any) -> bool:
    return not isinstance(error.get("input"), _Reported)


def _message(cls: type[_Section], error: Any) -> str:
    """A pydantic error as the message users read (no input value of a secret is ever shown)."""
    kind, value, loc = error["type"], error.get("input"), tuple(error["loc"])
    if isinstance(value, _MissingEnv):
        return value.message
    if kind == "config":
        return str(error["ctx"]["message"])
    field = loc[0] if len(loc) == 1 and isinstance(loc[0], str) and loc[0] in _fields(cls) else None
    if kind == "missing":
        when_missing = _marker(cls, field, WhenMissing) if field else None
        if when_missing is not None:
            return f"required: {when_missing.hint}"
        return f"required (or {field}_file)" if field in _secret_fields(cls) else "required"
    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'", error["ctx"]["expected"])
        return f"must be one of {', '.join(choices)}, got {_shown(value)}{_hint(value, choices)}"
    if kind in _TYPE_MESSAGES:
        return _TYPE_MESSAGES[kind].format(kind=_kind(value))
    return str(error["msg"])


# Pydantic's own error types that reach users, in their words.
_TYPE_MESSAGES = {
    "unexpected_keyword_argument": "unknown key",
    "extra_forbidden": "unknown key",
    "invalid_key": "keys must be strings",
    **dict.fromkeys(
        ("dict_type", "dataclass_type", "dataclass_args_type", "model_type", "mapping_type"),
        "must be a mapping, got {kind}",
    ),
    **dict.fromkeys(("tuple_type", "list_type", "iterable_type"), "must be a list, got {kind}"),
    **dict.fromkeys(("string_type", "string_sub_type"), "must be a string, got {kind}"),
}


# ----------------------------------------------------------------------------------- sources
@dataclass(frozen=True, config=_MODEL_CONFIG)
class ActiveDirectoryConfig(_Section):
    url: Annotated[str, LdapUrl()] = Field(
        description="Domain controller: ldaps://host[:port], or ldap://host[:port] with start_tls."
    )
    bind_user: NonBlank = Field(
        description="Account to bind as: a UPN or DN for simple binds, DOMAIN\\user for NTLM."
    )
    bind_password: Secret = Field(description="Password of bind_user (secret; or bind_password_file).")
    search_bases: Annotated[tuple[str, ...], Names(non_empty=True)] = Field(
        description="DNs searched (subtree) for users; a user is an account under one of them."
    )
    start_tls: BoolFlag = Field(default=False, description="Upgrade an ldap:// connection with StartTLS.")
    authentication: Literal["simple", "ntlm"] = Field(default="simple", description="Bind method.")
    ca_file: OptionalFile = Field(
        default=None, description="PEM bundle of CAs to trust for the DC certificate; default: system trust."
    )
    tls_verify: BoolFlag = Field(
        default=True, description="Verify the DC certificate (never turn off in production)."
    )
    user_filter: Annotated[str, LdapFilter()] = Field(
        default=DEFAULT_USER_FILTER, description="LDAP filter of the users in scope (default: enabled users)."
    )
    source_anchor: Literal["objectGUID", "mS-DS-ConsistencyGuid"] = Field(
        default="objectGUID", description="Attribute Entra Connect uses as sourceAnchor (immutable id)."
    )
    page_size: Annotated[int, Count(1, 100_000)] = Field(
        default=1000, description="LDAP paged-search page size."
    )
    timeout: Timeout = Field(default=60.0, description="Timeout of each LDAP operation (1s to 1d).")
    netbios_domain: Annotated[str, Text(non_blank=True, upper=True)] | None = Field(
        default=None, description="NETBIOS domain name (DOMAIN\\user matching); discovered when not set."
    )
    tls_server_name: OptionalText = Field(
        default=None,
        description="Name to verify the DC certificate against when the URL holds an IP or alias.",
    )

    def _problems(self) -> list[Problem]:
        problems: list[Problem] = []
        if self.start_tls and self.url.lower().startswith("ldaps://"):
            problems.append((("start_tls",), "start_tls needs an ldap:// url (ldaps:// is TLS already)"))
        if self.authentication == "ntlm" and "\\" not in self.bind_user:
            problems.append((("bind_user",), "NTLM needs DOMAIN\\user"))
        return problems


@dataclass(frozen=True, config=_MODEL_CONFIG)
class EntraConfig(_Section):
    tenant_id: NonBlank = Field(description="Directory (tenant) id or a verified domain of the tenant.")
    client_id: NonBlank = Field(description="Application (client) id of the app registration.")
    client_secret: Secret | None = Field(
        default=None, description="Client secret (secret; or client_secret_file); or use certificate_file."
    )
    certificate_file: OptionalFile = Field(
        default=None, description="PEM file with the app's private key and certificate (instead of a secret)."
    )
    certificate_thumbprint: Annotated[str, Thumbprint()] | None = Field(
        default=None, description="SHA-1 thumbprint (hex) of the certificate; required with certificate_file."
    )
    authority_host: HttpsUrlText = Field(
        default="https://login.microsoftonline.com", description="Token endpoint host (national clouds)."
    )
    graph_url: HttpsUrlText = Field(
        default="https://graph.microsoft.com", description="Microsoft Graph base URL."
    )
    ca_file: OptionalFile = Field(
        default=None, description="Extra CA bundle to trust (tests, TLS-inspecting proxies)."
    )
    timeout: Timeout = Field(default=60.0, description="Timeout of each HTTP request (1s to 1d).")
    max_retry_wait: Annotated[float, Seconds(0.0, MAX_TIMEOUT)] = Field(
        default=120.0,
        description="Total Retry-After/backoff wait in one refresh before giving up (0s to 1d).",
    )
    page_size: Annotated[int, Count(1, 999)] = Field(default=999, description="Graph $top page size.")
    licenses: BoolFlag = Field(
        default=True, description="Read organization, subscribedSkus and subscriptions."
    )
    devices: Annotated[bool, Flag()] | None = Field(
        default=None,
        description="Read Intune managed devices (needs DeviceManagementManagedDevices.Read.All); "
        "default: only when the estate's pipeline is cloud.",
    )
    group_names: BoolFlag = Field(
        default=True,
        description="Read the display names of licence-assigning groups (needs GroupMember.Read.All); "
        "false shows group ids instead.",
    )
    license_refresh_interval: Annotated[float, Seconds(0.0, MAX_INTERVAL)] = Field(
        default=HOUR,
        description="/users/delta does not report licence state changes: every user's licences are "
        "read again this often (0s = every refresh; tenants under 10,000 users are read every refresh).",
    )

    @classmethod
    def _raw_problems(cls, data: dict[str, Any]) -> list[Problem]:
        has_secret, has_certificate = "client_secret" in data, "certificate_file" in data
        problems: list[Problem] = []
        if has_secret and has_certificate:
            problems.append(((), "set either client_secret or certificate_file, not both"))
        elif not has_secret and not has_certificate:
            problems.append((("client_secret",), "required (or client_secret_file, or certificate_file)"))
        if has_certificate and "certificate_thumbprint" not in data:
            problems.append((("certificate_thumbprint",), "required"))
        return problems


@dataclass(frozen=True, config=_MODEL_CONFIG)
class ConfigMgrConfig(_Section):
    connection_string: Secret = Field(
        description="ODBC connection string of the site database (secret; or connection_string_file)."
    )
    intune_collection_ids: Annotated[tuple[str, ...], Names(non_empty=True, upper=True)] = Field(
        description="Collection ids whose members the Intune connector syncs (e.g. PS100012)."
    )
    query_timeout: Timeout = Field(default=60.0, description="Timeout of each SQL query (1s to 1d).")
    username: OptionalText = Field(default=None, description="Appended as UID= when set.")
    password: Secret | None = Field(
        default=None, description="Appended as PWD= when set (secret; or password_file)."
    )
    fetch_size: Annotated[int, Count(1, 1_000_000)] = Field(
        default=5000, description="Rows fetched per round trip."
    )

    def secrets(self) -> list[str]:
        # A password may also sit inside the connection string (PWD={...}): the ODBC parser finds it.
        embedded = connection_secrets(parse_connection_string(self.connection_string.value), None)
        return list(dict.fromkeys([*super().secrets(), *embedded]))

    def _problems(self) -> list[Problem]:
        if not parse_connection_string(self.connection_string.value):
            return [(("connection_string",), "is not an ODBC connection string (KEY=value;...)")]
        return []


_CLOUD_ONLY = OnlyFor(("cloud",))
_NEEDED_BY_CLOUD = RequiredFor(("cloud",))  # its chain starts in AD and Entra; ConfigMgr is optional


@dataclass(frozen=True, config=_MODEL_CONFIG)
class EstateConfig(_Section):
    name: Annotated[str, EstateName()] = Field(description="Value of the estate label.")
    pipeline: PipelineName = Field(
        default=DEFAULT_PIPELINE,
        description="Provisioning chain: hybrid_mdm (AD -> Entra -> ConfigMgr -> Intune connector) or "
        "cloud (AD -> Entra -> Intune licence -> enrolled device -> compliant device).",
    )
    active_directory: Annotated[ActiveDirectoryConfig | None, _NEEDED_BY_CLOUD] = Field(
        default=None, description="The AD source (required for pipeline: cloud)."
    )
    entra: Annotated[EntraConfig | None, _NEEDED_BY_CLOUD] = Field(
        default=None, description="The Entra ID (Microsoft Graph) source (required for pipeline: cloud)."
    )
    configmgr: ConfigMgrConfig | None = Field(default=None, description="The ConfigMgr site database source.")
    stuck_after: Mapping[str, StuckAfter] = Field(
        default_factory=dict,
        validate_default=True,
        description="Per waiting stage of the pipeline: time in stage before a user counts as stuck "
        "(0s to 365d); stages left out keep the pipeline's default.",
    )
    intune_service_plans: Annotated[tuple[str, ...], Names(non_empty=True), _CLOUD_ONLY] = Field(
        default=DEFAULT_INTUNE_SERVICE_PLANS,
        description="cloud only: servicePlanName values that grant Intune.",
    )
    compliant_states: Annotated[
        tuple[str, ...], Names(non_empty=True, choices=COMPLIANCE_STATES), _CLOUD_ONLY
    ] = Field(
        default=DEFAULT_COMPLIANT_STATES,
        description="cloud only: complianceState values that count as compliant "
        "(add configManager where ConfigMgr owns compliance).",
    )
    device_stale_after: Annotated[float, Seconds(HOUR, MAX_STUCK_AFTER), _CLOUD_ONLY] = Field(
        default=DEFAULT_DEVICE_STALE_AFTER,
        description="cloud only: a device whose last sync is older than this does not count (1h to 365d).",
    )

    @field_validator("stuck_after", mode="wrap")
    @classmethod
    def _stuck_after_of_pipeline(
        cls, value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo
    ) -> Mapping[str, float]:
        definition = PIPELINES.get(info.data.get("pipeline", ""))
        if definition is None or not isinstance(value, dict):
            return handler(value)  # a bad pipeline or a stuck_after that is no mapping: reported as such
        stages = definition.waiting_stages
        unknown = [key for key in value if key not in stages]
        problems: list[Problem] = [
            (
                (str(key),),
                f"unknown key{_hint(key, stages)}: the waiting stages of pipeline {definition.name} are "
                + ", ".join(stages),
            )
            for key in unknown
        ]
        try:
            given = handler({key: item for key, item in value.items() if key not in unknown})
        except ValidationError as exc:
            problems += [(tuple(e["loc"]), _message(cls, e)) for e in exc.errors()]
        if problems:
            _fail_all("stuck_after", problems)
        return {**definition.default_stuck_after, **given}

    @classmethod
    def _raw_problems(cls, data: dict[str, Any]) -> list[Problem]:
        pipeline = data.get("pipeline", DEFAULT_PIPELINE)
        if pipeline not in PIPELINES:
            return []  # reported by the field
        problems: list[Problem] = []
        for key in data:
            only_for = _marker(cls, key, OnlyFor) if key in _fields(cls) else None
            if only_for is not None and pipeline not in only_for.pipelines:
                needed = " or ".join(only_for.pipelines)
                problems.append(((key,), f"only applies to pipeline: {needed} (this estate's is {pipeline})"))
        sources = [name for name, info in _fields(cls).items() if _mentions(info.annotation, _Section)]
        required = [
            name for name in sources if pipeline in getattr(_marker(cls, name, RequiredFor), "pipelines", ())
        ]
        if required:
            problems += [
                ((key,), f"required for pipeline: {pipeline}") for key in required if key not in data
            ]
        elif not any(key in data for key in sources):
            problems.append(((), "configure at least one of " + ", ".join(sources)))
        entra = data.get("entra")
        if pipeline == "cloud" and isinstance(entra, dict):
            # The cloud chain needs subscribedSkus (which licences grant Intune) and the devices.
            for key, why in (
                ("licenses", "subscribedSkus decide which licences grant Intune"),
                ("devices", "enrolled and compliant devices are stages of the chain"),
            ):
                if entra.get(key) is False:
                    problems.append((("entra", key), f"must be true for pipeline: cloud ({why})"))
        return problems


@dataclass(frozen=True, config=_MODEL_CONFIG)
class Config(_Section):
    estates: Annotated[tuple[EstateConfig, ...], WhenMissing("list at least one estate")] = Field(
        description="The estates (one AD forest with its tenant and site each) to watch."
    )
    refresh_interval: Annotated[float, Seconds(1.0, MAX_INTERVAL)] = Field(
        default=300.0, description="Background refresh of every source (1s to 7d)."
    )
    refresh_timeout: Annotated[float, Seconds(1.0, MAX_TIMEOUT)] | None = Field(
        default=None, description="Hard limit of one refresh (1s to 1d); default: refresh_interval."
    )
    full_resync_interval: Annotated[float, Seconds(0.0, MAX_INTERVAL)] = Field(
        default=DAY,
        description="A source reading incrementally does a full read again after this long "
        "(0s = every refresh is a full read; at most 7d).",
    )
    state_file: Annotated[str, WritableFile()] | None = Field(
        default=None,
        description="Persisted snapshot, first-seen times and incremental state (its directory must "
        "exist); omit for none.",
    )
    stuck_users_listed: Annotated[int, Count(0, 10_000)] = Field(
        default=25, description="Max series of intune_provisioning_stuck_user_info."
    )
    user_label: UserLabel = Field(
        default="upn", description="How a user is named in labels and /stuck: upn, sam, hash or none."
    )
    user_label_key: Secret | None = Field(
        default=None,
        description="HMAC key of user_label: hash (secret; or user_label_key_file; at least 16 characters); "
        "when absent the exporter generates one and keeps it in the state file.",
    )

    @field_validator("estates", mode="before")
    @classmethod
    def _estates_are_a_list(cls, value: Any, info: ValidationInfo) -> Any:
        if _file_context(info) is not None and (not isinstance(value, list) or not value):
            got = "an empty list" if isinstance(value, list) else _kind(value)
            _fail(f"must be a non-empty list of estates, got {got}")
        return value

    @property
    def effective_refresh_timeout(self) -> float:
        return self.refresh_timeout or self.refresh_interval

    @classmethod
    def _raw_problems(cls, data: dict[str, Any]) -> list[Problem]:
        # On the raw list, so that a duplicate is reported together with every other problem.
        estates = data.get("estates")
        problems: list[Problem] = []
        seen: set[str] = set()
        for index, estate in enumerate(estates if isinstance(estates, list) else []):
            name = estate.get("name") if isinstance(estate, dict) else None
            if not isinstance(name, str):
                continue
            if name in seen:
                problems.append((("estates", index, "name"), f"duplicate estate name {name!r}"))
            seen.add(name)
        return problems

    def _problems(self) -> list[Problem]:
        problems: list[Problem] = []
        key = self.user_label_key
        if key is not None and len(key.value) < MIN_USER_LABEL_KEY_LENGTH:
            problems.append(
                (
                    ("user_label_key",),
                    f"must be at least {MIN_USER_LABEL_KEY_LENGTH} characters (a random key, e.g. "
                    "from `openssl rand -hex 32`)",
                )
            )
        return problems


# ------------------------------------------------------------------------------------ loading
@functools.cache
def _config_adapter() -> TypeAdapter[Config]:
    return TypeAdapter(Config)


def parse_config(data: Any, base_dir: Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Validate a parsed YAML document; raise ConfigError listing every problem."""
    context = _FileContext(base_dir or Path.cwd())
    try:
        tree = _expand_environment({} if data is None else data, os.environ if environ is None else environ)
        return _config_adapter().validate_python(tree, context=context)
    except ValidationError as exc:
        # A secret can reach a message through another key's value (timeout: ${PASSWORD}).
        mask = SecretMask(context.secrets)
        problems = [f"{_path(tuple(e['loc']))}: {mask.mask(_message(Config, e))}" for e in exc.errors()]
        raise ConfigError(problems) from None
    except RecursionError:
        raise ConfigError(["top level: nested too deeply"]) from None


def _expand_environment(node: Any, environ: Mapping[str, str]) -> Any:
    """Every string with ``${NAME}`` expanded; a missing variable leaves a marker reported at its key."""
    if isinstance(node, str):
        missing = tuple(dict.fromkeys(name for name in _ENV_REF.findall(node) if name not in environ))
        if missing:
            return _MissingEnv(missing)
        return _ENV_REF.sub(lambda match: environ[match.group(1)], node)
    if isinstance(node, dict):
        return {key: _expand_environment(value, environ) for key, value in node.items()}
    if isinstance(node, list):
        return [_expand_environment(item, environ) for item in node]
    return node


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    file = Path(path)
    data = _read_yaml(file, _read_config_text(file))
    return parse_config(data, base_dir=file.resolve().parent, environ=environ)


def _read_config_text(file: Path) -> str:
    def problem(message: str) -> ConfigError:
        return ConfigError([f"--config.file: {message}"])

    try:
        mode = os.stat(file).st_mode
        if not stat.S_ISREG(mode):
            raise problem(f"not a regular file: {file}")
        with file.open("rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise problem(f"file not found: {file}") from None
    except ValueError:
        raise problem(f"not a valid file name: {_shown(str(file))}") from None
    except OSError as exc:
        raise problem(f"cannot read {file}: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise problem(f"{file} is larger than {MAX_CONFIG_BYTES // 2**20} MiB")
    try:
        return _decode_utf8(data, str(file))
    except PydanticCustomError as exc:
        raise problem(exc.message()) from None


def _read_yaml(file: Path, text: str) -> Any:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if root is not None:
            _check_yaml_tree(root)
        return yaml.safe_load(text)
    except yaml.reader.ReaderError as exc:
        character = f"0x{exc.character:02x}" if isinstance(exc.character, int) else repr(exc.character)
        raise ConfigError(
            [f"--config.file: not valid YAML: character {character} at offset {exc.position} is not allowed"]
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        reason = getattr(exc, "problem", None)
        raise ConfigError(
            [f"--config.file: not valid YAML{where}" + (f": {reason}" if reason else "")]
        ) from None
    except ValueError:  # PyYAML hands int() a number of more than 4300 digits
        raise ConfigError(["--config.file: not valid YAML: a number with thousands of digits"]) from None
    except RecursionError:
        raise ConfigError(["--config.file: not valid YAML: nested too deeply"]) from None


def _check_yaml_tree(root: yaml.Node) -> None:
    """Refuse duplicate keys (YAML's last-one-wins hides typos), self-referencing aliases and
    alias bombs (a few lines that expand into millions of values)."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()

    def size(node: yaml.Node, path: Loc) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in on_path:
            raise ConfigError([f"{_path(path)}: a YAML alias refers to a value that contains it"])
        on_path.add(id(node))
        total = 1
        if isinstance(node, yaml.MappingNode):
            first_seen: dict[tuple[str, str], tuple[int, int]] = {}
            for key_node, value_node in node.value:
                key = (key_node.tag, str(key_node.value)) if isinstance(key_node, yaml.ScalarNode) else None
                child_path = (*path, str(key_node.value)) if key else path
                if key is not None and key_node.tag != "tag:yaml.org,2002:merge":
                    mark = key_node.start_mark
                    where = (mark.line + 1, mark.column + 1)
                    if key in first_seen:
                        places = _places(first_seen[key], where)
                        raise ConfigError([f"{_path(child_path)}: duplicate key ({places})"])
                    first_seen[key] = where
                total += size(key_node, path) + size(value_node, child_path)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                total += size(item, (*path, index))
        on_path.discard(id(node))
        sizes[id(node)] = total
        if total > MAX_YAML_VALUES:
            raise ConfigError(
                [f"--config.file: more than {MAX_YAML_VALUES} values once YAML aliases are expanded"]
            )
        return total

    size(root, ())


def _places(first: tuple[int, int], second: tuple[int, int]) -> str:
    if first[0] == second[0]:
        return f"line {first[0]}, columns {first[1]} and {second[1]}"
    return f"lines {first[0]} and {second[0]}"
