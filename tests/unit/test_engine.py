"""The refresh engine: failures stay local to a source, last good data is kept, state survives restarts."""

from __future__ import annotations

import json
import threading
import uuid

import pytest

from exporter.config import Config, EstateConfig
from exporter.engine import Engine
from exporter.model import ConfigMgrData, OrganizationData
from exporter.sources.base import SourceError
from exporter.state import StateStore, decode, encode
from tests.builders import ad, ad_user, cm, cm_for, entra, entra_for
from tests.fakes import Clock, FakeSource, blocking

HOUR = 3600.0


def make_estate(n=3):
    users = [ad_user(f"eng{i}", when_created=900_000.0) for i in range(n)]
    synced = [entra_for(u) for u in users]
    records = [
        cm_for(u, in_collection=True, cloud_user_id=(e.id if i else None))
        for i, (u, e) in enumerate(zip(users, synced, strict=False))
    ]
    return ad(*users), entra(*synced, cloud_only=2), cm(*records)


def config(**kwargs):
    return Config(estates=(EstateConfig(name="contoso"),), **kwargs)


def engine_with(sources, clock=None, store=None, **cfg):
    return Engine(config(**cfg), {"contoso": sources}, clock=clock or Clock(), state_store=store)


def raising(reason, message="backend said no"):
    def fail(previous):
        raise SourceError(reason, message)

    return fail


def test_refresh_builds_view_and_summaries():
    ad_data, entra_data, cm_data = make_estate()
    engine = engine_with(
        [FakeSource("ad", ad_data), FakeSource("entra", entra_data), FakeSource("configmgr", cm_data)]
    )
    assert not engine.snapshot().ready
    engine.refresh_all()
    snap = engine.snapshot()
    assert snap.ready
    (estate,) = snap.estates
    assert estate.view.users["intune_enabled"] == 2
    assert estate.view.users["in_intune_collection"] == 1
    assert estate.configmgr_summary.missing_cloud_user_id == {True: 1, False: 0}
    assert estate.sources["entra"].records == 5  # cloud-only users are counted as records
    assert all(s.up for s in estate.sources.values())


def test_view_needs_all_three_sources():
    ad_data, _, cm_data = make_estate()
    engine = engine_with([FakeSource("ad", ad_data), FakeSource("configmgr", cm_data)])
    engine.refresh_all()
    (estate,) = engine.snapshot().estates
    assert estate.view is None
    assert estate.configmgr_summary is not None


def test_failure_marks_only_that_source_down_and_keeps_its_last_good_data():
    ad_data, entra_data, cm_data = make_estate()
    cm_source = FakeSource("configmgr", cm_data)
    engine = engine_with([FakeSource("ad", ad_data), FakeSource("entra", entra_data), cm_source])
    engine.refresh_all()
    cm_source.behaviour = raising("network", "cm01 unreachable")
    engine.refresh("contoso", "configmgr")
    (estate,) = engine.snapshot().estates
    status = estate.sources["configmgr"]
    assert not status.up and status.errors["network"] == 1
    assert status.last_error == "network: cm01 unreachable"
    assert estate.sources["ad"].up and estate.sources["entra"].up
    assert estate.configmgr is cm_data
    assert estate.view.users["intune_enabled"] == 2
    assert cm_source.previous_seen[-1] is cm_data  # incremental readers get their last good data


def test_unexpected_exception_is_counted_as_other_and_does_not_escape():
    def boom(previous):
        raise KeyError("surprise")

    engine = engine_with([FakeSource("ad", boom)])
    engine.refresh("contoso", "ad")
    status = engine.snapshot().estates[0].sources["ad"]
    assert status.errors["other"] == 1 and not status.up
    assert "KeyError" in status.last_error


def test_slow_backend_times_out_without_blocking_and_no_second_refresh_piles_up():
    release = threading.Event()
    slow = FakeSource("ad", blocking(release))
    engine = engine_with([slow], refresh_interval=60, refresh_timeout=0.2)
    engine.refresh("contoso", "ad")
    status = engine.snapshot().estates[0].sources["ad"]
    assert status.errors["timeout"] == 1 and not status.up
    engine.refresh("contoso", "ad")  # the first read is still hanging: do not start another
    assert slow.calls == 1
    assert engine.snapshot().estates[0].sources["ad"].errors["timeout"] == 2
    release.set()


def test_stuck_ages_grow_while_a_source_is_down():
    clock = Clock()
    users = [ad_user("late", when_created=clock.now - HOUR)]
    ad_source = FakeSource("ad", ad(*users))
    engine = engine_with(
        [ad_source, FakeSource("entra", entra()), FakeSource("configmgr", cm())], clock=clock
    )
    engine.refresh_all()
    assert engine.snapshot().estates[0].view.stuck["ad_created"] == 0
    clock.now += 2 * HOUR
    ad_source.behaviour = raising("timeout")
    engine.refresh("contoso", "ad")
    assert engine.snapshot().estates[0].view.stuck["ad_created"] == 1


def test_state_survives_restart_before_any_backend_answers(tmp_path):
    clock = Clock()
    store = StateStore(tmp_path / "state.json")
    ad_data, entra_data, cm_data = make_estate()
    org = OrganizationData(True, clock.now - 600, (), ())
    first = engine_with(
        [
            FakeSource("ad", ad_data),
            FakeSource("entra", entra_data),
            FakeSource("configmgr", cm_data),
            FakeSource("entra_organization", org),
        ],
        clock=clock,
        store=store,
    )
    first.refresh_all()
    first.persist()
    before = first.snapshot().estates[0]
    seen_before = dict(first._estates["contoso"].first_seen)

    release = threading.Event()
    hanging = [FakeSource(k, blocking(release)) for k in ("ad", "entra", "configmgr", "entra_organization")]
    clock.now += 2 * HOUR
    second = engine_with(hanging, clock=clock, store=store)
    second.restore()
    after = second.snapshot().estates[0]
    assert second.snapshot().ready
    assert after.view.users == before.view.users
    assert after.configmgr_summary == before.configmgr_summary
    assert after.organization == org
    assert after.sources["configmgr"].last_success == before.sources["configmgr"].last_success
    # The user in the collection keeps its first-seen time: two hours later it is stuck.
    assert second._estates["contoso"].first_seen == seen_before
    assert after.view.stuck["in_intune_collection"] == 1
    assert all(s.calls == 0 for s in hanging)
    release.set()


def test_state_file_is_written_atomically_and_damaged_files_are_ignored(tmp_path, caplog):
    path = tmp_path / "state.json"
    path.write_text("{not json")
    store = StateStore(path)
    assert store.load() == {}
    assert "ignoring unreadable state file" in caplog.text
    engine = engine_with([FakeSource("ad", ad(ad_user("x")))], store=store)
    engine.refresh_all()
    engine.persist()
    document = json.loads(path.read_text())
    assert document["version"] == 1
    assert list(tmp_path.iterdir()) == [path]  # no temporary files left behind


def test_state_of_removed_sources_or_estates_is_ignored(tmp_path):
    store = StateStore(tmp_path / "state.json")
    engine = engine_with([FakeSource("ad", ad(ad_user("x"))), FakeSource("configmgr", cm())], store=store)
    engine.refresh_all()
    engine.persist()
    smaller = engine_with([FakeSource("ad", ad(ad_user("y")))], store=store)
    smaller.restore()
    assert set(smaller.snapshot().estates[0].sources) == {"ad"}
    other = Engine(Config(estates=(EstateConfig(name="fabrikam"),)), {"fabrikam": []}, state_store=store)
    other.restore()
    assert other.snapshot().estates[0].ad is None


def test_codec_round_trips_every_source_type():
    ad_data, entra_data, cm_data = make_estate()
    record = cm_for(ad_user("bytes"), cloud_user_id=str(uuid.uuid4()))
    cm_data = ConfigMgrData(users=(*cm_data.users, record), components=())
    for value in (ad_data, entra_data, cm_data):
        assert decode(type(value), json.loads(json.dumps(encode(value)))) == value


def test_threads_refresh_in_background_and_stop_cleanly():
    ad_data, entra_data, cm_data = make_estate()
    sources = [FakeSource("ad", ad_data), FakeSource("entra", entra_data), FakeSource("configmgr", cm_data)]
    engine = engine_with(sources, refresh_interval=0.05)
    engine.start()
    try:
        deadline = threading.Event()
        for _ in range(200):
            if all(s.calls >= 2 for s in sources):
                break
            deadline.wait(0.02)
        assert all(s.calls >= 2 for s in sources)
        assert engine.snapshot().ready
    finally:
        engine.stop()
    assert all(s.closed for s in sources)


@pytest.mark.parametrize("kind", ["ad", "entra", "configmgr"])
def test_records_metric_source_counts(kind):
    ad_data, entra_data, cm_data = make_estate()
    data = {"ad": ad_data, "entra": entra_data, "configmgr": cm_data}[kind]
    engine = engine_with([FakeSource(kind, data)])
    engine.refresh_all()
    assert engine.snapshot().estates[0].sources[kind].records == {"ad": 3, "entra": 5, "configmgr": 3}[kind]


def test_background_persister_writes_every_source_soon_after_it_refreshed(tmp_path):
    import time

    ad_data, entra_data, cm_data = make_estate()
    store = StateStore(tmp_path / "state.json")
    slow_cm = FakeSource("configmgr", lambda previous: (time.sleep(0.3), cm_data)[1])
    sources = [FakeSource("ad", ad_data), FakeSource("entra", entra_data), slow_cm]
    engine = engine_with(sources, store=store, refresh_interval=300)
    engine.start()
    try:
        deadline = time.monotonic() + 10
        persisted = {}
        while time.monotonic() < deadline:
            persisted = store.load().get("contoso")
            if persisted and set(persisted.sources) == {"ad", "entra", "configmgr"}:
                break
            time.sleep(0.05)
        # Written while the engine still runs (a SIGKILL now would lose nothing), not only at stop().
        assert persisted and set(persisted.sources) == {"ad", "entra", "configmgr"}
        assert persisted.sources["configmgr"].data == cm_data
    finally:
        engine.stop()
