"""ConfigMgr-only metrics: users without CloudUserID and connector/discovery component health."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from exporter.snapshot import Snapshot

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
            cm = estate.configmgr
            if cm is None:
                continue
            without = ~cm.array("has_cloud")
            member = cm.in_collection()
            missing.add_metric([estate.name, "true"], int(np.count_nonzero(without & member)))
            missing.add_metric([estate.name, "false"], int(np.count_nonzero(without & ~member)))
            # Several site systems may report one component; the worst status speaks for it.
            worst: dict[tuple[str, str], int] = {}
            for comp in cm.components:
                key = (comp.site_code, comp.component_name)
                worst[key] = max(worst.get(key, 0), comp.status)
            for (site, component), status in sorted(worst.items()):
                components.add_metric([estate.name, site, component], status)
        yield missing
        yield components
