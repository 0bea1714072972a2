"""The stage model against every rule of CONTRACT.md's stage table, on plain data."""

from __future__ import annotations

import dataclasses
import uuid

import pytest

from exporter.ids import guid_bytes, guid_text
from exporter.model import STAGES, AssignedLicense, OrganizationData, ServicePlan, SubscribedSku
from exporter.stages import (
    FirstSeen,
    evaluate,
    summarise_configmgr,
    summarise_entra,
    user_key,
    user_label_value,
)
from tests.builders import ad, ad_user, cm, cm_for, entra, entra_for

NOW = 1_000_000.0
HOUR = 3600.0
STUCK_AFTER = {
    "ad_created": 2 * HOUR,
    "entra_synced": HOUR,
    "cm_discovered": 4 * HOUR,
    "in_intune_collection": HOUR,
    "connector_synced": HOUR,
}


def stage_of(user, entra_users=(), cm_users=(), netbios="CONTOSO"):
    ad_data = dataclasses.replace(ad(user), netbios_domain=netbios)
    view, _ = evaluate(ad_data, entra(*entra_users), cm(*cm_users), {}, STUCK_AFTER, NOW)
    (stage,) = [s for s in STAGES if view.users[s] == 1]
    assert sum(view.users.values()) == 1
    return stage


# ------------------------------------------------------------------------------- each stage
def test_only_in_ad_is_ad_created():
    assert stage_of(ad_user("alice")) == "ad_created"


def test_synced_entra_user_matched_by_immutable_id_is_entra_synced():
    u = ad_user("bob")
    assert stage_of(u, [entra_for(u)]) == "entra_synced"


def test_entra_match_falls_back_to_sid_when_immutable_id_is_null():
    u = ad_user("carol")
    assert stage_of(u, [entra_for(u, by="sid")]) == "entra_synced"


def test_entra_match_ignores_users_without_sync_enabled():
    u = ad_user("dave")
    assert stage_of(u, [entra_for(u, sync_enabled=False)]) == "ad_created"


def test_immutable_id_uses_the_configured_source_anchor():
    consistency_guid = uuid.uuid4().bytes_le
    u = ad_user("erin", anchor=consistency_guid)
    synced = entra_for(u)  # immutable id = base64(consistency guid)
    assert (
        synced.on_premises_immutable_id
        != entra_for(ad_user("erin"), by="immutable_id").on_premises_immutable_id
    )
    assert stage_of(u, [dataclasses.replace(synced, on_premises_security_identifier=None)]) == "entra_synced"
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


@pytest.mark.parametrize("by", ["sid", "guid", "name"])
def test_configmgr_match_by_each_key(by):
    u = ad_user("gina")
    assert stage_of(u, [entra_for(u)], [cm_for(u, by=by)]) == "cm_discovered"


def test_configmgr_name_match_is_case_insensitive_and_needs_the_domain():
    u = ad_user("Hank")
    record = cm_for(u, by="name")
    upper = dataclasses.replace(record, unique_user_name="contoso\\HANK")
    assert stage_of(u, [entra_for(u)], [upper]) == "cm_discovered"
    other_domain = dataclasses.replace(record, unique_user_name="FABRIKAM\\hank")
    assert stage_of(u, [entra_for(u)], [other_domain]) == "entra_synced"


def test_configmgr_sid_is_preferred_over_guid_and_name():
    u = ad_user("ivy")
    by_sid = cm_for(u, by="sid", in_collection=True)
    by_name = cm_for(u, by="name", in_collection=False)
    assert stage_of(u, [entra_for(u)], [by_name, by_sid]) == "in_intune_collection"


def test_configmgr_guid_from_upper_case_text_matches():
    u = ad_user("jack")
    text = str(uuid.UUID(bytes_le=u.object_guid)).upper()
    record = dataclasses.replace(cm_for(u, by="guid"), object_guid=guid_bytes("{" + text + "}"))
    assert stage_of(u, [entra_for(u)], [record]) == "cm_discovered"


def test_in_collection_without_cloud_user_id_is_in_intune_collection():
    u = ad_user("kim")
    assert stage_of(u, [entra_for(u)], [cm_for(u, in_collection=True)]) == "in_intune_collection"


def test_cloud_user_id_not_matching_is_connector_synced():
    u = ad_user("liam")
    record = cm_for(u, in_collection=True, cloud_user_id=str(uuid.uuid4()))
    assert stage_of(u, [entra_for(u)], [record]) == "connector_synced"


def test_cloud_user_id_equal_ignoring_case_is_intune_enabled():
    u = ad_user("mia")
    synced = entra_for(u)
    record = cm_for(u, in_collection=True, cloud_user_id=guid_text(synced.id.upper()))
    assert stage_of(u, [synced], [record]) == "intune_enabled"
    record_upper = dataclasses.replace(record, cloud_user_id=synced.id.upper())
    assert stage_of(u, [synced], [record_upper]) == "intune_enabled"


# ------------------------------------------------------------------------------- skipped steps
def test_in_collection_but_not_in_entra_is_ad_created():
    u = ad_user("noah")
    record = cm_for(u, in_collection=True, cloud_user_id=str(uuid.uuid4()))
    assert stage_of(u, [], [record]) == "ad_created"


def test_cloud_user_id_set_but_not_in_collection_is_cm_discovered():
    u = ad_user("olga")
    synced = entra_for(u)
    record = cm_for(u, in_collection=False, cloud_user_id=synced.id)
    assert stage_of(u, [synced], [record]) == "cm_discovered"


# ------------------------------------------------------------------------------- scope
def test_only_users_in_the_ad_data_are_counted_others_are_orphans():
    inside, outside = ad_user("pia"), ad_user("quinn")  # quinn: disabled or outside search_bases
    synced_in, synced_out = entra_for(inside), entra_for(outside)
    records = [cm_for(inside, in_collection=True, cloud_user_id=synced_in.id), cm_for(outside)]
    view, _ = evaluate(ad(inside), entra(synced_in, synced_out), cm(*records), {}, STUCK_AFTER, NOW)
    assert sum(view.users.values()) == 1
    assert view.users["intune_enabled"] == 1
    assert view.orphans == {"entra": 1, "configmgr": 1}


def test_cloud_only_entra_users_are_not_orphans():
    u = ad_user("rita")
    cloud_only = dataclasses.replace(entra_for(ad_user("cloudy")), on_premises_sync_enabled=False)
    view, _ = evaluate(ad(u), entra(entra_for(u), cloud_only), cm(), {}, STUCK_AFTER, NOW)
    assert view.orphans["entra"] == 0


def test_duplicate_configmgr_records_one_is_the_match_the_other_an_orphan():
    u = ad_user("sam")
    synced = entra_for(u)
    stale = cm_for(u, resource_id=1)
    current = cm_for(u, resource_id=2, in_collection=True, cloud_user_id=synced.id)
    view, _ = evaluate(ad(u), entra(synced), cm(stale, current), {}, STUCK_AFTER, NOW)
    assert view.users["intune_enabled"] == 1
    assert view.orphans["configmgr"] == 1


# ------------------------------------------------------------------------------- counters
def test_mismatch_counts_cloud_user_id_not_equal_to_entra_id():
    a, b, c = ad_user("tom"), ad_user("uma"), ad_user("vic")
    ea, eb, ec = entra_for(a), entra_for(b), entra_for(c)
    records = [
        cm_for(a, in_collection=True, cloud_user_id=str(uuid.uuid4())),  # mismatch
        cm_for(b, in_collection=True, cloud_user_id=eb.id),  # fine
        cm_for(c, in_collection=True),  # missing, not a mismatch
    ]
    view, _ = evaluate(ad(a, b, c), entra(ea, eb, ec), cm(*records), {}, STUCK_AFTER, NOW)
    assert view.cloud_user_id_mismatch == 1


def test_missing_cloud_user_id_counts_every_record_split_by_collection():
    a, b, c, d = (ad_user(n) for n in ("w1", "w2", "w3", "w4"))
    records = cm(
        cm_for(a, in_collection=True),
        cm_for(b, in_collection=True, cloud_user_id=str(uuid.uuid4())),
        cm_for(c, in_collection=False),
        cm_for(d, in_collection=False),
    )
    summary = summarise_configmgr(records)
    assert summary.missing_cloud_user_id == {True: 1, False: 2}


def test_provisioning_errors_are_counted_per_user_and_category():
    a, b = ad_user("x1"), ad_user("x2")
    ea = dataclasses.replace(
        entra_for(a), provisioning_error_categories=("PropertyConflict", "PropertyConflict")
    )
    eb = dataclasses.replace(
        entra_for(b), provisioning_error_categories=("PropertyConflict", "UserPrincipalName")
    )
    summary = summarise_entra(entra(ea, eb))
    assert summary.provisioning_errors == {"PropertyConflict": 2, "UserPrincipalName": 1}


# ------------------------------------------------------------------------------- time in stage
def test_stuck_uses_when_created_for_ad_created():
    old = ad_user("y1", when_created=NOW - 3 * HOUR)
    new = ad_user("y2", when_created=NOW - 1 * HOUR)
    view, _ = evaluate(ad(old, new), entra(), cm(), {}, STUCK_AFTER, NOW)
    assert view.stuck["ad_created"] == 1
    assert view.oldest_entry["ad_created"] == NOW - 3 * HOUR
    assert [s.sam_account_name for s in view.stuck_users] == ["y1"]


def test_stuck_uses_entra_created_then_first_seen_when_null():
    a, b = ad_user("z1"), ad_user("z2")
    ea = entra_for(a, created=NOW - 2 * HOUR)
    eb = entra_for(b, created=None)
    view, seen = evaluate(ad(a, b), entra(ea, eb), cm(), {}, STUCK_AFTER, NOW)
    assert view.stuck["entra_synced"] == 1  # b has no createdDateTime: first seen now
    assert seen[user_key(b)] == FirstSeen("entra_synced", NOW)


def test_stuck_uses_configmgr_creation_date_for_cm_discovered():
    u = ad_user("c1")
    record = cm_for(u, creation_date=NOW - 5 * HOUR)
    view, _ = evaluate(ad(u), entra(entra_for(u)), cm(record), {}, STUCK_AFTER, NOW)
    assert view.stuck["cm_discovered"] == 1


def test_later_stages_use_first_seen_which_survives_and_resets_on_stage_change():
    u = ad_user("d1")
    synced = entra_for(u)
    in_coll = cm(cm_for(u, in_collection=True))
    view1, seen1 = evaluate(ad(u), entra(synced), in_coll, {}, STUCK_AFTER, NOW)
    assert view1.stuck["in_intune_collection"] == 0
    view2, seen2 = evaluate(ad(u), entra(synced), in_coll, seen1, STUCK_AFTER, NOW + 2 * HOUR)
    assert view2.stuck["in_intune_collection"] == 1
    assert view2.oldest_entry["in_intune_collection"] == NOW
    wrong = cm(cm_for(u, in_collection=True, cloud_user_id=str(uuid.uuid4())))
    view3, seen3 = evaluate(ad(u), entra(synced), wrong, seen2, STUCK_AFTER, NOW + 2.5 * HOUR)
    assert seen3[user_key(u)] == FirstSeen("connector_synced", NOW + 2.5 * HOUR)
    assert view3.stuck["connector_synced"] == 0


def test_intune_enabled_users_are_never_stuck_and_empty_stages_are_present():
    u = ad_user("e1", when_created=NOW - 100 * HOUR)
    synced = entra_for(u, created=NOW - 100 * HOUR)
    record = cm_for(u, in_collection=True, cloud_user_id=synced.id, creation_date=NOW - 100 * HOUR)
    view, _ = evaluate(ad(u), entra(synced), cm(record), {}, STUCK_AFTER, NOW + 100 * HOUR)
    assert set(view.users) == set(STAGES) == set(view.stuck) == set(view.oldest_entry)
    assert sum(view.stuck.values()) == 0
    assert view.oldest_entry["ad_created"] is None


def test_exactly_at_threshold_is_not_stuck():
    u = ad_user("f1", when_created=NOW - 2 * HOUR)
    view, _ = evaluate(ad(u), entra(), cm(), {}, STUCK_AFTER, NOW)
    assert view.stuck["ad_created"] == 0


def test_users_that_leave_scope_are_forgotten():
    a, b = ad_user("g1"), ad_user("g2")
    _, seen = evaluate(ad(a, b), entra(), cm(), {}, STUCK_AFTER, NOW)
    _, seen2 = evaluate(ad(a), entra(), cm(), seen, STUCK_AFTER, NOW)
    assert set(seen2) == {user_key(a)}


def test_stuck_users_are_sorted_longest_waiting_first():
    users = [ad_user(f"h{i}", when_created=NOW - (10 + i) * HOUR) for i in range(5)]
    view, _ = evaluate(ad(*users), entra(), cm(), {}, STUCK_AFTER, NOW)
    assert [s.sam_account_name for s in view.stuck_users] == ["h4", "h3", "h2", "h1", "h0"]


# ------------------------------------------------------------------------------- licenses, labels
def test_intune_enabled_users_without_an_intune_plan_are_counted():
    intune_plan = ServicePlan("c1ec4a95-1f05-45b3-a911-aa3fa01094f5", "INTUNE_A")
    ems = SubscribedSku("ems", "EMS", "Enabled", "User", 1, 10, 0, 0, 0, (intune_plan,))
    e3 = SubscribedSku("e3", "ENTERPRISEPACK", "Enabled", "User", 3, 10, 0, 0, 0, ())
    org = OrganizationData(True, NOW, (ems, e3), ())
    users = [ad_user(n) for n in ("i1", "i2", "i3")]
    licenses = [
        (AssignedLicense("ems"),),  # licensed
        (AssignedLicense("e3"),),  # no Intune plan
        (AssignedLicense("ems", (intune_plan.id,)),),  # Intune plan disabled
    ]
    synced = [
        dataclasses.replace(entra_for(u), assigned_licenses=lic)
        for u, lic in zip(users, licenses, strict=True)
    ]
    records = [cm_for(u, in_collection=True, cloud_user_id=e.id) for u, e in zip(users, synced, strict=True)]
    view, _ = evaluate(ad(*users), entra(*synced), cm(*records), {}, STUCK_AFTER, NOW, organization=org)
    assert view.users["intune_enabled"] == 3
    assert view.intune_enabled_without_intune_license == 2
    view_no_org, _ = evaluate(ad(*users), entra(*synced), cm(*records), {}, STUCK_AFTER, NOW)
    assert view_no_org.intune_enabled_without_intune_license is None


def test_user_label_modes():
    assert user_label_value("upn", "sam1", "sam1@contoso.com", "key") == "sam1@contoso.com"
    assert user_label_value("upn", "sam1", None, "key") == "sam1"
    assert user_label_value("sam", "sam1", "sam1@contoso.com", "key") == "sam1"
    hashed = user_label_value("hash", "sam1", "sam1@contoso.com", "key")
    assert hashed and len(hashed) == 16 and "sam1" not in hashed
    assert user_label_value("none", "sam1", "x", "key") is None


def test_join_is_linear_not_quadratic_on_large_estates():
    # 20k users per system: a nested-loop join would take minutes; this must stay well under that.
    users = [ad_user(f"bulk{i}", rid=100_000 + i) for i in range(20_000)]
    synced = [entra_for(u) for u in users]
    records = [cm_for(u, in_collection=True, cloud_user_id=e.id) for u, e in zip(users, synced, strict=True)]
    view, seen = evaluate(ad(*users), entra(*synced), cm(*records), {}, STUCK_AFTER, NOW)
    assert view.users["intune_enabled"] == 20_000
    assert len(seen) == 20_000
