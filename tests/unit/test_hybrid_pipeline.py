"""The ``hybrid_mdm`` chain against CONTRACT.md: "Provisioning stages" and "Why a user is stuck".

Expected values come from the contract's words, not from the code. Where the contract leaves a
choice open, the test's docstring says which reading it checks. The last part compares the
vectorised evaluation with a plain per-user reading of the contract (:func:`contract_hybrid`) on
many small random estates.
"""

from __future__ import annotations

import base64
import dataclasses
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pytest

from collectors.configmgr import ConfigMgrCollector
from collectors.entra import provisioning_errors
from exporter.ids import guid_bytes, guid_text, immutable_id
from exporter.labels import UserLabeler
from exporter.model import (
    AdUser,
    AssignedLicense,
    CmComponent,
    CmUser,
    EntraUser,
    OrganizationData,
)
from exporter.pipelines.definitions import HYBRID_MDM
from exporter.pipelines.evaluation import EstateData, Evaluation, FirstSeen, PipelineSettings
from exporter.pipelines.hybrid import AD_USER_DISCOVERY, CLOUD_USER_SYNC
from exporter.snapshot import EstateSnapshot, Snapshot
from tests.builders import (
    COLLECTION,
    E3_SKU,
    EMS_SKU,
    NETBIOS,
    ad,
    ad_user,
    cloud_only,
    cm,
    cm_for,
    entra,
    entra_for,
    organization,
    placed,
    row_of,
    run_hybrid,
)

NOW = 1_000_000.0
HOUR = 3600.0
STAGES = HYBRID_MDM.stages
SITE = "PS1"


def hybrid(
    users: Sequence[AdUser],
    entra_users: Sequence[EntraUser] = (),
    cm_users: Sequence[CmUser] = (),
    *,
    components: Sequence[CmComponent] = (),
    org: OrganizationData | None = None,
    now: float = NOW,
    first_seen: FirstSeen | None = None,
) -> Evaluation:
    return run_hybrid(
        ad(*users),
        entra(*entra_users),
        cm(*cm_users, components=components),
        now=now,
        organization=org,
        first_seen=first_seen,
    )


def stage_of(user: AdUser, entra_users: Sequence[EntraUser] = (), cm_users: Sequence[CmUser] = ()) -> str:
    evaluation = hybrid([user], entra_users, cm_users)
    return placed(evaluation, user.sam_account_name)[0]


def component(name: str, status: int, machine: str = "CM01") -> CmComponent:
    return CmComponent(SITE, machine, name, status)


def enabled_chain(user: AdUser) -> tuple[EntraUser, CmUser]:
    synced = entra_for(user)
    return synced, cm_for(user, in_collection=True, cloud_user_id=synced.id)


# =============================================================================== stage conditions
def test_only_in_ad_is_ad_created():
    assert stage_of(ad_user("alice")) == "ad_created"


def test_synced_entra_user_matched_by_immutable_id_is_entra_synced():
    u = ad_user("bob")
    synced = dataclasses.replace(entra_for(u), on_premises_security_identifier=None)
    assert stage_of(u, [synced]) == "entra_synced"


def test_entra_match_falls_back_to_sid_when_no_user_has_the_immutable_id():
    u = ad_user("carol")
    assert stage_of(u, [entra_for(u, by="sid")]) == "entra_synced"
    # The immutable id is someone else's (a changed source anchor): the SID still matches.
    other_anchor = dataclasses.replace(entra_for(u), on_premises_immutable_id=immutable_id(b"x" * 16))
    assert stage_of(u, [other_anchor]) == "entra_synced"


def test_sid_comparison_is_not_case_sensitive():
    u = ad_user("cleo")
    lower = dataclasses.replace(entra_for(u, by="sid"), on_premises_security_identifier=u.object_sid.lower())
    assert stage_of(u, [lower]) == "entra_synced"


def test_immutable_id_match_wins_over_sid_match():
    """Two synced Entra users: A holds the immutable id, B the objectSid. The user matches A, which
    the next stages show: a CloudUserID of A enables the user, one of B is another user's id."""
    u = ad_user("cyd")
    by_imm = dataclasses.replace(
        entra_for(u, object_id="00000000-0000-4000-8000-00000000000a"), on_premises_security_identifier=None
    )
    by_sid = entra_for(u, by="sid", object_id="00000000-0000-4000-8000-000000000001")
    to_a = cm_for(u, in_collection=True, cloud_user_id=by_imm.id)
    assert placed(hybrid([u], [by_sid, by_imm], [to_a]), "cyd") == ("intune_enabled", None)
    to_b = cm_for(u, in_collection=True, cloud_user_id=by_sid.id)
    assert placed(hybrid([u], [by_sid, by_imm], [to_b]), "cyd") == (
        "connector_synced",
        "cloud_user_id_other_user",
    )


@pytest.mark.parametrize("sync_enabled", [False, None])
def test_entra_match_ignores_users_without_sync_enabled(sync_enabled):
    u = ad_user("dave")
    not_synced = dataclasses.replace(entra_for(u), on_premises_sync_enabled=sync_enabled)
    assert stage_of(u, [not_synced]) == "ad_created"


def test_immutable_id_uses_the_configured_source_anchor():
    consistency_guid = uuid.uuid4().bytes_le
    u = ad_user("erin", anchor=consistency_guid)
    synced = dataclasses.replace(entra_for(u), on_premises_security_identifier=None)
    assert synced.on_premises_immutable_id == base64.b64encode(consistency_guid).decode()
    assert stage_of(u, [synced]) == "entra_synced"
    # An immutable id built from objectGUID does not match a user anchored on mS-DS-ConsistencyGuid.
    wrong = dataclasses.replace(entra_for(ad_user("erin")), on_premises_security_identifier=None)
    assert stage_of(u, [wrong]) == "ad_created"


def test_immutable_id_is_compared_exactly():
    u = ad_user("frank")
    synced = entra_for(u)
    swapped = dataclasses.replace(
        synced,
        on_premises_immutable_id=synced.on_premises_immutable_id.swapcase(),
        on_premises_security_identifier=None,
    )
    assert stage_of(u, [swapped]) == "ad_created"


def test_two_synced_entra_users_with_one_immutable_id_lowest_object_id_wins():
    """The contract does not say which of two synced Entra users with the same immutable id matches.
    Reading: the one with the lowest object id (deterministic whatever order Graph returns them in);
    the other one counts as an orphan."""
    u = ad_user("gale")
    low = entra_for(u, object_id="10000000-0000-4000-8000-000000000000")
    high = entra_for(u, object_id="f0000000-0000-4000-8000-000000000000")
    for order in ([low, high], [high, low]):
        record = cm_for(u, in_collection=True, cloud_user_id=low.id)
        evaluation = hybrid([u], order, [record])
        assert placed(evaluation, "gale") == ("intune_enabled", None)
        assert evaluation.side["orphans"]["entra"] == 1


@pytest.mark.parametrize("by", ["sid", "guid", "name"])
def test_configmgr_match_by_each_key(by):
    u = ad_user("gina")
    assert stage_of(u, [entra_for(u)], [cm_for(u, by=by)]) == "cm_discovered"


def test_configmgr_sid_only_record_matches():
    u = ad_user("gus")
    record = dataclasses.replace(cm_for(u), object_guid=None, unique_user_name=None)
    assert stage_of(u, [entra_for(u)], [record]) == "cm_discovered"


def test_configmgr_name_match_is_case_insensitive_and_needs_the_domain():
    u = ad_user("Hank")
    record = cm_for(u, by="name")
    upper = dataclasses.replace(record, unique_user_name="contoso\\HANK")
    assert stage_of(u, [entra_for(u)], [upper]) == "cm_discovered"
    other_domain = dataclasses.replace(record, unique_user_name="FABRIKAM\\hank")
    assert stage_of(u, [entra_for(u)], [other_domain]) == "entra_synced"
    bare = dataclasses.replace(record, unique_user_name="hank")
    assert stage_of(u, [entra_for(u)], [bare]) == "entra_synced"


def test_configmgr_record_with_another_sid_does_not_match_by_sid():
    u = ad_user("hugo")
    foreign = dataclasses.replace(cm_for(u, by="sid"), sid="S-1-5-21-9-9-9-4411", object_guid=None)
    foreign = dataclasses.replace(foreign, unique_user_name="CONTOSO\\someone-else")
    assert stage_of(u, [entra_for(u)], [foreign]) == "entra_synced"


def test_configmgr_sid_is_preferred_over_guid_and_name():
    """The join keys in the contract's order: SID0, else Object_GUID0, else Unique_User_Name0. The
    record found by SID speaks for the user even when a record found by another key got further."""
    u = ad_user("ivy")
    by_sid = dataclasses.replace(cm_for(u, by="sid", in_collection=False), unique_user_name=None)
    by_sid = dataclasses.replace(by_sid, object_guid=None)
    by_guid = dataclasses.replace(cm_for(u, by="guid", in_collection=True), unique_user_name=None)
    by_name = cm_for(u, by="name", in_collection=True)
    assert stage_of(u, [entra_for(u)], [by_name, by_guid, by_sid]) == "cm_discovered"
    sid_in = dataclasses.replace(by_sid, collections=(COLLECTION,))
    guid_out = dataclasses.replace(by_guid, collections=())
    assert stage_of(u, [entra_for(u)], [by_name, guid_out, sid_in]) == "in_intune_collection"


def test_configmgr_guid_is_preferred_over_name():
    u = ad_user("ivo")
    by_guid = dataclasses.replace(cm_for(u, by="guid", in_collection=False), unique_user_name=None)
    by_name = cm_for(u, by="name", in_collection=True)
    assert stage_of(u, [entra_for(u)], [by_name, by_guid]) == "cm_discovered"


@pytest.mark.parametrize(
    "text_form",
    [
        lambda g: "{" + str(uuid.UUID(bytes_le=g)).upper() + "}",  # how the ConfigMgr database shows it
        lambda g: str(uuid.UUID(bytes_le=g)),
        lambda g: g.hex(),  # 32 hex digits of the raw bytes
        lambda g: "0x" + g.hex().upper(),
    ],
)
def test_configmgr_guid_in_any_text_form_matches(text_form):
    u = ad_user("jack")
    record = dataclasses.replace(cm_for(u, by="guid"), object_guid=guid_bytes(text_form(u.object_guid)))
    record = dataclasses.replace(record, unique_user_name=None)
    assert stage_of(u, [entra_for(u)], [record]) == "cm_discovered"


def test_guid_text_in_rfc_order_is_not_the_ad_guid():
    """objectGUID text is the little-endian struct: reading its bytes in RFC order gives another GUID."""
    u = ad_user("jade")
    rfc = uuid.UUID(str(uuid.UUID(bytes_le=u.object_guid))).bytes
    assert rfc != u.object_guid
    record = dataclasses.replace(cm_for(u, by="guid"), object_guid=rfc, unique_user_name=None)
    assert stage_of(u, [entra_for(u)], [record]) == "entra_synced"


def test_in_collection_without_cloud_user_id_is_in_intune_collection():
    u = ad_user("kim")
    assert stage_of(u, [entra_for(u)], [cm_for(u, in_collection=True)]) == "in_intune_collection"


def test_cloud_user_id_not_matching_is_connector_synced():
    u = ad_user("liam")
    record = cm_for(u, in_collection=True, cloud_user_id=str(uuid.uuid4()))
    assert stage_of(u, [entra_for(u)], [record]) == "connector_synced"


@pytest.mark.parametrize("form", [str.upper, str.lower, lambda s: "{" + s.upper() + "}"])
def test_cloud_user_id_equal_ignoring_case_is_intune_enabled(form):
    u = ad_user("mia")
    synced = entra_for(u)
    record = cm_for(u, in_collection=True, cloud_user_id=form(synced.id))
    assert stage_of(u, [synced], [record]) == "intune_enabled"
    assert guid_text(form(synced.id)) == synced.id


# =============================================================================== skipped steps
def test_in_collection_but_not_in_entra_is_ad_created():
    u = ad_user("noah")
    record = cm_for(u, in_collection=True, cloud_user_id=str(uuid.uuid4()))
    assert stage_of(u, [], [record]) == "ad_created"


def test_cloud_user_id_of_the_cloud_only_twin_does_not_make_a_user_enabled():
    u = ad_user("nina")
    twin = cloud_only(upn=u.user_principal_name)
    record = cm_for(u, in_collection=True, cloud_user_id=twin.id)
    assert placed(hybrid([u], [twin], [record]), "nina") == ("ad_created", "entra_cloud_user_conflict")


def test_cloud_user_id_set_but_not_in_collection_is_cm_discovered():
    u = ad_user("olga")
    synced = entra_for(u)
    record = cm_for(u, in_collection=False, cloud_user_id=synced.id)
    assert stage_of(u, [synced], [record]) == "cm_discovered"


# =============================================================================== duplicates in ConfigMgr
def test_several_records_with_one_sid_the_furthest_speaks_for_the_user():
    """Several ConfigMgr records with the user's SID (re-discovery leaves some behind). The contract
    does not say which one matches. Reading: the record that got furthest through the chain (in an
    Intune collection first, then with a CloudUserID), then the lowest ResourceID."""
    u = ad_user("pat")
    synced = entra_for(u)
    bare = cm_for(u, resource_id=1)
    with_cloud = cm_for(u, resource_id=2, cloud_user_id=synced.id)
    member = cm_for(u, resource_id=3, in_collection=True)
    member_enabled = cm_for(u, resource_id=4, in_collection=True, cloud_user_id=synced.id)
    assert stage_of(u, [synced], [bare, with_cloud]) == "cm_discovered"
    assert placed(hybrid([u], [synced], [bare, with_cloud]), "pat")[1] == "intune_collection_removed"
    assert stage_of(u, [synced], [with_cloud, member, bare]) == "in_intune_collection"
    assert stage_of(u, [synced], [member, member_enabled, bare, with_cloud]) == "intune_enabled"
    # Equal progress: the lowest ResourceID wins, whatever the order of the rows.
    low = cm_for(u, resource_id=10, in_collection=True, cloud_user_id=synced.id)
    high = cm_for(u, resource_id=20, in_collection=True, cloud_user_id=str(uuid.uuid4()))
    assert stage_of(u, [synced], [high, low]) == "intune_enabled"
    assert stage_of(u, [synced], [dataclasses.replace(low, resource_id=30), high]) == "connector_synced"


def test_duplicate_configmgr_records_one_is_the_match_the_other_an_orphan():
    u = ad_user("sam")
    synced = entra_for(u)
    stale = cm_for(u, resource_id=1)
    current = cm_for(u, resource_id=2, in_collection=True, cloud_user_id=synced.id)
    evaluation = hybrid([u], [synced], [stale, current])
    assert evaluation.summary(NOW).users["intune_enabled"] == 1
    assert evaluation.side["orphans"]["configmgr"] == 1


# =============================================================================== scope and side counts
def test_only_users_in_the_ad_data_are_counted_others_are_orphans():
    inside, outside = ad_user("pia"), ad_user("quinn")  # quinn: disabled or outside search_bases
    synced_in, synced_out = entra_for(inside), entra_for(outside)
    records = [cm_for(inside, in_collection=True, cloud_user_id=synced_in.id), cm_for(outside)]
    evaluation = hybrid([inside], [synced_in, synced_out], records)
    summary = evaluation.summary(NOW)
    assert sum(summary.users.values()) == 1
    assert summary.users["intune_enabled"] == 1
    assert evaluation.side["orphans"] == {"entra": 1, "configmgr": 1}


def test_cloud_only_entra_users_are_not_orphans():
    u = ad_user("rita")
    stray = cloud_only(upn="cloudy@contoso.com")
    null_sync = cloud_only(upn="nulls@contoso.com", sync_enabled=None)
    evaluation = hybrid([u], [entra_for(u), stray, null_sync])
    assert evaluation.side["orphans"]["entra"] == 0


def test_mismatch_counts_cloud_user_id_not_equal_to_entra_id():
    """ "CloudUserID set but not the matched Entra user's id". Reading: only users that HAVE a matched
    Entra user count (without one there is nothing to compare with); membership does not matter."""
    a, b, c, d, e = (ad_user(n) for n in ("tom", "uma", "vic", "wes", "xia"))
    ea, eb, ec, ed = entra_for(a), entra_for(b), entra_for(c), entra_for(d)
    records = [
        cm_for(a, in_collection=True, cloud_user_id=str(uuid.uuid4())),  # mismatch
        cm_for(b, in_collection=True, cloud_user_id=eb.id.upper()),  # fine
        cm_for(c, in_collection=True),  # missing, not a mismatch
        cm_for(d, in_collection=False, cloud_user_id=ea.id),  # mismatch, out of the collection
        cm_for(e, in_collection=True, cloud_user_id=str(uuid.uuid4())),  # no Entra user matched
    ]
    evaluation = hybrid([a, b, c, d, e], [ea, eb, ec, ed], records)
    assert evaluation.side["cloud_user_id_mismatch"] == 2


def test_intune_enabled_users_without_an_intune_plan_are_counted():
    users = [ad_user(n) for n in ("i1", "i2", "i3")]
    licenses = [
        (AssignedLicense(EMS_SKU),),  # licensed
        (AssignedLicense(E3_SKU),),  # no Intune plan
        (AssignedLicense(EMS_SKU, ("c1ec4a95-1f05-45b3-a911-aa3fa01094f5",)),),  # Intune plan disabled
    ]
    synced = [
        dataclasses.replace(entra_for(u), assigned_licenses=lic)
        for u, lic in zip(users, licenses, strict=True)
    ]
    records = [cm_for(u, in_collection=True, cloud_user_id=e.id) for u, e in zip(users, synced, strict=True)]
    evaluation = hybrid(users, synced, records, org=organization())
    assert evaluation.summary(NOW).users["intune_enabled"] == 3
    assert evaluation.side["enabled_without_intune_license"] == 2
    assert hybrid(users, synced, records).side["enabled_without_intune_license"] is None


def test_missing_cloud_user_id_counts_every_record_split_by_collection():
    """Every ConfigMgr record, in scope or not: no AD data is needed for this metric."""
    a, b, c, d = (ad_user(n) for n in ("w1", "w2", "w3", "w4"))
    records = cm(
        cm_for(a, in_collection=True),
        cm_for(b, in_collection=True, cloud_user_id=str(uuid.uuid4())),
        cm_for(c, in_collection=False),
        cm_for(d, in_collection=False),
    )
    settings = PipelineSettings(HYBRID_MDM, HYBRID_MDM.default_stuck_after)
    estate = EstateSnapshot("contoso", settings, {}, EstateData(configmgr=records))
    (missing, _) = ConfigMgrCollector().collect_from(Snapshot((estate,), NOW))
    values = {s.labels["in_intune_collection"]: s.value for s in missing.samples}
    assert values == {"true": 1, "false": 2}


def test_provisioning_errors_are_counted_per_user_and_category():
    a, b, c = ad_user("x1"), ad_user("x2"), ad_user("x3")
    ea = dataclasses.replace(
        entra_for(a), provisioning_error_categories=("PropertyConflict", "PropertyConflict")
    )
    eb = dataclasses.replace(
        entra_for(b), provisioning_error_categories=("PropertyConflict", "UserPrincipalName")
    )
    # Only synced users count ("synced users with onPremisesProvisioningErrors").
    ec = dataclasses.replace(
        entra_for(c, sync_enabled=False), provisioning_error_categories=("PropertyConflict",)
    )
    assert provisioning_errors(entra(ea, eb, ec)) == {"PropertyConflict": 2, "UserPrincipalName": 1}


def test_user_label_modes():
    guid = uuid.uuid4().bytes_le
    assert UserLabeler("upn").label("sam1", "sam1@contoso.com", guid) == "sam1@contoso.com"
    assert UserLabeler("upn").label("sam1", None, guid) == "sam1"
    assert UserLabeler("sam").label("sam1", "sam1@contoso.com", guid) == "sam1"
    hashed = UserLabeler("hash", "key").label("sam1", "sam1@contoso.com", guid)
    assert hashed and len(hashed) == 16 and "sam1" not in hashed
    assert hashed != UserLabeler("hash", "other key").label("sam1", "sam1@contoso.com", guid)
    assert UserLabeler("none").label("sam1", "x", guid) is None


# =============================================================================== time in stage
def test_stuck_uses_when_created_for_ad_created():
    old = ad_user("y1", when_created=NOW - 3 * HOUR)
    new = ad_user("y2", when_created=NOW - 1 * HOUR)
    summary = hybrid([old, new]).summary(NOW)
    assert summary.stuck["ad_created"] == 1
    assert summary.oldest_entry["ad_created"] == NOW - 3 * HOUR
    evaluation = hybrid([old, new])
    assert [evaluation.ad.text("sam", int(r)) for r in evaluation.summary(NOW).stuck_rows] == ["y1"]


def test_null_when_created_falls_back_to_first_seen():
    u = ad_user("y3", when_created=None)
    first = hybrid([u])
    assert first.entered[0] == NOW
    later = hybrid([u], now=NOW + 3 * HOUR, first_seen=first.first_seen)
    assert later.entered[0] == NOW
    assert later.summary(NOW + 3 * HOUR).stuck["ad_created"] == 1


def test_stuck_uses_entra_created_then_first_seen_when_null():
    a, b = ad_user("z1"), ad_user("z2")
    ea = entra_for(a, created=NOW - 2 * HOUR)
    eb = entra_for(b, created=None)
    evaluation = hybrid([a, b], [ea, eb])
    assert evaluation.summary(NOW).stuck["entra_synced"] == 1  # b has no createdDateTime: first seen now
    assert evaluation.entered[row_of(evaluation, "z1")] == NOW - 2 * HOUR
    assert evaluation.entered[row_of(evaluation, "z2")] == NOW
    stage, since = evaluation.first_seen.lookup(evaluation.ad.array("k_guid")[[row_of(evaluation, "z2")]])
    assert STAGES[int(stage[0])] == "entra_synced" and since[0] == NOW


def test_stuck_uses_configmgr_creation_date_for_cm_discovered():
    u, v = ad_user("c1"), ad_user("c2")
    records = [cm_for(u, creation_date=NOW - 5 * HOUR), cm_for(v, creation_date=None)]
    evaluation = hybrid([u, v], [entra_for(u), entra_for(v)], records)
    assert evaluation.summary(NOW).stuck["cm_discovered"] == 1
    assert evaluation.entered[row_of(evaluation, "c2")] == NOW


def test_later_stages_use_first_seen_which_survives_and_resets_on_stage_change():
    u = ad_user("d1")
    synced = entra_for(u)
    in_collection = [cm_for(u, in_collection=True, creation_date=1.0)]
    first = hybrid([u], [synced], in_collection)
    assert first.summary(NOW).stuck["in_intune_collection"] == 0
    second = hybrid([u], [synced], in_collection, now=NOW + 2 * HOUR, first_seen=first.first_seen)
    assert second.summary(NOW + 2 * HOUR).stuck["in_intune_collection"] == 1
    assert second.summary(NOW + 2 * HOUR).oldest_entry["in_intune_collection"] == NOW
    wrong = [cm_for(u, in_collection=True, cloud_user_id=str(uuid.uuid4()))]
    third = hybrid([u], [synced], wrong, now=NOW + 2.5 * HOUR, first_seen=second.first_seen)
    assert third.entered[0] == NOW + 2.5 * HOUR
    assert third.summary(NOW + 2.5 * HOUR).stuck["connector_synced"] == 0


def test_first_seen_of_another_pipeline_is_not_carried_over():
    u = ad_user("d2")
    synced = entra_for(u)
    records = [cm_for(u, in_collection=True)]
    first = hybrid([u], [synced], records)
    foreign = dataclasses.replace(first.first_seen, pipeline="cloud")
    later = hybrid([u], [synced], records, now=NOW + 2 * HOUR, first_seen=foreign)
    assert later.entered[0] == NOW + 2 * HOUR


def test_a_user_who_moves_back_gets_a_fresh_first_seen_time():
    u = ad_user("d3")
    synced = entra_for(u)
    first = hybrid([u], [synced], [cm_for(u, in_collection=True)])
    moved_on = hybrid(
        [u],
        [synced],
        [cm_for(u, in_collection=True, cloud_user_id=str(uuid.uuid4()))],
        now=NOW + HOUR,
        first_seen=first.first_seen,
    )
    back = hybrid(
        [u], [synced], [cm_for(u, in_collection=True)], now=NOW + 2 * HOUR, first_seen=moved_on.first_seen
    )
    assert back.entered[0] == NOW + 2 * HOUR


def test_intune_enabled_users_are_never_stuck_and_empty_stages_are_present():
    u = ad_user("e1", when_created=NOW - 100 * HOUR)
    synced = entra_for(u, created=NOW - 100 * HOUR)
    record = cm_for(u, in_collection=True, cloud_user_id=synced.id, creation_date=NOW - 100 * HOUR)
    summary = hybrid([u], [synced], [record], now=NOW + 100 * HOUR).summary(NOW + 100 * HOUR)
    assert set(summary.users) == set(STAGES) == set(summary.stuck) == set(summary.oldest_entry)
    assert sum(summary.stuck.values()) == 0
    assert summary.oldest_entry["ad_created"] is None
    assert set(summary.stuck_reasons) == set(HYBRID_MDM.stage_reason_pairs())
    assert sum(summary.stuck_reasons.values()) == 0


def test_exactly_at_threshold_is_not_stuck():
    u = ad_user("f1", when_created=NOW - 2 * HOUR)
    assert hybrid([u]).summary(NOW).stuck["ad_created"] == 0
    assert hybrid([u]).summary(NOW + 1).stuck["ad_created"] == 1


def test_users_that_leave_scope_are_forgotten():
    a, b = ad_user("g1"), ad_user("g2")
    first = hybrid([a, b])
    second = hybrid([a], first_seen=first.first_seen)
    assert len(second.first_seen) == 1
    (key,) = second.first_seen.keys
    assert key == ad(a).array("k_guid")[0]


def test_stuck_users_are_sorted_longest_waiting_first():
    users = [ad_user(f"h{i}", when_created=NOW - (10 + i) * HOUR) for i in range(5)]
    evaluation = hybrid(users)
    order = [evaluation.ad.text("sam", int(r)) for r in evaluation.summary(NOW).stuck_rows]
    assert order == ["h4", "h3", "h2", "h1", "h0"]


def test_stuck_after_is_per_stage():
    u = ad_user("s1")
    synced = entra_for(u, created=NOW - 3 * HOUR)
    evaluation = run_hybrid(
        ad(u), entra(synced), cm(), now=NOW, stuck_after={"ad_created": HOUR, "entra_synced": 4 * HOUR}
    )
    assert evaluation.summary(NOW).stuck["entra_synced"] == 0
    evaluation = run_hybrid(
        ad(u), entra(synced), cm(), now=NOW, stuck_after={"ad_created": 4 * HOUR, "entra_synced": HOUR}
    )
    assert evaluation.summary(NOW).stuck["entra_synced"] == 1


# =============================================================================== reasons: ad_created
def test_reason_cloud_user_conflict_by_immutable_id():
    u = ad_user("ra1")
    blocker = cloud_only(upn="someone.else@contoso.com", immutable_id=immutable_id(u.source_anchor))
    assert placed(hybrid([u], [blocker]), "ra1") == ("ad_created", "entra_cloud_user_conflict")


def test_reason_cloud_user_conflict_by_sid():
    u = ad_user("ra2")
    blocker = cloud_only(upn="someone.else@contoso.com", sid=u.object_sid)
    assert placed(hybrid([u], [blocker]), "ra2") == ("ad_created", "entra_cloud_user_conflict")


@pytest.mark.parametrize("sync_enabled", [False, None])
def test_reason_cloud_user_conflict_by_upn_any_case(sync_enabled):
    u = ad_user("ra3", upn="Ra3.Person@Contoso.com")
    blocker = cloud_only(upn="ra3.person@CONTOSO.COM", sync_enabled=sync_enabled)
    assert placed(hybrid([u], [blocker]), "ra3") == ("ad_created", "entra_cloud_user_conflict")


def test_conflict_needs_the_immutable_id_exactly():
    u = ad_user("ra4")
    blocker = cloud_only(upn="x@contoso.com", immutable_id=immutable_id(u.source_anchor).swapcase())
    assert placed(hybrid([u], [blocker]), "ra4") == ("ad_created", "entra_not_synced")


def test_a_synced_entra_user_with_the_same_upn_is_no_cloud_user_conflict():
    """Only users whose onPremisesSyncEnabled is not true block the match (e.g. a recreated AD
    account whose old synced Entra object keeps the UPN is not a cloud-only conflict)."""
    u = ad_user("ra5")
    old_object = entra_for(ad_user("ra5-old"), upn=u.user_principal_name)
    assert placed(hybrid([u], [old_object]), "ra5") == ("ad_created", "entra_not_synced")


def test_no_upn_never_conflicts_with_a_cloud_user_without_upn():
    u = ad_user("ra6", upn=None)
    stray = cloud_only(upn=None)
    assert placed(hybrid([u], [stray]), "ra6") == ("ad_created", "entra_not_synced")


def test_reason_sync_pending_when_the_last_sync_is_older_than_the_account():
    u = ad_user("rb1", when_created=NOW - HOUR)
    org = organization(last_sync=NOW - 2 * HOUR)
    assert placed(hybrid([u], org=org), "rb1") == ("ad_created", "entra_sync_pending")


@pytest.mark.parametrize(
    ("org", "created"),
    [
        (organization(last_sync=NOW - HOUR), NOW - 2 * HOUR),  # synced since the account exists
        (organization(last_sync=NOW - HOUR), NOW - HOUR),  # "earlier than": equal is not earlier
        (organization(last_sync=None), NOW - HOUR),  # no onPremisesLastSyncDateTime
        (None, NOW - HOUR),  # no organization data at all
        (organization(last_sync=NOW - 2 * HOUR), None),  # whenCreated unknown
    ],
    ids=["synced-after", "equal", "no-last-sync", "no-organization", "no-when-created"],
)
def test_reason_not_synced_otherwise(org, created):
    u = ad_user("rb2", when_created=created)
    assert placed(hybrid([u], org=org), "rb2") == ("ad_created", "entra_not_synced")


def test_cloud_user_conflict_comes_before_sync_pending():
    u = ad_user("rb3", when_created=NOW - HOUR)
    blocker = cloud_only(upn=u.user_principal_name)
    org = organization(last_sync=NOW - 2 * HOUR)
    assert placed(hybrid([u], [blocker], org=org), "rb3") == ("ad_created", "entra_cloud_user_conflict")


# =============================================================================== reasons: entra_synced
def test_reason_stale_record_has_the_upn_but_none_of_the_keys():
    u = ad_user("rc1", upn="rc1@contoso.com")
    old = cm_for(ad_user("rc1-old"), upn="RC1@Contoso.COM", resource_id=77)
    assert placed(hybrid([u], [entra_for(u)], [old]), "rc1") == ("entra_synced", "configmgr_stale_record")


def test_a_record_of_another_user_without_this_upn_is_not_stale():
    u = ad_user("rc2")
    other = cm_for(ad_user("rc2-other"))
    assert placed(hybrid([u], [entra_for(u)], [other]), "rc2") == ("entra_synced", "configmgr_not_discovered")


def test_user_without_upn_has_no_stale_record():
    u = ad_user("rc3", upn=None)
    no_upn = cm_for(ad_user("rc3-old"), upn=None)
    assert placed(hybrid([u], [entra_for(u)], [no_upn]), "rc3") == (
        "entra_synced",
        "configmgr_not_discovered",
    )


def test_reason_discovery_unhealthy_when_the_agent_is_critical():
    u = ad_user("rc4")
    components = [component(AD_USER_DISCOVERY, 0, "CM01"), component(AD_USER_DISCOVERY, 2, "CM02")]
    evaluation = hybrid([u], [entra_for(u)], components=components)
    assert placed(evaluation, "rc4") == ("entra_synced", "configmgr_discovery_unhealthy")


@pytest.mark.parametrize(
    "components",
    [
        [],  # no component rows read
        [component(AD_USER_DISCOVERY, 1)],  # only a warning
        [component(AD_USER_DISCOVERY, 0)],
        [component(CLOUD_USER_SYNC, 2)],  # another component
    ],
    ids=["no-rows", "warning", "ok", "other-component"],
)
def test_reason_not_discovered_otherwise(components):
    u = ad_user("rc5")
    evaluation = hybrid([u], [entra_for(u)], components=components)
    assert placed(evaluation, "rc5") == ("entra_synced", "configmgr_not_discovered")


def test_stale_record_comes_before_discovery_unhealthy():
    u = ad_user("rc6")
    old = cm_for(ad_user("rc6-old"), upn=u.user_principal_name)
    evaluation = hybrid([u], [entra_for(u)], [old], components=[component(AD_USER_DISCOVERY, 2)])
    assert placed(evaluation, "rc6") == ("entra_synced", "configmgr_stale_record")


# =============================================================================== reasons: cm_discovered
def test_reason_collection_removed_when_the_record_has_a_cloud_user_id():
    u = ad_user("rd1")
    synced = entra_for(u)
    record = cm_for(u, in_collection=False, cloud_user_id=synced.id)
    assert placed(hybrid([u], [synced], [record]), "rd1") == ("cm_discovered", "intune_collection_removed")


def test_reason_not_in_collection_otherwise():
    u = ad_user("rd2")
    assert placed(hybrid([u], [entra_for(u)], [cm_for(u)]), "rd2") == (
        "cm_discovered",
        "not_in_intune_collection",
    )


# =============================================================================== reasons: in_intune_collection
def member(user: AdUser) -> CmUser:
    return cm_for(user, in_collection=True)


def test_reason_upn_mismatch():
    u = ad_user("re1", upn="re1@contoso.local")
    synced = entra_for(u, upn="re1@contoso.com")
    assert placed(hybrid([u], [synced], [member(u)]), "re1") == ("in_intune_collection", "upn_mismatch")


def test_upn_differing_only_in_case_is_no_mismatch():
    u = ad_user("re2", upn="Re2@Contoso.com")
    synced = entra_for(u, upn="re2@CONTOSO.COM")
    assert placed(hybrid([u], [synced], [member(u)]), "re2") == (
        "in_intune_collection",
        "connector_sync_pending",
    )


def test_ad_user_without_upn_has_a_upn_mismatch():
    """Reading: "differs" holds when the AD userPrincipalName is null and the Entra one is not (the
    connector cannot look the user up by a UPN the account does not have)."""
    u = ad_user("re3", upn=None)
    synced = entra_for(u, upn="re3@contoso.onmicrosoft.com")
    assert placed(hybrid([u], [synced], [member(u)]), "re3") == ("in_intune_collection", "upn_mismatch")


def test_reason_entra_account_disabled():
    u = ad_user("re4")
    synced = entra_for(u, account_enabled=False)
    assert placed(hybrid([u], [synced], [member(u)]), "re4") == (
        "in_intune_collection",
        "entra_account_disabled",
    )


def test_unknown_account_enabled_is_not_disabled():
    u = ad_user("re5")
    synced = entra_for(u, account_enabled=None)
    assert placed(hybrid([u], [synced], [member(u)]), "re5") == (
        "in_intune_collection",
        "connector_sync_pending",
    )


def test_reason_connector_unhealthy():
    u = ad_user("re6")
    evaluation = hybrid([u], [entra_for(u)], [member(u)], components=[component(CLOUD_USER_SYNC, 2)])
    assert placed(evaluation, "re6") == ("in_intune_collection", "connector_unhealthy")


@pytest.mark.parametrize(
    "components",
    [[], [component(CLOUD_USER_SYNC, 1)], [component(AD_USER_DISCOVERY, 2)]],
    ids=["no-rows", "warning", "other-component"],
)
def test_reason_connector_sync_pending_otherwise(components):
    u = ad_user("re7")
    evaluation = hybrid([u], [entra_for(u)], [member(u)], components=components)
    assert placed(evaluation, "re7") == ("in_intune_collection", "connector_sync_pending")


def test_in_collection_reasons_are_taken_in_table_order():
    unhealthy = [component(CLOUD_USER_SYNC, 2)]
    u = ad_user("re8", upn="re8@contoso.local")
    everything = entra_for(u, upn="re8@contoso.com", account_enabled=False)
    assert placed(hybrid([u], [everything], [member(u)], components=unhealthy), "re8")[1] == "upn_mismatch"
    v = ad_user("re9")
    disabled = entra_for(v, account_enabled=False)
    assert placed(hybrid([v], [disabled], [member(v)], components=unhealthy), "re9")[1] == (
        "entra_account_disabled"
    )


# =============================================================================== reasons: connector_synced
def test_reason_cloud_user_id_of_another_synced_user_any_case():
    u, other = ad_user("rf1"), ad_user("rf1-other")
    synced, theirs = entra_for(u), entra_for(other)
    record = cm_for(u, in_collection=True, cloud_user_id=theirs.id.upper())
    evaluation = hybrid([u], [synced, theirs], [record])
    assert placed(evaluation, "rf1") == ("connector_synced", "cloud_user_id_other_user")


def test_reason_cloud_user_id_of_a_cloud_only_user():
    u = ad_user("rf2")
    stray = cloud_only(upn="stray@contoso.com")
    record = cm_for(u, in_collection=True, cloud_user_id=stray.id)
    evaluation = hybrid([u], [entra_for(u), stray], [record])
    assert placed(evaluation, "rf2") == ("connector_synced", "cloud_user_id_other_user")


def test_reason_cloud_user_id_unknown_otherwise():
    u = ad_user("rf3")
    record = cm_for(u, in_collection=True, cloud_user_id=str(uuid.uuid4()))
    evaluation = hybrid([u], [entra_for(u)], [record])
    assert placed(evaluation, "rf3") == ("connector_synced", "cloud_user_id_unknown")


def test_intune_enabled_users_have_no_reason():
    u = ad_user("rg1")
    assert placed(hybrid([u], *[[x] for x in enabled_chain(u)]), "rg1") == ("intune_enabled", None)


def test_stuck_reasons_are_counted_per_stage_and_sum_to_the_stuck_users():
    old = NOW - 100 * HOUR
    a = ad_user("rh1", when_created=old)
    b = ad_user("rh2", when_created=NOW)  # not stuck yet
    c = ad_user("rh3", when_created=old)
    blocker = cloud_only(upn=c.user_principal_name)
    evaluation = hybrid([a, b, c], [blocker])
    summary = evaluation.summary(NOW)
    assert summary.stuck["ad_created"] == 2
    assert summary.stuck_reasons[("ad_created", "entra_cloud_user_conflict")] == 1
    assert summary.stuck_reasons[("ad_created", "entra_not_synced")] == 1
    assert summary.stuck_reasons[("ad_created", "entra_sync_pending")] == 0


# =============================================================================== random estates
@dataclass
class Expected:
    stage: str
    reason: str | None
    entered: float


@dataclass
class Oracle:
    users: dict[str, Expected]
    orphans: dict[str, int]
    mismatch: int


def _lowest_id(candidates: list[EntraUser]) -> EntraUser | None:
    return min(candidates, key=lambda e: uuid.UUID(e.id)) if candidates else None


def _furthest(candidates: list[CmUser]) -> CmUser | None:
    if not candidates:
        return None
    return min(candidates, key=lambda r: (not r.collections, r.cloud_user_id is None, r.resource_id))


def _same_guid(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and uuid.UUID(a.strip("{}")) == uuid.UUID(b.strip("{}"))


def _fold(text: str | None) -> str | None:
    return text.casefold() if text else None


def contract_hybrid(
    users: Sequence[AdUser],
    entra_users: Sequence[EntraUser],
    records: Sequence[CmUser],
    components: Sequence[CmComponent],
    org: OrganizationData | None,
    first_seen_at: float,
) -> Oracle:
    """The contract's tables read literally, one user at a time (the tie-breaks between duplicates
    are this suite's documented readings: lowest object id; furthest record, then lowest ResourceID)."""
    synced = [e for e in entra_users if e.on_premises_sync_enabled is True]
    not_synced = [e for e in entra_users if e.on_premises_sync_enabled is not True]

    def critical(name: str) -> bool:
        return any(c.component_name == name and c.status == 2 for c in components)

    result: dict[str, Expected] = {}
    matched_entra: set[str] = set()
    matched_records: set[int] = set()
    mismatch = 0
    for u in users:
        imm = base64.b64encode(u.source_anchor).decode()
        sid = u.object_sid.upper()
        e = _lowest_id([x for x in synced if x.on_premises_immutable_id == imm]) or _lowest_id(
            [x for x in synced if (x.on_premises_security_identifier or "").upper() == sid]
        )

        def keys_of(r: CmUser, u: AdUser = u, sid: str = sid) -> tuple[bool, bool, bool]:
            name = f"{NETBIOS}\\{u.sam_account_name}".casefold()
            return (
                (r.sid or "").upper() == sid,
                r.object_guid is not None and r.object_guid == u.object_guid,
                r.unique_user_name is not None and r.unique_user_name.strip().casefold() == name,
            )

        c = None
        for key in range(3):
            c = c or _furthest([r for r in records if keys_of(r)[key]])
        in_collection = c is not None and bool(c.collections)
        has_cloud = c is not None and c.cloud_user_id is not None
        enabled = e is not None and c is not None and _same_guid(c.cloud_user_id, e.id)
        conditions = [e is not None, c is not None, in_collection, has_cloud, enabled]
        index = 0
        while index < 5 and conditions[index]:
            index += 1
        stage = STAGES[index]
        if e is not None:
            matched_entra.add(e.id)
            if has_cloud and not enabled:
                mismatch += 1
        if c is not None:
            matched_records.add(c.resource_id)

        reason: str | None = None
        if stage == "ad_created":
            upn = _fold(u.user_principal_name)
            if any(
                x.on_premises_immutable_id == imm
                or (x.on_premises_security_identifier or "").upper() == sid
                or (upn is not None and _fold(x.user_principal_name) == upn)
                for x in not_synced
            ):
                reason = "entra_cloud_user_conflict"
            elif (
                org is not None
                and org.last_sync is not None
                and u.when_created is not None
                and org.last_sync < u.when_created
            ):
                reason = "entra_sync_pending"
            else:
                reason = "entra_not_synced"
        elif stage == "entra_synced":
            upn = _fold(u.user_principal_name)
            if upn is not None and any(
                _fold(r.user_principal_name) == upn and not any(keys_of(r)) for r in records
            ):
                reason = "configmgr_stale_record"
            elif critical(AD_USER_DISCOVERY):
                reason = "configmgr_discovery_unhealthy"
            else:
                reason = "configmgr_not_discovered"
        elif stage == "cm_discovered":
            assert c is not None
            reason = (
                "intune_collection_removed" if c.cloud_user_id is not None else "not_in_intune_collection"
            )
        elif stage == "in_intune_collection":
            assert e is not None
            if _fold(e.user_principal_name) != _fold(u.user_principal_name):
                reason = "upn_mismatch"
            elif e.account_enabled is False:
                reason = "entra_account_disabled"
            elif critical(CLOUD_USER_SYNC):
                reason = "connector_unhealthy"
            else:
                reason = "connector_sync_pending"
        elif stage == "connector_synced":
            assert c is not None
            if any(_same_guid(c.cloud_user_id, x.id) for x in entra_users):
                reason = "cloud_user_id_other_user"
            else:
                reason = "cloud_user_id_unknown"

        evidence = {
            "ad_created": u.when_created,
            "entra_synced": e.created if e is not None else None,
            "cm_discovered": c.creation_date if c is not None else None,
        }.get(stage)
        result[u.sam_account_name] = Expected(stage, reason, first_seen_at if evidence is None else evidence)
    orphans = {
        "entra": sum(1 for x in synced if x.id not in matched_entra),
        "configmgr": sum(1 for r in records if r.resource_id not in matched_records),
    }
    return Oracle(result, orphans, mismatch)


def _random_guid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _random_case(rng: random.Random, text: str | None) -> str | None:
    if text is None:
        return None
    return "".join(ch.upper() if rng.random() < 0.5 else ch.lower() for ch in text)


def random_hybrid_estate(rng: random.Random):
    """A small estate where every join key, duplicate, conflict and reason has a fair chance."""
    count = rng.randint(0, 7)
    users = []
    for i in range(count):
        upn = rng.choice(["", "", None, f"u{i}@contoso.local", "shared@contoso.com"])
        anchor = rng.choice([None, None, uuid.UUID(int=rng.getrandbits(128)).bytes])
        created = rng.choice([None, NOW - rng.choice([0.5, 1.5, 3, 30]) * HOUR])
        users.append(ad_user(f"u{i}", when_created=created, upn=upn, anchor=anchor, rid=5000 + i))
    entra_users: list[EntraUser] = []
    for u in users:
        for _ in range(rng.choice([0, 1, 1, 1, 2])):
            kind = rng.choice(["imm", "sid", "none", "cloud-imm", "cloud-sid", "cloud-upn"])
            if kind.startswith("cloud"):
                entra_users.append(
                    cloud_only(
                        upn=_random_case(rng, u.user_principal_name) if kind == "cloud-upn" else None,
                        immutable_id=immutable_id(u.source_anchor) if kind == "cloud-imm" else None,
                        sid=u.object_sid if kind == "cloud-sid" else None,
                        object_id=_random_guid(rng),
                        sync_enabled=rng.choice([False, None]),
                    )
                )
                continue
            upn = rng.choice(
                ["", "", f"{u.sam_account_name}@contoso.com", _random_case(rng, u.user_principal_name)]
            )
            user = entra_for(
                u,
                by={"imm": "immutable_id", "sid": "sid", "none": "neither"}[kind],
                created=rng.choice([None, NOW - rng.choice([0.5, 2, 30]) * HOUR]),
                object_id=_random_guid(rng),
                upn=upn,
                account_enabled=rng.choice([True, True, False, None]),
            )
            if kind == "imm" and rng.random() < 0.3:
                user = dataclasses.replace(user, on_premises_security_identifier=None)
            entra_users.append(user)
    for _ in range(rng.randint(0, 2)):
        entra_users.append(entra_for(ad_user(f"gone{rng.randint(0, 99)}"), object_id=_random_guid(rng)))
    records: list[CmUser] = []
    resource_ids = iter(rng.sample(range(1, 10_000), 60))
    for u in users:
        for _ in range(rng.choice([0, 1, 1, 2, 3])):
            by = rng.choice(["sid", "guid", "name", "stale"])
            owner = ad_user(u.sam_account_name + "-old") if by == "stale" else u
            cloud = rng.choice(
                [None, None, "entra", "entra-upper", "random"] + (["other"] if entra_users else [])
            )
            mine = [x.id for x in entra_users if x.on_premises_immutable_id == immutable_id(u.source_anchor)]
            cloud_id = {
                None: None,
                "entra": mine[0] if mine else None,
                "entra-upper": mine[0].upper() if mine else None,
                "random": _random_guid(rng),
                "other": rng.choice(entra_users).id if entra_users else None,
            }[cloud]
            record = cm_for(
                owner,
                by="sid" if by == "stale" else by,
                in_collection=rng.random() < 0.6,
                cloud_user_id=cloud_id,
                creation_date=rng.choice([None, NOW - rng.choice([1, 5, 30]) * HOUR]),
                resource_id=next(resource_ids),
                upn=_random_case(rng, u.user_principal_name) if by == "stale" or rng.random() < 0.5 else "",
            )
            if by == "name":
                record = dataclasses.replace(
                    record, unique_user_name=_random_case(rng, record.unique_user_name)
                )
            records.append(record)
    components = [
        component(name, rng.choice([0, 1, 2]), machine)
        for name in (AD_USER_DISCOVERY, CLOUD_USER_SYNC)
        for machine in ("CM01", "CM02")
        if rng.random() < 0.4
    ]
    org = rng.choice(
        [None, organization(last_sync=None), organization(last_sync=NOW - rng.choice([0.2, 1, 4]) * HOUR)]
    )
    rng.shuffle(entra_users)
    rng.shuffle(records)
    return users, entra_users, records, components, org


def check_against_contract(evaluation: Evaluation, oracle: Oracle, now: float) -> None:
    table = evaluation.ad
    for row in range(table.n):
        sam = table.text("sam", row)
        expected = oracle.users[sam]
        got = (evaluation.stage_name(row), evaluation.reason_name(row), float(evaluation.entered[row]))
        assert got == (expected.stage, expected.reason, expected.entered), sam
    summary = evaluation.summary(now)
    definition = evaluation.definition
    stuck_after = evaluation.settings.stuck_after
    for stage in definition.stages:
        at_stage = [x for x in oracle.users.values() if x.stage == stage]
        stuck = [x for x in at_stage if now - x.entered > stuck_after.get(stage, float("inf"))]
        assert summary.users[stage] == len(at_stage), stage
        assert summary.stuck[stage] == len(stuck), stage
        for reason in definition.reasons_of(stage):
            expected_count = sum(1 for x in stuck if x.reason == reason.name)
            assert summary.stuck_reasons[(stage, reason.name)] == expected_count, (stage, reason.name)
        per_stage = sum(summary.stuck_reasons[(stage, r.name)] for r in definition.reasons_of(stage))
        assert per_stage == summary.stuck[stage]
    assert set(summary.stuck_reasons) == set(definition.stage_reason_pairs())


@pytest.mark.parametrize("seed", range(300))
def test_random_estates_follow_the_contract(seed):
    rng = random.Random(seed)
    users, entra_users, records, components, org = random_hybrid_estate(rng)
    first = hybrid(users, entra_users, records, components=components, org=org)
    oracle = contract_hybrid(users, entra_users, records, components, org, first_seen_at=NOW)
    check_against_contract(first, oracle, NOW)
    assert first.side["orphans"] == oracle.orphans
    assert first.side["cloud_user_id_mismatch"] == oracle.mismatch
    later = NOW + rng.choice([0.5, 1.5, 3, 6]) * HOUR
    second = hybrid(
        users, entra_users, records, components=components, org=org, now=later, first_seen=first.first_seen
    )
    check_against_contract(second, oracle, later)


def test_random_estates_reach_every_stage_and_reason():
    """The generator is worth something only if it produces every (stage, reason) pair."""
    seen: set[tuple[str, str | None]] = set()
    for seed in range(300):
        users, entra_users, records, components, org = random_hybrid_estate(random.Random(seed))
        evaluation = hybrid(users, entra_users, records, components=components, org=org)
        seen |= {(evaluation.stage_name(r), evaluation.reason_name(r)) for r in range(evaluation.ad.n)}
    assert set(HYBRID_MDM.stage_reason_pairs()) | {("intune_enabled", None)} <= seen


def test_the_evaluation_does_not_depend_on_row_order():
    rng = random.Random(7)
    users, entra_users, records, components, org = random_hybrid_estate(rng)
    while len(users) < 4:
        users, entra_users, records, components, org = random_hybrid_estate(rng)
    base = hybrid(users, entra_users, records, components=components, org=org)
    expected = {sam: placed(base, sam) for sam in (u.sam_account_name for u in users)}
    for _ in range(5):
        rng.shuffle(users)
        rng.shuffle(entra_users)
        rng.shuffle(records)
        shuffled = hybrid(users, entra_users, records, components=components, org=org)
        assert {sam: placed(shuffled, sam) for sam in expected} == expected
        assert np.array_equal(np.sort(shuffled.entered), np.sort(base.entered))


def test_empty_estate_has_every_stage_and_reason_at_zero():
    summary = hybrid([]).summary(NOW)
    assert summary.users == dict.fromkeys(STAGES, 0)
    assert summary.stuck == dict.fromkeys(STAGES, 0)
    assert summary.stuck_reasons == dict.fromkeys(HYBRID_MDM.stage_reason_pairs(), 0)
    assert summary.oldest_entry == dict.fromkeys(STAGES)


def test_large_estate_joins_every_user():
    """20k users per system, matched by keys in sorted indexes (a nested-loop join would take minutes)."""
    users = [ad_user(f"bulk{i}", rid=100_000 + i) for i in range(20_000)]
    synced = [entra_for(u) for u in users]
    records = [cm_for(u, in_collection=True, cloud_user_id=e.id) for u, e in zip(users, synced, strict=True)]
    evaluation = hybrid(users, synced, records)
    assert evaluation.summary(NOW).users["intune_enabled"] == 20_000
    assert len(evaluation.first_seen) == 20_000
    assert evaluation.side["orphans"] == {"entra": 0, "configmgr": 0}
