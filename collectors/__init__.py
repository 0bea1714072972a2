"""Custom prometheus_client collectors: each turns the engine's current snapshot into metric families.

Collectors never touch a backend: the values come from the exporter's background refresh (a full
read of a large tenant takes minutes), so a scrape is always fast and never blank. Every family is
built fresh on each scrape and ``describe()`` returns nothing, so registering reads nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Protocol

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from exporter.snapshot import Snapshot

log = logging.getLogger(__name__)
SnapshotSource = Callable[[], Snapshot]


class SnapshotCollector(Protocol):
    name: str

    def collect_from(self, snapshot: Snapshot) -> Iterable[Metric]: ...


class ExporterCollector(Collector):
    """Runs every sub-collector on one snapshot and reports how each of them fared."""

    def __init__(self, snapshot: SnapshotSource, collectors: Sequence[SnapshotCollector]) -> None:
        self._snapshot = snapshot
        self._collectors = collectors

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        snapshot = self._snapshot()
        duration = GaugeMetricFamily(
            "intune_exporter_collector_duration_seconds",
            "Time a collector took to turn the current snapshot into metrics (once per snapshot).",
            labels=["collector"],
        )
        success = GaugeMetricFamily(
            "intune_exporter_collector_success",
            "1 if the collector produced its metrics for the current snapshot, 0 if it failed (see the "
            "exporter log).",
            labels=["collector"],
        )
        for collector in self._collectors:
            started = time.perf_counter()
            try:
                # Materialise first so a failing collector contributes nothing half-built.
                metrics = list(collector.collect_from(snapshot))
            except Exception:
                log.exception("collector %s failed", collector.name)
                metrics, ok = [], 0.0
            else:
                ok = 1.0
            yield from metrics
            duration.add_metric([collector.name], time.perf_counter() - started)
            success.add_metric([collector.name], ok)
        yield duration
        yield success


def default_collectors(stuck_users_listed: int) -> list[SnapshotCollector]:
    from collectors.configmgr import ConfigMgrCollector
    from collectors.devices import DeviceCollector
    from collectors.entra import EntraCollector
    from collectors.exporter_health import ExporterHealthCollector
    from collectors.licenses import LicenseCollector
    from collectors.provisioning import ProvisioningCollector

    return [
        ProvisioningCollector(stuck_users_listed=stuck_users_listed),
        ConfigMgrCollector(),
        EntraCollector(),
        LicenseCollector(),
        DeviceCollector(),
        ExporterHealthCollector(),
    ]
