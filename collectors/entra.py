"""Entra ID metrics: directory sync status and on-premises provisioning errors."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from exporter.model import EntraTable
from exporter.snapshot import Snapshot

_FRESHNESS = " Values come from the exporter's background refresh of Microsoft Graph."


def provisioning_errors(entra: EntraTable) -> dict[str, int]:
    """Category -> synced users carrying at least one onPremisesProvisioningErrors item of it."""

    def compute() -> dict[str, int]:
        errors = entra.children["errors"]
        if errors.n == 0:
            return {}
        rows = errors.array("row")
        synced = entra.array("synced")[rows]
        categories = errors.cat("category")
        pairs = np.unique(np.column_stack([categories.codes[synced], rows[synced]]), axis=0)
        codes, counts = np.unique(pairs[:, 0], return_counts=True)
        return {categories.vocab[int(c)]: int(n) for c, n in zip(codes, counts, strict=True) if c >= 0}

    return entra.cached("provisioning_errors", compute)


class EntraCollector:
    name = "entra"

    def collect_from(self, snapshot: Snapshot) -> Iterator[Metric]:
        enabled = GaugeMetricFamily(
            "intune_entra_connect_sync_enabled",
            "1 if the organization has directory synchronisation (Entra Connect) enabled." + _FRESHNESS,
            labels=["estate"],
        )
        last_sync = GaugeMetricFamily(
            "intune_entra_connect_last_sync_timestamp_seconds",
            "The organization's onPremisesLastSyncDateTime: when Entra Connect last synced." + _FRESHNESS,
            labels=["estate"],
        )
        errors = GaugeMetricFamily(
            "intune_entra_provisioning_error_users",
            "Synced users carrying onPremisesProvisioningErrors, by error category." + _FRESHNESS,
            labels=["estate", "category"],
        )
        for estate in snapshot.estates:
            org = estate.organization
            if org is not None:
                if org.sync_enabled is not None:
                    enabled.add_metric([estate.name], 1.0 if org.sync_enabled else 0.0)
                if org.last_sync is not None:
                    last_sync.add_metric([estate.name], org.last_sync)
            if estate.entra is not None:
                for category, count in sorted(provisioning_errors(estate.entra).items()):
                    errors.add_metric([estate.name, category], count)
        yield from (enabled, last_sync, errors)
