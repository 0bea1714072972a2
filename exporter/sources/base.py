"""The interface every source client implements.

The engine calls ``refresh(previous, deadline)`` from a background thread, once per refresh
interval. ``previous`` is the last good data of this source (possibly loaded from the state file)
when an incremental read is wanted, or None when the engine asks for a full read (at start, and
every ``full_resync_interval``). A table returned after a full read carries ``meta["read"] =
"full"``, after an incremental one ``"incremental"``; a client that always reads everything simply
ignores ``previous``. ``deadline`` is a ``time.monotonic()`` value: the whole refresh (retries
included) must end by then. When it passes, the engine calls ``abort()`` (if the source has it) from
another thread; the source then closes its connections so the refresh ends promptly.

Failures are reported by raising :class:`SourceError` with one of the bounded ``reason`` values of
``intune_exporter_source_errors_total``. The message is logged and shown on the landing page, so it
must name the server but never contain a secret.
"""

from __future__ import annotations

import logging
from typing import Protocol, runtime_checkable

from exporter.model import ErrorReason, HttpStats, SourceData, SourceKind

log = logging.getLogger(__name__)


class SourceError(Exception):
    def __init__(self, reason: ErrorReason, message: str) -> None:
        super().__init__(message)
        self.reason: ErrorReason = reason
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigurationError(Exception):
    """Raised while building a source from a config that passed validation but cannot work here
    (e.g. pyodbc or the ODBC library missing). The CLI reports it and exits 2."""


@runtime_checkable
class Source(Protocol):
    kind: SourceKind

    def describe(self) -> str:
        """Where this source reads from, for logs and the landing page (no secrets)."""
        ...

    def refresh(self, previous: SourceData | None, deadline: float) -> SourceData:
        """Read the backend; raise SourceError on failure."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class Abortable(Protocol):
    def abort(self) -> None:
        """Interrupt a refresh in progress (called from another thread at its deadline)."""
        ...


@runtime_checkable
class HttpStatsProvider(Protocol):
    def http_stats(self) -> HttpStats:
        """A copy of the cumulative request statistics (safe to call from any thread)."""
        ...


def abort_source(source: Source) -> None:
    if isinstance(source, Abortable):
        try:
            source.abort()
        except Exception as exc:  # aborting is best effort
            log.debug("aborting %s failed: %s", source.describe(), exc)


def http_stats_of(source: Source) -> HttpStats | None:
    return source.http_stats() if isinstance(source, HttpStatsProvider) else None
