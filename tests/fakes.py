"""Fakes at the source boundary: the engine sees them exactly as it sees real clients."""

from __future__ import annotations

import threading
from collections.abc import Callable

from exporter.model import SourceData, SourceKind

Behaviour = Callable[[SourceData | None], SourceData]


class FakeSource:
    def __init__(self, kind: SourceKind, behaviour: Behaviour | SourceData):
        self.kind = kind
        self.behaviour = behaviour
        self.calls = 0
        self.previous_seen: list[SourceData | None] = []
        self.deadlines: list[float] = []
        self.closed = False
        self.aborted = 0

    def describe(self) -> str:
        return f"fake {self.kind}"

    def refresh(self, previous: SourceData | None, deadline: float) -> SourceData:
        self.calls += 1
        self.previous_seen.append(previous)
        self.deadlines.append(deadline)
        if callable(self.behaviour):
            return self.behaviour(previous)
        return self.behaviour

    def abort(self) -> None:
        self.aborted += 1

    def close(self) -> None:
        self.closed = True


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def blocking(event: threading.Event) -> Behaviour:
    """A backend that never answers until the test releases it."""

    def wait(previous: SourceData | None) -> SourceData:
        event.wait(30)
        raise RuntimeError("released")

    return wait
