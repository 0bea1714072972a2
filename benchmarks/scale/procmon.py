"""Watching processes from the outside: CPU seconds and memory from /proc, state file writes.

A sampler thread records, every ``interval`` seconds, the exporter's CPU time and its VmRSS/VmHWM,
the CPU time of the backend servers, and the state file's modification time and size. Everything
is kept as a timeline so that figures can be taken for any window afterwards.

The exporter runs its full reads in child processes (forked from a forkserver it starts), so its
CPU time is that of its whole process tree: utime + stime of every live descendant plus the
cutime + cstime of each (the children it has reaped). Memory is given both for the exporter
process alone (VmRSS, VmHWM) and for the tree (the sum of VmRSS, which counts pages the forked
children share with the forkserver once per process: an upper bound).
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


def _stat_fields(pid: int) -> list[str] | None:
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return data[data.rindex(")") + 2 :].split()


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of one process (not its children), or None once it is gone."""
    fields = _stat_fields(pid)
    return None if fields is None else (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, grandchildren, ...)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    pending = [pid]
    while pending:
        children = parents.get(pending.pop(), [])
        found.extend(children)
        pending.extend(children)
    return found


def tree_usage(pid: int) -> tuple[float, int] | None:
    """(CPU seconds, sum of VmRSS KiB) of a process and its descendants, reaped ones included in
    the CPU (cutime + cstime of their parents); None once ``pid`` is gone."""
    cpu = 0.0
    rss = 0
    for member in (pid, *descendants(pid)):
        fields = _stat_fields(member)
        if fields is None:
            if member == pid:
                return None
            continue
        cpu += sum(int(fields[i]) for i in (11, 12, 13, 14)) / CLOCK_TICKS
        memory = memory_kib(member)
        rss += memory[0] if memory is not None else 0
    return cpu, rss


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
    cpu: float  # the exporter's process tree (its refresh children included)
    rss_kib: int  # the exporter process alone
    hwm_kib: int
    tree_rss_kib: int = 0  # the exporter and its children
    own_cpu: float = 0.0  # the exporter process alone
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
        own = cpu_seconds(self.pid)
        memory = memory_kib(self.pid)
        tree = tree_usage(self.pid)
        if own is not None and memory is not None and tree is not None:
            others = {}
            for name, pid_of in self.others.items():
                pid = pid_of()
                value = cpu_seconds(pid) if pid else None
                if value is not None:
                    others[name] = value
            self.samples.append(Sample(now, tree[0], memory[0], memory[1], tree[1], own, others))
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

    def peak_tree_rss_mib(self, start: float = 0.0, end: float = float("inf")) -> float:
        inside = [s.tree_rss_kib for s in self.samples if start <= s.t <= end]
        return max(inside, default=0) / 1024

    def own_cpu_at(self, t: float) -> float:
        """CPU seconds of the exporter process alone (without its refresh children)."""
        return self._interpolate(t, lambda s: s.own_cpu)

    def hwm_mib(self) -> float:
        return max((s.hwm_kib for s in self.samples), default=0) / 1024

    def last_cpu(self) -> float:
        return self.samples[-1].cpu if self.samples else 0.0
