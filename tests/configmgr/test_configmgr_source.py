"""The ConfigMgr source against real ODBC databases, on SQLite and on PostgreSQL."""

from __future__ import annotations

import logging
import time
import uuid

import numpy as np
import pytest

from exporter.ids import guid_bytes
from exporter.model import CmComponent, CmTable, CmUser
from exporter.sources.base import Source, SourceError
from exporter.sources.configmgr import NotFast, UserColumns, same_content
from tests.configmgr import cmdb
from tests.configmgr.conftest import BULK_USERS, DatabaseFactory

DEADLINE = 120.0  # generous: these tests are about content, not time


def refresh(source: object, previous: CmTable | None = None) -> CmTable:
    table = source.refresh(previous, time.monotonic() + DEADLINE)  # type: ignore[attr-defined]
    assert isinstance(table, CmTable)
    return table


@pytest.fixture(scope="module")
def cases_table(cases_db: str) -> CmTable:
    return refresh(cmdb.make_source(cases_db))


def by_id(table: CmTable) -> dict[int, CmUser]:
    users = [table.record(row) for row in range(table.n)]
    assert len({u.resource_id for u in users}) == table.n, "one row per ResourceID"
    return {user.resource_id: user for user in users}


def test_is_a_source(cases_db: str) -> None:
    source = cmdb.make_source(cases_db)
    assert isinstance(source, Source)
    assert source.kind == "configmgr"


def test_user_in_intune_collection_with_cloud_user_id(cases_table: CmTable) -> None:
    alice = by_id(cases_table)[2001]
    assert alice == CmUser(
        resource_id=2001,
        unique_user_name="CONTOSO\\alice",
        user_principal_name="alice@contoso.com",
        sid="S-1-5-21-1-2-3-1101",
        object_guid=uuid.UUID(int=(0x5EED << 112) | 1).bytes_le,
        creation_date=cmdb.CREATED.timestamp(),
        cloud_user_id=cmdb.ALICE_CLOUD,
        collections=(cmdb.INTUNE, cmdb.INTUNE_PILOT),  # a member of both: one record, two collections
    )
    assert alice.in_intune_collection is True


def test_table_meta_names_the_collections_and_the_read(cases_table: CmTable) -> None:
    assert cases_table.collection_ids == (cmdb.INTUNE, cmdb.INTUNE_PILOT)
    assert cases_table.meta["read"] == "full"


def test_user_in_intune_collection_without_cloud_user_id(cases_table: CmTable) -> None:
    bob = by_id(cases_table)[2002]
    assert bob.in_intune_collection is True
    assert bob.collections == (cmdb.INTUNE,)
    assert bob.cloud_user_id is None


def test_user_in_a_non_intune_collection_is_not_a_member(cases_table: CmTable) -> None:
    users = by_id(cases_table)
    # carol is in "All Staff", and a non-user resource with her id sits in the Intune collection.
    assert users[2003].in_intune_collection is False
    assert users[2007].in_intune_collection is False
    assert users[2008].in_intune_collection is False
    assert users[2003].sid == "S-1-5-21-1-2-3-1103"  # stored lower-case, normalised
    # alice, bob, dave and zoe (Intune Users), erin (Intune Pilot Users).
    assert int(np.count_nonzero(cases_table.in_collection())) == 5


def test_membership_of_the_second_configured_collection_counts(cases_table: CmTable) -> None:
    assert by_id(cases_table)[2005].collections == (cmdb.INTUNE_PILOT,)


def test_disabled_user_is_kept(cases_table: CmTable) -> None:
    dave = by_id(cases_table)[2004]
    assert dave.in_intune_collection is True
    assert dave.cloud_user_id is None  # an empty string is no CloudUserID


def test_upper_case_guid_text_with_braces(cases_table: CmTable) -> None:
    erin = by_id(cases_table)[2005]
    assert erin.cloud_user_id == "abcdef01-2345-6789-abcd-ef0123456789"
    assert erin.object_guid == cmdb.ERIN_GUID.bytes_le
    assert erin.object_guid == guid_bytes(str(cmdb.ERIN_GUID))


def test_null_upn_and_unicode_names(cases_table: CmTable) -> None:
    users = by_id(cases_table)
    assert users[2006].user_principal_name is None
    assert users[2006].unique_user_name == "CONTOSO\\zoe"
    assert users[2007].unique_user_name == "CONTOSO\\lilei"
    frank = users[2008]
    assert (frank.user_principal_name, frank.sid, frank.object_guid, frank.creation_date) == (
        None,
        None,
        None,
        None,
    )
    assert frank.unique_user_name == "CONTOSO\\frank"


def test_unconvertible_row_is_skipped_counted_and_logged(
    cases_db: str, caplog: pytest.LogCaptureFixture
) -> None:
    source = cmdb.make_source(cases_db)
    with caplog.at_level(logging.WARNING, logger="exporter.sources.configmgr"):
        table = refresh(source)
    assert 2009 not in by_id(table)
    assert table.records == len(cmdb.CASE_USERS) - 1
    assert source.last_skipped_rows == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "skipped 1 v_R_User rows" in warnings[0]
    assert "ResourceID 2009" in warnings[0] and "CloudUserId" in warnings[0]


def test_component_status_one_row_per_site_machine_and_component(cases_table: CmTable) -> None:
    assert set(cases_table.components) == {
        # The since-midnight row wins over the since-install row.
        CmComponent("PS1", "CM01.contoso.com", "SMS_CLOUD_USERSYNC", 0),
        # Only one row: it is taken whatever its interval.
        CmComponent("PS1", "CM01.contoso.com", "SMS_DMP_UPLOADER", 1),
        # Two machines report the component: one row each.
        CmComponent("PS1", "CM01.contoso.com", "SMS_DMP_DOWNLOADER", 0),
        CmComponent("PS1", "CM02.contoso.com", "SMS_DMP_DOWNLOADER", 2),
        # Several rows, none since midnight: the worst.
        CmComponent("PS1", "CM01.contoso.com", "SMS_AD_USER_DISCOVERY_AGENT", 1),
        CmComponent("PS1", "CM01.contoso.com", "SMS_COLLECTION_EVALUATOR", 0),
    }
    assert len(cases_table.components) == 6  # SMS_MP_CONTROL_MANAGER is not read


def test_missing_collection_is_a_data_error(cases_db: str) -> None:
    source = cmdb.make_source(cases_db, (cmdb.INTUNE, "PS1FFFFF"))
    with pytest.raises(SourceError) as caught:
        refresh(source)
    assert caught.value.reason == "data"
    assert "PS1FFFFF" in caught.value.message and "does not exist" in caught.value.message


def test_device_collection_is_a_data_error(cases_db: str) -> None:
    source = cmdb.make_source(cases_db, (cmdb.WORKSTATIONS,))
    with pytest.raises(SourceError) as caught:
        refresh(source)
    assert caught.value.reason == "data"
    assert cmdb.WORKSTATIONS in caught.value.message and "device collection" in caught.value.message


def test_describe_names_server_and_database(cases_db: str, database_factory: DatabaseFactory) -> None:
    description = cmdb.make_source(cases_db).describe()
    if database_factory.backend == "postgresql":
        assert description == "configmgr 127.0.0.1/cm_cases"
    else:
        assert description.startswith("configmgr /") and description.endswith("cm_cases.sqlite")


def test_a_refresh_without_deadline_works(cases_db: str) -> None:
    assert cmdb.make_source(cases_db).refresh(None).records == len(cmdb.CASE_USERS) - 1


def test_close_between_refreshes_leaves_the_source_working(cases_db: str) -> None:
    source = cmdb.make_source(cases_db)
    first = refresh(source)
    source.close()  # nothing is open between refreshes
    source.abort()
    second = refresh(source)  # a full read again (no previous)
    assert second is not first and second.records == first.records


def test_100k_users_are_streamed_and_read_correctly(bulk_db: str) -> None:
    source = cmdb.make_source(bulk_db, (cmdb.INTUNE,), fetch_size=7000)
    table = refresh(source)
    assert table.records == BULK_USERS
    assert source.last_skipped_rows == 0
    resource_ids = table.array("resource_id")
    assert len(np.unique(resource_ids)) == BULK_USERS
    assert bool(np.all(np.diff(resource_ids) > 0)), "read in ResourceID order"
    assert int(np.count_nonzero(table.in_collection())) == BULK_USERS // 2
    assert int(np.count_nonzero(~table.array("has_cloud"))) == len(range(0, BULK_USERS, 3))
    for i in (0, 1, 2, 49_999, 50_000, 99_999):
        expected = cmdb.bulk_user(i)
        user = table.record(i)  # ordered by ResourceID = BULK_FIRST_ID + i
        assert user.resource_id == cmdb.BULK_FIRST_ID + i
        assert user.unique_user_name == f"CONTOSO\\{expected.sam}"
        assert user.user_principal_name == expected.upn
        assert user.sid == expected.sid
        assert user.object_guid == expected.object_guid
        assert expected.created is not None and user.creation_date == expected.created.timestamp()
        assert user.cloud_user_id == (expected.cloud_user_id.lower() if expected.cloud_user_id else None)
        assert user.in_intune_collection is cmdb.bulk_in_intune(i)


class _RecordingCursor:
    """Passes everything to a real pyodbc cursor, records fetchmany sizes, forbids fetchall."""

    def __init__(self, cursor: object, batches: list[int]) -> None:
        self._cursor = cursor
        self._batches = batches

    def fetchmany(self, size: int) -> list[object]:
        rows: list[object] = self._cursor.fetchmany(size)  # type: ignore[attr-defined]
        self._batches.append(len(rows))
        return rows

    def fetchall(self) -> list[object]:
        raise AssertionError("fetchall must not be used")

    def __getattr__(self, name: str) -> object:
        return getattr(self._cursor, name)


class _RecordingConnection:
    def __init__(self, connection: object, batches: list[int]) -> None:
        self._connection = connection
        self._batches = batches

    def cursor(self) -> _RecordingCursor:
        return _RecordingCursor(self._connection.cursor(), self._batches)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self._connection, name)

    def __setattr__(self, name: str, value: object) -> None:
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._connection, name, value)


def test_rows_are_fetched_in_batches_of_fetch_size(bulk_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import pyodbc

    batches: list[int] = []
    real_connect = pyodbc.connect
    monkeypatch.setattr(
        pyodbc, "connect", lambda *a, **k: _RecordingConnection(real_connect(*a, **k), batches)
    )
    source = cmdb.make_source(bulk_db, (cmdb.INTUNE,), fetch_size=1000)
    table = refresh(source)
    assert table.records == BULK_USERS
    assert max(batches) == 1000
    # 100k users plus 50k members, in batches of at most 1000 rows.
    assert len(batches) >= (BULK_USERS + BULK_USERS // 2) // 1000
    assert source.last_rows_fetched == sum(batches)


def _without_cloud_user_id_column(connection: object, backend: cmdb.Backend) -> None:
    cmdb.populate_cases(connection, backend)
    cursor = connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("DROP VIEW v_R_User")
    cursor.execute(
        "CREATE VIEW v_R_User AS SELECT ItemKey AS ResourceID, Unique_User_Name0, User_Principal_Name0,"
        " Full_User_Name0, SID0, Object_GUID0, User_Account_Control0, Creation_Date0 FROM User_DISC"
    )
    connection.commit()  # type: ignore[attr-defined]


def test_a_view_without_a_required_column_is_a_data_error(database_factory: DatabaseFactory) -> None:
    connection_string = database_factory.create("cm_no_cloud_column", _without_cloud_user_id_column)
    with pytest.raises(SourceError) as caught:
        refresh(cmdb.make_source(connection_string))
    assert caught.value.reason == "data"
    assert "v_R_User" in caught.value.message
    # PostgreSQL's change check names the missing column first; the full read names it in its own words.
    assert "clouduserid" in caught.value.message.lower()


def test_no_convertible_user_row_at_all_is_a_data_error(database_factory: DatabaseFactory) -> None:
    bad_only = [u for u in cmdb.CASE_USERS if u.resource_id == 2009]
    connection_string = database_factory.create(
        "cm_bad_only",
        lambda c, b: cmdb.populate(c, b, bad_only, cmdb.CASE_COLLECTIONS, [], cmdb.CASE_COMPONENTS),
    )
    with pytest.raises(SourceError) as caught:
        refresh(cmdb.make_source(connection_string))
    assert caught.value.reason == "data"
    assert "none of the 1 v_R_User rows" in caught.value.message


def test_column_wise_read_equals_the_row_by_row_read(bulk_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fast = refresh(cmdb.make_source(bulk_db, (cmdb.INTUNE,)))

    def row_by_row(*args: object) -> None:
        raise NotFast()

    monkeypatch.setattr(UserColumns, "add_batch", row_by_row)
    slow = refresh(cmdb.make_source(bulk_db, (cmdb.INTUNE,)))
    assert same_content(fast, slow) and fast.meta == slow.meta
