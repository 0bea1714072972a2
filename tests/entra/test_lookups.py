"""Trace look-ups of the Entra users source: $filter point queries in the query mode Microsoft documents
per property (id, userPrincipalName and onPremisesSecurityIdentifier by default; onPremisesImmutableId
only with ConsistencyLevel: eventual + $count=true), batches of 15, a fallback to the other mode when
Graph refuses, and never a listing of all users."""

from __future__ import annotations

import time

import pytest

from exporter.model import EntraTable
from tests.entra import sim_filter, tenant_data
from tests.entra.conftest import Harness
from tests.entra.graph_sim import GraphSimulator

TID = tenant_data.TENANT_ID


def _ids(table: EntraTable) -> set[str]:
    return {table.id_text(row) for row in range(table.n)}


def _lookups(sim: GraphSimulator) -> list[tuple[str, str | None, str | None]]:
    """(filter, ConsistencyLevel header, $count) of every /users request."""
    return [
        (r.query.get("$filter", ""), r.headers.get("ConsistencyLevel"), r.query.get("$count"))
        for r in sim.requests_to("users")
    ]


@pytest.fixture
def tenant(sim: GraphSimulator) -> GraphSimulator:
    users = tenant_data.users(40)
    cloud_twin = tenant_data.graph_user(77, synced=False)  # a cloud-only user with user00003's UPN
    cloud_twin["userPrincipalName"] = "User00003@Contoso.example"
    apostrophe = tenant_data.graph_user(78, synced=False)
    apostrophe["userPrincipalName"] = "o'brien@contoso.example"
    sim.tenants[TID].users = [*users, cloud_twin, apostrophe]
    return sim


def _find(entra: Harness, **keys: object) -> EntraTable:
    return entra.users().find_related(deadline=time.monotonic() + 30, **keys)  # type: ignore[arg-type]


def test_ids_in_one_default_mode_query(tenant: GraphSimulator, entra: Harness) -> None:
    table = _find(entra, ids=[tenant_data.user_id(1), "{" + tenant_data.user_id(2).upper() + "}", "no-guid"])
    assert _ids(table) == {tenant_data.user_id(1), tenant_data.user_id(2)}
    assert _lookups(tenant) == [
        (f"id in ('{tenant_data.user_id(1)}','{tenant_data.user_id(2)}')", None, None)
    ]
    assert table.meta["read"] == "lookup"
    assert "$select" in tenant.requests_to("users")[0].query


def test_upn_is_case_insensitive_and_finds_cloud_users_too(tenant: GraphSimulator, entra: Harness) -> None:
    table = _find(entra, upns=["USER00003@CONTOSO.EXAMPLE", "user00003@contoso.example"])
    assert _ids(table) == {tenant_data.user_id(3), tenant_data.user_id(77)}
    synced = {table.id_text(r): bool(table.array("synced")[r]) for r in range(table.n)}
    assert synced[tenant_data.user_id(77)] is False
    assert _lookups(tenant) == [("userPrincipalName eq 'USER00003@CONTOSO.EXAMPLE'", None, None)]


def test_quotes_in_values_are_escaped(tenant: GraphSimulator, entra: Harness) -> None:
    table = _find(entra, upns=["O'Brien@contoso.example"])
    assert _ids(table) == {tenant_data.user_id(78)}
    assert _lookups(tenant)[0][0] == "userPrincipalName eq 'O''Brien@contoso.example'"


def test_sids_by_default_and_immutable_ids_in_advanced_mode(tenant: GraphSimulator, entra: Harness) -> None:
    table = _find(
        entra,
        sids=[tenant_data.sid(4).lower()],
        immutable_ids=[tenant_data.immutable_id(5), tenant_data.immutable_id(6)],
    )
    assert _ids(table) == {tenant_data.user_id(4), tenant_data.user_id(5), tenant_data.user_id(6)}
    assert _lookups(tenant) == [
        (f"onPremisesSecurityIdentifier eq '{tenant_data.sid(4)}'", None, None),
        (
            f"onPremisesImmutableId in ('{tenant_data.immutable_id(5)}','{tenant_data.immutable_id(6)}')",
            "eventual",
            "true",
        ),
    ]


def test_many_values_are_sent_in_batches_of_15(tenant: GraphSimulator, entra: Harness) -> None:
    table = _find(entra, ids=[tenant_data.user_id(i) for i in range(20)])
    assert _ids(table) == {tenant_data.user_id(i) for i in range(20)}
    filters = [f for f, _, _ in _lookups(tenant)]
    assert len(filters) == 2 and filters[0].count("','") == 14 and filters[1].count("','") == 4


def test_nothing_to_look_up_asks_nothing(tenant: GraphSimulator, entra: Harness) -> None:
    assert _find(entra, ids=["not-a-guid"], sids=["S-1-garbage"], upns=[""]).n == 0
    assert tenant.requests_to("users") == []


def test_a_filter_refused_by_default_is_retried_in_advanced_mode(
    tenant: GraphSimulator, entra: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An older revision of Microsoft's table had SID filters only in advanced mode.
    monkeypatch.setitem(
        sim_filter.USER_FILTER_SUPPORT, "onPremisesSecurityIdentifier", {"eq": "A", "in": "A"}
    )
    table = _find(entra, sids=[tenant_data.sid(8)])
    assert _ids(table) == {tenant_data.user_id(8)}
    assert [
        (status, header)
        for status, header in zip(
            [r.status for r in tenant.requests_to("users")], [h for _, h, _ in _lookups(tenant)], strict=True
        )
    ] == [(400, None), (200, "eventual")]


def test_a_filter_refused_in_both_modes_is_skipped_without_listing_everyone(
    tenant: GraphSimulator, entra: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delitem(sim_filter.USER_FILTER_SUPPORT, "onPremisesImmutableId")
    table = _find(entra, immutable_ids=[tenant_data.immutable_id(5)], upns=["user00009@contoso.example"])
    assert _ids(table) == {tenant_data.user_id(9)}  # found by its UPN
    assert all(f for f, _, _ in _lookups(tenant))  # every request carried a filter
    assert [r.status for r in tenant.requests_to("users")] == [200, 400, 400]


def test_lookups_name_the_groups_of_licence_errors(tenant: GraphSimulator, entra: Harness) -> None:
    tenant.tenants[TID].apps[tenant_data.CLIENT_ID].permissions = frozenset(
        {"User.Read.All", "GroupMember.Read.All"}
    )
    state = tenant_data.license_state(
        tenant_data.INTUNE_A_SKU, state="Error", error="CountViolation", group=tenant_data.INTUNE_USERS_GROUP
    )
    tenant.upsert_user(TID, tenant_data.graph_user(90, license_states=[state]))
    table = _find(entra, ids=[tenant_data.user_id(90)])
    assert table.group_names == {tenant_data.INTUNE_USERS_GROUP: "Intune Users"}
