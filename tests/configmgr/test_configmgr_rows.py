"""Unit tests of the ConfigMgr source's pure functions: connection strings, row conversion,
component selection and error classification, on plain Python data."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from exporter.ids import sid_to_bytes
from exporter.model import CmComponent
from exporter.odbc import (
    build_connection_string,
    connection_secrets,
    connection_target,
    parse_connection_string,
)
from exporter.sources.configmgr import (
    COMPONENT_COLUMNS,
    SINCE_MIDNIGHT_TALLY,
    USER_COLUMNS,
    ComponentRow,
    MalformedResultError,
    RowError,
    classify_odbc_error,
    cloud_user_id,
    column_index,
    component_row,
    object_guid,
    scrub,
    select_components,
    timestamp,
    user_from_row,
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


def test_scrub_removes_every_form_of_the_passwords() -> None:
    secrets = connection_secrets(parse_connection_string("SERVER=x;PWD={a}}b}"), "other-secret")
    text = "failed for {a}}b} and a}}b and a}b and other-secret\n  (again)"
    assert scrub(text, secrets) == "failed for <secret> and <secret> and <secret> and <secret> (again)"
    assert len(scrub("x" * 1000, [])) == 400


# ------------------------------------------------------------------------------ user rows
INDEX = {name: position for position, name in enumerate(USER_COLUMNS)}


def row(**values: object) -> list[object]:
    base: dict[str, object] = {
        "ResourceID": 16777220,
        "Unique_User_Name0": "CONTOSO\\alice",
        "User_Principal_Name0": "alice@contoso.com",
        "Full_User_Name0": "Alice",
        "SID0": "S-1-5-21-1-2-3-1101",
        "Object_GUID0": GUID.bytes_le,
        "User_Account_Control0": 512,
        "Creation_Date0": datetime(2024, 3, 1, 8, 30),
        "CloudUserId": None,
    }
    base.update(values)
    return [base[name] for name in USER_COLUMNS]


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
    user = user_from_row(row(), INDEX, {16777220})
    assert user.resource_id == 16777220
    assert user.object_guid == GUID.bytes_le
    assert user.creation_date == datetime(2024, 3, 1, 8, 30, tzinfo=UTC).timestamp()
    assert user.in_intune_collection is True
    assert user_from_row(row(), INDEX, set()).in_intune_collection is False


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
            User_Account_Control0="514",
            Creation_Date0="2024-03-01 08:30:00.0000000",
            CloudUserId="{" + str(GUID).upper() + "}",
            User_Principal_Name0="   ",
            Full_User_Name0="Zoë Ångström ",
        ),
        INDEX,
        {16777221},
    )
    assert user.resource_id == 16777221
    assert user.sid == "S-1-5-21-1-2-3-1101"
    assert user.user_account_control == 514
    assert user.creation_date == datetime(2024, 3, 1, 8, 30, tzinfo=UTC).timestamp()
    assert user.cloud_user_id == str(GUID)
    assert user.user_principal_name is None
    assert user.full_user_name == "Zoë Ångström"
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
        ({"User_Account_Control0": 512.5}, "User_Account_Control0"),
        ({"Full_User_Name0": b"\xff\xfe"}, "Full_User_Name0"),
    ],
)
def test_unconvertible_values_raise_row_error_naming_the_column(
    values: dict[str, object], column: str
) -> None:
    with pytest.raises(RowError) as caught:
        user_from_row(row(**values), INDEX, set())
    assert caught.value.column == column


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
