"""The data read from the backends: one record type per backend row, one compact table per source.

Sources turn each backend row into a small frozen *record* (:class:`AdUser`, :class:`EntraUser`,
:class:`CmUser`, :class:`ManagedDevice`) and append it to a table builder; records are never kept.
The *tables* hold every field as a column (see exporter.tables) plus the precomputed 64-bit join
keys of each row, so the stage model joins hundreds of thousands of users with a few vectorised
operations and a snapshot costs ~150 bytes per user and source instead of ~700.

Normalisation happens in the source: GUIDs are raw 16-byte values (AD's objectGUID in its storage
order; Entra object ids and ConfigMgr CloudUserIDs in RFC 4122 order, i.e. ``uuid.UUID(text).bytes``),
SIDs are upper-case ``S-1-...`` text, times are POSIX seconds (UTC), None where unknown.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

from exporter.columns import (
    I64,
    NO_KEY,
    SortedIndex,
    bytes_keys,
    guid_keys,
    guid_order_key,
    text_key,
    text_keys,
)
from exporter.tables import Col, Table, TableBuilder

SourceKind = Literal["ad", "entra", "entra_organization", "configmgr", "intune_devices"]
ErrorReason = Literal["auth", "timeout", "network", "throttled", "data", "other"]
ERROR_REASONS: tuple[ErrorReason, ...] = ("auth", "timeout", "network", "throttled", "data", "other")
NAN = float("nan")


def _time(value: float | None) -> float:
    return NAN if value is None else float(value)


def _optional_time(value: float) -> float | None:
    return None if value != value else float(value)  # NaN is "unknown"


def guid_text_of(raw: bytes) -> str:
    """Lower-case GUID text of 16 bytes in RFC 4122 order (Entra ids, CloudUserIDs)."""
    return str(uuid.UUID(bytes=raw))


def ad_guid_text(raw: bytes) -> str:
    """objectGUID as AD and ldap3 show it: the little-endian struct as text."""
    return str(uuid.UUID(bytes_le=raw))


def object_id_bytes(text: str) -> bytes:
    """16 bytes in RFC 4122 order from GUID text (any case, braces allowed)."""
    return uuid.UUID(text.strip().strip("{}")).bytes


# =========================================================================== Active Directory
@dataclass(frozen=True, slots=True)
class AdUser:
    object_guid: bytes  # 16 raw bytes, as stored in AD
    object_sid: str  # "S-1-5-21-..."
    sam_account_name: str
    user_principal_name: str | None
    # Raw bytes of the configured source anchor (objectGUID or mS-DS-ConsistencyGuid, with the
    # per-user fallback to objectGUID already applied). base64 of it is Entra's immutable id.
    source_anchor: bytes
    when_created: float | None


class AdTable(Table):
    """The in-scope AD users of one estate (``netbios_domain`` in meta, for DOMAIN\\sam matching)."""

    COLUMNS = (
        Col("guid", "guid"),
        Col("anchor", "bytes"),
        Col("sid", "text"),
        Col("sam", "text"),
        Col("upn", "text"),
        Col("created", "f8"),
        Col("k_guid", "u64"),
        Col("k_imm", "u64"),  # base64(anchor), exact
        Col("k_sid", "u64"),
        Col("k_name", "u64"),  # DOMAIN\sam, case-insensitive
        Col("k_upn", "u64"),  # case-insensitive
    )

    __slots__ = ()

    @property
    def netbios_domain(self) -> str:
        return str(self.meta.get("netbios_domain", ""))

    @property
    def records(self) -> int:
        return self.n

    def record(self, row: int) -> AdUser:
        return AdUser(
            object_guid=bytes(self.array("guid")[row].tobytes()),
            object_sid=self.text("sid", row) or "",
            sam_account_name=self.text("sam", row) or "",
            user_principal_name=self.text("upn", row),
            source_anchor=self.blob("anchor").raw(row) or b"",
            when_created=_optional_time(float(self.array("created")[row])),
        )

    def index(self, key: str) -> SortedIndex:
        return self.cached(f"index:{key}", lambda: SortedIndex.build(self.array(key)))

    def build_indexes(self) -> None:
        for key in ("k_guid", "k_imm", "k_sid", "k_name", "k_upn"):
            self.index(key)

    def row_of_guid(self, guid: bytes) -> int | None:
        key = int(guid_keys(np.frombuffer(guid, dtype="V16"))[0])
        for row in self.index("k_guid").rows_with(key):
            if bytes(self.array("guid")[row].tobytes()) == guid:
                return int(row)
        return None

    @classmethod
    def from_records(cls, users: Iterable[AdUser], netbios_domain: str) -> AdTable:
        builder = AdTableBuilder(netbios_domain)
        for user in users:
            builder.add(user)
        return builder.build()

    def with_changes(self, upserts: Iterable[AdUser], removed: Iterable[bytes]) -> AdTable:
        """This table with users added or replaced (by objectGUID) and others removed."""
        return self.merged_with(AdTable.from_records(upserts, self.netbios_domain), removed)

    def merged_with(self, changes: AdTable, removed: Iterable[bytes]) -> AdTable:
        """This table with the rows of ``changes`` added or replacing theirs (by objectGUID) and the
        ``removed`` objectGUIDs dropped; ``changes``' meta wins."""
        changed: set[bytes] = set(removed)
        changed.update(guid.tobytes() for guid in changes.array("guid"))
        return _merge(self, changes, changed, "guid")


def _adkeys(user: AdUser, netbios: str) -> dict[str, int]:
    name = f"{netbios}\\{user.sam_account_name}" if user.sam_account_name else None
    return {
        "k_imm": text_key(base64.b64encode(user.source_anchor).decode("ascii"), fold=False),
        "k_sid": text_key(user.object_sid),
        "k_name": text_key(name),
        "k_upn": text_key(user.user_principal_name),
    }


class AdTableBuilder:
    def __init__(self, netbios_domain: str) -> None:
        self.netbios_domain = netbios_domain
        self._builder = TableBuilder(AdTable)

    def add(self, user: AdUser) -> None:
        self._builder.add(
            {
                "guid": user.object_guid,
                "anchor": user.source_anchor,
                "sid": user.object_sid,
                "sam": user.sam_account_name,
                "upn": user.user_principal_name,
                "created": _time(user.when_created),
                "k_guid": NO_KEY,  # vectorised in build()
                **_adkeys(user, self.netbios_domain),
            }
        )

    def add_columns(
        self,
        *,
        guids: Sequence[bytes],
        anchors: Sequence[bytes],
        sids: Sequence[str],
        sams: Sequence[str],
        upns: Sequence[str | None],
        created: Sequence[float] | np.ndarray[Any, np.dtype[np.float64]],
    ) -> None:
        """Many users at once, field by field (NaN: no whenCreated); the same table as :meth:`add`
        of each, with the keys hashed in one pass per column."""
        netbios = self.netbios_domain
        count = len(guids)
        self._builder.extend(
            {
                "guid": guids,
                "anchor": anchors,
                "sid": sids,
                "sam": sams,
                "upn": upns,
                "created": created,
                "k_guid": np.zeros(count, dtype=np.uint64),  # vectorised in build()
                "k_imm": bytes_keys([binascii.b2a_base64(a, newline=False) for a in anchors]),
                "k_sid": text_keys(sids),
                "k_name": text_keys([f"{netbios}\\{sam}" if sam else None for sam in sams]),
                "k_upn": text_keys(upns),
            }
        )

    @property
    def rows(self) -> int:
        return self._builder.rows

    def build(self) -> AdTable:
        columns = self._builder.columns()
        columns["k_guid"] = guid_keys(columns["guid"])  # type: ignore[arg-type]
        return AdTable(columns, meta={"netbios_domain": self.netbios_domain})


# =========================================================================== Entra ID (users)
@dataclass(frozen=True, slots=True)
class AssignedLicense:
    sku_id: str  # lower-case GUID
    disabled_plans: tuple[str, ...] = ()  # lower-case service plan GUIDs


@dataclass(frozen=True, slots=True)
class LicenseState:
    """One entry of a user's licenseAssignmentStates."""

    sku_id: str  # lower-case GUID
    state: str | None = "Active"  # Active | ActiveWithError | Disabled | Error
    error: str | None = "None"  # None | CountViolation | MutuallyExclusiveViolation | ...
    assigned_by_group: str | None = None  # lower-case group id; None: assigned directly
    disabled_plans: tuple[str, ...] = ()
    last_updated: float | None = None


@dataclass(frozen=True, slots=True)
class EntraUser:
    id: str  # lower-case object id
    user_principal_name: str | None
    on_premises_sync_enabled: bool
    on_premises_immutable_id: str | None
    on_premises_security_identifier: str | None  # upper-case "S-1-..."
    created: float | None = None  # createdDateTime; null for some pre-2018 users
    account_enabled: bool | None = None
    # One entry per onPremisesProvisioningErrors item: its `category` (e.g. "PropertyConflict").
    provisioning_error_categories: tuple[str, ...] = ()
    assigned_licenses: tuple[AssignedLicense, ...] = ()
    license_states: tuple[LicenseState, ...] = ()
    usage_location: str | None = None


class EntraErrorTable(Table):
    COLUMNS = (Col("row", "i8"), Col("category", "cat"))
    __slots__ = ()


class AssignedLicenseTable(Table):
    COLUMNS = (Col("row", "i8"), Col("sku", "cat"), Col("disabled", "cat"))
    __slots__ = ()


class LicenseStateTable(Table):
    COLUMNS = (
        Col("row", "i8"),
        Col("sku", "cat"),
        Col("state", "cat"),
        Col("error", "cat"),
        Col("group", "cat"),
        Col("disabled", "cat"),
        Col("updated", "f8"),
    )
    __slots__ = ()


def plans_text(plans: Sequence[str]) -> str:
    """A set of service plan ids as one categorical value (sorted, comma-separated)."""
    return ",".join(sorted(plans))


class EntraTable(Table):
    """Every user Graph returned (cloud-only included); ``synced`` marks onPremisesSyncEnabled true.

    meta: ``group_names`` (group id -> display name, for licence errors assigned by a group).
    """

    COLUMNS = (
        Col("id", "guid"),
        Col("upn", "text"),
        Col("synced", "bool"),
        Col("imm", "text"),
        Col("sid", "text"),
        Col("created", "f8"),
        Col("enabled", "i1"),  # 1 true, 0 false, -1 unknown
        Col("usage_location", "text"),
        Col("k_id", "u64"),
        Col("k_imm", "u64"),
        Col("k_sid", "u64"),
        Col("k_upn", "u64"),
    )
    CHILDREN: ClassVar[Mapping[str, type[Table]]] = {
        "errors": EntraErrorTable,
        "licenses": AssignedLicenseTable,
        "states": LicenseStateTable,
    }
    __slots__ = ()

    @property
    def records(self) -> int:
        return self.n

    @property
    def group_names(self) -> Mapping[str, str]:
        return dict(self.meta.get("group_names") or {})

    def id_text(self, row: int) -> str:
        return guid_text_of(bytes(self.array("id")[row].tobytes()))

    def record(self, row: int) -> EntraUser:
        enabled = int(self.array("enabled")[row])
        errors = self.children["errors"]
        licenses = self.children["licenses"]
        states = self.children["states"]
        return EntraUser(
            id=self.id_text(row),
            user_principal_name=self.text("upn", row),
            on_premises_sync_enabled=bool(self.array("synced")[row]),
            on_premises_immutable_id=self.text("imm", row),
            on_premises_security_identifier=self.text("sid", row),
            created=_optional_time(float(self.array("created")[row])),
            account_enabled=None if enabled < 0 else bool(enabled),
            provisioning_error_categories=tuple(
                errors.cat("category").get(int(i)) or "" for i in _child_rows(errors, row)
            ),
            assigned_licenses=tuple(
                AssignedLicense(
                    licenses.cat("sku").get(int(i)) or "", _plans(licenses.cat("disabled").get(int(i)))
                )
                for i in _child_rows(licenses, row)
            ),
            license_states=tuple(_license_state(states, int(i)) for i in _child_rows(states, row)),
            usage_location=self.text("usage_location", row),
        )

    def synced_index(self, key: str) -> SortedIndex:
        """Synced users by ``key``; among duplicates the lowest object id wins (deterministic)."""

        def build() -> SortedIndex:
            keys = np.where(self.array("synced"), self.array(key), np.uint64(NO_KEY))
            return SortedIndex.build(keys, preference=self._id_rank())

        return self.cached(f"synced:{key}", build)

    def other_index(self, key: str) -> SortedIndex:
        """Users that are NOT synced (onPremisesSyncEnabled not true) by ``key``."""

        def build() -> SortedIndex:
            keys = np.where(self.array("synced"), np.uint64(NO_KEY), self.array(key))
            return SortedIndex.build(keys, preference=self._id_rank())

        return self.cached(f"other:{key}", build)

    def index(self, key: str) -> SortedIndex:
        return self.cached(f"index:{key}", lambda: SortedIndex.build(self.array(key), self._id_rank()))

    def _id_rank(self) -> I64:
        def build() -> I64:
            high, low = guid_order_key(self.array("id"))
            rank = np.empty(self.n, dtype=np.int64)
            rank[np.lexsort((low, high))] = np.arange(self.n, dtype=np.int64)
            return rank

        return self.cached("id_rank", build)

    def build_indexes(self) -> None:
        for key in ("k_imm", "k_sid"):
            self.synced_index(key)
        for key in ("k_imm", "k_sid", "k_upn"):
            self.other_index(key)
        self.index("k_id")

    def row_of_id(self, object_id: str) -> int | None:
        raw = object_id_bytes(object_id)
        key = int(guid_keys(np.frombuffer(raw, dtype="V16"))[0])
        for row in self.index("k_id").rows_with(key):
            if bytes(self.array("id")[row].tobytes()) == raw:
                return int(row)
        return None

    @classmethod
    def from_records(
        cls, users: Iterable[EntraUser], group_names: Mapping[str, str] | None = None
    ) -> EntraTable:
        builder = EntraTableBuilder(group_names)
        for user in users:
            builder.add(user)
        return builder.build()

    def with_changes(
        self,
        upserts: Iterable[EntraUser],
        removed: Iterable[str],
        group_names: Mapping[str, str] | None = None,
    ) -> EntraTable:
        builder = EntraTableBuilder(self.group_names if group_names is None else group_names)
        changed = {object_id_bytes(r) for r in removed}
        for user in upserts:
            builder.add(user)
            changed.add(object_id_bytes(user.id))
        return _merge(self, builder.build(), changed, "id")

    def with_group_names(self, group_names: Mapping[str, str]) -> EntraTable:
        return self.derive(self.columns(), self.children, {**self.meta, "group_names": dict(group_names)})


def _child_rows(child: Table, row: int) -> I64:
    return np.flatnonzero(child.array("row") == row)


def _plans(text: str | None) -> tuple[str, ...]:
    return tuple(p for p in (text or "").split(",") if p)


def _license_state(states: Table, i: int) -> LicenseState:
    return LicenseState(
        sku_id=states.cat("sku").get(i) or "",
        state=states.cat("state").get(i),
        error=states.cat("error").get(i),
        assigned_by_group=states.cat("group").get(i),
        disabled_plans=_plans(states.cat("disabled").get(i)),
        last_updated=_optional_time(float(states.array("updated")[i])),
    )


@dataclass
class EntraColumns:
    """Entra users field by field, with their child rows (``*_rows``: the user's position in these
    lists); what :meth:`EntraTableBuilder.add_columns` takes. Times are NaN where unknown, plans are
    :func:`plans_text`, ``enabled`` 1/0/-1."""

    ids: list[bytes] = field(default_factory=list)  # raw 16 bytes, RFC 4122 order
    upns: list[str | None] = field(default_factory=list)
    synced: list[bool] = field(default_factory=list)
    imms: list[str | None] = field(default_factory=list)
    sids: list[str | None] = field(default_factory=list)
    created: list[float] = field(default_factory=list)
    enabled: list[int] = field(default_factory=list)
    usage_locations: list[str | None] = field(default_factory=list)
    error_rows: list[int] = field(default_factory=list)
    error_categories: list[str] = field(default_factory=list)
    license_rows: list[int] = field(default_factory=list)
    license_skus: list[str] = field(default_factory=list)
    license_disabled: list[str] = field(default_factory=list)
    state_rows: list[int] = field(default_factory=list)
    state_skus: list[str] = field(default_factory=list)
    state_states: list[str | None] = field(default_factory=list)
    state_errors: list[str | None] = field(default_factory=list)
    state_groups: list[str | None] = field(default_factory=list)
    state_disabled: list[str] = field(default_factory=list)
    state_updated: list[float] = field(default_factory=list)

    def add_user(self, user: EntraUser) -> None:
        """One user given as a record (the exact path's result)."""
        row = len(self.ids)
        self.ids.append(object_id_bytes(user.id))
        self.upns.append(user.user_principal_name)
        self.synced.append(bool(user.on_premises_sync_enabled))
        self.imms.append(user.on_premises_immutable_id)
        self.sids.append(user.on_premises_security_identifier)
        self.created.append(_time(user.created))
        self.enabled.append(-1 if user.account_enabled is None else int(user.account_enabled))
        self.usage_locations.append(user.usage_location)
        for category in user.provisioning_error_categories:
            self.error_rows.append(row)
            self.error_categories.append(category)
        for lic in user.assigned_licenses:
            self.license_rows.append(row)
            self.license_skus.append(lic.sku_id)
            self.license_disabled.append(plans_text(lic.disabled_plans))
        for state in user.license_states:
            self.state_rows.append(row)
            self.state_skus.append(state.sku_id)
            self.state_states.append(state.state)
            self.state_errors.append(state.error)
            self.state_groups.append(state.assigned_by_group)
            self.state_disabled.append(plans_text(state.disabled_plans))
            self.state_updated.append(_time(state.last_updated))


class EntraTableBuilder:
    def __init__(self, group_names: Mapping[str, str] | None = None) -> None:
        self.group_names = dict(group_names or {})
        self._users = TableBuilder(EntraTable)
        self._errors = TableBuilder(EntraErrorTable)
        self._licenses = TableBuilder(AssignedLicenseTable)
        self._states = TableBuilder(LicenseStateTable)
        self._ids: list[bytes] = []

    @property
    def rows(self) -> int:
        return self._users.rows

    def add(self, user: EntraUser) -> None:
        raw_id = object_id_bytes(user.id)
        row = self._users.add(
            {
                "id": raw_id,
                "upn": user.user_principal_name,
                "synced": bool(user.on_premises_sync_enabled),
                "imm": user.on_premises_immutable_id,
                "sid": user.on_premises_security_identifier,
                "created": _time(user.created),
                "enabled": -1 if user.account_enabled is None else int(user.account_enabled),
                "usage_location": user.usage_location,
                "k_id": NO_KEY,  # vectorised in build()
                "k_imm": text_key(user.on_premises_immutable_id, fold=False),
                "k_sid": text_key(user.on_premises_security_identifier),
                "k_upn": text_key(user.user_principal_name),
            }
        )
        for category in user.provisioning_error_categories:
            self._errors.add({"row": row, "category": category})
        for lic in user.assigned_licenses:
            self._licenses.add({"row": row, "sku": lic.sku_id, "disabled": plans_text(lic.disabled_plans)})
        for state in user.license_states:
            self._states.add(
                {
                    "row": row,
                    "sku": state.sku_id,
                    "state": state.state,
                    "error": state.error,
                    "group": state.assigned_by_group,
                    "disabled": plans_text(state.disabled_plans),
                    "updated": _time(state.last_updated),
                }
            )

    def add_columns(self, users: EntraColumns) -> None:
        """Many users at once (the same table as :meth:`add` of each, keys hashed per column)."""
        count = len(users.ids)
        first = self._users.extend(
            {
                "id": users.ids,
                "upn": users.upns,
                "synced": users.synced,
                "imm": users.imms,
                "sid": users.sids,
                "created": users.created,
                "enabled": users.enabled,
                "usage_location": users.usage_locations,
                "k_id": np.zeros(count, dtype=np.uint64),  # vectorised in build()
                "k_imm": text_keys(users.imms, fold=False),
                "k_sid": text_keys(users.sids),
                "k_upn": text_keys(users.upns),
            }
        )
        self._errors.extend(
            {"row": [first + r for r in users.error_rows], "category": users.error_categories}
        )
        self._licenses.extend(
            {
                "row": [first + r for r in users.license_rows],
                "sku": users.license_skus,
                "disabled": users.license_disabled,
            }
        )
        self._states.extend(
            {
                "row": [first + r for r in users.state_rows],
                "sku": users.state_skus,
                "state": users.state_states,
                "error": users.state_errors,
                "group": users.state_groups,
                "disabled": users.state_disabled,
                "updated": users.state_updated,
            }
        )

    def build(self) -> EntraTable:
        columns = self._users.columns()
        columns["k_id"] = guid_keys(columns["id"])  # type: ignore[arg-type]
        children = {
            "errors": EntraErrorTable(self._errors.columns()),
            "licenses": AssignedLicenseTable(self._licenses.columns()),
            "states": LicenseStateTable(self._states.columns()),
        }
        return EntraTable(columns, meta={"group_names": self.group_names}, children=children)


# --------------------------------------------------------------------- Entra ID (organization)
@dataclass(frozen=True, slots=True)
class ServicePlan:
    id: str  # lower-case GUID
    name: str  # servicePlanName, e.g. "INTUNE_A"


@dataclass(frozen=True, slots=True)
class SubscribedSku:
    sku_id: str  # lower-case GUID
    sku_part_number: str  # e.g. "INTUNE_A"
    consumed_units: int
    prepaid_enabled: int
    prepaid_warning: int
    prepaid_suspended: int
    prepaid_locked_out: int
    service_plans: tuple[ServicePlan, ...] = ()


@dataclass(frozen=True, slots=True)
class Subscription:
    id: str
    sku_id: str
    sku_part_number: str
    status: str  # Enabled | Warning | Suspended | LockedOut | Deleted
    is_trial: bool
    total_licenses: int
    next_lifecycle: float | None  # None: no lifecycle date; such subscriptions are not exported


@dataclass(frozen=True, slots=True)
class OrganizationData:
    """What needs Organization.Read.All: directory sync status and licensing."""

    sync_enabled: bool | None
    last_sync: float | None
    skus: tuple[SubscribedSku, ...]
    subscriptions: tuple[Subscription, ...]

    @property
    def records(self) -> int:
        return len(self.skus) + len(self.subscriptions)

    def sku_part_number(self, sku_id: str) -> str:
        for sku in self.skus:
            if sku.sku_id == sku_id:
                return sku.sku_part_number
        return sku_id


# =========================================================================== ConfigMgr
@dataclass(frozen=True, slots=True)
class CmUser:
    resource_id: int
    unique_user_name: str | None  # "DOMAIN\\sam"
    user_principal_name: str | None
    sid: str | None  # upper-case "S-1-..."
    object_guid: bytes | None  # 16 raw bytes (same byte order as AD's objectGUID)
    creation_date: float | None  # Creation_Date0: when ConfigMgr first discovered the user
    cloud_user_id: str | None  # lower-case GUID without braces
    collections: tuple[str, ...] = ()  # the configured Intune collections this record is a member of

    @property
    def in_intune_collection(self) -> bool:
        return bool(self.collections)


@dataclass(frozen=True, slots=True)
class CmComponent:
    site_code: str
    machine_name: str
    component_name: str
    status: int  # 0 OK, 1 warning, 2 critical


class CmTable(Table):
    """ConfigMgr user records (v_R_User), in scope or not.

    meta: ``collection_ids`` (bit i of ``collections`` is membership of collection_ids[i]) and
    ``components`` (rows of :class:`CmComponent` as lists).
    """

    COLUMNS = (
        Col("resource_id", "i8"),
        Col("name", "text"),
        Col("upn", "text"),
        Col("sid", "text"),
        Col("guid", "guid"),
        Col("has_guid", "bool"),
        Col("created", "f8"),
        Col("cloud", "guid"),
        Col("has_cloud", "bool"),
        Col("collections", "u64"),
        Col("k_sid", "u64"),
        Col("k_guid", "u64"),
        Col("k_name", "u64"),
        Col("k_upn", "u64"),
        Col("k_cloud", "u64"),
    )
    __slots__ = ()

    @property
    def records(self) -> int:
        return self.n

    @property
    def collection_ids(self) -> tuple[str, ...]:
        return tuple(self.meta.get("collection_ids") or ())

    @property
    def components(self) -> tuple[CmComponent, ...]:
        return tuple(
            CmComponent(str(site), str(machine), str(name), int(status))
            for site, machine, name, status in self.meta.get("components") or ()
        )

    def in_collection(self) -> np.ndarray[Any, np.dtype[np.bool_]]:
        return self.array("collections") != 0

    def collections_of(self, row: int) -> tuple[str, ...]:
        mask = int(self.array("collections")[row])
        return tuple(c for bit, c in enumerate(self.collection_ids) if mask >> bit & 1)

    def cloud_text(self, row: int) -> str | None:
        if not self.array("has_cloud")[row]:
            return None
        return guid_text_of(bytes(self.array("cloud")[row].tobytes()))

    def record(self, row: int) -> CmUser:
        return CmUser(
            resource_id=int(self.array("resource_id")[row]),
            unique_user_name=self.text("name", row),
            user_principal_name=self.text("upn", row),
            sid=self.text("sid", row),
            object_guid=bytes(self.array("guid")[row].tobytes()) if self.array("has_guid")[row] else None,
            creation_date=_optional_time(float(self.array("created")[row])),
            cloud_user_id=self.cloud_text(row),
            collections=self.collections_of(row),
        )

    def join_index(self, key: str) -> SortedIndex:
        """Records by ``key``; among records sharing a key, the one that got furthest through the
        pipeline speaks for the user (in a collection, then with a CloudUserID), then the lowest
        ResourceID (a re-discovered or recreated account leaves several)."""

        def build() -> SortedIndex:
            rank = (
                (~self.in_collection()).astype(np.int64) << np.int64(62)
                | (~self.array("has_cloud")).astype(np.int64) << np.int64(61)
                | (self.array("resource_id").astype(np.int64) & np.int64((1 << 61) - 1))
            )
            return SortedIndex.build(self.array(key), preference=rank)

        return self.cached(f"join:{key}", build)

    def build_indexes(self) -> None:
        for key in ("k_sid", "k_guid", "k_name", "k_upn"):
            self.join_index(key)

    @classmethod
    def from_records(
        cls,
        users: Iterable[CmUser],
        components: Sequence[CmComponent] = (),
        collection_ids: Sequence[str] = (),
    ) -> CmTable:
        builder = CmTableBuilder(collection_ids, components)
        for user in users:
            builder.add(user)
        return builder.build()


class CmTableBuilder:
    MAX_COLLECTIONS = 64

    def __init__(self, collection_ids: Sequence[str] = (), components: Sequence[CmComponent] = ()) -> None:
        self.collection_ids: list[str] = [c.upper() for c in collection_ids][: self.MAX_COLLECTIONS]
        self.components = list(components)
        self._builder = TableBuilder(CmTable)

    @property
    def rows(self) -> int:
        return self._builder.rows

    def _mask(self, collections: Iterable[str]) -> int:
        mask = 0
        for collection in collections:
            name = collection.upper()
            if name not in self.collection_ids:
                if len(self.collection_ids) >= self.MAX_COLLECTIONS:
                    continue
                self.collection_ids.append(name)
            mask |= 1 << self.collection_ids.index(name)
        return mask

    def add(self, user: CmUser) -> None:
        cloud = object_id_bytes(user.cloud_user_id) if user.cloud_user_id else None
        name = (
            user.unique_user_name.strip() if user.unique_user_name and "\\" in user.unique_user_name else None
        )
        self._builder.add(
            {
                "resource_id": user.resource_id,
                "name": user.unique_user_name,
                "upn": user.user_principal_name,
                "sid": user.sid,
                "guid": user.object_guid,
                "has_guid": user.object_guid is not None,
                "created": _time(user.creation_date),
                "cloud": cloud,
                "has_cloud": cloud is not None,
                "collections": self._mask(user.collections),
                "k_sid": text_key(user.sid),
                "k_guid": NO_KEY,  # vectorised in build()
                "k_name": text_key(name),
                "k_upn": text_key(user.user_principal_name),
                "k_cloud": NO_KEY,
            }
        )

    def build(self) -> CmTable:
        columns = self._builder.columns()
        columns["k_guid"] = guid_keys(columns["guid"], columns["has_guid"])  # type: ignore[arg-type]
        columns["k_cloud"] = guid_keys(columns["cloud"], columns["has_cloud"])  # type: ignore[arg-type]
        meta = {
            "collection_ids": list(self.collection_ids),
            "components": [
                [c.site_code, c.machine_name, c.component_name, c.status] for c in self.components
            ],
        }
        return CmTable(columns, meta=meta)


# =========================================================================== Intune devices
@dataclass(frozen=True, slots=True)
class ManagedDevice:
    id: str  # lower-case GUID
    user_id: str | None  # the Entra object id of the primary user (lower-case GUID)
    operating_system: str | None
    compliance_state: (
        str | None
    )  # unknown | compliant | noncompliant | conflict | error | inGracePeriod | configManager
    management_agent: str | None  # mdm | configurationManagerClientMdm | ...
    enrolled: float | None
    last_sync: float | None
    device_name: str | None = None


class DeviceTable(Table):
    COLUMNS = (
        Col("id", "guid"),
        Col("name", "text"),
        Col("user", "guid"),
        Col("has_user", "bool"),
        Col("os", "cat"),
        Col("compliance", "cat"),
        Col("agent", "cat"),
        Col("enrolled", "f8"),
        Col("last_sync", "f8"),
        Col("k_user", "u64"),
    )
    __slots__ = ()

    @property
    def records(self) -> int:
        return self.n

    def record(self, row: int) -> ManagedDevice:
        return ManagedDevice(
            id=guid_text_of(bytes(self.array("id")[row].tobytes())),
            user_id=guid_text_of(bytes(self.array("user")[row].tobytes()))
            if self.array("has_user")[row]
            else None,
            operating_system=self.cat("os").get(row),
            compliance_state=self.cat("compliance").get(row),
            management_agent=self.cat("agent").get(row),
            enrolled=_optional_time(float(self.array("enrolled")[row])),
            last_sync=_optional_time(float(self.array("last_sync")[row])),
            device_name=self.text("name", row),
        )

    def user_index(self) -> SortedIndex:
        return self.cached("index:k_user", lambda: SortedIndex.build(self.array("k_user")))

    def build_indexes(self) -> None:
        self.user_index()

    @classmethod
    def from_records(cls, devices: Iterable[ManagedDevice]) -> DeviceTable:
        builder = DeviceTableBuilder()
        for device in devices:
            builder.add(device)
        return builder.build()


class DeviceTableBuilder:
    def __init__(self) -> None:
        self._builder = TableBuilder(DeviceTable)

    @property
    def rows(self) -> int:
        return self._builder.rows

    def add(self, device: ManagedDevice) -> None:
        user = object_id_bytes(device.user_id) if device.user_id else None
        self._builder.add(
            {
                "id": object_id_bytes(device.id),
                "name": device.device_name,
                "user": user,
                "has_user": user is not None,
                "os": device.operating_system,
                "compliance": device.compliance_state,
                "agent": device.management_agent,
                "enrolled": _time(device.enrolled),
                "last_sync": _time(device.last_sync),
                "k_user": NO_KEY,
            }
        )

    def build(self) -> DeviceTable:
        columns = self._builder.columns()
        columns["k_user"] = guid_keys(columns["user"], columns["has_user"])  # type: ignore[arg-type]
        return DeviceTable(columns)


# =========================================================================== merging
def _merge(old: Any, new_rows: Any, changed: set[bytes], guid_column: str) -> Any:
    """``old`` without the rows whose ``guid_column`` is in ``changed``, followed by ``new_rows``.

    Rows keep their order; a table is always compact (no deleted rows left behind).
    """
    new_rows = _last_of_each(new_rows, guid_column)
    meta = {**old.meta, **new_rows.meta}
    drop = np.zeros(0, dtype=np.int64)
    if changed and old.n:
        drop = _rows_with_guids(old, guid_column, np.frombuffer(b"".join(sorted(changed)), dtype="V16"))
    if not len(drop):
        if not new_rows.n:
            return old.derive(old.columns(), old.children, meta)
        return type(old).concat([old, new_rows], meta=meta)
    keep = np.ones(old.n, dtype=np.bool_)
    keep[drop] = False
    return old.take_and_append(np.flatnonzero(keep), new_rows, meta)


def _rows_with_guids(table: Any, guid_column: str, wanted: Any) -> I64:
    """Rows of ``table`` whose GUID is one of ``wanted``: a look-up of each wanted GUID's key in
    the table's sorted key index (cost grows with the changes, not the table), then an exact check."""
    held = np.ascontiguousarray(table.array(guid_column))
    index = table.cached(f"guid_index:{guid_column}", lambda: SortedIndex.build(guid_keys(held)))
    keys = guid_keys(wanted)
    low = np.searchsorted(index.keys, keys, side="left")
    high = np.searchsorted(index.keys, keys, side="right")
    counts = high - low
    if not counts.any():
        return np.zeros(0, dtype=np.int64)
    # Every candidate position (a key may, with probability 2^-64, belong to several rows).
    owner = np.repeat(np.arange(len(keys)), counts)
    positions = np.repeat(low - np.concatenate(([0], np.cumsum(counts)[:-1])), counts) + np.arange(
        counts.sum()
    )
    rows = index.order[positions]
    same = (held[rows].view("<u8").reshape(-1, 2) == wanted[owner].view("<u8").reshape(-1, 2)).all(axis=1)
    return np.unique(rows[same]).astype(np.int64)


def _last_of_each(table: Any, guid_column: str) -> Any:
    """The table with one row per ``guid_column`` value, the last one (a delta page may replay a
    change; the latest version of the object wins), in the order of those last rows."""
    if table.n < 2:
        return table
    halves = np.ascontiguousarray(table.array(guid_column)).view("<u8").reshape(-1, 2)
    _, first_from_end = np.unique(halves[::-1], axis=0, return_index=True)
    if len(first_from_end) == table.n:
        return table
    return table.take(np.sort(table.n - 1 - first_from_end))


# =========================================================================== sources
SourceData = AdTable | EntraTable | OrganizationData | CmTable | DeviceTable


@dataclass(frozen=True)
class SourceKindInfo:
    """One kind of source: what it reads, the type of its data and how the pages name it."""

    kind: SourceKind
    data_type: type
    title: str
    field: str  # the attribute of EstateData (exporter.pipelines.evaluation) that holds its data


SOURCE_REGISTRY: dict[SourceKind, SourceKindInfo] = {
    info.kind: info
    for info in (
        SourceKindInfo("ad", AdTable, "Active Directory users", "ad"),
        SourceKindInfo("entra", EntraTable, "Entra ID users", "entra"),
        SourceKindInfo(
            "entra_organization", OrganizationData, "Entra ID organization and licences", "organization"
        ),
        SourceKindInfo("configmgr", CmTable, "ConfigMgr user records", "configmgr"),
        SourceKindInfo("intune_devices", DeviceTable, "Intune managed devices", "devices"),
    )
}
# The order matters: it is the order of the landing page and of the exporter's own metrics.
SOURCE_KINDS: tuple[SourceKind, ...] = tuple(SOURCE_REGISTRY)


@dataclass(slots=True)
class HttpStats:
    """Cumulative request statistics of an HTTP-based source (Graph), for intune_exporter_graph_*."""

    # (endpoint, status code as text) -> count. endpoint is a bounded name such as "users".
    requests: dict[tuple[str, str], int] = field(default_factory=dict)
    throttled: int = 0  # 429/503 answers with Retry-After
    retry_wait_seconds: float = 0.0  # time spent sleeping on Retry-After / backoff
    token_requests: int = 0
    # Latest x-ms-throttle-limit-percentage per endpoint, and resource units (x-ms-resource-unit).
    throttle_limit_percentage: dict[str, float] = field(default_factory=dict)
    resource_units: dict[str, float] = field(default_factory=dict)

    def copy(self) -> HttpStats:
        return HttpStats(
            dict(self.requests),
            self.throttled,
            self.retry_wait_seconds,
            self.token_requests,
            dict(self.throttle_limit_percentage),
            dict(self.resource_units),
        )
