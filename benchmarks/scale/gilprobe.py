"""Run the exporter with a probe thread that measures how long it waits for the GIL, and why.

    python -m benchmarks.scale.gilprobe --out probe.jsonl -- --config.file C --web.listen-address A

(``IPX_GILPROBE=probe.jsonl python -m benchmarks.scale run ...`` runs the scale benchmark's exporter so.)

A scrape is served by a thread of the exporter process; while another thread holds the GIL in one
long C call (a big ``json.loads``, a join or copy of a large buffer, a numpy operation that keeps
the GIL) or a garbage collection runs, the serving thread cannot run at all, whatever the switch
interval. The probe thread sleeps ``--interval`` seconds in a loop and measures how late it wakes:
that lateness is what a scrape arriving at that moment would wait before its first instruction.
Every wake-up later than ``--threshold`` is written as one JSON line with the stack of every other
thread at that moment (the thread that just gave the GIL up is still at, or right after, the call
that held it); every garbage collection longer than ``--gc-threshold`` too (``gc.callbacks``).
A last line holds the histogram of all lags. Then the exporter runs as ``python -m exporter``.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import json
import runpy
import sys
import threading
import time
import traceback
from collections import Counter
from typing import Any, TextIO

_BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


class Probe:
    def __init__(self, out: TextIO, interval: float, threshold: float, gc_threshold: float) -> None:
        self.out = out
        self.interval = interval
        self.threshold = threshold
        self.gc_threshold = gc_threshold
        self.lock = threading.Lock()
        self.histogram = [0] * (len(_BUCKETS_MS) + 1)
        self.worst = 0.0
        self.samples = 0
        self._gc_started = 0.0
        self._last_census = 0.0

    def write(self, record: dict[str, Any]) -> None:
        with self.lock:
            self.out.write(json.dumps(record) + "\n")
            self.out.flush()

    def run(self) -> None:
        me = threading.get_ident()
        while True:
            asked = time.perf_counter()
            time.sleep(self.interval)
            lag = time.perf_counter() - asked - self.interval
            self.samples += 1
            self.worst = max(self.worst, lag)
            self.histogram[sum(lag * 1000 > edge for edge in _BUCKETS_MS)] += 1
            if lag >= self.threshold:
                self.write({"t": time.time(), "lag": round(lag, 4), "stacks": _stacks(me)})

    def on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
            return
        took = time.perf_counter() - self._gc_started
        if took < self.gc_threshold:
            return
        record: dict[str, Any] = {
            "t": time.time(),
            "gc": info.get("generation"),
            "seconds": round(took, 4),
            "collected": info.get("collected"),
        }
        if took > 0.05 and time.monotonic() - self._last_census > 5.0:
            # What a long collection had to walk through (at most every 5 s: this costs too).
            self._last_census = time.monotonic()
            tracked = gc.get_objects(info.get("generation", 2))
            record["objects"] = len(tracked)
            record["types"] = Counter(type(o).__name__ for o in tracked).most_common(6)
            del tracked
        self.write(record)

    def summary(self) -> None:
        labels = [f"<={edge}ms" for edge in _BUCKETS_MS] + [f">{_BUCKETS_MS[-1]}ms"]
        histogram = dict(zip(labels, self.histogram, strict=True))
        self.write({"summary": histogram, "worst": self.worst, "samples": self.samples})


def _stacks(me: int) -> dict[str, list[str]]:
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    stacks: dict[str, list[str]] = {}
    for ident, frame in sys._current_frames().items():
        if ident == me:
            continue
        summary = traceback.extract_stack(frame)[-6:]
        stacks[names.get(ident, str(ident))] = [
            f"{entry.filename.rsplit('/', 2)[-1]}:{entry.lineno} {entry.name}: {entry.line}"
            for entry in summary
        ]
    return stacks


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--interval", type=float, default=0.005)
    parser.add_argument("--threshold", type=float, default=0.015)
    parser.add_argument("--gc-threshold", type=float, default=0.005)
    parser.add_argument("exporter_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    out = open(args.out, "a", encoding="utf-8")  # noqa: SIM115 (open for the process's life)
    probe = Probe(out, args.interval, args.threshold, args.gc_threshold)
    gc.callbacks.append(probe.on_gc)
    atexit.register(probe.summary)
    threading.Thread(target=probe.run, name="gil-probe", daemon=True).start()
    exporter_args = [a for a in args.exporter_args if a != "--"]
    sys.argv = ["exporter", *exporter_args]
    runpy.run_module("exporter", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
