"""From LDAP entries to AdUser records: the attributes read and how their raw bytes are converted.

Entries are turned into records straight from the raw attribute bytes, page by page, so a
directory of any size never sits in memory as ldap3 ``Entry`` objects.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from exporter.ids import guid_bytes, sid_from_bytes
from exporter.model import AdUser
from exporter.sources.ad_ldap import LdapSession, RawAttributes

CONSISTENCY_GUID = "mS-DS-ConsistencyGuid"
BASE_ATTRIBUTES: tuple[str, ...] = (
    "objectGUID",
    "objectSid",
    "sAMAccountName",
    "userPrincipalName",
    "whenCreated",
)
_GENERALIZED_TIME = re.compile(
    r"^(?P<date>\d{14})(?:[.,](?P<frac>\d+))?(?P<tz>Z|[+-]\d{4})?$",
)


def generalized_time_seconds(text: str) -> float:
    """POSIX seconds from LDAP GeneralizedTime (``20240131235959.0Z``; AD always sends UTC)."""
    match = _GENERALIZED_TIME.match(text.strip())
    if match is None:
        raise ValueError(f"not a GeneralizedTime value: {text!r}")
    moment = datetime.strptime(match["date"], "%Y%m%d%H%M%S").replace(tzinfo=UTC)
    seconds = moment.timestamp()
    if match["frac"]:
        seconds += float("0." + match["frac"])
    tz = match["tz"]
    if tz and tz != "Z":
        offset = int(tz[1:3]) * 3600 + int(tz[3:5]) * 60
        seconds -= offset if tz[0] == "+" else -offset
    return seconds


def first_value(raw: RawAttributes, name: str) -> bytes | None:
    values = raw.get(name)
    if not values:
        return None
    value = values[0]
    return value if value else None


def text_value(raw: RawAttributes, name: str) -> str | None:
    value = first_value(raw, name)
    return None if value is None else value.decode("utf-8")


def int_value(raw: RawAttributes, name: str) -> int | None:
    text = text_value(raw, name)
    return None if text is None else int(text)


def object_guid(raw: RawAttributes) -> bytes | None:
    return guid_bytes(first_value(raw, "objectGUID"))


def user_from_raw(raw: RawAttributes, source_anchor: str) -> AdUser:
    """One AdUser from a search result's ``raw_attributes``; ValueError names what is wrong."""
    guid = object_guid(raw)
    if guid is None:
        raise ValueError("objectGUID is missing (not readable by the bind account?)")
    sid_raw = first_value(raw, "objectSid")
    if sid_raw is None:
        raise ValueError("objectSid is missing (not readable by the bind account?)")
    sam = text_value(raw, "sAMAccountName")
    if not sam:
        raise ValueError("sAMAccountName is missing")
    anchor = guid
    if source_anchor == CONSISTENCY_GUID:
        # AAD Connect falls back to objectGUID for users whose consistency GUID is not set yet.
        anchor = first_value(raw, CONSISTENCY_GUID) or guid
    created = text_value(raw, "whenCreated")
    return AdUser(
        object_guid=guid,
        object_sid=sid_from_bytes(sid_raw),
        sam_account_name=sam,
        user_principal_name=text_value(raw, "userPrincipalName"),
        source_anchor=anchor,
        when_created=generalized_time_seconds(created) if created else None,
    )


def user_attributes(source_anchor: str) -> list[str]:
    attributes = list(BASE_ATTRIBUTES)
    if source_anchor == CONSISTENCY_GUID:
        attributes.append(CONSISTENCY_GUID)
    return attributes


@dataclass
class SkippedEntries:
    """Entries that matched the filter but are not usable user accounts (counted, one example)."""

    count: int = 0
    example: str = ""

    def add(self, dn: str, problem: Exception) -> None:
        self.count += 1
        self.example = self.example or f"{dn}: {problem}"


def stream_users(
    session: LdapSession,
    search_bases: Iterable[str],
    search_filter: str,
    source_anchor: str,
    page_size: int,
    skipped: SkippedEntries | None = None,
    per_base: dict[str, int] | None = None,
) -> Iterator[AdUser]:
    """Users matching ``search_filter`` under every base, each once even when bases overlap.

    ``per_base`` (when given) receives the number of matching users found under each base.
    """
    seen: set[bytes] = set()
    attributes = user_attributes(source_anchor)
    for base in search_bases:
        found = 0
        for dn, raw in session.search(base, search_filter, attributes, page_size=page_size):
            try:
                user = user_from_raw(raw, source_anchor)
            except ValueError as exc:
                if skipped is not None:
                    skipped.add(dn, exc)
                continue
            found += 1
            if user.object_guid in seen:
                continue
            seen.add(user.object_guid)
            yield user
        if per_base is not None:
            per_base[base] = per_base.get(base, 0) + found


__all__ = [
    "BASE_ATTRIBUTES",
    "CONSISTENCY_GUID",
    "SkippedEntries",
    "first_value",
    "generalized_time_seconds",
    "int_value",
    "object_guid",
    "stream_users",
    "text_value",
    "user_attributes",
    "user_from_raw",
]
