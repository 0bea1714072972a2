"""Hardening of the Graph sources (issue 12.1 and 12.8) against the simulator's faults:

- a trickling answer (a byte every half second keeps requests' per-read timeout alive) ends at the
  refresh deadline, and the next refresh against the healthy simulator succeeds at once;
- ``abort()`` from another thread (the engine at the deadline) cuts a hung request at once;
- retries stop before the deadline and report the underlying error (connection refused), not a
  timeout; a Retry-After that would pass the deadline fails as ``throttled`` without waiting;
- Graph's throttling headers are recorded per endpoint; messages go through the secret mask.
"""

from __future__ import annotations

import threading
import time
import urllib.parse

import pytest

from exporter.secrets import MASK
from exporter.sources.base import Abortable, SourceError
from exporter.sources.graph import RetryPolicy
from tests.entra import tenant_data
from tests.entra.conftest import Harness
from tests.entra.graph_sim import GraphSimulator

TID = tenant_data.TENANT_ID


def _refresh_in_thread(target: object, *args: object) -> tuple[threading.Thread, list[object]]:
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(target(*args))  # type: ignore[operator]
        except SourceError as exc:
            outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    return worker, outcome


def _wait_for(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def test_trickling_page_ends_at_the_deadline_and_the_next_refresh_succeeds(
    sim: GraphSimulator, entra: Harness
) -> None:
    sim.tenants[TID].users = tenant_data.users(2500)
    # Headers at once, then one byte every 0.3 s until the faults are cleared (never, here).
    sim.add_fault("users", 2, "trickle", interval=0.3, duration=None)
    source = entra.users(entra.config(timeout=10.0))
    started = time.monotonic()
    with pytest.raises(SourceError) as failure:
        source.refresh(None, started + 3.0)
    elapsed = time.monotonic() - started
    assert 2.9 <= elapsed < 4.0  # the deadline, not requests' 10 s per-read timeout (never reached)
    assert failure.value.reason == "timeout"
    assert "cut off at the refresh deadline" in failure.value.message
    # The simulator is still trickling into the dead connection; the next refresh opens a new one.
    started = time.monotonic()
    table = source.refresh(None, time.monotonic() + 30)
    assert table.n == 2500
    assert time.monotonic() - started < 3.0
    assert sim.request_counts()["users"] == 2 + 3


def test_abort_from_another_thread_cuts_a_hung_request(sim: GraphSimulator, entra: Harness) -> None:
    sim.add_fault("users", 1, "hang")  # read, never answered
    source = entra.users()
    assert isinstance(source, Abortable)
    worker, outcome = _refresh_in_thread(source.refresh, None, time.monotonic() + 60)
    _wait_for(lambda: sim.request_counts().get("users", 0) == 1)
    time.sleep(0.2)
    aborted = time.monotonic()
    source.abort()
    worker.join(timeout=5)
    assert not worker.is_alive()
    assert time.monotonic() - aborted < 1.0
    (error,) = outcome
    assert isinstance(error, SourceError) and error.reason == "timeout"
    assert "aborted" in error.message
    sim.clear_faults()
    assert source.refresh(None, time.monotonic() + 30).n == 10  # the next refresh starts fresh


def test_abort_of_one_source_leaves_the_other_sources_request_alone(
    sim: GraphSimulator, entra: Harness
) -> None:
    client = entra.client()
    users, organization = entra.users(client=client), entra.organization(client=client)
    users.refresh(None)  # the token is cached from here on
    sim.add_fault("subscribedSkus", 1, "delay", delay=1.0)
    worker, outcome = _refresh_in_thread(organization.refresh, None, time.monotonic() + 30)
    _wait_for(lambda: sim.request_counts().get("subscribedSkus", 0) == 1)
    users.abort()
    worker.join(timeout=10)
    assert not isinstance(outcome[0], SourceError)
    assert len(outcome[0].skus) == 4  # type: ignore[attr-defined]


def test_connection_refused_reports_the_underlying_error_before_the_deadline(
    sim: GraphSimulator, entra: Harness
) -> None:
    """Graph stopped: retries (1 s, 2 s, ...) stop when the next wait would pass the deadline, and
    the error is the connection failure (reason network), not a timeout."""
    client = entra.client(retry=RetryPolicy(attempts=4, backoff_base=1.0))
    source = entra.users(client=client)
    first = source.refresh(None)  # msal now has a token: only Graph requests fail below
    sim.pause()
    try:
        started = time.monotonic()
        with pytest.raises(SourceError) as failure:
            source.refresh(first, started + 2.5)
        elapsed = time.monotonic() - started
    finally:
        sim.resume()
    assert failure.value.reason == "network"
    assert "Connection refused after 2 attempt(s)" in failure.value.message
    assert "no time for another attempt before the refresh deadline" in failure.value.message
    assert 0.9 <= elapsed < 2.0  # one 1 s wait; the 2 s wait would have ended after the deadline
    assert source.refresh(first, time.monotonic() + 30).meta["read"] == "incremental"


def test_retry_after_beyond_the_deadline_fails_at_once_as_throttled(
    sim: GraphSimulator, entra: Harness
) -> None:
    sim.add_fault("users", 1, "429", retry_after=5)
    source = entra.users(entra.config(max_retry_wait=60.0))
    started = time.monotonic()
    with pytest.raises(SourceError) as failure:
        source.refresh(None, started + 2.0)
    assert time.monotonic() - started < 1.5
    assert failure.value.reason == "throttled"
    assert "would pass the refresh deadline" in failure.value.message


def test_refresh_without_time_left_does_not_start(sim: GraphSimulator, entra: Harness) -> None:
    with pytest.raises(SourceError) as failure:
        entra.users().refresh(None, time.monotonic() - 1)
    assert failure.value.reason == "timeout"
    assert sim.request_counts().get("usersDelta", 0) == 0


def test_deadline_timer_does_not_outlive_a_finished_refresh(sim: GraphSimulator, entra: Harness) -> None:
    source = entra.users()
    first = source.refresh(None, time.monotonic() + 0.8)
    time.sleep(1.0)  # the first refresh's deadline has passed; nothing may cut the next one
    assert source.refresh(first, time.monotonic() + 30).meta["read"] == "incremental"


def test_devices_trickle_is_cut_at_the_deadline(sim: GraphSimulator, entra: Harness) -> None:
    sim.tenants[TID].devices = [tenant_data.managed_device(i, i % 10) for i in range(20)]
    sim.tenants[TID].apps[tenant_data.CLIENT_ID].permissions = frozenset(
        {"User.Read.All", "DeviceManagementManagedDevices.Read.All"}
    )
    sim.add_fault("managedDevices", 1, "trickle", interval=0.3, duration=None)
    source = entra.devices()
    started = time.monotonic()
    with pytest.raises(SourceError) as failure:
        source.refresh(None, started + 2.0)
    assert failure.value.reason == "timeout"
    assert time.monotonic() - started < 3.0
    assert source.refresh(None, time.monotonic() + 30).n == 20


# ---------------------------------------------------------------------------- throttling headers
def test_throttle_limit_percentage_and_resource_units_per_endpoint(
    sim: GraphSimulator, entra: Harness
) -> None:
    sim.tenants[TID].users = tenant_data.users(2500)
    sim.throttle.limit_percentage["users"] = 1.2
    client = entra.client()
    source = entra.users(client=client)
    table = source.refresh(None)
    stats = client.http_stats()
    assert stats.throttle_limit_percentage == {"users": pytest.approx(120.0)}
    # With $select every identity request costs one resource unit (Graph's x-ms-resource-unit).
    assert stats.resource_units == {"usersDelta": 1.0, "usersCount": 1.0, "users": 3.0}
    del sim.throttle.limit_percentage["users"]
    source.refresh(table)  # the licence sweep lists users again, now without the header
    stats = client.http_stats()
    assert "users" not in stats.throttle_limit_percentage  # usage fell below 80%: no stale value
    assert stats.resource_units["users"] == 6.0
    assert stats.resource_units["usersDelta"] == 2.0


def test_messages_go_through_the_secret_mask(sim: GraphSimulator, entra: Harness) -> None:
    client = entra.client()
    secret = tenant_data.CLIENT_SECRET
    encoded = urllib.parse.quote(secret, safe="")
    assert client.mask(f"echo {secret} and {encoded}") == f"echo {MASK} and {MASK}"
