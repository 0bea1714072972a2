"""The CPU priority of the benchmark's servers and of its own changes to them.

In an estate the directory, the site database and Graph run on other machines; here slapd,
PostgreSQL and the Graph simulator share the exporter's two cores, and so does the benchmark when
it applies the change set. Their work then shows up as the exporter's scrape latency: with every
exporter thread idle, a scrape waited 20-40 ms for a core those servers held (GIL probe, docs/scale.md).

``--backend-nice N`` starts the servers (and the clients the benchmark runs against them) at niceness
N, and applies the change set from a thread at N, so that the exporter and the scrapers, at 0, get a
core first, as they would if the servers were remote. 0 puts everything on an equal footing.
The report prints the niceness used.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

_niceness = 0


def set_backend_niceness(niceness: int) -> None:
    global _niceness
    if not 0 <= niceness <= 19:
        raise ValueError(f"backend niceness must be within 0..19, not {niceness}")
    _niceness = niceness


def niced(command: list[str]) -> list[str]:
    """``command`` as a backend runs it: under ``nice`` when a niceness is set."""
    return ["nice", "-n", str(_niceness), *command] if _niceness else list(command)


def run_niced(work: Callable[[], T]) -> T:
    """``work()`` in a thread of its own at the backend niceness (Linux nices threads one by one;
    a thread may raise its niceness but not lower it again, hence a thread that ends with the work)."""
    outcome: dict[str, object] = {}

    def body() -> None:
        try:
            if _niceness:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _niceness)
            outcome["value"] = work()
        except BaseException as error:  # re-raised in the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=body, name="niced-work")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]
