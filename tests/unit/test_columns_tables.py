"""The column machinery under every table (exporter/columns.py, exporter/tables.py) and the model's
table classes: compact text with nulls, categoricals, keyed joins with preferences, row selection and
concatenation that carry child tables along, record round trips and incremental merges."""

from __future__ import annotations

import dataclasses
import itertools
import os
import random
import sys
import threading
import time
import uuid

import numpy as np
import pytest

from exporter.columns import (
    COPY_STEP,
    MAX_TEXT_BYTES,
    NO_KEY,
    Blob,
    BlobBuilder,
    SortedIndex,
    guid_array,
    guid_keys,
    guid_order_key,
    join_buffers,
    safe_take,
    same_bytes,
    text_key,
    text_keys,
)
from exporter.model import (
    AdTable,
    AssignedLicense,
    CmComponent,
    CmTable,
    DeviceTable,
    EntraErrorTable,
    EntraTable,
    LicenseState,
    LicenseStateTable,
)
from exporter.tables import Categorical, Col, Table, TableBuilder
from tests.builders import (
    COLLECTION,
    EMS_SKU,
    INTUNE_SKU,
    NETBIOS,
    ad,
    ad_user,
    cm_for,
    device_for,
    entra,
    entra_for,
    licensed,
)

# =============================================================================== Blob
VALUES = ["alpha", None, "", "Jürgen", None, "東京", "z" * 10]


def test_blob_round_trips_text_with_nulls_and_empty_strings():
    blob = Blob.from_values(VALUES)
    assert len(blob) == len(VALUES)
    assert blob.values() == VALUES
    assert list(blob.null_mask()) == [v is None for v in VALUES]


def test_blob_without_nulls_has_no_null_array():
    blob = Blob.from_values(["a", "", "b"])
    assert blob.nulls is None
    assert list(blob.null_mask()) == [False, False, False]


def test_bytes_blob_keeps_raw_bytes():
    raw = [bytes(range(16)), None, b"\xff\xfe", b""]
    blob = Blob.from_values(raw, text=False)
    assert blob.values() == raw
    assert blob.raw(0) == bytes(range(16))


def test_long_text_is_cut_at_a_character_boundary():
    text = "ä" * MAX_TEXT_BYTES  # two bytes per character
    (value,) = Blob.from_values([text]).values()
    assert isinstance(value, str)
    assert value == "ä" * (MAX_TEXT_BYTES // 2)


def test_long_bytes_are_cut_without_being_decoded():
    raw = bytes([0xFF, 0x00, 0x80]) * MAX_TEXT_BYTES
    (value,) = Blob.from_values([raw], text=False).values()
    assert value == raw[:MAX_TEXT_BYTES]


@pytest.mark.parametrize(
    "rows",
    [[6, 0, 3], [1, 4], [0, 0, 5, 1], [], [2, 2], list(range(len(VALUES)))[::-1]],
)
def test_blob_take_gives_the_rows_in_order_with_their_nulls(rows):
    blob = Blob.from_values(VALUES)
    taken = blob.take(np.asarray(rows, dtype=np.int64))
    assert taken.values() == [VALUES[r] for r in rows]
    assert list(taken.null_mask()) == [VALUES[r] is None for r in rows]
    assert taken.offsets[0] == 0 and taken.offsets[-1] == len(taken.data)
    if not any(VALUES[r] is None for r in rows):
        assert taken.nulls is None


@pytest.mark.parametrize("text", [True, False])
def test_blob_concat_mixes_parts_with_and_without_nulls(text):
    def encode(values):
        return [v.encode() if (v is not None and not text) else v for v in values]

    parts_values = [["a", None], [], ["b", "c"], [None], ["", "d"]]
    parts = [Blob.from_values(encode(values), text=text) for values in parts_values]
    joined = Blob.concat(parts)
    expected = encode([v for values in parts_values for v in values])
    assert joined.values() == expected
    assert joined.text is text
    assert list(joined.null_mask()) == [v is None for v in expected]
    no_nulls = Blob.concat(
        [Blob.from_values(encode(["x"]), text=text), Blob.from_values(encode(["y"]), text=text)]
    )
    assert no_nulls.nulls is None and no_nulls.values() == encode(["x", "y"])


def test_blob_concat_of_nothing_is_empty():
    assert len(Blob.concat([])) == 0


def test_blob_take_then_concat_is_consistent():
    rng = random.Random(3)
    values = [rng.choice([None, "", "x" * rng.randint(1, 9), "ü"]) for _ in range(200)]
    blob = Blob.from_values(values)
    rows = [rng.randrange(len(values)) for _ in range(150)]
    left, right = blob.take(np.asarray(rows[:70])), blob.take(np.asarray(rows[70:]))
    assert Blob.concat([left, right]).values() == [values[r] for r in rows]


def test_blob_builder_starting_with_nulls():
    builder = BlobBuilder()
    for value in [None, None, "a"]:
        builder.append(value)
    assert builder.build().values() == [None, None, "a"]


# =============================================================================== Categorical
def test_categorical_values_codes_and_missing_names():
    cat = Categorical.from_values(["Active", None, "Error", "Active"])
    assert [cat.get(i) for i in range(len(cat))] == ["Active", None, "Error", "Active"]
    assert list(cat.codes) == [0, -1, 1, 0]
    assert cat.code("Error") == 1
    assert cat.code("Disabled") == -2  # no row has -2: comparisons with it never match
    assert cat.codes_of(["Error", "Disabled", "Active"]) == [1, 0]


def test_categorical_concat_merges_vocabularies_and_keeps_nulls():
    parts = [
        Categorical.from_values(["a", None, "b"]),
        Categorical.from_values([]),
        Categorical.from_values(["c", "a", None]),
        Categorical.from_values([None]),
    ]
    joined = Categorical.concat(parts)
    assert [joined.get(i) for i in range(len(joined))] == ["a", None, "b", "c", "a", None, None]
    assert sorted(joined.vocab) == ["a", "b", "c"]
    assert joined.codes.dtype == np.int32
    empty = Categorical.concat([])
    assert len(empty) == 0 and empty.vocab == ()


def test_categorical_take():
    cat = Categorical.from_values(["x", None, "y"])
    taken = cat.take(np.asarray([2, 1, 2]))
    assert [taken.get(i) for i in range(3)] == ["y", None, "y"]


# =============================================================================== keys
def test_text_key_is_text_keys_of_one_value():
    values = ["Alice@Contoso.com", "S-1-5-21-1-2-3-1001", "", None, "Ärger", "CONTOSO\\bob"]
    for fold in (True, False):
        keys = text_keys(values, fold=fold)
        assert [text_key(v, fold=fold) for v in values] == [int(k) for k in keys]
    assert text_key(None) == text_key("") == NO_KEY


def test_text_keys_fold_case_unless_asked_not_to():
    assert text_key("Alice@Contoso.COM") == text_key("alice@contoso.com")
    assert text_key("ÄRGER") == text_key("ärger")
    assert text_key("AbC=", fold=False) != text_key("abc=", fold=False)
    assert text_key("a") != text_key("b")


def test_guid_keys_respect_presence_and_differ_per_guid():
    raw = [uuid.uuid4().bytes for _ in range(50)]
    column, present = guid_array([*raw, None])
    keys = guid_keys(column, present)
    assert keys[-1] == NO_KEY
    assert NO_KEY not in keys[:-1]
    assert len(set(keys[:-1].tolist())) == 50
    assert len(guid_keys(np.zeros(0, dtype="V16"))) == 0


def test_guid_order_key_sorts_as_the_bytes():
    raw = [uuid.uuid4().bytes for _ in range(30)]
    column, _ = guid_array(raw)
    high, low = guid_order_key(column)
    order = np.lexsort((low, high))
    assert [raw[i] for i in order] == sorted(raw)


# =============================================================================== SortedIndex
def test_sorted_index_leaves_out_missing_keys_and_finds_rows():
    keys = np.asarray([5, NO_KEY, 3, 9, 3], dtype=np.uint64)
    index = SortedIndex.build(keys)
    assert len(index) == 4
    assert list(index.lookup(np.asarray([3, 9, 4, NO_KEY], dtype=np.uint64))) == [2, 3, -1, -1]
    assert list(index.contains(np.asarray([5, NO_KEY, 7], dtype=np.uint64))) == [True, False, False]
    assert list(index.rows_with(3)) == [2, 4]
    assert list(index.rows_with(NO_KEY)) == []


def test_sorted_index_prefers_the_lowest_preference_whatever_the_row_order():
    keys = np.asarray([7, 7, 7, 8], dtype=np.uint64)
    preference = np.asarray([30, 10, 20, 0], dtype=np.int64)
    index = SortedIndex.build(keys, preference)
    assert list(index.lookup(np.asarray([7, 8], dtype=np.uint64))) == [1, 3]
    assert list(index.rows_with(7)) == [1, 2, 0]


def test_lookup_sorted_equals_lookup():
    rng = np.random.default_rng(5)
    keys = rng.integers(0, 20, 300).astype(np.uint64)
    probe = rng.integers(0, 25, 200).astype(np.uint64)
    preference = rng.integers(0, 1000, 300).astype(np.int64)
    index = SortedIndex.build(keys, preference)
    assert np.array_equal(index.lookup_sorted(SortedIndex.build(probe), len(probe)), index.lookup(probe))


def test_empty_indexes():
    empty = SortedIndex.build(np.zeros(0, dtype=np.uint64))
    probe = np.asarray([1, 2], dtype=np.uint64)
    assert list(empty.lookup(probe)) == [-1, -1]
    assert list(empty.contains(probe)) == [False, False]
    assert list(empty.lookup_sorted(SortedIndex.build(probe), 2)) == [-1, -1]


def test_safe_take_fills_missing_rows():
    values = np.asarray([1.5, 2.5])
    assert list(safe_take(values, np.asarray([1, -1, 0]), np.nan)[[0, 2]]) == [2.5, 1.5]
    assert np.isnan(safe_take(values, np.asarray([-1]), np.nan)[0])
    assert list(safe_take(np.zeros(0, dtype=np.bool_), np.asarray([-1, -1]), False)) == [False, False]


# =============================================================================== Table machinery
class Pair(Table):
    COLUMNS = (Col("n", "i8"), Col("name", "text"), Col("kind", "cat"))
    __slots__ = ()


def test_table_checks_its_columns():
    with pytest.raises(ValueError, match="missing"):
        Pair({"n": np.zeros(1, np.int64), "name": Blob.from_values(["a"])})
    with pytest.raises(ValueError, match="different lengths"):
        Pair(
            {
                "n": np.zeros(2, np.int64),
                "name": Blob.from_values(["a"]),
                "kind": Categorical.from_values(["x"]),
            }
        )


def test_child_rows_must_point_at_parent_rows():
    states = LicenseStateTable.empty()
    bad = TableBuilder(EntraErrorTable)
    bad.add({"row": 3, "category": "PropertyConflict"})
    with pytest.raises(ValueError, match="out of range"):
        EntraTable(
            entra(entra_for(ad_user("one"))).columns(),
            children={"errors": EntraErrorTable(bad.columns()), "states": states},
        )


def test_table_builder_and_take_and_where():
    builder = TableBuilder(Pair)
    for i, (name, kind) in enumerate([("a", "x"), (None, "y"), ("c", None), ("d", "x")]):
        builder.add({"n": i, "name": name, "kind": kind})
    table = Pair(builder.columns())
    taken = table.take(np.asarray([3, 1]))
    assert list(taken.array("n")) == [3, 1]
    assert [taken.text("name", i) for i in range(2)] == ["d", None]
    assert [taken.cat("kind").get(i) for i in range(2)] == ["x", "y"]
    kept = table.where(table.array("n") % 2 == 0)
    assert list(kept.array("n")) == [0, 2]
    assert Pair.concat([]).n == 0
    both = Pair.concat([kept, taken])
    assert list(both.array("n")) == [0, 2, 3, 1]
    assert [both.cat("kind").get(i) for i in range(4)] == ["x", None, "x", "y"]


def _entra_users():
    users = []
    for i in range(6):
        base = entra_for(ad_user(f"e{i}"), object_id=str(uuid.UUID(int=i + 1, version=4)))
        states = [LicenseState(INTUNE_SKU, "Active", "None", None, (), float(i))] * (i % 3)
        assigned = [AssignedLicense(EMS_SKU, ("p1", "p2"))] if i % 2 else []
        users.append(
            dataclasses.replace(
                licensed(base, states=states, assigned=assigned, usage_location=None if i == 2 else "DE"),
                provisioning_error_categories=("PropertyConflict",) * (i % 2),
            )
        )
    return users


def test_entra_records_round_trip_with_their_children():
    users = _entra_users()
    table = entra(*users)
    assert [table.record(i) for i in range(table.n)] == users


def test_take_carries_children_along_with_their_parents():
    users = _entra_users()
    table = entra(*users)
    rows = [5, 0, 3, 2]
    taken = table.take(np.asarray(rows))
    assert [taken.record(i) for i in range(taken.n)] == [users[r] for r in rows]
    states = taken.children["states"]
    assert states.n == sum(len(users[r].license_states) for r in rows)
    assert int(states.array("row").max()) < taken.n


def test_concat_shifts_child_rows():
    users = _entra_users()
    first, second = entra(*users[:3]), entra(*users[3:])
    joined = EntraTable.concat([first, second])
    assert [joined.record(i) for i in range(joined.n)] == users
    assert joined.children["licenses"].n == sum(len(u.assigned_licenses) for u in users)


def test_take_of_nothing_is_an_empty_table_with_empty_children():
    table = entra(*_entra_users()).take(np.zeros(0, dtype=np.int64))
    assert table.n == 0
    assert all(child.n == 0 for child in table.children.values())


def test_ad_cm_and_device_records_round_trip():
    users = [ad_user("r1"), ad_user("r2", upn=None, when_created=None)]
    assert [ad(*users).record(i) for i in range(2)] == users
    records = [
        cm_for(users[0], in_collection=True, cloud_user_id=str(uuid.uuid4())),
        dataclasses.replace(cm_for(users[1], by="name"), creation_date=None),
    ]
    table = CmTable.from_records(records, [CmComponent("PS1", "CM01", "SMS_CLOUD_USERSYNC", 2)], [COLLECTION])
    assert [table.record(i) for i in range(2)] == records
    assert table.components == (CmComponent("PS1", "CM01", "SMS_CLOUD_USERSYNC", 2),)
    device_list = [device_for(str(uuid.uuid4())), device_for(None, compliance=None, last_sync=None, name="X")]
    device_table = DeviceTable.from_records(device_list)
    assert [device_table.record(i) for i in range(2)] == device_list


def test_cm_collections_are_bits_of_the_configured_ids():
    user = ad_user("coll")
    record = dataclasses.replace(cm_for(user), collections=("ps100099", "PS100012"))
    table = CmTable.from_records([record, cm_for(ad_user("none"))], collection_ids=["PS100012", "PS100099"])
    assert table.collection_ids == ("PS100012", "PS100099")
    assert table.collections_of(0) == ("PS100012", "PS100099")
    assert list(table.in_collection()) == [True, False]


def test_row_look_ups_by_id_and_guid():
    users = _entra_users()
    table = entra(*users)
    assert table.row_of_id(users[4].id.upper()) == 4
    assert table.row_of_id("{" + users[1].id + "}") == 1
    assert table.row_of_id(str(uuid.uuid4())) is None
    people = [ad_user("g1"), ad_user("g2")]
    assert ad(*people).row_of_guid(people[1].object_guid) == 1
    assert ad(*people).row_of_guid(uuid.uuid4().bytes) is None


# =============================================================================== incremental merges
def _sams(table: AdTable) -> list[str]:
    return [table.text("sam", i) for i in range(table.n)]


def test_ad_with_changes_replaces_removes_and_adds():
    a, b, c = ad_user("a"), ad_user("b"), ad_user("c")
    table = ad(a, b, c)
    table.meta["usn"] = 42
    renamed = dataclasses.replace(b, user_principal_name="new@contoso.com")
    d = ad_user("d")
    merged = table.with_changes([renamed, d], [c.object_guid, uuid.uuid4().bytes])
    assert _sams(merged) == ["a", "b", "d"]
    assert merged.record(1) == renamed
    assert merged.meta["usn"] == 42 and merged.netbios_domain == NETBIOS
    assert table.n == 3 and table.record(1) == b  # the old table did not change
    # The merged table's join keys are the new values.
    assert merged.index("k_upn").rows_with(text_key("NEW@contoso.com")).tolist() == [1]
    assert merged.index("k_upn").rows_with(text_key(b.user_principal_name)).tolist() == []


def test_with_changes_keeps_the_last_of_repeated_upserts():
    """A delta page may carry the same object twice: the later version wins and the table holds one row."""
    a, b = ad_user("a"), ad_user("b")
    first = dataclasses.replace(b, user_principal_name="first@contoso.com")
    last = dataclasses.replace(b, user_principal_name="last@contoso.com")
    merged = ad(a, b).with_changes([first, ad_user("c"), last], [])
    assert _sams(merged) == ["a", "c", "b"]
    assert merged.record(2) == last
    users = _entra_users()
    changed = dataclasses.replace(users[1], user_principal_name="v1@contoso.com")
    again = dataclasses.replace(users[1], user_principal_name="v2@contoso.com", license_states=())
    table = entra(*users).with_changes([changed, again], [])
    assert table.n == len(users)
    assert table.record(table.row_of_id(users[1].id)) == again


def test_entra_with_changes_replaces_children_and_group_names():
    users = _entra_users()
    table = entra(*users)
    replaced = dataclasses.replace(users[4], license_states=(), assigned_licenses=())
    merged = table.with_changes([replaced], [users[0].id.upper()], group_names={"g": "Group"})
    assert merged.n == len(users) - 1
    assert merged.row_of_id(users[0].id) is None
    assert merged.record(merged.row_of_id(users[4].id)) == replaced
    expected_states = (
        sum(len(u.license_states) for u in users)
        - len(users[4].license_states)
        - len(users[0].license_states)
    )
    assert merged.children["states"].n == expected_states
    assert merged.group_names == {"g": "Group"}
    assert table.with_changes([], []).group_names == {}


def test_with_changes_on_many_rows_removes_exactly_the_named_guids():
    rng = random.Random(11)
    users = [ad_user(f"m{i}") for i in range(500)]
    table = ad(*users)
    removed = set(rng.sample(range(500), 120))
    merged = table.with_changes([], [users[i].object_guid for i in sorted(removed)])
    assert _sams(merged) == [f"m{i}" for i in range(500) if i not in removed]


def test_take_and_append_equals_take_then_concat_children_included():
    users = _entra_users()
    table = entra(*users)
    other = entra(*users[:2])
    rows = np.array([len(users) - 1, 1, 3], dtype=np.int64)
    expected = type(table).concat([table.take(rows), other], meta={"m": 1})
    merged = table.take_and_append(rows, other, {"m": 1})
    assert merged.meta == {"m": 1} and merged.n == expected.n == 5
    assert [merged.record(r) for r in range(merged.n)] == [expected.record(r) for r in range(expected.n)]
    for name, child in expected.children.items():
        assert merged.children[name].n == child.n
        assert list(merged.children[name].array("row")) == list(child.array("row"))


def test_a_refresh_child_defers_the_join_indexes_to_the_exporter():
    """After defer_prepare() (a refresh child), prepare() builds no index; tables still work,
    building an index when one is asked for. Run in a fresh interpreter: the switch is process-wide."""
    import subprocess
    import sys

    script = """
from exporter.model import AdTable, AdUser
from exporter.tables import defer_prepare

def table():
    user = AdUser(object_guid=bytes(range(16)), object_sid="S-1-5-21-1-2-3-1001", sam_account_name="ann",
                  user_principal_name="ann@contoso.com", source_anchor=bytes(range(16)), when_created=0.0)
    return AdTable.from_records([user], "CONTOSO")

assert "index:k_guid" in table().prepare()._cache
defer_prepare()
deferred = table().prepare()
assert "index:k_guid" not in deferred._cache
assert deferred.row_of_guid(bytes(range(16))) == 0 and "index:k_guid" in deferred._cache
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr


def test_join_buffers_keeps_every_byte_of_every_kind_of_part():
    parts = [os.urandom(COPY_STEP * 2 + 17), b"", memoryview(b"abc"), bytearray(b"xyz" * 1000)]
    joined = join_buffers(parts)
    assert bytes(joined) == b"".join(bytes(part) for part in parts)


def test_joining_a_large_column_lets_other_threads_run_meanwhile():
    """A scrape must not wait for a whole column to be copied: while join_buffers copies 128 MiB
    of memoryviews (columns read back from a refresh child or the state file), another thread gets
    the GIL again and again; ``b"".join`` of the same parts holds it for the whole copy."""
    parts = [memoryview(bytes(64 << 20)), memoryview(bytes(64 << 20))]
    ticks: list[float] = []
    copying = threading.Event()
    done = threading.Event()

    def tick() -> None:
        copying.wait()
        while not done.is_set():
            ticks.append(time.perf_counter())

    ticker = threading.Thread(target=tick)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.001)
    try:
        ticker.start()
        copying.set()
        started = time.perf_counter()
        joined = join_buffers(parts)
        ended = time.perf_counter()
        done.set()
        ticker.join()
    finally:
        sys.setswitchinterval(interval)
    assert len(joined) == 128 << 20
    moments = [started, *(t for t in ticks if started < t < ended), ended]
    # One C call (b"".join) leaves the ticker without a turn for the whole copy (measured: 86% of it).
    longest_wait = max(b - a for a, b in itertools.pairwise(moments))
    assert longest_wait < 0.5 * (ended - started), (longest_wait, ended - started)


def test_same_bytes_compares_every_step_of_any_kind_of_buffer():
    data = os.urandom(COPY_STEP * 3 + 5)
    assert same_bytes(data, memoryview(bytearray(data)))
    changed = bytearray(data)
    changed[-1] ^= 1  # in the last, short step
    assert not same_bytes(data, changed)
    assert not same_bytes(data, data[:-1])
    assert same_bytes(b"", memoryview(b""))
    numbers = np.array([1.5, np.nan], dtype=np.float64)
    assert same_bytes(numbers.data.cast("B"), numbers.copy().data.cast("B"))  # NaN equals itself here
