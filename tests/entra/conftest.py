"""Fixtures of the Entra tests: one Graph simulator per session, reset before every test."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from exporter.config import EntraConfig, Secret
from exporter.sources.devices import IntuneDevicesSource
from exporter.sources.entra import EntraOrganizationSource, EntraUsersSource
from exporter.sources.graph import GraphClient, RetryPolicy
from tests.conftest import require_component
from tests.entra import tenant_data
from tests.entra.graph_sim import GraphSimulator

try:
    import trustme
except ImportError:  # pragma: no cover - reported by require_component
    trustme = None  # type: ignore[assignment]

# Small backoffs so that retry tests stay fast; Retry-After values come from the simulator.
FAST_RETRY = RetryPolicy(attempts=3, backoff_base=0.05, backoff_max=0.2)


@pytest.fixture(scope="session")
def ca() -> Any:
    require_component("trustme", trustme is not None, "pip install trustme")
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_file(ca: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("entra-ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture(scope="session")
def graph_server(ca: Any) -> Iterator[GraphSimulator]:
    server = GraphSimulator(ca)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def sim(graph_server: GraphSimulator) -> GraphSimulator:
    """The simulator with the default tenant (10 synced users, 4 SKUs, 4 subscriptions), no faults."""
    graph_server.reset()
    graph_server.add_tenant(tenant_data.tenant())
    return graph_server


class Harness:
    """Builds configs, clients and sources pointed at the simulator; closes them afterwards."""

    def __init__(self, sim: GraphSimulator, ca_file: str) -> None:
        self.sim = sim
        self.ca_file = ca_file
        self.clients: list[GraphClient] = []

    def config(self, **overrides: Any) -> EntraConfig:
        config = EntraConfig(
            tenant_id=tenant_data.TENANT_ID,
            client_id=tenant_data.CLIENT_ID,
            client_secret=Secret(tenant_data.CLIENT_SECRET),
            authority_host=self.sim.base_url,
            graph_url=self.sim.base_url,
            ca_file=self.ca_file,
            timeout=10.0,
            max_retry_wait=5.0,
        )
        return dataclasses.replace(config, **overrides)

    def client(self, config: EntraConfig | None = None, retry: RetryPolicy = FAST_RETRY) -> GraphClient:
        client = GraphClient(config or self.config(), retry=retry)
        self.clients.append(client)
        return client

    def users(
        self, config: EntraConfig | None = None, client: GraphClient | None = None, **options: Any
    ) -> EntraUsersSource:
        """The users source; ``options`` go to EntraUsersSource (license_refresh_interval, clock)."""
        config = config or self.config()
        return EntraUsersSource(config, client or self.client(config), **options)

    def devices(
        self, config: EntraConfig | None = None, client: GraphClient | None = None
    ) -> IntuneDevicesSource:
        config = config or self.config()
        return IntuneDevicesSource(config, client or self.client(config))

    def organization(
        self, config: EntraConfig | None = None, client: GraphClient | None = None
    ) -> EntraOrganizationSource:
        config = config or self.config()
        return EntraOrganizationSource(config, client or self.client(config))

    def close(self) -> None:
        for client in self.clients:
            client.close()


@pytest.fixture
def entra(sim: GraphSimulator, ca_file: str) -> Iterator[Harness]:
    harness = Harness(sim, ca_file)
    yield harness
    harness.close()


@pytest.fixture
def write_file(tmp_path: Path) -> Any:
    def write(name: str, data: bytes) -> str:
        path = tmp_path / name
        path.write_bytes(data)
        return str(path)

    return write
