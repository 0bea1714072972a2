"""Collectors: contract names and labels, every stage present, stuck-user cap and label modes."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from collectors import ExporterCollector, default_collectors
from exporter.config import Config, EstateConfig
from exporter.engine import Engine
from exporter.model import (
    CmComponent,
    HttpStats,
    OrganizationData,
    SubscribedSku,
    Subscription,
)
from exporter.pipelines.definitions import HYBRID_MDM
from exporter.sources.base import SourceError
from tests.builders import ad, ad_user, cm, cm_for, entra, entra_for
from tests.fakes import Clock, FakeSource

NOW = 1_000_000.0
STAGES = HYBRID_MDM.stages


class GraphFake(FakeSource):
    def http_stats(self):
        return HttpStats(
            {("users", "200"): 3, ("users", "429"): 1}, throttled=1, retry_wait_seconds=2.5, token_requests=1
        )


def scrape(engine, listed=25):
    registry = CollectorRegistry(auto_describe=True)
    registry.register(ExporterCollector(engine.snapshot, default_collectors(listed)))
    text = generate_latest(registry).decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return text, samples


def value(samples, name, **labels):
    return samples[(name, tuple(sorted(labels.items())))]


def names(samples):
    return {name for name, _ in samples}


def full_engine(stuck_users=5, kinds=("ad", "entra", "configmgr", "entra_organization"), user_label="upn"):
    users = [ad_user(f"col{i}", when_created=NOW - 10 * 3600 - i) for i in range(stuck_users)]
    done = ad_user("done", when_created=NOW - 50 * 3600)
    synced_done = entra_for(done)
    org = OrganizationData(
        True,
        NOW - 120,
        (
            SubscribedSku("061f9ace-7d42-4136-88ac-31dc755f143f", "INTUNE_A", 12, 10, 2, 1, 0),
            SubscribedSku("abc", "MYSTERY_SKU", 1, 5, 0, 0, 0),
        ),
        (
            Subscription(
                "s1",
                "061f9ace-7d42-4136-88ac-31dc755f143f",
                "INTUNE_A",
                "LockedOut",
                True,
                10,
                NOW + 86400,
            ),
            Subscription("s2", "abc", "MYSTERY_SKU", "Enabled", False, 5, None),
        ),
    )
    cm_data = cm(
        cm_for(done, in_collection=True, cloud_user_id=synced_done.id),
        components=(
            CmComponent("PS1", "CM01", "SMS_CLOUD_USERSYNC", 1),
            CmComponent("PS1", "CM02", "SMS_CLOUD_USERSYNC", 2),
            CmComponent("PS1", "CM01", "SMS_DMP_UPLOADER", 0),
        ),
    )
    data = {
        "ad": ad(*users, done),
        "entra": entra(synced_done, entra_for(ad_user("cloudonly"), sync_enabled=False)),
        "configmgr": cm_data,
        "entra_organization": org,
    }
    sources = [GraphFake(k, data[k]) if k.startswith("entra") else FakeSource(k, data[k]) for k in kinds]
    engine = Engine(
        Config(estates=(EstateConfig(name="contoso"),), user_label=user_label),
        {"contoso": sources},
        clock=Clock(NOW),
    )
    engine.refresh_all()
    return engine


def test_stage_metrics_have_every_stage():
    _, samples = scrape(full_engine())
    for stage in STAGES:
        for name in (
            "intune_provisioning_users",
            "intune_provisioning_stuck_users",
            "intune_provisioning_stage_oldest_entry_timestamp_seconds",
        ):
            assert (name, (("estate", "contoso"), ("provisioning_stage", stage))) in samples
    assert value(samples, "intune_provisioning_users", estate="contoso", provisioning_stage="ad_created") == 5
    assert (
        value(samples, "intune_provisioning_users", estate="contoso", provisioning_stage="intune_enabled")
        == 1
    )
    assert (
        value(samples, "intune_provisioning_stuck_users", estate="contoso", provisioning_stage="ad_created")
        == 5
    )
    assert (
        value(
            samples,
            "intune_provisioning_stage_oldest_entry_timestamp_seconds",
            estate="contoso",
            provisioning_stage="entra_synced",
        )
        == 0
    )
    assert (
        value(
            samples,
            "intune_provisioning_stage_oldest_entry_timestamp_seconds",
            estate="contoso",
            provisioning_stage="ad_created",
        )
        == NOW - 10 * 3600 - 4
    )
    assert value(samples, "intune_provisioning_cloud_user_id_mismatch_users", estate="contoso") == 0
    assert value(samples, "intune_provisioning_orphan_users", estate="contoso", source="entra") == 0
    assert value(samples, "intune_provisioning_orphan_users", estate="contoso", source="configmgr") == 0


def test_stuck_user_info_is_capped_longest_waiting_first():
    engine = full_engine(stuck_users=40)
    _, samples = scrape(engine, listed=3)
    info = [dict(labels)["user"] for name, labels in samples if name == "intune_provisioning_stuck_user_info"]
    assert info == ["col39@contoso.com", "col38@contoso.com", "col37@contoso.com"]


def test_user_label_none_drops_stuck_user_info_and_sam_uses_sam():
    _, samples = scrape(full_engine(user_label="none"))
    assert "intune_provisioning_stuck_user_info" not in names(samples)
    _, samples = scrape(full_engine(user_label="sam"))
    users = {dict(lbl)["user"] for n, lbl in samples if n == "intune_provisioning_stuck_user_info"}
    assert users == {f"col{i}" for i in range(5)}


def test_configmgr_metrics():
    _, samples = scrape(full_engine())
    assert (
        value(
            samples,
            "intune_provisioning_users_missing_cloud_user_id",
            estate="contoso",
            in_intune_collection="true",
        )
        == 0
    )
    assert (
        value(
            samples,
            "intune_provisioning_users_missing_cloud_user_id",
            estate="contoso",
            in_intune_collection="false",
        )
        == 0
    )
    assert (
        value(
            samples,
            "intune_configmgr_component_status",
            estate="contoso",
            site_code="PS1",
            component="SMS_CLOUD_USERSYNC",
        )
        == 2
    )  # worst of two site systems
    assert (
        value(
            samples,
            "intune_configmgr_component_status",
            estate="contoso",
            site_code="PS1",
            component="SMS_DMP_UPLOADER",
        )
        == 0
    )


def test_license_and_entra_metrics():
    _, samples = scrape(full_engine())
    labels = {"estate": "contoso", "sku": "INTUNE_A", "sku_name": "Intune"}
    assert value(samples, "intune_license_prepaid_units", **labels, status="enabled") == 10
    assert value(samples, "intune_license_prepaid_units", **labels, status="warning") == 2
    assert value(samples, "intune_license_prepaid_units", **labels, status="suspended") == 1
    assert value(samples, "intune_license_prepaid_units", **labels, status="locked_out") == 0
    assert value(samples, "intune_license_consumed_units", **labels) == 12  # above enabled: not clamped
    assert (
        value(
            samples,
            "intune_license_consumed_units",
            estate="contoso",
            sku="MYSTERY_SKU",
            sku_name="MYSTERY_SKU",
        )
        == 1
    )
    assert (
        value(
            samples,
            "intune_license_subscription_expiry_timestamp_seconds",
            estate="contoso",
            sku="INTUNE_A",
            subscription_id="s1",
            status="locked_out",
            trial="true",
        )
        == NOW + 86400
    )
    assert not any(dict(lbl).get("subscription_id") == "s2" for _, lbl in samples)
    assert value(samples, "intune_entra_connect_sync_enabled", estate="contoso") == 1
    assert value(samples, "intune_entra_connect_last_sync_timestamp_seconds", estate="contoso") == NOW - 120


def test_exporter_metrics():
    _, samples = scrape(full_engine())
    for kind in ("ad", "entra", "configmgr", "entra_organization"):
        assert value(samples, "intune_exporter_source_up", estate="contoso", source=kind) == 1
        assert (
            value(
                samples,
                "intune_exporter_source_last_success_timestamp_seconds",
                estate="contoso",
                source=kind,
            )
            == NOW
        )
        assert (
            "intune_exporter_source_refresh_duration_seconds",
            (("estate", "contoso"), ("source", kind)),
        ) in samples
        assert (
            value(
                samples,
                "intune_exporter_source_errors_total",
                estate="contoso",
                source=kind,
                reason="timeout",
            )
            == 0
        )
    assert value(samples, "intune_exporter_source_records", estate="contoso", source="ad") == 6
    assert value(samples, "intune_exporter_source_records", estate="contoso", source="entra") == 2
    assert value(samples, "intune_exporter_source_records", estate="contoso", source="configmgr") == 1
    import exporter

    assert value(samples, "intune_exporter_build_info", version=exporter.__version__) == 1
    assert (
        value(samples, "intune_exporter_graph_requests_total", estate="contoso", endpoint="users", code="429")
        == 1
    )
    assert value(samples, "intune_exporter_graph_retry_wait_seconds_total", estate="contoso") == 2.5
    assert value(samples, "intune_exporter_collector_success", collector="provisioning") == 1


def test_metrics_needing_a_missing_source_are_absent():
    _, samples = scrape(full_engine(kinds=("configmgr",)))
    present = names(samples)
    assert "intune_provisioning_users" not in present
    assert "intune_provisioning_users_missing_cloud_user_id" in present
    assert not any(n.startswith("intune_license_") or n.startswith("intune_entra_") for n in present)
    _, samples = scrape(full_engine(kinds=("entra", "entra_organization")))
    present = names(samples)
    assert "intune_license_prepaid_units" in present and "intune_entra_connect_sync_enabled" in present
    assert "intune_provisioning_users" not in present and "intune_configmgr_component_status" not in present


def test_down_source_keeps_metrics_and_reports_down():
    engine = full_engine()
    engine._estates["contoso"].sources["configmgr"].behaviour = lambda prev: (_ for _ in ()).throw(
        SourceError("auth", "login failed for cm01")
    )
    engine.refresh("contoso", "configmgr")
    _, samples = scrape(engine)
    assert value(samples, "intune_exporter_source_up", estate="contoso", source="configmgr") == 0
    assert (
        value(
            samples,
            "intune_exporter_source_errors_total",
            estate="contoso",
            source="configmgr",
            reason="auth",
        )
        == 1
    )
    assert (
        value(samples, "intune_provisioning_users", estate="contoso", provisioning_stage="intune_enabled")
        == 1
    )


def test_failing_collector_does_not_blank_the_scrape():
    class Broken:
        name = "broken"

        def collect_from(self, snapshot):
            raise RuntimeError("bug")

    engine = full_engine()
    registry = CollectorRegistry()
    registry.register(ExporterCollector(engine.snapshot, [Broken(), *default_collectors(25)]))
    text = generate_latest(registry).decode()
    assert 'intune_exporter_collector_success{collector="broken"} 0.0' in text
    assert 'intune_provisioning_users{estate="contoso",provisioning_stage="ad_created"} 5.0' in text


def test_describe_returns_nothing_so_registering_reads_nothing():
    def explode():
        raise AssertionError("registering must not take a snapshot")

    collector = ExporterCollector(explode, default_collectors(25))
    assert collector.describe() == []
    CollectorRegistry(auto_describe=True).register(collector)


def test_reasons_every_pair_present_and_on_the_stuck_user_info():
    _, samples = scrape(full_engine())
    for reason in HYBRID_MDM.reasons:
        key = (
            "intune_provisioning_stuck_reason_users",
            (("estate", "contoso"), ("provisioning_stage", reason.stage), ("reason", reason.name)),
        )
        assert key in samples
    # No Entra user matches the five stuck AD users and Entra Connect synced after they were created.
    assert (
        value(
            samples,
            "intune_provisioning_stuck_reason_users",
            estate="contoso",
            provisioning_stage="ad_created",
            reason="entra_not_synced",
        )
        == 5
    )
    infos = [dict(lbl) for n, lbl in samples if n == "intune_provisioning_stuck_user_info"]
    assert infos and all(info["reason"] == "entra_not_synced" for info in infos)
    assert value(samples, "intune_provisioning_pipeline_info", estate="contoso", pipeline="hybrid_mdm") == 1


def test_hash_labels_are_keyed():
    engine = full_engine(user_label="hash")
    _, samples = scrape(engine)
    users = {dict(lbl)["user"] for n, lbl in samples if n == "intune_provisioning_stuck_user_info"}
    assert len(users) == 5 and all(len(u) == 16 for u in users)
    other = full_engine(user_label="hash")  # another key (none configured, no state file)
    _, again = scrape(other)
    assert users != {dict(lbl)["user"] for n, lbl in again if n == "intune_provisioning_stuck_user_info"}
