"""Point look-ups for `trace` on the real Samba DC (issue 11, CONTRACT "Tracing one user").

Every form of query a user may type, the out-of-scope reporting, and proof that nothing is read
beyond the few entries the escaped equality filters match.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterator
from typing import Any

import ldap3
import pytest

from exporter.model import AdTable
from exporter.sources.ad import ActiveDirectorySource
from tests.ad.conftest import CONTRACTORS_OU, STAFF_OU, Directory, SambaDC, make_config


def find(samba_dc: SambaDC, **query: Any) -> tuple[AdTable, list[str]]:
    source = ActiveDirectorySource(make_config(samba_dc))
    return source.find_users(deadline=time.monotonic() + 30, **query)


def sams(table: AdTable) -> list[str]:
    return sorted(table.record(row).sam_account_name for row in range(table.n))


@pytest.fixture
def filters(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, str]]]:
    """(base, filter) of every search request sent."""
    calls: list[tuple[str, str]] = []
    original = ldap3.Connection.search
    signature = inspect.signature(original)

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(self, *args, **kwargs)
        calls.append((bound.arguments["search_base"], bound.arguments["search_filter"]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ldap3.Connection, "search", spy)
    yield calls


# ------------------------------------------------------------------------------ query forms
@pytest.mark.parametrize(
    "text", ["zoe.angstrom@test.local", "ZOE.ANGSTROM@TEST.LOCAL", "Zoe.Angstrom@Test.Local"]
)
def test_upn_in_any_case(samba_dc: SambaDC, directory: Directory, text: str) -> None:
    table, lines = find(samba_dc, text=text)
    assert sams(table) == ["zoe.angstrom"] and lines == []
    assert table.record(0).object_guid == directory.users["zoe.angstrom"].guid_raw
    assert table.netbios_domain == "TEST"


def test_unicode_upn(samba_dc: SambaDC, directory: Directory) -> None:
    table, _ = find(samba_dc, text="李雷@test.local")
    assert sams(table) == ["lilei"]


@pytest.mark.parametrize("text", ["nora", "NORA", "TEST\\nora", "test\\Nora", " TEST\\nora "])
def test_sam_account_name_and_domain_form(samba_dc: SambaDC, directory: Directory, text: str) -> None:
    table, lines = find(samba_dc, text=text)
    assert sams(table) == ["nora"] and lines == []
    assert table.record(0).user_principal_name is None


def test_other_domain_does_not_match_and_says_why(samba_dc: SambaDC, directory: Directory) -> None:
    table, lines = find(samba_dc, text="FABRIKAM\\nora")
    assert table.n == 0
    assert len(lines) == 1 and "FABRIKAM" in lines[0] and "NetBIOS domain TEST" in lines[0]


def test_guid_text_with_or_without_braces_in_any_case(samba_dc: SambaDC, directory: Directory) -> None:
    shown = directory.users["zoe.angstrom"].guid_text  # ldap3's (and AD's) rendering, "{...}"
    assert shown.startswith("{")
    for text in (shown, shown.upper(), shown.strip("{}"), shown.strip("{}").upper()):
        table, lines = find(samba_dc, text=text)
        assert sams(table) == ["zoe.angstrom"] and lines == [], text


def test_sids_and_guids_from_the_other_sources(samba_dc: SambaDC, directory: Directory) -> None:
    zoe, lilei, nora = (directory.users[s] for s in ("zoe.angstrom", "lilei", "nora"))
    table, lines = find(samba_dc, sids=[zoe.sid_text.lower()], guids=[lilei.guid_raw])
    assert sams(table) == ["lilei", "zoe.angstrom"] and lines == []
    table, _ = find(samba_dc, text="nora", sids=[zoe.sid_text])
    assert sams(table) == ["nora", "zoe.angstrom"]
    assert {table.record(row).object_sid for row in range(table.n)} == {zoe.sid_text, nora.sid_text}


# --------------------------------------------------------------------------- out of scope
def test_disabled_user_is_reported_as_filtered_out(samba_dc: SambaDC, directory: Directory) -> None:
    table, lines = find(samba_dc, text="dana@test.local")
    assert table.n == 0
    assert lines == [f"{directory.users['dana'].dn} (TEST\\dana) does not match user_filter (disabled)"]


def test_user_in_another_ou_is_reported_as_outside_the_bases(samba_dc: SambaDC, directory: Directory) -> None:
    table, lines = find(samba_dc, text="TEST\\carl")
    assert table.n == 0
    assert lines == [f"{directory.users['carl'].dn} (TEST\\carl) is outside the search bases ({STAFF_OU})"]
    assert CONTRACTORS_OU in lines[0]


def test_in_and_out_of_scope_together(samba_dc: SambaDC, directory: Directory) -> None:
    carl = directory.users["carl"]
    table, lines = find(samba_dc, text="nora", guids=[carl.guid_raw])
    assert sams(table) == ["nora"]
    assert len(lines) == 1 and "TEST\\carl" in lines[0]


@pytest.mark.parametrize(
    "text", ["nobody@test.local", "ghost", "TEST\\ghost", "{00000000-0000-0000-0000-000000000001}"]
)
def test_no_match(samba_dc: SambaDC, directory: Directory, text: str) -> None:
    table, lines = find(samba_dc, text=text)
    assert table.n == 0 and lines == []


# ---------------------------------------------------------------------- escaping and cost
@pytest.mark.parametrize(
    "text", ["*", "bulk*", "bulk0001)(sAMAccountName=*", "*)(|(objectClass=*", "TEST\\bulk*\\", "(", "a\x00b"]
)
def test_filter_characters_are_values_not_syntax(samba_dc: SambaDC, directory: Directory, text: str) -> None:
    table, lines = find(samba_dc, text=text)
    assert table.n == 0 and lines == []  # a wildcard would have matched 250 bulk users


def test_only_point_look_ups_are_sent(
    samba_dc: SambaDC, directory: Directory, filters: list[tuple[str, str]]
) -> None:
    table, lines = find(samba_dc, text="TEST\\carl", sids=[directory.users["lilei"].sid_text])
    assert sams(table) == ["lilei"] and len(lines) == 1
    keys = ("(sAMAccountName=", "(userPrincipalName=", "(objectGUID=", "(objectSid=")
    for base, search_filter in filters:
        if base == "" or base.startswith("CN=Partitions,"):
            continue  # the rootDSE and the NetBIOS name: one entry each
        assert any(key in search_filter for key in keys), (base, search_filter)
        assert "*" not in search_filter.replace("(nETBIOSName=*)", ""), search_filter
