"""The bulk paths of the full reads (issue 13): LDAP entries decoded by us, whole pages converted
field by field, keys hashed a column at a time. Each must give exactly what the one-by-one path
gives (that path stays for look-ups and incremental reads), including its errors."""

from __future__ import annotations

import random
import struct
import uuid
from typing import Any

import numpy as np
import pytest
from ldap3.operation.search import search_result_entry_response_to_dict_fast
from ldap3.utils.asn1 import decode_message_fast

from exporter.columns import bytes_keys, text_key, text_keys
from exporter.ids import epoch_seconds
from exporter.model import AdTable, AdTableBuilder, AdUser, EntraTable, EntraTableBuilder
from exporter.sources.ad_entries import (
    MalformedEntry,
    decode_search_entry,
    message_id_and_op,
    wanted_names,
)
from exporter.sources.ad_records import (
    SkippedEntries,
    generalized_time_seconds,
    generalized_times,
    sid_of,
    user_from_raw,
    users_of_page,
)
from exporter.sources.bulk import iso_times
from exporter.sources.graph_records import ShapeError, parse_user, user_columns
from exporter.tables import TableBuilder
from tests.ad.fake_ldap import integer, message, octets, search_entry, tlv
from tests.builders import ad_user
from tests.entra import tenant_data


# ------------------------------------------------------------------------ LDAP entries
def _entry(message_id: int, dn: str, attributes: dict[str, list[bytes]]) -> bytes:
    return message(message_id, search_entry(dn, attributes))


def _ldap3_raw(data: bytes) -> tuple[str, dict[str, list[bytes]]]:
    decoded = decode_message_fast(data)
    entry = search_result_entry_response_to_dict_fast(decoded["payload"], None, None, False)
    return entry["dn"], {k: list(v) for k, v in entry["raw_attributes"].items()}


def test_entries_decode_as_ldap3_decodes_them_short_and_long_lengths() -> None:
    rng = random.Random(5)
    for size in (0, 1, 127, 128, 255, 256, 70000):
        values = {
            "objectGUID": [uuid.UUID(int=rng.getrandbits(128)).bytes_le],
            "description": [bytes(rng.getrandbits(8) for _ in range(size))],
            "otherMailbox": [b"a", b"", b"b" * 300],
        }
        data = _entry(4, f"CN=User {size},OU=Staff,DC=contoso,DC=com", values)
        dn, attributes = decode_search_entry(data, wanted_names(values))
        assert (dn.decode(), attributes) == _ldap3_raw(data)
        assert message_id_and_op(data) == (4, 0x64)


def test_entries_keep_only_the_attributes_asked_for_in_the_callers_spelling() -> None:
    data = _entry(2, "CN=a", {"OBJECTGUID": [b"g" * 16], "sn": [b"x"], "userPrincipalName": [b"u@x"]})
    _, attributes = decode_search_entry(data, wanted_names(["objectGUID", "userPrincipalName"]))
    assert attributes == {"objectGUID": [b"g" * 16], "userPrincipalName": [b"u@x"]}


@pytest.mark.parametrize(
    "data",
    [
        tlv(0x30, integer(3) + b"\x64\x03\x04\x05\x41"),  # the DN claims 5 bytes and has 1
        tlv(0x30, integer(3) + tlv(0x64, octets("CN=a") + tlv(0x30, tlv(0x30, octets("cn"))))),  # no values
        tlv(0x30, integer(3) + tlv(0x64, octets("CN=a") + tlv(0x31, b""))),  # a set, not a sequence
        tlv(0x30, integer(3) + tlv(0x64, octets("CN=a") + tlv(0x30, tlv(0x30, octets("cn") + b"\x31\x05")))),
        tlv(0x30, integer(3) + tlv(0x64, octets("CN=a") + tlv(0x30, b"") + b"junk")),
        _entry(3, "CN=a", {"cn": [b"x"]})[:-1],  # cut short
        b"\x30\x84\xff\xff\xff\xff\x02\x01\x03\x64",  # a length far past the end
    ],
)
def test_malformed_entries_raise_instead_of_being_cut_silently(data: bytes) -> None:
    with pytest.raises(MalformedEntry):
        decode_search_entry(data, wanted_names(["cn"]))


def test_messages_that_are_not_entries_are_left_to_ldap3() -> None:
    assert message_id_and_op(message(7, tlv(0x65, b""))) == (7, 0x65)
    assert message_id_and_op(b"\x00" * 16) is None
    assert message_id_and_op(b"HTTP/1.1 400") is None
    assert message_id_and_op(b"\x30") is None


# ------------------------------------------------------------------------ conversions
def test_generalized_times_in_bulk_equal_the_one_by_one_parser_and_refuse_what_it_refuses() -> None:
    rng = random.Random(7)
    values: list[bytes | None] = [
        f"{rng.randint(1, 9999):04d}{rng.randint(0, 13):02d}{rng.randint(0, 32):02d}"
        f"{rng.randint(0, 25):02d}{rng.randint(0, 61):02d}{rng.randint(0, 61):02d}.0Z".encode()
        for _ in range(20000)
    ]
    values += [None, b"20240229120000.0Z", b"20230229120000.0Z", b"20240101000000Z", b"2024010100000a.0Z"]
    bulk = generalized_times(values).tolist()
    accepted = 0
    for value, seconds in zip(values, bulk, strict=True):
        try:
            expected = generalized_time_seconds(value.decode()) if value else None
        except ValueError:
            expected = None
        if seconds == seconds:
            accepted += 1
            assert seconds == expected, value
        else:  # left to the one-by-one parser: never a value of the common form it accepts
            assert expected is None or not value or len(value) != 17, value
    assert accepted > 5000  # the fast path really is taken


def test_sid_text_of_domain_accounts_and_others() -> None:
    rng = random.Random(3)
    for count in (1, 2, 5, 5, 5, 8):
        subs = [rng.getrandbits(32) for _ in range(count)]
        raw = bytes([1, count]) + (5).to_bytes(6, "big") + struct.pack(f"<{count}I", *subs)
        assert sid_of(raw) == "S-1-5-" + "-".join(map(str, subs))
    with pytest.raises(ValueError):
        sid_of(b"\x01\x05" + bytes(10))


def test_a_page_converts_to_the_users_user_from_raw_makes_and_skips_the_same_entries() -> None:
    def raw_user(i: int, **changes: list[bytes]) -> dict[str, list[bytes]]:
        raw = {
            "objectGUID": [uuid.UUID(int=i + 1).bytes_le],
            "objectSid": [bytes([1, 5]) + (5).to_bytes(6, "big") + struct.pack("<5I", 21, 1, 2, 3, 1000 + i)],
            "sAMAccountName": [f"user{i}".encode()],
            "userPrincipalName": [f"User{i}@Contoso.com".encode()],
            "whenCreated": [b"20240131235959.0Z"],
        }
        raw.update(changes)
        return raw

    entries = [(f"CN=u{i}", raw_user(i)) for i in range(6)]
    entries[1] = ("CN=u1", raw_user(1, whenCreated=[b"20240131235959.5+0100"]))  # the slow path
    entries[2] = ("CN=u2", raw_user(2, whenCreated=[b"20241331235959.0Z"]))  # month 13: skipped
    entries[3] = ("CN=u3", raw_user(3, sAMAccountName=[]))  # skipped
    entries[4] = ("CN=u4", raw_user(4, userPrincipalName=[], whenCreated=[]))
    entries.append(("CN=again", raw_user(5)))  # the same objectGUID again (overlapping bases)
    skipped = SkippedEntries()
    columns, usable = users_of_page(entries, "objectGUID", set(), skipped)
    expected, problems = [], 0
    for _, raw in entries[:6]:
        try:
            expected.append(user_from_raw(raw, "objectGUID"))
        except ValueError:
            problems += 1
    assert list(columns.users()) == expected
    assert (usable, skipped.count, problems) == (5, 2, 2)
    assert skipped.example.startswith("CN=u2:")


def test_keys_hashed_a_column_at_a_time_equal_the_single_key() -> None:
    texts = ["CONTOSO\\Jürgen", "S-1-5-21-1", None, "", "ß", "STRASSE", "x" * 2000]
    assert [int(k) for k in text_keys(texts)] == [text_key(t) for t in texts]
    assert [int(k) for k in text_keys(iter(texts), fold=False)] == [text_key(t, fold=False) for t in texts]
    encoded = [t.encode() if t is not None else None for t in texts]
    assert [int(k) for k in bytes_keys(encoded)] == [text_key(t, fold=False) for t in texts]


def test_ad_columns_build_the_same_table_as_records_one_by_one() -> None:
    users = [ad_user(f"user{i}", when_created=None if i % 7 == 0 else 1000.0 + i) for i in range(50)]
    users[3] = AdUser(users[3].object_guid, users[3].object_sid, "x", None, b"\x01" * 20, None)
    one_by_one = AdTable.from_records(users, "CONTOSO")
    builder = AdTableBuilder("CONTOSO")
    for part in (users[:20], users[20:]):
        builder.add_columns(
            guids=[u.object_guid for u in part],
            anchors=[u.source_anchor for u in part],
            sids=[u.object_sid for u in part],
            sams=[u.sam_account_name for u in part],
            upns=[u.user_principal_name for u in part],
            created=[float("nan") if u.when_created is None else u.when_created for u in part],
        )
    _assert_same_table(builder.build(), one_by_one)


def test_table_builder_extend_checks_lengths_and_guid_sizes() -> None:
    builder = TableBuilder(AdTable)
    row = {c.name: None for c in AdTable.COLUMNS}
    with pytest.raises(ValueError, match="different lengths"):
        builder.extend({**{k: [v] for k, v in row.items()}, "sid": []})
    columns = {k: [v] for k, v in row.items()} | {"created": np.zeros(1), "guid": [b"short"]}
    columns |= {k: [0] for k in ("k_guid", "k_imm", "k_sid", "k_name", "k_upn")}
    with pytest.raises(ValueError, match="16 bytes, got 5"):
        builder.extend(columns)


def _assert_same_table(first: AdTable, second: AdTable) -> None:
    assert first.n == second.n
    for name, value in first.columns().items():
        other = second.column(name)
        if isinstance(value, np.ndarray):
            assert np.array_equal(value, other, equal_nan=value.dtype.kind == "f"), name
        else:
            assert value.values() == other.values(), name  # type: ignore[union-attr]


# ------------------------------------------------------------------------ Graph users
def _odd_users() -> list[dict[str, Any]]:
    """Users of every shape parse_user accepts, the usual ones and the unusual ones."""
    rng = random.Random(11)
    users: list[dict[str, Any]] = []
    for i in range(300):
        user = tenant_data.graph_user(
            i,
            synced=i % 5 != 0,
            immutable=i % 7 != 0,
            created=rng.choice(
                ["2024-03-01T08:15:00Z", None, "", "2024-03-01T08:15:00.1234567Z", "2024-02-29"]
            ),
            errors=("PropertyConflict",) * (i % 3 == 0),
            licenses=rng.choice(
                [
                    None,
                    [],
                    [{"skuId": tenant_data.EMS_SKU.upper(), "disabledPlans": [tenant_data.TEAMS_PLAN]}],
                    [{"skuId": "{" + tenant_data.INTUNE_A_SKU + "}", "disabledPlans": None}],
                ]
            ),
            license_states=rng.choice(
                [
                    [],
                    [tenant_data.license_state(tenant_data.EMS_SKU, group=tenant_data.INTUNE_USERS_GROUP)],
                    [tenant_data.license_state(tenant_data.EMS_SKU, updated="2024-03-01T09:00:00+01:00")],
                    [tenant_data.license_state(tenant_data.EMS_SKU, group="", updated="")],
                ]
            ),
            usage_location=rng.choice(["DE", None]),
            enabled=rng.choice([True, False]),
        )
        if i % 11 == 0:
            user["id"] = user["id"].upper()
        if i % 13 == 0:
            user["id"] = "{" + user["id"] + "}"
        if i % 17 == 0:
            del user["accountEnabled"]
            user["onPremisesSecurityIdentifier"] = " s-1-5-21-1-2-3-4 "
        if i % 19 == 0:
            user["onPremisesProvisioningErrors"] = [{"category": None}, {}]
            user["licenseAssignmentStates"] = None
        users.append(user)
    return users


def test_graph_pages_convert_to_the_users_parse_user_makes() -> None:
    users = _odd_users()
    builder = EntraTableBuilder()
    for start in range(0, len(users), 70):
        builder.add_columns(user_columns(users[start : start + 70]))
    bulk = builder.build()
    one_by_one = EntraTable.from_records([parse_user(u) for u in users])
    assert [bulk.record(row) for row in range(bulk.n)] == [one_by_one.record(r) for r in range(one_by_one.n)]
    for name, value in one_by_one.columns().items():
        other = bulk.column(name)
        if isinstance(value, np.ndarray):
            assert np.array_equal(value, other, equal_nan=value.dtype.kind == "f"), name


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"accountEnabled": "yes"}, "accountEnabled"),
        ({"onPremisesSecurityIdentifier": "not-a-sid"}, "onPremisesSecurityIdentifier"),
        ({"createdDateTime": "2024-13-01T00:00:00Z"}, "createdDateTime is not a time"),
        ({"assignedLicenses": [{"skuId": "not-a-guid"}]}, "skuId"),
        ({"assignedLicenses": [{"skuId": tenant_data.EMS_SKU, "disabledPlans": ["x"]}]}, "disabledPlans"),
        (
            {"licenseAssignmentStates": [{"skuId": tenant_data.EMS_SKU, "assignedByGroup": "group?"}]},
            "assignedByGroup",
        ),
        ({"id": "7af027bc-08d6-4f57-9a71-144896c8da1z"}, "id is not a GUID"),
        ({"id": None}, "without id"),
    ],
)
def test_graph_users_of_a_wrong_shape_fail_as_parse_user_fails(change: dict[str, Any], message: str) -> None:
    broken = {**tenant_data.graph_user(3), **change}
    with pytest.raises(ShapeError, match=message) as exact:
        parse_user(broken)
    with pytest.raises(ShapeError) as bulk:
        user_columns([tenant_data.graph_user(1), broken])
    assert str(bulk.value) == str(exact.value)


def test_iso_times_in_bulk_equal_epoch_seconds() -> None:
    values: list[str | None] = [
        "2024-03-01T08:15:00Z",
        "1999-12-31T23:59:59Z",
        "2024-02-30T00:00:00Z",
        "2024-03-01 08:15:00Z",
        "2024-03-01T08:15:00+00:00",
        None,
        "",
    ]
    bulk = iso_times(values).tolist()
    assert bulk[:2] == [epoch_seconds(v) for v in values[:2]]
    assert all(v != v for v in bulk[2:])  # left to the exact parser
