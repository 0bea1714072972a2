"""The exporter's own metrics: per-source refresh health, Graph request statistics, build info."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

import exporter
from exporter.model import ERROR_REASONS, HttpStats
from exporter.snapshot import Snapshot


class ExporterHealthCollector:
    name = "exporter"

    def collect_from(self, snapshot: Snapshot) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "intune_exporter_source_up",
            "1 if the last background refresh of this source succeeded, 0 if it failed (the metrics that "
            "need it keep the values of its last good read).",
            labels=["estate", "source"],
        )
        last_success = GaugeMetricFamily(
            "intune_exporter_source_last_success_timestamp_seconds",
            "When the last successful background refresh of this source finished.",
            labels=["estate", "source"],
        )
        duration = GaugeMetricFamily(
            "intune_exporter_source_refresh_duration_seconds",
            "How long the last background refresh of this source took.",
            labels=["estate", "source"],
        )
        records = GaugeMetricFamily(
            "intune_exporter_source_records",
            "Records read by the last successful refresh: AD users matching the filter, Entra users "
            "returned by Graph (cloud-only included), ConfigMgr user records, SKUs plus subscriptions.",
            labels=["estate", "source"],
        )
        errors = CounterMetricFamily(
            "intune_exporter_source_errors",
            "Failed background refreshes of this source by reason.",
            labels=["estate", "source", "reason"],
        )
        for estate in snapshot.estates:
            for kind, status in estate.sources.items():
                labels = [estate.name, kind]
                if status.refreshed:
                    up.add_metric(labels, 1.0 if status.up else 0.0)
                if status.last_success is not None:
                    last_success.add_metric(labels, status.last_success)
                if status.duration is not None:
                    duration.add_metric(labels, status.duration)
                if status.records is not None:
                    records.add_metric(labels, status.records)
                for reason in ERROR_REASONS:
                    errors.add_metric([*labels, reason], status.errors.get(reason, 0))
        state_failures = CounterMetricFamily(
            "intune_exporter_state_write_failures",
            "Failed writes of the state file (the previous complete state stays on disk).",
            labels=[],
        )
        state_failures.add_metric([], snapshot.state_write_failures)
        state_write = GaugeMetricFamily(
            "intune_exporter_state_write_duration_seconds",
            "How long the last completed write of the state file took (only the tables that changed are "
            "written).",
            labels=[],
        )
        if snapshot.state_write_seconds is not None:
            state_write.add_metric([], snapshot.state_write_seconds)
        yield from (up, last_success, duration, records, errors, state_failures, state_write)
        yield from _graph_metrics(snapshot)
        info = GaugeMetricFamily(
            "intune_exporter_build_info",
            "Version of intune-provisioning-exporter; always 1.",
            labels=["version"],
        )
        info.add_metric([exporter.__version__], 1.0)
        yield info


def _graph_metrics(snapshot: Snapshot) -> Iterator[Metric]:
    requests = CounterMetricFamily(
        "intune_exporter_graph_requests",
        "HTTP requests to Microsoft Graph and the token endpoint, by endpoint and status code.",
        labels=["estate", "endpoint", "code"],
    )
    throttled = CounterMetricFamily(
        "intune_exporter_graph_throttled_responses",
        "Graph answers that asked the exporter to back off (429/503 with Retry-After).",
        labels=["estate"],
    )
    waited = CounterMetricFamily(
        "intune_exporter_graph_retry_wait_seconds",
        "Seconds spent waiting on Retry-After and retry backoff before repeating Graph requests.",
        labels=["estate"],
    )
    tokens = CounterMetricFamily(
        "intune_exporter_graph_token_requests",
        "Token requests sent to the identity platform (msal serves cached tokens without one).",
        labels=["estate"],
    )
    limit = GaugeMetricFamily(
        "intune_exporter_graph_throttle_limit_ratio",
        "The latest x-ms-throttle-limit-percentage Graph sent for this endpoint, as a ratio (1 = at the "
        "throttling limit).",
        labels=["estate", "endpoint"],
    )
    units = CounterMetricFamily(
        "intune_exporter_graph_resource_units",
        "Graph resource units consumed, from the x-ms-resource-unit header of each answer.",
        labels=["estate", "endpoint"],
    )
    for estate in snapshot.estates:
        stats = _latest_stats([s.http_stats for s in estate.sources.values() if s.http_stats is not None])
        if stats is None:
            continue
        for (endpoint, code), count in sorted(stats.requests.items()):
            requests.add_metric([estate.name, endpoint, code], count)
        throttled.add_metric([estate.name], stats.throttled)
        waited.add_metric([estate.name], stats.retry_wait_seconds)
        tokens.add_metric([estate.name], stats.token_requests)
        for endpoint, percent in sorted(stats.throttle_limit_percentage.items()):
            limit.add_metric([estate.name, endpoint], percent / 100.0)
        for endpoint, spent in sorted(stats.resource_units.items()):
            units.add_metric([estate.name, endpoint], spent)
    yield from (requests, throttled, waited, tokens, limit, units)


def _latest_stats(candidates: list[HttpStats]) -> HttpStats | None:
    # The Entra sources of an estate share one Graph client; each status holds a copy taken when
    # that source last refreshed. The copy with the most requests is the most recent.
    if not candidates:
        return None
    return max(candidates, key=lambda s: sum(s.requests.values()) + s.token_requests)
