"""One user explained (CONTRACT.md, "Tracing one user" and the /stuck ``detail``): the steps of the
chain with their ``done`` flags and evidence, a detail naming the evidence of every reason, the
trace JSON, and finding a user by any of the names the contract lists."""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Callable

import pytest

from exporter.ids import immutable_id
from exporter.model import AdUser, AssignedLicense, CmComponent, LicenseState
from exporter.pipelines.definitions import CLOUD, DAY, HOUR, HYBRID_MDM
from exporter.pipelines.evaluation import Evaluation
from exporter.pipelines.explain import explain, find_rows, iso
from exporter.pipelines.hybrid import AD_USER_DISCOVERY, CLOUD_USER_SYNC
from tests.builders import (
    E3_SKU,
    EMS_SKU,
    INTUNE_A,
    INTUNE_SKU,
    ad,
    ad_user,
    cloud_only,
    cm,
    cm_for,
    device_for,
    devices,
    entra,
    entra_for,
    licensed,
    organization,
    row_of,
    run_cloud,
    run_hybrid,
)

NOW = 10_000_000.0
GROUP = "aaaaaaaa-0000-4000-8000-000000000001"


def explained(evaluation: Evaluation, sam: str):
    return explain(evaluation, row_of(evaluation, sam), NOW, "contoso")


def hybrid(users, entra_users=(), records=(), components=(), org=None) -> Evaluation:
    return run_hybrid(
        ad(*users), entra(*entra_users), cm(*records, components=components), now=NOW, organization=org
    )


def active(sku: str = INTUNE_SKU, **kw) -> LicenseState:
    values = {"state": "Active", "error": "None", "assigned_by_group": None, "last_updated": NOW - DAY}
    values.update(kw)
    return LicenseState(sku, **values)


def cloud(users, entra_users=(), device_list=(), org=None, groups=None) -> Evaluation:
    table = entra(*entra_users)
    if groups:
        table = table.with_group_names(groups)
    return run_cloud(
        ad(*users),
        table,
        now=NOW,
        organization=org if org is not None else organization(last_sync=NOW - HOUR),
        device_table=devices(*device_list),
    )


# =============================================================================== steps: done flags
HYBRID_STAGE_BUILDERS: dict[str, Callable[[AdUser], tuple[list, list]]] = {
    "ad_created": lambda u: ([], []),
    "entra_synced": lambda u: ([entra_for(u)], []),
    "cm_discovered": lambda u: ([entra_for(u)], [cm_for(u)]),
    "in_intune_collection": lambda u: ([entra_for(u)], [cm_for(u, in_collection=True)]),
    "connector_synced": lambda u: (
        [entra_for(u)],
        [cm_for(u, in_collection=True, cloud_user_id=str(uuid.uuid4()))],
    ),
    "intune_enabled": lambda u: (
        [entra_for(u)],
        [cm_for(u, in_collection=True, cloud_user_id=entra_for(u).id)],
    ),
}


@pytest.mark.parametrize("stage", HYBRID_MDM.stages)
def test_hybrid_steps_are_done_up_to_and_including_the_users_stage(stage):
    u = ad_user("stepper")
    entra_users, records = HYBRID_STAGE_BUILDERS[stage](u)
    result = explained(hybrid([u], entra_users, records), "stepper")
    assert result.stage == stage
    index = HYBRID_MDM.stages.index(stage)
    assert [s.stage for s in result.steps] == list(HYBRID_MDM.stages)
    assert [s.done for s in result.steps] == [i <= index for i in range(len(HYBRID_MDM.stages))]
    assert all(s.evidence for s in result.steps)


def test_a_later_condition_that_holds_on_its_own_is_not_done():
    """No synced Entra user, but a ConfigMgr record in the collection with a CloudUserID: the chain
    stops at ad_created, so steps 2-6 are not done, while their evidence still shows what was found."""
    u = ad_user("orphaned", rid=2001)
    cloud_id = str(uuid.uuid4())
    record = cm_for(u, in_collection=True, cloud_user_id=cloud_id, resource_id=16777217)
    result = explained(hybrid([u], [], [record]), "orphaned")
    assert result.stage == "ad_created"
    assert [s.done for s in result.steps] == [True, False, False, False, False, False]
    evidence = [s.evidence for s in result.steps]
    assert "ConfigMgr record CONTOSO\\orphaned (ResourceID 16777217, SID …-2001)" in evidence[2]
    assert "matched by SID0 " + u.object_sid in evidence[2]
    assert "member of PS100012" in evidence[3]
    assert f"CloudUserID {cloud_id}" in evidence[4]
    assert "no synced Entra user matched" in evidence[5]


def test_cloud_steps_and_a_compliant_device_without_licence():
    u = ad_user("nolicence")
    user = entra_for(u)
    device = device_for(user, last_sync=NOW - HOUR, name="LAPTOP-7")
    result = explained(cloud([u], [user], [device]), "nolicence")
    assert result.stage == "entra_synced"
    assert [s.stage for s in result.steps] == list(CLOUD.stages)
    assert [s.done for s in result.steps] == [True, True, False, False, False]
    assert "LAPTOP-7 (Windows, compliant, mdm" in result.steps[3].evidence
    assert result.steps[4].evidence == "a device is compliant and synced within 30d"


@pytest.mark.parametrize("stage", CLOUD.stages)
def test_cloud_steps_are_done_up_to_and_including_the_users_stage(stage):
    u = ad_user("cstep")
    user = licensed(entra_for(u), states=[active()])
    cases = {
        "ad_created": ([], []),
        "entra_synced": ([entra_for(u)], []),
        "intune_licensed": ([user], []),
        "device_enrolled": ([user], [device_for(user, compliance="unknown", last_sync=NOW - HOUR)]),
        "device_compliant": ([user], [device_for(user, last_sync=NOW - HOUR)]),
    }
    entra_users, device_list = cases[stage]
    result = explained(cloud([u], entra_users, device_list), "cstep")
    assert result.stage == stage
    index = CLOUD.stages.index(stage)
    assert [s.done for s in result.steps] == [i <= index for i in range(len(CLOUD.stages))]


# =============================================================================== evidence texts
def test_hybrid_evidence_names_records_and_keys():
    u = ad_user("evi", rid=3001, when_created=NOW - 5 * HOUR)
    synced = entra_for(u, created=NOW - 4 * HOUR)
    record = cm_for(u, in_collection=True, cloud_user_id=synced.id.upper(), resource_id=42)
    result = explained(hybrid([u], [synced], [record]), "evi")
    evidence = [s.evidence for s in result.steps]
    assert evidence[0] == (
        f"AD account CONTOSO\\evi (UPN evi@contoso.com, objectSid {u.object_sid}, "
        f"created {iso(NOW - 5 * HOUR)})"
    )
    assert evidence[1] == (
        f"synced Entra user evi@contoso.com (id {synced.id}) matched by onPremisesImmutableId "
        f"{immutable_id(u.source_anchor)}, created {iso(NOW - 4 * HOUR)}"
    )
    assert evidence[2].startswith("ConfigMgr record CONTOSO\\evi (ResourceID 42, SID …-3001) matched by SID0")
    assert evidence[3] == "member of PS100012"
    assert evidence[4] == f"CloudUserID {synced.id}"
    assert evidence[5] == f"CloudUserID equals the Entra user's id {synced.id}"


@pytest.mark.parametrize(
    ("by", "named"),
    [
        ("guid", lambda u: "Object_GUID0 {" + str(uuid.UUID(bytes_le=u.object_guid)) + "}"),
        ("name", lambda u: "Unique_User_Name0 CONTOSO\\keyed"),
    ],
)
def test_evidence_names_the_configmgr_key_that_matched(by, named):
    u = ad_user("keyed")
    result = explained(hybrid([u], [entra_for(u)], [cm_for(u, by=by)]), "keyed")
    assert f"matched by {named(u)}" in result.steps[2].evidence


def test_evidence_names_the_sid_when_the_entra_match_is_by_sid():
    u = ad_user("bysid")
    result = explained(hybrid([u], [entra_for(u, by="sid")]), "bysid")
    assert f"matched by onPremisesSecurityIdentifier {u.object_sid}" in result.steps[1].evidence


def test_evidence_of_missing_steps_names_what_was_looked_for():
    u = ad_user("nobody")
    result = explained(hybrid([u]), "nobody")
    imm = immutable_id(u.source_anchor)
    assert result.steps[1].evidence == (
        f"no synced Entra user has onPremisesImmutableId {imm} or onPremisesSecurityIdentifier {u.object_sid}"
    )
    guid_text = str(uuid.UUID(bytes_le=u.object_guid))
    assert result.steps[2].evidence == (
        f"no ConfigMgr record has SID0 {u.object_sid}, Object_GUID0 {{{guid_text}}} or "
        "Unique_User_Name0 CONTOSO\\nobody"
    )


def test_cloud_evidence_names_licences_and_devices():
    u = ad_user("ced")
    user = licensed(
        entra_for(u),
        states=[active(EMS_SKU, last_updated=NOW - 2 * DAY), active(E3_SKU, assigned_by_group=GROUP)],
    )
    device_list = [
        device_for(user, compliance="noncompliant", last_sync=NOW - HOUR, name="PC-1"),
        device_for(user, compliance="compliant", last_sync=None, name="PHONE-2", operating_system="iOS"),
    ]
    result = explained(cloud([u], [user], device_list, groups={GROUP: "Office users"}), "ced")
    assert result.steps[2].evidence == (
        "Intune-granting licence (EMS Active directly; ENTERPRISEPACK Active via group Office users), "
        f"since {iso(NOW - 2 * DAY)}"
    )
    assert result.steps[3].evidence.startswith("2 managed device(s): ")
    assert f"PC-1 (Windows, noncompliant, mdm, last sync {iso(NOW - HOUR)})" in result.steps[3].evidence
    assert "PHONE-2 (iOS, compliant, mdm, last sync never)" in result.steps[3].evidence
    assert result.steps[4].evidence == "no device is compliant with a sync within 30d"


def test_cloud_evidence_of_assigned_licences_without_states():
    u = ad_user("cea")
    user = licensed(entra_for(u), assigned=[AssignedLicense(INTUNE_SKU)])
    result = explained(cloud([u], [user]), "cea")
    assert result.steps[2].evidence == "Intune-granting licence (assigned INTUNE_A)"
    assert result.steps[3].evidence == "no Intune managed device has this user as userId"


# =============================================================================== details per reason
def _hybrid_cases():
    """(reason, estate builder, substrings the detail must contain) for every hybrid reason."""
    u = ad_user("dx", rid=1001, when_created=NOW - 3 * HOUR)
    synced = entra_for(u, object_id="11111111-1111-4111-8111-111111111111")
    member = cm_for(u, in_collection=True, resource_id=500)
    other = entra_for(ad_user("dx-other"), object_id="8f1e2d3c-0000-4000-8000-000000000001")
    old = ad_user("old", rid=4411)
    blocker = cloud_only(upn="dx@contoso.com", object_id="22222222-2222-4222-8222-222222222222")
    imm_blocker = cloud_only(upn="x@contoso.com", immutable_id=immutable_id(u.source_anchor))
    sid_blocker = cloud_only(upn="y@contoso.com", sid=u.object_sid)
    unknown = "99999999-9999-4999-8999-999999999999"
    return [
        (
            "entra_cloud_user_conflict",
            dict(entra_users=[blocker]),
            [
                "cloud-only Entra user dx@contoso.com (id 22222222-2222-4222-8222-222222222222)",
                "UPN dx@contoso.com",
            ],
        ),
        (
            "entra_cloud_user_conflict",
            dict(entra_users=[imm_blocker]),
            ["x@contoso.com", f"immutable id {immutable_id(u.source_anchor)}"],
        ),
        (
            "entra_cloud_user_conflict",
            dict(entra_users=[sid_blocker]),
            ["y@contoso.com", f"SID {u.object_sid}"],
        ),
        (
            "entra_sync_pending",
            dict(org=organization(last_sync=NOW - 4 * HOUR)),
            [f"last synced {iso(NOW - 4 * HOUR)}", f"created {iso(NOW - 3 * HOUR)}"],
        ),
        (
            "entra_not_synced",
            dict(),
            [immutable_id(u.source_anchor), u.object_sid, "dx@contoso.com"],
        ),
        (
            "configmgr_stale_record",
            dict(entra_users=[synced], records=[cm_for(old, upn="DX@contoso.com", resource_id=16777300)]),
            ["ConfigMgr record CONTOSO\\old (ResourceID 16777300, SID …-4411) has this UPN but another SID"],
        ),
        (
            "configmgr_discovery_unhealthy",
            dict(entra_users=[synced], components=[CmComponent("PS1", "CM02", AD_USER_DISCOVERY, 2)]),
            ["SMS_AD_USER_DISCOVERY_AGENT is critical on CM02 (site PS1)"],
        ),
        ("configmgr_not_discovered", dict(entra_users=[synced]), [u.object_sid, "CONTOSO\\dx"]),
        (
            "intune_collection_removed",
            dict(entra_users=[synced], records=[cm_for(u, cloud_user_id=synced.id, resource_id=501)]),
            ["ConfigMgr record CONTOSO\\dx (ResourceID 501", f"CloudUserID {synced.id}", "PS100012"],
        ),
        (
            "not_in_intune_collection",
            dict(entra_users=[synced], records=[cm_for(u, resource_id=502)]),
            ["ConfigMgr record CONTOSO\\dx (ResourceID 502", "not a member of PS100012"],
        ),
        (
            "upn_mismatch",
            dict(entra_users=[entra_for(u, upn="dx@contoso.onmicrosoft.com")], records=[member]),
            ["Entra UPN dx@contoso.onmicrosoft.com ≠ AD UPN dx@contoso.com"],
        ),
        (
            "entra_account_disabled",
            dict(entra_users=[dataclasses.replace(synced, account_enabled=False)], records=[member]),
            [f"(id {synced.id}) has accountEnabled false"],
        ),
        (
            "connector_unhealthy",
            dict(
                entra_users=[synced],
                records=[member],
                components=[CmComponent("PS1", "CM01", CLOUD_USER_SYNC, 2)],
            ),
            ["SMS_CLOUD_USERSYNC is critical on CM01 (site PS1)"],
        ),
        (
            "connector_sync_pending",
            dict(entra_users=[synced], records=[member]),
            ["ConfigMgr record CONTOSO\\dx (ResourceID 500", "in PS100012", "no CloudUserID"],
        ),
        (
            "cloud_user_id_other_user",
            dict(
                entra_users=[synced, other],
                records=[cm_for(u, in_collection=True, cloud_user_id=other.id.upper())],
            ),
            [
                "CloudUserID 8f1e2d3c… belongs to Entra user dx-other@contoso.com "
                "(id 8f1e2d3c-0000-4000-8000-000000000001)",
                f"not dx@contoso.com (id {synced.id})",
            ],
        ),
        (
            "cloud_user_id_unknown",
            dict(entra_users=[synced], records=[cm_for(u, in_collection=True, cloud_user_id=unknown)]),
            ["CloudUserID 99999999… is no Entra user's id", synced.id],
        ),
    ]


@pytest.mark.parametrize(
    ("reason", "estate", "expected"), _hybrid_cases(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_hybrid_detail_names_the_evidence(reason, estate, expected):
    u = ad_user("dx", rid=1001, when_created=NOW - 3 * HOUR)
    result = explained(hybrid([u], **estate), "dx")
    assert result.reason == reason
    for text in expected:
        assert text in result.detail
    assert result.action == HYBRID_MDM.reason(reason).action


def test_hybrid_details_cover_every_reason():
    assert {case[0] for case in _hybrid_cases()} == {r.name for r in HYBRID_MDM.reasons}


def test_not_synced_detail_names_a_synced_user_bound_to_another_account():
    """A recreated AD account: the old synced Entra object keeps the UPN but belongs to the old anchor."""
    u = ad_user("again")
    old_object = entra_for(ad_user("again-old"), upn=u.user_principal_name)
    result = explained(hybrid([u], [old_object]), "again")
    assert result.reason == "entra_not_synced"
    assert f"synced Entra user again@contoso.com (id {old_object.id}) has this UPN" in result.detail
    assert old_object.on_premises_immutable_id in result.detail
    assert not result.detail.startswith("no Entra user")


def _cloud_cases():
    u = ad_user("cx", rid=1002, when_created=NOW - HOUR)
    base = entra_for(u, object_id="33333333-3333-4333-8333-333333333333")

    def with_states(*states, usage_location="DE", **kw):
        return licensed(dataclasses.replace(base, **kw), states=states, usage_location=usage_location)

    error = dict(state="Error")
    ok = with_states(active())
    return [
        (
            "license_count_violation",
            dict(entra_users=[with_states(active(error="CountViolation", assigned_by_group=GROUP, **error))]),
            [
                "INTUNE_A assignment failed with CountViolation (assigned by group Intune users)",
                "1 of 10 units",
            ],
        ),
        (
            "license_usage_location_missing",
            dict(entra_users=[with_states(active(EMS_SKU, **error), usage_location=None)]),
            ["usageLocation is not set", "EMS Error"],
        ),
        (
            "license_conflict",
            dict(entra_users=[with_states(active(error="MutuallyExclusiveViolation", **error))]),
            ["INTUNE_A assignment failed with MutuallyExclusiveViolation (assigned directly)"],
        ),
        (
            "license_error_other",
            dict(entra_users=[with_states(active(error="UniquenessViolation", **error))]),
            ["INTUNE_A assignment failed with UniquenessViolation"],
        ),
        (
            "intune_plan_disabled",
            dict(entra_users=[with_states(active(EMS_SKU, disabled_plans=(INTUNE_A.id,)))]),
            ["disabled", "EMS Active directly"],
        ),
        (
            "no_intune_license",
            dict(entra_users=[with_states(active(E3_SKU))]),
            ["ENTERPRISEPACK Active directly"],
        ),
        (
            "entra_cloud_user_conflict",
            dict(entra_users=[cloud_only(upn="cx@contoso.com")]),
            ["UPN cx@contoso.com"],
        ),
        ("entra_sync_pending", dict(org=organization(last_sync=0.0)), ["last synced 1970-01-01T00:00:00Z"]),
        ("entra_not_synced", dict(), [u.object_sid]),
        (
            "entra_account_disabled",
            dict(entra_users=[with_states(active(), account_enabled=False)]),
            ["cx@contoso.com (id 33333333-3333-4333-8333-333333333333) has accountEnabled false"],
        ),
        (
            "device_enrollment_pending",
            dict(entra_users=[ok]),
            ["no Intune managed device has userId 33333333-3333-4333-8333-333333333333", "licensed since"],
        ),
        (
            "device_stale",
            dict(entra_users=[ok], device_list=[device_for(ok, last_sync=NOW - 40 * DAY, name="OLD-PC")]),
            ["every device last synced more than 30d ago", "OLD-PC"],
        ),
        (
            "device_noncompliant",
            dict(
                entra_users=[ok],
                device_list=[device_for(ok, compliance="noncompliant", last_sync=NOW, name="PC-9")],
            ),
            ["PC-9 (Windows, noncompliant"],
        ),
        (
            "device_in_grace_period",
            dict(
                entra_users=[ok],
                device_list=[device_for(ok, compliance="inGracePeriod", last_sync=NOW, name="PC-8")],
            ),
            ["grace period", "PC-8 (Windows, inGracePeriod"],
        ),
        (
            "device_compliance_unknown",
            dict(
                entra_users=[ok],
                device_list=[
                    device_for(
                        ok,
                        compliance="configManager",
                        last_sync=NOW,
                        name="PC-7",
                        agent="configurationManagerClientMdm",
                    )
                ],
            ),
            ["no device is compliant", "PC-7 (Windows, configManager, configurationManagerClientMdm"],
        ),
    ]


@pytest.mark.parametrize(
    ("reason", "estate", "expected"), _cloud_cases(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_cloud_detail_names_the_evidence(reason, estate, expected):
    u = ad_user("cx", rid=1002, when_created=NOW - HOUR)
    result = explained(cloud([u], groups={GROUP: "Intune users"}, **estate), "cx")
    assert result.reason == reason
    for text in expected:
        assert text in result.detail
    assert result.action == CLOUD.reason(reason).action


def test_cloud_details_cover_every_reason():
    assert {case[0] for case in _cloud_cases()} == {r.name for r in CLOUD.reasons}


def test_no_licence_detail_says_when_skus_were_never_read():
    u = ad_user("nosku")
    user = licensed(entra_for(u), states=[active()])
    evaluation = run_cloud(ad(u), entra(user), now=NOW, organization=None, device_table=devices())
    result = explained(evaluation, "nosku")
    assert result.reason == "no_intune_license"
    assert "subscribedSkus were never read" in result.detail


# =============================================================================== the trace document
def test_trace_document_has_the_contract_fields():
    u = ad_user("doc", when_created=NOW - 3 * HOUR)
    result = explained(hybrid([u]), "doc")
    document = json.loads(json.dumps(result.document()))
    assert document["estate"] == "contoso"
    assert document["user"] == {
        "sam": "doc",
        "upn": "doc@contoso.com",
        "object_guid": str(uuid.UUID(bytes_le=u.object_guid)),
        "object_sid": u.object_sid,
    }
    assert (document["stage"], document["reason"], document["stuck"]) == (
        "ad_created",
        "entra_not_synced",
        True,
    )
    assert document["entered_stage_at"] == iso(NOW - 3 * HOUR)
    assert [set(step) for step in document["steps"]] == [{"stage", "done", "evidence"}] * 6
    assert document["detail"] == result.detail
    assert document["action"] == HYBRID_MDM.reason("entra_not_synced").action


def test_enabled_user_has_no_reason_and_is_not_stuck():
    u = ad_user("done", when_created=0.0)
    synced = entra_for(u, created=0.0)
    record = cm_for(u, in_collection=True, cloud_user_id=synced.id, creation_date=0.0)
    document = explained(hybrid([u], [synced], [record]), "done").document()
    assert (document["stage"], document["reason"], document["stuck"], document["action"]) == (
        "intune_enabled",
        None,
        False,
        None,
    )
    assert all(step["done"] for step in document["steps"])


def test_not_yet_stuck_user():
    u = ad_user("fresh", when_created=NOW - HOUR)
    document = explained(hybrid([u]), "fresh").document()
    assert document["stuck"] is False
    assert document["reason"] == "entra_not_synced"  # a reason is given whether stuck or not


# =============================================================================== finding users
@pytest.fixture(scope="module")
def estate() -> Evaluation:
    alice = ad_user("Alice", upn="Alice.Smith@Contoso.com")
    bob = ad_user("bob", upn="bob@contoso.com")
    carol = ad_user("carol", upn=None)
    synced = entra_for(alice, object_id="abcdef01-2345-4678-89ab-cdef01234567")
    return hybrid([alice, bob, carol], [synced, cloud_only(upn="stray@contoso.com")])


def _sam(evaluation: Evaluation, query: str) -> list[str]:
    return [evaluation.ad.text("sam", r) for r in find_rows(evaluation, query)]


@pytest.mark.parametrize(
    "query",
    [
        "Alice.Smith@Contoso.com",
        "alice.smith@contoso.com",
        "ALICE.SMITH@CONTOSO.COM",
        "  alice.smith@contoso.com ",
        "Alice",
        "alice",
        "CONTOSO\\Alice",
        "contoso\\ALICE",
        "abcdef01-2345-4678-89ab-cdef01234567",  # the Entra object id
        "ABCDEF01-2345-4678-89AB-CDEF01234567",
        "{abcdef01-2345-4678-89ab-cdef01234567}",
    ],
)
def test_find_rows_by_upn_sam_domain_name_and_entra_id(estate, query):
    assert _sam(estate, query) == ["Alice"]


@pytest.mark.parametrize(
    "form",
    [str, lambda t: t.upper(), lambda t: "{" + t + "}", lambda t: "{" + t.upper() + "}"],
    ids=["plain", "upper", "braces", "braces-upper"],
)
def test_find_rows_by_object_guid_text(estate, form):
    bob = ad_user("bob")
    text = str(uuid.UUID(bytes_le=bob.object_guid))  # how AD and ldap3 show objectGUID
    assert _sam(estate, form(text)) == ["bob"]


def test_find_rows_reads_the_guid_as_ad_shows_it_not_in_rfc_byte_order(estate):
    bob = ad_user("bob")
    rfc_reading = str(uuid.UUID(bytes=bob.object_guid))
    assert _sam(estate, rfc_reading) == []


@pytest.mark.parametrize(
    "query",
    [
        "",
        "   ",
        "nobody",
        "FABRIKAM\\alice",
        "stray@contoso.com",  # a cloud-only Entra user: not an in-scope AD user
        str(uuid.uuid4()),
        "alice.smith",
        "carol@contoso.com",
    ],
)
def test_find_rows_finds_nothing_for_other_names(estate, query):
    assert _sam(estate, query) == []


def test_find_rows_by_the_entra_id_of_an_unmatched_user_finds_nothing(estate):
    stray = estate.data.entra
    assert stray is not None
    ids = [stray.id_text(r) for r in range(stray.n) if not stray.array("synced")[r]]
    assert ids and _sam(estate, ids[0]) == []


def test_find_rows_returns_every_user_sharing_a_upn():
    a = ad_user("twin1", upn="shared@contoso.com")
    b = ad_user("twin2", upn="SHARED@contoso.com")
    evaluation = hybrid([a, b])
    assert sorted(_sam(evaluation, "shared@contoso.com")) == ["twin1", "twin2"]


def test_find_rows_by_sam_does_not_match_a_upn_prefix():
    a = ad_user("dora", upn="dora.x@contoso.com")
    b = ad_user("dora.x", upn="other@contoso.com")
    evaluation = hybrid([a, b])
    assert _sam(evaluation, "dora") == ["dora"]
    assert _sam(evaluation, "dora.x") == ["dora.x"]
    assert _sam(evaluation, "dora.x@contoso.com") == ["dora"]
