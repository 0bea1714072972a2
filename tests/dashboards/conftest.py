"""Fixtures of the dashboard tests: the demo exporter and a real Prometheus scraping it.

Both run as subprocesses on free loopback ports for the whole session and are stopped at the end.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dashboards import generate
from exporter.pipelines.definitions import DEFAULT_PIPELINE
from tests.conftest import require_executable

REPO_ROOT = Path(__file__).resolve().parents[2]
JOB = "intune"
SCRAPES_BEFORE_QUERYING = 8  # enough 1 s samples for rate() over the 4 s $__rate_interval used in tests

# Plain HTTP on loopback: never through a proxy from the environment.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with _opener.open(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for(what: str, check: Callable[[], bool], deadline_s: float, diagnostics: Callable[[], str]) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (OSError, ValueError):
            pass  # not listening yet, or a half-written answer
        time.sleep(0.2)
    pytest.fail(f"{what} within {deadline_s:g} s\n{diagnostics()}", pytrace=False)


def tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture(scope="session")
def dashboards() -> dict[str, dict[str, Any]]:
    """The dashboards as the generator builds them, by uid."""
    return {board["uid"]: board for board in generate.build_dashboards().values()}


@dataclass(frozen=True)
class DemoExporter:
    address: str  # host:port, the Prometheus target and the `instance` label
    metrics_text: str

    def series_labels(self) -> dict[str, set[str]]:
        """Sample name -> label names seen on it."""
        labels: dict[str, set[str]] = {}
        for family in text_string_to_metric_families(self.metrics_text):
            for sample in family.samples:
                labels.setdefault(sample.name, set()).update(sample.labels)
        return labels

    def estate_pipelines(self) -> dict[str, str]:
        """Estate -> its pipeline, for every estate the demo exports. An estate without
        intune_provisioning_pipeline_info counts as the default pipeline (the queries that need the
        metric then fail on their own)."""
        estates: dict[str, str] = {}
        pipelines: dict[str, str] = {}
        for family in text_string_to_metric_families(self.metrics_text):
            for sample in family.samples:
                if sample.name == "intune_exporter_source_up":
                    estates[sample.labels["estate"]] = DEFAULT_PIPELINE
                elif sample.name == "intune_provisioning_pipeline_info":
                    pipelines[sample.labels["estate"]] = sample.labels["pipeline"]
        return {**estates, **pipelines}


@pytest.fixture(scope="session")
def demo_exporter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoExporter]:
    workdir = tmp_path_factory.mktemp("demo-exporter")
    log_path = workdir / "exporter.log"
    address = f"127.0.0.1:{free_port()}"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "exporter", "--demo", "--web.listen-address", address],
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(
            "the demo exporter did not become ready",
            lambda: http_get(f"http://{address}/-/ready")[0] == 200,
            20,
            lambda: tail(log_path),
        )
        status, body = http_get(f"http://{address}/metrics")
        assert status == 200, body[:500]
        yield DemoExporter(address, body.decode())
    finally:
        stop(process)


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def api(self, path: str, **params: str) -> Any:
        status, body = http_get(f"{self.url}{path}?{urllib.parse.urlencode(params)}", timeout=10)
        answer = json.loads(body)
        if status != 200 or answer.get("status") != "success":
            raise AssertionError(
                f"Prometheus answered {status} to {path} {params}: {answer.get('error', answer)}"
            )
        return answer["data"]

    def instant(self, expr: str, at: float) -> list[dict[str, Any]]:
        data = self.api("/api/v1/query", query=expr, time=f"{at:.3f}")
        assert data["resultType"] == "vector", data["resultType"]
        return list(data["result"])

    def range(self, expr: str, start: float, end: float, step: str = "1s") -> list[dict[str, Any]]:
        data = self.api("/api/v1/query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=step)
        return [series for series in data["result"] if series["values"]]


@dataclass(frozen=True)
class ScrapedPrometheus:
    prometheus: Prometheus
    exporter: DemoExporter
    job: str


PROMETHEUS_CONFIG = """\
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: {job}
    static_configs:
      - targets: ["{target}"]
"""


@pytest.fixture(scope="session")
def scraped(
    demo_exporter: DemoExporter, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ScrapedPrometheus]:
    """A real Prometheus that has scraped the demo exporter a few times."""
    binary = require_executable("prometheus", "apt-get install prometheus")
    workdir = tmp_path_factory.mktemp("prometheus")
    config = workdir / "prometheus.yml"
    config.write_text(PROMETHEUS_CONFIG.format(job=JOB, target=demo_exporter.address))
    log_path = workdir / "prometheus.log"
    url = f"http://127.0.0.1:{free_port()}"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address={url.removeprefix('http://')}",
            ],
            cwd=workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        prometheus = Prometheus(url)
        wait_for(
            "Prometheus did not become ready",
            lambda: http_get(f"{url}/-/ready")[0] == 200,
            30,
            lambda: tail(log_path),
        )

        def scraped_enough() -> bool:
            samples = prometheus.instant(
                f'count_over_time(intune_exporter_build_info{{job="{JOB}"}}[1m])', time.time()
            )
            return bool(samples) and float(samples[0]["value"][1]) >= SCRAPES_BEFORE_QUERYING

        wait_for(
            f"Prometheus did not scrape the demo exporter {SCRAPES_BEFORE_QUERYING} times",
            scraped_enough,
            45,
            lambda: tail(log_path),
        )
        yield ScrapedPrometheus(prometheus, demo_exporter, JOB)
    finally:
        stop(process)
