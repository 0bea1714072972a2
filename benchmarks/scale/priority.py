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

Niceness and SCHED_IDLE weigh a thread only against the threads of its own *autogroup*. With
``kernel.sched_autogroup_enabled = 1`` (this machine, like most desktop and VM kernels) every session
is one scheduling group and the groups share the cores equally, so a SCHED_IDLE server in a session
of its own still takes a whole group's share from the exporter's session. PostgreSQL is such a
server, twice over: ``pg_ctl`` starts the postmaster with ``setsid`` and every backend calls
``setsid`` again, so the backend answering the ConfigMgr read ran at full weight whatever its
niceness; a probe thread of the exporter then woke up to 26 ms late with every other exporter thread
idle. (A probe process with a busy thread and two nice-10 children, against two SCHED_IDLE loops in
sessions of their own: wake-up lag p99 5.9 ms, p99.9 10 ms; 0.12 ms and 3.9 ms without them.) So
while the backends run at a lower priority, the benchmark switches autogrouping off
(:func:`scheduler_groups_off`, root only; restored at the end): processes started from then on are
weighed by their niceness alone, as servers on other machines would take none of the exporter's
cores. The report says whether it could.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

_niceness = 0
_idle = False


def set_backend_priority(niceness: int, idle: bool) -> None:
    global _niceness, _idle
    if not 0 <= niceness <= 19:
        raise ValueError(f"backend niceness must be within 0..19, not {niceness}")
    _niceness, _idle = niceness, idle


_AUTOGROUP = Path("/proc/sys/kernel/sched_autogroup_enabled")
_groups_off = False


@contextmanager
def scheduler_groups_off() -> Iterator[None]:
    """Autogrouping off while the block runs, when the backends are deprioritised and it was on
    (see the module doc); a no-op where it cannot be changed."""
    global _groups_off
    try:
        was = _AUTOGROUP.read_text().strip()
    except OSError:
        was = ""
    if was != "1" or not (_niceness or _idle):
        yield
        return
    try:
        _AUTOGROUP.write_text("0\n")
    except OSError:
        yield
        return
    _groups_off = True
    try:
        yield
    finally:
        _groups_off = False
        _AUTOGROUP.write_text(was + "\n")


def describe() -> str:
    """The setting, as the report prints it."""
    parts = [f"niceness {_niceness}"]
    parts.append("SCHED_IDLE" if _idle else "normal class")
    if _groups_off:
        parts.append("autogrouping off")
    elif (_niceness or _idle) and _AUTOGROUP.exists():
        parts.append("autogrouping could not be switched off: niceness counts only within a session")
    return ", ".join(parts)


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
