"""Two hybrid_mdm acceptance estates, built on the real backends, with their ground truth.

One user per situation of CONTRACT.md's reason table ("Why a user is stuck"), each written as a
:class:`Scenario`: how its Entra and ConfigMgr records look, and (by hand, from the contract's
table, never from the exporter's code) the stage and reason it must get.

- ``hq``: Entra Connect last ran days ago (so ``entra_sync_pending`` holds for every account created
  today), and SMS_AD_USER_DISCOVERY_AGENT and SMS_CLOUD_USERSYNC are critical since midnight, so
  ``configmgr_discovery_unhealthy`` and ``connector_unhealthy`` show, and the rows before them
  (stale record; UPN mismatch, disabled Entra account) prove they take precedence.
- ``branch``: Entra Connect ran after the accounts were created and the components are healthy
  (discovery only warns; the connector's errors are older than midnight), so the "otherwise" rows
  ``entra_not_synced``, ``configmgr_not_discovered`` and ``connector_sync_pending`` show.

Both live on the session's Samba DC (one OU each, plus an OU outside both scopes), on one Graph
simulator (a tenant each) and in a ConfigMgr SQLite database each, read through the SQLite3 ODBC
driver.
"""

from __future__ import annotations

import sqlite3
import textwrap
import uuid
from collections.abc import Iterable
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from tests.ad.samba import DOMAIN_DN, LDAPS_PORT, SambaDC
from tests.configmgr import cmdb
from tests.entra import tenant_data
from tests.entra.graph_sim import SimApp, SimTenant
from tests.integration.harness import (
    NETBIOS,
    AdAccount,
    Graph,
    NewUser,
    create_service_account,
    create_users,
    iso,
    plain_guid,
    read_accounts,
)

# ------------------------------------------------------------------------------ the contract's table
# (stage, reason) pairs of the hybrid_mdm chain, copied from CONTRACT.md in table order.
HYBRID_STAGES = (
    "ad_created",
    "entra_synced",
    "cm_discovered",
    "in_intune_collection",
    "connector_synced",
    "intune_enabled",
)
HYBRID_REASONS = (
    ("ad_created", "entra_cloud_user_conflict"),
    ("ad_created", "entra_sync_pending"),
    ("ad_created", "entra_not_synced"),
    ("entra_synced", "configmgr_stale_record"),
    ("entra_synced", "configmgr_discovery_unhealthy"),
    ("entra_synced", "configmgr_not_discovered"),
    ("cm_discovered", "intune_collection_removed"),
    ("cm_discovered", "not_in_intune_collection"),
    ("in_intune_collection", "upn_mismatch"),
    ("in_intune_collection", "entra_account_disabled"),
    ("in_intune_collection", "connector_unhealthy"),
    ("in_intune_collection", "connector_sync_pending"),
    ("connector_synced", "cloud_user_id_other_user"),
    ("connector_synced", "cloud_user_id_unknown"),
)

SERVICE_SAM = "svc-accept"
SERVICE_PASSWORD = "Svc!Accept-2024-pw"
ELSEWHERE_OU = f"OU=AcceptElsewhere,{DOMAIN_DN}"
INTUNE = "PS100012"
INTUNE_PILOT = "PS100013"
STAFF = "PS100020"
ENTRA_CREATED = "2024-05-01T08:00:00Z"
OLD_ENTRA_CREATED = "2024-02-02T02:02:02Z"
MIDNIGHT = cmdb.SINCE_MIDNIGHT
INSTALL = cmdb.SINCE_INSTALL

Where = Literal["scope", "disabled", "elsewhere"]


@dataclass(frozen=True)
class Scenario:
    """One AD account, its records elsewhere, and the stage and reason the contract gives it."""

    sam: str
    stage: str | None  # None: out of scope
    reason: str | None  # None at intune_enabled (or out of scope)
    where: Where = "scope"
    entra: Literal["imm", "sid"] | None = None  # how its synced Entra user matches it; None: none
    entra_upn_upper: bool = False  # Entra UPN = AD UPN in upper case (UPNs compare case-insensitively)
    entra_upn: str | None = None  # an Entra UPN that really differs from the AD UPN
    entra_enabled: bool = True
    entra_created: str = ENTRA_CREATED
    conflict: Literal["upn", "imm", "sid"] | None = None  # a cloud-only Entra user holding this key
    cm: Literal["sid", "guid", "name"] | None = None  # the one key its ConfigMgr record carries
    collections: tuple[str, ...] = ()
    cloud_user_id: str | None = None  # "self" | "other:<sam>" | "cloud:<upn>" | "unknown"
    stale_record: bool = False  # a ConfigMgr record with this UPN and none of its keys
    ad_upn: bool = True  # False: the AD account has no userPrincipalName


@dataclass(frozen=True)
class EstateSpec:
    name: str
    ou: str
    tenant_id: str
    site_code: str
    scenarios: tuple[Scenario, ...]
    components: tuple[tuple[str, int, str], ...]  # (component, status, tally interval)
    entra_connect_days_ago: float | None  # None: it ran after the accounts were created
    cloud_only_upns: tuple[str, ...] = ()  # cloud-only Entra users CloudUserIDs may point at
    component_status: dict[str, int] = field(default_factory=dict)  # truth of the status metric

    def in_scope(self) -> list[Scenario]:
        return [s for s in self.scenarios if s.where == "scope"]


def _tenant_id(name: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{name}.tenant.test"))


HQ = EstateSpec(
    name="hq",
    ou=f"OU=AcceptHQ,{DOMAIN_DN}",
    tenant_id=_tenant_id("hq"),
    site_code="HQ1",
    entra_connect_days_ago=3,
    components=(
        ("SMS_AD_USER_DISCOVERY_AGENT", 2, MIDNIGHT),
        ("SMS_AD_USER_DISCOVERY_AGENT", 0, INSTALL),
        ("SMS_CLOUD_USERSYNC", 2, MIDNIGHT),
        ("SMS_CLOUD_USERSYNC", 0, INSTALL),
        ("SMS_DMP_DOWNLOADER", 0, MIDNIGHT),
    ),
    component_status={"SMS_AD_USER_DISCOVERY_AGENT": 2, "SMS_CLOUD_USERSYNC": 2, "SMS_DMP_DOWNLOADER": 0},
    scenarios=(
        # ad_created: a cloud-only user holds the UPN / immutable id / SID (before sync pending).
        Scenario("h.conf.upn", "ad_created", "entra_cloud_user_conflict", conflict="upn"),
        Scenario("h.conf.imm", "ad_created", "entra_cloud_user_conflict", conflict="imm"),
        Scenario("h.conf.sid", "ad_created", "entra_cloud_user_conflict", conflict="sid"),
        # Entra Connect last ran 3 days ago, before this account was created.
        Scenario("h.pending", "ad_created", "entra_sync_pending"),
        # entra_synced: a stale record with the UPN comes before the critical discovery agent.
        Scenario("h.stale", "entra_synced", "configmgr_stale_record", entra="imm", stale_record=True),
        Scenario(
            "h.undisc",
            "entra_synced",
            "configmgr_discovery_unhealthy",
            entra="sid",
            entra_created=OLD_ENTRA_CREATED,
        ),
        # cm_discovered
        Scenario(
            "h.removed",
            "cm_discovered",
            "intune_collection_removed",
            entra="imm",
            cm="sid",
            collections=(STAFF,),
            cloud_user_id="self",
        ),
        Scenario(
            "h.notcoll",
            "cm_discovered",
            "not_in_intune_collection",
            entra="imm",
            cm="guid",
            collections=(STAFF,),
        ),
        # in_intune_collection: UPN mismatch first (this one is also disabled in Entra), then the
        # disabled Entra account, both before the critical connector.
        Scenario(
            "h.upnmis",
            "in_intune_collection",
            "upn_mismatch",
            entra="imm",
            entra_upn="h.upnmis@test.onmicrosoft.com",
            entra_enabled=False,
            cm="sid",
            collections=(INTUNE,),
        ),
        Scenario(
            "h.blocked",
            "in_intune_collection",
            "entra_account_disabled",
            entra="imm",
            entra_enabled=False,
            cm="name",
            collections=(INTUNE,),
        ),
        Scenario(
            "h.conn",
            "in_intune_collection",
            "connector_unhealthy",
            entra="sid",
            entra_upn_upper=True,
            cm="sid",
            collections=(INTUNE,),
        ),
        # connector_synced
        Scenario(
            "h.cuid.other",
            "connector_synced",
            "cloud_user_id_other_user",
            entra="imm",
            cm="sid",
            collections=(INTUNE,),
            cloud_user_id="other:h.undisc",
        ),
        Scenario(
            "h.cuid.none",
            "connector_synced",
            "cloud_user_id_unknown",
            entra="imm",
            cm="guid",
            collections=(INTUNE,),
            cloud_user_id="unknown",
        ),
        # intune_enabled
        Scenario(
            "h.enabled1",
            "intune_enabled",
            None,
            entra="imm",
            cm="sid",
            collections=(INTUNE,),
            cloud_user_id="self",
        ),
        Scenario(
            "h.enabled2",
            "intune_enabled",
            None,
            entra="sid",
            cm="name",
            collections=(INTUNE_PILOT, STAFF),
            cloud_user_id="self",
        ),
        # Out of scope: disabled in AD; enabled but outside the search base. Both fully provisioned.
        Scenario(
            "h.off",
            None,
            None,
            where="disabled",
            entra="imm",
            cm="sid",
            collections=(INTUNE,),
            cloud_user_id="self",
        ),
        Scenario("h.away", None, None, where="elsewhere", entra="imm", cm="sid", collections=(INTUNE,)),
    ),
)

BRANCH = EstateSpec(
    name="branch",
    ou=f"OU=AcceptBranch,{DOMAIN_DN}",
    tenant_id=_tenant_id("branch"),
    site_code="BR1",
    entra_connect_days_ago=None,
    cloud_only_upns=("kiosk@branch.test",),
    components=(
        ("SMS_AD_USER_DISCOVERY_AGENT", 1, MIDNIGHT),  # a warning is not critical
        ("SMS_CLOUD_USERSYNC", 2, INSTALL),  # errors since installation, none since midnight
        ("SMS_CLOUD_USERSYNC", 0, MIDNIGHT),
    ),
    component_status={"SMS_AD_USER_DISCOVERY_AGENT": 1, "SMS_CLOUD_USERSYNC": 0},
    scenarios=(
        Scenario("b.notsync", "ad_created", "entra_not_synced"),
        Scenario("b.conf.upn", "ad_created", "entra_cloud_user_conflict", conflict="upn"),
        Scenario("b.stale", "entra_synced", "configmgr_stale_record", entra="sid", stale_record=True),
        Scenario("b.undisc", "entra_synced", "configmgr_not_discovered", entra="imm"),
        # No UPN in AD: a ConfigMgr record without UPN is no stale record of it.
        Scenario(
            "b.noupn",
            "entra_synced",
            "configmgr_not_discovered",
            entra="sid",
            entra_upn="b.noupn@branch.onmicrosoft.com",
            ad_upn=False,
        ),
        Scenario("b.notcoll", "cm_discovered", "not_in_intune_collection", entra="sid", cm="sid"),
        Scenario(
            "b.pending",
            "in_intune_collection",
            "connector_sync_pending",
            entra="imm",
            entra_upn_upper=True,
            cm="guid",
            collections=(INTUNE,),
        ),
        Scenario(
            "b.blocked",
            "in_intune_collection",
            "entra_account_disabled",
            entra="imm",
            entra_enabled=False,
            cm="sid",
            collections=(INTUNE,),
        ),
        Scenario(
            "b.cuid.cloud",
            "connector_synced",
            "cloud_user_id_other_user",
            entra="imm",
            cm="name",
            collections=(INTUNE,),
            cloud_user_id="cloud:kiosk@branch.test",
        ),
        Scenario(
            "b.enabled",
            "intune_enabled",
            None,
            entra="imm",
            cm="sid",
            collections=(INTUNE,),
            cloud_user_id="self",
        ),
    ),
)

ESTATES = (HQ, BRANCH)


def expected_users(spec: EstateSpec) -> dict[str, int]:
    return {stage: sum(1 for s in spec.in_scope() if s.stage == stage) for stage in HYBRID_STAGES}


def expected_reasons(spec: EstateSpec) -> dict[tuple[str, str], int]:
    """Every (stage, reason) pair of the table -> stuck users (every waiting user is stuck here)."""
    return {pair: sum(1 for s in spec.in_scope() if (s.stage, s.reason) == pair) for pair in HYBRID_REASONS}


# Records each source holds (CONTRACT: in-scope AD users; every Graph user; every ConfigMgr record).
EXPECTED_RECORDS = {
    # hq: 15 in scope. Entra: 13 synced (11 in scope + h.off + h.away), 3 cloud-only conflicts, 1
    # synced user whose account is gone. ConfigMgr: 11 scenario records, 1 stale record, 2 ghosts.
    "hq": {"ad": 15, "entra": 17, "configmgr": 14},
    # branch: 10 in scope. Entra: 8 synced, 1 conflict, the gone user, the kiosk. ConfigMgr: 5 + 3.
    "branch": {"ad": 10, "entra": 11, "configmgr": 8},
}
EXPECTED_ORPHANS = {
    "hq": {"entra": 3, "configmgr": 5},  # h.off, h.away, gone | h.stale.old, h.off, h.away, 2 ghosts
    "branch": {"entra": 1, "configmgr": 3},  # gone | b.stale.old, 2 ghosts
}
EXPECTED_MISSING_CLOUD_USER_ID = {
    "hq": {"true": 4, "false": 4},  # upnmis, blocked, conn, away | notcoll, stale.old, 2 ghosts
    "branch": {"true": 2, "false": 4},  # pending, blocked | notcoll, stale.old, 2 ghosts
}
EXPECTED_MISMATCH = {"hq": 2, "branch": 1}  # cuid.other, cuid.none | cuid.cloud


def check_trace_document(document: Any, built: BuiltEstate, scenario: Scenario, *, stuck: bool) -> None:
    """The contract's trace JSON for one user, against the ground truth (shared with the CLI test)."""
    assert isinstance(document, dict), document
    account = built.accounts[scenario.sam]
    assert document["estate"] == built.spec.name
    assert (document["stage"], document["reason"]) == (scenario.stage, scenario.reason), document
    assert document["stuck"] is stuck, document
    user = document["user"]
    assert user["sam"] == account.sam
    assert user["upn"] == account.upn
    assert plain_guid(user["object_guid"]) == plain_guid(account.guid_text)
    assert user["object_sid"].upper() == account.sid.upper()
    steps = document["steps"]
    assert [step["stage"] for step in steps] == list(HYBRID_STAGES)
    reached = HYBRID_STAGES.index(scenario.stage or "")
    assert [step["done"] for step in steps] == [i <= reached for i in range(len(HYBRID_STAGES))]
    assert all(isinstance(step["evidence"], str) and step["evidence"] for step in steps), steps
    assert document["entered_stage_at"]
    if scenario.reason is None:
        assert document["action"] is None
    else:
        assert document["detail"] and document["action"], document


# ------------------------------------------------------------------------------ building it
@dataclass
class BuiltEstate:
    spec: EstateSpec
    accounts: dict[str, AdAccount]  # every account of the spec (in scope or not)
    entra_ids: dict[str, str]  # sam -> object id of its synced Entra user
    cloud_only_ids: dict[str, str]  # upn -> object id of a cloud-only user
    database: Path
    discovered: datetime  # Creation_Date0 of every ConfigMgr record
    organization_last_sync: datetime

    def scenario(self, sam: str) -> Scenario:
        return next(s for s in self.spec.scenarios if s.sam == sam)


def _ou_of(spec: EstateSpec, scenario: Scenario) -> str:
    return ELSEWHERE_OU if scenario.where == "elsewhere" else spec.ou


def _upn(sam: str) -> str:
    return f"{sam}@test.local"


def create_ad(samba_dc: SambaDC) -> tuple[str, dict[str, AdAccount]]:
    """The accounts of both estates and the service account; returns (bind UPN, accounts)."""
    bind_user = create_service_account(samba_dc, SERVICE_SAM, SERVICE_PASSWORD)
    users = [
        NewUser(_ou_of(spec, s), s.sam, _upn(s.sam) if s.ad_upn else None, enabled=s.where != "disabled")
        for spec in ESTATES
        for s in spec.scenarios
    ]
    create_users(samba_dc, [spec.ou for spec in ESTATES] + [ELSEWHERE_OU], users)
    accounts = read_accounts(samba_dc, [spec.ou for spec in ESTATES] + [ELSEWHERE_OU])
    missing = {u.sam for u in users} - set(accounts)
    assert not missing, f"Samba did not create {missing}"
    return bind_user, accounts


def _object_id(estate: str, name: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"https://entra.test/{estate}/{name}"))


def _entra_user(
    object_id: str, upn: str, *, created: str = ENTRA_CREATED, enabled: bool = True
) -> dict[str, Any]:
    """A cloud-only Graph user with every property the simulator knows; callers add on-prem values."""
    user = tenant_data.graph_user(0, synced=False, created=created, enabled=enabled)
    user.update(
        id=object_id,
        userPrincipalName=upn,
        mail=upn,
        displayName=upn.split("@")[0],
        onPremisesSyncEnabled=None,
        onPremisesImmutableId=None,
        onPremisesSecurityIdentifier=None,
        onPremisesSamAccountName=None,
        onPremisesDomainName=None,
        onPremisesDistinguishedName=None,
        onPremisesLastSyncDateTime=None,
    )
    return user


def _synced_user(estate: str, scenario: Scenario, account: AdAccount, last_sync: datetime) -> dict[str, Any]:
    upn = account.upn or ""
    if scenario.entra_upn:
        upn = scenario.entra_upn
    elif scenario.entra_upn_upper:
        upn = upn.upper()
    user = _entra_user(
        _object_id(estate, scenario.sam), upn, created=scenario.entra_created, enabled=scenario.entra_enabled
    )
    user.update(
        onPremisesSyncEnabled=True,
        # Matched by immutable id, or (no immutable id) by SID only.
        onPremisesImmutableId=account.immutable_id if scenario.entra == "imm" else None,
        onPremisesSecurityIdentifier=account.sid if scenario.entra == "sid" else None,
        onPremisesSamAccountName=account.sam,
        onPremisesDomainName="test.local",
        onPremisesDistinguishedName=account.dn,
        onPremisesLastSyncDateTime=iso(last_sync),
    )
    return user


def _conflicting_user(estate: str, scenario: Scenario, account: AdAccount) -> dict[str, Any]:
    """A cloud-only user holding one of the account's keys; onPremisesSyncEnabled is not true."""
    kind = scenario.conflict
    upn = (account.upn or "").upper() if kind == "upn" else f"cloud.{scenario.sam}@test.onmicrosoft.com"
    user = _entra_user(_object_id(estate, f"cloud-{scenario.sam}"), upn)
    if kind == "imm":
        user.update(onPremisesSyncEnabled=False, onPremisesImmutableId=account.immutable_id)
    elif kind == "sid":
        user.update(onPremisesSecurityIdentifier=account.sid)
    return user


def build_tenant(
    spec: EstateSpec, accounts: dict[str, AdAccount], last_sync: datetime
) -> tuple[SimTenant, dict[str, str], dict[str, str]]:
    users: list[dict[str, Any]] = []
    entra_ids: dict[str, str] = {}
    for scenario in spec.scenarios:
        account = accounts[scenario.sam]
        if scenario.entra:
            user = _synced_user(spec.name, scenario, account, last_sync)
            entra_ids[scenario.sam] = user["id"]
            users.append(user)
        if scenario.conflict:
            users.append(_conflicting_user(spec.name, scenario, account))
    # A synced user whose AD account is gone (an orphan), and cloud-only users nobody conflicts with.
    gone = _entra_user(_object_id(spec.name, "gone"), "gone@test.local")
    gone.update(
        onPremisesSyncEnabled=True,
        onPremisesImmutableId="R09ORS1HT05FLUdPTkUtR09ORQ==",
        onPremisesSecurityIdentifier="S-1-5-21-9-9-9-4242",
    )
    users.append(gone)
    cloud_only = {upn: _object_id(spec.name, f"cloud-only-{upn}") for upn in spec.cloud_only_upns}
    users += [_entra_user(object_id, upn) for upn, object_id in cloud_only.items()]
    tenant = SimTenant(
        spec.tenant_id,
        users=users,
        organization={**tenant_data.organization(last_sync=iso(last_sync)), "id": spec.tenant_id},
        skus=[
            tenant_data.sku(
                tenant_data.INTUNE_A_SKU,
                "INTUNE_A",
                enabled=50,
                consumed=10,
                plans=((tenant_data.INTUNE_A_PLAN, "INTUNE_A"),),
            )
        ],
        subscriptions=[],
        apps={tenant_data.CLIENT_ID: SimApp(tenant_data.CLIENT_ID, tenant_data.CLIENT_SECRET)},
    )
    return tenant, entra_ids, cloud_only


def _cloud_user_id(
    spec: EstateSpec, scenario: Scenario, entra_ids: dict[str, str], cloud_only: dict[str, str]
) -> str | None:
    value = scenario.cloud_user_id
    if value is None:
        return None
    if value == "self":
        # As the connector may write it: upper case, sometimes in braces.
        own = entra_ids[scenario.sam].upper()
        return "{" + own + "}" if scenario.sam.endswith("2") else own
    if value.startswith("other:"):
        return "{" + entra_ids[value.removeprefix("other:")].upper() + "}"
    if value.startswith("cloud:"):
        return cloud_only[value.removeprefix("cloud:")]
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"deleted/{spec.name}/{scenario.sam}")).upper()


def build_configmgr(
    path: Path,
    spec: EstateSpec,
    accounts: dict[str, AdAccount],
    entra_ids: dict[str, str],
    cloud_only: dict[str, str],
    discovered: datetime,
) -> None:
    records: list[cmdb.UserRecord] = []
    members: list[cmdb.Member] = []
    next_id = iter(range(5001, 6000))
    for scenario in spec.scenarios:
        account = accounts[scenario.sam]
        if scenario.cm:
            resource_id = next(next_id)
            records.append(
                cmdb.UserRecord(
                    resource_id,
                    # Matched by the one key it carries: TEST\sam only when cm == "name".
                    scenario.sam.upper() if scenario.cm == "name" else scenario.sam,
                    scenario.sam,
                    account.upn,
                    account.sid if scenario.cm == "sid" else None,
                    account.guid_raw if scenario.cm == "guid" else None,
                    512,
                    discovered,
                    _cloud_user_id(spec, scenario, entra_ids, cloud_only),
                    domain=NETBIOS if scenario.cm == "name" else "OLDDOM",
                )
            )
            members += [cmdb.Member(collection, resource_id) for collection in scenario.collections]
        if scenario.stale_record:
            # The account's previous incarnation: same UPN (other case), another SID, GUID and name.
            records.append(
                cmdb.UserRecord(
                    next(next_id),
                    f"{scenario.sam}.old",
                    f"{scenario.sam} (old)",
                    (account.upn or "").upper(),
                    "S-1-5-21-111-222-333-4411",
                    uuid.uuid5(uuid.NAMESPACE_URL, f"old/{scenario.sam}").bytes_le,
                    512,
                    discovered - timedelta(days=400),
                    None,
                    domain=NETBIOS,
                )
            )
    # Records of somebody AD does not know, with and without a UPN.
    records += [
        cmdb.UserRecord(
            next(next_id),
            "ghost",
            "Ghost",
            "ghost@test.local",
            "S-1-5-21-111-222-333-5151",
            None,
            512,
            discovered,
            None,
        ),
        cmdb.UserRecord(
            next(next_id),
            "noupn.ghost",
            "No UPN",
            None,
            "S-1-5-21-111-222-333-5252",
            None,
            512,
            discovered,
            None,
        ),
    ]
    collections = [
        cmdb.Collection(INTUNE, "Intune Users", 1),
        cmdb.Collection(INTUNE_PILOT, "Intune Pilot", 1),
        cmdb.Collection(STAFF, "All Staff", 1),
    ]
    components = [
        cmdb.ComponentStatus(spec.site_code, f"CM01.{spec.name}.test", component, status, tally)
        for component, status, tally in spec.components
    ]
    with closing(sqlite3.connect(path)) as connection:
        cmdb.populate(connection, "sqlite", records, collections, members, components)


def build_estates(samba_dc: SambaDC, graph: Graph, workdir: Path) -> tuple[str, dict[str, BuiltEstate]]:
    bind_user, accounts = create_ad(samba_dc)
    created_latest = max(a.when_created for a in accounts.values())
    discovered = (datetime.now(UTC) - timedelta(minutes=10)).replace(microsecond=0)
    built: dict[str, BuiltEstate] = {}
    for spec in ESTATES:
        if spec.entra_connect_days_ago is None:
            # Entra Connect ran after every account was created (whenCreated has whole seconds).
            last_sync = created_latest + timedelta(seconds=1)
        else:
            last_sync = (datetime.now(UTC) - timedelta(days=spec.entra_connect_days_ago)).replace(
                microsecond=0
            )
        mine = {s.sam: accounts[s.sam] for s in spec.scenarios}
        tenant, entra_ids, cloud_only = build_tenant(spec, mine, last_sync)
        graph.sim.add_tenant(tenant)
        database = workdir / f"cm-{spec.name}.sqlite"
        build_configmgr(database, spec, mine, entra_ids, cloud_only, discovered)
        built[spec.name] = BuiltEstate(spec, mine, entra_ids, cloud_only, database, discovered, last_sync)
    return bind_user, built


IDENTIFIERS = (
    # (label, whose, how): every way the contract lets an admin name a user.
    ("UPN in another case", "h.enabled1", "upn-upper"),
    ("sAMAccountName", "h.enabled1", "sam"),
    ("DOMAIN\\sam", "h.enabled1", "domain-sam"),
    ("objectGUID with braces", "h.enabled1", "guid-braces"),
    ("objectGUID without braces", "h.enabled1", "guid-plain"),
    ("Entra object id", "h.enabled1", "entra-id"),
    ("stuck user by UPN", "h.upnmis", "upn-upper"),
    ("stuck user by objectGUID", "h.upnmis", "guid-plain"),
    ("stuck user by Entra object id", "h.upnmis", "entra-id"),
    ("stuck user by DOMAIN\\sam", "h.conn", "domain-sam"),
)


def identifier(estate: BuiltEstate, sam: str, how: str) -> str:
    """How an admin may name one user: UPN, sAMAccountName, DOMAIN\\sam, objectGUID, Entra id."""
    account = estate.accounts[sam]
    return {
        "upn-upper": (account.upn or "").upper(),
        "sam": account.sam,
        "domain-sam": "test\\" + account.sam.upper(),
        "guid-braces": "{" + plain_guid(account.guid_text).upper() + "}",
        "guid-plain": plain_guid(account.guid_text),
        "entra-id": estate.entra_ids[sam].upper(),
    }[how]


# ------------------------------------------------------------------------------ configuration
def active_directory_yaml(bind_user: str, samba_ca: str, search_base: str) -> str:
    return textwrap.dedent(
        f"""\
        active_directory:
          url: ldaps://localhost:{LDAPS_PORT}
          bind_user: {bind_user}
          bind_password: ${{ACCEPT_AD_PASSWORD}}
          ca_file: {samba_ca}
          search_bases: ["{search_base}"]
          timeout: 15s
        """
    )


def entra_yaml(tenant_id: str, graph: Graph, secret_file: Path) -> str:
    return textwrap.dedent(
        f"""\
        entra:
          tenant_id: {tenant_id}
          client_id: {tenant_data.CLIENT_ID}
          client_secret_file: {secret_file}
          authority_host: {graph.sim.base_url}
          graph_url: {graph.sim.base_url}
          ca_file: {graph.ca_file}
          timeout: 15s
          max_retry_wait: 5s
        """
    )


def hybrid_estate_yaml(
    estate: BuiltEstate,
    *,
    bind_user: str,
    samba_ca: str,
    graph: Graph,
    secret_file: Path,
    odbc_extra: str = "",
) -> str:
    """One estate of the config's ``estates`` list (indented for it); every stage stuck after 0s."""
    spec = estate.spec
    body = (
        f"name: {spec.name}\n"
        + active_directory_yaml(bind_user, samba_ca, spec.ou)
        + entra_yaml(spec.tenant_id, graph, secret_file)
        + textwrap.dedent(
            f"""\
            configmgr:
              connection_string: "DRIVER={{SQLite3}};Database={estate.database}{odbc_extra}"
              intune_collection_ids: [{INTUNE}, {INTUNE_PILOT}]
              query_timeout: 15s
            stuck_after:
              ad_created: 0s
              entra_synced: 0s
              cm_discovered: 0s
              in_intune_collection: 0s
              connector_synced: 0s
            """
        )
    )
    return _list_item(body)


def _list_item(body: str) -> str:
    lines = body.rstrip("\n").splitlines()
    return "\n".join(["  - " + lines[0], *("    " + line for line in lines[1:])]) + "\n"


def config_yaml(estates: Iterable[str], *, state_file: Path, user_label: str) -> str:
    return textwrap.dedent(
        f"""\
            refresh_interval: 5m
            state_file: {state_file}
            stuck_users_listed: 500
            user_label: {user_label}
            estates:
            """
    ) + "".join(estates)
