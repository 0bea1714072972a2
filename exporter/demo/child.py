"""The demo's simulation in a process of its own, so that it never holds the serving process's GIL.

A real source waits on its backend (or decodes a full read in a refresh child); a simulated read is
pure-Python work, about 300 ms for the demo's three estates every refresh interval. In the serving
process that work delays each scrape arriving meanwhile by tens of milliseconds. ``--demo`` forks
one simulation process at start, while the exporter is still single-threaded: it holds the estates
(people are hired as simulated time passes), reads them at the time the parent asks for, and sends
back the table and the simulated Graph request counts. Tests and ``trace --demo`` keep reading in
process: the answers are the same, only the process differs.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from exporter.demo.common import SimulatedEstate
from exporter.model import ErrorReason, HttpStats, SourceData, SourceKind
from exporter.sources.base import Source, SourceError

NICENESS = 10  # as the refresh children: the scrapes come first


@dataclass(frozen=True)
class _Failed:
    """A read that raised, as it crosses the pipe (exceptions with extra fields do not pickle)."""

    reason: ErrorReason | None  # None: not a SourceError
    message: str


class SimulationProcess:
    """The estates' reads, served by a child process forked from the (single-threaded) caller."""

    def __init__(self, estates: list[SimulatedEstate]) -> None:
        self._estates = estates
        context = multiprocessing.get_context("fork")
        self._connection, child_end = context.Pipe()
        self._process = context.Process(
            target=_serve, args=(estates, child_end), name="demo-simulation", daemon=True
        )
        self._process.start()
        child_end.close()
        self._lock = threading.Lock()  # one request at a time on the pipe

    def read(self, estate: SimulatedEstate, kind: SourceKind) -> SourceData:
        """What ``estate`` shows a ``kind`` source now (the estate's clock, read here)."""
        index = next(i for i, e in enumerate(self._estates) if e is estate)
        with self._lock:
            try:
                self._connection.send((index, kind, estate.clock()))
                outcome, graph = self._connection.recv()
            except (EOFError, OSError) as exc:
                raise SourceError("other", f"demo: the simulation process is gone ({exc})") from None
        with estate.graph_lock:
            estate.graph = graph
        if isinstance(outcome, _Failed):
            if outcome.reason is None:
                raise RuntimeError(outcome.message)  # a bug in the simulation, as in process
            raise SourceError(outcome.reason, outcome.message)
        data: SourceData = outcome
        return data

    def close(self) -> None:
        self._connection.close()  # the child reads end-of-file and ends
        self._process.join(5)
        if self._process.is_alive():
            self._process.kill()


def _serve(estates: list[SimulatedEstate], connection: multiprocessing.connection.Connection) -> None:
    from exporter.demo.sources import READERS

    os.nice(NICENESS)
    now = [0.0]
    for estate in estates:
        estate.clock = lambda: now[0]  # the parent's time: its clock may be scaled or injected
    while True:
        try:
            index, kind, now[0] = connection.recv()
        except (EOFError, OSError):  # the exporter closed the pipe or is gone
            return
        estate = estates[index]
        outcome: Any
        try:
            outcome = getattr(estate, READERS[kind])()
        except SourceError as exc:
            outcome = _Failed(exc.reason, exc.message)
        except Exception as exc:  # the simulation process must outlive a bug in one read
            outcome = _Failed(None, f"demo simulation: {exc!r}")
        with estate.graph_lock:
            graph: HttpStats = estate.graph.copy()
        connection.send((outcome, graph))


def simulate_in_child(sources: Mapping[str, Sequence[Source]]) -> SimulationProcess:
    """Fork the simulation process and point every demo source at it; call while single-threaded."""
    from exporter.demo.sources import DemoSource

    demo = [source for estate in sources.values() for source in estate if isinstance(source, DemoSource)]
    estates = list({id(source.estate): source.estate for source in demo}.values())
    simulation = SimulationProcess(estates)
    for source in demo:
        source.simulation = simulation
    return simulation
