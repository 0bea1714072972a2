"""Scrapes first: heavy work in the serving process steps aside while requests are answered.

One thread of a CPython process runs at a time (the GIL). Merging a change set into a 500,000-row
table, building its join indexes or evaluating an estate is a series of numpy operations that each
keep the GIL for up to a few milliseconds, and every request needs the GIL a dozen times (accept,
read, answer, send, close): a burst of twenty new scrapes that meets such work waits for it at every
turn, and its slowest answer took 30-37 ms instead of 5 (500,000 users, docs/scale.md). So the HTTP
server says which connections it is serving (:func:`serving`: a new connection from the moment a
thread takes it until its first answer is sent, a kept-alive one while it answers a request), and
heavy work calls :func:`step_aside` between its steps: while a connection is being served, the
work waits, without the GIL, until none is. It waits at most ``MAX_WAIT`` per step and at most
half of any second (``SHARE``), so a flood of requests or clients that connect and never ask
(slowloris) slow the work down at most twofold, never stop it. A thread that is itself serving a
connection (``/trace`` looks users up) never waits.

Nothing here does I/O: the pure modules (columns, tables, pipelines) may call :func:`step_aside`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

MAX_WAIT = 0.05  # seconds a step waits at most for the connections being served
SHARE = 0.5  # of every WINDOW, heavy work waits at most this fraction
WINDOW = 1.0  # seconds


class Requests:
    def __init__(self) -> None:
        self._active = 0
        self._quiet = threading.Condition(threading.Lock())
        self._local = threading.local()
        self._window_start = 0.0
        self._waited = 0.0  # seconds waited in the current window (by all heavy threads)

    @contextmanager
    def serving(self) -> Iterator[None]:
        """Around the serving of one connection or request."""
        with self._quiet:
            self._active += 1
        self._local.serving = True
        try:
            yield
        finally:
            self._local.serving = False
            with self._quiet:
                self._active -= 1
                if not self._active:
                    self._quiet.notify_all()

    def step_aside(self) -> None:
        """Between two steps of heavy work: wait while connections are being served."""
        if not self._active or getattr(self._local, "serving", False):
            return  # the usual case: a read of an int, no lock
        with self._quiet:
            now = time.monotonic()
            if now - self._window_start >= WINDOW:
                self._window_start, self._waited = now, 0.0
            allowed = min(MAX_WAIT, SHARE * WINDOW - self._waited)
            if allowed <= 0:
                return
            self._quiet.wait_for(lambda: not self._active, timeout=allowed)
            self._waited += time.monotonic() - now

    @property
    def active(self) -> int:
        return self._active


REQUESTS = Requests()
serving = REQUESTS.serving
step_aside = REQUESTS.step_aside
