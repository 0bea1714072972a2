"""ConfigMgr-only metrics: users without CloudUserID and connector/discovery component health."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from exporter.engine import Snapshot

_FRESHNESS = " Values come from the exporter's background refresh of the site database."


class ConfigMgrCollector:
    name = "configmgr"

    def collect_from(self, snapshot: Snapshot) -> Iterator[Metric]:
        missing = GaugeMetricFamily(
            "intune_provisioning_users_missing_cloud_user_id",
            "ConfigMgr user records (v_R_User, in scope or not) whose CloudUserID is null, by membership "
            "in an Intune collection." + _FRESHNESS,
            labels=["estate", "in_intune_collection"],
        )
        components = GaugeMetricFamily(
            "intune_configmgr_component_status",
            "Status of the Intune connector and discovery components: 0 OK, 1 warning, 2 critical."
            + _FRESHNESS,
            labels=["estate", "site_code", "component"],
        )
        for estate in snapshot.estates:
            summary = estate.configmgr_summary
            if summary is not None:
                for member in (True, False):
                    missing.add_metric(
                        [estate.name, "true" if member else "false"],
                        summary.missing_cloud_user_id.get(member, 0),
                    )
            if estate.configmgr is not None:
                # Several site systems may report one component; the worst status speaks for it.
                worst: dict[tuple[str, str], int] = {}
                for comp in estate.configmgr.components:
                    key = (comp.site_code, comp.component_name)
                    worst[key] = max(worst.get(key, 0), comp.status)
                for (site, component), status in sorted(worst.items()):
                    components.add_metric([estate.name, site, component], status)
        yield missing
        yield components
