"""The state file: round trips, writes only what changed, survives kills and rejects damage."""

from __future__ import annotations

import gc
import json
import mmap
import os
import weakref

import numpy as np
import pytest

from exporter.model import (
    AssignedLicense,
    DeviceTable,
    EntraTable,
    LicenseState,
    ManagedDevice,
    OrganizationData,
    ServicePlan,
    SubscribedSku,
    Subscription,
)
from exporter.pipelines.evaluation import FirstSeen
from exporter.state import (
    EstateState,
    SavedState,
    SourceState,
    StateStore,
    read_table,
    write_table,
)
from tests.builders import ad, ad_user, cm, cm_for, entra_for


def entra_table():
    a = ad_user("anna")
    licensed = entra_for(a)
    licensed = licensed.__class__(
        **{
            **{f: getattr(licensed, f) for f in licensed.__slots__},
            "assigned_licenses": (AssignedLicense("aaaa0000-0000-0000-0000-000000000001", ("p1", "p2")),),
            "license_states": (
                LicenseState(
                    "aaaa0000-0000-0000-0000-000000000001", "Error", "CountViolation", "g1", ("p1",), 1234.5
                ),
            ),
            "provisioning_error_categories": ("PropertyConflict",),
            "usage_location": "DE",
        }
    )
    return EntraTable.from_records(
        [licensed, entra_for(ad_user("ben"), sync_enabled=False)], {"g1": "Licensing"}
    )


def organization():
    return OrganizationData(
        True,
        1000.0,
        (SubscribedSku("s1", "EMS", 5, 10, 0, 0, 0, (ServicePlan("p", "INTUNE_A"),)),),
        (Subscription("sub", "s1", "EMS", "Enabled", False, 10, 2000.0),),
    )


def devices():
    return DeviceTable.from_records(
        [
            ManagedDevice(
                "0000aaaa-0000-0000-0000-000000000001", None, "Windows", "compliant", "mdm", 1.0, None, "PC1"
            )
        ]
    )


def saved(first_seen=None):
    users = [ad_user("anna", upn=None), ad_user("ben")]
    return SavedState(
        label_key="k" * 64,
        estates={
            "contoso": EstateState(
                pipeline="hybrid_mdm",
                sources={
                    "ad": SourceState(ad(*users), True, 1000.0, 1.5, 900.0),
                    "entra": SourceState(entra_table(), False, None, None),
                    "configmgr": SourceState(cm(cm_for(users[0], in_collection=True)), True, 1000.0, 0.1),
                    "entra_organization": SourceState(organization(), True, 1000.0, 0.2),
                    "intune_devices": SourceState(devices(), True, 1000.0, 0.2),
                },
                first_seen=first_seen,
            )
        },
    )


def same_table(a, b):
    assert type(a) is type(b) and a.n == b.n
    for name, value in a.columns().items():
        other = b.column(name)
        if isinstance(value, np.ndarray):
            assert np.array_equal(value, other, equal_nan=value.dtype.kind == "f"), name
        else:
            assert [value.get(i) for i in range(a.n)] == [other.get(i) for i in range(b.n)], name
    for name, child in a.children.items():
        same_table(child, b.children[name])


def test_round_trip_of_every_source_type(tmp_path):
    seen = FirstSeen.from_rows(
        "hybrid_mdm", np.array([5, 3], np.uint64), np.array([1, 2], np.int8), np.array([1.0, 2.0])
    )
    state = saved(seen)
    store = StateStore(tmp_path / "state.json")
    assert store.save(state, 1234.0)
    loaded = StateStore(tmp_path / "state.json").load()
    assert loaded.label_key == "k" * 64
    estate = loaded.estates["contoso"]
    for kind, source in state.estates["contoso"].sources.items():
        got = estate.sources[kind]
        assert (got.up, got.last_success, got.duration) == (source.up, source.last_success, source.duration)
        if kind == "entra_organization":
            assert got.data == source.data
        else:
            same_table(source.data, got.data)
    assert estate.sources["entra"].data.record(0) == state.estates["contoso"].sources["entra"].data.record(0)
    assert estate.sources["entra"].data.group_names == {"g1": "Licensing"}
    assert list(estate.first_seen.keys) == [3, 5]
    assert os.stat(tmp_path / "state.json").st_mode & 0o777 == 0o600


def test_only_changed_tables_are_written_again(tmp_path):
    state = saved()
    store = StateStore(tmp_path / "state.json")
    store.save(state, 1.0)
    files = {p.name: p.stat().st_mtime_ns for p in store.directory.iterdir()}
    store.save(state, 2.0)  # nothing changed: only the manifest is rewritten
    assert {p.name: p.stat().st_mtime_ns for p in store.directory.iterdir()} == files
    source = state.estates["contoso"].sources["ad"]
    source.data = source.data.derive(source.data.columns(), meta={**source.data.meta, "usn": 42})
    store.save(state, 3.0)  # meta only: still no table file rewritten, the meta is in the manifest
    assert set(p.name for p in store.directory.iterdir()) == set(files)
    assert StateStore(tmp_path / "state.json").load().estates["contoso"].sources["ad"].data.meta["usn"] == 42
    source.data = ad(ad_user("carl"))
    store.save(state, 4.0)
    after = {p.name for p in store.directory.iterdir()}
    assert len(after) == len(files) and after != set(files)  # the old AD file replaced by a new one


def test_the_store_does_not_keep_written_tables_alive(tmp_path):
    """Only weak references: a 500k estate's replaced tables are freed at once, not at the next write;
    a table whose columns are gone is written again (their ids may now name other columns)."""
    state = saved()
    store = StateStore(tmp_path / "state.json")
    source = state.estates["contoso"].sources["ad"]
    columns = [weakref.ref(column) for column in source.data.columns().values()]
    store.save(state, 1.0)
    ad_file = {p.name for p in store.directory.iterdir() if "-ad-" in p.name}
    source.data = ad(ad_user("carl"))  # the engine replaces the table; nothing else holds the old one
    gc.collect()
    assert all(column() is None for column in columns)
    store.save(state, 2.0)
    assert {p.name for p in store.directory.iterdir() if "-ad-" in p.name}.isdisjoint(ad_file)
    same_table(source.data, StateStore(tmp_path / "state.json").load().estates["contoso"].sources["ad"].data)


def test_interrupted_write_keeps_the_previous_state_and_leaves_no_temp_file(tmp_path):
    store = StateStore(tmp_path / "state.json")
    store.save(saved(), 1.0)
    state = saved()
    state.estates["contoso"].sources["ad"].data = ad(ad_user("zoe"))
    assert not store.save(state, 2.0, should_stop=lambda: True)
    assert not list(store.directory.glob("*.tmp"))
    loaded = StateStore(tmp_path / "state.json").load()
    assert loaded.estates["contoso"].sources["ad"].data.n == 2  # the old complete state


def test_leftovers_of_a_killed_write_are_removed_at_start(tmp_path):
    store = StateStore(tmp_path / "state.json")
    store.save(saved(), 1.0)
    (store.directory / "contoso-ad-deadbeef.tbl.tmp").write_bytes(b"half")
    (tmp_path / "state.json.tmp").write_text("{")
    (store.directory / "contoso-ad-orphan.tbl").write_bytes(b"unreferenced")
    loaded = StateStore(tmp_path / "state.json").load()
    assert loaded.estates["contoso"].sources["ad"].data.n == 2
    names = {p.name for p in store.directory.iterdir()}
    assert not any(n.endswith(".tmp") for n in names) and "contoso-ad-orphan.tbl" not in names
    assert not (tmp_path / "state.json.tmp").exists()


def manifest(tmp_path):
    store = StateStore(tmp_path / "state.json")
    store.save(
        saved(
            FirstSeen.from_rows(
                "hybrid_mdm", np.array([1], np.uint64), np.array([1], np.int8), np.array([5.0])
            )
        ),
        1.0,
    )
    return json.loads((tmp_path / "state.json").read_text())


@pytest.mark.parametrize(
    "damage",
    [
        lambda m: m.update(estates=[1, 2]),
        lambda m: m["estates"]["contoso"]["sources"]["ad"].update(last_success="yesterday"),
        lambda m: m["estates"]["contoso"]["sources"]["ad"].update(last_success=-1e20),
        lambda m: m["estates"]["contoso"]["sources"]["ad"].update(duration=-5),
        lambda m: m["estates"]["contoso"]["sources"]["ad"].update(table="../../etc/passwd"),
        lambda m: m["estates"]["contoso"].update(pipeline="nonsense"),
        lambda m: m.update(version="2"),
        lambda m: m.update(unexpected=True),
    ],
)
def test_damaged_manifest_is_rejected_with_one_warning(tmp_path, caplog, damage):
    document = manifest(tmp_path)
    damage(document)
    (tmp_path / "state.json").write_text(json.dumps(document))
    loaded = StateStore(tmp_path / "state.json").load()
    assert "contoso" not in loaded.estates or not loaded.estates["contoso"].sources
    assert "state file" in caplog.text


def test_damaged_table_file_starts_only_that_estate_clean(tmp_path, caplog):
    manifest(tmp_path)
    store = StateStore(tmp_path / "state.json")
    name = json.loads((tmp_path / "state.json").read_text())["estates"]["contoso"]["sources"]["ad"]["table"]
    path = store.directory / name
    raw = bytearray(path.read_bytes())
    raw[-20:] = b"\xff" * 20  # scribble over the end of the last buffer
    path.write_bytes(bytes(raw[: len(raw) // 2]))  # and cut the file
    loaded = StateStore(tmp_path / "state.json").load()
    assert "contoso" not in loaded.estates
    assert "starting estate contoso clean" in caplog.text


def test_first_seen_times_out_of_range_are_rejected(tmp_path, caplog):
    store = StateStore(tmp_path / "state.json")
    bad = FirstSeen.from_rows(
        "hybrid_mdm", np.array([1], np.uint64), np.array([1], np.int8), np.array([-1e20])
    )
    store.save(saved(bad), 1.0)
    assert "contoso" not in StateStore(tmp_path / "state.json").load().estates
    assert "outside years" in caplog.text


def test_table_file_validates_offsets_and_codes(tmp_path):
    table = entra_table()
    path = tmp_path / "t.tbl"
    assert write_table(path, table)
    same_table(table, read_table(path, EntraTable))
    with pytest.raises(ValueError):
        read_table(path, DeviceTable)


def test_a_flipped_bit_inside_a_column_is_caught(tmp_path, caplog):
    manifest(tmp_path)
    store = StateStore(tmp_path / "state.json")
    name = json.loads((tmp_path / "state.json").read_text())["estates"]["contoso"]["sources"]["configmgr"][
        "table"
    ]
    path = store.directory / name
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x01  # inside the last buffer, shape intact
    path.write_bytes(bytes(raw))
    assert "contoso" not in StateStore(tmp_path / "state.json").load().estates
    assert "checksum" in caplog.text


def _owner(value: object) -> object:
    """The object that owns the memory behind a numpy array or memoryview."""
    while True:
        if isinstance(value, np.ndarray) and value.base is not None:
            value = value.base
        elif isinstance(value, memoryview):
            value = value.obj
        else:
            return value


def test_a_table_read_back_lives_in_an_anonymous_mapping_freed_with_it(tmp_path):
    # Its columns are views of one buffer: an mmap unmaps with the GIL released when the last view
    # goes, where a bytes object of the file would be one munmap with the GIL held.
    table = entra_table()
    path = tmp_path / "t.tbl"
    assert write_table(path, table)
    read = read_table(path, EntraTable)
    mapping = _owner(read.column("created"))
    assert isinstance(mapping, mmap.mmap)
    for name in ("k_id", "k_imm", "synced", "created"):
        assert _owner(read.column(name)) is mapping
    assert _owner(read.column("upn").data) is mapping
    probe = weakref.ref(mapping)  # type: ignore[arg-type]
    del read, mapping
    gc.collect()
    assert probe() is None  # freed with the table, nothing else keeps it
    path.write_bytes(b"")
    with pytest.raises(ValueError):
        read_table(path, EntraTable)
