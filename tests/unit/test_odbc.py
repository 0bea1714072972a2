"""The ODBC connection-string parser shared by the ConfigMgr source and the config's secret list."""

from __future__ import annotations

import pytest

from exporter.odbc import (
    attribute_value,
    braced,
    build_connection_string,
    connection_secrets,
    connection_target,
    parse_connection_string,
)


def pairs(text: str) -> list[tuple[str, str]]:
    return [(a.key, a.value) for a in parse_connection_string(text)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("DSN=cm", [("DSN", "cm")]),
        ("A=1;;B = 2 ;", [("A", "1"), ("B", "2")]),
        ("PWD={a;b=c}", [("PWD", "a;b=c")]),
        ("PWD={x}}y};UID=u", [("PWD", "x}y"), ("UID", "u")]),
        ("PWD={open", [("PWD", "open")]),  # unterminated: the rest, for the driver to refuse
        ("no equals here;A=1", [("A", "1")]),
        ("=value;A=1", [("A", "1")]),
        ("", []),
    ],
)
def test_parse(text, expected):
    assert pairs(text) == expected


def test_untouched_attributes_keep_their_exact_text():
    text = "DRIVER={ODBC Driver 18 for SQL Server};SERVER=cm01;Encrypt=yes"
    assert build_connection_string(text, None, None) == text


def test_braced_round_trips_any_value():
    for value in ("plain", "a;b", "}{", "}}", " spaced ", "="):
        assert pairs("PWD=" + braced(value)) == [("PWD", value)]


def test_credentials_from_config_replace_those_in_the_string():
    built = build_connection_string("SERVER=cm;uid=old;Password={old}", "CONTOSO\\svc", "n}w;pw")
    assert pairs(built) == [("SERVER", "cm"), ("UID", "CONTOSO\\svc"), ("PWD", "n}w;pw")]


def test_target_and_attribute_lookup_are_case_insensitive_and_never_show_credentials():
    attributes = parse_connection_string("server=cm01;Initial Catalog=CM_PS1;PWD=secret-pw;driver={X}")
    assert connection_target(attributes) == "cm01/CM_PS1"
    assert attribute_value(attributes, ("DRIVER",)) == "X"
    assert attribute_value(attributes, ("DSN",)) is None


def test_secrets_cover_plain_braced_and_doubled_forms():
    secrets = connection_secrets(parse_connection_string("PWD={a}}b};Password=second"), "from-config")
    assert {"a}b", "{a}}b}", "a}}b", "second", "from-config"} <= set(secrets)
    assert secrets == sorted(secrets, key=len, reverse=True)
