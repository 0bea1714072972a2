"""The ``cloud`` chain against CONTRACT.md, "Second pipeline profile: cloud".

AD -> Entra ID -> Intune licence -> enrolled device -> compliant device. Expected values come from
the contract's words; where it leaves a choice open the docstring names the reading. The last part
compares the vectorised evaluation with a per-user reading of the contract on random estates.
"""

from __future__ import annotations

import base64
import dataclasses
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from exporter.ids import immutable_id
from exporter.model import (
    AdUser,
    AssignedLicense,
    EntraUser,
    LicenseState,
    ManagedDevice,
    OrganizationData,
)
from exporter.pipelines.cloud import licence_errors
from exporter.pipelines.definitions import CLOUD, DAY, HOUR
from exporter.pipelines.evaluation import Evaluation, FirstSeen
from tests.builders import (
    AAD_PREMIUM,
    DEFAULT_SKUS,
    E3_SKU,
    EDU_SKU,
    EMS_SKU,
    INTUNE_A,
    INTUNE_EDU,
    INTUNE_SKU,
    ad,
    ad_user,
    cloud_only,
    device_for,
    devices,
    entra,
    entra_for,
    licensed,
    organization,
    placed,
    row_of,
    run_cloud,
    subscribed_sku,
)

NOW = 10_000_000.0
STAGES = CLOUD.stages
STALE = 30 * DAY
FRESH = NOW - HOUR  # a lastSyncDateTime well within device_stale_after
ORG = organization(last_sync=NOW - HOUR)
UNKNOWN_SKU = "11111111-2222-4333-8444-555555555555"


def cloud(
    users: Sequence[AdUser],
    entra_users: Sequence[EntraUser] = (),
    device_list: Sequence[ManagedDevice] = (),
    *,
    org: OrganizationData | None = ORG,
    now: float = NOW,
    first_seen: FirstSeen | None = None,
    **settings,
) -> Evaluation:
    return run_cloud(
        ad(*users),
        entra(*entra_users),
        now=now,
        organization=org,
        device_table=devices(*device_list),
        first_seen=first_seen,
        **settings,
    )


def state(
    sku: str = INTUNE_SKU,
    state_: str | None = "Active",
    error: str | None = "None",
    *,
    disabled: Sequence[str] = (),
    updated: float | None = NOW - 2 * DAY,
    group: str | None = None,
) -> LicenseState:
    return LicenseState(sku, state_, error, group, tuple(disabled), updated)


def with_states(user: AdUser, *states: LicenseState, usage_location: str | None = "DE", **kw) -> EntraUser:
    return licensed(entra_for(user, **kw), states=states, usage_location=usage_location)


def with_assigned(user: AdUser, *assigned: AssignedLicense, **kw) -> EntraUser:
    return licensed(entra_for(user, **kw), assigned=assigned)


def one(user: AdUser, entra_user: EntraUser | None = None, device_list=(), **kw) -> tuple[str, str | None]:
    evaluation = cloud([user], [entra_user] if entra_user else [], device_list, **kw)
    return placed(evaluation, user.sam_account_name)


# =============================================================================== stages 1 and 2
def test_only_in_ad_is_ad_created():
    assert one(ad_user("ann")) == ("ad_created", "entra_not_synced")


@pytest.mark.parametrize("by", ["immutable_id", "sid"])
def test_synced_entra_user_by_either_key_is_entra_synced(by):
    u = ad_user("ben")
    assert one(u, entra_for(u, by=by)) == ("entra_synced", "no_intune_license")


@pytest.mark.parametrize("sync_enabled", [False, None])
def test_cloud_only_entra_user_never_joins_even_when_licensed_with_devices(sync_enabled):
    u = ad_user("cat")
    twin = dataclasses.replace(with_states(u, state()), on_premises_sync_enabled=sync_enabled)
    assert one(u, twin, [device_for(twin, last_sync=FRESH)]) == ("ad_created", "entra_cloud_user_conflict")


# =============================================================================== stage 3: licence
@pytest.mark.parametrize(
    "entry",
    [
        state(INTUNE_SKU, "Active"),
        state(INTUNE_SKU, "ActiveWithError", "CountViolation"),
        state(EMS_SKU, "Active", disabled=[AAD_PREMIUM.id]),  # another plan off: Intune still on
        state(EDU_SKU, "Active", disabled=[INTUNE_A.id]),  # INTUNE_EDU still on
    ],
    ids=["intune", "active-with-error", "ems-other-plan-off", "edu-one-intune-plan-off"],
)
def test_granting_licence_state_is_intune_licensed(entry):
    u = ad_user("dan")
    assert one(u, with_states(u, entry))[0] == "intune_licensed"


@pytest.mark.parametrize(
    "entry",
    [
        state(INTUNE_SKU, "Disabled"),
        state(INTUNE_SKU, "Error", "CountViolation"),
        state(INTUNE_SKU, None, None),
        state(E3_SKU, "Active"),  # INTUNE_O365 is not an Intune plan
        state(EMS_SKU, "Active", disabled=[INTUNE_A.id]),
        state(EDU_SKU, "Active", disabled=[INTUNE_A.id, INTUNE_EDU.id]),
        state(UNKNOWN_SKU, "Active"),  # not in subscribedSkus
    ],
    ids=["disabled", "error", "null-state", "e3", "ems-intune-off", "edu-both-off", "unknown-sku"],
)
def test_licence_state_that_does_not_grant_intune(entry):
    u = ad_user("eve")
    assert one(u, with_states(u, entry))[0] == "entra_synced"


def test_users_without_licence_states_are_judged_by_assigned_licences():
    u, v, w = ad_user("fay"), ad_user("gil"), ad_user("hal")
    evaluation = cloud(
        [u, v, w],
        [
            with_assigned(u, AssignedLicense(EMS_SKU)),
            with_assigned(v, AssignedLicense(E3_SKU)),
            with_assigned(w, AssignedLicense(EMS_SKU, (INTUNE_A.id,))),
        ],
    )
    assert placed(evaluation, "fay")[0] == "intune_licensed"
    assert placed(evaluation, "gil") == ("entra_synced", "no_intune_license")
    assert placed(evaluation, "hal") == ("entra_synced", "intune_plan_disabled")


def test_licence_states_when_present_win_over_assigned_licences():
    """Reading: "when Graph returns no states" is decided per user. A user with states is judged by
    them only, even if assignedLicenses lists a granting SKU (e.g. the state is still in Error)."""
    u = ad_user("ian")
    user = licensed(
        entra_for(u), assigned=[AssignedLicense(INTUNE_SKU)], states=[state(INTUNE_SKU, "Error", "Other")]
    )
    assert one(u, user) == ("entra_synced", "license_error_other")


@pytest.mark.parametrize(
    "org",
    [None, organization(skus=())],
    ids=["no-organization-data", "no-skus"],
)
def test_without_subscribed_skus_nobody_is_licensed(org):
    """Without subscribedSkus no SKU can be shown to carry an Intune plan: no licence grants Intune
    and no licence-error reason holds (they need data never read), so the reason is the last row."""
    u = ad_user("jan")
    user = with_states(u, state(INTUNE_SKU, "Active"), state(INTUNE_SKU, "Error", "CountViolation"))
    assert one(u, user, org=org) == ("entra_synced", "no_intune_license")


def test_intune_service_plans_is_configurable():
    u, v = ad_user("kay"), ad_user("lee")
    users = [with_states(u, state(EMS_SKU)), with_states(v, state(EDU_SKU))]
    evaluation = cloud([u, v], users, plans=("INTUNE_EDU",))
    assert placed(evaluation, "kay") == ("entra_synced", "no_intune_license")
    assert placed(evaluation, "lee")[0] == "intune_licensed"


# =============================================================================== stages 4 and 5
def test_a_device_of_the_user_is_device_enrolled():
    u = ad_user("max")
    user = with_states(u, state())
    assert one(u, user, [device_for(user, compliance="unknown", last_sync=FRESH)])[0] == "device_enrolled"


def test_device_user_id_compares_ignoring_case():
    u = ad_user("ned")
    user = with_states(u, state())
    assert one(u, user, [device_for(user.id.upper(), last_sync=FRESH)]) == ("device_compliant", None)


def test_devices_of_other_users_or_of_nobody_do_not_count():
    u, other = ad_user("oli"), ad_user("oli-other")
    user = with_states(u, state())
    theirs = with_states(other, state())
    device_list = [device_for(theirs, last_sync=FRESH), device_for(None, last_sync=FRESH)]
    evaluation = cloud([u], [user, theirs], device_list)
    assert placed(evaluation, "oli") == ("intune_licensed", "device_enrollment_pending")


@pytest.mark.parametrize(
    ("compliance", "last_sync", "expected"),
    [
        ("compliant", FRESH, "device_compliant"),
        ("compliant", NOW - STALE, "device_compliant"),  # "within": exactly the limit still counts
        ("compliant", NOW - STALE - 1, "device_enrolled"),
        ("compliant", None, "device_enrolled"),  # never synced: not within the limit
        ("configManager", FRESH, "device_enrolled"),  # not in the default compliant_states
        ("noncompliant", FRESH, "device_enrolled"),
    ],
)
def test_device_compliant_needs_a_compliant_state_and_a_recent_sync(compliance, last_sync, expected):
    u = ad_user("pam")
    user = with_states(u, state())
    assert one(u, user, [device_for(user, compliance=compliance, last_sync=last_sync)])[0] == expected


def test_compliant_states_is_configurable():
    u = ad_user("quy")
    user = with_states(u, state())
    co_managed = device_for(user, compliance="configManager", last_sync=FRESH)
    settings = {"compliant_states": ("compliant", "configManager")}
    assert one(u, user, [co_managed], **settings) == ("device_compliant", None)


def test_device_stale_after_is_configurable():
    u = ad_user("ray")
    user = with_states(u, state())
    device = device_for(user, last_sync=NOW - 2 * DAY)
    assert one(u, user, [device], device_stale_after=DAY) == ("device_enrolled", "device_stale")
    assert one(u, user, [device], device_stale_after=3 * DAY) == ("device_compliant", None)


def test_one_compliant_device_is_enough():
    u = ad_user("sue")
    user = with_states(u, state())
    device_list = [
        device_for(user, compliance="noncompliant", last_sync=FRESH),
        device_for(user, compliance="compliant", last_sync=FRESH),
    ]
    assert one(u, user, device_list) == ("device_compliant", None)


def test_a_compliant_device_without_licence_stays_at_entra_synced():
    u = ad_user("tim")
    user = entra_for(u)
    assert one(u, user, [device_for(user, last_sync=FRESH)]) == ("entra_synced", "no_intune_license")


# =============================================================================== time in stage
def test_licensed_since_the_earliest_granting_entry():
    u = ad_user("uli")
    user = with_states(
        u,
        state(INTUNE_SKU, updated=NOW - 3 * DAY),
        state(EMS_SKU, "ActiveWithError", "CountViolation", updated=NOW - 8 * DAY),
        state(E3_SKU, updated=NOW - 50 * DAY),  # not granting: does not count
        state(INTUNE_SKU, "Disabled", updated=NOW - 60 * DAY),  # not active: does not count
    )
    evaluation = cloud([u], [user])
    assert evaluation.entered[0] == NOW - 8 * DAY
    assert evaluation.summary(NOW).stuck["intune_licensed"] == 1  # 8 days > 7 days


def test_licensed_without_a_timestamp_uses_first_seen():
    u, v = ad_user("val"), ad_user("wil")
    users = [with_states(u, state(updated=None)), with_assigned(v, AssignedLicense(INTUNE_SKU))]
    first = cloud([u, v], users)
    assert list(first.entered) == [NOW, NOW]
    later = cloud([u, v], users, now=NOW + 8 * DAY, first_seen=first.first_seen)
    assert list(later.entered) == [NOW, NOW]
    assert later.summary(NOW + 8 * DAY).stuck["intune_licensed"] == 2


def test_enrolled_since_the_earliest_enrolment_of_any_device():
    u = ad_user("xav")
    user = with_states(u, state())
    device_list = [
        device_for(user, compliance="unknown", enrolled=NOW - HOUR, last_sync=FRESH),
        device_for(user, compliance="unknown", enrolled=NOW - 2 * DAY, last_sync=NOW - 40 * DAY),
        device_for(user, compliance="unknown", enrolled=None, last_sync=FRESH),
    ]
    evaluation = cloud([u], [user], device_list)
    assert evaluation.entered[0] == NOW - 2 * DAY
    assert evaluation.summary(NOW).stuck["device_enrolled"] == 1


def test_enrolled_without_dates_uses_first_seen():
    u = ad_user("yan")
    user = with_states(u, state())
    device_list = [device_for(user, compliance="unknown", enrolled=None, last_sync=FRESH)]
    first = cloud([u], [user], device_list)
    assert first.entered[0] == NOW
    later = cloud([u], [user], device_list, now=NOW + 2 * DAY, first_seen=first.first_seen)
    assert later.summary(NOW + 2 * DAY).stuck["device_enrolled"] == 1


def test_identity_stages_use_when_created_and_entra_created():
    u = ad_user("zed", when_created=NOW - 3 * HOUR)
    v = ad_user("zoe")
    evaluation = cloud([u, v], [entra_for(v, created=NOW - 2 * HOUR)])
    assert evaluation.entered[row_of(evaluation, "zed")] == NOW - 3 * HOUR
    assert evaluation.entered[row_of(evaluation, "zoe")] == NOW - 2 * HOUR
    summary = evaluation.summary(NOW)
    assert summary.stuck == {
        "ad_created": 1,
        "entra_synced": 1,
        "intune_licensed": 0,
        "device_enrolled": 0,
        "device_compliant": 0,
    }


def test_compliant_users_are_never_stuck_and_every_stage_and_pair_is_present():
    u = ad_user("abe", when_created=0.0)
    user = with_states(u, state(updated=0.0))
    summary = cloud([u], [user], [device_for(user, enrolled=0.0, last_sync=FRESH)]).summary(NOW)
    assert summary.users == {**dict.fromkeys(STAGES, 0), "device_compliant": 1}
    assert summary.stuck == dict.fromkeys(STAGES, 0)
    assert summary.stuck_reasons == dict.fromkeys(CLOUD.stage_reason_pairs(), 0)


def test_first_seen_of_the_hybrid_pipeline_is_not_carried_over():
    u = ad_user("bea")
    user = with_assigned(u, AssignedLicense(INTUNE_SKU))
    first = cloud([u], [user])
    foreign = dataclasses.replace(first.first_seen, pipeline="hybrid_mdm")
    later = cloud([u], [user], now=NOW + DAY, first_seen=foreign)
    assert later.entered[0] == NOW + DAY


# =============================================================================== reasons: entra_synced
@pytest.mark.parametrize(
    ("entries", "usage_location", "reason"),
    [
        ([state(INTUNE_SKU, "Error", "CountViolation")], "DE", "license_count_violation"),
        (
            [state(EMS_SKU, "Error", "ProhibitedInUsageLocationViolation")],
            "DE",
            "license_usage_location_missing",
        ),
        ([state(INTUNE_SKU, "Error", "None")], None, "license_usage_location_missing"),
        ([state(INTUNE_SKU, "Disabled", "None")], None, "license_usage_location_missing"),
        ([state(INTUNE_SKU, "Error", "MutuallyExclusiveViolation")], "DE", "license_conflict"),
        ([state(INTUNE_SKU, "Error", "DependencyViolation")], "DE", "license_conflict"),
        ([state(INTUNE_SKU, "Error", "UniquenessViolation")], "DE", "license_error_other"),
        ([state(INTUNE_SKU, "Error", "Other")], "DE", "license_error_other"),
        ([state(EMS_SKU, "Active", disabled=[INTUNE_A.id])], "DE", "intune_plan_disabled"),
        ([state(EDU_SKU, "Active", disabled=[INTUNE_A.id, INTUNE_EDU.id])], "DE", "intune_plan_disabled"),
        ([state(INTUNE_SKU, "Error", "None")], "DE", "no_intune_license"),  # no error, location set
        ([state(E3_SKU, "Error", "CountViolation")], "DE", "no_intune_license"),  # not an Intune SKU
        ([state(E3_SKU, "Error", "None")], None, "no_intune_license"),
        ([state(UNKNOWN_SKU, "Error", "CountViolation")], "DE", "no_intune_license"),
        ([], None, "no_intune_license"),
    ],
)
def test_entra_synced_reasons(entries, usage_location, reason):
    u = ad_user("cid")
    assert one(u, with_states(u, *entries, usage_location=usage_location)) == ("entra_synced", reason)


def test_an_error_on_an_intune_sku_whose_plan_is_disabled_still_counts():
    """Reading: "an Intune-granting SKU" in the licence-error rows is a SKU that HAS an Intune plan
    (the entry failed, so whether it would grant is moot), not only one whose plan is enabled."""
    u = ad_user("dee")
    entry = state(EMS_SKU, "Error", "CountViolation", disabled=[INTUNE_A.id])
    assert one(u, with_states(u, entry)) == ("entra_synced", "license_count_violation")


def test_null_state_with_null_usage_location_is_usage_location_missing():
    """Reading: an entry whose state is null has "a state other than Active/ActiveWithError"."""
    u = ad_user("del")
    assert one(u, with_states(u, state(INTUNE_SKU, None, None), usage_location=None)) == (
        "entra_synced",
        "license_usage_location_missing",
    )


@pytest.mark.parametrize(
    ("entries", "usage_location", "reason"),
    [
        (
            [
                state(INTUNE_SKU, "Error", "ProhibitedInUsageLocationViolation"),
                state(EMS_SKU, "Error", "CountViolation"),
            ],
            "DE",
            "license_count_violation",
        ),
        (
            [
                state(INTUNE_SKU, "Error", "MutuallyExclusiveViolation"),
                state(EMS_SKU, "Error", "ProhibitedInUsageLocationViolation"),
            ],
            "DE",
            "license_usage_location_missing",
        ),
        ([state(INTUNE_SKU, "Error", "DependencyViolation")], None, "license_usage_location_missing"),
        (
            [state(INTUNE_SKU, "Error", "Other"), state(EMS_SKU, "Error", "DependencyViolation")],
            "DE",
            "license_conflict",
        ),
        (
            [state(INTUNE_SKU, "Error", "Other"), state(EMS_SKU, "Active", disabled=[INTUNE_A.id])],
            "DE",
            "license_error_other",
        ),
    ],
    ids=[
        "count-over-location",
        "location-over-conflict",
        "null-location-over-conflict",
        "conflict-over-other",
        "other-over-plan-disabled",
    ],
)
def test_entra_synced_reasons_are_taken_in_table_order(entries, usage_location, reason):
    u = ad_user("eli")
    assert one(u, with_states(u, *entries, usage_location=usage_location)) == ("entra_synced", reason)


def test_plan_disabled_is_judged_from_assigned_licences_without_states():
    u = ad_user("fox")
    user = with_assigned(u, AssignedLicense(E3_SKU), AssignedLicense(EMS_SKU, (INTUNE_A.id, AAD_PREMIUM.id)))
    assert one(u, user) == ("entra_synced", "intune_plan_disabled")


# =============================================================================== reasons: later stages
def test_reason_entra_account_disabled():
    u = ad_user("gem")
    assert one(u, with_states(u, state(), account_enabled=False)) == (
        "intune_licensed",
        "entra_account_disabled",
    )


@pytest.mark.parametrize("enabled", [True, None])
def test_reason_device_enrollment_pending_otherwise(enabled):
    u = ad_user("hut")
    assert one(u, with_states(u, state(), account_enabled=enabled)) == (
        "intune_licensed",
        "device_enrollment_pending",
    )


@pytest.mark.parametrize(
    ("device_states", "reason"),
    [
        ([("compliant", NOW - 40 * DAY)], "device_stale"),
        ([("noncompliant", NOW - 40 * DAY), ("unknown", None)], "device_stale"),  # null: never synced
        ([("noncompliant", FRESH)], "device_noncompliant"),
        ([("noncompliant", NOW - 40 * DAY), ("unknown", FRESH)], "device_noncompliant"),
        ([("inGracePeriod", FRESH)], "device_in_grace_period"),
        ([("inGracePeriod", FRESH), ("noncompliant", FRESH)], "device_noncompliant"),
        ([("unknown", FRESH)], "device_compliance_unknown"),
        ([("conflict", FRESH)], "device_compliance_unknown"),
        ([("error", FRESH)], "device_compliance_unknown"),
        ([("configManager", FRESH)], "device_compliance_unknown"),
        ([(None, FRESH)], "device_compliance_unknown"),
        ([("compliant", NOW - 40 * DAY), ("unknown", FRESH)], "device_compliance_unknown"),
    ],
)
def test_device_enrolled_reasons(device_states, reason):
    """Reading: a device whose lastSyncDateTime is null never synced, which is older than any limit
    (Graph shows such devices with 0001-01-01): it counts as stale."""
    u = ad_user("ida")
    user = with_states(u, state())
    device_list = [device_for(user, compliance=c, last_sync=s) for c, s in device_states]
    assert one(u, user, device_list) == ("device_enrolled", reason)


def test_identity_reasons_are_the_hybrid_ones():
    u = ad_user("jon", when_created=NOW - HOUR)
    assert one(u, org=organization(last_sync=NOW - 2 * HOUR)) == ("ad_created", "entra_sync_pending")
    blocker = cloud_only(upn=None, sid=u.object_sid)
    assert one(u, blocker, org=organization(last_sync=NOW - 2 * HOUR)) == (
        "ad_created",
        "entra_cloud_user_conflict",
    )
    assert one(u, org=None) == ("ad_created", "entra_not_synced")


# =============================================================================== side figures
def test_orphans_are_synced_entra_users_without_an_ad_user():
    u = ad_user("kit")
    evaluation = cloud([u], [entra_for(u), entra_for(ad_user("gone")), cloud_only(upn="c@contoso.com")])
    assert evaluation.side["orphans"] == {"entra": 1}


def test_licence_errors_count_users_per_sku_error_and_group():
    """Every Entra user counts (cloud-only too), once per (sku, error, assigning group)."""
    group = "aaaaaaaa-0000-4000-8000-000000000001"
    a, b = ad_user("la"), ad_user("lb")
    users = [
        with_states(
            a,
            state(INTUNE_SKU, "Error", "CountViolation", group=group),
            state(INTUNE_SKU, "Error", "CountViolation", group=group),
        ),
        with_states(b, state(INTUNE_SKU, "Error", "CountViolation"), state(E3_SKU, "Active")),
        licensed(
            cloud_only(upn="c@contoso.com"),
            states=[state(INTUNE_SKU, "Error", "CountViolation", group=group)],
        ),
    ]
    assert licence_errors(entra(*users)) == {
        (INTUNE_SKU, "CountViolation", group): 2,
        (INTUNE_SKU, "CountViolation", None): 1,
    }


# =============================================================================== random estates
@dataclass
class Expected:
    stage: str
    reason: str | None
    entered: float


ACTIVE = ("Active", "ActiveWithError")


def contract_cloud(
    users: Sequence[AdUser],
    entra_users: Sequence[EntraUser],
    device_list: Sequence[ManagedDevice],
    org: OrganizationData | None,
    now: float,
    first_seen_at: float,
    plans: Sequence[str] = ("INTUNE_A", "INTUNE_EDU", "INTUNE_SMBIZ", "INTUNE_A_VL"),
    compliant_states: Sequence[str] = ("compliant",),
    stale_after: float = STALE,
) -> dict[str, Expected]:
    """The cloud tables of the contract read literally, one user at a time."""
    synced = [e for e in entra_users if e.on_premises_sync_enabled is True]
    not_synced = [e for e in entra_users if e.on_premises_sync_enabled is not True]
    skus = {s.sku_id: s for s in org.skus} if org else {}

    def intune_plans(sku_id: str) -> set[str]:
        sku = skus.get(sku_id)
        return {p.id for p in sku.service_plans if p.name in plans} if sku else set()

    def grants(sku_id: str, disabled: Sequence[str]) -> bool:
        return bool(intune_plans(sku_id) - set(disabled))

    def fresh(d: ManagedDevice) -> bool:
        return d.last_sync is not None and now - d.last_sync <= stale_after

    result = {}
    for u in users:
        imm = base64.b64encode(u.source_anchor).decode()
        sid = u.object_sid.upper()
        by_imm = sorted(
            (x for x in synced if x.on_premises_immutable_id == imm), key=lambda x: uuid.UUID(x.id)
        )
        by_sid = sorted(
            (x for x in synced if (x.on_premises_security_identifier or "").upper() == sid),
            key=lambda x: uuid.UUID(x.id),
        )
        e = (by_imm or by_sid or [None])[0]
        states = list(e.license_states) if e else []
        granting_states = [s for s in states if s.state in ACTIVE and grants(s.sku_id, s.disabled_plans)]
        if states:
            is_licensed = bool(granting_states)
        else:
            is_licensed = e is not None and any(
                grants(a.sku_id, a.disabled_plans) for a in e.assigned_licenses
            )
        mine = [d for d in device_list if e and d.user_id and uuid.UUID(d.user_id) == uuid.UUID(e.id)]
        compliant = any(d.compliance_state in compliant_states and fresh(d) for d in mine)
        conditions = [e is not None, is_licensed, bool(mine), compliant]
        index = 0
        while index < 4 and conditions[index]:
            index += 1
        stage = STAGES[index]
        reason: str | None = None
        if stage == "ad_created":
            upn = (u.user_principal_name or "").casefold()
            if any(
                x.on_premises_immutable_id == imm
                or (x.on_premises_security_identifier or "").upper() == sid
                or (upn and (x.user_principal_name or "").casefold() == upn)
                for x in not_synced
            ):
                reason = "entra_cloud_user_conflict"
            elif (
                org
                and org.last_sync is not None
                and u.when_created is not None
                and org.last_sync < u.when_created
            ):
                reason = "entra_sync_pending"
            else:
                reason = "entra_not_synced"
        elif stage == "entra_synced":
            assert e is not None
            intune_entries = [s for s in states if intune_plans(s.sku_id)]
            errors = {s.error for s in intune_entries}
            assigned = [(s.sku_id, s.disabled_plans) for s in states] + [
                (a.sku_id, a.disabled_plans) for a in e.assigned_licenses
            ]
            if "CountViolation" in errors:
                reason = "license_count_violation"
            elif "ProhibitedInUsageLocationViolation" in errors or (
                e.usage_location is None and any(s.state not in ACTIVE for s in intune_entries)
            ):
                reason = "license_usage_location_missing"
            elif errors & {"MutuallyExclusiveViolation", "DependencyViolation"}:
                reason = "license_conflict"
            elif errors - {None, "None"}:
                reason = "license_error_other"
            elif any(intune_plans(sku) and intune_plans(sku) <= set(off) for sku, off in assigned):
                reason = "intune_plan_disabled"
            else:
                reason = "no_intune_license"
        elif stage == "intune_licensed":
            assert e is not None
            reason = "entra_account_disabled" if e.account_enabled is False else "device_enrollment_pending"
        elif stage == "device_enrolled":
            if all(not fresh(d) for d in mine):
                reason = "device_stale"
            elif any(d.compliance_state == "noncompliant" for d in mine):
                reason = "device_noncompliant"
            elif any(d.compliance_state == "inGracePeriod" for d in mine):
                reason = "device_in_grace_period"
            else:
                reason = "device_compliance_unknown"
        updated = [s.last_updated for s in granting_states if s.last_updated is not None]
        enrolled = [d.enrolled for d in mine if d.enrolled is not None]
        evidence = {
            "ad_created": u.when_created,
            "entra_synced": e.created if e else None,
            "intune_licensed": min(updated) if updated else None,
            "device_enrolled": min(enrolled) if enrolled else None,
        }.get(stage)
        result[u.sam_account_name] = Expected(stage, reason, first_seen_at if evidence is None else evidence)
    return result


STATE_VALUES = ("Active", "ActiveWithError", "Disabled", "Error", None)
ERROR_VALUES = (
    "None",
    "None",
    "CountViolation",
    "MutuallyExclusiveViolation",
    "DependencyViolation",
    "ProhibitedInUsageLocationViolation",
    "UniquenessViolation",
    "Other",
    None,
)
ALL_PLANS = (INTUNE_A.id, INTUNE_EDU.id, AAD_PREMIUM.id)
COMPLIANCE = ("compliant", "noncompliant", "inGracePeriod", "unknown", "conflict", "error", "configManager")


def _random_guid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def random_cloud_estate(rng: random.Random):
    count = rng.randint(0, 6)
    users = [
        ad_user(
            f"c{i}",
            when_created=rng.choice([None, NOW - rng.choice([1, 3]) * HOUR]),
            upn=rng.choice(["", None]),
            rid=7000 + i,
        )
        for i in range(count)
    ]
    sku_ids = (INTUNE_SKU, EMS_SKU, E3_SKU, EDU_SKU, UNKNOWN_SKU)
    entra_users: list[EntraUser] = []
    for u in users:
        for _ in range(rng.choice([0, 1, 1, 1, 2])):
            kind = rng.choice(["imm", "imm", "sid", "cloud"])
            if kind == "cloud":
                base = cloud_only(
                    upn=u.user_principal_name if rng.random() < 0.5 else None,
                    immutable_id=immutable_id(u.source_anchor) if rng.random() < 0.5 else None,
                    object_id=_random_guid(rng),
                    sync_enabled=rng.choice([False, None]),
                )
            else:
                base = entra_for(
                    u,
                    by="immutable_id" if kind == "imm" else "sid",
                    created=rng.choice([None, NOW - rng.choice([0.5, 2]) * HOUR]),
                    object_id=_random_guid(rng),
                    account_enabled=rng.choice([True, True, False, None]),
                )
            states = [
                LicenseState(
                    rng.choice(sku_ids),
                    rng.choice(STATE_VALUES),
                    rng.choice(ERROR_VALUES),
                    rng.choice([None, "aaaaaaaa-0000-4000-8000-000000000001"]),
                    tuple(p for p in ALL_PLANS if rng.random() < 0.3),
                    rng.choice([None, NOW - rng.choice([1, 10]) * DAY]),
                )
                for _ in range(rng.choice([0, 0, 1, 1, 2, 3]))
            ]
            assigned = [
                AssignedLicense(rng.choice(sku_ids), tuple(p for p in ALL_PLANS if rng.random() < 0.3))
                for _ in range(rng.choice([0, 1, 1, 2]))
            ]
            entra_users.append(
                licensed(base, assigned=assigned, states=states, usage_location=rng.choice(["DE", None]))
            )
    device_list = []
    for owner in entra_users:
        for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
            device_list.append(
                device_for(
                    owner.id.upper() if rng.random() < 0.3 else owner.id,
                    compliance=rng.choice([*COMPLIANCE, "compliant", "inGracePeriod", None]),
                    last_sync=rng.choice([None, FRESH, FRESH, NOW - STALE, NOW - 40 * DAY]),
                    enrolled=rng.choice([None, NOW - rng.choice([0.5, 2]) * DAY]),
                    device_id=_random_guid(rng),
                )
            )
    device_list += [device_for(rng.choice([None, _random_guid(rng)])) for _ in range(rng.randint(0, 2))]
    skus = rng.choice([DEFAULT_SKUS, DEFAULT_SKUS, DEFAULT_SKUS[:2], ()])
    org = rng.choice([None, organization(last_sync=rng.choice([None, NOW - 2 * HOUR]), skus=skus)])
    rng.shuffle(entra_users)
    rng.shuffle(device_list)
    return users, entra_users, device_list, org


def check_against_contract(evaluation: Evaluation, expected: dict[str, Expected], now: float) -> None:
    table = evaluation.ad
    for row in range(table.n):
        sam = table.text("sam", row)
        got = (evaluation.stage_name(row), evaluation.reason_name(row), float(evaluation.entered[row]))
        assert got == (expected[sam].stage, expected[sam].reason, expected[sam].entered), sam
    summary = evaluation.summary(now)
    stuck_after = evaluation.settings.stuck_after
    for stage in STAGES:
        at_stage = [x for x in expected.values() if x.stage == stage]
        stuck = [x for x in at_stage if now - x.entered > stuck_after.get(stage, float("inf"))]
        assert (summary.users[stage], summary.stuck[stage]) == (len(at_stage), len(stuck)), stage
        for reason in CLOUD.reasons_of(stage):
            count = sum(1 for x in stuck if x.reason == reason.name)
            assert summary.stuck_reasons[(stage, reason.name)] == count, (stage, reason.name)
        assert (
            sum(summary.stuck_reasons[(stage, r.name)] for r in CLOUD.reasons_of(stage))
            == summary.stuck[stage]
        )
    assert set(summary.stuck_reasons) == set(CLOUD.stage_reason_pairs())


@pytest.mark.parametrize("seed", range(300))
def test_random_estates_follow_the_contract(seed):
    rng = random.Random(seed)
    users, entra_users, device_list, org = random_cloud_estate(rng)
    first = cloud(users, entra_users, device_list, org=org)
    check_against_contract(first, contract_cloud(users, entra_users, device_list, org, NOW, NOW), NOW)
    later = NOW + rng.choice([0.5, 2, 8]) * DAY
    second = cloud(users, entra_users, device_list, org=org, now=later, first_seen=first.first_seen)
    # Devices age with the clock: evaluate the contract again at the later moment. A user whose
    # stage changed with the clock is first seen at the later moment.
    expected = contract_cloud(users, entra_users, device_list, org, later, later)
    before = contract_cloud(users, entra_users, device_list, org, NOW, NOW)
    for sam, item in expected.items():
        if before[sam].stage == item.stage and item.entered == later:
            item.entered = NOW
    check_against_contract(second, expected, later)


def test_random_estates_reach_every_stage_and_reason():
    seen: set[tuple[str, str | None]] = set()
    for seed in range(300):
        users, entra_users, device_list, org = random_cloud_estate(random.Random(seed))
        evaluation = cloud(users, entra_users, device_list, org=org)
        seen |= {(evaluation.stage_name(r), evaluation.reason_name(r)) for r in range(evaluation.ad.n)}
    assert set(CLOUD.stage_reason_pairs()) | {("device_compliant", None)} <= seen


def test_skus_are_matched_by_id_not_position():
    """A second organization read that lists the SKUs in another order changes nothing."""
    u = ad_user("mo")
    user = with_states(u, state(EMS_SKU))
    reordered = organization(skus=tuple(reversed(DEFAULT_SKUS)))
    assert one(u, user, org=reordered)[0] == "intune_licensed"
    only_other = organization(skus=(subscribed_sku(EMS_SKU, "EMS", (AAD_PREMIUM,)),))
    assert one(u, user, org=only_other) == ("entra_synced", "no_intune_license")
