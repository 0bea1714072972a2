"""Acceptance: kill the exporter and restart it with a state_file; it serves the same counts at once,
before any backend answered (every backend here is a black hole that accepts and never replies)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from exporter.config import Config, EstateConfig
from exporter.engine import Engine
from exporter.model import OrganizationData, SubscribedSku
from exporter.state import StateStore
from tests.builders import ad, ad_user, cm, cm_for, entra, entra_for
from tests.fakes import FakeSource

ROOT = Path(__file__).resolve().parent.parent
HOUR = 3600.0


@pytest.fixture
def black_hole():
    """A TCP port that completes connections (kernel backlog) but never reads or answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield sock.getsockname()[1]
    sock.close()


def seed_state(path: Path, now: float) -> None:
    users = [ad_user(f"restart{i}", when_created=now - 30 * HOUR) for i in range(12)]
    synced = [entra_for(u, created=now - 29 * HOUR) for u in users[2:]]
    records = [cm_for(u, creation_date=now - 28 * HOUR) for u in users[4:6]]
    records += [cm_for(u, in_collection=True) for u in users[6:9]]
    records += [
        cm_for(u, in_collection=True, cloud_user_id=e.id) for u, e in zip(users[9:], synced[7:], strict=True)
    ]
    org = OrganizationData(True, now - 600, (SubscribedSku("sku", "INTUNE_A", 7, 10, 0, 0, 0),), ())
    data = {"ad": ad(*users), "entra": entra(*synced), "configmgr": cm(*records), "entra_organization": org}
    engine = Engine(
        Config(estates=(EstateConfig(name="contoso"),)),
        {"contoso": [FakeSource(kind, value) for kind, value in data.items()]},
        state_store=StateStore(path),
    )
    engine.refresh_all()
    engine.persist()


def config_text(port: int, state: Path, secret_file: Path) -> str:
    return textwrap.dedent(
        f"""
        refresh_interval: 5m
        state_file: {state}
        estates:
          - name: contoso
            active_directory:
              url: ldaps://127.0.0.1:{port}
              bind_user: svc@test.local
              bind_password_file: {secret_file}
              search_bases: ["DC=test,DC=local"]
              timeout: 60s
            entra:
              tenant_id: 11111111-1111-1111-1111-111111111111
              client_id: 22222222-2222-2222-2222-222222222222
              client_secret_file: {secret_file}
              authority_host: https://127.0.0.1:{port}
              graph_url: https://127.0.0.1:{port}
              timeout: 60s
            configmgr:
              connection_string: "DRIVER={{FreeTDS}};SERVER=127.0.0.1;PORT={port};DATABASE=CM_PS1;TDS_Version=7.4"
              intune_collection_ids: [PS100012]
              query_timeout: 60s
        """
    )


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith(("intune_provisioning", "intune_license"))
    }


def start(config: Path, port: int) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "exporter",
            "--config.file",
            str(config),
            "--web.listen-address",
            f"127.0.0.1:{port}",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def first_scrape(port: int, process: subprocess.Popen, deadline: float = 20.0):
    """The first scrape once the exporter is ready: it answers at once and is ready as soon as the
    state file is restored, while every backend is a black hole."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        assert process.poll() is None, process.communicate()[1]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=5) as response:
                if response.status == 200:
                    return scrape(port)
        except urllib.error.HTTPError as error:
            assert error.code == 503  # serving, still restoring
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.05)
    raise AssertionError("exporter did not become ready from its state file")


def test_restart_serves_persisted_counts_before_any_backend_answers(tmp_path, black_hole):
    state = tmp_path / "state.json"
    seed_state(state, time.time())
    secret = tmp_path / "secret"
    secret.write_text("Passw0rd!Passw0rd\n")
    config = tmp_path / "config.yml"
    config.write_text(config_text(black_hole, state, secret))
    never_called = [FakeSource(k, None) for k in ("ad", "entra", "configmgr", "entra_organization")]
    reference = Engine(
        Config(estates=(EstateConfig(name="contoso"),)),
        {"contoso": never_called},
        state_store=StateStore(state),
    )
    reference.restore()
    snapshot = reference.snapshot()
    expected = snapshot.estates[0].evaluation.summary(time.time())

    for attempt in range(2):
        port = _free_port()
        process = start(config, port)
        try:
            samples = first_scrape(port, process)
            for stage, count in expected.users.items():
                assert (
                    samples[
                        ("intune_provisioning_users", (("estate", "contoso"), ("provisioning_stage", stage)))
                    ]
                    == count
                )
            assert (
                samples[
                    (
                        "intune_provisioning_stuck_users",
                        (("estate", "contoso"), ("provisioning_stage", "ad_created")),
                    )
                ]
                == 2
            )
            assert (
                samples[
                    (
                        "intune_provisioning_stage_oldest_entry_timestamp_seconds",
                        (("estate", "contoso"), ("provisioning_stage", "ad_created")),
                    )
                ]
                == expected.oldest_entry["ad_created"]
            )
            assert (
                samples[
                    (
                        "intune_provisioning_users_missing_cloud_user_id",
                        (("estate", "contoso"), ("in_intune_collection", "true")),
                    )
                ]
                == 3
            )
            assert (
                samples[
                    (
                        "intune_license_consumed_units",
                        (("estate", "contoso"), ("sku", "INTUNE_A"), ("sku_name", "Intune")),
                    )
                ]
                == 7
            )
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=5) as response:
                assert response.status == 200
        finally:
            # The first run is killed hard (no chance to save on the way out); the second stops cleanly.
            process.send_signal(signal.SIGKILL if attempt == 0 else signal.SIGTERM)
            _, err = process.communicate(timeout=30)
        assert "Passw0rd!Passw0rd" not in err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
