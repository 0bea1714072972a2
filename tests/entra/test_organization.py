"""EntraOrganizationSource: sync status, subscribed SKUs and subscriptions (licenses)."""

from __future__ import annotations

import pytest

from exporter.model import OrganizationData, ServicePlan
from exporter.products import product_name
from exporter.sources.base import HttpStatsProvider, Source, SourceError
from exporter.sources.entra import EntraOrganizationSource, EntraUsersSource, build_entra_sources
from tests.entra import tenant_data
from tests.entra.conftest import Harness
from tests.entra.graph_sim import GraphSimulator, SimApp


def _refresh(entra: Harness) -> OrganizationData:
    data = entra.organization().refresh(None)
    assert isinstance(data, OrganizationData)
    return data


def test_sync_status(sim: GraphSimulator, entra: Harness) -> None:
    data = _refresh(entra)
    assert data.sync_enabled is True
    assert data.last_sync == 1714557600.0  # 2024-05-01T10:00:00Z
    (organization,) = sim.requests_to("organization")
    assert organization.query["$select"] == "id,onPremisesSyncEnabled,onPremisesLastSyncDateTime"


def test_tenant_that_never_synced(sim: GraphSimulator, entra: Harness) -> None:
    sim.tenants[tenant_data.TENANT_ID].organization = tenant_data.organization(
        sync_enabled=None, last_sync=None
    )
    data = _refresh(entra)
    assert data.sync_enabled is None
    assert data.last_sync is None


def test_subscribed_skus(sim: GraphSimulator, entra: Harness) -> None:
    skus = {sku.sku_part_number: sku for sku in _refresh(entra).skus}
    assert set(skus) == {"INTUNE_A", "ENTERPRISEPACK", "EMS", "CONTOSO_CUSTOM_SKU"}

    intune = skus["INTUNE_A"]
    assert (intune.prepaid_enabled, intune.consumed_units) == (100, 90)
    assert intune.service_plans == (ServicePlan(tenant_data.INTUNE_A_PLAN, "INTUNE_A"),)

    e3 = skus["ENTERPRISEPACK"]  # Graph sent its GUIDs upper-case
    assert e3.sku_id == tenant_data.E3_SKU
    assert (e3.prepaid_enabled, e3.prepaid_warning, e3.prepaid_suspended, e3.prepaid_locked_out) == (
        50,
        10,
        5,
        0,
    )
    assert [plan.id for plan in e3.service_plans] == [tenant_data.EXCHANGE_PLAN, tenant_data.TEAMS_PLAN]

    ems = skus["EMS"]  # more assigned than purchased is reported, not clamped
    assert (ems.prepaid_enabled, ems.consumed_units) == (20, 25)

    custom = skus["CONTOSO_CUSTOM_SKU"]
    assert custom.prepaid_locked_out == 2
    assert custom.service_plans == ()


def test_sku_names_from_product_table(sim: GraphSimulator, entra: Harness) -> None:
    names = {
        sku.sku_part_number: product_name(sku.sku_part_number, sku.sku_id) for sku in _refresh(entra).skus
    }
    assert names == {
        "INTUNE_A": "Intune",
        "ENTERPRISEPACK": "Office 365 E3",
        "EMS": "Enterprise Mobility + Security E3",
        "CONTOSO_CUSTOM_SKU": "CONTOSO_CUSTOM_SKU",  # unknown: falls back to the part number
    }


def test_subscriptions_with_and_without_dates(sim: GraphSimulator, entra: Harness) -> None:
    subscriptions = {sub.id: sub for sub in _refresh(entra).subscriptions}
    assert set(subscriptions) == {"sub-intune-1", "sub-e3-1", "sub-ems-trial", "sub-custom"}
    e3 = subscriptions["sub-e3-1"]
    assert (e3.sku_id, e3.sku_part_number, e3.status) == (tenant_data.E3_SKU, "ENTERPRISEPACK", "Warning")
    assert e3.next_lifecycle == 1736944200.0  # 2025-01-15T12:30:00Z
    assert e3.total_licenses == 50
    assert e3.is_trial is False
    assert subscriptions["sub-ems-trial"].is_trial is True
    custom = subscriptions["sub-custom"]
    assert custom.next_lifecycle is None


def test_subscriptions_follow_next_link(sim: GraphSimulator, entra: Harness) -> None:
    sim.subscriptions_page_size = 3
    extra = [
        tenant_data.subscription(f"sub-extra-{i}", tenant_data.INTUNE_A_SKU, "INTUNE_A") for i in range(5)
    ]
    sim.tenants[tenant_data.TENANT_ID].subscriptions += extra
    data = _refresh(entra)
    assert len(data.subscriptions) == 9
    assert data.records == 4 + 9
    assert len(sim.requests_to("subscriptions")) == 3


def test_without_organization_permission_users_still_work(sim: GraphSimulator, entra: Harness) -> None:
    sim.tenants[tenant_data.TENANT_ID].apps[tenant_data.CLIENT_ID] = SimApp(
        tenant_data.CLIENT_ID, tenant_data.CLIENT_SECRET, None, frozenset({"User.Read.All"})
    )
    client = entra.client()
    with pytest.raises(SourceError) as failure:
        entra.organization(client=client).refresh(None)
    assert failure.value.reason == "auth"
    assert "Organization.Read.All" in failure.value.message
    assert entra.users(client=client).refresh(None).records == 10


def test_403_on_subscribed_skus_names_organization_permission(sim: GraphSimulator, entra: Harness) -> None:
    sim.add_fault("subscribedSkus", 1, "403")
    client = entra.client()
    with pytest.raises(SourceError) as failure:
        entra.organization(client=client).refresh(None)
    assert failure.value.reason == "auth"
    assert "Organization.Read.All" in failure.value.message
    assert "/v1.0/subscribedSkus" in failure.value.message
    assert entra.users(client=client).refresh(None).n == 10


def test_403_on_users_names_user_permission(sim: GraphSimulator, entra: Harness) -> None:
    sim.tenants[tenant_data.TENANT_ID].apps[tenant_data.CLIENT_ID] = SimApp(
        tenant_data.CLIENT_ID, tenant_data.CLIENT_SECRET, None, frozenset({"Organization.Read.All"})
    )
    client = entra.client()
    with pytest.raises(SourceError) as failure:
        entra.users(client=client).refresh(None)
    assert failure.value.reason == "auth"
    assert "User.Read.All" in failure.value.message
    assert tenant_data.CLIENT_ID in failure.value.message
    assert len(entra.organization(client=client).refresh(None).skus) == 4


def test_build_entra_sources_shares_one_client(sim: GraphSimulator, entra: Harness) -> None:
    sources = build_entra_sources(entra.config())
    try:
        users, organization = sources
        assert isinstance(users, EntraUsersSource) and isinstance(organization, EntraOrganizationSource)
        assert (users.kind, organization.kind) == ("entra", "entra_organization")
        assert users.client is organization.client
        assert all(isinstance(source, Source) for source in sources)
        # Both report the statistics of the one client they share.
        assert isinstance(users, HttpStatsProvider) and isinstance(organization, HttpStatsProvider)
        users.refresh(None)
        organization.refresh(None)
        assert users.http_stats() == organization.http_stats()
        assert users.http_stats().token_requests == 1
        assert users.http_stats().requests[("subscriptions", "200")] == 1
    finally:
        for source in sources:
            source.close()


def test_licenses_disabled_builds_only_the_users_source(sim: GraphSimulator, entra: Harness) -> None:
    sources = build_entra_sources(entra.config(licenses=False))
    try:
        assert [source.kind for source in sources] == ["entra"]
    finally:
        sources[0].close()


def test_closing_one_source_keeps_the_shared_client_open(sim: GraphSimulator, entra: Harness) -> None:
    users, organization = build_entra_sources(entra.config())
    users.close()
    users.close()  # twice is harmless and does not release the client twice
    sim.add_fault("subscribedSkus", 1, "429", retry_after=1)
    data = organization.refresh(None)  # waited on Retry-After: the client is not closed
    assert isinstance(data, OrganizationData) and len(data.skus) == 4
    organization.close()
    sim.add_fault("subscribedSkus", 3, "429", retry_after=1)
    with pytest.raises(SourceError) as failure:
        organization.refresh(None)
    assert failure.value.reason == "other"
    assert "closed" in failure.value.message
