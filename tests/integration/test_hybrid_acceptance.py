"""Acceptance (issue 11): every in-scope user of two hybrid_mdm estates on the real backends gets the
stage and reason of CONTRACT.md's tables in /metrics, /stuck and /trace.

The estates and their ground truth are in :mod:`tests.integration.hybrid_estate`; the exporter run
is the session fixture ``hybrid_run`` (conftest.py). Every threshold is 0s, so every user short of
``intune_enabled`` is stuck: stages with evidence from the backends (whenCreated, Entra
createdDateTime, Creation_Date0) and stages timed from first sight alike.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.entra import tenant_data
from tests.integration import hybrid_estate as he
from tests.integration.conftest import WEB_PASSWORD, HybridRun
from tests.integration.harness import epoch, series, value

SOURCES = ("ad", "entra", "entra_organization", "configmgr")


def _stage_values(samples: Any, estate: str, name: str) -> dict[str, float | None]:
    return {stage: value(samples, name, estate, provisioning_stage=stage) for stage in he.HYBRID_STAGES}


@pytest.mark.parametrize("spec", he.ESTATES, ids=lambda s: s.name)
def test_sources_are_up_with_the_expected_records(hybrid_run: HybridRun, spec: he.EstateSpec) -> None:
    samples, tail = hybrid_run.samples, hybrid_run.log[-3000:]
    for source in SOURCES:
        assert value(samples, "intune_exporter_source_up", spec.name, source=source) == 1, (source, tail)
    records = {
        source: value(samples, "intune_exporter_source_records", spec.name, source=source)
        for source in he.EXPECTED_RECORDS[spec.name]
    }
    assert records == he.EXPECTED_RECORDS[spec.name]


@pytest.mark.parametrize("spec", he.ESTATES, ids=lambda s: s.name)
def test_users_and_stuck_users_per_stage(hybrid_run: HybridRun, spec: he.EstateSpec) -> None:
    samples = hybrid_run.samples
    users = he.expected_users(spec)
    assert _stage_values(samples, spec.name, "intune_provisioning_users") == users
    # Every stage value is always present; intune_enabled is never stuck.
    stuck = {stage: (0 if stage == "intune_enabled" else n) for stage, n in users.items()}
    assert _stage_values(samples, spec.name, "intune_provisioning_stuck_users") == stuck


@pytest.mark.parametrize("spec", he.ESTATES, ids=lambda s: s.name)
def test_oldest_entry_per_stage_comes_from_the_evidence(hybrid_run: HybridRun, spec: he.EstateSpec) -> None:
    built = hybrid_run.backends.estates[spec.name]
    at_stage = {stage: [s for s in spec.in_scope() if s.stage == stage] for stage in he.HYBRID_STAGES}
    expected = {
        "ad_created": min(built.accounts[s.sam].when_created for s in at_stage["ad_created"]).timestamp(),
        "entra_synced": min(epoch(s.entra_created) for s in at_stage["entra_synced"]),
        "cm_discovered": built.discovered.timestamp(),
    }
    found = {
        stage: value(
            hybrid_run.samples,
            "intune_provisioning_stage_oldest_entry_timestamp_seconds",
            spec.name,
            provisioning_stage=stage,
        )
        for stage in expected
    }
    assert found == expected


@pytest.mark.parametrize("spec", he.ESTATES, ids=lambda s: s.name)
def test_stuck_reason_users_has_every_pair_and_sums_to_stuck_users(
    hybrid_run: HybridRun, spec: he.EstateSpec
) -> None:
    samples = hybrid_run.samples
    found = {
        (dict(labels)["provisioning_stage"], dict(labels)["reason"]): v
        for labels, v in series(samples, "intune_provisioning_stuck_reason_users", spec.name).items()
    }
    assert found == he.expected_reasons(spec)
    for stage in he.HYBRID_STAGES[:-1]:
        per_stage = sum(v for (s, _), v in found.items() if s == stage)
        assert per_stage == value(
            samples, "intune_provisioning_stuck_users", spec.name, provisioning_stage=stage
        )


@pytest.mark.parametrize("spec", he.ESTATES, ids=lambda s: s.name)
def test_stuck_user_info_names_every_stuck_user_with_its_reason(
    hybrid_run: HybridRun, spec: he.EstateSpec
) -> None:
    found = sorted(
        (d["provisioning_stage"], d["user"], d.get("reason"))
        for labels in series(hybrid_run.samples, "intune_provisioning_stuck_user_info", spec.name)
        for d in [dict(labels)]
    )
    expected = sorted((s.stage, s.sam, s.reason) for s in spec.in_scope() if s.reason is not None)
    assert found == expected


@pytest.mark.parametrize("spec", he.ESTATES, ids=lambda s: s.name)
def test_side_metrics_of_the_estate(hybrid_run: HybridRun, spec: he.EstateSpec) -> None:
    samples, name = hybrid_run.samples, spec.name
    orphans = {
        s: value(samples, "intune_provisioning_orphan_users", name, source=s) for s in ("entra", "configmgr")
    }
    assert orphans == he.EXPECTED_ORPHANS[name]
    missing = {
        m: value(samples, "intune_provisioning_users_missing_cloud_user_id", name, in_intune_collection=m)
        for m in ("true", "false")
    }
    assert missing == he.EXPECTED_MISSING_CLOUD_USER_ID[name]
    assert (
        value(samples, "intune_provisioning_cloud_user_id_mismatch_users", name) == he.EXPECTED_MISMATCH[name]
    )
    components = {
        dict(labels)["component"]: v
        for labels, v in series(samples, "intune_configmgr_component_status", name).items()
        if dict(labels)["site_code"] == spec.site_code
    }
    assert components == spec.component_status
    last_sync = value(samples, "intune_entra_connect_last_sync_timestamp_seconds", name)
    assert last_sync == hybrid_run.backends.estates[name].organization_last_sync.timestamp()


# ------------------------------------------------------------------------------ /stuck
def _stuck_estate(run: HybridRun, name: str) -> dict[str, Any]:
    return next(e for e in run.stuck["estates"] if e["estate"] == name)


@pytest.mark.parametrize("spec", he.ESTATES, ids=lambda s: s.name)
def test_stuck_endpoint_gives_every_stuck_user_its_reason_detail_and_action(
    hybrid_run: HybridRun, spec: he.EstateSpec
) -> None:
    estate = _stuck_estate(hybrid_run, spec.name)
    assert estate["available"] is True
    listed = {
        (stage, user["user"], user["reason"])
        for stage, item in estate["stages"].items()
        for user in item["users"]
    }
    assert listed == {(s.stage, s.sam, s.reason) for s in spec.in_scope() if s.reason is not None}
    for stage, item in estate["stages"].items():
        assert item["count"] == len(item["users"]), stage
        for user in item["users"]:
            assert user["detail"] and user["detail"].strip(), user
            assert user["action"] and user["action"].strip(), user


@pytest.mark.parametrize("spec", he.ESTATES, ids=lambda s: s.name)
def test_time_in_stage_comes_from_each_systems_evidence(hybrid_run: HybridRun, spec: he.EstateSpec) -> None:
    built = hybrid_run.backends.estates[spec.name]
    estate = _stuck_estate(hybrid_run, spec.name)
    entered = {u["user"]: u["entered_stage_at"] for item in estate["stages"].values() for u in item["users"]}
    for scenario in spec.in_scope():
        if scenario.reason is None:
            continue
        at = epoch(entered[scenario.sam])
        if scenario.stage == "ad_created":
            assert at == built.accounts[scenario.sam].when_created.timestamp(), scenario.sam
        elif scenario.stage == "entra_synced":
            assert at == epoch(scenario.entra_created), scenario.sam
        elif scenario.stage == "cm_discovered":
            assert at == built.discovered.timestamp(), scenario.sam
        else:  # no evidence: the time the exporter first saw the user at this stage
            assert hybrid_run.started_at - 1 <= at <= epoch(hybrid_run.stuck["generated_at"]) + 1, (
                scenario.sam
            )


def test_detail_names_the_evidence(hybrid_run: HybridRun) -> None:
    """The one-line details name the record, the key and the conflicting value (issue 11)."""
    hq = hybrid_run.backends.estates["hq"]
    details = {
        u["user"]: u["detail"]
        for e in hybrid_run.stuck["estates"]
        for item in e["stages"].values()
        for u in item["users"]
    }
    lower = {sam: text.lower() for sam, text in details.items()}
    assert "h.upnmis@test.onmicrosoft.com" in lower["h.upnmis"] and "h.upnmis@test.local" in lower["h.upnmis"]
    other = hq.entra_ids["h.undisc"]
    assert "h.undisc@test.local" in lower["h.cuid.other"] or other[:8] in lower["h.cuid.other"], details
    assert "h.stale.old" in lower["h.stale"] or "4411" in lower["h.stale"], details["h.stale"]
    assert "h.conf.upn@test.local" in lower["h.conf.upn"], details["h.conf.upn"]


# ------------------------------------------------------------------------------ /trace
def _all_in_scope() -> list[tuple[he.EstateSpec, he.Scenario]]:
    return [(spec, s) for spec in he.ESTATES for s in spec.in_scope()]


@pytest.mark.parametrize(
    ("spec", "scenario"), _all_in_scope(), ids=lambda x: getattr(x, "sam", getattr(x, "name", ""))
)
def test_trace_endpoint_explains_every_in_scope_user(
    hybrid_run: HybridRun, spec: he.EstateSpec, scenario: he.Scenario
) -> None:
    status, document = hybrid_run.traces[scenario.sam]
    assert status == 200, document
    he.check_trace_document(
        document, hybrid_run.backends.estates[spec.name], scenario, stuck=scenario.reason is not None
    )


def test_trace_endpoint_answers_404_for_out_of_scope_and_unknown_users(hybrid_run: HybridRun) -> None:
    for query in ("h.off", "h.away", "TEST\\h.away", "nobody@test.local"):
        status, body = hybrid_run.traces[query]
        assert status == 404, (query, body)
    status, page = hybrid_run.pages["trace-html-unknown"]
    assert status == 404 and "nobody@test.local" in page
    # An estate filter that excludes the user's estate finds nobody.
    assert hybrid_run.pages["trace-estate-filter"][0] == 404


def test_trace_html_page_shows_the_reason(hybrid_run: HybridRun) -> None:
    status, page = hybrid_run.pages["trace-html-stuck"]
    assert status == 200
    assert "upn_mismatch" in page and "h.upnmis" in page


def test_trace_and_stuck_need_the_same_auth_as_metrics(hybrid_run: HybridRun) -> None:
    pages = hybrid_run.pages
    assert pages["metrics-no-auth"][0] == 401
    for label in ("trace-no-auth", "trace-wrong-auth", "trace-unknown-no-auth", "stuck-no-auth"):
        assert pages[label][0] == 401, (label, pages[label])


def test_clean_shutdown_keeps_secrets_out_of_the_log(hybrid_run: HybridRun) -> None:
    assert hybrid_run.exit_code == 0, hybrid_run.log[-3000:]
    assert hybrid_run.state_file.exists()
    for secret in (he.SERVICE_PASSWORD, WEB_PASSWORD, tenant_data.CLIENT_SECRET):
        assert secret not in hybrid_run.log
