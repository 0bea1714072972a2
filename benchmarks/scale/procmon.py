"""Watching processes from the outside: CPU seconds and memory from /proc, state file writes.

A sampler thread records, every ``interval`` seconds, the exporter's CPU time (utime + stime of
the process only: the servers it talks to run in processes of their own) and its VmRSS/VmHWM, the
CPU time of the backend servers, and the state file's modification time and size. Everything is
kept as a timeline so that figures can be taken for any window afterwards.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of one process (not its children), or None once it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def memory_kib(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) in KiB, or None once the process is gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    values = {}
    for line in lines:
        if line.startswith(("VmRSS:", "VmHWM:")):
            name, amount = line.split(":", 1)
            values[name] = int(amount.split()[0])
    if "VmRSS" not in values:
        return None  # a zombie
    return values["VmRSS"], values.get("VmHWM", values["VmRSS"])


def state_size(state_file: Path) -> int:
    """Bytes of the state file plus whatever the exporter keeps in ``<state_file>.d/``."""
    total = 0
    side = state_file.parent / (state_file.name + ".d")
    for path in (state_file, *(side.iterdir() if side.is_dir() else ())):
        with contextlib.suppress(OSError):  # replaced while we looked
            total += path.stat().st_size
    return total


@dataclass
class Sample:
    t: float  # wall clock (time.time(), comparable with the exporter's timestamps)
    cpu: float
    rss_kib: int
    hwm_kib: int
    others_cpu: dict[str, float] = field(default_factory=dict)


@dataclass
class FileChange:
    t: float  # when the sampler saw it
    mtime: float
    size: int


class Sampler:
    def __init__(
        self,
        pid: int,
        state_file: Path | None,
        others: Mapping[str, Callable[[], int | None]] | None = None,
        interval: float = 0.1,
    ) -> None:
        self.pid = pid
        self.state_file = state_file
        self.others = dict(others or {})
        self.interval = interval
        self.samples: list[Sample] = []
        self.file_changes: list[FileChange] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._last_stat: tuple[float, int] | None = self._stat()

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _stat(self) -> tuple[float, int] | None:
        """(mtime of the state file, size of it and its side directory): a write is complete when
        the file itself is replaced (an exporter may keep tables in ``<state_file>.d/``)."""
        if self.state_file is None:
            return None
        try:
            mtime = self.state_file.stat().st_mtime
        except OSError:
            return None
        return mtime, state_size(self.state_file)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample_once()
            self._stop.wait(self.interval)

    def sample_once(self) -> None:
        now = time.time()
        cpu = cpu_seconds(self.pid)
        memory = memory_kib(self.pid)
        if cpu is not None and memory is not None:
            others = {}
            for name, pid_of in self.others.items():
                pid = pid_of()
                value = cpu_seconds(pid) if pid else None
                if value is not None:
                    others[name] = value
            self.samples.append(Sample(now, cpu, memory[0], memory[1], others))
        stat = self._stat()
        if stat is not None and (self._last_stat is None or stat[0] != self._last_stat[0]):
            self.file_changes.append(FileChange(now, stat[0], stat[1]))
        self._last_stat = stat

    # -- reading the timeline
    def cpu_at(self, t: float) -> float:
        """The exporter's CPU seconds at wall time t (linear between samples)."""
        return self._interpolate(t, lambda s: s.cpu)

    def other_cpu_at(self, name: str, t: float) -> float:
        return self._interpolate(t, lambda s: s.others.get(name, 0.0))

    def _interpolate(self, t: float, value: Callable[[Sample], float]) -> float:
        samples = self.samples
        if not samples:
            return 0.0
        times = [s.t for s in samples]
        i = bisect.bisect_left(times, t)
        if i == 0:
            return value(samples[0])
        if i >= len(samples):
            return value(samples[-1])
        before, after = samples[i - 1], samples[i]
        share = (t - before.t) / (after.t - before.t) if after.t > before.t else 1.0
        return value(before) + share * (value(after) - value(before))

    def last_idle_before(self, moment: float, after: float, busy_share: float = 0.2) -> float | None:
        """The last sample time in (after, moment) ending an interval in which the process used
        less than ``busy_share`` of one core; None if it was busy all along."""
        found = None
        for before, sample in zip(self.samples, self.samples[1:], strict=False):
            if sample.t <= after or sample.t >= moment:
                continue
            if sample.cpu - before.cpu < busy_share * (sample.t - before.t):
                found = sample.t
        return found

    def peak_rss_mib(self, start: float = 0.0, end: float = float("inf")) -> float:
        inside = [s.rss_kib for s in self.samples if start <= s.t <= end]
        return max(inside, default=0) / 1024

    def hwm_mib(self) -> float:
        return max((s.hwm_kib for s in self.samples), default=0) / 1024

    def last_cpu(self) -> float:
        return self.samples[-1].cpu if self.samples else 0.0
