"""Unit tests of the ConfigMgr source's pure functions: connection strings, row conversion,
component selection and error classification, on plain Python data."""

from __future__ import annotations

import random
import socket
import time
import uuid
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from exporter.columns import MAX_TEXT_BYTES
from exporter.ids import sid_to_bytes
from exporter.model import CmComponent, CmTable, CmUser
from exporter.odbc import (
    build_connection_string,
    connection_secrets,
    connection_target,
    parse_connection_string,
)
from exporter.secrets import SecretMask
from exporter.sources.configmgr import (
    COMPONENT_COLUMNS,
    SINCE_MIDNIGHT_TALLY,
    USER_COLUMNS,
    Budget,
    ComponentRow,
    DeadlineReached,
    MalformedResultError,
    NotFast,
    RowError,
    RowNotes,
    UserColumns,
    _socket_inodes,
    classify_odbc_error,
    clip_text,
    cloud_user_id,
    column_index,
    component_row,
    dialect_of,
    fingerprint_sql,
    new_stream_socket,
    object_guid,
    same_content,
    scrub,
    select_components,
    text_lookup_sql,
    timestamp,
    user_from_row,
    with_attribute,
)

GUID = uuid.UUID("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0")


# ------------------------------------------------------------------------ connection strings
def pairs(text: str) -> list[tuple[str, str]]:
    return [(a.key, a.value) for a in parse_connection_string(text)]


def test_parse_plain_and_braced_values() -> None:
    assert pairs("DRIVER={ODBC Driver 18 for SQL Server};SERVER=cm01;PWD={a;b}}c=d};Encrypt=yes;") == [
        ("DRIVER", "ODBC Driver 18 for SQL Server"),
        ("SERVER", "cm01"),
        ("PWD", "a;b}c=d"),
        ("Encrypt", "yes"),
    ]


def test_parse_tolerates_spaces_empty_segments_and_keys_without_value() -> None:
    assert pairs(" Server = cm01 ;; junk ; Database= CM_PS1") == [("Server", "cm01"), ("Database", "CM_PS1")]


def test_build_appends_braced_password_and_replaces_existing_credentials() -> None:
    built = build_connection_string("DRIVER={FreeTDS};SERVER=cm01;UID=old;PWD={old}", "svc", "p}w;d")
    assert built == "DRIVER={FreeTDS};SERVER=cm01;UID=svc;PWD={p}}w;d}"
    assert dict(pairs(built)) == {"DRIVER": "FreeTDS", "SERVER": "cm01", "UID": "svc", "PWD": "p}w;d"}


def test_build_braces_a_user_name_only_when_needed() -> None:
    assert build_connection_string("DSN=cm", "CONTOSO\\svc-cm", None) == "DSN=cm;UID=CONTOSO\\svc-cm"
    assert build_connection_string("DSN=cm", "odd;name", None) == "DSN=cm;UID={odd;name}"


def test_build_without_configured_credentials_keeps_the_string() -> None:
    text = "DRIVER={ODBC Driver 18 for SQL Server};SERVER=cm01;Trusted_Connection=yes;Encrypt=yes"
    assert build_connection_string(text, None, None) == text


@pytest.mark.parametrize(
    ("text", "target"),
    [
        ("DRIVER={ODBC Driver 18 for SQL Server};SERVER=cm01;DATABASE=CM_PS1;PWD=x", "cm01/CM_PS1"),
        ("Driver={PostgreSQL Unicode};Servername=db;Port=5432;Database=cm;Password=x", "db/cm"),
        ("DRIVER={FreeTDS};Server=tcp:cm01,1433;Initial Catalog=CM_PS1", "tcp:cm01,1433/CM_PS1"),
        ("DRIVER={SQLite3};Database=/var/lib/cm.sqlite", "/var/lib/cm.sqlite"),
        ("DSN=ConfigMgr;UID=svc;PWD=secret", "ConfigMgr"),
        ("DRIVER={FreeTDS};Host=cm02", "cm02"),
    ],
)
def test_connection_target_has_no_secrets(text: str, target: str) -> None:
    assert connection_target(parse_connection_string(text)) == target


def test_scrub_masks_every_form_of_the_secrets_of_any_length() -> None:
    secrets = connection_secrets(parse_connection_string("SERVER=x;PWD={a}}b}"), "other-secret")
    mask = SecretMask(secrets)
    text = "failed for {a}}b} and a}}b and a}b and other-secret\n  (again)"
    assert scrub(text, mask) == "failed for <secret> and <secret> and <secret> and <secret> (again)"
    assert len(scrub("x" * 1000, mask)) == 400


def test_scrub_masks_before_cutting() -> None:
    secret = "S3cr3t-" * 20
    text = "x" * 390 + secret
    assert "S3cr3t" not in scrub(text, SecretMask([secret]))


def test_with_attribute_replaces_any_spelling_of_the_key() -> None:
    assert with_attribute("DRIVER={SQLite3};Database=/a;timeout=5000", "Timeout", "1") == (
        "DRIVER={SQLite3};Database=/a;Timeout=1"
    )
    assert with_attribute("DSN=cm", "Timeout", "1") == "DSN=cm;Timeout=1"


# ------------------------------------------------------------------------------ user rows
INDEX = {name: position for position, name in enumerate(USER_COLUMNS)}


def row(**values: object) -> list[object]:
    base: dict[str, object] = {
        "ResourceID": 16777220,
        "Unique_User_Name0": "CONTOSO\\alice",
        "User_Principal_Name0": "alice@contoso.com",
        "SID0": "S-1-5-21-1-2-3-1101",
        "Object_GUID0": GUID.bytes_le,
        "Creation_Date0": datetime(2024, 3, 1, 8, 30),
        "CloudUserId": None,
    }
    base.update(values)
    return [base[name] for name in USER_COLUMNS]


MEMBER_OF = {16777220: ("PS100012",), 16777221: ("PS100012",)}


def test_column_index_matches_case_insensitively() -> None:
    description = [(name.lower(), str, None) for name in reversed(USER_COLUMNS)] + [("extra", str, None)]
    index = column_index(description, USER_COLUMNS, "v_R_User")
    assert index["ResourceID"] == len(USER_COLUMNS) - 1
    assert index["CloudUserId"] == 0


def test_column_index_missing_column_is_malformed() -> None:
    with pytest.raises(MalformedResultError, match="v_R_User has no column CloudUserId"):
        column_index([(n,) for n in USER_COLUMNS[:-1]], USER_COLUMNS, "v_R_User")
    with pytest.raises(MalformedResultError, match="no result set"):
        column_index(None, USER_COLUMNS, "v_R_User")


def test_user_from_row_plain_values() -> None:
    user = user_from_row(row(), INDEX, MEMBER_OF)
    assert user.resource_id == 16777220
    assert user.object_guid == GUID.bytes_le
    assert user.creation_date == datetime(2024, 3, 1, 8, 30, tzinfo=UTC).timestamp()
    assert user.collections == ("PS100012",)
    assert user.in_intune_collection is True
    assert user_from_row(row(), INDEX, {}).in_intune_collection is False


@pytest.mark.parametrize(
    "value",
    [
        "{" + str(GUID).upper() + "}",
        str(GUID).upper(),
        str(GUID),
        GUID,
        GUID.bytes_le,
        bytearray(GUID.bytes_le),
        ("{" + str(GUID).upper() + "}").encode("ascii"),  # text a driver handed over as bytes
        "0x" + GUID.bytes_le.hex().upper(),
    ],
)
def test_object_guid_forms(value: object) -> None:
    assert object_guid(value) == GUID.bytes_le


@pytest.mark.parametrize(
    "value",
    ["{" + str(GUID).upper() + "}", str(GUID).upper(), GUID, GUID.bytes_le, str(GUID).upper().encode()],
)
def test_cloud_user_id_forms(value: object) -> None:
    assert cloud_user_id(value) == str(GUID)


@pytest.mark.parametrize("value", [None, "", "   ", b""])
def test_cloud_user_id_empty_is_none(value: object) -> None:
    assert cloud_user_id(value) is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (datetime(2024, 1, 2, 3, 4, 5), datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)),
        (
            datetime(2024, 1, 2, 5, 4, 5, tzinfo=timezone(timedelta(hours=2))),
            datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
        ),
        ("2024-01-02 03:04:05.1234567", datetime(2024, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)),
        ("2024-01-02T03:04:05Z", datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ("2024-01-02 03:04:05", datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)),
    ],
)
def test_timestamps(value: object, expected: datetime) -> None:
    assert timestamp(value, "Creation_Date0") == expected.timestamp()


def test_user_from_row_other_driver_types() -> None:
    user = user_from_row(
        row(
            ResourceID=Decimal("16777221"),
            SID0=sid_to_bytes("S-1-5-21-1-2-3-1101"),
            Creation_Date0="2024-03-01 08:30:00.0000000",
            CloudUserId="{" + str(GUID).upper() + "}",
            User_Principal_Name0="   ",
            Unique_User_Name0="CONTOSO\\zoë.ångström ",
        ),
        INDEX,
        MEMBER_OF,
    )
    assert user.resource_id == 16777221
    assert user.sid == "S-1-5-21-1-2-3-1101"
    assert user.creation_date == datetime(2024, 3, 1, 8, 30, tzinfo=UTC).timestamp()
    assert user.cloud_user_id == str(GUID)
    assert user.user_principal_name is None
    assert user.unique_user_name == "CONTOSO\\zoë.ångström"
    assert user.in_intune_collection is True


@pytest.mark.parametrize(
    ("values", "column"),
    [
        ({"ResourceID": None}, "ResourceID"),
        ({"ResourceID": "abc"}, "ResourceID"),
        ({"ResourceID": True}, "ResourceID"),
        ({"Object_GUID0": b"\x01\x02\x03"}, "Object_GUID0"),
        ({"Object_GUID0": "not-a-guid"}, "Object_GUID0"),
        ({"CloudUserId": "not-a-guid"}, "CloudUserId"),
        ({"CloudUserId": b"\x00" * 5}, "CloudUserId"),
        ({"SID0": "X-1-5"}, "SID0"),
        ({"Creation_Date0": "yesterday"}, "Creation_Date0"),
        ({"ResourceID": 512.5}, "ResourceID"),
        ({"Unique_User_Name0": b"\xff\xfe"}, "Unique_User_Name0"),
        ({"SID0": "S-1-5-21-" + "1" * 8_000_000}, "SID0"),  # no SID is that long: the row is skipped
        ({"CloudUserId": "a" * 8_000_000}, "CloudUserId"),
    ],
)
def test_unconvertible_values_raise_row_error_naming_the_column(
    values: dict[str, object], column: str
) -> None:
    with pytest.raises(RowError) as caught:
        user_from_row(row(**values), INDEX, {})
    assert caught.value.column == column
    assert len(str(caught.value)) < 500 or column == "CloudUserId"  # the value is quoted in full


# ------------------------------------------------------------------------------- long text
def test_clip_text_cuts_at_a_character_boundary() -> None:
    assert clip_text("a" * 10) == "a" * 10
    assert clip_text("a" * MAX_TEXT_BYTES) == "a" * MAX_TEXT_BYTES
    assert clip_text("a" * (MAX_TEXT_BYTES + 1)) == "a" * MAX_TEXT_BYTES
    cut = clip_text("é" * MAX_TEXT_BYTES)  # two bytes each
    assert cut == "é" * (MAX_TEXT_BYTES // 2)
    cut = clip_text("a" + "李" * MAX_TEXT_BYTES)  # three bytes each: no partial character
    assert len(cut.encode()) <= MAX_TEXT_BYTES and cut.endswith("李")


def test_long_names_are_cut_and_counted() -> None:
    notes = RowNotes()
    eight_mb = "CONTOSO\\" + "x" * 8_000_000
    user = user_from_row(
        row(Unique_User_Name0=eight_mb, User_Principal_Name0=eight_mb + "@x"), INDEX, {}, notes
    )
    assert user.unique_user_name is not None and len(user.unique_user_name.encode()) == MAX_TEXT_BYTES
    assert user.user_principal_name is not None and len(user.user_principal_name.encode()) == MAX_TEXT_BYTES
    assert notes.clipped == 2 and notes.first_clipped.startswith("Unique_User_Name0, 8,000,008 bytes")
    # The record round-trips through the table unchanged: the builder has nothing more to cut.
    table = CmTable.from_records([user])
    assert table.record(0) == user


# ------------------------------------------------------------------------------- components
COMPONENT_INDEX = {name: position for position, name in enumerate(COMPONENT_COLUMNS)}


def comp(machine: str, name: str, status: int, tally: str | None = SINCE_MIDNIGHT_TALLY) -> ComponentRow:
    return ComponentRow("PS1", machine, name, status, tally)


def test_component_row_conversion() -> None:
    converted = component_row(
        ["ps1 ", "CM01", "sms_cloud_usersync", Decimal(1), SINCE_MIDNIGHT_TALLY + " "], COMPONENT_INDEX
    )
    assert converted == ComponentRow("PS1", "CM01", "SMS_CLOUD_USERSYNC", 1, SINCE_MIDNIGHT_TALLY)
    with pytest.raises(RowError):
        component_row(["PS1", "CM01", "SMS_CLOUD_USERSYNC", None, None], COMPONENT_INDEX)


def test_select_components_prefers_since_midnight() -> None:
    selected = select_components(
        [comp("CM01", "SMS_CLOUD_USERSYNC", 2, "000A470000100008"), comp("CM01", "SMS_CLOUD_USERSYNC", 0)]
    )
    assert selected == (CmComponent("PS1", "CM01", "SMS_CLOUD_USERSYNC", 0),)


def test_select_components_single_row_and_worst_of_several() -> None:
    selected = select_components(
        [
            comp("CM01", "SMS_DMP_UPLOADER", 1, None),
            comp("CM01", "SMS_DMP_DOWNLOADER", 0, "A"),
            comp("CM01", "SMS_DMP_DOWNLOADER", 2, "B"),
        ]
    )
    assert selected == (
        CmComponent("PS1", "CM01", "SMS_DMP_DOWNLOADER", 2),
        CmComponent("PS1", "CM01", "SMS_DMP_UPLOADER", 1),
    )


def test_select_components_one_per_machine_case_insensitively() -> None:
    selected = select_components(
        [
            comp("CM01", "SMS_CLOUD_USERSYNC", 0),
            comp("cm01", "SMS_CLOUD_USERSYNC", 0),
            comp("CM02", "SMS_CLOUD_USERSYNC", 1),
        ]
    )
    assert [(c.machine_name, c.status) for c in selected] == [("CM01", 0), ("CM02", 1)]


# --------------------------------------------------------------------------- error classes
@pytest.mark.parametrize(
    ("sqlstate", "text", "connecting", "reason"),
    [
        # Messages as the drivers on this machine produce them.
        (
            "08001",
            'connection to server at "127.0.0.1", port 5 failed: FATAL:  password authentication failed'
            ' for user "x"',
            True,
            "auth",
        ),
        (
            "08001",
            'connection to server at "127.0.0.1", port 5 failed: FATAL:  role "nouser" does not exist',
            True,
            "auth",
        ),
        ("08001", 'connection to server at "127.0.0.1", port 1 failed: Connection refused', True, "network"),
        (
            "08S01",
            "[FreeTDS][SQL Server]Unable to connect: Adaptive Server is unavailable or does not exist"
            " (20009)",
            True,
            "network",
        ),
        ("08001", "[FreeTDS][SQL Server]Unable to connect to data source (0)", True, "network"),
        ("57014", "ERROR: canceling statement due to statement timeout", False, "timeout"),
        ("HYT00", "[Microsoft][ODBC Driver 18 for SQL Server]Query timeout expired", False, "timeout"),
        ("HYT01", "[Microsoft][ODBC Driver 18 for SQL Server]Login timeout expired", True, "timeout"),
        (
            "28000",
            "[Microsoft][ODBC Driver 18 for SQL Server][SQL Server]Login failed for user 'svc'. (18456)",
            True,
            "auth",
        ),
        (
            "42000",
            "[SQL Server]The SELECT permission was denied on the object 'v_R_User' (229)",
            False,
            "auth",
        ),
        ("42501", "ERROR: permission denied for view v_r_user", False, "auth"),
        ("42S02", "[SQL Server]Invalid object name 'v_R_User'. (208)", False, "data"),
        ("42P01", 'ERROR: relation "v_r_user" does not exist', False, "data"),
        ("42703", 'ERROR: column "clouduserid" does not exist', False, "data"),
        ("HY000", "[SQLite]no such table: v_R_User (1)", False, "data"),
        ("22007", "Conversion failed when converting date and/or time from character string.", False, "data"),
        ("HY000", "[SQLite]connect failed (14)", True, "other"),
        ("", "something unexpected", False, "other"),
    ],
)
def test_classify_odbc_error(sqlstate: str, text: str, connecting: bool, reason: str) -> None:
    assert classify_odbc_error(sqlstate, text, connecting) == reason


# --------------------------------------------------------------------------- time limits
def test_statement_limit_is_the_query_timeout_until_the_deadline_is_nearer() -> None:
    assert Budget.until(None, 60).limit().describe() == "query_timeout 60s"
    far = Budget.until(time.monotonic() + 600, 60).limit()
    assert (far.seconds, far.cause) == (60, "query_timeout")
    near = Budget.until(time.monotonic() + 10, 60).limit()
    # A tenth of the budget is kept back (at most a second) so that the source stops first.
    assert near.cause == "deadline" and 8.5 < near.seconds <= 9.0
    assert near.whole_seconds == 8
    assert "time left before the refresh deadline" in near.describe()


def test_no_statement_starts_after_the_deadline() -> None:
    budget = Budget.until(time.monotonic() - 1, 60)
    with pytest.raises(DeadlineReached):
        budget.limit()
    with pytest.raises(DeadlineReached):
        budget.check()


def test_whole_seconds_never_mean_no_limit() -> None:
    assert Budget.until(time.monotonic() + 0.6, 60).limit().whole_seconds == 1


# ------------------------------------------------------------------------------ dialects
@pytest.mark.parametrize(
    ("dbms", "dialect"),
    [
        ("Microsoft SQL Server", "sqlserver"),
        ("PostgreSQL", "postgresql"),
        ("SQLite", "sqlite"),
        ("Oracle", "other"),
    ],
)
def test_dialect_of_the_dbms_name(dbms: str, dialect: str) -> None:
    assert dialect_of(dbms) == dialect


def test_change_check_statements_per_dialect() -> None:
    assert fingerprint_sql("sqlite", 1) is None
    assert fingerprint_sql("other", 1) is None
    pg = fingerprint_sql("postgresql", 2)
    mssql = fingerprint_sql("sqlserver", 2)
    assert pg is not None and mssql is not None
    for users, members in (pg, mssql):
        assert "FROM v_R_User" in users
        for column in USER_COLUMNS:
            assert column in users
        assert members.count("?") == 2 and "ResourceType = 4" in members
    assert "md5(ROW(" in pg[0]
    # SQL Server: the CROSS APPLY comes before the WHERE clause.
    assert mssql[1].index("CROSS APPLY") < mssql[1].index("WHERE")


def test_text_lookups_fold_both_sides_with_the_database_upper() -> None:
    assert text_lookup_sql("User_Principal_Name0", 2).endswith(
        "WHERE UPPER(User_Principal_Name0) IN (UPPER(?), UPPER(?))"
    )


# --------------------------------------------------------------------------- unchanged data
def _user(resource_id: int, **changes: object) -> CmUser:
    values: dict[str, object] = {
        "resource_id": resource_id,
        "unique_user_name": f"CONTOSO\\u{resource_id}",
        "user_principal_name": f"u{resource_id}@contoso.com",
        "sid": f"S-1-5-21-1-{resource_id}",
        "object_guid": uuid.UUID(int=resource_id).bytes_le,
        "creation_date": None,
        "cloud_user_id": None,
        "collections": (),
    }
    values.update(changes)
    return CmUser(**values)  # type: ignore[arg-type]


def _table(*users: CmUser, components: tuple[CmComponent, ...] = ()) -> CmTable:
    return CmTable.from_records(users, components, ("PS100012",))


@pytest.mark.parametrize(
    "changed",
    [
        {"user_principal_name": "other@contoso.com"},
        {"user_principal_name": None},
        {"cloud_user_id": str(GUID)},
        {"collections": ("PS100012",)},
        {"creation_date": 1.0},
        {"object_guid": None},
        {"sid": "S-1-5-21-1-999"},
    ],
)
def test_same_content_sees_every_field(changed: dict[str, object]) -> None:
    assert same_content(_table(_user(1), _user(2)), _table(_user(1), _user(2)))
    assert not same_content(_table(_user(1), _user(2)), _table(_user(1), _user(2, **changed)))


def test_same_content_sees_rows_and_components() -> None:
    assert not same_content(_table(_user(1)), _table(_user(1), _user(2)))
    component = CmComponent("PS1", "CM01", "SMS_CLOUD_USERSYNC", 2)
    assert not same_content(_table(_user(1)), _table(_user(1), components=(component,)))


# ------------------------------------------------------------------- column-wise conversion
def _random_value(rng: random.Random, column: str) -> object:
    """Values as the drivers hand them over, mostly usual, some that only the row path handles."""
    guid = uuid.UUID(int=rng.getrandbits(128))
    choices: dict[str, list[object]] = {
        "ResourceID": [rng.randrange(1, 2**40)],
        "Unique_User_Name0": [
            None,
            "",
            "  ",
            f"CONTOSO\\u{rng.randrange(10**6)} ",
            "no-backslash",
            "Zoë",
            "李" * 400,
        ],
        "User_Principal_Name0": [None, f"U{rng.randrange(10**6)}@Contoso.com", " x@y ", "é" * 600],
        "SID0": [None, "", f"s-1-5-21-{rng.randrange(10**9)}", f"S-1-5-21-1-{rng.randrange(10**9)} "],
        "Object_GUID0": [None, guid.bytes_le, guid.bytes],
        "Creation_Date0": [
            None,
            datetime(2020, 1, 1) + timedelta(microseconds=rng.randrange(10**14)),
            datetime(1960, 5, 4, 3, 2, 1, 999999),
        ],
        "CloudUserId": [None, "", str(guid).upper(), "{" + str(guid) + "}", " " + str(guid).upper() + " "],
    }
    slow: dict[str, list[object]] = {
        "ResourceID": [Decimal(rng.randrange(1, 10**6))],
        "Unique_User_Name0": [b"CONTOSO\\b"],
        "SID0": [sid_to_bytes("S-1-5-21-1-2-3-4")],
        "Object_GUID0": [("{" + str(guid).upper() + "}").encode("ascii"), str(guid)],
        "Creation_Date0": ["2024-01-02 03:04:05.1234567", datetime(2024, 1, 2, tzinfo=UTC)],
        "CloudUserId": [guid.bytes_le, str(guid).replace("-", "")],
    }
    pool = choices[column] + (slow.get(column, []) if rng.random() < 0.02 else [])
    return rng.choice(pool)


@pytest.mark.parametrize("seed", range(6))
def test_column_wise_conversion_equals_the_row_by_row_records(seed: int) -> None:
    rng = random.Random(seed)
    collections = ("PS100012", "PS100013")
    batches = []
    for _ in range(8):
        batches.append(
            [
                tuple(_random_value(rng, column) for column in USER_COLUMNS)
                for _ in range(rng.choice([1, 50, 300]))
            ]
        )
    members = {row[0]: (rng.choice(collections),) for batch in batches for row in batch if rng.random() < 0.5}
    index = {name: position for position, name in enumerate(USER_COLUMNS)}
    fast = UserColumns(collections, members)  # type: ignore[arg-type]
    fast_notes, row_notes = RowNotes(), RowNotes()
    records: list[CmUser] = []
    fell_back = 0
    for batch in batches:
        try:
            fast.add_batch(batch, index, fast_notes)
        except NotFast:
            fell_back += 1
            for values in batch:
                fast.add(user_from_row(values, index, fast.members, fast_notes))  # type: ignore[arg-type]
        for values in batch:
            records.append(user_from_row(values, index, members, row_notes))  # type: ignore[arg-type]
    components = (CmComponent("PS1", "CM01", "SMS_CLOUD_USERSYNC", 0),)
    table = fast.build(components)
    expected = CmTable.from_records(records, components, collections)
    assert same_content(table, expected)
    assert table.meta == expected.meta
    assert fast_notes.clipped == row_notes.clipped > 0
    assert fell_back < len(batches)  # most batches took the column-wise path


# ------------------------------------------------------------------------------ the socket
def test_the_connection_socket_is_told_apart_by_its_local_port() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        address = server.getsockname()
        before = [inode for inode in _socket_inodes().values()]
        ours, other = socket.create_connection(address), socket.create_connection(address)
        try:
            assert new_stream_socket(before) is None  # two new sockets: ambiguous
            found = new_stream_socket(before, ours.getsockname()[1])
            assert found is not None and found.fd == ours.fileno()
            peer, _ = server.accept()
            with peer:
                assert found.shutdown()
                assert ours.recv(1) == b""  # a reader of the shut down socket returns at once
        finally:
            ours.close()
            other.close()
        assert not found.shutdown()  # the descriptor is gone (or another file now)
