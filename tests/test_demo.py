"""The embedded demo (exporter.demo): every reason of both pipelines shows, the simulation and the stage
model agree on every user, the demo is deterministic given its seed and clock, and it starts fast."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from collectors.configmgr import ConfigMgrCollector
from collectors.devices import DeviceCollector
from collectors.entra import EntraCollector
from collectors.licenses import LicenseCollector
from collectors.provisioning import ProvisioningCollector
from exporter.demo import CONTOSO, DemoSource, demo_setup
from exporter.demo.common import DAY, FUTURE_HIRING_DAYS, SimulatedEstate
from exporter.demo.hybrid import HybridEstate
from exporter.engine import Engine
from exporter.pipelines.definitions import CLOUD, HYBRID_MDM, PIPELINES
from exporter.snapshot import Snapshot
from exporter.sources.base import Source

ROOT = Path(__file__).resolve().parent.parent
START = 1_767_225_600.0  # 2026-01-01T00:00:00Z: a fixed clock, as the golden tests use


@dataclass
class Demo:
    engine: Engine
    estates: dict[str, SimulatedEstate]
    now: float

    @property
    def snapshot(self) -> Snapshot:
        return self.engine.snapshot()


def build(clock: Callable[[], float], seed: int | str = 0) -> Demo:
    config, sources, clock, history = demo_setup(clock=clock, seed=seed)
    engine = Engine(config, sources, clock=clock, first_seen=history)
    engine.refresh_all()
    estates = {name: simulated(estate_sources[0]) for name, estate_sources in sources.items()}
    return Demo(engine, estates, clock())


def simulated(source: Source) -> SimulatedEstate:
    assert isinstance(source, DemoSource)
    return source.estate


@pytest.fixture(scope="module")
def demo() -> Demo:
    return build(lambda: START)


def stuck_by_reason(demo: Demo) -> Counter[tuple[str, str, str]]:
    """(pipeline, stage, reason) -> stuck users, over every estate of the demo."""
    counts: Counter[tuple[str, str, str]] = Counter()
    for estate in demo.snapshot.estates:
        assert estate.evaluation is not None, f"{estate.name} was not evaluated"
        for (stage, reason), count in estate.evaluation.summary(demo.now).stuck_reasons.items():
            counts[(estate.pipeline, stage, reason)] += count
    return counts


def render(snapshot: Snapshot) -> str:
    """The snapshot through the metric collectors whose output depends only on the data and the clock
    (the exporter's own health metrics carry measured durations)."""

    class Once(Collector):
        def collect(self) -> Iterator[Metric]:
            for collector in (
                ProvisioningCollector(stuck_users_listed=25),
                ConfigMgrCollector(),
                EntraCollector(),
                LicenseCollector(),
                DeviceCollector(),
            ):
                yield from collector.collect_from(snapshot)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Once())
    return generate_latest(registry).decode("utf-8")


def samples(text: str, name: str, estate: str) -> list[dict[str, str]]:
    return [
        {**sample.labels, "value": str(sample.value)}
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and sample.labels.get("estate") == estate
    ]


# ------------------------------------------------------------------------------------ reasons
def test_every_reason_of_both_pipelines_has_a_stuck_user(demo: Demo) -> None:
    shown = {key for key, count in stuck_by_reason(demo).items() if count > 0}
    expected = {(p.name, r.stage, r.name) for p in PIPELINES.values() for r in p.reasons}
    assert expected - shown == set()
    assert {estate.pipeline for estate in demo.snapshot.estates} == {HYBRID_MDM.name, CLOUD.name}


def test_stage_counts_sum_to_the_in_scope_users_and_reasons_to_the_stuck(demo: Demo) -> None:
    for estate in demo.snapshot.estates:
        assert estate.evaluation is not None and estate.ad is not None
        summary = estate.evaluation.summary(demo.now)
        in_scope = len(demo.estates[estate.name].in_scope(demo.now))
        assert sum(summary.users.values()) == estate.ad.n == in_scope, estate.name
        for stage in estate.evaluation.definition.stages:
            by_reason = sum(n for (s, _), n in summary.stuck_reasons.items() if s == stage)
            assert by_reason == summary.stuck[stage], (estate.name, stage)
        assert summary.stuck[estate.evaluation.definition.final_stage] == 0


def test_the_simulation_and_the_stage_model_agree_on_every_user(demo: Demo) -> None:
    """The simulation knows where each person is; the engine finds the same from the backend views.
    (This is also what makes the pre-seeded first-seen history apply to every user.)"""
    for estate in demo.snapshot.estates:
        evaluation = estate.evaluation
        assert evaluation is not None
        simulated = demo.estates[estate.name]
        people = {p.guid: p for p in simulated.in_scope(demo.now)}
        guids = evaluation.ad.array("guid")
        disagreements: Counter[tuple[str, str, str]] = Counter()  # (fate, simulated stage, found stage)
        for row in range(evaluation.ad.n):
            person = people[bytes(guids[row].tobytes())]
            expected, _ = simulated.stage_at(person, demo.now)
            if expected != evaluation.stage_name(row):
                disagreements[(person.fate, expected, evaluation.stage_name(row))] += 1
        assert disagreements == Counter(), estate.name


def test_proportions_are_realistic(demo: Demo) -> None:
    counts = stuck_by_reason(demo)
    hybrid = Counter(
        {reason: n for (pipeline, _, reason), n in counts.items() if pipeline == HYBRID_MDM.name}
    )
    top_two = {reason for reason, _ in hybrid.most_common(2)}
    assert top_two == {"not_in_intune_collection", "connector_sync_pending"}, hybrid.most_common(4)
    for estate in demo.snapshot.estates:
        assert estate.evaluation is not None
        summary = estate.evaluation.summary(demo.now)
        total = sum(summary.users.values())
        final = summary.users[estate.evaluation.definition.final_stage]
        assert final > 0.75 * total, (estate.name, summary.users)  # most users made it
        assert sum(summary.stuck.values()) < 0.15 * total, (estate.name, summary.stuck)
    cloud = Counter({reason: n for (pipeline, _, reason), n in counts.items() if pipeline == CLOUD.name})
    assert max(cloud.values()) < 0.25 * sum(cloud.values()), cloud  # a few of each, none dominating


# ------------------------------------------------------------------------------------ metrics
def test_northwind_exports_devices_and_licence_errors(demo: Demo) -> None:
    text = render(demo.snapshot)
    devices = samples(text, "intune_devices", "northwind")
    assert {d["operating_system"] for d in devices} >= {"Windows", "macOS", "iOS", "Android"}
    assert {d["management_agent"] for d in devices} >= {"mdm", "configurationManagerClientMdm"}
    assert {d["compliance_state"] for d in devices} >= {
        "compliant",
        "noncompliant",
        "inGracePeriod",
        "configManager",
        "unknown",
    }
    errors = samples(text, "intune_license_assignment_error_users", "northwind")
    found = {(e["sku"], e["error"], e["assigned_by"]) for e in errors}
    assert ("EMS", "CountViolation", "LIC-EMS-E3-Contractors") in found
    assert ("SPE_F1", "MutuallyExclusiveViolation", "LIC-M365-F3-Frontline") in found
    ems = {
        s.get("status", "consumed"): float(s["value"])
        for name in ("intune_license_prepaid_units", "intune_license_consumed_units")
        for s in samples(text, name, "northwind")
        if s["sku"] == "EMS"
    }
    assert ems["consumed"] == ems["enabled"] > 0  # the contractors' SKU ran out
    pipelines = {
        s["estate"]: s["pipeline"] for s in samples(text, "intune_provisioning_pipeline_info", "northwind")
    }
    assert pipelines == {"northwind": "cloud"}


# ------------------------------------------------------------------------------------ determinism
def test_same_seed_and_clock_give_the_same_metrics_whatever_the_wall_clock(
    demo: Demo, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(time, "time", lambda: START - 400 * DAY)  # nothing may read the wall clock
    again = build(lambda: START)
    assert render(again.snapshot) == render(demo.snapshot)
    other_seed = HybridEstate(CONTOSO, lambda: START, "demo-1")
    assert (
        other_seed.read_ad().array("k_guid").tolist()
        != demo.estates["contoso"].read_ad().array("k_guid").tolist()
    )


def test_new_hires_keep_coming_for_a_month() -> None:
    now = [START]
    estate = HybridEstate(CONTOSO, lambda: now[0], "demo-0")
    hired = [len(estate.existing(now[0]))]
    for days in (1, 2, FUTURE_HIRING_DAYS + 1, FUTURE_HIRING_DAYS + 5):
        now[0] = START + days * DAY
        hired.append(len(estate.existing(now[0])))
    assert hired[0] < hired[1] < hired[2] < hired[3] == hired[4]
    assert estate.read_ad().n > 0


# ------------------------------------------------------------------------------------ the process
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except OSError:
        return 0, b""


def test_the_demo_process_is_ready_within_seconds_and_shows_every_estate() -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "exporter", "--demo", "--web.listen-address", f"127.0.0.1:{port}"]
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        started = time.monotonic()
        while get(f"{base}/-/ready")[0] != 200:
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() - started < 10, "the demo was not ready within 10 seconds"
            time.sleep(0.1)
        status, page = get(f"{base}/")
        assert status == 200
        for name in ("contoso", "fabrikam", "northwind"):
            assert name.encode() in page
        status, body = get(f"{base}/stuck")
        assert status == 200
        document: dict[str, Any] = json.loads(body)
        northwind = next(e for e in document["estates"] if e["estate"] == "northwind")
        assert northwind["pipeline"] == "cloud"
        users = [u for stage in northwind["stages"].values() for u in stage.get("users", [])]
        assert users and all(u["reason"] and u["detail"] and u["action"] for u in users)
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=20)
