"""EntraUsersSource against the simulator: paging, filtering and normalisation of users."""

from __future__ import annotations

import threading

import pytest

from exporter.model import AssignedLicense, EntraData, OrganizationData
from exporter.sources.base import Source, SourceError
from exporter.sources.entra import USER_PROPERTIES, parse_user
from tests.entra import tenant_data
from tests.entra.conftest import Harness
from tests.entra.graph_sim import GraphSimulator


def test_thousands_of_users_over_several_pages(sim: GraphSimulator, entra: Harness) -> None:
    sim.tenants[tenant_data.TENANT_ID].users = tenant_data.users(2500, cloud_every=10)
    data = entra.users().refresh(None)
    assert isinstance(data, EntraData)
    assert data.records == 2500
    assert len(data.users) == 2250  # every 10th user is cloud-only
    assert len({user.id for user in data.users}) == 2250
    pages = sim.requests_to("users")
    assert [record.status for record in pages] == [200, 200, 200]
    assert pages[0].query["$top"] == "999"
    assert set(pages[0].query["$select"].split(",")) == set(USER_PROPERTIES)
    assert "$skiptoken" not in pages[0].query
    assert all("$skiptoken" in record.query for record in pages[1:])


def test_page_size_comes_from_config(sim: GraphSimulator, entra: Harness) -> None:
    sim.tenants[tenant_data.TENANT_ID].users = tenant_data.users(25)
    data = entra.users(entra.config(page_size=10)).refresh(None)
    assert data.records == 25
    assert [record.query["$top"] for record in sim.requests_to("users")] == ["10", "10", "10"]


def test_cloud_only_users_are_counted_but_not_kept(sim: GraphSimulator, entra: Harness) -> None:
    sim.tenants[tenant_data.TENANT_ID].users = [
        tenant_data.graph_user(0),
        tenant_data.graph_user(1, synced=False),
        tenant_data.graph_user(2),
    ]
    data = entra.users().refresh(None)
    assert data.records == 3
    assert [user.id for user in data.users] == [tenant_data.user_id(0), tenant_data.user_id(2)]
    assert all(user.on_premises_sync_enabled for user in data.users)


def test_synced_user_is_normalised(sim: GraphSimulator, entra: Harness) -> None:
    user = tenant_data.graph_user(
        7,
        errors=("PropertyConflict", "PropertyConflict"),
        licenses=[
            {"skuId": tenant_data.E3_SKU.upper(), "disabledPlans": [tenant_data.TEAMS_PLAN.upper()]},
            {"skuId": tenant_data.INTUNE_A_SKU, "disabledPlans": []},
        ],
    )
    user["id"] = user["id"].upper()
    user["onPremisesSecurityIdentifier"] = user["onPremisesSecurityIdentifier"].lower()
    sim.tenants[tenant_data.TENANT_ID].users = [user]
    (entra_user,) = entra.users().refresh(None).users
    assert entra_user.id == tenant_data.user_id(7)
    assert entra_user.on_premises_security_identifier == tenant_data.sid(7)
    assert entra_user.on_premises_immutable_id == tenant_data.immutable_id(7)
    assert entra_user.on_premises_sam_account_name == "user00007"
    assert entra_user.user_principal_name == "user00007@contoso.example"
    assert entra_user.account_enabled is True
    assert entra_user.created == 1709280900.0  # 2024-03-01T08:15:00Z
    assert entra_user.provisioning_error_categories == ("PropertyConflict", "PropertyConflict")
    assert entra_user.assigned_licenses == (
        AssignedLicense(tenant_data.E3_SKU, (tenant_data.TEAMS_PLAN,)),
        AssignedLicense(tenant_data.INTUNE_A_SKU, ()),
    )


def test_null_immutable_id_and_creation_date(sim: GraphSimulator, entra: Harness) -> None:
    sim.tenants[tenant_data.TENANT_ID].users = [tenant_data.graph_user(3, immutable=False, created=None)]
    (user,) = entra.users().refresh(None).users
    assert user.on_premises_immutable_id is None
    assert user.on_premises_security_identifier == tenant_data.sid(3)
    assert user.created is None
    assert user.provisioning_error_categories == ()


def test_empty_tenant(sim: GraphSimulator, entra: Harness) -> None:
    sim.tenants[tenant_data.TENANT_ID].users = []
    assert entra.users().refresh(None) == EntraData(users=(), records=0)


def test_unexpected_user_shape_is_a_data_error() -> None:
    user = tenant_data.graph_user(1)
    user["onPremisesSecurityIdentifier"] = "not-a-sid"
    with pytest.raises(ValueError, match="onPremisesSecurityIdentifier"):
        parse_user(user)
    user = tenant_data.graph_user(1)
    user["assignedLicenses"] = [{"skuId": "not-a-guid"}]
    with pytest.raises(ValueError, match="skuId"):
        parse_user(user)


def test_malformed_user_from_graph_fails_the_refresh_with_data(sim: GraphSimulator, entra: Harness) -> None:
    broken = tenant_data.graph_user(1)
    broken["accountEnabled"] = "yes"
    sim.tenants[tenant_data.TENANT_ID].users = [tenant_data.graph_user(0), broken]
    with pytest.raises(SourceError) as failure:
        entra.users().refresh(None)
    assert failure.value.reason == "data"
    assert "accountEnabled" in failure.value.message


def test_describe_names_host_and_tenant(sim: GraphSimulator, entra: Harness) -> None:
    source = entra.users()
    assert isinstance(source, Source)
    assert source.describe() == f"127.0.0.1:{sim.port} tenant {tenant_data.TENANT_ID}"
    assert tenant_data.CLIENT_SECRET not in source.describe()


def test_two_sources_refresh_concurrently_on_one_client(sim: GraphSimulator, entra: Harness) -> None:
    sim.tenants[tenant_data.TENANT_ID].users = tenant_data.users(1500)
    client = entra.client()
    users, organization = entra.users(client=client), entra.organization(client=client)
    results: dict[str, object] = {}
    barrier = threading.Barrier(2)

    def run(name: str, source: Source) -> None:
        barrier.wait()
        try:
            results[name] = source.refresh(None)
        except SourceError as exc:  # pragma: no cover - reported by the assertions
            results[name] = exc

    threads = [
        threading.Thread(target=run, args=("users", users)),
        threading.Thread(target=run, args=("organization", organization)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert isinstance(results["users"], EntraData)
    assert isinstance(results["organization"], OrganizationData)
    assert results["users"].records == 1500
    stats = client.http_stats()
    assert stats.token_requests == 1  # the second thread got the cached token
    assert stats.requests[("users", "200")] == 2
    assert stats.requests[("subscribedSkus", "200")] == 1
