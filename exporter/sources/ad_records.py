"""From LDAP entries to AdUser records: the attributes read and how their raw bytes are converted.

Entries are turned into records straight from the raw attribute bytes, page by page, so a
directory of any size never sits in memory as ldap3 ``Entry`` objects.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from exporter.ids import guid_bytes, sid_from_bytes
from exporter.model import AdTableBuilder, AdUser
from exporter.sources.ad_ldap import LdapSession, RawAttributes
from exporter.sources.bulk import generalized_times

NAN = float("nan")

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


@dataclass
class UserColumns:
    """Users field by field (one list per AdUser field; NaN for no whenCreated)."""

    guids: list[bytes] = field(default_factory=list)
    anchors: list[bytes] = field(default_factory=list)
    sids: list[str] = field(default_factory=list)
    sams: list[str] = field(default_factory=list)
    upns: list[str | None] = field(default_factory=list)
    created: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.guids)

    def add_to(self, builder: AdTableBuilder) -> None:
        builder.add_columns(
            guids=self.guids,
            anchors=self.anchors,
            sids=self.sids,
            sams=self.sams,
            upns=self.upns,
            created=self.created,
        )

    def users(self) -> Iterator[AdUser]:
        for guid, anchor, sid, sam, upn, created in zip(
            self.guids, self.anchors, self.sids, self.sams, self.upns, self.created, strict=True
        ):
            yield AdUser(guid, sid, sam, upn, anchor, None if created != created else created)


def users_of_page(
    entries: Sequence[tuple[str, RawAttributes]],
    source_anchor: str,
    seen: set[bytes],
    skipped: SkippedEntries | None = None,
) -> tuple[UserColumns, int]:
    """The usable users of one page of entries, each objectGUID once (``seen`` carries over from
    page to page), and how many of the entries were usable (duplicates included).

    The same checks and values as :func:`user_from_raw`, with the common forms of the binary SID
    and of whenCreated converted in bulk (this runs for every user of a full read).
    """
    times = generalized_times([first_value(raw, "whenCreated") for _, raw in entries])
    columns = UserColumns()
    consistency = source_anchor == CONSISTENCY_GUID
    usable = 0
    for (dn, raw), seconds in zip(entries, times.tolist(), strict=True):
        try:
            guid = object_guid(raw)
            if guid is None:
                raise ValueError("objectGUID is missing (not readable by the bind account?)")
            sid_raw = first_value(raw, "objectSid")
            if sid_raw is None:
                raise ValueError("objectSid is missing (not readable by the bind account?)")
            sid = sid_of(sid_raw)
            sam = text_value(raw, "sAMAccountName")
            if not sam:
                raise ValueError("sAMAccountName is missing")
            upn = text_value(raw, "userPrincipalName")
            anchor = (first_value(raw, CONSISTENCY_GUID) or guid) if consistency else guid
            if seconds != seconds:  # not in the common form (or missing): parsed one by one
                created = text_value(raw, "whenCreated")
                seconds = generalized_time_seconds(created) if created else NAN
        except ValueError as exc:
            if skipped is not None:
                skipped.add(dn, exc)
            continue
        usable += 1
        if guid in seen:
            continue
        seen.add(guid)
        columns.guids.append(guid)
        columns.anchors.append(anchor)
        columns.sids.append(sid)
        columns.sams.append(sam)
        columns.upns.append(upn)
        columns.created.append(seconds)
    return columns, usable


def read_user_pages(
    session: LdapSession,
    search_bases: Iterable[str],
    search_filter: str,
    source_anchor: str,
    page_size: int,
    skipped: SkippedEntries | None = None,
    per_base: dict[str, int] | None = None,
) -> Iterator[UserColumns]:
    """The users matching ``search_filter`` under every base, page by page, each once even when
    bases overlap. ``per_base`` (when given) receives the number of matching users under each base.
    """
    seen: set[bytes] = set()
    attributes = user_attributes(source_anchor)
    for base in search_bases:
        found = 0
        for entries in session.search_pages(base, search_filter, attributes, page_size=page_size):
            columns, usable = users_of_page(entries, source_anchor, seen, skipped)
            del entries
            found += usable
            yield columns
        if per_base is not None:
            per_base[base] = per_base.get(base, 0) + found


def stream_users(
    session: LdapSession,
    search_bases: Iterable[str],
    search_filter: str,
    source_anchor: str,
    page_size: int,
    skipped: SkippedEntries | None = None,
    per_base: dict[str, int] | None = None,
) -> Iterator[AdUser]:
    """:func:`read_user_pages` one user at a time."""
    for columns in read_user_pages(
        session, search_bases, search_filter, source_anchor, page_size, skipped, per_base
    ):
        yield from columns.users()


# ------------------------------------------------------------------------- bulk conversions
_SID_5_21 = b"\x01\x05\x00\x00\x00\x00\x00\x05"  # revision 1, 5 sub-authorities, NT authority
_FIVE_SUBAUTHORITIES = struct.Struct("<5I")


def sid_of(raw: bytes) -> str:
    """``S-1-...`` text of a binary SID; domain accounts (S-1-5 with 5 sub-authorities) at once."""
    if len(raw) == 28 and raw[:8] == _SID_5_21:
        a, b, c, d, e = _FIVE_SUBAUTHORITIES.unpack_from(raw, 8)
        return f"S-1-5-{a}-{b}-{c}-{d}-{e}"
    return sid_from_bytes(raw)


__all__ = [
    "BASE_ATTRIBUTES",
    "CONSISTENCY_GUID",
    "SkippedEntries",
    "UserColumns",
    "first_value",
    "generalized_time_seconds",
    "generalized_times",
    "int_value",
    "object_guid",
    "read_user_pages",
    "sid_of",
    "stream_users",
    "text_value",
    "user_attributes",
    "user_from_raw",
    "users_of_page",
]
