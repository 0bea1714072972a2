"""Sources whose backend is a simulated estate: they go through the same engine path as real ones."""

from __future__ import annotations

import threading
from collections.abc import Callable

from exporter.demo.child import SimulationProcess
from exporter.demo.common import SimulatedEstate
from exporter.model import HttpStats, SourceData, SourceKind

# Which read method of an estate answers for each kind of source.
READERS: dict[SourceKind, str] = {
    "ad": "read_ad",
    "entra": "read_entra",
    "entra_organization": "read_organization",
    "configmgr": "read_configmgr",
    "intune_devices": "read_devices",
}
GRAPH_KINDS: frozenset[SourceKind] = frozenset({"entra", "entra_organization", "intune_devices"})

# A simulated read is pure-Python CPU work (a real source waits on its backend, or decodes in a
# child process); ``--demo`` reads in the simulation process (exporter.demo.child), tests read in
# process. There, every source of every demo estate refreshes at the same moment; a dozen such
# threads sharing the GIL with the scrapes' threads would delay each scrape by a dozen turns per
# hand-over (200 ms and more), one at a time they delay it by one.
_SIMULATION = threading.Lock()


class DemoSource:
    """A Source reading one simulated estate; every read shows the estate at the clock's time."""

    def __init__(self, estate: SimulatedEstate, kind: SourceKind) -> None:
        self.estate = estate
        self.kind: SourceKind = kind
        self._read: Callable[[], SourceData] = getattr(estate, READERS[kind])
        self.simulation: SimulationProcess | None = None  # reads there instead, when set

    def describe(self) -> str:
        return f"demo {self.kind} of {self.estate.domain}"

    def refresh(self, previous: SourceData | None, deadline: float | None = None) -> SourceData:
        # Always a full read: the simulation has nothing to be incremental about.
        if self.simulation is not None:
            return self.simulation.read(self.estate, self.kind)
        with _SIMULATION:
            return self._read()

    def close(self) -> None:
        return None


class DemoGraphSource(DemoSource):
    """The demo's Graph sources also report request statistics, like the real client."""

    def http_stats(self) -> HttpStats:
        with self.estate.graph_lock:
            return self.estate.graph.copy()


def demo_source(estate: SimulatedEstate, kind: SourceKind) -> DemoSource:
    return DemoGraphSource(estate, kind) if kind in GRAPH_KINDS else DemoSource(estate, kind)
