"""Incremental reads of the Entra users (/users/delta) against the simulator: every result must equal a
full read at that moment; expired, rejected or inconsistent delta state falls back to a full read."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from exporter.model import EntraTable, EntraUser
from exporter.sources.entra import EntraUsersSource
from exporter.state import EstateState, SavedState, SourceState, StateStore
from tests.entra import tenant_data
from tests.entra.conftest import Harness
from tests.entra.graph_sim import GraphSimulator, SimApp

TID = tenant_data.TENANT_ID
LICENCE_SELECT = "id,assignedLicenses,licenseAssignmentStates"


@pytest.fixture(autouse=True)
def group_permission(sim: GraphSimulator) -> None:
    """The app may read group names (looked up once, then cached for a day): test_licences covers
    the app without GroupMember.Read.All."""
    sim.tenants[TID].apps[tenant_data.CLIENT_ID] = SimApp(
        tenant_data.CLIENT_ID,
        tenant_data.CLIENT_SECRET,
        None,
        frozenset({"User.Read.All", "Organization.Read.All", "GroupMember.Read.All"}),
    )


def users_of(table: EntraTable) -> dict[str, EntraUser]:
    return {table.id_text(row): table.record(row) for row in range(table.n)}


def full_read(entra: Harness) -> EntraTable:
    """What a full read by a fresh source (own client, own token) gives now."""
    return entra.users().refresh(None)


def assert_equal_to_full_read(entra: Harness, table: EntraTable) -> None:
    expected = full_read(entra)
    actual, wanted = users_of(table), users_of(expected)
    assert set(actual) == set(wanted), (sorted(set(actual) ^ set(wanted)))[:5]
    differing = [user_id for user_id in wanted if actual[user_id] != wanted[user_id]]
    assert not differing, (actual[differing[0]], wanted[differing[0]])
    assert table.group_names == expected.group_names


class Counter:
    """Requests per simulator endpoint made by the code inside ``with counter.measure():``."""

    def __init__(self, sim: GraphSimulator) -> None:
        self.sim = sim
        self.counts: dict[str, int] = {}

    def __enter__(self) -> Counter:
        self._before = self.sim.request_counts()
        return self

    def __exit__(self, *exc: object) -> None:
        after = self.sim.request_counts()
        self.counts = {
            name: after.get(name, 0) - self._before.get(name, 0)
            for name in after
            if name not in ("openid", "token") and after.get(name, 0) != self._before.get(name, 0)
        }


def sweeps(sim: GraphSimulator) -> list[Any]:
    return [r for r in sim.requests_to("users") if r.query.get("$select") == LICENCE_SELECT]


# ---------------------------------------------------------------------------- the delta round
def test_incremental_read_applies_creates_updates_and_removals(sim: GraphSimulator, entra: Harness) -> None:
    sim.tenants[TID].users = tenant_data.users(50, cloud_every=7)
    source = entra.users()
    first = source.refresh(None)
    sim.upsert_user(TID, tenant_data.graph_user(100))
    sim.patch_user(
        TID, tenant_data.user_id(3), userPrincipalName="renamed@contoso.example", usageLocation="FR"
    )
    sim.delete_user(TID, tenant_data.user_id(4))  # soft: restorable, gone from /users
    sim.delete_user(TID, tenant_data.user_id(5), hard=True)
    with Counter(sim) as counter:
        second = source.refresh(first)
    assert second.meta["read"] == "incremental"
    # One delta page, plus the licence sweep (50 users: one page, so it runs on every refresh).
    assert counter.counts == {"usersDelta": 1, "users": 1}
    assert len(sweeps(sim)) == 1
    assert second.meta["delta_link"] != first.meta["delta_link"]
    users = users_of(second)
    assert tenant_data.user_id(100) in users
    assert tenant_data.user_id(4) not in users and tenant_data.user_id(5) not in users
    assert users[tenant_data.user_id(3)].user_principal_name == "renamed@contoso.example"
    assert users[tenant_data.user_id(3)].usage_location == "FR"
    assert_equal_to_full_read(entra, second)
    # A restored user comes back in the next round.
    sim.restore_user(TID, tenant_data.user_id(4))
    third = source.refresh(second)
    assert tenant_data.user_id(4) in users_of(third)
    assert_equal_to_full_read(entra, third)


def test_partial_changes_merge_into_the_user_held(sim: GraphSimulator, entra: Harness) -> None:
    """With only the changed properties in a change (Prefer: return=minimal), the rest is kept."""
    sim.delta_partial = True
    source = entra.users()
    first = source.refresh(None)
    sim.patch_user(TID, tenant_data.user_id(2), accountEnabled=False)
    sim.patch_user(TID, tenant_data.user_id(6), onPremisesImmutableId=None, usageLocation=None)
    second = source.refresh(first)
    changes = [
        r
        for r in sim.requests_to("usersDelta")
        if "$deltatoken" in r.query and r.query["$deltatoken"] != "latest"
    ]
    assert len(changes) == 1
    users = users_of(second)
    assert users[tenant_data.user_id(2)].account_enabled is False
    assert users[tenant_data.user_id(2)].on_premises_immutable_id == tenant_data.immutable_id(2)  # kept
    assert users[tenant_data.user_id(2)].license_states  # kept
    assert users[tenant_data.user_id(6)].on_premises_immutable_id is None  # set to null: merged
    assert users[tenant_data.user_id(6)].usage_location is None
    assert_equal_to_full_read(entra, second)


def test_replays_and_duplicates_are_harmless(sim: GraphSimulator, entra: Harness) -> None:
    sim.delta_replay = 3
    sim.delta_duplicates = 2
    source = entra.users()
    table = source.refresh(None)
    for round_number in range(3):
        sim.patch_user(TID, tenant_data.user_id(round_number), accountEnabled=bool(round_number % 2))
        sim.delete_user(TID, tenant_data.user_id(9 - round_number), hard=round_number == 1)
        table = source.refresh(table)
        assert table.meta["read"] == "incremental"
        assert len({table.id_text(row) for row in range(table.n)}) == table.n  # one row per user
        assert_equal_to_full_read(entra, table)


def test_no_changes_still_moves_the_delta_link(sim: GraphSimulator, entra: Harness) -> None:
    source = entra.users()
    first = source.refresh(None)
    second = source.refresh(first)
    assert second.meta["read"] == "incremental"
    assert second.meta["delta_link"] != first.meta["delta_link"]
    assert users_of(second) == users_of(first)


# ---------------------------------------------------------------------------- fallbacks to a full read
@pytest.mark.parametrize("status", [400, 410])
def test_expired_token_answered_by_graph_falls_back_to_a_full_read(
    sim: GraphSimulator, entra: Harness, status: int
) -> None:
    sim.delta_expired_status = status
    source = entra.users()
    first = source.refresh(None)
    sim.advance(8 * 86400)  # the simulator's tokens age on its own clock; ours still thinks it fresh
    sim.upsert_user(TID, tenant_data.graph_user(42))
    with Counter(sim) as counter:
        second = source.refresh(first)
    assert second.meta["read"] == "full"
    assert [r.status for r in sim.requests_to("usersDelta")][-2:] == [status, 200]
    assert counter.counts == {"usersDelta": 2, "usersCount": 1, "users": 1}
    assert tenant_data.user_id(42) in users_of(second)
    assert source.refresh(second).meta["read"] == "incremental"  # and continues from the new link


def test_invalidated_token_falls_back(sim: GraphSimulator, entra: Harness) -> None:
    source = entra.users()
    first = source.refresh(None)
    sim.invalidate_delta_tokens(TID, status=400)
    assert source.refresh(first).meta["read"] == "full"


def test_token_older_than_seven_days_is_not_even_tried(sim: GraphSimulator, entra: Harness) -> None:
    now = [time.time()]
    source = entra.users(clock=lambda: now[0])
    first = source.refresh(None)
    now[0] += 7 * 86400
    with Counter(sim) as counter:
        second = source.refresh(first)
    assert second.meta["read"] == "full"
    assert counter.counts == {"usersDelta": 1, "usersCount": 1, "users": 1}  # only the new $deltatoken=latest
    assert sim.requests_to("usersDelta")[-1].query["$deltatoken"] == "latest"


def test_delta_round_cut_short_falls_back(sim: GraphSimulator, entra: Harness) -> None:
    """A delta page with neither nextLink nor deltaLink: the changes after it would be lost."""
    sim.delta_page_size = 2
    source = entra.users()
    first = source.refresh(None)
    for index in range(5):
        sim.patch_user(TID, tenant_data.user_id(index), accountEnabled=False)
    sim.add_fault("usersDelta", 3, "truncate")  # the second page of the change round (1: latest)
    second = source.refresh(first)
    assert second.meta["read"] == "full"
    assert all(
        not user.account_enabled for user_id, user in users_of(second).items() if int(user_id[-5:]) < 5
    )
    assert_equal_to_full_read(entra, second)


def test_round_longer_than_a_full_read_falls_back(sim: GraphSimulator, entra: Harness) -> None:
    sim.delta_page_size = 2
    source = entra.users()
    first = source.refresh(None)  # 10 users: a full read costs 1 page (+2 requests)
    for index in range(10):
        sim.patch_user(TID, tenant_data.user_id(index), accountEnabled=False)
    with Counter(sim) as counter:
        second = source.refresh(first)
    assert second.meta["read"] == "full"
    assert counter.counts["usersDelta"] == 3 + 1  # gave up after 3 change pages, then a new link
    assert_equal_to_full_read(entra, second)


def test_other_tenant_or_selection_falls_back(sim: GraphSimulator, entra: Harness) -> None:
    source = entra.users()
    first = source.refresh(None)
    foreign = first.derive(first.columns(), first.children, {**first.meta, "delta_scope": "another"})
    assert source.refresh(foreign).meta["read"] == "full"
    without = first.derive(first.columns(), first.children, {"group_names": {}})
    assert source.refresh(without).meta["read"] == "full"


def test_restart_continues_from_the_restored_table(
    sim: GraphSimulator, entra: Harness, tmp_path: Path
) -> None:
    """The delta link lives in the table's meta, which the state file keeps."""
    first = entra.users().refresh(None)
    store = StateStore(tmp_path / "state.json")
    source_state = SourceState(first, up=True, last_success=time.time(), duration=1.0)
    assert store.save(SavedState({"e": EstateState("hybrid_mdm", {"entra": source_state})}), time.time())
    restored = StateStore(tmp_path / "state.json").load().estates["e"].sources["entra"].data
    assert isinstance(restored, EntraTable) and restored.meta["delta_link"] == first.meta["delta_link"]
    sim.patch_user(TID, tenant_data.user_id(1), accountEnabled=False)
    after_restart = entra.users()  # a new process: new client, new token
    with Counter(sim) as counter:
        table = after_restart.refresh(restored)
    assert table.meta["read"] == "incremental"
    assert counter.counts == {"usersDelta": 1, "users": 1}
    assert users_of(table)[tenant_data.user_id(1)].account_enabled is False
    assert_equal_to_full_read(entra, table)


# ---------------------------------------------------------------------------- licence states
def _licence_change(index: int) -> dict[str, Any]:
    return {
        "licenseAssignmentStates": [
            tenant_data.license_state(
                tenant_data.INTUNE_A_SKU,
                state="Error",
                error="CountViolation",
                group=tenant_data.INTUNE_USERS_GROUP,
            )
        ]
    }


def test_licence_state_changes_come_with_the_sweep_on_small_tenants(
    sim: GraphSimulator, entra: Harness
) -> None:
    source = entra.users()
    first = source.refresh(None)
    sim.patch_user(TID, tenant_data.user_id(3), **_licence_change(3))  # invisible to /users/delta
    second = source.refresh(first)
    state = users_of(second)[tenant_data.user_id(3)].license_states[0]
    assert (state.state, state.error, state.assigned_by_group) == (
        "Error",
        "CountViolation",
        tenant_data.INTUNE_USERS_GROUP,
    )
    assert_equal_to_full_read(entra, second)


def test_large_tenants_sweep_licences_once_per_interval(sim: GraphSimulator, entra: Harness) -> None:
    """150 users in pages of 10: a sweep would cost 15 requests, more than CHEAP_SWEEP_PAGES, so it
    runs only once license_refresh_interval has passed; until then licence states may lag."""
    sim.tenants[TID].users = tenant_data.users(150)
    now = [time.time()]
    source = entra.users(entra.config(page_size=10), license_refresh_interval=3600, clock=lambda: now[0])
    first = source.refresh(None)
    sim.patch_user(TID, tenant_data.user_id(3), **_licence_change(3))
    sim.patch_user(TID, tenant_data.user_id(4), accountEnabled=False)  # tracked: surfaces with its states
    sim.patch_user(TID, tenant_data.user_id(4), **_licence_change(4))
    now[0] += 600
    with Counter(sim) as counter:
        second = source.refresh(first)
    # (and one look-up of the group that assigns the new error, cached from then on)
    assert counter.counts == {"usersDelta": 1, "group": 1}
    users = users_of(second)
    assert users[tenant_data.user_id(3)].license_states[0].state == "Active"  # the documented lag
    assert users[tenant_data.user_id(4)].license_states[0].error == "CountViolation"  # came along
    now[0] += 3600
    with Counter(sim) as counter:
        third = source.refresh(second)
    assert counter.counts == {"usersDelta": 1, "users": 15}
    assert users_of(third)[tenant_data.user_id(3)].license_states[0].error == "CountViolation"
    assert_equal_to_full_read(entra, third)
    assert third.meta["licenses_at"] == now[0]


def test_interval_zero_sweeps_on_every_refresh(sim: GraphSimulator, entra: Harness) -> None:
    sim.tenants[TID].users = tenant_data.users(150)
    source = entra.users(entra.config(page_size=10), license_refresh_interval=0)
    first = source.refresh(None)
    with Counter(sim) as counter:
        source.refresh(first)
    assert counter.counts == {"usersDelta": 1, "users": 15}


# ---------------------------------------------------------------------------- randomised rounds
def _random_round(sim: GraphSimulator, rng: random.Random, next_index: list[int]) -> dict[str, int]:
    ids = [user["id"] for user in sim.tenants[TID].users]
    done = {"create": 0, "update": 0, "licence": 0, "soft": 0, "hard": 0}
    for _ in range(rng.randint(1, 4)):
        index = next_index[0]
        next_index[0] += 1
        sim.upsert_user(
            TID,
            tenant_data.graph_user(index, synced=rng.random() < 0.8, usage_location=rng.choice(["DE", None])),
        )
        done["create"] += 1
    updates: list[Callable[[], dict[str, Any]]] = [
        lambda: {"accountEnabled": rng.random() < 0.5},
        lambda: {"userPrincipalName": f"u{rng.randrange(10**6)}@Contoso.example"},
        lambda: {"usageLocation": rng.choice(["DE", "FR", None])},
        lambda: {"onPremisesImmutableId": rng.choice([None, tenant_data.immutable_id(rng.randrange(1000))])},
        lambda: {"onPremisesSyncEnabled": rng.choice([True, None])},
        lambda: {
            "onPremisesProvisioningErrors": [{"category": "PropertyConflict"}] if rng.random() < 0.5 else []
        },
        lambda: {"assignedLicenses": rng.choice([[], [{"skuId": tenant_data.E3_SKU, "disabledPlans": []}]])},
    ]
    for user_id in rng.sample(ids, min(len(ids), rng.randint(2, 8))):
        props: dict[str, Any] = {}
        for update in rng.sample(updates, rng.randint(1, 3)):
            props.update(update())
        sim.patch_user(TID, user_id, **props)
        done["update"] += 1
    for user_id in rng.sample(ids, 2):
        sim.patch_user(TID, user_id, **_licence_change(0))
        done["licence"] += 1
    for user_id in rng.sample(ids, rng.randint(0, 2)):
        hard = rng.random() < 0.5
        sim.delete_user(TID, user_id, hard=hard)
        done["hard" if hard else "soft"] += 1
    return done


def test_randomised_rounds_equal_a_full_read(sim: GraphSimulator, entra: Harness) -> None:
    rng = random.Random(13)
    sim.tenants[TID].users = tenant_data.users(300, cloud_every=9)
    sim.delta_page_size = 7  # several delta pages per round
    source = entra.users()
    table = source.refresh(None)
    next_index = [1000]
    for round_number in range(8):
        sim.delta_partial = round_number % 2 == 1
        sim.delta_replay = rng.choice([0, 0, 2])
        done = _random_round(sim, rng, next_index)
        with Counter(sim) as counter:
            table = source.refresh(table)
        changed = sum(done.values()) - done["licence"]
        assert table.meta["read"] == "incremental", done
        # Delta pages for the changes (each user once, plus replays), one sweep page (300 users).
        assert counter.counts["usersDelta"] <= math.ceil((changed + sim.delta_replay + 7) / 7)
        assert counter.counts["users"] == 1
        assert counter.counts.get("group", 0) == (1 if round_number == 0 else 0)  # then cached
        assert set(counter.counts) <= {"usersDelta", "users", "group"}
        assert_equal_to_full_read(entra, table)


def test_request_counts_of_full_and_one_percent_churn_at_ten_thousand_users(
    sim: GraphSimulator, entra: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    sim.tenants[TID].users = tenant_data.users(10_000, cloud_every=12)
    source = entra.users()
    with Counter(sim) as full:
        table = source.refresh(None)
    assert full.counts == {"usersDelta": 1, "usersCount": 1, "users": math.ceil(10_000 / 999)}
    rng = random.Random(5)
    victims = rng.sample(range(10_000), 100)  # 1% churn: 70 updates, 15 creates, 15 deletes
    for index in victims[:70]:
        sim.patch_user(TID, tenant_data.user_id(index), accountEnabled=False)
    for index in victims[70:85]:
        sim.delete_user(TID, tenant_data.user_id(index), hard=index % 2 == 0)
    for index in range(20_000, 20_015):
        sim.upsert_user(TID, tenant_data.graph_user(index))
    with Counter(sim) as incremental:
        table = source.refresh(table)
    assert table.meta["read"] == "incremental"
    assert incremental.counts == {"usersDelta": 1}  # 100 changes fit on one delta page of 200
    full_total, incremental_total = sum(full.counts.values()), sum(incremental.counts.values())
    with capsys.disabled():
        print(
            f"\nN=10,000: full read {full_total} requests {full.counts}; "
            f"1% churn incremental {incremental_total} ({incremental_total / full_total:.1%})"
        )
    assert_equal_to_full_read(entra, table)


def test_source_in_a_fresh_process_keeps_working_after_sim_reset(sim: GraphSimulator, entra: Harness) -> None:
    """A table from another simulator run (unknown token): rejected, full read, no error."""
    source: EntraUsersSource = entra.users()
    first = source.refresh(None)
    sim.reset()
    sim.add_tenant(tenant_data.tenant())
    second = source.refresh(first)
    assert second.meta["read"] == "full" and second.n == 10
