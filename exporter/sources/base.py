"""The interface every source client implements.

The engine calls ``refresh(previous)`` from a background thread, once per refresh interval.
``previous`` is the last good data of this source (possibly loaded from the state file), so a
client can do an incremental read (Graph delta query, AD uSNChanged) and merge it into what it
already had; a client that always reads everything simply ignores it.

Failures are reported by raising :class:`SourceError` with one of the bounded ``reason`` values of
``intune_exporter_source_errors_total``. The message is logged and shown on the landing page, so it
must name the server but never contain a secret.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from exporter.model import ErrorReason, HttpStats, SourceData, SourceKind


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

    def refresh(self, previous: SourceData | None) -> SourceData:
        """Read the backend; raise SourceError on failure."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class HttpStatsProvider(Protocol):
    def http_stats(self) -> HttpStats:
        """A copy of the cumulative request statistics (safe to call from any thread)."""
        ...
