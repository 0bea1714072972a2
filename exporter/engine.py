"""The refresh engine: background reads of every source, evaluation off the serving path, one snapshot.

A full read of a large tenant takes minutes, far longer than a scrape may wait, so every source of
every estate is read by its own background thread every ``refresh_interval``. A finished refresh
(good or bad) updates the source's status at once; when it brought new data, the estate is marked
for evaluation, which one evaluator thread runs outside the engine's lock (a 500,000-user join takes
a noticeable fraction of a second: scrapes and other sources never wait for it). Each step
publishes a new immutable :class:`~exporter.snapshot.Snapshot`; a scrape only takes the current one.

A failed refresh marks only that source down and keeps its last good data. A refresh that outlives
``refresh_timeout`` is aborted (the source closes its connections), so a trickling backend cannot
keep its source down after it recovers. The state file is written by one persister thread, at most
once per refresh interval (at once when a source delivered its first data), and only what changed.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from exporter.config import Config, EstateConfig
from exporter.labels import UserLabeler, new_label_key
from exporter.model import SOURCE_REGISTRY, SourceData, SourceKind
from exporter.pipelines import implementation
from exporter.pipelines.definitions import PIPELINES
from exporter.pipelines.evaluation import (
    EstateData,
    Evaluation,
    FirstSeen,
    PipelineSettings,
    evaluate,
)
from exporter.release import RELEASER
from exporter.snapshot import EstateSnapshot, Snapshot, SourceStatus
from exporter.sources.base import Source, SourceError, abort_source, http_stats_of
from exporter.sources.isolated import ChildRefresh, plan, recipe_of
from exporter.state import EstateState, SavedState, SourceState, StateStore, content_key
from exporter.tables import Table

log = logging.getLogger(__name__)
Clock = Callable[[], float]
_ABORT_GRACE = 2.0  # seconds a refresh gets to wind down after it was aborted


def settings_of(config: EstateConfig) -> PipelineSettings:
    definition = PIPELINES[getattr(config, "pipeline", "hybrid_mdm")]
    return PipelineSettings(
        definition=definition,
        stuck_after={
            s: config.stuck_after.get(s, definition.default_stuck_after[s]) for s in definition.waiting_stages
        },
        intune_service_plans=tuple(getattr(config, "intune_service_plans", ()) or ())
        or PipelineSettings(definition, {}).intune_service_plans,
        compliant_states=tuple(getattr(config, "compliant_states", ()) or ())
        or PipelineSettings(definition, {}).compliant_states,
        device_stale_after=float(
            getattr(config, "device_stale_after", None) or PipelineSettings(definition, {}).device_stale_after
        ),
    )


class _EstateState:
    """Mutable per-estate state, only touched under the engine lock (the evaluator works on copies)."""

    def __init__(self, config: EstateConfig, sources: Sequence[Source]) -> None:
        self.config = config
        self.settings = settings_of(config)
        self.pipeline = implementation(self.settings.definition.name)
        self.sources = {source.kind: source for source in sources}
        self.status: dict[SourceKind, SourceStatus] = {
            s.kind: SourceStatus(kind=s.kind, description=s.describe()) for s in sources
        }
        self.data: dict[SourceKind, SourceData] = {}
        self.first_seen: FirstSeen | None = None
        self.evaluation: Evaluation | None = None
        self.in_flight: dict[SourceKind, tuple[threading.Thread, float]] = {}
        self.dirty = False  # data changed since the last evaluation
        self.evaluated_at = 0.0  # monotonic time of the last evaluation

    @property
    def name(self) -> str:
        return self.config.name

    def estate_data(self) -> EstateData:
        return EstateData.of_sources(self.data)

    def can_evaluate(self) -> bool:
        """The pipeline's sources all have data (those of them that are configured)."""
        needed = self.pipeline.required
        return needed <= set(self.sources) and all(kind in self.data for kind in needed)


class Engine:
    def __init__(
        self,
        config: Config,
        sources: Mapping[str, Sequence[Source]],
        *,
        clock: Clock = time.time,
        state_store: StateStore | None = None,
        first_seen: Mapping[str, FirstSeen] | None = None,
    ) -> None:
        self.config = config
        self._clock = clock
        self._store = state_store
        self._lock = threading.Lock()
        self._persist_lock = threading.Lock()
        # One source at a time decodes in this process (see _read_in_process).
        self._in_process_read = threading.Lock()
        self._stop = threading.Event()
        self._evaluate_needed = threading.Event()
        self._persist_needed = threading.Event()
        self._persist_urgent = False
        self._threads: list[threading.Thread] = []
        self._started = False
        self._restoring = False
        self._estates = {e.name: _EstateState(e, sources.get(e.name, ())) for e in config.estates}
        for name, seen in (first_seen or {}).items():
            if name in self._estates:
                self._estates[name].first_seen = seen
        configured_key = getattr(config, "user_label_key", None)
        self._label_key: str | None = configured_key.value if configured_key is not None else None
        if self._label_key is None and state_store is None:
            self._label_key = new_label_key()  # nothing to keep it in: stable for this process only
        self._snapshot = self._build_snapshot()

    # ------------------------------------------------------------------ public
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def start(self) -> None:
        """Start in the background: restore the state file, then the refresh threads.

        Returns at once so the HTTP server answers (/-/healthy 200, /-/ready 503) while a large
        state file is read.
        """
        self._started = True
        self._restoring = self._store is not None
        self._publish()
        starter = threading.Thread(target=self._start_in_background, name="engine-start", daemon=True)
        self._threads.append(starter)
        starter.start()

    def _start_in_background(self) -> None:
        try:
            self.restore()
        except Exception:  # a damaged state file must never stop the exporter
            log.exception("restoring the state file failed; starting clean")
        finally:
            if self._label_key is None:
                self._label_key = new_label_key()  # kept in the state file from now on
            self._restoring = False
            self._publish()
        if self._stop.is_set():
            return
        self._spawn("evaluate", self._run_evaluator)
        if self._store is not None:
            self._spawn("persist-state", self._run_persister)
        for estate in self._estates.values():
            for source in estate.sources.values():
                self._spawn(f"refresh-{estate.name}-{source.kind}", self._run_source, estate, source)

    def _spawn(self, name: str, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def stop(self, timeout: float = 4.0) -> None:
        """Stop the threads, abort refreshes in progress and write the state one last time, all within
        ``timeout`` seconds (an interrupted write leaves the previous complete state intact)."""
        deadline = time.monotonic() + timeout
        self._stop.set()
        self._evaluate_needed.set()
        self._persist_needed.set()
        for estate in self._estates.values():
            for source in estate.sources.values():
                try:
                    source.close()
                except Exception as exc:  # closing must never stop the shutdown
                    log.debug("closing %s failed: %s", source.describe(), exc)
        # The threads are daemons: give them a moment to finish cleanly, but keep most of the budget
        # for the last state write.
        joins_end = time.monotonic() + min(1.0, timeout / 4)
        for thread in self._threads:
            thread.join(max(0.0, joins_end - time.monotonic()))
        self.persist(deadline=deadline)

    def restore(self) -> None:
        if self._store is None:
            return
        saved = self._store.load()
        restored = 0
        with self._lock:
            if self._label_key is None:
                self._label_key = saved.label_key
            for name, estate_state in saved.estates.items():
                estate = self._estates.get(name)
                if estate is None or estate_state.pipeline != estate.settings.definition.name:
                    continue
                if estate_state.first_seen is not None:
                    estate.first_seen = estate_state.first_seen
                for kind, src in estate_state.sources.items():
                    if kind not in estate.sources or kind in estate.data:
                        continue
                    estate.data[kind] = src.data
                    estate.status[kind] = replace(
                        estate.status[kind],
                        up=src.up,
                        refreshed=True,
                        last_success=src.last_success,
                        duration=src.duration,
                        records=src.data.records,
                        full_read_at=src.full_read_at,
                    )
                    estate.dirty = True
                    restored += 1
        _prepare_all([data for estate in self._estates.values() for data in estate.data.values()])
        for estate in self._estates.values():
            if estate.dirty:
                self._evaluate(estate)
        self._publish()
        if restored:
            log.info("restored %d source snapshots from %s", restored, self._store.path)

    def refresh(self, estate_name: str, kind: SourceKind) -> None:
        """Run one refresh of one source synchronously, then evaluate (tests, and `trace`)."""
        estate = self._estates[estate_name]
        self._refresh_with_deadline(estate, estate.sources[kind])
        if not self._started and estate.dirty:
            self._evaluate(estate)

    def refresh_all(self) -> None:
        for estate in self._estates.values():
            for kind in estate.sources:
                self.refresh(estate.name, kind)

    def evaluate_all(self) -> None:
        for estate in self._estates.values():
            self._evaluate(estate)

    @property
    def label_key(self) -> str:
        with self._lock:
            if self._label_key is None:
                self._label_key = new_label_key()
            return self._label_key

    def labeler(self) -> UserLabeler:
        return UserLabeler(self.config.user_label, self.label_key)

    def persist(self, deadline: float | None = None, *, background: bool = False) -> bool:
        """Write the state file (only what changed); False if there is none or it was interrupted.

        One writer at a time. A background write gives way as soon as the engine stops, so the last
        write at shutdown starts at once (an interrupted write leaves the previous complete state).
        """
        if self._store is None:
            return False
        wait = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
        if not self._persist_lock.acquire(timeout=wait):
            return False
        try:
            return self._persist(deadline, background)
        finally:
            self._persist_lock.release()

    def _persist(self, deadline: float | None, background: bool) -> bool:
        assert self._store is not None
        with self._lock:
            state = SavedState(label_key=self._label_key)
            for name, estate in self._estates.items():
                state.estates[name] = EstateState(
                    pipeline=estate.settings.definition.name,
                    sources={
                        kind: SourceState(
                            data=data,
                            up=estate.status[kind].up,
                            last_success=estate.status[kind].last_success,
                            duration=estate.status[kind].duration,
                            full_read_at=estate.status[kind].full_read_at,
                        )
                        for kind, data in estate.data.items()
                    },
                    first_seen=estate.first_seen,
                )

        def should_stop() -> bool:
            if background and self._stop.is_set():
                return True
            return deadline is not None and time.monotonic() > deadline

        started = time.monotonic()
        try:
            written = self._store.save(state, self._clock(), should_stop)
        except OSError as exc:
            self._note_state_write_failure(exc)
            return False
        if written:
            self.state_write_seconds = time.monotonic() - started
        return written

    state_write_failures = 0
    state_write_seconds: float | None = None
    _state_write_failing = False

    def _note_state_write_failure(self, exc: OSError) -> None:
        self.state_write_failures += 1
        if not self._state_write_failing:  # once per change of state, not on every refresh
            log.error("cannot write state file %s: %s", self._store.path if self._store else "", exc)
        self._state_write_failing = True

    # ------------------------------------------------------------------ threads
    def _run_source(self, estate: _EstateState, source: Source) -> None:
        interval = self.config.refresh_interval
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self._refresh_with_deadline(estate, source)
            except Exception as exc:  # the refresh loop must never die (e.g. a bug in a source)
                log.error("refresh loop of %s/%s failed: %s", estate.name, source.kind, exc, exc_info=True)
                self._record_failure(estate, source, _unexpected(exc, source), time.monotonic() - started)
            self._stop.wait(max(0.0, min(interval, 7 * 86400.0) - (time.monotonic() - started)))

    def _run_evaluator(self) -> None:
        """Evaluate estates whose data changed (and every refresh interval: time moves on)."""
        while not self._stop.is_set():
            self._evaluate_needed.wait(1.0)
            self._evaluate_needed.clear()
            for estate in self._estates.values():
                if self._stop.is_set():
                    return
                stale = time.monotonic() - estate.evaluated_at > self.config.refresh_interval
                if estate.dirty or (stale and estate.evaluation is not None):
                    try:
                        self._evaluate(estate)
                    except Exception:
                        log.exception("evaluating estate %s failed", estate.name)

    def _run_persister(self) -> None:
        """Write the state file when something changed: at once when a source got its first data
        (so a kill right after ready loses nothing), otherwise at most once per refresh interval."""
        last_write = 0.0
        while not self._stop.is_set():
            if not self._persist_needed.wait(0.5):
                continue
            urgent = self._persist_urgent
            if not urgent and time.monotonic() - last_write < self.config.refresh_interval:
                self._stop.wait(0.5)
                continue
            self._persist_needed.clear()
            self._persist_urgent = False
            if self.persist(background=True):
                last_write = time.monotonic()
                self._state_write_failing = False

    # ------------------------------------------------------------------ one refresh
    def _refresh_with_deadline(self, estate: _EstateState, source: Source) -> None:
        """Refresh in a worker thread; at the deadline abort it (the source closes its connections).

        A refresh whose I/O ignores the abort cannot be cancelled in Python; no second refresh of
        that source starts while it runs, and its duration keeps growing in the metrics.
        """
        timeout = self.config.effective_refresh_timeout
        running = estate.in_flight.get(source.kind)
        if running is not None and running[0].is_alive():
            self._record_failure(
                estate,
                source,
                SourceError("timeout", "the previous refresh is still running (aborted, not yet finished)"),
                time.monotonic() - running[1],
            )
            return
        outcome: dict[str, object] = {}
        previous = self._previous_for(estate, source.kind)
        started = time.monotonic()
        deadline = started + timeout
        child = self._child_refresh(source, previous)

        def work() -> None:
            try:
                if child is not None:
                    outcome["data"] = child[0].run(previous, child[1], deadline)
                else:
                    outcome["data"] = self._read_in_process(source, previous, deadline)
            except BaseException as exc:
                outcome["error"] = exc

        worker = threading.Thread(target=work, name=f"read-{estate.name}-{source.kind}", daemon=True)
        estate.in_flight[source.kind] = (worker, started)
        worker.start()
        worker.join(timeout)
        if worker.is_alive():
            abort_source(source)
            if child is not None:
                child[0].abort()
            worker.join(_ABORT_GRACE)
            message = f"refresh did not finish within {timeout:g}s (aborted)"
            if isinstance(outcome.get("error"), SourceError):
                message += f"; last: {outcome['error']}"
            self._record_failure(estate, source, SourceError("timeout", message), time.monotonic() - started)
            return
        duration = time.monotonic() - started
        if "error" in outcome:
            self._record_failure(estate, source, self._as_source_error(outcome["error"], source), duration)
        else:
            self._record_success(estate, source, outcome["data"], duration)  # type: ignore[arg-type]

    def _read_in_process(self, source: Source, previous: SourceData | None, deadline: float) -> SourceData:
        """``source.refresh`` in this process. The configured sources' reads here (AD and Entra
        incremental reads, a full read a source falls back to) take turns: every pure-Python thread
        that decodes takes the GIL from the threads answering scrapes each time they give it up,
        and two at once made a burst of twenty new scrapes take 28 ms instead of 18 ms
        (benchmarks/bench_convoy.py, p99). An incremental read takes a few seconds at 500,000 users,
        so the wait is short; it counts against the deadline."""
        if recipe_of(source) is None:  # the demo and test doubles: nothing heavy to decode
            return source.refresh(previous, deadline)
        if not self._in_process_read.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise SourceError("timeout", "the deadline passed while another source was read in this process")
        try:
            return source.refresh(previous, deadline)
        finally:
            self._in_process_read.release()

    def _child_refresh(
        self, source: Source, previous: SourceData | None
    ) -> tuple[ChildRefresh, SourceData | None] | None:
        """A child process for this refresh (and what it gets of ``previous``), or None to refresh in
        this process: sources built from the config that read a whole table decode it in a child, so
        that scrapes never wait behind the decoding and the sources use both cores
        (exporter.sources.isolated)."""
        recipe = recipe_of(source)
        if recipe is None:
            return None
        in_child, child_previous = plan(source, previous)
        if not in_child:
            return None
        return ChildRefresh(source, recipe, self._stop), child_previous

    def _as_source_error(self, error: object, source: Source) -> SourceError:
        assert isinstance(error, BaseException)
        return error if isinstance(error, SourceError) else _unexpected(error, source)

    def _previous_for(self, estate: _EstateState, kind: SourceKind) -> SourceData | None:
        """The data an incremental read builds on; None asks the source for a full read."""
        with self._lock:
            previous = estate.data.get(kind)
            status = estate.status[kind]
        if previous is None:
            return None
        resync = getattr(self.config, "full_resync_interval", 86400.0)
        if resync <= 0:
            return None
        if status.full_read_at is not None and self._clock() - status.full_read_at >= resync:
            return None
        return previous

    def _record_success(
        self, estate: _EstateState, source: Source, data: SourceData, duration: float
    ) -> None:
        now = self._clock()
        expected = SOURCE_REGISTRY[source.kind].data_type
        if not isinstance(data, expected):
            self._record_failure(
                estate,
                source,
                SourceError("other", f"returned {type(data).__name__}, expected {expected.__name__}"),
                duration,
            )
            return
        with self._lock:
            first_data = source.kind not in estate.data
            old = estate.data.get(source.kind)
            changed = old is not data  # something to persist (if only a new delta link)
            content_changed = old is None or not same_content(old, data)  # something to evaluate
            estate.data[source.kind] = data
            status = estate.status[source.kind]
            full = not isinstance(data, Table) or data.meta.get("read", "full") == "full"
            estate.status[source.kind] = replace(
                status,
                up=True,
                refreshed=True,
                last_success=now,
                duration=duration,
                records=data.records,
                last_error=None,
                http_stats=http_stats_of(source),
                warning=data.meta.get("warning") if isinstance(data, Table) else None,
                full_read_at=now if full and changed else status.full_read_at,
            )
            if content_changed:
                estate.dirty = True
        if changed and isinstance(old, Table):
            RELEASER.release(old)  # freed a column at a time once the last snapshot using it is gone
        del old
        if changed:
            self._persist_urgent = self._persist_urgent or first_data
            self._persist_needed.set()
        self._after_change(estate)
        log.debug("refreshed %s/%s: %d records in %.2fs", estate.name, source.kind, data.records, duration)

    def _record_failure(
        self, estate: _EstateState, source: Source, error: SourceError, duration: float
    ) -> None:
        now = self._clock()
        with self._lock:
            status = estate.status[source.kind]
            errors = dict(status.errors)
            errors[error.reason] = errors.get(error.reason, 0) + 1
            estate.status[source.kind] = replace(
                status,
                up=False,
                refreshed=True,
                duration=duration,
                errors=errors,
                last_error=f"{error.reason}: {error.message}",
                last_error_at=now,
                http_stats=http_stats_of(source) or status.http_stats,
            )
        self._after_change(estate)
        log.warning(
            "refresh of %s for estate %s failed (%s): %s",
            source.describe(),
            estate.name,
            error.reason,
            error.message,
        )

    def _after_change(self, estate: _EstateState) -> None:
        if self._started:
            self._evaluate_needed.set()
        self._publish()

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, estate: _EstateState) -> None:
        with self._lock:
            if not estate.can_evaluate():
                estate.dirty = False
                return
            data = estate.estate_data()
            first_seen = estate.first_seen
            estate.dirty = False
        started = time.monotonic()
        result = evaluate(estate.pipeline, data, estate.settings, first_seen, self._clock())
        with self._lock:
            estate.evaluation = result
            estate.first_seen = result.first_seen
            estate.evaluated_at = time.monotonic()
        self._persist_needed.set()
        self._publish()
        log.debug(
            "evaluated estate %s (%d users) in %.3fs",
            estate.name,
            data.ad.n if data.ad else 0,
            time.monotonic() - started,
        )

    # ------------------------------------------------------------------ snapshots
    def _publish(self) -> None:
        snapshot = self._build_snapshot()
        # The counts at the snapshot's moment, computed here (a refresh or the evaluator thread)
        # rather than by the first scrape that reads them: at 500k users that is 30-40 ms of CPU.
        for estate in snapshot.estates:
            if estate.evaluation is not None:
                estate.evaluation.summary(snapshot.taken_at)
        with self._lock:
            self._snapshot = snapshot

    def _build_snapshot(self) -> Snapshot:
        with self._lock:
            estates = tuple(
                EstateSnapshot(
                    name=estate.name,
                    settings=estate.settings,
                    sources=dict(estate.status),
                    data=estate.estate_data(),
                    evaluation=estate.evaluation,
                )
                for estate in self._estates.values()
            )
            running = {
                (estate.name, kind): started
                for estate in self._estates.values()
                for kind, (thread, started) in estate.in_flight.items()
                if thread.is_alive()
            }
        return Snapshot(
            estates=estates,
            taken_at=self._clock(),
            restoring=self._restoring,
            labeler=UserLabeler(self.config.user_label, self._label_key or ""),
            refreshing=running,
            state_write_failures=self.state_write_failures,
            state_write_seconds=self.state_write_seconds,
        )


def same_content(old: SourceData, new: SourceData) -> bool:
    """Whether a refresh brought the same data: tables sharing every column object (only their meta
    changed, e.g. a new delta link), or equal small records (the organization)."""
    if isinstance(old, Table) and isinstance(new, Table):
        return type(old) is type(new) and content_key(old) == content_key(new)
    return old == new


def _unexpected(error: BaseException, source: Source) -> SourceError:
    # A bug or an unforeseen library error must not kill the refresh thread; it is logged with
    # its traceback at debug level and counted under "other".
    log.debug("unexpected error in %s", source.describe(), exc_info=error)
    return SourceError("other", f"unexpected {type(error).__name__}: {error}")


def _prepare_all(tables: Sequence[object]) -> None:
    """Build the join indexes of restored tables side by side: they are numpy sorts, which release
    the GIL, so a restart uses every core for them (500k users: about half a second less to ready)."""
    preparable = [prepare for t in tables if callable(prepare := getattr(t, "prepare", None))]
    if len(preparable) < 2:
        for prepare in preparable:
            prepare()
        return
    workers = min(len(preparable), os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="prepare") as pool:
        for future in [pool.submit(prepare) for prepare in preparable]:
            try:
                future.result()
            except Exception:  # the evaluation builds what is missing, or reports the table
                log.exception("building the indexes of a restored table failed")
