"""A ``cloud`` acceptance estate (issue 15) on the real backends, with its ground truth.

One AD user per stage condition and reason row of CONTRACT.md's "Second pipeline profile: cloud",
plus precedences between rows (a count violation without usage location; stale devices that are
also noncompliant; a grace-period device next to a stale compliant one; an error on a SKU without
Intune; ActiveWithError still licensing). The tenant has licenceAssignmentStates assigned directly
and through two groups, usage locations, subscribedSkus whose service plans grant Intune or not,
and managed devices of several operating systems, co-managed ones, every compliance state, stale
ones, one without a primary user and one of a user that no longer exists.

Stages, reasons, ``intune_devices`` and ``intune_license_assignment_error_users`` are written here by
hand from the contract's tables.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from tests.ad.samba import DOMAIN_DN, SambaDC
from tests.entra import tenant_data
from tests.entra.graph_sim import SimApp, SimTenant
from tests.integration.harness import AdAccount, Graph, NewUser, create_users, iso, read_accounts
from tests.integration.hybrid_estate import active_directory_yaml, entra_yaml

NAME = "cloudco"
OU = f"OU=AcceptCloud,{DOMAIN_DN}"
TENANT_ID = str(uuid.uuid5(uuid.NAMESPACE_DNS, "cloudco.tenant.test"))
CLOUD_STAGES = ("ad_created", "entra_synced", "intune_licensed", "device_enrolled", "device_compliant")
# (stage, reason) pairs of the cloud chain, copied from CONTRACT.md in table order.
CLOUD_REASONS = (
    ("ad_created", "entra_cloud_user_conflict"),
    ("ad_created", "entra_sync_pending"),
    ("ad_created", "entra_not_synced"),
    ("entra_synced", "license_count_violation"),
    ("entra_synced", "license_usage_location_missing"),
    ("entra_synced", "license_conflict"),
    ("entra_synced", "license_error_other"),
    ("entra_synced", "intune_plan_disabled"),
    ("entra_synced", "no_intune_license"),
    ("intune_licensed", "entra_account_disabled"),
    ("intune_licensed", "device_enrollment_pending"),
    ("device_enrolled", "device_stale"),
    ("device_enrolled", "device_noncompliant"),
    ("device_enrolled", "device_in_grace_period"),
    ("device_enrolled", "device_compliance_unknown"),
)

# SKUs: part number -> (skuId, service plans (id, name)). INTUNE_A's plan is also part of EMS.
AAD_P1_PLAN = "41781fb2-bc02-4b7c-bd55-b576c07bb09d"
INTUNE_EDU_PLAN = "da24caf9-af8e-485c-b7c8-e73336da2693"
INTUNE_O365_PLAN = "882e1d05-acd1-4ccb-8708-6ee03664b117"
EDU_SKU = "4b590615-0888-425a-a965-b3bf7789848d"
O365_SKU = "f245ecc8-75af-4f8e-b61f-27d8114de5f3"
SKUS: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    "INTUNE_A": (tenant_data.INTUNE_A_SKU, ((tenant_data.INTUNE_A_PLAN, "INTUNE_A"),)),
    "EMS": (tenant_data.EMS_SKU, ((tenant_data.INTUNE_A_PLAN, "INTUNE_A"), (AAD_P1_PLAN, "AAD_PREMIUM"))),
    "ENTERPRISEPACK": (
        tenant_data.E3_SKU,
        ((tenant_data.EXCHANGE_PLAN, "EXCHANGE_S_ENTERPRISE"), (tenant_data.TEAMS_PLAN, "TEAMS1")),
    ),
    "M365EDU_A3_FACULTY": (
        EDU_SKU,
        ((INTUNE_EDU_PLAN, "INTUNE_EDU"), (tenant_data.EXCHANGE_PLAN, "EXCHANGE_S_STANDARD")),
    ),
    "O365_BUSINESS_PREMIUM": (O365_SKU, ((INTUNE_O365_PLAN, "INTUNE_O365"),)),  # INTUNE_O365 is not listed
}
PLAN_IDS = {"INTUNE_A": tenant_data.INTUNE_A_PLAN, "AAD_PREMIUM": AAD_P1_PLAN}
GROUPS = {
    "lic": ("0a1b2c3d-0000-4000-8000-00000000a11c", "Intune Licensing"),
    "ems": ("0a1b2c3d-0000-4000-8000-0000000000e5", "EMS Users"),
}


@dataclass(frozen=True)
class State:
    """One licenseAssignmentStates entry."""

    sku: str  # part number (a key of SKUS)
    state: str = "Active"
    error: str = "None"
    group: str | None = None  # a key of GROUPS; None: assigned directly
    disabled: tuple[str, ...] = ()  # plan names (keys of PLAN_IDS)
    updated: str = "2024-03-01T09:00:00Z"


@dataclass(frozen=True)
class Device:
    os: str
    compliance: str
    agent: str = "mdm"
    enrolled: str = "2024-06-01T00:00:00Z"
    days_since_sync: float = 0.05  # about an hour: fresh; stale after 30 days


@dataclass(frozen=True)
class CloudUser:
    sam: str
    stage: str | None  # None: out of scope
    reason: str | None
    disabled_in_ad: bool = False
    synced: Literal["imm", "sid"] | None = "imm"
    enabled: bool = True
    usage_location: str | None = "DE"
    states: tuple[State, ...] = ()
    legacy: bool = False  # Graph returns no licence states, only assignedLicenses
    devices: tuple[Device, ...] = ()
    conflict_upn: bool = False  # a cloud-only user has this UPN


S, D = State, Device
USERS = (
    # ad_created
    CloudUser("c.conf.upn", "ad_created", "entra_cloud_user_conflict", synced=None, conflict_upn=True),
    CloudUser("c.pending", "ad_created", "entra_sync_pending", synced=None),
    # entra_synced: the licence rows in order; a count violation wins over a missing usage location.
    CloudUser(
        "c.count",
        "entra_synced",
        "license_count_violation",
        usage_location=None,
        states=(S("INTUNE_A", "Error", "CountViolation", group="lic"),),
    ),
    CloudUser(
        "c.usage",
        "entra_synced",
        "license_usage_location_missing",
        usage_location="KP",
        states=(S("INTUNE_A", "Error", "ProhibitedInUsageLocationViolation"),),
    ),
    # No usage location and a state that is not active: before the error row.
    CloudUser(
        "c.noloc",
        "entra_synced",
        "license_usage_location_missing",
        usage_location=None,
        states=(S("EMS", "Error", "Other"),),
    ),
    CloudUser(
        "c.mutex",
        "entra_synced",
        "license_conflict",
        states=(S("INTUNE_A", "Error", "MutuallyExclusiveViolation"),),
    ),
    CloudUser(
        "c.depend",
        "entra_synced",
        "license_conflict",
        states=(S("EMS", "Error", "DependencyViolation", group="ems"),),
    ),
    CloudUser(
        "c.errother",
        "entra_synced",
        "license_error_other",
        states=(S("INTUNE_A", "Error", "UniquenessViolation"),),
    ),
    CloudUser(
        "c.planoff",
        "entra_synced",
        "intune_plan_disabled",
        states=(S("INTUNE_A", disabled=("INTUNE_A",)), S("ENTERPRISEPACK")),
    ),
    CloudUser("c.nolic", "entra_synced", "no_intune_license", states=(S("ENTERPRISEPACK"),)),
    CloudUser("c.o365", "entra_synced", "no_intune_license", states=(S("O365_BUSINESS_PREMIUM"),)),
    # An error on a SKU without Intune is no licence error of this chain.
    CloudUser(
        "c.e3err",
        "entra_synced",
        "no_intune_license",
        states=(S("ENTERPRISEPACK", "Error", "CountViolation"),),
    ),
    CloudUser("c.bare", "entra_synced", "no_intune_license", synced="sid"),
    # No licence states from Graph: assignedLicenses decide, here with the Intune plan turned off.
    CloudUser(
        "c.legacyoff",
        "entra_synced",
        "intune_plan_disabled",
        legacy=True,
        states=(S("INTUNE_A", disabled=("INTUNE_A",)),),
    ),
    # intune_licensed
    CloudUser(
        "c.blocked", "intune_licensed", "entra_account_disabled", enabled=False, states=(S("INTUNE_A"),)
    ),
    CloudUser(
        "c.nodev",
        "intune_licensed",
        "device_enrollment_pending",
        synced="sid",
        states=(
            S("INTUNE_A", group="lic", updated="2024-04-10T10:00:00Z"),
            S("EMS", updated="2024-04-01T09:00:00Z"),  # the earliest granting entry: entered then
            S("ENTERPRISEPACK", updated="2024-01-01T00:00:00Z"),  # grants no Intune: not evidence
        ),
    ),
    CloudUser(
        "c.awe",
        "intune_licensed",
        "device_enrollment_pending",
        states=(
            S("INTUNE_A", "ActiveWithError", "CountViolation", group="lic", updated="2024-03-15T00:00:00Z"),
        ),
    ),
    CloudUser(
        "c.legacy", "intune_licensed", "device_enrollment_pending", legacy=True, states=(S("INTUNE_A"),)
    ),
    # One Intune SKU in error, another active: licensed since the active one's lastUpdatedDateTime.
    CloudUser(
        "c.twolic",
        "intune_licensed",
        "device_enrollment_pending",
        states=(
            S("INTUNE_A", "Error", "CountViolation", group="lic"),
            S("EMS", updated="2024-04-20T00:00:00Z"),
        ),
    ),
    CloudUser(
        "c.planpart",
        "intune_licensed",
        "device_enrollment_pending",
        states=(S("EMS", disabled=("AAD_PREMIUM",)),),
    ),
    # device_enrolled: stale first (even with a noncompliant device), then noncompliant, grace, unknown.
    CloudUser(
        "c.stale",
        "device_enrolled",
        "device_stale",
        states=(S("INTUNE_A"),),
        devices=(D("Windows", "compliant", days_since_sync=45), D("iOS", "noncompliant", days_since_sync=40)),
    ),
    CloudUser(
        "c.noncomp",
        "device_enrolled",
        "device_noncompliant",
        states=(S("INTUNE_A"),),
        devices=(
            D("Windows", "noncompliant", enrolled="2024-06-03T00:00:00Z"),
            D("Android", "inGracePeriod", enrolled="2024-06-01T00:00:00Z"),
        ),
    ),
    CloudUser(
        "c.grace",
        "device_enrolled",
        "device_in_grace_period",
        states=(S("INTUNE_A"),),
        devices=(D("iOS", "inGracePeriod"), D("Windows", "compliant", days_since_sync=35)),
    ),
    CloudUser(
        "c.unknown",
        "device_enrolled",
        "device_compliance_unknown",
        states=(S("INTUNE_A"),),
        devices=(D("Android", "unknown"),),
    ),
    CloudUser(
        "c.comgmt",
        "device_enrolled",
        "device_compliance_unknown",
        states=(S("EMS", group="ems"),),
        devices=(D("Windows", "configManager", "configurationManagerClientMdm"),),
    ),
    CloudUser(
        "c.conflictdev",
        "device_enrolled",
        "device_compliance_unknown",
        states=(S("INTUNE_A"),),
        devices=(D("macOS", "conflict"), D("Windows", "error")),
    ),
    # device_compliant
    CloudUser(
        "c.ok",
        "device_compliant",
        None,
        states=(S("INTUNE_A", group="lic"),),
        devices=(D("Windows", "compliant", "configurationManagerClientMdm"),),
    ),
    CloudUser(
        "c.ok.multi",
        "device_compliant",
        None,
        synced="sid",
        states=(S("INTUNE_A"),),
        devices=(D("iOS", "compliant"), D("Android", "noncompliant")),
    ),
    CloudUser(
        "c.edu",
        "device_compliant",
        None,
        states=(S("M365EDU_A3_FACULTY"),),
        devices=(D("macOS", "compliant"),),
    ),
    # Out of scope (disabled in AD): its device and licence error still count tenant-wide.
    CloudUser(
        "c.off",
        None,
        None,
        disabled_in_ad=True,
        states=(S("INTUNE_A"), S("ENTERPRISEPACK", "Error", "CountViolation", group="ems")),
        devices=(D("Windows", "compliant"),),
    ),
)
KIOSK_UPN = "kiosk@cloudco.test"  # cloud-only: a licence error and a device
EXTRA_DEVICES = (
    ("kiosk", D("Android", "compliant")),
    (None, D("Windows", "compliant")),  # a shared device without a primary user
    ("deleted", D("iOS", "unknown", days_since_sync=50)),  # its user no longer exists
)

# ------------------------------------------------------------------------------ the truth
EXPECTED_DEVICES = {
    # (operating_system, compliance_state, management_agent) -> devices
    ("Windows", "compliant", "mdm"): 4,  # c.stale, c.grace, c.off, the shared device
    ("iOS", "noncompliant", "mdm"): 1,
    ("Windows", "noncompliant", "mdm"): 1,
    ("Android", "inGracePeriod", "mdm"): 1,
    ("iOS", "inGracePeriod", "mdm"): 1,
    ("Android", "unknown", "mdm"): 1,
    ("Windows", "configManager", "configurationManagerClientMdm"): 1,
    ("macOS", "conflict", "mdm"): 1,
    ("Windows", "error", "mdm"): 1,
    ("Windows", "compliant", "configurationManagerClientMdm"): 1,
    ("iOS", "compliant", "mdm"): 1,
    ("Android", "noncompliant", "mdm"): 1,
    ("macOS", "compliant", "mdm"): 1,
    ("Android", "compliant", "mdm"): 1,  # the kiosk
    ("iOS", "unknown", "mdm"): 1,  # the deleted user's
}
EXPECTED_LICENCE_ERRORS = {
    # (sku, error, assigned_by) -> users (every user Graph returned, in scope or not)
    ("INTUNE_A", "CountViolation", "Intune Licensing"): 4,  # c.count, c.awe, c.twolic, the kiosk
    ("INTUNE_A", "ProhibitedInUsageLocationViolation", "direct"): 1,  # c.usage
    ("EMS", "Other", "direct"): 1,  # c.noloc
    ("INTUNE_A", "MutuallyExclusiveViolation", "direct"): 1,  # c.mutex
    ("EMS", "DependencyViolation", "EMS Users"): 1,  # c.depend
    ("INTUNE_A", "UniquenessViolation", "direct"): 1,  # c.errother
    ("ENTERPRISEPACK", "CountViolation", "direct"): 1,  # c.e3err
    ("ENTERPRISEPACK", "CountViolation", "EMS Users"): 1,  # c.off (out of scope)
}
# Time in stage from the contract's evidence (users at stages without any: first seen).
EXPECTED_ENTERED = {
    "c.nodev": "2024-04-01T09:00:00Z",  # earliest lastUpdatedDateTime of a granting entry
    "c.awe": "2024-03-15T00:00:00Z",
    "c.twolic": "2024-04-20T00:00:00Z",  # the entry in error grants nothing
    "c.blocked": "2024-03-01T09:00:00Z",
    "c.noncomp": "2024-06-01T00:00:00Z",  # earliest enrolledDateTime
    "c.stale": "2024-06-01T00:00:00Z",
    "c.count": "2024-05-01T08:00:00Z",  # Entra createdDateTime
}
ENTRA_CREATED = "2024-05-01T08:00:00Z"


# A second estate over the same OU and tenant with other settings: only INTUNE_A grants Intune,
# configManager counts as compliant, devices are stale after 42 days. Users whose truth differs:
VARIANT = "cloudco.strict"
VARIANT_SETTINGS = {
    "intune_service_plans": "[INTUNE_A]",
    "compliant_states": "[compliant, configManager]",
    "device_stale_after": "42d",
}
VARIANT_TRUTH = {
    "c.edu": ("entra_synced", "no_intune_license"),  # INTUNE_EDU is not listed
    "c.comgmt": ("device_compliant", None),  # configManager is compliant here
    "c.grace": ("device_compliant", None),  # its compliant device synced 35 days ago: fresh
    "c.stale": ("device_enrolled", "device_noncompliant"),  # the noncompliant one (40 days) is fresh
}


def in_scope() -> list[CloudUser]:
    return [u for u in USERS if u.stage is not None]


def truth(user: CloudUser, estate: str = NAME) -> tuple[str | None, str | None]:
    """(stage, reason) of a user in ``cloudco`` or in the variant estate."""
    if estate == VARIANT and user.sam in VARIANT_TRUTH:
        return VARIANT_TRUTH[user.sam]
    return user.stage, user.reason


def expected_users(estate: str = NAME) -> dict[str, int]:
    return {stage: sum(1 for u in in_scope() if truth(u, estate)[0] == stage) for stage in CLOUD_STAGES}


def expected_reasons(estate: str = NAME) -> dict[tuple[str, str], int]:
    return {pair: sum(1 for u in in_scope() if truth(u, estate) == pair) for pair in CLOUD_REASONS}


# ------------------------------------------------------------------------------ building it
@dataclass
class BuiltCloud:
    accounts: dict[str, AdAccount]
    entra_ids: dict[str, str]
    organization_last_sync: datetime

    def user(self, sam: str) -> CloudUser:
        return next(u for u in USERS if u.sam == sam)


def _object_id(name: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"https://entra.test/{NAME}/{name}"))


def _state(entry: State) -> dict[str, Any]:
    return tenant_data.license_state(
        SKUS[entry.sku][0],
        state=entry.state,
        error=entry.error,
        group=GROUPS[entry.group][0] if entry.group else None,
        disabled=tuple(PLAN_IDS[p] for p in entry.disabled),
        updated=entry.updated,
    )


def _assigned(entries: tuple[State, ...]) -> list[dict[str, Any]]:
    """assignedLicenses: the SKUs whose assignment is in effect."""
    return [
        {"skuId": SKUS[e.sku][0], "disabledPlans": [PLAN_IDS[p] for p in e.disabled]}
        for e in entries
        if e.state in ("Active", "ActiveWithError")
    ]


def _graph_user(object_id: str, upn: str, **props: Any) -> dict[str, Any]:
    user = tenant_data.graph_user(0, synced=False, created=ENTRA_CREATED, licenses=[], license_states=[])
    user.update(id=object_id, userPrincipalName=upn, mail=upn, displayName=upn.split("@")[0], **props)
    return user


def _synced_user(user: CloudUser, account: AdAccount, last_sync: datetime) -> dict[str, Any]:
    return _graph_user(
        _object_id(user.sam),
        account.upn or "",
        accountEnabled=user.enabled,
        usageLocation=user.usage_location,
        onPremisesSyncEnabled=True,
        onPremisesImmutableId=account.immutable_id if user.synced == "imm" else None,
        onPremisesSecurityIdentifier=account.sid if user.synced == "sid" else None,
        onPremisesSamAccountName=account.sam,
        onPremisesDomainName="test.local",
        onPremisesDistinguishedName=account.dn,
        onPremisesLastSyncDateTime=iso(last_sync),
        assignedLicenses=_assigned(user.states),
        licenseAssignmentStates=[] if user.legacy else [_state(s) for s in user.states],
    )


def _device(index: int, user_id: str | None, device: Device, now: datetime) -> dict[str, Any]:
    record = tenant_data.managed_device(index, None)
    record.update(
        id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"https://intune.test/{NAME}/device/{index}")),
        userId=user_id,
        deviceName=f"{device.os.upper()}-{index:04d}",
        operatingSystem=device.os,
        complianceState=device.compliance,
        managementAgent=device.agent,
        enrolledDateTime=device.enrolled,
        lastSyncDateTime=iso(now - timedelta(days=device.days_since_sync)),
    )
    return record


def build_tenant(accounts: dict[str, AdAccount], last_sync: datetime) -> tuple[SimTenant, dict[str, str]]:
    now = datetime.now(UTC)
    users: list[dict[str, Any]] = []
    entra_ids: dict[str, str] = {}
    devices: list[dict[str, Any]] = []
    for user in USERS:
        account = accounts[user.sam]
        if user.synced:
            users.append(_synced_user(user, account, last_sync))
            entra_ids[user.sam] = users[-1]["id"]
        if user.conflict_upn:
            users.append(_graph_user(_object_id(f"cloud-{user.sam}"), (account.upn or "").upper()))
        for device in user.devices:
            devices.append(_device(len(devices), entra_ids[user.sam], device, now))
    kiosk = _graph_user(
        _object_id("kiosk"),
        KIOSK_UPN,
        licenseAssignmentStates=[_state(S("INTUNE_A", "Error", "CountViolation", group="lic"))],
    )
    users.append(kiosk)
    owners = {"kiosk": kiosk["id"], "deleted": _object_id("deleted"), None: None}
    for owner, device in EXTRA_DEVICES:
        devices.append(_device(len(devices), owners[owner], device, now))
    skus = [
        tenant_data.sku(sku_id, part, enabled=20, consumed=12, plans=plans)
        for part, (sku_id, plans) in SKUS.items()
    ]
    tenant = SimTenant(
        TENANT_ID,
        users=users,
        organization={**tenant_data.organization(last_sync=iso(last_sync)), "id": TENANT_ID},
        skus=skus,
        subscriptions=[],
        apps={
            tenant_data.CLIENT_ID: SimApp(
                tenant_data.CLIENT_ID,
                tenant_data.CLIENT_SECRET,
                permissions=frozenset(
                    {
                        "User.Read.All",
                        "Organization.Read.All",
                        "DeviceManagementManagedDevices.Read.All",
                        "GroupMember.Read.All",
                    }
                ),
            )
        },
        devices=devices,
        groups=[tenant_data.group(group_id, name) for group_id, name in GROUPS.values()],
    )
    return tenant, entra_ids


def build(samba_dc: SambaDC, graph: Graph) -> BuiltCloud:
    create_users(
        samba_dc,
        [OU],
        [NewUser(OU, u.sam, f"{u.sam}@test.local", enabled=not u.disabled_in_ad) for u in USERS],
    )
    accounts = read_accounts(samba_dc, [OU])
    assert set(accounts) == {u.sam for u in USERS}
    last_sync = (datetime.now(UTC) - timedelta(days=2)).replace(microsecond=0)
    tenant, entra_ids = build_tenant(accounts, last_sync)
    graph.sim.add_tenant(tenant)
    return BuiltCloud(accounts, entra_ids, last_sync)


DEFAULT_SETTINGS = {
    "intune_service_plans": "[INTUNE_A, INTUNE_EDU, INTUNE_SMBIZ, INTUNE_A_VL]",
    "compliant_states": "[compliant]",
    "device_stale_after": "30d",
}


def estate_yaml(
    *,
    bind_user: str,
    samba_ca: str,
    graph: Graph,
    secret_file: Any,
    name: str = NAME,
    settings: dict[str, str] | None = None,
) -> str:
    chosen = settings or DEFAULT_SETTINGS
    body = (
        f"name: {name}\npipeline: cloud\n"
        + active_directory_yaml(bind_user, samba_ca, OU)
        + entra_yaml(TENANT_ID, graph, secret_file)
        + "".join(f"{key}: {text}\n" for key, text in chosen.items())
        + "stuck_after: {ad_created: 0s, entra_synced: 0s, intune_licensed: 0s, device_enrolled: 0s}\n"
    )
    lines = body.rstrip("\n").splitlines()
    return "\n".join(["  - " + lines[0], *("    " + line for line in lines[1:])]) + "\n"
