"""Incremental reads of Active Directory: what changed since the last read, by ``uSNChanged``.

``uSNChanged`` is a per-DC counter (not replicated), so an incremental read is only valid against
the domain controller that served the previous read: the table's meta keeps that DC's
``dsServiceName``, its ``invocationId`` (from the NTDS Settings object dsServiceName names; it
changes when the DC is restored from a backup) and the ``highestCommittedUSN`` read from the rootDSE
BEFORE the search. Another DC, another invocationId, a USN that went backwards or a changed scope
(search_bases, user_filter, source_anchor, NetBIOS name) means a full read.

One incremental read (N = the stored USN, ``(uSNChanged>=N+1)`` = "changed"):

1. every changed object of the domain, objectGUID only and WITHOUT the user filter, with the Show
   Deleted control so that tombstones come back too when the bind account may read them;
2. the changed OUs/containers under the search bases: one we did not know (created, or moved in
   with users inside, whose own uSNChanged does not move) gets its users read in full; a known one
   that changed but is no longer under a base moved out, and its users are dropped;
3. the changed users in scope: ``(&(uSNChanged>=N+1)<user_filter>)`` under each base;
4. a user we hold that changed (1) but is not in (3) has left the scope (disabled, moved out,
   deleted): it is dropped.

So moves out of scope and accounts that stop matching the filter are exact. Deletions are exact
when the bind account can read tombstones (AD: List Contents + Read Property on CN=Deleted Objects,
which only administrators have by default; probed at every full read and kept in
``meta["deletions"]``); otherwise a deleted account stays until the next full read, the contract's
one allowed lag. A ``user_filter`` on attributes uSNChanged does not track on the user (memberOf is
a back link: adding a user to a group changes the group) makes every refresh a full read.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ldap3.core import exceptions as ldap_errors

from exporter.model import AdTable, AdUser
from exporter.sources.ad_ldap import (
    SHOW_DELETED,
    SHOW_DELETED_CONTROL,
    BaseNotFound,
    Control,
    DeadlineReached,
    IncompleteSearch,
    LdapSession,
)
from exporter.sources.ad_records import (
    SkippedEntries,
    UserColumns,
    first_value,
    int_value,
    object_guid,
    read_user_pages,
    stream_users,
    text_value,
)

log = logging.getLogger(__name__)

META_DC = "dc"
META_SCOPE = "scope"
META_CONTAINERS = "containers"
META_DELETIONS = "deletions"
DELETIONS_EXACT = "tombstones"
DELETIONS_LAG = "next full read"
# Objects a user account can live under (possSuperiors of user in the AD schema).
CONTAINER_FILTER = (
    "(|(objectClass=organizationalUnit)(objectClass=container)"
    "(objectClass=builtinDomain)(objectClass=domainDNS))"
)
# Attributes whose value changes without the user's own uSNChanged moving.
_UNTRACKED_ATTRIBUTES = ("memberof", "msds-user-account-control-computed", "tokengroups", "msds-resultantpso")
# The well-known GUID of the Deleted Objects container (GUID_DELETED_OBJECTS_CONTAINER_W).
_DELETED_OBJECTS_WKGUID = "18e2ea80684f11d2b9aa00c04f79f805"


# ------------------------------------------------------------------------------- the DC's state
@dataclass(frozen=True)
class RootDse:
    default_nc: str | None
    config_nc: str | None
    service: str | None  # dsServiceName: the DN of the DC's NTDS Settings object
    usn: int | None  # highestCommittedUSN
    show_deleted: bool  # the Show Deleted control is supported
    # Not an AD rootDSE attribute: directories that imitate AD for tests and benchmarks (OpenLDAP
    # with a rootDSE file) publish it here, having no NTDS Settings object.
    invocation_id: bytes | None = None


@dataclass(frozen=True)
class DcState:
    """Which DC answered, in which incarnation, and up to which USN the data is complete."""

    service: str
    invocation_id: str  # hex of the 16 raw bytes
    usn: int

    def to_meta(self) -> dict[str, Any]:
        return {"service": self.service, "invocation_id": self.invocation_id, "usn": self.usn}

    @classmethod
    def from_meta(cls, value: object) -> DcState | None:
        if not isinstance(value, Mapping):
            return None
        service, invocation, usn = value.get("service"), value.get("invocation_id"), value.get("usn")
        if not isinstance(service, str) or not isinstance(invocation, str) or not isinstance(usn, int):
            return None
        return cls(service, invocation, usn)


def read_root(session: LdapSession) -> RootDse:
    attributes = [
        "defaultNamingContext",
        "configurationNamingContext",
        "dsServiceName",
        "highestCommittedUSN",
        "supportedControl",
        "invocationId",
    ]
    try:
        raw = session.read("", attributes) or {}
    except (IncompleteSearch, ldap_errors.LDAPOperationResult) as exc:
        # Not every directory shows its rootDSE to every account: go on without it (no
        # incremental reads; the NetBIOS name must then be configured).
        log.debug("reading the rootDSE failed: %s", exc)
        raw = {}
    controls = {value.decode("ascii", "replace") for value in raw.get("supportedControl") or ()}
    try:
        usn = int_value(raw, "highestCommittedUSN")
    except ValueError:
        usn = None
    return RootDse(
        default_nc=text_value(raw, "defaultNamingContext"),
        config_nc=text_value(raw, "configurationNamingContext"),
        service=text_value(raw, "dsServiceName"),
        usn=usn,
        show_deleted=SHOW_DELETED in controls,
        invocation_id=first_value(raw, "invocationId"),
    )


def read_dc_state(session: LdapSession, root: RootDse) -> tuple[DcState | None, str]:
    """The DC's state, or None and why incremental reads are impossible against this server."""
    if root.usn is None or not root.service:
        return None, "the rootDSE has no highestCommittedUSN/dsServiceName (not an Active Directory DC?)"
    ntds = session.read(root.service, ["invocationId"])
    invocation = first_value(ntds or {}, "invocationId") or root.invocation_id
    if invocation is None:
        return None, f"the invocationId of {root.service} cannot be read by the bind account"
    return DcState(root.service, invocation.hex(), root.usn), ""


def deletions_visible(session: LdapSession, root: RootDse) -> bool:
    """Whether the bind account can read tombstones: the Deleted Objects container's objectGUID is
    readable with the Show Deleted control (AD grants this to administrators only by default)."""
    if not root.show_deleted or not root.default_nc:
        return False
    container = f"<WKGUID={_DELETED_OBJECTS_WKGUID},{root.default_nc}>"
    try:
        raw = session.read(container, ["objectGUID"], controls=[SHOW_DELETED_CONTROL])
    except DeadlineReached:
        raise
    except Exception as exc:  # any refusal means "not visible"; the read itself goes on
        if session.aborted:
            raise
        log.debug("probing tombstone visibility failed: %s", exc)
        return False
    return object_guid(raw or {}) is not None


# ------------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class Scope:
    """What decides which users a table holds; a table read with another scope is not continued."""

    search_bases: tuple[str, ...]
    user_filter: str
    source_anchor: str
    netbios_domain: str
    page_size: int

    def fingerprint(self) -> str:
        text = json.dumps(
            [list(self.search_bases), self.user_filter, self.source_anchor, self.netbios_domain]
        )
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]

    def users(
        self,
        session: LdapSession,
        search_filter: str,
        bases: Sequence[str] | None = None,
        skipped: SkippedEntries | None = None,
        per_base: dict[str, int] | None = None,
    ) -> Iterator[AdUser]:
        """The users matching ``search_filter`` under ``bases`` (default: the search bases)."""
        bases = self.search_bases if bases is None else bases
        return stream_users(
            session, bases, search_filter, self.source_anchor, self.page_size, skipped, per_base
        )

    def user_pages(
        self,
        session: LdapSession,
        search_filter: str,
        skipped: SkippedEntries | None = None,
        per_base: dict[str, int] | None = None,
    ) -> Iterator[UserColumns]:
        """:meth:`users` under the search bases, page by page and field by field (full reads)."""
        return read_user_pages(
            session, self.search_bases, search_filter, self.source_anchor, self.page_size, skipped, per_base
        )


def untracked_filter_reason(user_filter: str) -> str | None:
    lowered = user_filter.lower()
    for name in _UNTRACKED_ATTRIBUTES:
        if name in lowered:
            return f"user_filter uses {name}, whose changes uSNChanged does not track on the user"
    return None


def full_read_reason(previous: AdTable | None, dc: DcState | None, scope: Scope) -> str | None:
    """Why this refresh must read everything; None when it can continue from ``previous``."""
    if previous is None:
        return "a full read was requested"
    if dc is None:
        return "this server offers no incremental reads"
    before = DcState.from_meta(previous.meta.get(META_DC))
    if before is None:
        return "the previous data has no incremental state"
    if previous.meta.get(META_SCOPE) != scope.fingerprint():
        return "search_bases, user_filter, source_anchor or the NetBIOS name changed"
    if before.service.lower() != dc.service.lower():
        return f"another domain controller answered ({dc.service}, was {before.service})"
    if before.invocation_id != dc.invocation_id:
        return f"the invocationId of {dc.service} changed (the DC was restored)"
    if dc.usn < before.usn:
        return f"highestCommittedUSN went backwards ({dc.usn} < {before.usn})"
    if not isinstance(previous.meta.get(META_CONTAINERS), list):
        return "the previous data has no container list"
    return None


# ---------------------------------------------------------------------------- reading changes
def read_containers(session: LdapSession, bases: Iterable[str], page_size: int) -> set[str]:
    """objectGUIDs (hex) of every OU/container under the bases (the bases included)."""
    found: set[str] = set()
    for base in bases:
        for _, raw in session.search(base, CONTAINER_FILTER, ["objectGUID"], page_size=page_size):
            guid = object_guid(raw)
            if guid is not None:
                found.add(guid.hex())
    return found


@dataclass
class Changes:
    upserts: dict[bytes, AdUser] = field(default_factory=dict)
    removed: set[bytes] = field(default_factory=set)
    containers: set[str] = field(default_factory=set)
    in_scope_per_base: dict[str, int] = field(default_factory=dict)


def _under_domain(base: str, domain_nc: str) -> bool:
    def normal(dn: str) -> str:
        return ",".join(part.strip() for part in dn.lower().split(","))

    return normal(base).endswith(normal(domain_nc))


def _changed_objects(
    session: LdapSession, roots: Sequence[str], changed: str, page_size: int, controls: Sequence[Control]
) -> dict[bytes, str]:
    touched: dict[bytes, str] = {}
    for root in roots:
        for dn, raw in session.search(root, changed, ["objectGUID"], page_size=page_size, controls=controls):
            guid = object_guid(raw)
            if guid is not None:
                touched[guid] = dn
    return touched


def read_changes(
    session: LdapSession,
    root: RootDse,
    scope: Scope,
    since: int,
    known_containers: set[str],
    skipped: SkippedEntries,
) -> Changes:
    """What changed in scope since USN ``since - 1`` (see the module docstring for the steps)."""
    changed = f"(uSNChanged>={since})"
    domain_nc = root.default_nc or ""
    roots = [domain_nc] if domain_nc else []
    roots += [base for base in scope.search_bases if not domain_nc or not _under_domain(base, domain_nc)]
    controls = [SHOW_DELETED_CONTROL] if root.show_deleted else []
    result = Changes(containers=set(known_containers))

    touched = _changed_objects(session, roots, changed, scope.page_size, controls)  # step 1
    _apply_container_changes(session, scope, changed, touched, result, skipped)  # step 2
    in_scope_filter = f"(&{changed}{scope.user_filter})"
    for user in scope.users(session, in_scope_filter, skipped=skipped, per_base=result.in_scope_per_base):
        result.upserts[user.object_guid] = user
    result.removed |= {guid for guid in touched if guid not in result.upserts}  # step 4
    result.removed -= set(result.upserts)
    return result


def _apply_container_changes(
    session: LdapSession,
    scope: Scope,
    changed: str,
    touched: Mapping[bytes, str],
    result: Changes,
    skipped: SkippedEntries,
) -> None:
    in_scope: dict[bytes, str] = {}
    for base in scope.search_bases:
        found = session.search(
            base, f"(&{changed}{CONTAINER_FILTER})", ["objectGUID"], page_size=scope.page_size
        )
        for dn, raw in found:
            guid = object_guid(raw)
            if guid is not None:
                in_scope[guid] = dn
    for guid, dn in in_scope.items():
        if guid.hex() in result.containers:
            continue  # known: changed (renamed, moved within scope, a GPO linked), same users
        # Created or moved in: its users' own uSNChanged did not move, so read them all.
        for user in scope.users(session, scope.user_filter, [dn], skipped):
            result.upserts[user.object_guid] = user
        result.containers |= read_containers(session, [dn], scope.page_size)
    for guid, dn in touched.items():
        if guid.hex() not in result.containers or guid in in_scope:
            continue
        # A container we knew in scope changed and is no longer under a base: moved out (or
        # deleted, whose children are tombstones of their own). Its users left with it.
        result.containers.discard(guid.hex())
        result.removed |= _objects_under(session, dn, scope.page_size)


def _objects_under(session: LdapSession, dn: str, page_size: int) -> set[bytes]:
    try:
        return {
            guid
            for _, raw in session.search(dn, "(objectClass=*)", ["objectGUID"], page_size=page_size)
            if (guid := object_guid(raw)) is not None
        }
    except BaseNotFound:  # a tombstone: not searchable without the control; nothing under it
        return set()


__all__ = [
    "DELETIONS_EXACT",
    "DELETIONS_LAG",
    "META_CONTAINERS",
    "META_DC",
    "META_DELETIONS",
    "META_SCOPE",
    "Changes",
    "DcState",
    "RootDse",
    "Scope",
    "deletions_visible",
    "full_read_reason",
    "read_changes",
    "read_containers",
    "read_dc_state",
    "read_root",
    "untracked_filter_reason",
]
