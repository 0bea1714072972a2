"""The CPU priority of the benchmark's servers and of its own changes to them.

In an estate the directory, the site database and Graph run on other machines; here slapd,
PostgreSQL and the Graph simulator share the exporter's two cores, and so does the benchmark when
it applies the change set. Their work then shows up as the exporter's scrape latency: with every
exporter thread idle, a scrape waited 20-40 ms for a core those servers held (GIL probe, docs/scale.md).

``--backend-nice N`` starts the servers (and the clients the benchmark runs against them) at niceness
N, and applies the change set from a thread at N, so that the exporter and the scrapers, at 0, get a
core first, as they would if the servers were remote. Niceness only weighs the shares: a woken
exporter thread may still wait for a running server's time slice (Linux 6.6+ schedules by EEVDF and
does not preempt on every wake-up), and runs at niceness 10 still showed such waits with every
exporter thread idle while the change set was applied (GIL probe). ``--backend-idle`` (the default)
also puts them in the SCHED_IDLE class, which any normal thread preempts at once: the closest this
machine comes to servers on machines of their own. ``--backend-nice 0 --no-backend-idle`` puts
everything on an equal footing. The report prints the setting used.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

_niceness = 0
_idle = False


def set_backend_priority(niceness: int, idle: bool) -> None:
    global _niceness, _idle
    if not 0 <= niceness <= 19:
        raise ValueError(f"backend niceness must be within 0..19, not {niceness}")
    _niceness, _idle = niceness, idle


def niced(command: list[str]) -> list[str]:
    """``command`` as a backend runs it: under ``nice`` (and ``chrt --idle``) when so set."""
    prefix: list[str] = []
    if _idle:
        prefix += ["chrt", "--idle", "0"]
    if _niceness:
        prefix += ["nice", "-n", str(_niceness)]
    return [*prefix, *command]


def run_niced(work: Callable[[], T]) -> T:
    """``work()`` in a thread of its own at the backends' priority (Linux sets it thread by thread;
    a thread may lower its priority but not raise it again, hence a thread that ends with the work)."""
    outcome: dict[str, object] = {}

    def body() -> None:
        try:
            thread = threading.get_native_id()
            if _niceness:
                os.setpriority(os.PRIO_PROCESS, thread, _niceness)
            if _idle:
                os.sched_setscheduler(thread, os.SCHED_IDLE, os.sched_param(0))
            outcome["value"] = work()
        except BaseException as error:  # re-raised in the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=body, name="niced-work")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]
