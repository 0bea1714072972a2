"""ODBC connection strings: the one parser of ``KEY=value;KEY={braced;value}`` text.

Used by the ConfigMgr source (to add UID=/PWD= and name the server in messages) and by the config
(to find the password-like values the log mask must hide). Plain string handling on purpose:
importing it loads no ODBC driver.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ConnectionAttribute:
    key: str
    value: str  # unescaped
    raw: str  # the segment exactly as written, so untouched attributes are passed on verbatim


def parse_connection_string(text: str) -> list[ConnectionAttribute]:
    """Split an ODBC connection string into KEY=value attributes.

    A value in braces may contain ``;`` and ``=``; ``}}`` inside braces stands for ``}``.
    Segments without ``=`` are skipped.
    """
    attributes: list[ConnectionAttribute] = []
    position, length = 0, len(text)
    while position < length:
        start = position
        equals = text.find("=", position)
        semicolon = text.find(";", position)
        if equals < 0 or (0 <= semicolon < equals):
            position = length if semicolon < 0 else semicolon + 1
            continue
        key = text[position:equals].strip()
        position = equals + 1
        while position < length and text[position] == " ":
            position += 1
        if position < length and text[position] == "{":
            value, position = _read_braced(text, position + 1)
            end = text.find(";", position)
            position = length if end < 0 else end
        else:
            end = text.find(";", position)
            end = length if end < 0 else end
            value, position = text[position:end].strip(), end
        raw = text[start:position].strip()
        position += 1  # past the ';'
        if key:
            attributes.append(ConnectionAttribute(key, value, raw))
    return attributes


def _read_braced(text: str, position: int) -> tuple[str, int]:
    chars: list[str] = []
    while position < len(text):
        char = text[position]
        if char == "}":
            if text.startswith("}}", position):
                chars.append("}")
                position += 2
                continue
            return "".join(chars), position + 1
        chars.append(char)
        position += 1
    return "".join(chars), position  # unterminated: take the rest, the driver will complain


def braced(value: str) -> str:
    """An ODBC attribute value in braces, safe for any characters (``}`` doubled)."""
    return "{" + value.replace("}", "}}") + "}"


def _needs_braces(value: str) -> bool:
    return value != value.strip() or any(char in value for char in ";{}=")


_USER_KEYS = frozenset({"UID", "USER", "USERNAME", "USER ID"})
_PASSWORD_KEYS = frozenset({"PWD", "PASSWORD"})
_SERVER_KEYS = ("SERVER", "SERVERNAME", "HOST", "ADDRESS", "ADDR", "DATA SOURCE")
_DATABASE_KEYS = ("DATABASE", "INITIAL CATALOG", "DBNAME")


def attribute_value(attributes: Sequence[ConnectionAttribute], keys: Iterable[str]) -> str | None:
    by_key = {a.key.upper(): a.value for a in reversed(attributes)}
    for key in keys:
        value = by_key.get(key)
        if value:
            return value
    return None


def build_connection_string(base: str, username: str | None, password: str | None) -> str:
    """The connection string with UID=/PWD= from the config replacing any already in ``base``.

    The password is always braced (it may contain anything); the user name only when it must be.
    """
    attributes = parse_connection_string(base)
    if username is not None:
        attributes = [a for a in attributes if a.key.upper() not in _USER_KEYS]
    if password is not None:
        attributes = [a for a in attributes if a.key.upper() not in _PASSWORD_KEYS]
    parts = [a.raw for a in attributes]
    if username is not None:
        # Braces only when needed: the PostgreSQL driver unbraces PWD but not UID.
        parts.append("UID=" + (braced(username) if _needs_braces(username) else username))
    if password is not None:
        parts.append("PWD=" + braced(password))
    return ";".join(parts)


def connection_target(attributes: Sequence[ConnectionAttribute]) -> str:
    """``server/database`` for messages; never includes credentials."""
    server = attribute_value(attributes, _SERVER_KEYS)
    database = attribute_value(attributes, _DATABASE_KEYS)
    if server and database:
        return f"{server}/{database}"
    return (
        server
        or database
        or attribute_value(attributes, ("DSN",))
        or attribute_value(attributes, ("DRIVER",))
        or "?"
    )


def connection_secrets(attributes: Sequence[ConnectionAttribute], password: str | None) -> list[str]:
    """Every password-like value, to scrub from driver messages should a driver echo one."""
    values = [a.value for a in attributes if a.key.upper() in _PASSWORD_KEYS and a.value]
    if password:
        values.append(password)
    forms = set(values) | {braced(v) for v in values} | {v.replace("}", "}}") for v in values}
    return sorted(forms, key=len, reverse=True)  # longest first: a braced form before its content
