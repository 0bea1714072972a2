"""Incremental AD reads by uSNChanged, on the real Samba DC (issue 13, CONTRACT "Incremental refresh").

The randomised test applies rounds of random creates, updates (UPN, sAMAccountName, rename),
disables, enables, deletes and moves of users and of whole OUs, and after every round requires
the incremental result (continued from the previous round's table) to equal a fresh full read,
while reading only a few entries. It runs twice: bound as an account that may read tombstones
(deletions exact) and as the low-privilege service account (a deleted account may stay until the
next full read: the contract's one allowed lag, and nothing else may differ).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import ldap3
import pytest
from ldap3.core import exceptions as ldap_errors

from exporter.config import ActiveDirectoryConfig, EstateConfig, Secret
from exporter.model import AdTable, AdUser
from exporter.sources.ad import ActiveDirectorySource
from exporter.sources.ad_ldap import escape_binary
from exporter.sources.isolated import ChildRefresh, Recipe
from exporter.state import EstateState, SavedState, SourceState, StateStore
from tests.ad.conftest import (
    ADMIN_PASSWORD,
    ADMIN_USER,
    DOMAIN_DN,
    USER_CLASSES,
    USER_PASSWORD,
    Directory,
    SambaDC,
    make_config,
)

CHURN = f"OU=Churn,{DOMAIN_DN}"
IN = f"OU=In,{CHURN}"
IN_SUB = f"OU=Sub,{IN}"
IN2 = f"OU=In2,{CHURN}"
OUT = f"OU=Out,{CHURN}"
PARKED = f"OU=Parked,{CHURN}"
BASES = (IN, IN2)
USER_OUS = (IN, IN_SUB, IN2, OUT)
INITIAL_USERS = 80
ROUNDS = 5
OPS_PER_ROUND = 12
_names = itertools.count(1)


# ------------------------------------------------------------------------------ the directory
def _add_ou(conn: ldap3.Connection, dn: str) -> None:
    with contextlib.suppress(ldap_errors.LDAPEntryAlreadyExistsResult):
        conn.add(dn, ["top", "organizationalUnit"])


def _guid_of(conn: ldap3.Connection, dn: str) -> bytes:
    conn.search(dn, "(objectClass=*)", ldap3.BASE, attributes=["objectGUID"])
    return bytes(conn.response[0]["raw_attributes"]["objectGUID"][0])


def _dn_of(conn: ldap3.Connection, guid: bytes) -> str:
    conn.search(DOMAIN_DN, f"(objectGUID={escape_binary(guid)})", ldap3.SUBTREE, attributes=["objectGUID"])
    return next(item["dn"] for item in conn.response if item["type"] == "searchResEntry")


def _rdn(dn: str) -> str:
    return dn.split(",", 1)[0]


@dataclass
class Churn:
    """Random changes in OU=Churn, tracked by objectGUID (DNs change with renames and moves)."""

    conn: ldap3.Connection
    rng: random.Random
    users: list[bytes] = field(default_factory=list)
    ous: list[bytes] = field(default_factory=list)  # OUs created by the churn (movable)
    deleted: set[bytes] = field(default_factory=set)
    log: list[str] = field(default_factory=list)

    def create_user(self, parent: str | None = None, enabled: bool | None = None) -> None:
        number = next(_names)
        sam = f"churn{number:05d}"
        parent = parent or self.rng.choice(USER_OUS)
        enabled = self.rng.random() < 0.85 if enabled is None else enabled
        dn = f"CN=Churn User {number},{parent}"
        self.conn.add(
            dn,
            USER_CLASSES,
            {
                "sAMAccountName": sam,
                "userPrincipalName": f"{sam}@test.local",
                "unicodePwd": f'"{USER_PASSWORD}"'.encode("utf-16-le"),
                "userAccountControl": 512 if enabled else 514,
            },
        )
        self.users.append(_guid_of(self.conn, dn))
        self.log.append(f"create {dn} enabled={enabled}")

    def _pick(self) -> str:
        return _dn_of(self.conn, self.rng.choice(self.users))

    def change_upn(self) -> None:
        dn = self._pick()
        upn = f"renamed{next(_names)}@{self.rng.choice(['test.local', 'TEST.local', 'contoso.com'])}"
        self.conn.modify(dn, {"userPrincipalName": [(ldap3.MODIFY_REPLACE, [upn])]})
        self.log.append(f"upn {dn} -> {upn}")

    def change_sam(self) -> None:
        dn = self._pick()
        sam = f"sam{next(_names):05d}"
        self.conn.modify(dn, {"sAMAccountName": [(ldap3.MODIFY_REPLACE, [sam])]})
        self.log.append(f"sam {dn} -> {sam}")

    def rename(self) -> None:
        dn = self._pick()
        self.conn.modify_dn(dn, f"CN=Renamed {next(_names)}")
        self.log.append(f"rename {dn}")

    def set_enabled(self, enabled: bool) -> None:
        dn = self._pick()
        self.conn.modify(dn, {"userAccountControl": [(ldap3.MODIFY_REPLACE, [512 if enabled else 514])]})
        self.log.append(f"{'enable' if enabled else 'disable'} {dn}")

    def delete(self) -> None:
        guid = self.rng.choice(self.users)
        dn = _dn_of(self.conn, guid)
        self.conn.delete(dn)
        self.users.remove(guid)
        self.deleted.add(guid)
        self.log.append(f"delete {dn}")

    def move_user(self) -> None:
        dn = self._pick()
        target = self.rng.choice([ou for ou in (*USER_OUS, *self._ou_dns()) if not dn.endswith("," + ou)])
        self.conn.modify_dn(dn, _rdn(dn), new_superior=target)
        self.log.append(f"move {dn} -> {target}")

    def _ou_dns(self) -> list[str]:
        return [_dn_of(self.conn, guid) for guid in self.ous]

    def new_ou_with_users(self) -> None:
        """An OU filled outside the scope, then moved in as a whole: its users' own uSNChanged
        does not move, only the OU's."""
        dn = f"OU=Team {next(_names)},{PARKED}"
        _add_ou(self.conn, dn)
        self.ous.append(_guid_of(self.conn, dn))
        for _ in range(self.rng.randint(1, 4)):
            self.create_user(parent=dn)
        target = self.rng.choice([IN, IN2, IN_SUB])
        self.conn.modify_dn(dn, _rdn(dn), new_superior=target)
        self.log.append(f"move OU {dn} (with users) -> {target}")

    def move_ou(self) -> None:
        if not self.ous:
            self.new_ou_with_users()
            return
        guid = self.rng.choice(self.ous)
        dn = _dn_of(self.conn, guid)
        target = self.rng.choice([t for t in (IN, IN2, OUT, PARKED) if not dn.endswith("," + t)])
        self.conn.modify_dn(dn, _rdn(dn), new_superior=target)
        self.log.append(f"move OU {dn} -> {target}")

    def random_round(self, operations: int) -> None:
        actions = [
            (self.create_user, 3),
            (self.change_upn, 2),
            (self.change_sam, 1),
            (self.rename, 1),
            (lambda: self.set_enabled(False), 2),
            (lambda: self.set_enabled(True), 1),
            (self.delete, 2),
            (self.move_user, 3),
            (self.new_ou_with_users, 1),
            (self.move_ou, 1),
        ]
        functions = [function for function, _ in actions]
        weights = [weight for _, weight in actions]
        for function in self.rng.choices(functions, weights, k=operations):
            function()


@pytest.fixture(scope="module")
def churn_area(samba_dc: SambaDC, directory: Directory) -> Iterator[ldap3.Connection]:
    with samba_dc.admin() as conn:
        for ou in (CHURN, IN, IN_SUB, IN2, OUT, PARKED):
            _add_ou(conn, ou)
        seeding = Churn(conn, random.Random(0))
        for index in range(INITIAL_USERS):
            seeding.create_user(parent=USER_OUS[index % len(USER_OUS)], enabled=index % 9 != 0)
        yield conn


# --------------------------------------------------------------------------------- comparing
def records(table: AdTable) -> dict[bytes, AdUser]:
    return {user.object_guid: user for user in (table.record(row) for row in range(table.n))}


def churn_config(samba_dc: SambaDC, privileged: bool = False, **overrides: object) -> ActiveDirectoryConfig:
    config = make_config(samba_dc, search_bases=BASES, netbios_domain="TEST", page_size=50)
    if privileged:  # may read tombstones, like an account granted List Contents on Deleted Objects
        config = replace(config, bind_user=ADMIN_USER, bind_password=Secret(ADMIN_PASSWORD))
    return replace(config, **overrides)  # type: ignore[arg-type]


def full_read(config: ActiveDirectoryConfig) -> AdTable:
    return ActiveDirectorySource(config).refresh(None, deadline=time.monotonic() + 60)


class ChildReads:
    """Refreshes the way the engine runs them for a source built from the config: each in a child
    process, an incremental one given only the held table's meta and handing back only the changes,
    merged here (exporter.sources.isolated)."""

    def __init__(self, config: ActiveDirectoryConfig) -> None:
        self.source = ActiveDirectorySource(config)
        self.recipe = Recipe(EstateConfig(name="churn", active_directory=config), "ad")

    def refresh(self, previous: AdTable | None) -> AdTable:
        in_child, given = self.source.child_refresh(previous)
        assert in_child
        table = ChildRefresh(self.source, self.recipe).run(previous, given, time.monotonic() + 60)
        assert isinstance(table, AdTable)
        return table


def describe(guids: set[bytes], table: AdTable) -> str:
    found = records(table)
    return ", ".join(found[g].sam_account_name if g in found else g.hex() for g in sorted(guids))


# -------------------------------------------------------------------------- randomised rounds
@pytest.mark.parametrize("privileged", [True, False], ids=["tombstones-visible", "service-account"])
def test_random_changes_incremental_equals_full_read(
    samba_dc: SambaDC, churn_area: ldap3.Connection, privileged: bool
) -> None:
    seed = int(os.environ.get("AD_CHURN_SEED", random.randrange(1 << 30)))
    print(f"AD_CHURN_SEED={seed}")
    config = churn_config(samba_dc, privileged)
    source = ActiveDirectorySource(config)
    churn = Churn(churn_area, random.Random(seed))
    churn.users = _churn_users(churn_area)
    table = source.refresh(None, deadline=time.monotonic() + 60)
    assert table.meta["read"] == "full"
    assert table.meta["deletions"] == ("tombstones" if privileged else "next full read")
    full_entries = table.meta["entries_read"]
    in_children = ChildReads(config)
    child_table = in_children.refresh(None)
    assert records(child_table) == records(table)
    lagging: set[bytes] = set()  # deleted since the last full read (service account only)
    report = []
    for round_number in range(1, ROUNDS + 1):
        churn.log.clear()
        before_deleted = set(churn.deleted)
        churn.random_round(OPS_PER_ROUND)
        lagging |= churn.deleted - before_deleted
        table = source.refresh(table, deadline=time.monotonic() + 60)
        child_table = in_children.refresh(child_table)
        expected = records(full_read(config))
        got = records(table)
        context = f"seed {seed}, round {round_number}:\n  " + "\n  ".join(churn.log)
        assert table.meta["read"] == "incremental", context
        # The same changes read in a child and merged into the held table give the same table.
        assert child_table.meta["read"] == "incremental", context
        assert records(child_table) == got, context
        assert "changes_only" not in child_table.meta and "removed" not in child_table.meta
        for key in ("containers", "dc", "empty_bases", "warning"):
            assert child_table.meta.get(key) == table.meta.get(key), (key, context)
        if privileged:
            assert got == expected, context + f"\n  extra: {describe(set(got) - set(expected), table)}"
        else:
            extra = set(got) - set(expected)
            assert extra <= lagging, context + f"\n  extra: {describe(extra - lagging, table)}"
            assert {g: u for g, u in got.items() if g not in extra} == expected, context
        entries = table.meta["entries_read"]
        report.append(
            f"round {round_number}: {entries} entries read incrementally, {full_entries} in a full read"
        )
        # rootDSE + NTDS Settings, then per change: the changed object (step 1) and, in scope, its
        # entry (steps 2/3); an OU moved in also has its users read.
        assert entries <= 2 + 4 * OPS_PER_ROUND + 4 * 4, context
    print("\n".join(report))


def _churn_users(conn: ldap3.Connection) -> list[bytes]:
    """Every user account in OU=Churn, enabled or not, in scope or not."""
    conn.search(CHURN, "(objectClass=user)", ldap3.SUBTREE, attributes=["objectGUID"])
    return [
        bytes(item["raw_attributes"]["objectGUID"][0])
        for item in conn.response
        if item["type"] == "searchResEntry"
    ]


# ----------------------------------------------------------------------------- specific cases
def test_disabled_user_leaves_at_the_next_refresh(samba_dc: SambaDC, churn_area: ldap3.Connection) -> None:
    source = ActiveDirectorySource(churn_config(samba_dc))
    churn = Churn(churn_area, random.Random(1))
    churn.create_user(parent=IN, enabled=True)
    table = source.refresh(None)
    guid = churn.users[-1]
    assert guid in records(table)
    churn_area.modify(_dn_of(churn_area, guid), {"userAccountControl": [(ldap3.MODIFY_REPLACE, [514])]})
    after = source.refresh(table)
    assert after.meta["read"] == "incremental"
    assert guid not in records(after)
    assert after.n == table.n - 1


def test_move_out_of_the_bases_is_seen_at_once(samba_dc: SambaDC, churn_area: ldap3.Connection) -> None:
    source = ActiveDirectorySource(churn_config(samba_dc))
    churn = Churn(churn_area, random.Random(2))
    churn.create_user(parent=IN_SUB, enabled=True)
    guid = churn.users[-1]
    table = source.refresh(None)
    dn = _dn_of(churn_area, guid)
    churn_area.modify_dn(dn, _rdn(dn), new_superior=OUT)
    after = source.refresh(table)
    assert after.meta["read"] == "incremental" and guid not in records(after)


def test_nothing_changed_reads_almost_nothing(samba_dc: SambaDC, churn_area: ldap3.Connection) -> None:
    source = ActiveDirectorySource(churn_config(samba_dc))
    table = source.refresh(None)
    again = source.refresh(table)
    assert again.meta["read"] == "incremental"
    assert records(again) == records(table)
    assert again.meta["entries_read"] <= 4  # rootDSE, NTDS Settings (and whatever Samba itself touched)


def test_restart_continues_incrementally_from_the_state_file(
    samba_dc: SambaDC, churn_area: ldap3.Connection, tmp_path: Path
) -> None:
    config = churn_config(samba_dc)
    table = ActiveDirectorySource(config).refresh(None)
    store = StateStore(tmp_path / "state.json")
    saved = SavedState(
        estates={
            "e": EstateState("hybrid_mdm", {"ad": SourceState(table, True, time.time(), 1.0, time.time())})
        }
    )
    assert store.save(saved, time.time())
    Churn(churn_area, random.Random(3)).create_user(parent=IN2, enabled=True)

    restored = StateStore(tmp_path / "state.json").load().estates["e"].sources["ad"].data
    assert isinstance(restored, AdTable)
    after = ActiveDirectorySource(config).refresh(restored)  # a new process: a new source object
    assert after.meta["read"] == "incremental"
    assert records(after) == records(full_read(config))
    assert after.n == table.n + 1


@pytest.mark.parametrize(
    ("meta_change", "why"),
    [
        (
            {
                "service": "CN=NTDS Settings,CN=DC2,CN=Servers,CN=Default-First-Site-Name,CN=Sites,CN=Configuration"
            },
            "another DC",
        ),
        ({"invocation_id": "00" * 16}, "restored DC"),
        ({"usn": 10**12}, "USN went backwards"),
    ],
)
def test_another_dc_a_restore_or_a_usn_going_backwards_means_a_full_read(
    samba_dc: SambaDC, churn_area: ldap3.Connection, meta_change: dict[str, object], why: str
) -> None:
    source = ActiveDirectorySource(churn_config(samba_dc))
    table = source.refresh(None)
    tampered = table.derive(
        table.columns(), table.children, {**table.meta, "dc": {**table.meta["dc"], **meta_change}}
    )
    assert source.refresh(tampered).meta["read"] == "full", why


def test_changed_scope_means_a_full_read(samba_dc: SambaDC, churn_area: ldap3.Connection) -> None:
    table = ActiveDirectorySource(churn_config(samba_dc)).refresh(None)
    wider = ActiveDirectorySource(churn_config(samba_dc, search_bases=(*BASES, OUT)))
    after = wider.refresh(table)
    assert after.meta["read"] == "full"
    assert records(after) == records(full_read(churn_config(samba_dc, search_bases=(*BASES, OUT))))


def test_member_of_filter_always_reads_everything(samba_dc: SambaDC, churn_area: ldap3.Connection) -> None:
    # Group membership changes the group's uSNChanged, not the user's: no incremental read.
    domain_users = f"CN=Domain Users,CN=Users,{DOMAIN_DN}"
    config = churn_config(samba_dc, user_filter=f"(&(objectClass=user)(!(memberOf={domain_users})))")
    source = ActiveDirectorySource(config)
    table = source.refresh(None)
    assert "dc" not in table.meta
    assert source.refresh(table).meta["read"] == "full"


def test_one_percent_churn_reads_under_five_percent_of_a_full_read(
    samba_dc: SambaDC, directory: Directory, churn_area: ldap3.Connection
) -> None:
    # Issue 13's target on the 253 users of OU=Staff: touch 1% of them (a description, which the
    # records do not hold: the other tests' expectations stay as they are).
    source = ActiveDirectorySource(make_config(samba_dc))
    table = source.refresh(None)
    full_entries = table.meta["entries_read"]
    touched = [directory.users[f"bulk{index:04d}"].dn for index in range(0, 250, 100)]  # 3 users
    for dn in touched:
        churn_area.modify(dn, {"description": [(ldap3.MODIFY_REPLACE, [f"touched {time.time()}"])]})
    after = source.refresh(table)
    assert after.meta["read"] == "incremental"
    assert records(after) == records(table)
    print(f"1% churn: {after.meta['entries_read']} entries read incrementally, {full_entries} in a full read")
    assert after.meta["entries_read"] <= 0.05 * full_entries
