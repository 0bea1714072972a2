"""The refresh engine: failures stay local to a source, last good data is kept, evaluation happens
off the serving path and only when data changed, refreshes are aborted at their deadline, the
refresh loop survives anything, state survives restarts."""

from __future__ import annotations

import threading
import time
from unittest import mock

import pytest

from exporter.config import Config, EstateConfig
from exporter.engine import Engine
from exporter.model import OrganizationData
from exporter.pipelines import evaluation as evaluation_module
from exporter.sources.base import SourceError
from exporter.sources.isolated import Recipe
from exporter.state import StateStore
from tests.builders import ad, ad_user, cm, cm_for, entra, entra_for
from tests.fakes import Clock, FakeSource, blocking
from tests.unit.test_collectors import full_engine

HOUR = 3600.0


def make_estate(n=3):
    users = [ad_user(f"eng{i}", when_created=900_000.0) for i in range(n)]
    synced = [entra_for(u) for u in users]
    records = [
        cm_for(u, in_collection=True, cloud_user_id=(e.id if i else None))
        for i, (u, e) in enumerate(zip(users, synced, strict=False))
    ]
    cloud_only = [entra_for(ad_user(f"cloud{i}"), sync_enabled=False) for i in range(2)]
    return ad(*users), entra(*synced, *cloud_only), cm(*records)


def config(**kwargs):
    return Config(estates=(EstateConfig(name="contoso"),), **kwargs)


def engine_with(sources, clock=None, store=None, **cfg):
    return Engine(config(**cfg), {"contoso": sources}, clock=clock or Clock(), state_store=store)


def raising(reason, message="backend said no"):
    def fail(previous):
        raise SourceError(reason, message)

    return fail


def three_sources():
    ad_data, entra_data, cm_data = make_estate()
    return [FakeSource("ad", ad_data), FakeSource("entra", entra_data), FakeSource("configmgr", cm_data)]


def test_refresh_evaluates_the_pipeline():
    engine = engine_with(three_sources())
    assert not engine.snapshot().ready
    engine.refresh_all()
    snap = engine.snapshot()
    assert snap.ready
    (estate,) = snap.estates
    summary = estate.evaluation.summary(snap.taken_at)
    assert summary.users["intune_enabled"] == 2
    assert summary.users["in_intune_collection"] == 1
    assert estate.sources["entra"].records == 5  # cloud-only users are records too
    assert all(s.up for s in estate.sources.values())


def test_no_evaluation_without_every_source_the_pipeline_needs():
    ad_data, _, cm_data = make_estate()
    engine = engine_with([FakeSource("ad", ad_data), FakeSource("configmgr", cm_data)])
    engine.refresh_all()
    (estate,) = engine.snapshot().estates
    assert estate.evaluation is None
    assert estate.configmgr is cm_data


def test_failure_marks_only_that_source_down_and_keeps_its_last_good_data():
    sources = three_sources()
    engine = engine_with(sources)
    engine.refresh_all()
    cm_source = sources[2]
    cm_data = cm_source.behaviour
    cm_source.behaviour = raising("network", "cm01 unreachable")
    engine.refresh("contoso", "configmgr")
    (estate,) = engine.snapshot().estates
    status = estate.sources["configmgr"]
    assert not status.up and status.errors["network"] == 1
    assert status.last_error == "network: cm01 unreachable"
    assert estate.sources["ad"].up and estate.sources["entra"].up
    assert estate.configmgr is cm_data
    assert estate.evaluation.summary(0).users["intune_enabled"] == 2
    assert cm_source.previous_seen[-1] is cm_data  # incremental readers get their last good data


def test_full_resync_interval_asks_for_a_full_read():
    clock = Clock()
    sources = three_sources()
    engine = engine_with(sources, clock=clock, full_resync_interval=HOUR)
    engine.refresh("contoso", "ad")
    assert sources[0].previous_seen == [None]  # nothing held yet: full read
    engine.refresh("contoso", "ad")
    assert sources[0].previous_seen[-1] is sources[0].behaviour  # incremental from what it holds
    clock.now += HOUR
    engine.refresh("contoso", "ad")
    assert sources[0].previous_seen[-1] is None  # the resync interval passed: full read again
    always_full = engine_with(three_sources(), clock=clock, full_resync_interval=0)
    always_full.refresh("contoso", "ad")
    always_full.refresh("contoso", "ad")
    assert always_full._estates["contoso"].sources["ad"].previous_seen == [None, None]


def test_unexpected_exception_is_counted_as_other_and_does_not_escape():
    def boom(previous):
        raise KeyError("surprise")

    engine = engine_with([FakeSource("ad", boom)])
    engine.refresh("contoso", "ad")
    status = engine.snapshot().estates[0].sources["ad"]
    assert status.errors["other"] == 1 and not status.up
    assert "KeyError" in status.last_error


def test_hung_refresh_is_aborted_at_its_deadline_and_its_duration_keeps_growing():
    release = threading.Event()
    slow = FakeSource("ad", blocking(release))
    engine = engine_with([slow], refresh_interval=60, refresh_timeout=0.2)
    started = time.monotonic()
    engine.refresh("contoso", "ad")
    status = engine.snapshot().estates[0].sources["ad"]
    assert status.errors["timeout"] == 1 and not status.up
    assert slow.aborted == 1  # the source was told to close its connections
    assert slow.deadlines[0] == pytest.approx(started + 0.2, abs=0.1)
    engine.refresh("contoso", "ad")  # the first read ignores the abort: do not start another
    assert slow.calls == 1
    again = engine.snapshot().estates[0].sources["ad"]
    assert again.errors["timeout"] == 2
    assert again.duration >= status.duration  # not 0 while the refresh hangs
    release.set()


def test_a_source_that_honours_abort_recovers_at_the_next_refresh():
    aborted = threading.Event()
    healthy = ad(ad_user("x"))

    class Trickling(FakeSource):
        def abort(self):
            super().abort()
            aborted.set()

    def first_hangs_then_works(previous):
        if source.calls == 1:
            aborted.wait(10)  # a trickling backend: returns only once the connection is closed
            raise SourceError("network", "connection closed")
        return healthy

    source = Trickling("ad", first_hangs_then_works)
    engine = engine_with([source], refresh_timeout=0.2)
    engine.refresh("contoso", "ad")
    assert engine.snapshot().estates[0].sources["ad"].errors["timeout"] == 1
    engine.refresh("contoso", "ad")
    status = engine.snapshot().estates[0].sources["ad"]
    assert status.up and engine.snapshot().estates[0].ad is healthy


def test_refresh_loop_survives_an_unexpected_error_in_the_engine_itself():
    engine = engine_with([FakeSource("ad", ad(ad_user("x")))], refresh_interval=0.05)
    calls = {"n": 0}
    original = engine._refresh_with_deadline

    def flaky(estate, source):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OverflowError("timestamp too large")
        original(estate, source)

    engine._refresh_with_deadline = flaky
    engine.start()
    try:
        for _ in range(200):
            if engine.snapshot().estates[0].sources["ad"].up:
                break
            time.sleep(0.02)
        status = engine.snapshot().estates[0].sources["ad"]
        assert status.up and status.errors["other"] == 1
    finally:
        engine.stop()


def test_stuck_ages_grow_while_a_source_is_down():
    clock = Clock()
    users = [ad_user("late", when_created=clock.now - HOUR)]
    ad_source = FakeSource("ad", ad(*users))
    engine = engine_with(
        [ad_source, FakeSource("entra", entra()), FakeSource("configmgr", cm())], clock=clock
    )
    engine.refresh_all()
    evaluation = engine.snapshot().estates[0].evaluation
    assert evaluation.summary(clock.now).stuck["ad_created"] == 0
    clock.now += 2 * HOUR
    ad_source.behaviour = raising("timeout")
    engine.refresh("contoso", "ad")
    snapshot = engine.snapshot()
    assert snapshot.estates[0].evaluation.summary(snapshot.taken_at).stuck["ad_created"] == 1


def test_unchanged_data_is_not_evaluated_again():
    sources = three_sources()
    engine = engine_with(sources)
    engine.refresh_all()
    first = engine.snapshot().estates[0].evaluation
    engine.refresh("contoso", "ad")  # the fake returns the very same table: nothing changed
    assert engine.snapshot().estates[0].evaluation is first
    sources[0].behaviour = ad(ad_user("eng0", when_created=900_000.0), ad_user("new"))
    engine.refresh("contoso", "ad")
    assert engine.snapshot().estates[0].evaluation is not first


def test_evaluation_runs_outside_the_engine_lock():
    sources = three_sources()
    engine = engine_with(sources)
    engine.refresh_all()
    estate = engine._estates["contoso"]
    seen = {}
    original = estate.pipeline.place

    def watching(*args, **kwargs):
        seen["lock_free"] = engine._lock.acquire(timeout=1)
        if seen["lock_free"]:
            engine._lock.release()
        return original(*args, **kwargs)

    estate.pipeline.place = watching
    sources[0].behaviour = ad(ad_user("other"))
    engine.refresh("contoso", "ad")
    assert seen == {"lock_free": True}


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
    assert first.persist()
    before = first.snapshot().estates[0]
    seen_before = first._estates["contoso"].first_seen

    release = threading.Event()
    hanging = [FakeSource(k, blocking(release)) for k in ("ad", "entra", "configmgr", "entra_organization")]
    clock.now += 2 * HOUR
    second = engine_with(hanging, clock=clock, store=StateStore(tmp_path / "state.json"))
    second.restore()
    after = second.snapshot().estates[0]
    assert second.snapshot().ready
    assert after.evaluation.summary(clock.now).users == before.evaluation.summary(clock.now).users
    assert after.organization == org
    assert after.sources["configmgr"].last_success == before.sources["configmgr"].last_success
    restored_seen = second._estates["contoso"].first_seen
    assert list(restored_seen.keys) == list(seen_before.keys)
    assert list(restored_seen.since) == list(seen_before.since)
    # The user in the collection keeps its first-seen time: two hours later it is stuck.
    assert after.evaluation.summary(clock.now).stuck["in_intune_collection"] == 1
    assert all(s.calls == 0 for s in hanging)
    release.set()


def test_state_of_removed_sources_or_estates_is_ignored(tmp_path):
    store = StateStore(tmp_path / "state.json")
    engine = engine_with([FakeSource("ad", ad(ad_user("x"))), FakeSource("configmgr", cm())], store=store)
    engine.refresh_all()
    engine.persist()
    smaller = engine_with([FakeSource("ad", ad(ad_user("y")))], store=StateStore(tmp_path / "state.json"))
    smaller.restore()
    assert set(smaller.snapshot().estates[0].sources) == {"ad"}
    other = Engine(
        Config(estates=(EstateConfig(name="fabrikam"),)),
        {"fabrikam": []},
        state_store=StateStore(tmp_path / "state.json"),
    )
    other.restore()
    assert other.snapshot().estates[0].ad is None


def test_threads_refresh_in_background_and_stop_cleanly():
    sources = three_sources()
    engine = engine_with(sources, refresh_interval=0.05)
    engine.start()
    try:
        for _ in range(200):
            if all(s.calls >= 2 for s in sources) and engine.snapshot().estates[0].evaluation:
                break
            time.sleep(0.02)
        assert all(s.calls >= 2 for s in sources)
        assert engine.snapshot().ready
        assert engine.snapshot().estates[0].evaluation is not None
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
    ad_data, entra_data, cm_data = make_estate()
    store = StateStore(tmp_path / "state.json")
    slow_cm = FakeSource("configmgr", lambda previous: (time.sleep(0.3), cm_data)[1])
    sources = [FakeSource("ad", ad_data), FakeSource("entra", entra_data), slow_cm]
    engine = engine_with(sources, store=store, refresh_interval=300)
    engine.start()
    try:
        deadline = time.monotonic() + 10
        persisted = None
        while time.monotonic() < deadline:
            persisted = StateStore(tmp_path / "state.json").load(cleanup=False).estates.get("contoso")
            if persisted and set(persisted.sources) == {"ad", "entra", "configmgr"}:
                break
            time.sleep(0.05)
        # Written while the engine still runs (a SIGKILL now would lose nothing), not only at stop().
        assert persisted and set(persisted.sources) == {"ad", "entra", "configmgr"}
        assert persisted.sources["configmgr"].data.n == cm_data.n
    finally:
        engine.stop()


def test_hash_label_key_is_generated_once_and_kept_in_the_state_file(tmp_path):
    store = StateStore(tmp_path / "state.json")
    engine = engine_with([FakeSource("ad", ad(ad_user("x")))], store=store, user_label="hash")
    engine.start()
    engine.stop()
    key = engine.label_key
    again = engine_with([FakeSource("ad", ad(ad_user("x")))], store=StateStore(tmp_path / "state.json"))
    again.restore()
    assert again.label_key == key


def test_a_new_table_with_the_same_columns_is_not_evaluated_again():
    """An incremental read that found no change returns a table whose columns are the very same
    objects (only its meta, e.g. the delta link, moved): nothing to evaluate, only to persist."""
    sources = three_sources()
    engine = engine_with(sources)
    engine.refresh_all()
    first = engine.snapshot().estates[0].evaluation
    held = sources[0].behaviour
    sources[0].behaviour = held.derive(held.columns(), held.children, {**held.meta, "delta_link": "x"})
    engine.refresh("contoso", "ad")
    assert engine.snapshot().estates[0].evaluation is first
    assert engine.snapshot().estates[0].ad.meta["delta_link"] == "x"


def test_a_replaced_table_goes_to_the_releaser_and_an_unchanged_one_does_not():
    sources = three_sources()
    engine = engine_with(sources)
    engine.refresh_all()
    released = []
    with mock.patch("exporter.engine.RELEASER") as releaser:
        releaser.release.side_effect = released.append
        first = sources[0].behaviour
        engine.refresh("contoso", "ad")  # the same table again: nothing replaced
        assert released == []
        sources[0].behaviour = ad(*(ad_user(f"new{i}") for i in range(2)))
        engine.refresh("contoso", "ad")
    assert released == [first]
    assert engine.snapshot().estates[0].ad is sources[0].behaviour


def test_failing_state_writes_are_counted_and_logged_once_per_change(tmp_path, caplog):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the state directory should be")
    store = StateStore(blocked / "state.json")  # its directory cannot be created
    engine = engine_with(three_sources(), store=store)
    engine.refresh_all()
    assert not engine.persist()
    assert not engine.persist()
    assert engine.state_write_failures == 2
    assert caplog.text.count("cannot write state file") == 1
    engine._publish()
    assert engine.snapshot().state_write_failures == 2


def test_a_published_snapshot_carries_its_summary_already_computed():
    """Scrapes never pay for the counts at a new snapshot's moment: the publisher computed them."""
    engine = full_engine()
    snapshot = engine.snapshot()
    with mock.patch.object(evaluation_module, "_summarise", side_effect=AssertionError("computed late")):
        summary = snapshot.estates[0].evaluation.summary(snapshot.taken_at)
    assert summary.at == snapshot.taken_at and sum(summary.users.values()) > 0


class InProcessSource(FakeSource):
    """A configured source (it has a recipe) whose refreshes run in this process, as AD's and
    Entra's incremental reads do."""

    def __init__(self, kind, behaviour):
        super().__init__(kind, behaviour)
        self.isolation_recipe = Recipe(EstateConfig(name="contoso"), kind)

    def child_refresh(self, previous):
        return False, None


def refresh_at_once(engine, sources):
    """Each source's refresh started in a thread of its own at the same time; returns when all ended."""
    threads = [threading.Thread(target=engine.refresh, args=("contoso", s.kind)) for s in sources]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def test_configured_sources_decode_in_this_process_one_at_a_time():
    running, overlaps = [], []
    lock = threading.Lock()

    def reading(data):
        def read(previous):
            with lock:
                running.append(1)
                overlaps.append(len(running))
            time.sleep(0.2)
            with lock:
                running.pop()
            return data

        return read

    ad_data, entra_data, _ = make_estate()
    sources = [InProcessSource("ad", reading(ad_data)), InProcessSource("entra", reading(entra_data))]
    engine = engine_with(sources, refresh_timeout=5)
    refresh_at_once(engine, sources)
    assert overlaps == [1, 1]
    assert all(s.up for s in engine.snapshot().estates[0].sources.values() if s.kind in ("ad", "entra"))


def test_test_doubles_without_a_recipe_are_not_made_to_wait():
    both_running = threading.Barrier(2, timeout=5)

    def meet(data):
        def read(previous):
            both_running.wait()  # breaks (an error) if the other read cannot run at the same time
            return data

        return read

    ad_data, entra_data, _ = make_estate()
    sources = [FakeSource("ad", meet(ad_data)), FakeSource("entra", meet(entra_data))]
    engine = engine_with(sources, refresh_timeout=10)
    refresh_at_once(engine, sources)
    statuses = engine.snapshot().estates[0].sources
    assert statuses["ad"].up and statuses["entra"].up


def test_waiting_for_another_in_process_read_counts_against_the_deadline():
    release = threading.Event()
    _, entra_data, _ = make_estate()
    slow = InProcessSource("ad", blocking(release))
    waiting = InProcessSource("entra", entra_data)
    engine = engine_with([slow, waiting], refresh_timeout=0.3)
    holder = threading.Thread(target=engine.refresh, args=("contoso", "ad"))
    holder.start()
    time.sleep(0.05)  # the AD read holds the turn
    engine.refresh("contoso", "entra")
    status = engine.snapshot().estates[0].sources["entra"]
    assert status.errors["timeout"] == 1 and not status.up
    assert waiting.calls == 0  # never started reading after its deadline
    release.set()
    holder.join()
