"""Watching the exporter from the outside: a scrape every second, pages now and then, /proc figures.

The monitor keeps every request it made (status, latency, size, whether the body was blank) and,
for every good ``/metrics``, the sources' status, the error counters and (when asked) the stage
counts compared with the ground truth. The driver attaches it to an exporter process and detaches
it around deliberate restarts, so a restart is never counted as a failed scrape.
"""

from __future__ import annotations

import http.client
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from benchmarks.scale.estate import Truth
from benchmarks.scale.metrics import CheckResult, Scrape, SourceStatus, check_truth

SCRAPE_TIMEOUT = 5.0
PAGES = ("/", "/stuck", "/trace?user={upn}&format=json", "/-/ready", "/-/healthy", "/trace?user={upn}")


# ============================================================================== /proc
@dataclass(frozen=True)
class Figures:
    rss_kib: int
    hwm_kib: int
    fds: int
    threads: int

    def show(self) -> str:
        return f"RSS {self.rss_kib / 1024:.1f} MiB, {self.fds} fds, {self.threads} threads"


def figures(pid: int) -> Figures | None:
    """RSS, peak RSS, open descriptors and threads of a process, or None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    values: dict[str, int] = {}
    for line in status.splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM", "Threads"):
            values[name] = int(rest.split()[0])
    if "VmRSS" not in values:
        return None
    return Figures(values["VmRSS"], values.get("VmHWM", 0), fds, values.get("Threads", 0))


def quiet_figures(samples: list[tuple[float, Figures]], start: float, end: float) -> Figures | None:
    """The smallest value of each figure in a window: what the process holds between refreshes
    (a refresh in flight adds a worker thread and a connection for a moment)."""
    inside = [f for t, f in samples if start <= t <= end]
    if not inside:
        return None
    return Figures(
        min(f.rss_kib for f in inside),
        max(f.hwm_kib for f in inside),
        min(f.fds for f in inside),
        min(f.threads for f in inside),
    )


# ============================================================================== HTTP
@dataclass(frozen=True)
class Request:
    t: float
    path: str
    status: int | None  # None: no answer (refused, reset, timed out)
    seconds: float
    size: int
    error: str = ""
    blank: bool = False  # 200 without the content it must have

    @property
    def failed(self) -> bool:
        if self.status is None or self.blank:
            return True
        if self.path == "/metrics":
            return self.status != 200
        if self.path == "/-/ready":
            return self.status not in (200, 503)  # 503: no data yet (checked on its own)
        return self.status >= 500


def get(port: int, path: str, timeout: float = SCRAPE_TIMEOUT) -> tuple[int | None, bytes, str]:
    """(status, body, error) of one GET on a new connection."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read(), ""
    except (OSError, http.client.HTTPException) as exc:
        return None, b"", f"{type(exc).__name__}: {exc}"
    finally:
        connection.close()


# ============================================================================== the monitor
@dataclass
class Point:
    """What one good /metrics said."""

    t: float
    sources: dict[str, SourceStatus]
    errors: dict[tuple[str, str], float]  # (source, reason) -> intune_exporter_source_errors_total
    state_write_failures: float | None
    has_stages: bool
    check: CheckResult | None = None


@dataclass
class Monitor:
    truth: Truth
    estate: str
    upn: str
    every: float = 1.0
    page_every: int = 4  # one page request per this many scrapes
    requests: list[Request] = field(default_factory=list)
    points: list[Point] = field(default_factory=list)
    samples: list[tuple[float, Figures]] = field(default_factory=list)  # (t, figures) of the exporter
    compare: bool = False  # compare stage counts with the truth (False while data faults are active)
    settled: bool = False
    port: int | None = None
    pid: int | None = None

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._tick_lock = threading.Lock()  # held while requests run: detach waits for them
        self._thread = threading.Thread(target=self._run, name="monitor", daemon=True)
        self._ticks = 0

    def start(self) -> Monitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def attach(self, port: int, pid: int) -> None:
        with self._lock:
            self.port, self.pid = port, pid

    def detach(self) -> None:
        """Stop watching; returns once no request to the process is in flight (a restart that
        follows must not turn a request under way into a failure)."""
        with self._tick_lock, self._lock:
            self.port = self.pid = None

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            with self._tick_lock:
                with self._lock:
                    port, pid = self.port, self.pid
                if port is not None and pid is not None:
                    self._tick(port, pid)
            self._stop.wait(max(0.05, self.every - (time.monotonic() - started)))

    def _tick(self, port: int, pid: int) -> None:
        self._ticks += 1
        sample = figures(pid)
        if sample is not None:
            self.samples.append((time.time(), sample))
        self.scrape(port)
        if self._ticks % self.page_every == 0:
            path = PAGES[(self._ticks // self.page_every) % len(PAGES)].format(upn=quote(self.upn))
            self.page(port, path)

    def scrape(self, port: int) -> Point | None:
        t = time.time()
        started = time.monotonic()
        status, body, error = get(port, "/metrics")
        seconds = time.monotonic() - started
        text = body.decode("utf-8", "replace")
        blank = status == 200 and "intune_exporter_build_info" not in text
        self.requests.append(Request(t, "/metrics", status, seconds, len(body), error, blank))
        if status != 200 or blank:
            return None
        try:
            scrape = Scrape(text)
        except ValueError as exc:  # a body the Prometheus parser rejects is as bad as none
            self.requests[-1] = Request(t, "/metrics", status, seconds, len(body), f"unparsable: {exc}", True)
            return None
        errors = {
            (labels["source"], labels["reason"]): value
            for labels, value in scrape.samples.get("intune_exporter_source_errors_total", ())
            if labels.get("estate") == self.estate
        }
        point = Point(
            t,
            scrape.sources(self.estate),
            errors,
            scrape.value("intune_exporter_state_write_failures_total"),
            scrape.has("intune_provisioning_users"),
        )
        if self.compare and point.has_stages:
            point.check = check_truth(scrape, self.truth, self.estate, "continuous", settled=self.settled)
        self.points.append(point)
        return point

    def page(self, port: int, path: str) -> None:
        t = time.time()
        started = time.monotonic()
        status, body, error = get(port, path)
        blank = status == 200 and not body.strip()
        self.requests.append(Request(t, path, status, time.monotonic() - started, len(body), error, blank))

    # ------------------------------------------------------------------ reading the timeline
    def latest(self) -> Point | None:
        return self.points[-1] if self.points else None

    def points_between(self, start: float, end: float) -> list[Point]:
        return [p for p in self.points if start <= p.t <= end]

    def requests_between(self, start: float, end: float) -> list[Request]:
        return [r for r in self.requests if start <= r.t <= end]
