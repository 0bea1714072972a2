"""Intune managed devices by operating system, compliance state and management agent."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from exporter.model import DeviceTable
from exporter.snapshot import Snapshot


def device_counts(devices: DeviceTable) -> dict[tuple[str, str, str], int]:
    def compute() -> dict[tuple[str, str, str], int]:
        if devices.n == 0:
            return {}
        os_, compliance, agent = devices.cat("os"), devices.cat("compliance"), devices.cat("agent")
        triples = np.column_stack([os_.codes, compliance.codes, agent.codes])
        unique, counts = np.unique(triples, axis=0, return_counts=True)

        def name(cat: object, code: int) -> str:
            assert hasattr(cat, "vocab")
            return cat.vocab[code] if code >= 0 else "unknown"

        return {
            (name(os_, int(o)), name(compliance, int(c)), name(agent, int(a))): int(n)
            for (o, c, a), n in zip(unique.tolist(), counts.tolist(), strict=True)
        }

    return devices.cached("device_counts", compute)


class DeviceCollector:
    name = "devices"

    def collect_from(self, snapshot: Snapshot) -> Iterator[Metric]:
        devices = GaugeMetricFamily(
            "intune_devices",
            "Intune managed devices by operating system, compliance state and management agent "
            "(co-managed devices show configurationManagerClientMdm...). Values come from the exporter's "
            "background refresh of Microsoft Graph.",
            labels=["estate", "operating_system", "compliance_state", "management_agent"],
        )
        for estate in snapshot.estates:
            if estate.devices is None:
                continue
            for (os_, compliance, agent), count in sorted(device_counts(estate.devices).items()):
                devices.add_metric([estate.name, os_, compliance, agent], count)
        yield devices
