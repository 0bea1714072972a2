"""Plain data read from the backends.

Sources produce these records; the stage model and the collectors consume them. They are
frozen dataclasses of primitives so that they can be persisted to the state file, compared
in tests and shared between threads without locking. Normalisation happens in the source:
GUIDs are raw 16-byte values or lower-case text without braces, SIDs are upper-case
``S-1-...`` text, times are POSIX seconds (UTC).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

SourceKind = Literal["ad", "entra", "entra_organization", "configmgr"]
# The order matters: it is the order of the stage chain and of the landing page.
SOURCE_KINDS: tuple[SourceKind, ...] = ("ad", "entra", "entra_organization", "configmgr")

ErrorReason = Literal["auth", "timeout", "network", "throttled", "data", "other"]
ERROR_REASONS: tuple[ErrorReason, ...] = ("auth", "timeout", "network", "throttled", "data", "other")

Stage = Literal[
    "ad_created",
    "entra_synced",
    "cm_discovered",
    "in_intune_collection",
    "connector_synced",
    "intune_enabled",
]
STAGES: tuple[Stage, ...] = (
    "ad_created",
    "entra_synced",
    "cm_discovered",
    "in_intune_collection",
    "connector_synced",
    "intune_enabled",
)
# Stages at which a user can be stuck (everything but the final one).
WAITING_STAGES: tuple[Stage, ...] = STAGES[:-1]


# --------------------------------------------------------------------------- Active Directory
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
    user_account_control: int
    distinguished_name: str


@dataclass(frozen=True, slots=True)
class AdData:
    users: tuple[AdUser, ...]
    netbios_domain: str  # e.g. "CONTOSO", for matching ConfigMgr's DOMAIN\sam

    @property
    def records(self) -> int:
        return len(self.users)


# --------------------------------------------------------------------------- Entra ID (users)
@dataclass(frozen=True, slots=True)
class AssignedLicense:
    sku_id: str  # lower-case GUID
    disabled_plans: tuple[str, ...] = ()  # lower-case service plan GUIDs


@dataclass(frozen=True, slots=True)
class EntraUser:
    id: str  # lower-case object id
    user_principal_name: str | None
    on_premises_sync_enabled: bool
    on_premises_immutable_id: str | None
    on_premises_security_identifier: str | None  # upper-case "S-1-..."
    on_premises_sam_account_name: str | None
    created: float | None  # createdDateTime; null for some pre-2018 users
    account_enabled: bool | None = None
    # One entry per onPremisesProvisioningErrors item: its `category` (e.g. "PropertyConflict").
    provisioning_error_categories: tuple[str, ...] = ()
    assigned_licenses: tuple[AssignedLicense, ...] = ()


@dataclass(frozen=True, slots=True)
class EntraData:
    # Only users with onPremisesSyncEnabled == true are kept: cloud-only users never take part
    # in the join, and keeping them would only cost memory on large tenants.
    users: tuple[EntraUser, ...]
    records: int  # every user Graph returned, cloud-only included


# --------------------------------------------------------------------- Entra ID (organization)
@dataclass(frozen=True, slots=True)
class ServicePlan:
    id: str  # lower-case GUID
    name: str  # servicePlanName, e.g. "INTUNE_A"


@dataclass(frozen=True, slots=True)
class SubscribedSku:
    sku_id: str  # lower-case GUID
    sku_part_number: str  # e.g. "INTUNE_A"
    capability_status: str
    applies_to: str
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
    created: float | None
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


# --------------------------------------------------------------------------- ConfigMgr
@dataclass(frozen=True, slots=True)
class CmUser:
    resource_id: int
    unique_user_name: str | None  # "DOMAIN\\sam"
    user_principal_name: str | None
    full_user_name: str | None
    sid: str | None  # upper-case "S-1-..."
    object_guid: bytes | None  # 16 raw bytes (same byte order as AD's objectGUID)
    user_account_control: int | None
    creation_date: float | None  # Creation_Date0: when ConfigMgr first discovered the user
    cloud_user_id: str | None  # lower-case GUID without braces
    in_intune_collection: bool  # member of one of the configured intune_collection_ids


@dataclass(frozen=True, slots=True)
class CmComponent:
    site_code: str
    machine_name: str
    component_name: str
    status: int  # 0 OK, 1 warning, 2 critical


@dataclass(frozen=True, slots=True)
class ConfigMgrData:
    users: tuple[CmUser, ...]
    components: tuple[CmComponent, ...] = ()

    @property
    def records(self) -> int:
        return len(self.users)


SourceData = AdData | EntraData | OrganizationData | ConfigMgrData


@dataclass(slots=True)
class HttpStats:
    """Cumulative request statistics of an HTTP-based source (Graph), for intune_exporter_graph_*."""

    # (endpoint, status code as text) -> count. endpoint is a bounded name such as "users".
    requests: dict[tuple[str, str], int] = field(default_factory=dict)
    throttled: int = 0  # 429/503 answers with Retry-After
    retry_wait_seconds: float = 0.0  # time spent sleeping on Retry-After / backoff
    token_requests: int = 0

    def copy(self) -> HttpStats:
        return HttpStats(dict(self.requests), self.throttled, self.retry_wait_seconds, self.token_requests)
