"""The provisioning stage model: pure functions, no I/O.

Joins the three systems' records for one estate, puts every in-scope AD user at the last stage of
the chain whose condition holds together with every earlier one (CONTRACT.md, "Provisioning
stages"), decides who is stuck, and counts the pipeline's side faults (missing CloudUserID,
CloudUserID mismatch, orphans). Everything here works on plain data so it can be tested without any
backend.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from exporter.ids import immutable_id, unique_user_name_key, user_name_key
from exporter.model import (
    STAGES,
    WAITING_STAGES,
    AdData,
    AdUser,
    CmUser,
    ConfigMgrData,
    EntraData,
    EntraUser,
    OrganizationData,
    Stage,
)

INTUNE_SERVICE_PLAN = "INTUNE_A"


@dataclass(frozen=True, slots=True)
class FirstSeen:
    """When the exporter first saw a user at its current stage (survives restarts via state_file)."""

    stage: Stage
    since: float


@dataclass(frozen=True, slots=True)
class UserPlacement:
    user_key: str  # stable identity: hex of the raw objectGUID
    sam_account_name: str
    user_principal_name: str | None
    stage: Stage
    entered: float  # when the user entered `stage`, from the best evidence available


@dataclass(frozen=True, slots=True)
class StuckUser:
    user_key: str
    sam_account_name: str
    user_principal_name: str | None
    stage: Stage
    entered: float


@dataclass(frozen=True)
class ProvisioningView:
    """The result of one evaluation of an estate; every stage is present in every mapping."""

    evaluated_at: float
    users: Mapping[Stage, int]
    stuck: Mapping[Stage, int]
    oldest_entry: Mapping[Stage, float | None]
    stuck_users: tuple[StuckUser, ...]  # longest-waiting first, all of them (collectors cap the list)
    cloud_user_id_mismatch: int
    orphans: Mapping[str, int]  # "entra" / "configmgr"
    intune_enabled_without_intune_license: int | None  # None when licensing data is unknown


@dataclass(frozen=True)
class ConfigMgrSummary:
    missing_cloud_user_id: Mapping[bool, int]  # keyed by "member of an Intune collection"
    records: int


@dataclass(frozen=True)
class EntraSummary:
    provisioning_errors: Mapping[str, int]  # category -> synced users carrying such an error


@dataclass
class _Indexes:
    """Lookup tables built once per evaluation so the join is O(n), not O(n*m)."""

    entra_by_immutable_id: dict[str, EntraUser] = field(default_factory=dict)
    entra_by_sid: dict[str, EntraUser] = field(default_factory=dict)
    cm_by_sid: dict[str, CmUser] = field(default_factory=dict)
    cm_by_guid: dict[bytes, CmUser] = field(default_factory=dict)
    cm_by_name: dict[str, CmUser] = field(default_factory=dict)


def _cm_preference(record: CmUser) -> tuple[bool, bool, int]:
    # When several records carry the same key (a re-discovered or recreated account), the one that
    # got furthest through the pipeline speaks for the user; the lowest ResourceID breaks ties.
    return (record.in_intune_collection, record.cloud_user_id is not None, -record.resource_id)


def _keep_best(index: dict[object, CmUser], key: object, record: CmUser) -> None:
    current = index.get(key)
    if current is None or _cm_preference(record) > _cm_preference(current):
        index[key] = record


def build_indexes(entra: EntraData, cm: ConfigMgrData) -> _Indexes:
    idx = _Indexes()
    # Sorting by id makes the choice among duplicate keys deterministic.
    for user in sorted(entra.users, key=lambda u: u.id):
        if not user.on_premises_sync_enabled:
            continue
        if user.on_premises_immutable_id:
            idx.entra_by_immutable_id.setdefault(user.on_premises_immutable_id, user)
        if user.on_premises_security_identifier:
            idx.entra_by_sid.setdefault(user.on_premises_security_identifier.upper(), user)
    for record in cm.users:
        if record.sid:
            _keep_best(idx.cm_by_sid, record.sid.upper(), record)  # type: ignore[arg-type]
        if record.object_guid:
            _keep_best(idx.cm_by_guid, record.object_guid, record)  # type: ignore[arg-type]
        name = unique_user_name_key(record.unique_user_name)
        if name:
            _keep_best(idx.cm_by_name, name, record)  # type: ignore[arg-type]
    return idx


def match_entra(user: AdUser, idx: _Indexes) -> EntraUser | None:
    """Stage 2 join: immutable id = base64(source anchor), else on-prem SID = objectSid."""
    found = idx.entra_by_immutable_id.get(immutable_id(user.source_anchor))
    if found is None:
        found = idx.entra_by_sid.get(user.object_sid.upper())
    return found


def match_configmgr(user: AdUser, idx: _Indexes, netbios_domain: str) -> CmUser | None:
    """Stage 3 join: SID0 = objectSid, else Object_GUID0 = objectGUID, else DOMAIN\\sam."""
    found = idx.cm_by_sid.get(user.object_sid.upper())
    if found is None:
        found = idx.cm_by_guid.get(user.object_guid)
    if found is None:
        name = user_name_key(netbios_domain, user.sam_account_name)
        found = idx.cm_by_name.get(name) if name else None
    return found


def classify(entra_user: EntraUser | None, cm_user: CmUser | None) -> Stage:
    """The last stage of the chain whose condition holds together with every earlier one."""
    if entra_user is None:
        return "ad_created"
    if cm_user is None:
        return "entra_synced"
    if not cm_user.in_intune_collection:
        return "cm_discovered"
    if cm_user.cloud_user_id is None:
        return "in_intune_collection"
    if cm_user.cloud_user_id.lower() != entra_user.id.lower():
        return "connector_synced"
    return "intune_enabled"


def stage_evidence(
    stage: Stage, ad: AdUser, entra_user: EntraUser | None, cm_user: CmUser | None
) -> float | None:
    """The system's own record of when the user entered a stage, where one exists."""
    if stage == "ad_created":
        return ad.when_created
    if stage == "entra_synced" and entra_user is not None:
        return entra_user.created
    if stage == "cm_discovered" and cm_user is not None:
        return cm_user.creation_date
    return None


def user_key(user: AdUser) -> str:
    return guid_key(user.object_guid)


def guid_key(object_guid: bytes) -> str:
    # Hex of the raw objectGUID: stable, unique, and far cheaper than formatting GUID text for
    # every user on every evaluation of a large estate.
    return object_guid.hex()


def evaluate(
    ad: AdData,
    entra: EntraData,
    cm: ConfigMgrData,
    first_seen: Mapping[str, FirstSeen],
    stuck_after: Mapping[Stage, float],
    now: float,
    organization: OrganizationData | None = None,
) -> tuple[ProvisioningView, dict[str, FirstSeen]]:
    """Place every in-scope user; return the view and the updated first-seen times.

    The first-seen map only keeps users that are still in scope, at their current stage: a user who
    moves on gets a fresh first-seen time, and one who left scope is forgotten.
    """
    idx = build_indexes(entra, cm)
    placements: list[UserPlacement] = []
    new_first_seen: dict[str, FirstSeen] = {}
    matched_entra: set[str] = set()
    matched_cm: set[int] = set()
    mismatches = 0
    enabled_entra: list[EntraUser] = []

    for ad_user in ad.users:
        entra_user = match_entra(ad_user, idx)
        cm_user = match_configmgr(ad_user, idx, ad.netbios_domain)
        if entra_user is not None:
            matched_entra.add(entra_user.id)
        if cm_user is not None:
            matched_cm.add(cm_user.resource_id)
            if (
                entra_user is not None
                and cm_user.cloud_user_id is not None
                and cm_user.cloud_user_id.lower() != entra_user.id.lower()
            ):
                mismatches += 1
        stage = classify(entra_user, cm_user)
        key = user_key(ad_user)
        previous = first_seen.get(key)
        seen = previous if previous is not None and previous.stage == stage else FirstSeen(stage, now)
        new_first_seen[key] = seen
        evidence = stage_evidence(stage, ad_user, entra_user, cm_user)
        entered = evidence if evidence is not None else seen.since
        placements.append(
            UserPlacement(key, ad_user.sam_account_name, ad_user.user_principal_name, stage, entered)
        )
        if stage == "intune_enabled" and entra_user is not None:
            enabled_entra.append(entra_user)

    view = _summarise(placements, stuck_after, now)
    synced_entra_ids = {u.id for u in entra.users if u.on_premises_sync_enabled}
    orphans = {
        "entra": len(synced_entra_ids - matched_entra),
        "configmgr": sum(1 for r in cm.users if r.resource_id not in matched_cm),
    }
    unlicensed = None
    if organization is not None:
        unlicensed = count_without_intune_plan(enabled_entra, organization)
    return (
        ProvisioningView(
            evaluated_at=now,
            users=view[0],
            stuck=view[1],
            oldest_entry=view[2],
            stuck_users=view[3],
            cloud_user_id_mismatch=mismatches,
            orphans=orphans,
            intune_enabled_without_intune_license=unlicensed,
        ),
        new_first_seen,
    )


def _summarise(
    placements: Iterable[UserPlacement], stuck_after: Mapping[Stage, float], now: float
) -> tuple[dict[Stage, int], dict[Stage, int], dict[Stage, float | None], tuple[StuckUser, ...]]:
    users: dict[Stage, int] = dict.fromkeys(STAGES, 0)
    stuck: dict[Stage, int] = dict.fromkeys(STAGES, 0)
    oldest: dict[Stage, float | None] = dict.fromkeys(STAGES, None)
    stuck_users: list[StuckUser] = []
    for p in placements:
        users[p.stage] += 1
        current = oldest[p.stage]
        if current is None or p.entered < current:
            oldest[p.stage] = p.entered
        if is_stuck(p.stage, p.entered, stuck_after, now):
            stuck[p.stage] += 1
            stuck_users.append(
                StuckUser(p.user_key, p.sam_account_name, p.user_principal_name, p.stage, p.entered)
            )
    stuck_users.sort(key=lambda s: (s.entered, s.user_key))
    return users, stuck, oldest, tuple(stuck_users)


def is_stuck(stage: Stage, entered: float, stuck_after: Mapping[Stage, float], now: float) -> bool:
    if stage not in WAITING_STAGES:
        return False
    return now - entered > stuck_after.get(stage, float("inf"))


def count_without_intune_plan(users: Iterable[EntraUser], organization: OrganizationData) -> int:
    """Intune-enabled users whose assigned licenses carry no enabled INTUNE_A service plan.

    Expected to be non-zero in hybrid MDM, where the connector enables users without a license
    flag in Entra; exported for information, not as a fault.
    """
    intune_plans = {
        sku.sku_id: {plan.id for plan in sku.service_plans if plan.name.upper() == INTUNE_SERVICE_PLAN}
        for sku in organization.skus
    }
    count = 0
    for user in users:
        licensed = any(
            plan_ids - set(lic.disabled_plans)
            for lic in user.assigned_licenses
            if (plan_ids := intune_plans.get(lic.sku_id.lower()))
        )
        if not licensed:
            count += 1
    return count


def summarise_configmgr(cm: ConfigMgrData) -> ConfigMgrSummary:
    missing = Counter(r.in_intune_collection for r in cm.users if r.cloud_user_id is None)
    return ConfigMgrSummary(
        missing_cloud_user_id={True: missing[True], False: missing[False]}, records=cm.records
    )


def summarise_entra(entra: EntraData) -> EntraSummary:
    categories: Counter[str] = Counter()
    for user in entra.users:
        if user.on_premises_sync_enabled:
            for category in set(user.provisioning_error_categories):
                categories[category] += 1
    return EntraSummary(provisioning_errors=dict(categories))


def user_label_value(mode: str, sam: str, upn: str | None, key: str) -> str | None:
    """How a user is named in labels and /stuck, per the `user_label` setting."""
    if mode == "upn":
        return upn or sam
    if mode == "sam":
        return sam
    if mode == "hash":
        return hashlib.sha256(key.encode("ascii")).hexdigest()[:16]
    return None
