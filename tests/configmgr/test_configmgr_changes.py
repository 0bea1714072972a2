"""Refreshes after changes (issue 13): an unchanged database gives back the previous table itself,
every change is seen, and a refresh from a previous table always equals a full read, on SQLite (full
read compared with the previous table) and PostgreSQL (change check first)."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from exporter.columns import MAX_TEXT_BYTES
from exporter.model import CmTable
from exporter.sources.configmgr import ConfigMgrSource, same_content
from exporter.state import write_table
from tests.configmgr import cmdb
from tests.configmgr.conftest import BULK_USERS, DatabaseFactory

Statement = tuple[str, tuple[object, ...]]


def refresh(source: ConfigMgrSource, previous: CmTable | None = None) -> CmTable:
    return source.refresh(previous, time.monotonic() + 120)


def full_read(connection_string: str) -> CmTable:
    return refresh(cmdb.make_source(connection_string))


def test_unchanged_database_gives_back_the_previous_table(
    cases_db: str, database_factory: DatabaseFactory
) -> None:
    source = cmdb.make_source(cases_db)
    first = refresh(source)
    assert refresh(source, first) is first
    assert refresh(source, first) is first
    if database_factory.backend == "postgresql":
        assert source.last_change_check == "unchanged"
        assert first.meta["fingerprint"].startswith("postgresql:")
    else:
        assert source.last_change_check is None  # SQLite has no hash function: full read, compared
        assert "fingerprint" not in first.meta


def test_unchanged_100k_database(bulk_db: str, database_factory: DatabaseFactory) -> None:
    source = cmdb.make_source(bulk_db, (cmdb.INTUNE,))
    first = refresh(source)
    started = time.process_time()
    assert refresh(source, first) is first
    cpu = time.process_time() - started
    if database_factory.backend == "postgresql":
        # The change check reads one row per statement: no user row crosses the wire.
        assert source.last_rows_fetched < 20
        assert cpu < 1.0, cpu
    else:
        assert source.last_rows_fetched > BULK_USERS


def test_a_full_read_is_requested_with_previous_none(cases_db: str) -> None:
    source = cmdb.make_source(cases_db)
    first = refresh(source)
    second = refresh(source, None)
    assert second is not first and same_content(first, second)
    assert second.meta["read"] == "full"


def test_other_configured_collections_read_everything(cases_db: str) -> None:
    previous = refresh(cmdb.make_source(cases_db, (cmdb.INTUNE,)))
    table = refresh(cmdb.make_source(cases_db), previous)
    assert table is not previous
    assert table.collection_ids == (cmdb.INTUNE, cmdb.INTUNE_PILOT)


def test_a_previous_table_without_fingerprint_is_compared(cases_db: str) -> None:
    """A table from an older state file has no fingerprint: the full read equals it, so its columns
    are kept (with the fingerprint to compare the next refresh with, where there is one)."""
    source = cmdb.make_source(cases_db)
    first = refresh(source)
    restored = CmTable(first.columns(), meta={k: v for k, v in first.meta.items() if k != "fingerprint"})
    second = refresh(source, restored)
    assert same_content(second, restored)
    assert second.column("name") is restored.column("name")
    assert second.meta.get("fingerprint") == first.meta.get("fingerprint")
    assert refresh(source, second) is second


# ------------------------------------------------------------------------------- changes
NEW_USER = cmdb._case_user(2100, "newbie", "New Bie", "newbie@contoso.com", cmdb._guid(100), None)


def insert_user(user: cmdb.UserRecord, backend: cmdb.Backend) -> Statement:
    columns = ", ".join(cmdb.USER_DISC_COLUMNS)
    marks = ", ".join("?" * len(cmdb.USER_DISC_COLUMNS))
    return f"INSERT INTO User_DISC ({columns}) VALUES ({marks})", cmdb._user_values(backend, user)


CHANGES: dict[str, Callable[[cmdb.Backend], list[Statement]]] = {
    "cloud user id set": lambda b: [
        (
            "UPDATE User_DISC SET CloudUserId = ? WHERE ItemKey = ?",
            ("0F0F0F0F-1111-2222-3333-444444444444", 2002),
        )
    ],
    "upn case changed": lambda b: [
        ("UPDATE User_DISC SET User_Principal_Name0 = ? WHERE ItemKey = ?", ("Bob@Contoso.com", 2002))
    ],
    "sid changed": lambda b: [
        ("UPDATE User_DISC SET SID0 = ? WHERE ItemKey = ?", ("S-1-5-21-7-7-7-7", 2003))
    ],
    "guid changed": lambda b: [
        ("UPDATE User_DISC SET Object_GUID0 = ? WHERE ItemKey = ?", (cmdb._guid(77), 2003))
    ],
    "creation date changed": lambda b: [
        (
            "UPDATE User_DISC SET Creation_Date0 = ? WHERE ItemKey = ?",
            (cmdb._time_value(b, datetime(2024, 5, 1, 9, 0, 1, tzinfo=UTC)), 2004),
        )
    ],
    "member added": lambda b: [
        (
            "INSERT INTO CollectionMembers (CollectionID, ResourceID, ResourceType) VALUES (?, ?, ?)",
            (cmdb.INTUNE, 2003, 4),
        )
    ],
    "member removed": lambda b: [
        ("DELETE FROM CollectionMembers WHERE CollectionID = ? AND ResourceID = ?", (cmdb.INTUNE, 2002))
    ],
    "user deleted": lambda b: [("DELETE FROM User_DISC WHERE ItemKey = ?", (2007,))],
    "user added": lambda b: [insert_user(NEW_USER, b)],
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_every_change_is_seen(database_factory: DatabaseFactory, change: str) -> None:
    name = "cm_change_" + change.replace(" ", "_")
    connection_string = database_factory.create(name, cmdb.populate_cases)
    source = cmdb.make_source(connection_string)
    before = refresh(source)
    database_factory.change(name, *CHANGES[change](database_factory.backend))
    after = refresh(source, before)
    assert after is not before and not same_content(after, before)
    assert same_content(after, full_read(connection_string))
    assert after.meta["read"] == "full"
    if database_factory.backend == "postgresql":
        assert source.last_change_check == "changed"
    assert refresh(source, after) is after


def test_a_component_change_keeps_the_records(database_factory: DatabaseFactory) -> None:
    connection_string = database_factory.create("cm_change_component", cmdb.populate_cases)
    source = cmdb.make_source(connection_string)
    before = refresh(source)
    database_factory.change(
        "cm_change_component",
        (
            "UPDATE Summarizer_Components SET Status = 2 WHERE ComponentName = ? AND TallyInterval = ?",
            ("SMS_CLOUD_USERSYNC", cmdb.SINCE_MIDNIGHT),
        ),
    )
    after = refresh(source, before)
    assert after is not before
    assert same_content(after, full_read(connection_string))
    usersync = [c for c in after.components if c.component_name == "SMS_CLOUD_USERSYNC"]
    assert [c.status for c in usersync] == [2]
    if database_factory.backend == "postgresql":
        # Only the components were read: the record columns are the previous table's own arrays.
        assert after.column("resource_id") is before.column("resource_id")
        assert after.meta["read"] == "incremental"
    assert refresh(source, after) is after


# ---------------------------------------------------------------------------- random rounds
def random_round(rng: random.Random, backend: cmdb.Backend, state: dict[str, Any]) -> list[Statement]:
    """A few random creates, updates, deletes and membership moves (or none at all)."""
    statements: list[Statement] = []
    users: list[int] = state["users"]
    for _ in range(rng.choice([0, 1, 3, 6])):
        action = rng.choice(["create", "update_upn", "update_cloud", "delete", "join", "leave"])
        if action == "create" or not users:
            state["next"] += 1
            rid = state["next"]
            user = cmdb._case_user(rid, f"r{rid}", f"R {rid}", f"r{rid}@contoso.com", cmdb._guid(rid), None)
            statements.append(insert_user(user, backend))
            users.append(rid)
            continue
        rid = rng.choice(users)
        if action == "update_upn":
            upn = rng.choice([None, f"x{rng.randrange(10**6)}@contoso.com", f"R{rid}@CONTOSO.COM"])
            statements.append(("UPDATE User_DISC SET User_Principal_Name0 = ? WHERE ItemKey = ?", (upn, rid)))
        elif action == "update_cloud":
            cloud = rng.choice([None, f"{rng.randrange(16**8):08X}-0000-4000-8000-{rid:012d}"])
            statements.append(("UPDATE User_DISC SET CloudUserId = ? WHERE ItemKey = ?", (cloud, rid)))
        elif action == "delete":
            statements.append(("DELETE FROM User_DISC WHERE ItemKey = ?", (rid,)))
            users.remove(rid)
        elif action == "join":
            statements.append(
                (
                    "INSERT INTO CollectionMembers (CollectionID, ResourceID, ResourceType) VALUES (?, ?, ?)",
                    (rng.choice([cmdb.INTUNE, cmdb.INTUNE_PILOT]), rid, 4),
                )
            )
        else:
            statements.append(("DELETE FROM CollectionMembers WHERE ResourceID = ?", (rid,)))
    return statements


def test_random_changes_refresh_equals_a_full_read(database_factory: DatabaseFactory) -> None:
    connection_string = database_factory.create("cm_random", cmdb.populate_cases)
    source = cmdb.make_source(connection_string)
    rng = random.Random(1303)
    state: dict[str, Any] = {
        "users": [u.resource_id for u in cmdb.CASE_USERS if u.resource_id != 2009],
        "next": 3000,
    }
    previous = refresh(source)
    unchanged_rounds = 0
    for _ in range(12):
        statements = random_round(rng, database_factory.backend, state)
        if statements:
            database_factory.change("cm_random", *statements)
        table = refresh(source, previous)
        assert same_content(table, full_read(connection_string))
        if not statements:
            assert table is previous
            unchanged_rounds += 1
        previous = table
    assert unchanged_rounds >= 1, "the seed should give a round without changes"


# ------------------------------------------------------------------------------- long text
EIGHT_MB = 8 * 1024 * 1024


def _huge_values(connection: Any, backend: cmdb.Backend) -> None:
    """Three users with 8 MB names or UPNs, one with an 8 MB SID, next to the ordinary ones."""
    huge = [
        cmdb._case_user(2201, "huge1", "Huge", "h" * EIGHT_MB, cmdb._guid(201), None),
        cmdb._case_user(2202, "huge2", "Huge", "huge2@contoso.com", cmdb._guid(202), None),
        cmdb._case_user(2203, "huge3", "Huge", "ü" * EIGHT_MB, cmdb._guid(203), None),
        cmdb._case_user(
            2204, "huge4", "Huge", "huge4@contoso.com", cmdb._guid(204), None, sid="S-1-" + "9" * EIGHT_MB
        ),
    ]
    cmdb.populate(
        connection,
        backend,
        [*cmdb.CASE_USERS, *huge],
        cmdb.CASE_COLLECTIONS,
        cmdb.CASE_MEMBERS,
        cmdb.CASE_COMPONENTS,
        wide_text=True,
    )
    cursor = connection.cursor()
    cursor.execute(
        "UPDATE User_DISC SET Unique_User_Name0 = ? WHERE ItemKey = ?", ("CONTOSO\\" + "n" * EIGHT_MB, 2201)
    )
    cursor.execute(
        "UPDATE User_DISC SET Unique_User_Name0 = ? WHERE ItemKey = ?", ("CONTOSO\\" + "李" * EIGHT_MB, 2202)
    )
    connection.commit()


def test_huge_values_are_cut_end_to_end(
    database_factory: DatabaseFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = cmdb.make_source(database_factory.create("cm_huge", _huge_values))
    with caplog.at_level(logging.WARNING, logger="exporter.sources.configmgr"):
        table = refresh(source)
    # The ordinary records, the three huge ones; the one with an 8 MB "SID" is skipped as malformed.
    assert table.records == len(cmdb.CASE_USERS) - 1 + 3
    assert source.last_skipped_rows == 2  # mallory's CloudUserId and the 8 MB SID
    assert source.last_clipped_values == 4
    rows = {table.record(r).resource_id: table.record(r) for r in range(table.n)}
    for rid in (2201, 2202, 2203):
        for text in (rows[rid].unique_user_name, rows[rid].user_principal_name):
            assert text is not None and len(text.encode()) <= MAX_TEXT_BYTES
    assert rows[2202].unique_user_name is not None and rows[2202].unique_user_name.endswith("李")
    assert rows[2203].user_principal_name == "ü" * (MAX_TEXT_BYTES // 2)
    for name in ("name", "upn", "sid"):
        assert len(table.blob(name).data) < 20 * MAX_TEXT_BYTES
    state_file = tmp_path / "configmgr.table"
    assert write_table(state_file, table)
    assert state_file.stat().st_size < 64 * 1024  # it was 52 MB with three 8 MB names
    warnings = [
        r.getMessage() for r in caplog.records if "cut 4 v_R_User text values to 1024 bytes" in r.getMessage()
    ]
    assert len(warnings) == 1 and "8,388,616 bytes" in warnings[0]
    assert refresh(source, table) is table  # cut the same way every time
