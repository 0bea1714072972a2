"""Throttling, transient failures, token expiry and timeouts, per request (paging never restarts)."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from exporter.sources.base import SourceError
from tests.entra import tenant_data
from tests.entra.conftest import Harness
from tests.entra.graph_sim import GraphSimulator


@pytest.fixture
def three_pages(sim: GraphSimulator) -> GraphSimulator:
    sim.tenants[tenant_data.TENANT_ID].users = tenant_data.users(2500)
    return sim


def _skiptokens(sim: GraphSimulator) -> list[str | None]:
    return [record.query.get("$skiptoken") for record in sim.requests_to("users")]


def _refresh_error(entra: Harness, **config: object) -> SourceError:
    with pytest.raises(SourceError) as failure:
        entra.users(entra.config(**config)).refresh(None)
    assert tenant_data.CLIENT_SECRET not in failure.value.message
    return failure.value


def test_429_on_a_page_waits_retry_after_and_continues(three_pages: GraphSimulator, entra: Harness) -> None:
    three_pages.add_fault("users", 2, "429", retry_after=1)
    client = entra.client()
    started = time.monotonic()
    data = entra.users(client=client).refresh(None)
    elapsed = time.monotonic() - started
    assert data.records == 2500
    assert elapsed >= 1.0
    assert [r.status for r in three_pages.requests_to("users")] == [200, 429, 200, 200]
    tokens = _skiptokens(three_pages)
    assert tokens[0] is None and tokens[1] == tokens[2] and tokens[3] not in (None, tokens[1])
    stats = client.http_stats()
    assert stats.throttled == 1
    assert stats.retry_wait_seconds == pytest.approx(1.0)
    assert stats.requests[("users", "429")] == 1
    assert stats.requests[("users", "200")] == 3


def test_throttling_beyond_max_retry_wait_fails_as_throttled(
    three_pages: GraphSimulator, entra: Harness
) -> None:
    three_pages.add_fault("users", 1, "429", retry_after=1, times=100)
    client = entra.client(entra.config(max_retry_wait=1.5))
    started = time.monotonic()
    with pytest.raises(SourceError) as failure:
        entra.users(client=client).refresh(None)
    elapsed = time.monotonic() - started
    assert failure.value.reason == "throttled"
    assert "max_retry_wait" in failure.value.message
    assert 1.0 <= elapsed < 3.0  # one 1 s wait; the second would exceed the 1.5 s budget
    assert client.http_stats().throttled == 2
    assert client.http_stats().retry_wait_seconds == pytest.approx(1.0)


def test_retry_after_longer_than_the_budget_fails_without_waiting(
    sim: GraphSimulator, entra: Harness
) -> None:
    sim.add_fault("users", 1, "429", retry_after=30)
    started = time.monotonic()
    error = _refresh_error(entra, max_retry_wait=5.0)
    assert error.reason == "throttled"
    assert time.monotonic() - started < 2.0


def test_503_with_retry_after_then_success(three_pages: GraphSimulator, entra: Harness) -> None:
    three_pages.add_fault("users", 3, "503", retry_after=1)
    client = entra.client()
    assert entra.users(client=client).refresh(None).records == 2500
    assert [r.status for r in three_pages.requests_to("users")] == [200, 200, 503, 200]
    assert client.http_stats().throttled == 1


def test_500_is_retried_with_backoff(three_pages: GraphSimulator, entra: Harness) -> None:
    three_pages.add_fault("users", 2, "500", times=2)
    client = entra.client()
    assert entra.users(client=client).refresh(None).records == 2500
    assert [r.status for r in three_pages.requests_to("users")] == [200, 500, 500, 200, 200]
    assert client.http_stats().throttled == 0
    assert client.http_stats().retry_wait_seconds == pytest.approx(0.05 + 0.1)


def test_persistent_5xx_fails_as_network(sim: GraphSimulator, entra: Harness) -> None:
    sim.add_fault("users", 1, "502", times=100)
    error = _refresh_error(entra)
    assert error.reason == "network"
    assert "HTTP 502" in error.message
    assert len(sim.requests_to("users")) == 3  # FAST_RETRY: three attempts


def test_connection_reset_is_retried(three_pages: GraphSimulator, entra: Harness) -> None:
    three_pages.add_fault("users", 2, "reset")
    client = entra.client()
    assert entra.users(client=client).refresh(None).records == 2500
    assert [r.status for r in three_pages.requests_to("users")] == [200, None, 200, 200]
    assert _skiptokens(three_pages)[1] == _skiptokens(three_pages)[2]
    assert client.http_stats().requests[("users", "error")] == 1


def test_persistent_resets_fail_as_network(sim: GraphSimulator, entra: Harness) -> None:
    sim.add_fault("users", 1, "reset", times=100)
    error = _refresh_error(entra)
    assert error.reason == "network"
    assert "connection failed" in error.message


def test_expired_token_is_renewed_once_and_paging_continues(
    three_pages: GraphSimulator, entra: Harness
) -> None:
    three_pages.add_fault("users", 2, "expire_tokens")
    client = entra.client()
    assert entra.users(client=client).refresh(None).records == 2500
    users = three_pages.requests_to("users")
    assert [r.status for r in users] == [200, 401, 200, 200]
    tokens = _skiptokens(three_pages)
    assert tokens.count(None) == 1  # page 1 was fetched once
    assert tokens[1] == tokens[2]  # the failed page was retried, not the whole collection
    assert users[1].token != users[2].token  # with a new token
    assert users[2].token == users[3].token
    assert len(three_pages.requests_to("token")) == 2
    assert client.http_stats().token_requests == 2


def test_a_second_401_is_an_auth_error(sim: GraphSimulator, entra: Harness) -> None:
    sim.add_fault("users", 1, "expire_tokens", times=2)
    error = _refresh_error(entra)
    assert error.reason == "auth"
    assert "InvalidAuthenticationToken" in error.message
    assert [r.status for r in sim.requests_to("users")] == [401, 401]


def test_timeout(sim: GraphSimulator, entra: Harness) -> None:
    sim.add_fault("users", 1, "delay", delay=3.0)
    started = time.monotonic()
    error = _refresh_error(entra, timeout=0.5)
    assert error.reason == "timeout"
    assert "0.5s" in error.message
    assert time.monotonic() - started < 2.5


def test_body_that_is_not_json_is_a_data_error(sim: GraphSimulator, entra: Harness) -> None:
    sim.add_fault("users", 1, "garbage")
    error = _refresh_error(entra)
    assert error.reason == "data"
    assert "not JSON" in error.message


def test_429_on_the_sku_call(sim: GraphSimulator, entra: Harness) -> None:
    sim.add_fault("subscribedSkus", 1, "429", retry_after=1)
    client = entra.client()
    data = entra.organization(client=client).refresh(None)
    assert len(data.skus) == 4
    assert [r.status for r in sim.requests_to("subscribedSkus")] == [429, 200]
    assert client.http_stats().throttled == 1


def test_unreachable_graph_host_is_a_network_error(sim: GraphSimulator, entra: Harness) -> None:
    with socket.socket() as probe:  # a port with nothing listening
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    graph_url = f"https://127.0.0.1:{closed_port}"
    sim.resource_url = graph_url  # the tenant issues tokens for that Graph
    client = entra.client(entra.config(graph_url=graph_url))
    with pytest.raises(SourceError) as failure:
        entra.users(client=client).refresh(None)
    assert failure.value.reason == "network"
    assert f"127.0.0.1:{closed_port}" in failure.value.message
    assert client.http_stats().requests[("usersDelta", "error")] == 3


def test_budget_is_per_refresh(three_pages: GraphSimulator, entra: Harness) -> None:
    client = entra.client(entra.config(max_retry_wait=1.0))
    source = entra.users(client=client)
    three_pages.add_fault("users", 1, "429", retry_after=1)
    assert source.refresh(None).records == 2500
    three_pages.add_fault("users", 5, "429", retry_after=1)  # the next refresh has a fresh budget
    assert source.refresh(None).records == 2500
    assert client.http_stats().retry_wait_seconds == pytest.approx(2.0)


def test_close_interrupts_a_retry_wait(sim: GraphSimulator, entra: Harness) -> None:
    sim.add_fault("users", 1, "429", retry_after=30)
    client = entra.client(entra.config(max_retry_wait=60.0))
    source = entra.users(client=client)
    outcome: list[BaseException] = []

    def refresh() -> None:
        try:
            source.refresh(None)
        except SourceError as exc:
            outcome.append(exc)

    worker = threading.Thread(target=refresh)
    worker.start()
    deadline = time.monotonic() + 10
    while not sim.requests_to("users") and time.monotonic() < deadline:
        time.sleep(0.02)
    started = time.monotonic()
    client.close()
    worker.join(timeout=5)
    assert not worker.is_alive()
    assert time.monotonic() - started < 2.0
    assert isinstance(outcome[0], SourceError) and outcome[0].reason == "other"
