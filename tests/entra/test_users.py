"""EntraUsersSource full reads against the simulator: request shape, paging, normalisation, the
users' count as a cross-check of the listing, licence states and usage location."""

from __future__ import annotations

import math
import threading

import pytest

from exporter.model import AssignedLicense, EntraTable, LicenseState, OrganizationData
from exporter.sources.base import Source, SourceError
from exporter.sources.entra import USER_PROPERTIES, parse_user
from tests.entra import tenant_data
from tests.entra.conftest import Harness
from tests.entra.graph_sim import GraphSimulator


def _users_by_id(table: EntraTable) -> dict[str, object]:
    return {table.id_text(row): table.record(row) for row in range(table.n)}


def test_full_read_asks_for_a_delta_link_and_the_count_then_lists_999_per_page(
    sim: GraphSimulator, entra: Harness
) -> None:
    sim.tenants[tenant_data.TENANT_ID].users = tenant_data.users(2500, cloud_every=10)
    table = entra.users().refresh(None)
    assert isinstance(table, EntraTable)
    assert table.records == table.n == 2500  # cloud-only users are kept too
    assert int(table.array("synced").sum()) == 2250
    assert len({table.id_text(row) for row in range(table.n)}) == 2500
    order = [record.endpoint for record in sim.log if record.endpoint not in ("openid", "token")]
    assert order == ["usersDelta", "usersCount", "users", "users", "users"]
    delta, count = sim.requests_to("usersDelta")[0], sim.requests_to("usersCount")[0]
    assert delta.query["$deltatoken"] == "latest"
    assert set(delta.query["$select"].split(",")) == set(USER_PROPERTIES)
    assert count.headers["ConsistencyLevel"] == "eventual"
    pages = sim.requests_to("users")
    assert len(pages) == math.ceil(2500 / 999)
    assert pages[0].query["$top"] == "999"
    assert set(pages[0].query["$select"].split(",")) == set(USER_PROPERTIES)
    assert "$skiptoken" not in pages[0].query
    assert all("$skiptoken" in record.query for record in pages[1:])
    assert table.meta["read"] == "full"
    assert table.meta["delta_link"].startswith(f"{sim.base_url}/v1.0/users/delta?$deltatoken=")


def test_page_size_comes_from_config(sim: GraphSimulator, entra: Harness) -> None:
    sim.tenants[tenant_data.TENANT_ID].users = tenant_data.users(25)
    table = entra.users(entra.config(page_size=10)).refresh(None)
    assert table.n == 25
    assert [record.query["$top"] for record in sim.requests_to("users")] == ["10", "10", "10"]


def test_cloud_only_users_are_kept_and_marked(sim: GraphSimulator, entra: Harness) -> None:
    sim.tenants[tenant_data.TENANT_ID].users = [
        tenant_data.graph_user(0),
        tenant_data.graph_user(1, synced=False),
        tenant_data.graph_user(2),
    ]
    table = entra.users().refresh(None)
    synced = {table.id_text(row): bool(table.array("synced")[row]) for row in range(table.n)}
    assert synced == {
        tenant_data.user_id(0): True,
        tenant_data.user_id(1): False,
        tenant_data.user_id(2): True,
    }
    cloud = table.record(table.row_of_id(tenant_data.user_id(1)) or 0)
    assert cloud.on_premises_immutable_id is None and cloud.on_premises_security_identifier is None


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
    table = entra.users().refresh(None)
    entra_user = table.record(0)
    assert entra_user.id == tenant_data.user_id(7)
    assert entra_user.on_premises_sync_enabled is True
    assert entra_user.on_premises_security_identifier == tenant_data.sid(7)
    assert entra_user.on_premises_immutable_id == tenant_data.immutable_id(7)
    assert entra_user.user_principal_name == "user00007@contoso.example"
    assert entra_user.account_enabled is True
    assert entra_user.created == 1709280900.0  # 2024-03-01T08:15:00Z
    assert entra_user.provisioning_error_categories == ("PropertyConflict", "PropertyConflict")
    assert entra_user.assigned_licenses == (
        AssignedLicense(tenant_data.E3_SKU, (tenant_data.TEAMS_PLAN,)),
        AssignedLicense(tenant_data.INTUNE_A_SKU, ()),
    )
    assert entra_user.usage_location == "DE"


def test_licence_states_and_usage_location(sim: GraphSimulator, entra: Harness) -> None:
    states = [
        tenant_data.license_state(
            tenant_data.INTUNE_A_SKU,
            state="Error",
            error="CountViolation",
            group=tenant_data.INTUNE_USERS_GROUP.upper(),
        ),
        tenant_data.license_state(tenant_data.E3_SKU, disabled=(tenant_data.TEAMS_PLAN,), updated=None),
    ]
    sim.tenants[tenant_data.TENANT_ID].users = [
        tenant_data.graph_user(1, license_states=states, usage_location=None),
        tenant_data.graph_user(2),
    ]
    table = entra.users().refresh(None)
    users = _users_by_id(table)
    first = users[tenant_data.user_id(1)]
    assert first.usage_location is None  # type: ignore[attr-defined]
    assert first.license_states == (  # type: ignore[attr-defined]
        LicenseState(
            tenant_data.INTUNE_A_SKU,
            state="Error",
            error="CountViolation",
            assigned_by_group=tenant_data.INTUNE_USERS_GROUP,
            last_updated=1709283600.0,  # 2024-03-01T09:00:00Z
        ),
        LicenseState(tenant_data.E3_SKU, disabled_plans=(tenant_data.TEAMS_PLAN,), last_updated=None),
    )
    second = users[tenant_data.user_id(2)]
    assert second.license_states == (  # type: ignore[attr-defined]
        LicenseState(tenant_data.INTUNE_A_SKU, last_updated=1709283600.0),
    )
    assert second.usage_location == "DE"  # type: ignore[attr-defined]
    assert "licenseAssignmentStates" in sim.requests_to("users")[0].query["$select"]
    assert "usageLocation" in sim.requests_to("users")[0].query["$select"]


def test_null_immutable_id_and_creation_date(sim: GraphSimulator, entra: Harness) -> None:
    sim.tenants[tenant_data.TENANT_ID].users = [tenant_data.graph_user(3, immutable=False, created=None)]
    user = entra.users().refresh(None).record(0)
    assert user.on_premises_immutable_id is None
    assert user.on_premises_security_identifier == tenant_data.sid(3)
    assert user.created is None
    assert user.provisioning_error_categories == ()


def test_empty_tenant(sim: GraphSimulator, entra: Harness) -> None:
    sim.tenants[tenant_data.TENANT_ID].users = []
    table = entra.users().refresh(None)
    assert table.n == 0 and table.meta["read"] == "full"
    assert len(sim.requests_to("users")) == 1


def test_unexpected_user_shape_is_a_data_error() -> None:
    user = tenant_data.graph_user(1)
    user["onPremisesSecurityIdentifier"] = "not-a-sid"
    with pytest.raises(ValueError, match="onPremisesSecurityIdentifier"):
        parse_user(user)
    user = tenant_data.graph_user(1)
    user["assignedLicenses"] = [{"skuId": "not-a-guid"}]
    with pytest.raises(ValueError, match="skuId"):
        parse_user(user)
    user = tenant_data.graph_user(1)
    user["licenseAssignmentStates"] = [{"skuId": tenant_data.INTUNE_A_SKU, "assignedByGroup": "group?"}]
    with pytest.raises(ValueError, match="assignedByGroup"):
        parse_user(user)


def test_malformed_user_from_graph_fails_the_refresh_with_data(sim: GraphSimulator, entra: Harness) -> None:
    broken = tenant_data.graph_user(1)
    broken["accountEnabled"] = "yes"
    sim.tenants[tenant_data.TENANT_ID].users = [tenant_data.graph_user(0), broken]
    with pytest.raises(SourceError) as failure:
        entra.users().refresh(None)
    assert failure.value.reason == "data"
    assert "accountEnabled" in failure.value.message


# ---------------------------------------------------------------------------- issue 12.7
def test_truncated_listing_fails_with_data(sim: GraphSimulator, entra: Harness) -> None:
    """A page without @odata.nextLink in the middle of the read: 2500 users, only 1998 listed."""
    sim.tenants[tenant_data.TENANT_ID].users = tenant_data.users(2500)
    sim.add_fault("users", 2, "truncate")
    with pytest.raises(SourceError) as failure:
        entra.users().refresh(None)
    assert failure.value.reason == "data"
    assert "listed 1998 users but counts 2500" in failure.value.message
    assert len(sim.requests_to("users")) == 2  # the simulator really cut the listing short
    # Once Graph lists everything again, the read succeeds.
    assert entra.users().refresh(None).n == 2500


def test_truncated_small_listing_is_caught_too(sim: GraphSimulator, entra: Harness) -> None:
    """The issue's case: 296 users, pages of 100 (default page size) cut after the second."""
    sim.tenants[tenant_data.TENANT_ID].users = tenant_data.users(296)
    sim.add_fault("users", 2, "truncate")
    with pytest.raises(SourceError, match="listed 200 users but counts 296"):
        entra.users(entra.config(page_size=100)).refresh(None)


def test_count_tolerates_a_few_users_deleted_during_the_read(sim: GraphSimulator, entra: Harness) -> None:
    """The count is eventually consistent and taken before the listing: users deleted while the
    listing runs (fewer than the tolerance of 10) do not fail the read."""
    sim.tenants[tenant_data.TENANT_ID].users = tenant_data.users(1500)
    source = entra.users()
    original = source.client.get_pages

    def deleting_pages(*args: object, **kwargs: object) -> object:
        for number, page in enumerate(original(*args, **kwargs)):  # type: ignore[arg-type]
            if number == 0:
                for index in range(1400, 1405):  # on the second page, not yet listed
                    sim.delete_user(tenant_data.TENANT_ID, tenant_data.user_id(index))
            yield page

    source.client.get_pages = deleting_pages  # type: ignore[method-assign]
    assert source.refresh(None).n == 1495


def test_count_not_available_skips_the_check(sim: GraphSimulator, entra: Harness) -> None:
    sim.add_fault("usersCount", 1, "404")
    assert entra.users().refresh(None).n == 10


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
            results[name] = source.refresh(None, None)  # type: ignore[arg-type]
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
    assert isinstance(results["users"], EntraTable)
    assert isinstance(results["organization"], OrganizationData)
    assert results["users"].n == 1500
    stats = client.http_stats()
    assert stats.token_requests == 1  # the second thread got the cached token
    assert stats.requests[("users", "200")] == 2
    assert stats.requests[("usersDelta", "200")] == 1
    assert stats.requests[("usersCount", "200")] == 1
    assert stats.requests[("subscribedSkus", "200")] == 1
