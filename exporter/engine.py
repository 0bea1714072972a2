"""The refresh engine: background reads of every source, one immutable snapshot for scrapes.

A full read of a large tenant takes minutes, far longer than a scrape may wait, so every source of
every estate is read by its own background thread every ``refresh_interval``. Each finished refresh
(good or bad) produces a new immutable :class:`Snapshot`; a scrape only takes the current one and
never waits on a backend. A failed refresh marks only that source down and keeps its last good data.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

from exporter.config import Config, EstateConfig
from exporter.model import (
    ERROR_REASONS,
    AdData,
    ConfigMgrData,
    EntraData,
    ErrorReason,
    HttpStats,
    OrganizationData,
    SourceData,
    SourceKind,
    Stage,
)
from exporter.sources.base import HttpStatsProvider, Source, SourceError
from exporter.stages import (
    ConfigMgrSummary,
    EntraSummary,
    FirstSeen,
    ProvisioningView,
    evaluate,
    summarise_configmgr,
    summarise_entra,
)
from exporter.state import PersistedEstate, PersistedSource, StateStore

log = logging.getLogger(__name__)
Clock = Callable[[], float]
_T = TypeVar("_T")


@dataclass(frozen=True)
class SourceStatus:
    kind: SourceKind
    description: str
    up: bool = False
    refreshed: bool = False  # completed a refresh in this process, or restored from the state file
    last_success: float | None = None
    last_attempt: float | None = None
    duration: float | None = None
    records: int | None = None
    errors: Mapping[ErrorReason, int] = field(default_factory=lambda: dict.fromkeys(ERROR_REASONS, 0))
    last_error: str | None = None
    http_stats: HttpStats | None = None


@dataclass(frozen=True)
class EstateSnapshot:
    name: str
    stuck_after: Mapping[Stage, float]
    sources: Mapping[SourceKind, SourceStatus]  # configured sources only
    ad: AdData | None = None
    entra: EntraData | None = None
    organization: OrganizationData | None = None
    configmgr: ConfigMgrData | None = None
    view: ProvisioningView | None = None  # needs ad, entra and configmgr data
    configmgr_summary: ConfigMgrSummary | None = None
    entra_summary: EntraSummary | None = None

    def data_of(self, kind: SourceKind) -> SourceData | None:
        return {
            "ad": self.ad,
            "entra": self.entra,
            "entra_organization": self.organization,
            "configmgr": self.configmgr,
        }[kind]

    @property
    def ready(self) -> bool:
        """Every configured source has data: from a successful refresh or from the state file."""
        return all(self.data_of(kind) is not None for kind in self.sources)


@dataclass(frozen=True)
class Snapshot:
    estates: tuple[EstateSnapshot, ...]
    taken_at: float

    @property
    def ready(self) -> bool:
        return all(estate.ready for estate in self.estates)


class _EstateState:
    """Mutable per-estate state, only touched under the engine lock."""

    def __init__(self, config: EstateConfig, sources: Sequence[Source]) -> None:
        self.config = config
        self.sources = {source.kind: source for source in sources}
        self.status: dict[SourceKind, SourceStatus] = {
            s.kind: SourceStatus(kind=s.kind, description=s.describe()) for s in sources
        }
        self.data: dict[SourceKind, SourceData] = {}
        self.first_seen: dict[str, FirstSeen] = {}
        self.in_flight: dict[SourceKind, threading.Thread] = {}
        self.view: ProvisioningView | None = None
        self.cm_summary: ConfigMgrSummary | None = None
        self.entra_summary: EntraSummary | None = None


class Engine:
    def __init__(
        self,
        config: Config,
        sources: Mapping[str, Sequence[Source]],
        *,
        clock: Clock = time.time,
        state_store: StateStore | None = None,
        first_seen: Mapping[str, Mapping[str, FirstSeen]] | None = None,
    ) -> None:
        self.config = config
        self._clock = clock
        self._store = state_store
        self._lock = threading.Lock()
        self._persist_lock = threading.Lock()
        self._stop = threading.Event()
        self._dirty = threading.Event()
        self._threads: list[threading.Thread] = []
        self._estates = {e.name: _EstateState(e, sources.get(e.name, ())) for e in config.estates}
        for name, seen in (first_seen or {}).items():
            if name in self._estates:
                self._estates[name].first_seen = dict(seen)
        self._snapshot = self._build_snapshot()

    # ------------------------------------------------------------------ public
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def start(self) -> None:
        """Restore the state file, then start one refresh thread per source."""
        self.restore()
        for estate in self._estates.values():
            for source in estate.sources.values():
                thread = threading.Thread(
                    target=self._run_source,
                    args=(estate, source),
                    name=f"refresh-{estate.config.name}-{source.kind}",
                    daemon=True,
                )
                self._threads.append(thread)
                thread.start()
        if self._store is not None:
            persister = threading.Thread(target=self._run_persister, name="persist-state", daemon=True)
            self._threads.append(persister)
            persister.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        for estate in self._estates.values():
            for source in estate.sources.values():
                try:
                    source.close()
                except Exception as exc:  # closing must never stop the shutdown
                    log.debug("closing %s failed: %s", source.describe(), exc)
        self.persist()

    def restore(self) -> None:
        if self._store is None:
            return
        persisted = self._store.load()
        restored = 0
        with self._lock:
            for name, saved in persisted.items():
                estate = self._estates.get(name)
                if estate is None:
                    continue
                estate.first_seen = dict(saved.first_seen)
                for kind, src in saved.sources.items():
                    if kind not in estate.sources:
                        continue
                    estate.data[kind] = src.data
                    estate.status[kind] = replace(
                        estate.status[kind],
                        up=src.up,
                        refreshed=True,
                        last_success=src.last_success,
                        duration=src.duration,
                        records=src.data.records,
                    )
                    restored += 1
                self._evaluate(estate)
            self._snapshot = self._build_snapshot()
        if restored:
            log.info("restored %d source snapshots from %s", restored, self._store.path)

    def refresh(self, estate_name: str, kind: SourceKind) -> None:
        """Run one refresh of one source synchronously (tests, and the refresh threads)."""
        estate = self._estates[estate_name]
        self._refresh_with_deadline(estate, estate.sources[kind])

    def refresh_all(self) -> None:
        for estate in self._estates.values():
            for kind in estate.sources:
                self.refresh(estate.config.name, kind)

    def persist(self) -> None:
        if self._store is None:
            return
        with self._lock:
            payload = {
                name: PersistedEstate(
                    sources={
                        kind: PersistedSource(
                            data=data,
                            up=estate.status[kind].up,
                            last_success=estate.status[kind].last_success,
                            duration=estate.status[kind].duration,
                        )
                        for kind, data in estate.data.items()
                    },
                    first_seen=dict(estate.first_seen),
                )
                for name, estate in self._estates.items()
            }
        # Serialising a large estate takes a while: do it outside the engine lock so scrapes and
        # other refreshes are not held up, but one writer at a time.
        with self._persist_lock:
            try:
                self._store.save(payload, self._clock())
            except OSError as exc:
                log.error("cannot write state file %s: %s", self._store.path, exc)

    # ------------------------------------------------------------------ refresh loop
    def _run_source(self, estate: _EstateState, source: Source) -> None:
        interval = self.config.refresh_interval
        while not self._stop.is_set():
            started = time.monotonic()
            self._refresh_with_deadline(estate, source)
            self._dirty.set()
            self._stop.wait(max(0.0, interval - (time.monotonic() - started)))

    def _run_persister(self) -> None:
        """Write the state file whenever a refresh finished since the last write.

        One writer thread: refreshes that finish while a (possibly multi-second) write of a large
        estate is under way are coalesced into the next write instead of queueing one each, and a
        kill right after the exporter became ready still finds every source in the file.
        """
        while not self._stop.is_set():
            if self._dirty.wait(0.2):
                self._dirty.clear()
                self.persist()

    def _refresh_with_deadline(self, estate: _EstateState, source: Source) -> None:
        """Refresh in a worker thread and give up waiting after the refresh timeout.

        A source whose I/O ignores its own timeout cannot be cancelled in Python; the worker is left
        to finish on its own and no second refresh of that source is started while it runs.
        """
        timeout = self.config.effective_refresh_timeout
        previous_worker = estate.in_flight.get(source.kind)
        if previous_worker is not None and previous_worker.is_alive():
            self._record_failure(
                estate, source, SourceError("timeout", "the previous refresh is still running"), 0.0
            )
            return
        outcome: dict[str, object] = {}
        previous = estate.data.get(source.kind)
        started = time.monotonic()

        def work() -> None:
            try:
                outcome["data"] = source.refresh(previous)
            except BaseException as exc:
                outcome["error"] = exc

        worker = threading.Thread(target=work, name=f"read-{estate.config.name}-{source.kind}", daemon=True)
        estate.in_flight[source.kind] = worker
        worker.start()
        worker.join(timeout)
        duration = time.monotonic() - started
        if worker.is_alive():
            self._record_failure(
                estate,
                source,
                SourceError("timeout", f"refresh did not finish within {timeout:g}s"),
                duration,
            )
        elif "error" in outcome:
            error = outcome["error"]
            assert isinstance(error, BaseException)
            self._record_failure(
                estate,
                source,
                error if isinstance(error, SourceError) else _unexpected(error, source),
                duration,
            )
        else:
            self._record_success(estate, source, outcome["data"], duration)  # type: ignore[arg-type]

    def _record_success(
        self, estate: _EstateState, source: Source, data: SourceData, duration: float
    ) -> None:
        now = self._clock()
        with self._lock:
            estate.data[source.kind] = data
            estate.status[source.kind] = replace(
                estate.status[source.kind],
                up=True,
                refreshed=True,
                last_success=now,
                last_attempt=now,
                duration=duration,
                records=data.records,
                last_error=None,
                http_stats=_http_stats(source),
            )
            self._evaluate(estate)
            self._snapshot = self._build_snapshot()
        log.debug(
            "refreshed %s/%s: %d records in %.2fs", estate.config.name, source.kind, data.records, duration
        )

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
                last_attempt=now,
                duration=duration,
                errors=errors,
                last_error=f"{error.reason}: {error.message}",
                http_stats=_http_stats(source),
            )
            # Time moves on even when a source is down: stuck ages must keep growing.
            self._evaluate(estate)
            self._snapshot = self._build_snapshot()
        log.warning(
            "refresh of %s for estate %s failed (%s): %s",
            source.describe(),
            estate.config.name,
            error.reason,
            error.message,
        )

    # ------------------------------------------------------------------ derived data
    def _evaluate(self, estate: _EstateState) -> None:
        ad = estate.data.get("ad")
        entra = estate.data.get("entra")
        cm = estate.data.get("configmgr")
        org = estate.data.get("entra_organization")
        if isinstance(ad, AdData) and isinstance(entra, EntraData) and isinstance(cm, ConfigMgrData):
            view, estate.first_seen = evaluate(
                ad,
                entra,
                cm,
                estate.first_seen,
                estate.config.stuck_after,
                self._clock(),
                organization=org if isinstance(org, OrganizationData) else None,
            )
            estate.view = view
        estate.cm_summary = summarise_configmgr(cm) if isinstance(cm, ConfigMgrData) else None
        estate.entra_summary = summarise_entra(entra) if isinstance(entra, EntraData) else None

    def _build_snapshot(self) -> Snapshot:
        estates = []
        for estate in self._estates.values():
            data = estate.data
            estates.append(
                EstateSnapshot(
                    name=estate.config.name,
                    stuck_after=estate.config.stuck_after,
                    sources=dict(estate.status),
                    ad=_typed(data.get("ad"), AdData),
                    entra=_typed(data.get("entra"), EntraData),
                    organization=_typed(data.get("entra_organization"), OrganizationData),
                    configmgr=_typed(data.get("configmgr"), ConfigMgrData),
                    view=estate.view,
                    configmgr_summary=estate.cm_summary,
                    entra_summary=estate.entra_summary,
                )
            )
        return Snapshot(estates=tuple(estates), taken_at=self._clock())


def _typed(value: object, cls: type[_T]) -> _T | None:
    return value if isinstance(value, cls) else None


def _http_stats(source: Source) -> HttpStats | None:
    return source.http_stats() if isinstance(source, HttpStatsProvider) else None


def _unexpected(error: BaseException, source: Source) -> SourceError:
    # A bug or an unforeseen library error must not kill the refresh thread; it is logged with
    # its traceback at debug level and counted under "other".
    log.debug("unexpected error in %s", source.describe(), exc_info=error)
    return SourceError("other", f"unexpected {type(error).__name__}: {error}")
