"""Freeing replaced tables a column at a time, out of the way of the serving threads.

A 500,000-row table built in the exporter (a change set merged into the held one) holds twenty-odd
columns, each a memory mapping of its own (exporter.memory). When the last reference to it goes, all of
them are unmapped in one go with the GIL held: 10-20 ms per table (measured), in whatever thread drops
that reference — often a thread serving a scrape that was done with the old snapshot — while no other
request is answered. So the engine hands every table it replaces to :data:`RELEASER`, which keeps it
until it holds the only reference, then drops its cached indexes, child tables and columns one at a
time, stepping aside while connections are served (exporter.turns): one column's unmapping (a
millisecond or less) at a time. A table read back from a file lives in one anonymous mapping
(exporter.state), which unmaps without the GIL; dropping it here costs nothing more.

CPython only: "the only reference" is read from the reference count. A table that is still referenced
elsewhere after ``GIVE_UP_AFTER`` is left to ordinary reference counting.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass

from exporter.tables import Table
from exporter.turns import step_aside

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.1  # seconds between looks at the tables waiting to be freed
GIVE_UP_AFTER = 600.0  # seconds a table may stay referenced elsewhere before it is let go
# sys.getrefcount(held.table) when only the Pending entry holds the table: the entry's attribute and
# getrefcount's own argument.
_ONLY_HERE = 2


@dataclass
class _Pending:
    table: Table | None
    since: float


class Releaser:
    def __init__(self, poll_interval: float = POLL_INTERVAL, give_up_after: float = GIVE_UP_AFTER) -> None:
        self._poll_interval = poll_interval
        self._give_up_after = give_up_after
        self._pending: list[_Pending] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def release(self, table: Table) -> None:
        """Free ``table`` here once nothing else refers to it (the caller drops its reference)."""
        with self._lock:
            self._pending.append(_Pending(table, time.monotonic()))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="release-tables", daemon=True)
                self._thread.start()
        self._wake.set()

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def _run(self) -> None:
        while True:
            self._wake.wait(self._poll_interval)
            self._wake.clear()
            try:
                self._free_what_is_only_here()
            except Exception:  # never let the thread die: the tables would then be freed anywhere
                log.exception("freeing replaced tables failed")

    def _free_what_is_only_here(self) -> None:
        with self._lock:
            entries = list(self._pending)
        for entry in entries:
            if sys.getrefcount(entry.table) <= _ONLY_HERE:
                table, entry.table = entry.table, None
                if table is not None:
                    dismantle(table)
                    del table
            elif time.monotonic() - entry.since > self._give_up_after:
                entry.table = None  # referenced elsewhere all along: ordinary reference counting frees it
        with self._lock:
            self._pending = [entry for entry in self._pending if entry.table is not None]


def dismantle(table: Table) -> None:
    """Drop a table nothing else refers to piece by piece (its cached indexes, its child tables if
    nothing else refers to them either, its columns), stepping aside between the pieces."""
    for piece in table.take_apart():
        # Here: the loop's name and getrefcount's argument. A child shared with the new table stays.
        if isinstance(piece, Table) and sys.getrefcount(piece) <= 2:
            dismantle(piece)
        del piece
        step_aside()


RELEASER = Releaser()
