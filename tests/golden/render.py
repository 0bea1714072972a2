"""The golden /metrics exposition: the demo with a fixed seed and clock, every collector.

``python -m tests.golden.render`` rewrites ``tests/golden/demo.prom`` (after a deliberate change to
the metrics); the test compares a fresh rendering with it and runs ``promtool check metrics`` on it.
Measured durations are the only values that differ between runs: they are replaced by a marker, so
the series themselves are still compared.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from collectors import ExporterCollector, default_collectors
from exporter.demo import demo_setup
from exporter.engine import Engine

GOLDEN = Path(__file__).with_name("demo.prom")
START = 1_764_000_000.0  # 2025-11-24T16:00:00Z: a fixed clock for the demo
MEASURED = re.compile(
    r"^(intune_exporter_source_refresh_duration_seconds|intune_exporter_collector_duration_seconds)(\{[^}]*\})? .*$",
    re.MULTILINE,
)


def render() -> str:
    config, sources, clock, history = demo_setup(clock=lambda: START, seed=0)
    engine = Engine(config, sources, clock=clock, first_seen=history)
    engine.refresh_all()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ExporterCollector(engine.snapshot, default_collectors(config.stuck_users_listed)))
    text = generate_latest(registry).decode("utf-8")
    return MEASURED.sub(lambda m: f"{m.group(1)}{m.group(2) or ''} <measured>", text)


def promtool_form(text: str) -> str:
    """The exposition with the markers replaced by a number, for promtool check metrics."""
    return text.replace(" <measured>", " 0.0")


if __name__ == "__main__":
    GOLDEN.write_text(render(), encoding="utf-8")
    print(f"wrote {GOLDEN}", file=sys.stderr)
