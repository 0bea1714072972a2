"""Group names of licence-assigning groups (GroupMember.Read.All, optional) and the licence sweep's
replacement of licence data, against the simulator."""

from __future__ import annotations

import time

from exporter.model import EntraTable, EntraUser, LicenseState
from exporter.sources.entra_licences import GroupNames, replace_licences, used_groups
from exporter.sources.graph_records import parse_licences
from tests.entra import tenant_data
from tests.entra.conftest import Harness
from tests.entra.graph_sim import GraphSimulator

TID = tenant_data.TENANT_ID
SALES = "5a1e5a1e-0000-4000-8000-000000000001"
GONE = "9011e000-0000-4000-8000-000000000002"


def _grant(sim: GraphSimulator, *permissions: str) -> None:
    sim.tenants[TID].apps[tenant_data.CLIENT_ID].permissions = frozenset({"User.Read.All", *permissions})


def _error_state(group: str | None) -> dict[str, object]:
    return tenant_data.license_state(
        tenant_data.INTUNE_A_SKU, state="Error", error="CountViolation", group=group
    )


def _tenant_with_group_errors(sim: GraphSimulator) -> None:
    sim.tenants[TID].groups = [tenant_data.group(), tenant_data.group(SALES, "Sales licences")]
    sim.tenants[TID].users = [
        tenant_data.graph_user(0, license_states=[_error_state(tenant_data.INTUNE_USERS_GROUP)]),
        tenant_data.graph_user(1, license_states=[_error_state(SALES.upper())]),
        tenant_data.graph_user(2, license_states=[_error_state(GONE)]),
        tenant_data.graph_user(3, license_states=[_error_state(None)]),
        tenant_data.graph_user(4),
    ]


def test_group_names_are_read_once_and_cached(sim: GraphSimulator, entra: Harness) -> None:
    _grant(sim, "GroupMember.Read.All")
    _tenant_with_group_errors(sim)
    source = entra.users()
    table = source.refresh(None)
    assert table.group_names == {tenant_data.INTUNE_USERS_GROUP: "Intune Users", SALES: "Sales licences"}
    assert "warning" not in table.meta
    lookups = sim.requests_to("group")
    assert sorted(r.path.rsplit("/", 1)[1] for r in lookups) == sorted(
        [tenant_data.INTUNE_USERS_GROUP, SALES, GONE]
    )
    assert all(r.query["$select"] == "id,displayName" for r in lookups)
    assert [r.status for r in lookups if r.path.endswith(GONE)] == [404]  # deleted: shown by id
    again = source.refresh(table)
    assert len(sim.requests_to("group")) == 3  # cached
    assert again.group_names == table.group_names


def test_names_are_looked_up_again_after_a_day(sim: GraphSimulator, entra: Harness) -> None:
    _grant(sim, "GroupMember.Read.All")
    _tenant_with_group_errors(sim)
    now = [time.time()]
    source = entra.users(clock=lambda: now[0])
    table = source.refresh(None)
    sim.tenants[TID].groups = [tenant_data.group(), tenant_data.group(SALES, "Sales (renamed)")]
    now[0] += 86400
    table = source.refresh(table)
    assert table.group_names[SALES] == "Sales (renamed)"
    assert len(sim.requests_to("group")) == 6


def test_without_group_permission_users_are_read_and_groups_shown_by_id(
    sim: GraphSimulator, entra: Harness
) -> None:
    _tenant_with_group_errors(sim)  # the default app has User.Read.All and Organization.Read.All
    source = entra.users()
    table = source.refresh(None)
    assert table.n == 5
    assert table.group_names == {}
    assert "GroupMember.Read.All" in table.meta["warning"]
    assert [r.status for r in sim.requests_to("group")] == [403]  # one try, not one per group
    table = source.refresh(table)
    assert len(sim.requests_to("group")) == 1  # not asked again for an hour
    assert "GroupMember.Read.All" in table.meta["warning"]


def test_group_lookup_failures_never_fail_the_users_read(sim: GraphSimulator, entra: Harness) -> None:
    _grant(sim, "GroupMember.Read.All")
    _tenant_with_group_errors(sim)
    sim.add_fault("group", 1, "500", times=10)
    table = entra.users().refresh(None)
    assert table.n == 5 and table.group_names == {}


def test_group_names_can_be_switched_off(sim: GraphSimulator, entra: Harness) -> None:
    _grant(sim, "GroupMember.Read.All")
    _tenant_with_group_errors(sim)
    table = entra.users(entra.config(group_names=False)).refresh(None)
    assert table.group_names == {} and sim.requests_to("group") == []


def test_group_name_cache_is_bounded_and_limits_lookups_per_refresh() -> None:
    now = [1000.0]
    names = GroupNames(capacity=3, per_refresh=2, clock=lambda: now[0])
    assert names.due(["a", "b", "c", "d"]) == ["a", "b"]
    for group in "abcd":
        names.store(group, group.upper())
    assert names.names("abcd") == {"b": "B", "c": "C", "d": "D"}  # "a" was evicted
    assert names.due("bcd") == []
    now[0] += 86400
    assert names.due("bcd") == ["b", "c"]
    names.deny()
    assert names.denied and names.due("xyz") == []
    now[0] += 3600
    assert not names.denied


def test_restored_names_seed_the_cache(sim: GraphSimulator, entra: Harness) -> None:
    _grant(sim, "GroupMember.Read.All")
    _tenant_with_group_errors(sim)
    first = entra.users().refresh(None)
    restarted = entra.users()  # a new process with the restored table
    second = restarted.refresh(first)
    assert len(sim.requests_to("group")) == 3 + 1  # only the deleted group (no name kept) again
    assert second.group_names == first.group_names


# ---------------------------------------------------------------------------- replace_licences
def test_replace_licences_swaps_only_the_users_named() -> None:
    users = [
        EntraUser(
            tenant_data.user_id(i),
            f"u{i}@x",
            True,
            None,
            None,
            license_states=(LicenseState(tenant_data.E3_SKU),),
        )
        for i in range(4)
    ]
    table = EntraTable.from_records(users, {"g": "Group"})
    new_item = {
        "id": tenant_data.user_id(2),
        "assignedLicenses": [],
        "licenseAssignmentStates": [_error_state(tenant_data.INTUNE_USERS_GROUP)],
    }
    fresh = {
        bytes.fromhex(tenant_data.user_id(2).replace("-", "")): parse_licences(new_item, "user 2"),
        bytes.fromhex(tenant_data.user_id(99).replace("-", "")): ((), ()),  # not held: ignored
    }
    replaced, covered = replace_licences(table, fresh)
    assert covered == 1
    records = {replaced.id_text(r): replaced.record(r) for r in range(replaced.n)}
    assert records[tenant_data.user_id(2)].license_states[0].error == "CountViolation"
    assert records[tenant_data.user_id(2)].assigned_licenses == ()
    for i in (0, 1, 3):
        assert records[tenant_data.user_id(i)] == users[i]
    assert replaced.group_names == {"g": "Group"}
    assert used_groups(replaced) == [tenant_data.INTUNE_USERS_GROUP]
    assert table.record(2) == users[2]  # the original table is unchanged
