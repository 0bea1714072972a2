"""Fixtures for the alert-rule tests: the demo exporter as a real process on loopback."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from tests.alerts.support import REPO_ROOT, ManagedProcess, free_port, http_get

EXPORTER_START_TIMEOUT = 30.0


@pytest.fixture(scope="session")
def demo_exporter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``python -m exporter --demo`` on a free loopback port; yields its base URL once it is ready."""
    port = free_port()
    log = tmp_path_factory.mktemp("demo-exporter") / "exporter.log"
    command = [sys.executable, "-m", "exporter", "--demo", "--web.listen-address", f"127.0.0.1:{port}"]
    exporter = ManagedProcess.start("demo exporter", command, log, cwd=REPO_ROOT)
    try:
        base_url = f"http://127.0.0.1:{port}"
        exporter.wait_ready(f"{base_url}/-/ready", EXPORTER_START_TIMEOUT)
        yield base_url
    finally:
        exporter.stop()


@pytest.fixture(scope="session")
def demo_metrics(demo_exporter: str) -> str:
    """One scrape of the demo exporter, in the Prometheus text format."""
    return http_get(f"{demo_exporter}/metrics").decode("utf-8")
