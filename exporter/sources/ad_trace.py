"""Point look-ups of single users for ``trace``: escaped equality filters, never a directory read.

A query names a user by UPN, sAMAccountName, ``DOMAIN\\sam`` or objectGUID text (plus SIDs and raw
GUIDs the other sources found). The IN-SCOPE users are searched under the configured bases with
``(&<user_filter>(|...))``; a second search of the whole domain WITHOUT the user filter finds the
accounts that match the query but are out of scope, and a third (under the bases, by objectGUID)
tells "filtered out by user_filter" from "outside the search bases". Every value is escaped
(text with ldap3's escape_filter_chars, objectGUID/objectSid byte by byte), and every attribute
searched is indexed in AD, so a look-up reads a handful of entries whatever the directory's size.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from exporter.ids import sid_to_bytes
from exporter.model import AdTable, AdUser
from exporter.sources.ad_ldap import LdapSession, any_of, escape_binary, escape_text
from exporter.sources.ad_records import int_value, object_guid, text_value
from exporter.sources.ad_sync import RootDse, Scope

_DISABLED = 0x2  # userAccountControl ACCOUNTDISABLE
# More out-of-scope matches than this are not listed one by one (a query matches few accounts).
_MAX_REPORTED = 20


@dataclass
class TraceQuery:
    """The equality terms of one look-up."""

    names: list[str] = field(default_factory=list)  # UPN or sAMAccountName
    sams: list[str] = field(default_factory=list)  # sAMAccountName only (from DOMAIN\sam)
    guids: list[bytes] = field(default_factory=list)  # objectGUID, AD byte order
    sids: list[bytes] = field(default_factory=list)  # objectSid, binary
    notes: list[str] = field(default_factory=list)  # why a part of the query cannot match here

    def terms(self) -> list[str]:
        terms: list[str] = []
        for name in self.names:
            terms += [f"(userPrincipalName={escape_text(name)})", f"(sAMAccountName={escape_text(name)})"]
        terms += [f"(sAMAccountName={escape_text(sam)})" for sam in self.sams]
        terms += [f"(objectGUID={escape_binary(guid)})" for guid in dict.fromkeys(self.guids)]
        terms += [f"(objectSid={escape_binary(sid)})" for sid in dict.fromkeys(self.sids)]
        return list(dict.fromkeys(terms))


def guid_from_text(text: str) -> bytes | None:
    """objectGUID bytes from GUID text as AD and ldap3 show it (braces optional, any case)."""
    stripped = text.strip()
    if stripped.startswith("{") != stripped.endswith("}"):
        return None
    stripped = stripped.strip("{}")
    if len(stripped) != 36 or stripped.count("-") != 4:
        return None
    try:
        return uuid.UUID(stripped).bytes_le
    except ValueError:
        return None


def parse_query(
    text: str | None, sids: Iterable[str], guids: Iterable[bytes], netbios: str, where: str
) -> TraceQuery:
    query = TraceQuery(guids=[bytes(g) for g in guids if len(g) == 16])
    for sid in sids:
        _add_sid(query, sid)
    value = (text or "").strip()
    if not value:
        return query
    guid = guid_from_text(value)
    if guid is not None:
        query.guids.append(guid)
    elif value.upper().startswith("S-1-"):
        _add_sid(query, value)
    elif "\\" in value:
        domain, _, sam = value.partition("\\")
        if domain.strip().upper() == netbios.upper() and sam:
            query.sams.append(sam)
        else:
            query.notes.append(
                f"{value}: {domain or '(empty)'} is not the NetBIOS domain {netbios} of {where}"
            )
    else:
        query.names.append(value)
    return query


def _add_sid(query: TraceQuery, sid: str) -> None:
    try:
        query.sids.append(sid_to_bytes(sid.strip()))
    except ValueError:
        query.notes.append(f"{sid}: not a SID")


def domain_root(root: RootDse, bases: Sequence[str]) -> str:
    """The domain to search for out-of-scope matches: the rootDSE's defaultNamingContext, or the
    DC= part of the first search base (directories without a defaultNamingContext)."""
    if root.default_nc:
        return root.default_nc
    parts = [part for part in bases[0].split(",") if part.strip().lower().startswith("dc=")]
    return ",".join(part.strip() for part in parts) or bases[0]


def find_in_scope(session: LdapSession, scope: Scope, terms: Sequence[str]) -> list[AdUser]:
    query = any_of(terms)
    return list(scope.users(session, f"(&{scope.user_filter}{query})"))


@dataclass(frozen=True)
class _Match:
    dn: str
    sam: str | None
    disabled: bool


def out_of_scope_lines(
    session: LdapSession, scope: Scope, domain: str, terms: Sequence[str], in_scope: set[bytes]
) -> list[str]:
    """One line per account that matches the query outside the scope, saying why it is outside."""
    matches: dict[bytes, _Match] = {}
    attributes = ["objectGUID", "sAMAccountName", "userAccountControl"]
    for dn, raw in session.search(domain, any_of(terms), attributes, page_size=scope.page_size):
        guid = object_guid(raw)
        if guid is None or guid in in_scope:
            continue
        uac = int_value(raw, "userAccountControl") or 0
        matches[guid] = _Match(dn, text_value(raw, "sAMAccountName"), bool(uac & _DISABLED))
        if len(matches) >= _MAX_REPORTED:
            break
    if not matches:
        return []
    under_bases: set[bytes] = set()
    by_guid = any_of([f"(objectGUID={escape_binary(guid)})" for guid in matches])
    for base in scope.search_bases:
        for _, raw in session.search(base, by_guid, ["objectGUID"], page_size=scope.page_size):
            guid = object_guid(raw)
            if guid is not None:
                under_bases.add(guid)
    return [_describe(match, guid in under_bases, scope) for guid, match in matches.items()]


def _describe(match: _Match, under_bases: bool, scope: Scope) -> str:
    name = f" ({scope.netbios_domain}\\{match.sam})" if match.sam else ""
    if under_bases:
        why = " (disabled)" if match.disabled else ""
        return f"{match.dn}{name} does not match user_filter{why}"
    bases = "; ".join(scope.search_bases)
    disabled = ", and it is disabled" if match.disabled else ""
    return f"{match.dn}{name} is outside the search bases ({bases}){disabled}"


def find_users(
    session: LdapSession,
    root: RootDse,
    scope: Scope,
    where: str,
    text: str | None,
    sids: Iterable[str],
    guids: Iterable[bytes],
) -> tuple[AdTable, list[str]]:
    query = parse_query(text, sids, guids, scope.netbios_domain, where)
    terms = query.terms()
    if not terms:
        return AdTable.from_records((), scope.netbios_domain).prepare(), query.notes
    users = find_in_scope(session, scope, terms)
    in_scope = {user.object_guid for user in users}
    domain = domain_root(root, scope.search_bases)
    lines = query.notes + out_of_scope_lines(session, scope, domain, terms, in_scope)
    return AdTable.from_records(users, scope.netbios_domain).prepare(), lines


__all__ = ["TraceQuery", "domain_root", "find_users", "guid_from_text", "parse_query"]
