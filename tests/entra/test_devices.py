"""The intune_devices source against the simulator: paging with Intune's page size, normalisation, a
missing permission (only this source down), point look-ups by user, and when the factory builds it."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import pytest

from exporter.config import parse_config
from exporter.model import DeviceTable
from exporter.sources.base import SourceError
from exporter.sources.devices import DEVICE_PAGE_SIZE, IntuneDevicesSource
from exporter.sources.entra import EntraUsersSource, build_entra_sources
from exporter.sources.factory import build_estate_sources, reads_devices
from exporter.sources.graph_records import DEVICE_PROPERTIES
from tests.entra import tenant_data
from tests.entra.conftest import Harness
from tests.entra.graph_sim import GraphSimulator

TID = tenant_data.TENANT_ID
DEVICES = "DeviceManagementManagedDevices.Read.All"


@pytest.fixture
def devices_allowed(sim: GraphSimulator) -> GraphSimulator:
    sim.tenants[TID].apps[tenant_data.CLIENT_ID].permissions = frozenset(
        {"User.Read.All", "Organization.Read.All", DEVICES}
    )
    return sim


def test_devices_are_read_in_pages_of_1000(devices_allowed: GraphSimulator, entra: Harness) -> None:
    sim = devices_allowed
    sim.tenants[TID].devices = [tenant_data.managed_device(i, i % 900) for i in range(2300)]
    table = entra.devices().refresh(None, time.monotonic() + 60)
    assert isinstance(table, DeviceTable)
    assert table.n == 2300 and table.meta["read"] == "full"
    pages = sim.requests_to("managedDevices")
    assert len(pages) == math.ceil(2300 / DEVICE_PAGE_SIZE) == 3
    assert pages[0].query["$top"] == "1000"
    assert pages[0].query["$select"].split(",") == list(DEVICE_PROPERTIES)


def test_device_records_are_normalised(devices_allowed: GraphSimulator, entra: Harness) -> None:
    sim = devices_allowed
    co_managed = tenant_data.managed_device(
        1, 5, compliance="configManager", agent="configurationManagerClientMdm", operating_system="Windows"
    )
    co_managed["id"] = co_managed["id"].upper()
    never_synced = tenant_data.managed_device(
        2, None, compliance="unknown", operating_system="iOS", last_sync="0001-01-01T00:00:00Z", enrolled=None
    )
    sim.tenants[TID].devices = [co_managed, never_synced]
    table = entra.devices().refresh(None)
    first, second = table.record(0), table.record(1)
    assert first.id == tenant_data.device_id(1)
    assert first.user_id == tenant_data.user_id(5)
    assert (first.operating_system, first.compliance_state, first.management_agent) == (
        "Windows",
        "configManager",
        "configurationManagerClientMdm",
    )
    assert first.enrolled == 1709373600.0  # 2024-03-02T10:00:00Z
    assert first.device_name == "DESKTOP-000001"
    assert second.user_id is None
    assert second.last_sync is None and second.enrolled is None  # Intune's 0001-01-01 means never
    assert list(table.user_index().rows_with(int(table.array("k_user")[0]))) == [0]


def test_missing_device_permission_fails_only_this_source(sim: GraphSimulator, entra: Harness) -> None:
    sim.tenants[TID].devices = [tenant_data.managed_device(0, 0)]
    client = entra.client()
    with pytest.raises(SourceError) as failure:
        entra.devices(client=client).refresh(None)
    assert failure.value.reason == "auth"
    assert DEVICES in failure.value.message
    assert "Application is not authorized" in failure.value.message  # Intune's own message, unwrapped
    assert "Operation ID" not in failure.value.message and "\r\n" not in failure.value.message
    assert entra.users(client=client).refresh(None).n == 10  # the users source keeps working
    assert len(entra.organization(client=client).refresh(None).skus) == 4


def test_device_throttling_is_waited_out(devices_allowed: GraphSimulator, entra: Harness) -> None:
    devices_allowed.tenants[TID].devices = [tenant_data.managed_device(i, i) for i in range(5)]
    devices_allowed.add_fault("managedDevices", 1, "429", retry_after=1)
    client = entra.client()
    assert entra.devices(client=client).refresh(None).n == 5
    assert client.http_stats().throttled == 1
    assert client.http_stats().requests[("managedDevices", "429")] == 1


def test_malformed_device_is_a_data_error(devices_allowed: GraphSimulator, entra: Harness) -> None:
    broken = tenant_data.managed_device(0, 0)
    broken["userId"] = "not-a-guid"
    devices_allowed.tenants[TID].devices = [broken]
    with pytest.raises(SourceError) as failure:
        entra.devices().refresh(None)
    assert failure.value.reason == "data" and "userId" in failure.value.message


def test_find_devices_asks_per_user(devices_allowed: GraphSimulator, entra: Harness) -> None:
    sim = devices_allowed
    sim.tenants[TID].devices = [tenant_data.managed_device(i, i % 7) for i in range(30)]
    wanted = [tenant_data.user_id(3), tenant_data.user_id(5).upper(), "not-a-guid", tenant_data.user_id(3)]
    table = entra.devices().find_devices(wanted, deadline=time.monotonic() + 30)
    assert sorted(table.record(r).id for r in range(table.n)) == sorted(
        tenant_data.device_id(i) for i in range(30) if i % 7 in (3, 5)
    )
    filters = [r.query["$filter"] for r in sim.requests_to("managedDevices")]
    assert filters == [f"userId eq '{tenant_data.user_id(3)}'", f"userId eq '{tenant_data.user_id(5)}'"]


# ---------------------------------------------------------------------------- who builds it
def _estate(tmp_path: Path, pipeline: str, devices: bool | None) -> Any:
    entra: dict[str, Any] = {
        "tenant_id": tenant_data.TENANT_ID,
        "client_id": tenant_data.CLIENT_ID,
        "client_secret": "s3cret-value-for-tests",
    }
    if devices is not None:
        entra["devices"] = devices
    estate: dict[str, Any] = {"name": "e", "pipeline": pipeline, "entra": entra}
    if pipeline == "cloud":
        estate["active_directory"] = {
            "url": "ldaps://dc01.contoso.example:636",
            "bind_user": "svc@contoso.example",
            "bind_password": "pw-for-tests",
            "search_bases": ["DC=contoso,DC=example"],
        }
    return parse_config({"estates": [estate]}, base_dir=tmp_path).estates[0]


@pytest.mark.parametrize(
    ("pipeline", "devices", "expected"),
    [("cloud", None, True), ("cloud", True, True), ("hybrid_mdm", None, False), ("hybrid_mdm", True, True)],
)
def test_factory_builds_devices_for_cloud_or_when_asked(
    tmp_path: Path, pipeline: str, devices: bool | None, expected: bool
) -> None:
    estate = _estate(tmp_path, pipeline, devices)
    assert reads_devices(estate) is expected
    sources = build_estate_sources(estate)
    try:
        kinds = [source.kind for source in sources]
        assert ("intune_devices" in kinds) is expected
        graph = [s for s in sources if isinstance(s, EntraUsersSource | IntuneDevicesSource)]
        assert len({id(s.client) for s in graph}) == 1  # one token cache per tenant
    finally:
        for source in sources:
            source.close()


def test_build_entra_sources_with_devices(sim: GraphSimulator, entra: Harness) -> None:
    sources = build_entra_sources(entra.config(), devices=True)
    try:
        assert [s.kind for s in sources] == ["entra", "entra_organization", "intune_devices"]
    finally:
        for source in sources:
            source.close()
