"""Stage metrics: where every in-scope user is in the pipeline and who is stuck."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from exporter.engine import Snapshot
from exporter.model import STAGES
from exporter.stages import user_label_value

_FRESHNESS = (
    " Values come from the exporter's background refresh;"
    " see intune_exporter_source_last_success_timestamp_seconds."
)


class ProvisioningCollector:
    name = "provisioning"

    def __init__(self, user_label: str, stuck_users_listed: int) -> None:
        self.user_label = user_label
        self.stuck_users_listed = stuck_users_listed

    def collect_from(self, snapshot: Snapshot) -> Iterator[Metric]:
        users = GaugeMetricFamily(
            "intune_provisioning_users",
            "In-scope AD users whose furthest consecutive provisioning stage is this one." + _FRESHNESS,
            labels=["estate", "provisioning_stage"],
        )
        stuck = GaugeMetricFamily(
            "intune_provisioning_stuck_users",
            "Users at this stage for longer than its stuck_after threshold." + _FRESHNESS,
            labels=["estate", "provisioning_stage"],
        )
        oldest = GaugeMetricFamily(
            "intune_provisioning_stage_oldest_entry_timestamp_seconds",
            "When the longest-waiting user at this stage entered it (0 when the stage is empty)."
            + _FRESHNESS,
            labels=["estate", "provisioning_stage"],
        )
        info = GaugeMetricFamily(
            "intune_provisioning_stuck_user_info",
            "1 per stuck user, longest-waiting first, capped at stuck_users_listed per estate." + _FRESHNESS,
            labels=["estate", "provisioning_stage", "user"],
        )
        mismatch = GaugeMetricFamily(
            "intune_provisioning_cloud_user_id_mismatch_users",
            "In-scope users whose ConfigMgr CloudUserID is set but is not their Entra object id."
            + _FRESHNESS,
            labels=["estate"],
        )
        orphans = GaugeMetricFamily(
            "intune_provisioning_orphan_users",
            "Synced Entra users or ConfigMgr user records that match no in-scope AD user." + _FRESHNESS,
            labels=["estate", "source"],
        )
        unlicensed = GaugeMetricFamily(
            "intune_provisioning_enabled_users_without_intune_license",
            "Intune-enabled users with no assigned license carrying an enabled INTUNE_A service plan. "
            "Expected in hybrid MDM (the connector enables users without an Entra license); informational."
            + _FRESHNESS,
            labels=["estate"],
        )
        have_unlicensed = False
        for estate in snapshot.estates:
            view = estate.view
            if view is None or not {"ad", "entra", "configmgr"} <= set(estate.sources):
                continue
            for stage in STAGES:
                users.add_metric([estate.name, stage], view.users[stage])
                stuck.add_metric([estate.name, stage], view.stuck[stage])
                oldest.add_metric([estate.name, stage], view.oldest_entry[stage] or 0.0)
            if self.user_label != "none":
                for person in view.stuck_users[: self.stuck_users_listed]:
                    label = user_label_value(
                        self.user_label, person.sam_account_name, person.user_principal_name, person.user_key
                    )
                    info.add_metric([estate.name, person.stage, label or ""], 1.0)
            mismatch.add_metric([estate.name], view.cloud_user_id_mismatch)
            for source in ("entra", "configmgr"):
                orphans.add_metric([estate.name, source], view.orphans.get(source, 0))
            if view.intune_enabled_without_intune_license is not None:
                have_unlicensed = True
                unlicensed.add_metric([estate.name], view.intune_enabled_without_intune_license)
        yield from (users, stuck, oldest, mismatch, orphans)
        if self.user_label != "none":
            yield info
        if have_unlicensed:
            yield unlicensed
