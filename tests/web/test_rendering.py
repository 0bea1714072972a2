"""/metrics rendering: the snapshot's metrics once per snapshot, the runtime metrics per second."""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import CollectorRegistry

from exporter.webapp import MetricsRenderer

TEXT = "text/plain"
OPENMETRICS = "application/openmetrics-text; version=1.0.0"


class Counting:
    """A collector that reports how often it was collected."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        self.calls += 1
        family = GaugeMetricFamily(self.name, f"{self.name} collections so far")
        family.add_metric([], self.calls)
        yield family


def renderer() -> tuple[MetricsRenderer, Counting, Counting, list[object]]:
    snapshot = [object()]
    estate, process = Counting("estate_renderings"), Counting("process_renderings")
    registry, runtime = CollectorRegistry(auto_describe=False), CollectorRegistry(auto_describe=False)
    registry.register(estate)
    runtime.register(process)
    return MetricsRenderer(registry, lambda: snapshot[0], runtime), estate, process, snapshot


def test_snapshot_metrics_render_once_per_snapshot_runtime_metrics_once_per_second(monkeypatch):
    metrics, estate, process, snapshot = renderer()
    monkeypatch.setattr("exporter.webapp.RUNTIME_MAX_AGE", 0.05)
    body, content_type, compressed = metrics.render("", "")
    assert content_type.startswith("text/plain") and not compressed
    assert b"estate_renderings 1.0" in body and b"process_renderings 1.0" in body
    assert metrics.render("", "")[0] == body  # within RUNTIME_MAX_AGE: the same rendering
    time.sleep(0.1)
    body = metrics.render("", "")[0]
    assert b"estate_renderings 1.0" in body and b"process_renderings 2.0" in body
    snapshot[0] = object()
    body = metrics.render("", "")[0]
    assert b"estate_renderings 2.0" in body and b"process_renderings 3.0" in body
    assert (estate.calls, process.calls) == (2, 3)


def test_openmetrics_body_has_one_end_marker_and_gzip_is_the_same_body():
    metrics, *_ = renderer()
    body, content_type, _ = metrics.render(OPENMETRICS, "")
    assert content_type.startswith("application/openmetrics-text")
    assert body.count(b"# EOF") == 1 and body.endswith(b"# EOF\n")
    assert body.index(b"estate_renderings") < body.index(b"process_renderings")
    zipped, _, compressed = metrics.render(OPENMETRICS, "gzip, deflate")
    assert compressed and gzip.decompress(zipped).count(b"# EOF") == 1


def test_keep_warm_renders_a_new_snapshot_before_any_scrape_asks():
    metrics, estate, _, snapshot = renderer()
    metrics.render(OPENMETRICS, "")  # a format is scraped once: from now on it is kept warm
    assert estate.calls == 1
    stop = threading.Event()
    warmer = threading.Thread(target=metrics.keep_warm, args=(stop, 0.01), daemon=True)
    warmer.start()
    try:
        snapshot[0] = object()
        deadline = time.monotonic() + 5
        while estate.calls < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert estate.calls == 2  # rendered by the warmer, not by a scrape
        time.sleep(0.1)
        assert estate.calls == 2  # once per snapshot
        assert b"estate_renderings 2.0" in metrics.render(OPENMETRICS, "")[0]
        assert estate.calls == 2  # the scrape found it rendered
    finally:
        stop.set()
        warmer.join(5)


def test_without_a_scrape_nothing_is_warmed():
    metrics, estate, *_ = renderer()
    metrics.warm()
    assert estate.calls == 0
