"""Stage metrics: where every in-scope user is in its estate's pipeline, who is stuck and why."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from exporter.snapshot import EstateSnapshot, Snapshot

_FRESHNESS = (
    " Values come from the exporter's background refresh;"
    " see intune_exporter_source_last_success_timestamp_seconds."
)


def stage_metrics_available(estate: EstateSnapshot) -> bool:
    """The estate has evaluated data and every source its pipeline needs is configured."""
    if estate.evaluation is None:
        return False
    from exporter.pipelines import implementation

    return implementation(estate.pipeline).required <= set(estate.sources)


class ProvisioningCollector:
    name = "provisioning"

    def __init__(self, stuck_users_listed: int) -> None:
        self.stuck_users_listed = stuck_users_listed

    def collect_from(self, snapshot: Snapshot) -> Iterator[Metric]:
        pipeline_info = GaugeMetricFamily(
            "intune_provisioning_pipeline_info",
            "1 for every estate, naming the provisioning chain it follows (hybrid_mdm or cloud).",
            labels=["estate", "pipeline"],
        )
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
        reasons = GaugeMetricFamily(
            "intune_provisioning_stuck_reason_users",
            "Stuck users by the reason they are stuck (the first reason of their stage that holds); "
            "sums to intune_provisioning_stuck_users per stage." + _FRESHNESS,
            labels=["estate", "provisioning_stage", "reason"],
        )
        oldest = GaugeMetricFamily(
            "intune_provisioning_stage_oldest_entry_timestamp_seconds",
            "When the longest-waiting user at this stage entered it (0 when the stage is empty)."
            + _FRESHNESS,
            labels=["estate", "provisioning_stage"],
        )
        info = GaugeMetricFamily(
            "intune_provisioning_stuck_user_info",
            "1 per stuck user with its reason, longest-waiting first, at most stuck_users_listed per estate."
            + _FRESHNESS,
            labels=["estate", "provisioning_stage", "user", "reason"],
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
            "Intune-enabled users with no assigned license carrying an enabled Intune service plan. "
            "Expected in hybrid MDM (the connector enables users without an Entra license); informational."
            + _FRESHNESS,
            labels=["estate"],
        )
        have = {"mismatch": False, "unlicensed": False}
        labeler = snapshot.labeler
        for estate in snapshot.estates:
            pipeline_info.add_metric([estate.name, estate.pipeline], 1.0)
            if not stage_metrics_available(estate):
                continue
            evaluation = estate.evaluation
            assert evaluation is not None
            summary = evaluation.summary(snapshot.taken_at)
            for stage in evaluation.definition.stages:
                users.add_metric([estate.name, stage], summary.users[stage])
                stuck.add_metric([estate.name, stage], summary.stuck[stage])
                oldest.add_metric([estate.name, stage], summary.oldest_entry[stage] or 0.0)
            for (stage, reason), count in summary.stuck_reasons.items():
                reasons.add_metric([estate.name, stage, reason], count)
            if labeler.names_users:
                ad = evaluation.ad
                for row in summary.stuck_rows[: self.stuck_users_listed]:
                    index = int(row)
                    label = labeler.label(
                        ad.text("sam", index) or "",
                        ad.text("upn", index),
                        bytes(ad.array("guid")[index].tobytes()),
                    )
                    info.add_metric(
                        [
                            estate.name,
                            evaluation.stage_name(index),
                            label or "",
                            evaluation.reason_name(index) or "",
                        ],
                        1.0,
                    )
            side = evaluation.side
            if "cloud_user_id_mismatch" in side:
                have["mismatch"] = True
                mismatch.add_metric([estate.name], side["cloud_user_id_mismatch"])
            for source, count in sorted(side.get("orphans", {}).items()):
                orphans.add_metric([estate.name, source], count)
            if side.get("enabled_without_intune_license") is not None:
                have["unlicensed"] = True
                unlicensed.add_metric([estate.name], side["enabled_without_intune_license"])
        yield from (pipeline_info, users, stuck, reasons, oldest, orphans)
        if have["mismatch"]:
            yield mismatch
        if labeler.names_users:
            yield info
        if have["unlicensed"]:
            yield unlicensed
