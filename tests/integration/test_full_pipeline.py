"""End to end: the exporter as a subprocess, reading all three real backends of one estate.

- Active Directory: the session's Samba AD DC; a dedicated OU holds one user per scenario, and
  their objectGUID/objectSid/whenCreated are read back as Administrator.
- Entra ID: the loopback HTTPS Graph simulator, whose tenant is built from what Samba returned.
- ConfigMgr: a ConfigMgr-shaped SQLite database read through the real ``SQLite3`` ODBC driver.

Every expected value below, stages and reasons alike, is worked out by hand from the scenario table
and CONTRACT.md (never by calling the stage model). A second test restarts the exporter from its state file with the ConfigMgr database
unreachable (FreeTDS against a closed port) and checks that only that source goes down.
"""

from __future__ import annotations

import base64
import sqlite3
import textwrap
import time
import uuid
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import ldap3
import pytest

from tests.ad.samba import DOMAIN_DN, LDAPS_PORT, USER_CLASSES, SambaDC
from tests.configmgr import cmdb
from tests.conftest import require_component
from tests.entra import tenant_data
from tests.entra.graph_sim import SimApp, SimTenant
from tests.integration.harness import (
    Exporter,
    Graph,
    Samples,
    epoch,
    free_port,
    odbc_drivers,
    require_sqlite_odbc,
    start_graph,
)
from tests.integration.harness import value as estate_value

ESTATE = "pipeline"
SCOPE_OU = f"OU=Pipeline,{DOMAIN_DN}"
ELSEWHERE_OU = f"OU=PipelineElsewhere,{DOMAIN_DN}"  # outside search_bases
SERVICE_SAM = "svc-pipeline"
SERVICE_USER = "svc-pipeline@test.local"
SERVICE_PASSWORD = "Svc!Pipeline-2024-pw"
USER_PASSWORD = "User!Pipeline-5678"
ENV = {"PIPELINE_AD_PASSWORD": SERVICE_PASSWORD}
INTUNE_COLLECTION = "PS100012"
STAFF_COLLECTION = "PS100020"
START_DEADLINE = 45.0
STAGES = (
    "ad_created",
    "entra_synced",
    "cm_discovered",
    "in_intune_collection",
    "connector_synced",
    "intune_enabled",
)
OLD_ENTRA_CREATED = "2024-01-01T00:00:00Z"
INTUNE_EXPIRY = "2030-06-30T00:00:00Z"

# ------------------------------------------------------------------------------ the scenarios
# One AD user per scenario (sAMAccountName -> where it must end up).
AD_ONLY = "p.adonly"  # only in AD                                      -> ad_created (stuck, 0s)
SYNCED = "p.synced"  # in Entra (old createdDateTime), not in CM           -> entra_synced (stuck, 1h)
SID_FALLBACK = "p.sidfallback"  # Entra by SID (no immutable id); CM by SID, not in Intune collection
GUID_ONLY = "p.guidonly"  # CM by Object_GUID0 text only, in collection, no CloudUserID
NAME_ONLY = "p.nameonly"  # CM by TEST\sam only, in collection, wrong CloudUserID (mismatch)
ENABLED = ("p.enabled1", "p.enabled2", "p.enabled3")  # CloudUserID = {ENTRA-ID}, upper case
NOT_IN_ENTRA = "p.notinentra"  # in collection with a CloudUserID, but no Entra user -> ad_created
DISABLED = "p.disabled"  # userAccountControl 514: out of scope; its CM record is an orphan
OUTSIDE = "p.outside"  # enabled, but in an OU outside search_bases: its Entra and CM records are orphans
IN_SCOPE = (AD_ONLY, SYNCED, SID_FALLBACK, GUID_ONLY, NAME_ONLY, *ENABLED, NOT_IN_ENTRA)

EXPECTED_USERS = {
    "ad_created": 2,  # AD_ONLY, NOT_IN_ENTRA
    "entra_synced": 1,  # SYNCED
    "cm_discovered": 1,  # SID_FALLBACK
    "in_intune_collection": 1,  # GUID_ONLY
    "connector_synced": 1,  # NAME_ONLY
    "intune_enabled": 3,  # ENABLED
}
# ad_created: stuck_after 0s and whenCreated in the past; entra_synced: createdDateTime in 2024,
# stuck_after 1h; cm_discovered: Creation_Date0 ten minutes ago, stuck_after 4h; the two stages
# without evidence start counting when the exporter first sees the user (1h thresholds).
EXPECTED_STUCK = {
    "ad_created": {AD_ONLY, NOT_IN_ENTRA},
    "entra_synced": {SYNCED},
    "cm_discovered": set(),
    "in_intune_collection": set(),
    "connector_synced": set(),
}
# Every in-scope user's reason (CONTRACT.md, "Why a user is stuck"), stuck or not yet.
# ad_created: Entra Connect last synced 2024-05-01, before the accounts were created; no cloud-only
# user holds their keys. entra_synced: no ConfigMgr record has the UPN, and AD User Discovery only
# warns. cm_discovered: no CloudUserID. in_intune_collection: Entra's UPN ends in test.example, AD's
# in test.local. connector_synced: the CloudUserID is no Entra user's id.
EXPECTED_REASONS = {
    AD_ONLY: ("ad_created", "entra_sync_pending"),
    NOT_IN_ENTRA: ("ad_created", "entra_sync_pending"),
    SYNCED: ("entra_synced", "configmgr_not_discovered"),
    SID_FALLBACK: ("cm_discovered", "not_in_intune_collection"),
    GUID_ONLY: ("in_intune_collection", "upn_mismatch"),
    NAME_ONLY: ("connector_synced", "cloud_user_id_unknown"),
    **{sam: ("intune_enabled", None) for sam in ENABLED},
}
EXPECTED_RECORDS = {
    "ad": 9,  # IN_SCOPE; DISABLED is filtered out, OUTSIDE is not under the search base
    "entra": 10,  # 7 synced matching IN_SCOPE users, OUTSIDE, an orphan synced user, a cloud-only user
    "configmgr": 10,  # 7 matching IN_SCOPE users, DISABLED, OUTSIDE, a user unknown to AD
}
EXPECTED_ORPHANS = {
    "entra": 2,  # OUTSIDE's and the synced user without any AD account
    "configmgr": 3,  # DISABLED, OUTSIDE, the record of a user unknown to AD
}
# CloudUserID null: in an Intune collection GUID_ONLY, OUTSIDE; not SID_FALLBACK, DISABLED, unknown.
EXPECTED_MISSING_CLOUD_USER_ID = {"true": 2, "false": 3}
EXPECTED_MISMATCH = 1  # NAME_ONLY
# The INTUNE_A SKU of the tenant (prepaid units by status, consumed units).
INTUNE_PREPAID = {"enabled": 25, "warning": 2, "suspended": 1, "locked_out": 0}
INTUNE_CONSUMED = 7


@dataclass(frozen=True)
class AdAccount:
    """What Samba assigned to one user, read back as Administrator with ldap3's own formatting."""

    sam: str
    guid_raw: bytes
    guid_text: str  # "{...}", lower case
    sid: str
    when_created: datetime


# ------------------------------------------------------------------------------ Active Directory
def _add_user(conn: ldap3.Connection, ou: str, sam: str, password: str, uac: int = 512) -> None:
    conn.add(
        f"CN={sam},{ou}",
        USER_CLASSES,
        {
            "sAMAccountName": sam,
            "userPrincipalName": f"{sam}@test.local",
            "unicodePwd": f'"{password}"'.encode("utf-16-le"),
            "userAccountControl": uac,
        },
    )


def _read_accounts(samba_dc: SambaDC) -> dict[str, AdAccount]:
    accounts: dict[str, AdAccount] = {}
    with samba_dc.admin(schema=True) as conn:
        for base in (SCOPE_OU, ELSEWHERE_OU):
            conn.search(
                base,
                "(objectClass=user)",
                ldap3.SUBTREE,
                attributes=["sAMAccountName", "objectGUID", "objectSid", "whenCreated"],
            )
            for entry in conn.response:
                if entry["type"] != "searchResEntry":
                    continue
                values = entry["attributes"]
                accounts[values["sAMAccountName"]] = AdAccount(
                    sam=values["sAMAccountName"],
                    guid_raw=entry["raw_attributes"]["objectGUID"][0],
                    guid_text=values["objectGUID"],
                    sid=values["objectSid"],
                    when_created=values["whenCreated"],
                )
    return accounts


@pytest.fixture(scope="module")
def ad_accounts(samba_dc: SambaDC) -> dict[str, AdAccount]:
    with samba_dc.admin() as conn:
        conn.add(SCOPE_OU, ["top", "organizationalUnit"])
        conn.add(ELSEWHERE_OU, ["top", "organizationalUnit"])
        # The exporter's bind account: an ordinary domain user outside the search base.
        _add_user(conn, f"CN=Users,{DOMAIN_DN}", SERVICE_SAM, SERVICE_PASSWORD)
        for sam in IN_SCOPE:
            _add_user(conn, SCOPE_OU, sam, USER_PASSWORD)
        _add_user(conn, SCOPE_OU, DISABLED, USER_PASSWORD, uac=514)
        _add_user(conn, ELSEWHERE_OU, OUTSIDE, USER_PASSWORD)
    accounts = _read_accounts(samba_dc)
    assert set(accounts) == {*IN_SCOPE, DISABLED, OUTSIDE}
    return accounts


# ------------------------------------------------------------------------------ Entra ID (Graph)
def _immutable_id(account: AdAccount) -> str:
    return base64.b64encode(account.guid_raw).decode("ascii")


def _synced_user(
    index: int, account: AdAccount | None, *, immutable: bool = True, created: str = "2024-05-01T08:00:00Z"
) -> dict[str, Any]:
    """A synced Graph user; ``account`` None is a synced user whose AD account is gone."""
    user = tenant_data.graph_user(index, created=created)
    sam = account.sam if account else f"p.gone{index}"
    user.update(
        id=str(uuid.uuid4()),
        userPrincipalName=f"{sam}@test.example",
        onPremisesSamAccountName=sam,
        onPremisesImmutableId=_immutable_id(account) if account and immutable else None,
        onPremisesSecurityIdentifier=account.sid if account else "S-1-5-21-9-9-9-4242",
    )
    if account is None:
        user["onPremisesImmutableId"] = base64.b64encode(uuid.uuid4().bytes_le).decode("ascii")
    return user


def build_tenant(accounts: dict[str, AdAccount]) -> tuple[SimTenant, dict[str, str]]:
    """The tenant and the Entra object id of every AD user that has one."""
    synced = [
        _synced_user(0, accounts[SYNCED], created=OLD_ENTRA_CREATED),
        _synced_user(1, accounts[SID_FALLBACK], immutable=False),
        _synced_user(2, accounts[GUID_ONLY]),
        _synced_user(3, accounts[NAME_ONLY]),
        *(_synced_user(4 + i, accounts[sam]) for i, sam in enumerate(ENABLED)),
        _synced_user(7, accounts[OUTSIDE]),
        _synced_user(8, None),  # orphan: synced, but no AD account has its anchor or SID
    ]
    cloud_only = tenant_data.graph_user(9, synced=False)
    skus = [
        tenant_data.sku(
            tenant_data.INTUNE_A_SKU,
            "INTUNE_A",
            enabled=INTUNE_PREPAID["enabled"],
            warning=INTUNE_PREPAID["warning"],
            suspended=INTUNE_PREPAID["suspended"],
            locked_out=INTUNE_PREPAID["locked_out"],
            consumed=INTUNE_CONSUMED,
            plans=((tenant_data.INTUNE_A_PLAN, "INTUNE_A"),),
        ),
        tenant_data.sku(tenant_data.E3_SKU, "ENTERPRISEPACK", enabled=10, consumed=4),
    ]
    subscriptions = [
        tenant_data.subscription(
            "sub-intune", tenant_data.INTUNE_A_SKU, "INTUNE_A", next_lifecycle=INTUNE_EXPIRY
        ),
        tenant_data.subscription("sub-e3", tenant_data.E3_SKU, "ENTERPRISEPACK", status="Warning"),
    ]
    tenant = SimTenant(
        tenant_data.TENANT_ID,
        users=[*synced, cloud_only],
        organization=tenant_data.organization(),
        skus=skus,
        subscriptions=subscriptions,
        apps={tenant_data.CLIENT_ID: SimApp(tenant_data.CLIENT_ID, tenant_data.CLIENT_SECRET)},
    )
    entra_ids = {u["onPremisesSamAccountName"]: u["id"] for u in synced}
    return tenant, entra_ids


@pytest.fixture(scope="module")
def graph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Graph]:
    started = start_graph(tmp_path_factory.mktemp("pipeline-graph"))
    yield started
    started.sim.stop()


# ------------------------------------------------------------------------------ ConfigMgr
def _cm_record(
    resource_id: int,
    sam: str,
    *,
    sid: str | None = None,
    guid: bytes | str | None = None,
    cloud_user_id: str | None = None,
    domain: str = "CONTOSO",
    created: datetime,
) -> cmdb.UserRecord:
    return cmdb.UserRecord(
        resource_id, sam, sam, f"{sam}@test.local", sid, guid, 512, created, cloud_user_id, domain
    )


def build_configmgr(
    path: Path, accounts: dict[str, AdAccount], entra_ids: dict[str, str], discovered: datetime
) -> None:
    a = accounts
    records = [
        # SID0 only (Unique_User_Name0 is CONTOSO\..., not TEST\...): matched by SID.
        _cm_record(3001, SID_FALLBACK, sid=a[SID_FALLBACK].sid, created=discovered),
        # No SID0: matched by Object_GUID0 alone, stored as upper-case GUID text.
        _cm_record(3002, GUID_ONLY, guid=a[GUID_ONLY].guid_text.upper(), created=discovered),
        # Neither SID0 nor Object_GUID0: matched by TEST\sam (in another case), wrong CloudUserID.
        _cm_record(
            3003,
            NAME_ONLY.upper(),
            domain="TEST",
            cloud_user_id=str(uuid.uuid4()).upper(),
            created=discovered,
        ),
        *(
            _cm_record(
                3004 + i,
                sam,
                # One SID in lower case: SID0 compares case-insensitively.
                sid=a[sam].sid.lower() if i == 1 else a[sam].sid,
                guid=a[sam].guid_raw,
                cloud_user_id="{" + entra_ids[sam].upper() + "}",
                created=discovered,
            )
            for i, sam in enumerate(ENABLED)
        ),
        _cm_record(
            3007, NOT_IN_ENTRA, sid=a[NOT_IN_ENTRA].sid, cloud_user_id=str(uuid.uuid4()), created=discovered
        ),
        _cm_record(3008, DISABLED, sid=a[DISABLED].sid, created=discovered),
        _cm_record(3009, OUTSIDE, sid=a[OUTSIDE].sid, created=discovered),
        _cm_record(3010, "p.unknown", sid="S-1-5-21-9-9-9-5151", created=discovered),
    ]
    collections = [
        cmdb.Collection(INTUNE_COLLECTION, "Intune Users", 1),
        cmdb.Collection(STAFF_COLLECTION, "All Staff", 1),
    ]
    in_intune = (3002, 3003, 3004, 3005, 3006, 3007, 3009)
    members = [cmdb.Member(INTUNE_COLLECTION, rid) for rid in in_intune]
    members.append(cmdb.Member(STAFF_COLLECTION, 3001))  # a collection, but not an Intune one
    with closing(sqlite3.connect(path)) as connection:
        cmdb.populate(connection, "sqlite", records, collections, members, cmdb.CASE_COMPONENTS)


# ------------------------------------------------------------------------------ the exporter
def config_text(
    *, state: Path, samba_ca: str, graph: Graph, secret_file: Path, connection_string: str
) -> str:
    return textwrap.dedent(
        f"""\
        refresh_interval: 5m
        state_file: {state}
        stuck_users_listed: 25
        user_label: sam
        estates:
          - name: {ESTATE}
            active_directory:
              url: ldaps://localhost:{LDAPS_PORT}
              bind_user: {SERVICE_USER}
              bind_password: ${{PIPELINE_AD_PASSWORD}}
              ca_file: {samba_ca}
              search_bases: ["{SCOPE_OU}"]
              timeout: 15s
            entra:
              tenant_id: {tenant_data.TENANT_ID}
              client_id: {tenant_data.CLIENT_ID}
              client_secret_file: {secret_file}
              authority_host: {graph.sim.base_url}
              graph_url: {graph.sim.base_url}
              ca_file: {graph.ca_file}
              timeout: 15s
              max_retry_wait: 5s
            configmgr:
              connection_string: "{connection_string}"
              intune_collection_ids: [{INTUNE_COLLECTION}]
              query_timeout: 15s
            stuck_after:
              ad_created: 0s
              entra_synced: 1h
              cm_discovered: 4h
              in_intune_collection: 1h
              connector_synced: 1h
        """
    )


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return estate_value(samples, name, ESTATE, **labels)


def labelled(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for (sample_name, labels), _ in samples.items() if sample_name == name]


def stage_values(samples: Samples) -> dict[str, Any]:
    """Everything that must survive a restart with ConfigMgr down, in one comparable structure."""
    return {
        "users": {s: value(samples, "intune_provisioning_users", provisioning_stage=s) for s in STAGES},
        "stuck": {s: value(samples, "intune_provisioning_stuck_users", provisioning_stage=s) for s in STAGES},
        "info": sorted(
            (d["provisioning_stage"], d["user"], d.get("reason", ""))
            for d in labelled(samples, "intune_provisioning_stuck_user_info")
        ),
        "mismatch": value(samples, "intune_provisioning_cloud_user_id_mismatch_users"),
        "orphans": {
            s: value(samples, "intune_provisioning_orphan_users", source=s) for s in ("entra", "configmgr")
        },
        "missing": {
            m: value(samples, "intune_provisioning_users_missing_cloud_user_id", in_intune_collection=m)
            for m in ("true", "false")
        },
    }


# ------------------------------------------------------------------------------ the first run
@dataclass
class FirstRun:
    samples: Samples
    stuck: dict[str, Any]
    traces: dict[str, tuple[int, Any]]
    log: str
    exit_code: int
    ready_after: float
    accounts: dict[str, AdAccount]
    discovered: datetime
    workdir: Path
    secret_file: Path
    state_file: Path


@pytest.fixture(scope="module")
def first_run(
    samba_dc: SambaDC,
    ad_accounts: dict[str, AdAccount],
    graph: Graph,
    tmp_path_factory: pytest.TempPathFactory,
) -> FirstRun:
    """Start the exporter on the three real backends, scrape it once ready, stop it with SIGTERM."""
    require_sqlite_odbc()
    workdir = tmp_path_factory.mktemp("pipeline")
    tenant, entra_ids = build_tenant(ad_accounts)
    graph.sim.add_tenant(tenant)
    discovered = (datetime.now(UTC) - timedelta(minutes=10)).replace(microsecond=0)
    database = workdir / "cm.sqlite"
    build_configmgr(database, ad_accounts, entra_ids, discovered)
    secret_file = workdir / "client-secret"
    secret_file.write_text(tenant_data.CLIENT_SECRET + "\n")
    state_file = workdir / "state.json"
    config = workdir / "config.yml"
    config.write_text(
        config_text(
            state=state_file,
            samba_ca=samba_dc.ca_file,
            graph=graph,
            secret_file=secret_file,
            connection_string=f"DRIVER={{SQLite3}};Database={database}",
        )
    )
    exporter = Exporter(config, workdir / "exporter-1.log", ENV)
    try:
        ready_after = exporter.wait_ready()
        samples = exporter.wait_evaluated([ESTATE])
        stuck = exporter.get_json("/stuck")
        traces = {sam: exporter.trace(sam) for sam in IN_SCOPE}
    finally:
        exit_code = exporter.stop()
    return FirstRun(
        samples=samples,
        stuck=stuck,
        traces=traces,
        log=exporter.log(),
        exit_code=exit_code,
        ready_after=ready_after,
        accounts=ad_accounts,
        discovered=discovered,
        workdir=workdir,
        secret_file=secret_file,
        state_file=state_file,
    )


def test_every_stage_and_side_fault_from_the_three_real_backends(first_run: FirstRun) -> None:
    samples = first_run.samples
    log_tail = first_run.log[-3000:]

    for source in ("ad", "entra", "entra_organization", "configmgr"):
        assert value(samples, "intune_exporter_source_up", source=source) == 1, (source, log_tail)
        for reason in ("auth", "timeout", "network", "throttled", "data", "other"):
            assert value(samples, "intune_exporter_source_errors_total", source=source, reason=reason) == 0
    for source, records in EXPECTED_RECORDS.items():
        assert value(samples, "intune_exporter_source_records", source=source) == records, source

    # Whole mappings at a time, so that a failure shows every stage side by side.
    values = stage_values(samples)
    assert values["users"] == EXPECTED_USERS
    assert values["stuck"] == {stage: len(EXPECTED_STUCK.get(stage, ())) for stage in STAGES}
    assert values["info"] == sorted(
        (stage, sam, EXPECTED_REASONS[sam][1]) for stage, sams in EXPECTED_STUCK.items() for sam in sams
    )
    assert values["mismatch"] == EXPECTED_MISMATCH
    assert values["orphans"] == EXPECTED_ORPHANS
    assert values["missing"] == EXPECTED_MISSING_CLOUD_USER_ID

    # When the longest-waiting user of a stage entered it, from each system's own evidence.
    accounts = first_run.accounts
    oldest_ad = min(accounts[sam].when_created for sam in (AD_ONLY, NOT_IN_ENTRA)).timestamp()
    oldest = "intune_provisioning_stage_oldest_entry_timestamp_seconds"
    assert value(samples, oldest, provisioning_stage="ad_created") == oldest_ad
    assert value(samples, oldest, provisioning_stage="entra_synced") == epoch(OLD_ENTRA_CREATED)
    assert value(samples, oldest, provisioning_stage="cm_discovered") == first_run.discovered.timestamp()

    sku = {"sku": "INTUNE_A", "sku_name": "Intune"}
    for status, units in INTUNE_PREPAID.items():
        assert value(samples, "intune_license_prepaid_units", status=status, **sku) == units, status
    assert value(samples, "intune_license_consumed_units", **sku) == INTUNE_CONSUMED
    expiry = value(
        samples,
        "intune_license_subscription_expiry_timestamp_seconds",
        sku="INTUNE_A",
        subscription_id="sub-intune",
        status="enabled",
        trial="false",
    )
    assert expiry == epoch(INTUNE_EXPIRY)


def test_stuck_endpoint_names_the_stuck_users_by_sam_at_their_stage(first_run: FirstRun) -> None:
    (estate,) = first_run.stuck["estates"]
    assert estate["estate"] == ESTATE
    assert estate["available"] is True
    listed = {stage: {u["user"] for u in item["users"]} for stage, item in estate["stages"].items()}
    assert listed == EXPECTED_STUCK
    reasons = {
        u["user"]: (stage, u["reason"]) for stage, item in estate["stages"].items() for u in item["users"]
    }
    assert reasons == {sam: EXPECTED_REASONS[sam] for sams in EXPECTED_STUCK.values() for sam in sams}
    assert {stage: item["count"] for stage, item in estate["stages"].items()} == {
        stage: len(sams) for stage, sams in EXPECTED_STUCK.items()
    }
    entered = {u["user"]: u["entered_stage_at"] for item in estate["stages"].values() for u in item["users"]}
    for sam in (AD_ONLY, NOT_IN_ENTRA):  # whenCreated, as Samba stored it
        assert epoch(entered[sam]) == first_run.accounts[sam].when_created.timestamp()
    assert entered[SYNCED] == OLD_ENTRA_CREATED  # Entra createdDateTime


@pytest.mark.parametrize("sam", IN_SCOPE)
def test_trace_endpoint_gives_every_user_its_stage_and_reason(first_run: FirstRun, sam: str) -> None:
    status, document = first_run.traces[sam]
    assert status == 200, document
    assert (document["stage"], document["reason"]) == EXPECTED_REASONS[sam]
    assert document["user"]["sam"] == sam
    stuck = any(sam in sams for sams in EXPECTED_STUCK.values())
    assert document["stuck"] is stuck


def test_clean_shutdown_keeps_secrets_out_of_the_log(first_run: FirstRun) -> None:
    assert first_run.exit_code == 0, first_run.log[-3000:]
    assert first_run.state_file.exists()
    for secret in (SERVICE_PASSWORD, tenant_data.CLIENT_SECRET):
        assert secret not in first_run.log


def test_restart_with_configmgr_unreachable_keeps_the_last_good_values(
    first_run: FirstRun, samba_dc: SambaDC, graph: Graph
) -> None:
    require_component("ODBC driver 'FreeTDS'", "FreeTDS" in odbc_drivers(), "apt-get install tdsodbc")
    closed_port = free_port()  # bound and released: nothing listens there
    config = first_run.workdir / "config-cm-down.yml"
    config.write_text(
        config_text(
            state=first_run.state_file,
            samba_ca=samba_dc.ca_file,
            graph=graph,
            secret_file=first_run.secret_file,
            connection_string=(
                f"DRIVER={{FreeTDS}};SERVER=127.0.0.1;PORT={closed_port};DATABASE=CM_PS1;TDS_Version=7.4"
            ),
        )
    )
    restarted_at = time.time()
    exporter = Exporter(config, first_run.workdir / "exporter-2.log", ENV)
    try:
        exporter.wait_ready()  # at once, from the state file
        samples = _wait_for_refreshes(exporter, restarted_at)
    finally:
        exit_code = exporter.stop()

    log_tail = exporter.log()[-3000:]
    assert value(samples, "intune_exporter_source_up", source="configmgr") == 0, log_tail
    network_errors = value(
        samples, "intune_exporter_source_errors_total", source="configmgr", reason="network"
    )
    assert (network_errors or 0) >= 1, log_tail
    for source in ("ad", "entra", "entra_organization"):
        assert value(samples, "intune_exporter_source_up", source=source) == 1, (source, log_tail)
        assert value(samples, "intune_exporter_source_errors_total", source=source, reason="network") == 0
    # The last good ConfigMgr read is the one of the first run.
    last_cm_success = value(
        samples, "intune_exporter_source_last_success_timestamp_seconds", source="configmgr"
    )
    assert last_cm_success is not None and last_cm_success < restarted_at
    assert (
        value(samples, "intune_exporter_source_records", source="configmgr") == EXPECTED_RECORDS["configmgr"]
    )
    assert stage_values(samples) == stage_values(first_run.samples)
    assert stage_values(samples)["users"] == EXPECTED_USERS
    assert exit_code == 0, log_tail


def _wait_for_refreshes(exporter: Exporter, since: float) -> Samples:
    """Scrape until ConfigMgr's refresh has failed and AD and Entra have refreshed again."""
    deadline = time.monotonic() + START_DEADLINE
    samples: Samples = {}
    while time.monotonic() < deadline:
        samples = exporter.metrics()
        failed = sum(
            value(samples, "intune_exporter_source_errors_total", source="configmgr", reason=reason) or 0
            for reason in ("auth", "timeout", "network", "throttled", "data", "other")
        )
        refreshed = all(
            (value(samples, "intune_exporter_source_last_success_timestamp_seconds", source=s) or 0) >= since
            for s in ("ad", "entra", "entra_organization")
        )
        if failed and refreshed:
            return samples
        time.sleep(0.1)
    pytest.fail(f"sources did not refresh within {START_DEADLINE:.0f}s:\n{exporter.log()[-4000:]}")
