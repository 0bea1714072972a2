"""Acceptance (issue 15): a ``cloud`` estate and a ``hybrid_mdm`` estate in ONE exporter process.

``cloudco`` (see :mod:`tests.integration.cloud_estate`) is served by the Graph simulator (users with
licence states and usage locations, groups, subscribedSkus, managed devices) and the session's Samba
DC; ``hq`` is the hybrid estate of the hybrid acceptance test, configured the same way. Every stage
count, every stuck user's reason (metrics, /stuck, /trace, the trace CLI), ``intune_devices`` and
``intune_license_assignment_error_users`` must equal the ground truth written from the contract, and
``hq`` must stay exact next to it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.ad.samba import SambaDC
from tests.integration import cloud_estate as ce
from tests.integration import hybrid_estate as he
from tests.integration.conftest import HybridBackends
from tests.integration.harness import (
    Exporter,
    Samples,
    TraceRun,
    epoch,
    plain_guid,
    run_traces,
    series,
    value,
)

HQ = he.HQ


@dataclass
class CloudRun:
    built: ce.BuiltCloud
    config: Path
    samples: Samples
    stuck: dict[str, Any]
    traces: dict[str, tuple[int, Any]]
    log: str
    exit_code: int
    started_at: float
    cli: dict[str, TraceRun]


@pytest.fixture(scope="module")
def cloud_run(samba_dc: SambaDC, hybrid_backends: HybridBackends) -> CloudRun:
    built = ce.build(samba_dc, hybrid_backends.graph)
    workdir = hybrid_backends.workdir / "cloud"
    workdir.mkdir()
    config = workdir / "config.yml"
    cloud = ce.estate_yaml(
        bind_user=hybrid_backends.bind_user,
        samba_ca=hybrid_backends.samba_ca,
        graph=hybrid_backends.graph,
        secret_file=hybrid_backends.secret_file,
    )
    variant = ce.estate_yaml(
        bind_user=hybrid_backends.bind_user,
        samba_ca=hybrid_backends.samba_ca,
        graph=hybrid_backends.graph,
        secret_file=hybrid_backends.secret_file,
        name=ce.VARIANT,
        settings=ce.VARIANT_SETTINGS,
    )
    config.write_text(
        he.config_yaml(
            [cloud, variant, hybrid_backends.estate_yaml("hq")],
            state_file=workdir / "state.json",
            user_label="upn",
        )
    )
    started_at = time.time()
    exporter = Exporter(config, workdir / "exporter.log", hybrid_backends.env)
    try:
        exporter.wait_ready()
        samples = exporter.wait_evaluated([ce.NAME, ce.VARIANT, HQ.name])
        stuck = exporter.get_json("/stuck")
        traces = {u.sam: exporter.trace(u.sam, estate=ce.NAME) for u in ce.in_scope()}
        traces |= {f"{ce.VARIANT}/{sam}": exporter.trace(sam, estate=ce.VARIANT) for sam in ce.VARIANT_TRUTH}
        traces |= {s.sam: exporter.trace(s.sam) for s in HQ.in_scope()}
        traces |= {"c.off": exporter.trace("c.off"), "both/c.grace": exporter.trace("c.grace")}
    finally:
        exit_code = exporter.stop()
    runs = run_traces(
        [
            (u.sam, "--config.file", str(config), "--estate", ce.NAME, "--format", "json")
            for u in ce.in_scope()
        ]
        + [
            (sam, "--config.file", str(config), "--estate", ce.VARIANT, "--format", "json")
            for sam in ce.VARIANT_TRUTH
        ]
        + [
            ("c.off", "--config.file", str(config)),
            ("c.grace", "--config.file", str(config), "--format", "json"),
        ],
        hybrid_backends.env,
    )
    return CloudRun(
        built,
        config,
        samples,
        stuck,
        traces,
        exporter.log(),
        exit_code,
        started_at,
        {_cli_key(r): r for r in runs},
    )


def _cli_key(run: TraceRun) -> str:
    """``sam`` for cloudco, ``estate/sam`` for the variant, ``all/sam`` without --estate."""
    estate = run.args[run.args.index("--estate") + 1] if "--estate" in run.args else "all"
    return run.args[0] if estate == ce.NAME else f"{estate}/{run.args[0]}"


CLOUD_ESTATES = (ce.NAME, ce.VARIANT)


def _stage_values(
    samples: Samples, estate: str, name: str, stages: tuple[str, ...]
) -> dict[str, float | None]:
    return {stage: value(samples, name, estate, provisioning_stage=stage) for stage in stages}


def _upn(sam: str) -> str:
    return f"{sam}@test.local"


# ------------------------------------------------------------------------------ the cloud estate
def test_every_source_of_both_estates_is_up(cloud_run: CloudRun) -> None:
    samples, tail = cloud_run.samples, cloud_run.log[-3000:]
    for estate, sources in (
        (ce.NAME, ("ad", "entra", "entra_organization", "intune_devices")),
        (ce.VARIANT, ("ad", "entra", "entra_organization", "intune_devices")),
        (HQ.name, ("ad", "entra", "entra_organization", "configmgr")),
    ):
        for source in sources:
            assert value(samples, "intune_exporter_source_up", estate, source=source) == 1, (
                estate,
                source,
                tail,
            )
    assert value(samples, "intune_exporter_source_records", ce.NAME, source="intune_devices") == sum(
        ce.EXPECTED_DEVICES.values()
    )
    assert value(samples, "intune_exporter_source_records", ce.NAME, source="ad") == len(ce.in_scope())


def test_pipeline_info_names_each_estates_chain(cloud_run: CloudRun) -> None:
    assert series(cloud_run.samples, "intune_provisioning_pipeline_info", ce.NAME) == {
        (("pipeline", "cloud"),): 1
    }
    assert series(cloud_run.samples, "intune_provisioning_pipeline_info", HQ.name) == {
        (("pipeline", "hybrid_mdm"),): 1
    }


@pytest.mark.parametrize("estate", CLOUD_ESTATES)
def test_cloud_stage_counts(cloud_run: CloudRun, estate: str) -> None:
    samples = cloud_run.samples
    users = ce.expected_users(estate)
    assert _stage_values(samples, estate, "intune_provisioning_users", ce.CLOUD_STAGES) == users
    stuck = {stage: (0 if stage == "device_compliant" else n) for stage, n in users.items()}
    assert _stage_values(samples, estate, "intune_provisioning_stuck_users", ce.CLOUD_STAGES) == stuck
    # When the longest-waiting user of each stage entered it, from the contract's evidence.
    accounts = cloud_run.built.accounts
    expected_oldest = {
        "ad_created": min(accounts[sam].when_created for sam in ("c.conf.upn", "c.pending")).timestamp(),
        "entra_synced": epoch(ce.ENTRA_CREATED),
        "intune_licensed": epoch("2024-03-01T09:00:00Z"),  # c.blocked's, c.planpart's lastUpdatedDateTime
        "device_enrolled": epoch("2024-06-01T00:00:00Z"),  # the earliest enrolledDateTime
    }
    oldest = "intune_provisioning_stage_oldest_entry_timestamp_seconds"
    found = {stage: value(samples, oldest, estate, provisioning_stage=stage) for stage in expected_oldest}
    assert found == expected_oldest


@pytest.mark.parametrize("estate", CLOUD_ESTATES)
def test_cloud_reasons_every_pair_present_and_summing_to_stuck_users(
    cloud_run: CloudRun, estate: str
) -> None:
    samples = cloud_run.samples
    found = {
        (dict(labels)["provisioning_stage"], dict(labels)["reason"]): v
        for labels, v in series(samples, "intune_provisioning_stuck_reason_users", estate).items()
    }
    assert found == ce.expected_reasons(estate)
    for stage in ce.CLOUD_STAGES[:-1]:
        assert sum(v for (s, _), v in found.items() if s == stage) == value(
            samples, "intune_provisioning_stuck_users", estate, provisioning_stage=stage
        )


@pytest.mark.parametrize("estate", CLOUD_ESTATES)
def test_cloud_stuck_user_info(cloud_run: CloudRun, estate: str) -> None:
    found = sorted(
        (d["provisioning_stage"], d["user"], d.get("reason"))
        for labels in series(cloud_run.samples, "intune_provisioning_stuck_user_info", estate)
        for d in [dict(labels)]
    )
    truths = [(*ce.truth(u, estate), _upn(u.sam)) for u in ce.in_scope()]
    assert found == sorted((stage, upn, reason) for stage, reason, upn in truths if reason is not None)


@pytest.mark.parametrize("estate", CLOUD_ESTATES)
def test_intune_devices_by_os_compliance_and_agent(cloud_run: CloudRun, estate: str) -> None:
    found = {
        (d["operating_system"], d["compliance_state"], d["management_agent"]): v
        for labels, v in series(cloud_run.samples, "intune_devices", estate).items()
        for d in [dict(labels)]
    }
    assert found == ce.EXPECTED_DEVICES


@pytest.mark.parametrize("estate", CLOUD_ESTATES)
def test_license_assignment_error_users_by_sku_error_and_group(cloud_run: CloudRun, estate: str) -> None:
    found = {
        (d["sku"], d["error"], d["assigned_by"]): v
        for labels, v in series(cloud_run.samples, "intune_license_assignment_error_users", estate).items()
        for d in [dict(labels)]
    }
    assert found == ce.EXPECTED_LICENCE_ERRORS


def test_cloud_stuck_endpoint(cloud_run: CloudRun) -> None:
    estate = next(e for e in cloud_run.stuck["estates"] if e["estate"] == ce.NAME)
    assert estate["pipeline"] == "cloud"
    listed = {
        (stage, u["user"], u["reason"]) for stage, item in estate["stages"].items() for u in item["users"]
    }
    assert listed == {(u.stage, _upn(u.sam), u.reason) for u in ce.in_scope() if u.reason is not None}
    entered = {u["user"]: u["entered_stage_at"] for item in estate["stages"].values() for u in item["users"]}
    for sam, at in ce.EXPECTED_ENTERED.items():
        assert entered[_upn(sam)] == at, sam
    for sam in ("c.conf.upn", "c.pending"):  # whenCreated
        assert epoch(entered[_upn(sam)]) == cloud_run.built.accounts[sam].when_created.timestamp()
    # No evidence (Graph returned no licence states): first seen by the exporter.
    assert (
        cloud_run.started_at - 1
        <= epoch(entered[_upn("c.legacy")])
        <= epoch(cloud_run.stuck["generated_at"]) + 1
    )
    for item in estate["stages"].values():
        for user in item["users"]:
            assert user["detail"] and user["action"], user


@pytest.mark.parametrize("user", ce.in_scope(), ids=lambda u: u.sam)
def test_cloud_trace_endpoint_and_cli(cloud_run: CloudRun, user: ce.CloudUser) -> None:
    status, served = cloud_run.traces[user.sam]
    assert status == 200, served
    _check_cloud_document(served, cloud_run.built, user)
    run = cloud_run.cli[user.sam]
    assert run.code == (0 if user.reason is None else 1), run
    _check_cloud_document(run.document(), cloud_run.built, user)


def _check_cloud_document(
    document: Any, built: ce.BuiltCloud, user: ce.CloudUser, estate: str = ce.NAME
) -> None:
    assert isinstance(document, dict), document
    stage, reason = ce.truth(user, estate)
    assert (document["estate"], document["stage"], document["reason"]) == (estate, stage, reason), document
    assert document["stuck"] is (reason is not None), document
    account = built.accounts[user.sam]
    assert document["user"]["sam"] == user.sam
    assert plain_guid(document["user"]["object_guid"]) == plain_guid(account.guid_text)
    reached = ce.CLOUD_STAGES.index(stage or "")
    assert [s["stage"] for s in document["steps"]] == list(ce.CLOUD_STAGES)
    assert [s["done"] for s in document["steps"]] == [i <= reached for i in range(len(ce.CLOUD_STAGES))]


@pytest.mark.parametrize("sam", list(ce.VARIANT_TRUTH))
def test_variant_estate_trace_endpoint_and_cli(cloud_run: CloudRun, sam: str) -> None:
    user = cloud_run.built.user(sam)
    status, served = cloud_run.traces[f"{ce.VARIANT}/{sam}"]
    assert status == 200, served
    _check_cloud_document(served, cloud_run.built, user, ce.VARIANT)
    run = cloud_run.cli[f"{ce.VARIANT}/{sam}"]
    assert run.code == (0 if ce.truth(user, ce.VARIANT)[1] is None else 1), run
    _check_cloud_document(run.document(), cloud_run.built, user, ce.VARIANT)


def test_a_user_in_two_estates_is_traced_in_both(cloud_run: CloudRun) -> None:
    """c.grace is stuck in cloudco and compliant in the variant: both answers, and exit 1."""
    user = cloud_run.built.user("c.grace")
    status, served = cloud_run.traces["both/c.grace"]
    assert status == 200, served
    assert isinstance(served, list) and sorted(d["estate"] for d in served) == sorted(CLOUD_ESTATES)
    for document in served:
        _check_cloud_document(document, cloud_run.built, user, document["estate"])
    run = cloud_run.cli["all/c.grace"]
    assert run.code == 1, run
    documents = run.document()
    assert isinstance(documents, list) and sorted(d["estate"] for d in documents) == sorted(CLOUD_ESTATES)


def test_out_of_scope_cloud_user(cloud_run: CloudRun) -> None:
    assert cloud_run.traces["c.off"][0] == 404
    run = cloud_run.cli["all/c.off"]
    assert run.code == 3, run
    assert "c.off" in run.stderr and "scope" in run.stderr.lower(), run


# ------------------------------------------------------------------------------ hq next to it
def test_hybrid_estate_stays_exact_next_to_the_cloud_estate(cloud_run: CloudRun) -> None:
    samples = cloud_run.samples
    users = he.expected_users(HQ)
    assert _stage_values(samples, HQ.name, "intune_provisioning_users", he.HYBRID_STAGES) == users
    found = {
        (dict(labels)["provisioning_stage"], dict(labels)["reason"]): v
        for labels, v in series(samples, "intune_provisioning_stuck_reason_users", HQ.name).items()
    }
    assert found == he.expected_reasons(HQ)
    info = sorted(
        (d["provisioning_stage"], d["user"], d.get("reason"))
        for labels in series(samples, "intune_provisioning_stuck_user_info", HQ.name)
        for d in [dict(labels)]
    )
    assert info == sorted((s.stage, _upn(s.sam), s.reason) for s in HQ.in_scope() if s.reason is not None)
    assert series(samples, "intune_devices", HQ.name) == {}
    orphans = {
        source: value(samples, "intune_provisioning_orphan_users", HQ.name, source=source)
        for source in ("entra", "configmgr")
    }
    assert orphans == he.EXPECTED_ORPHANS[HQ.name]
    missing = {
        m: value(samples, "intune_provisioning_users_missing_cloud_user_id", HQ.name, in_intune_collection=m)
        for m in ("true", "false")
    }
    assert missing == he.EXPECTED_MISSING_CLOUD_USER_ID[HQ.name]
    assert (
        value(samples, "intune_provisioning_cloud_user_id_mismatch_users", HQ.name)
        == he.EXPECTED_MISMATCH[HQ.name]
    )
    for scenario in HQ.in_scope():
        status, document = cloud_run.traces[scenario.sam]
        assert status == 200, document
        assert (document["estate"], document["stage"], document["reason"]) == (
            HQ.name,
            scenario.stage,
            scenario.reason,
        )


def test_clean_shutdown(cloud_run: CloudRun) -> None:
    assert cloud_run.exit_code == 0, cloud_run.log[-3000:]
