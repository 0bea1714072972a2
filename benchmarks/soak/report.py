"""The soak's checks and its printed report, worked out from the monitor's timeline afterwards.

Checks (each failure is one line under "problems"; the exit code is 1 when there is any):

- **scrapes**: every ``/metrics`` answered 200 with the exporter's metrics and at most 4 times its
  settled size (or 1 MiB), no page answered 5xx or nothing, no blank body, ``/-/ready`` stayed 200
  through the fault phase (restarts of the state-file phase excluded: the monitor is detached then);
- **recovery**: after each fault clears, every source it touched succeeds in a refresh that starts
  within one ``refresh_interval`` (+1 s of scheduling slack);
- **reasons**: a fault's failures carry the reasons that name its cause, and a fault that must take
  its source down does (one that may pass unnoticed, e.g. skipped bad rows, may stay up);
- **isolation**: no source fails outside the window of a fault of its own;
- **counts**: the stage counts equal the ground truth on every scrape while no data-changing fault
  is active, and at the end of the fault phase;
- **leaks**: after a quiet window, threads and descriptors are back to their start values, and no
  trickling or hanging AD connection is left open (abandoned by the exporter instead of closed);
- **state file**: every restart (clean or damaged) answers at once, stays up, is exact again after
  its first refreshes (a clean restart: already when ready), exits 0 on SIGTERM, and writes its state
  again once a blocking damage is repaired;
- **logs**: no traceback, no secret in any exporter log or in the state manifest.
"""

from __future__ import annotations

import itertools
import json
import re
import statistics
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks.soak.faults import KINDS
from benchmarks.soak.run import FaultRecord, Results
from benchmarks.soak.statefile import DAMAGES
from benchmarks.soak.watch import Figures, Monitor, Point, Request, quiet_figures

SCHEDULING_SLACK = 1.0  # seconds a refresh may start late on a loaded machine
MAX_GROWTH = 4  # a /metrics body may grow to this many times its settled size (or 1 MiB)
DAMAGES_BY_NAME = {d.name: d for d in DAMAGES}
_LOG_LINE = re.compile(r'^ts=(\S+) level=(\S+) logger=(\S+) msg="((?:[^"\\]|\\.)*)"')
_FAILED = re.compile(r"^refresh of (.*?) for estate \S+ failed \((\w+)\): (.*)$")


@dataclass
class FaultOutcome:
    record: FaultRecord
    down: list[str] = field(default_factory=list)
    reasons: Counter[str] = field(default_factory=Counter)
    recovery: dict[str, float | None] = field(default_factory=dict)  # source -> seconds after clear
    late_start: dict[str, float] = field(default_factory=dict)  # source -> refresh start after clear
    messages: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


@dataclass
class Analysis:
    outcomes: list[FaultOutcome] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    requests: dict[str, Any] = field(default_factory=dict)
    collateral: list[str] = field(default_factory=list)
    inexact_scrapes: int = 0
    compared_scrapes: int = 0
    log_errors: Counter[str] = field(default_factory=Counter)
    tracebacks: int = 0
    timeline: list[tuple[float, Figures]] = field(default_factory=list)  # (minute, quiet minimum)


# ============================================================================== the analysis
def analyse(results: Results, monitor: Monitor) -> Analysis:
    analysis = Analysis()
    interval = results.options.interval
    log_lines = list(_log_lines(_logs(results)))
    failures = [line for line in log_lines if line[3]]
    increments = _increments(monitor.points)
    windows: dict[str, list[tuple[float, float]]] = {}
    for record in results.faults:
        outcome = _fault_outcome(record, monitor.points, increments, failures, interval)
        analysis.outcomes.append(outcome)
        analysis.problems += [f"{record.kind} at {_clock(record.applied_at)}: {p}" for p in outcome.problems]
        for source in KINDS[record.kind].sources:
            recovered = outcome.recovery.get(source)
            end = record.cleared_at + (recovered if recovered is not None else 3 * interval)
            windows.setdefault(source, []).append((record.applied_at - 0.5, end + 1.5))
    _isolation(results, increments, windows, analysis)
    _requests(results, monitor, analysis)
    _counts(results, monitor, analysis)
    _leaks(results, analysis)
    analysis.timeline = _timeline(results, monitor)
    _rounds(results, analysis)
    _log_checks(results, log_lines, analysis)
    return analysis


def _increments(points: list[Point]) -> list[tuple[float, float, str, str, float]]:
    """(t before, t after, source, reason, n): error counters that moved between two scrapes of
    the same process (a restart resets them)."""
    found = []
    for before, after in itertools.pairwise(points):
        for key, value in after.errors.items():
            delta = value - before.errors.get(key, 0.0)
            if delta > 0 and value >= delta:
                found.append((before.t, after.t, key[0], key[1], delta))
    return found


def _fault_outcome(
    record: FaultRecord,
    points: list[Point],
    increments: list[tuple[float, float, str, str, float]],
    failures: list[tuple[float, str, str, tuple[str, str, str] | None]],
    interval: float,
) -> FaultOutcome:
    kind = KINDS[record.kind]
    outcome = FaultOutcome(record)
    for source in kind.sources:
        recovered_at, started_at = _recovery(points, source, record.cleared_at)
        outcome.recovery[source] = None if recovered_at is None else recovered_at - record.cleared_at
        if started_at is not None:
            outcome.late_start[source] = started_at - record.cleared_at
        if recovered_at is None:
            outcome.problems.append(
                f"{source} did not recover within 3 refresh intervals after the fault cleared"
            )
        elif started_at is not None and started_at > record.cleared_at + interval + SCHEDULING_SLACK:
            outcome.problems.append(
                f"{source} recovered {recovered_at - record.cleared_at:.1f}s after the fault cleared: its "
                f"first good refresh started {started_at - record.cleared_at:.1f}s after "
                f"(> refresh_interval {interval:g}s)"
            )
        end = recovered_at if recovered_at is not None else record.cleared_at + 3 * interval
        inside = [p for p in points if record.applied_at <= p.t <= end]
        if any(source in p.sources and not p.sources[source].up for p in inside):
            outcome.down.append(source)
        for t0, t1, src, reason, n in increments:
            if src == source and t1 >= record.applied_at and t0 <= end + 1.0:
                outcome.reasons[reason] += int(n)
    allowed = {r for r in kind.reasons if r}
    unexpected = sorted(set(outcome.reasons) - allowed)
    if unexpected:
        outcome.problems.append(
            f"failures counted as {', '.join(unexpected)} (expected {' or '.join(sorted(allowed)) or 'none'})"
        )
    if kind.sources and "" not in kind.reasons and not outcome.reasons:
        outcome.problems.append("no failure was recorded: the fault went unnoticed")
    target = kind.target
    end = (
        record.cleared_at + max((v or 0.0) for v in outcome.recovery.values())
        if outcome.recovery
        else record.cleared_at
    )
    seen: set[str] = set()
    for t, _level, _logger, failed in failures:
        if failed is None or not (record.applied_at <= t <= end + 1.0) or _target_of(failed[0]) != target:
            continue
        text = f"({failed[1]}) {failed[2]}"
        shape = re.sub(r"\d+(\.\d+)?", "N", text)
        if shape not in seen:
            seen.add(shape)
            outcome.messages.append(text[:220])
    return outcome


def _recovery(points: list[Point], source: str, cleared_at: float) -> tuple[float | None, float | None]:
    """(time of the first good refresh that ended after ``cleared_at``, when that refresh started)."""
    for point in points:
        if point.t < cleared_at:
            continue
        status = point.sources.get(source)
        if status is not None and status.up and status.last_success > cleared_at:
            return status.last_success, status.last_success - status.duration
    return None, None


def _target_of(description: str) -> str:
    if description.startswith(("ldap://", "ldaps://")):
        return "ad"
    if "tenant" in description:
        return "graph"
    if description.startswith("configmgr"):
        return "configmgr"
    return "?"


def _isolation(
    results: Results,
    increments: list[tuple[float, float, str, str, float]],
    windows: dict[str, list[tuple[float, float]]],
    analysis: Analysis,
) -> None:
    begin, end = results.fault_phase
    quiet_end = results.quiet_window[1] or end
    for t0, t1, source, reason, n in increments:
        if t1 < begin or t0 > quiet_end:
            continue
        if any(t1 >= start and t0 <= stop for start, stop in windows.get(source, ())):
            continue
        line = (
            f"{source} failed {int(n)}x ({reason}) between {_clock(t0)} and {_clock(t1)}, "
            "outside any fault of its own"
        )
        analysis.collateral.append(line)
        analysis.problems.append(line)


def _requests(results: Results, monitor: Monitor, analysis: Analysis) -> None:
    requests = [r for r in monitor.requests if r.t >= results.started]
    failed = [r for r in requests if r.failed]
    scrapes = [r for r in requests if r.path == "/metrics"]
    latencies = sorted(r.seconds for r in scrapes if r.status == 200)
    statuses: dict[str, Counter[str]] = {}
    for request in requests:
        statuses.setdefault(_path_name(request.path), Counter())[str(request.status)] += 1
    unusual = [r for r in requests if r.path != "/metrics" and r.status != 200]
    slowest = sorted((r for r in scrapes if r.status == 200), key=lambda r: -r.seconds)[:5]
    analysis.requests = {
        "slowest": [f"{_clock(r.t)} {1000 * r.seconds:.0f} ms" for r in slowest],
        "not_200": [f"{_clock(r.t)} {r.path} {r.status}" for r in unusual[:10]],
        "scrapes": len(scrapes),
        "pages": len(requests) - len(scrapes),
        "failed": len(failed),
        "latency_p50_ms": round(1000 * statistics.median(latencies), 1) if latencies else None,
        "latency_p99_ms": round(1000 * _percentile(latencies, 0.99), 1) if latencies else None,
        "latency_max_ms": round(1000 * latencies[-1], 1) if latencies else None,
        "statuses": {path: dict(counter) for path, counter in sorted(statuses.items())},
    }
    settled = sorted(r.size for r in scrapes if r.status == 200 and r.t <= results.settle_window[1])
    if settled:
        limit = max(MAX_GROWTH * settled[len(settled) // 2], 1 << 20)
        bloated = [r for r in scrapes if r.size > limit]
        for request in bloated[:5]:
            analysis.problems.append(
                f"/metrics at {_clock(request.t)} was {request.size:,} bytes "
                f"({request.size / settled[len(settled) // 2]:.0f}x its settled size)"
            )
        if len(bloated) > 5:
            analysis.problems.append(f"... and {len(bloated) - 5} more oversized /metrics bodies")
    begin, end = results.fault_phase
    for request in [r for r in requests if r.path == "/-/ready" and r.status == 503 and begin <= r.t <= end][
        :5
    ]:
        analysis.problems.append(f"/-/ready answered 503 at {_clock(request.t)}: a fault cost the data")
    for request in failed[:20]:
        analysis.problems.append(f"{request.path} at {_clock(request.t)} failed: {_request_failure(request)}")
    if len(failed) > 20:
        analysis.problems.append(f"... and {len(failed) - 20} more failed requests")


def _path_name(path: str) -> str:
    name = path.split("?", 1)[0]
    return name + ("?json" if "format=json" in path else "")


def _request_failure(request: Request) -> str:
    if request.status is None:
        return request.error or "no answer"
    if request.blank:
        return f"HTTP {request.status} with a blank or unparsable body {request.error}".strip()
    return f"HTTP {request.status}"


def _percentile(values: list[float], share: float) -> float:
    return values[min(len(values) - 1, int(share * len(values)))]


def _counts(results: Results, monitor: Monitor, analysis: Analysis) -> None:
    compared = [p for p in monitor.points if p.check is not None and p.t >= results.fault_phase[0]]
    inexact = [p for p in compared if p.check is not None and not p.check.ok]
    analysis.compared_scrapes, analysis.inexact_scrapes = len(compared), len(inexact)
    for point in inexact[:10]:
        assert point.check is not None
        analysis.problems.append(
            f"counts differ from the truth at {_clock(point.t)} (no data fault active): "
            + "; ".join(point.check.mismatches[:4])
        )
    if len(inexact) > 10:
        analysis.problems.append(f"... counts differ on {len(inexact) - 10} more scrapes")
    final = results.final_check
    if final is None or not final.ok:
        detail = "; ".join(final.mismatches[:6]) if final else "not checked"
        analysis.problems.append(f"counts not exact after the faults cleared: {detail}")


def _leaks(results: Results, analysis: Analysis) -> None:
    start, end = results.start_figures, results.end_figures
    if start is None or end is None:
        analysis.problems.append("no /proc figures at start or end")
        return
    if end.threads > start.threads + 1:
        analysis.problems.append(f"threads grew {start.threads} -> {end.threads} (quiet minimum)")
    if end.fds > start.fds + 2:
        analysis.problems.append(f"open descriptors grew {start.fds} -> {end.fds} (quiet minimum)")
    if end.rss_kib > 1.5 * start.rss_kib + 20 * 1024:
        analysis.problems.append(f"RSS grew {start.rss_kib / 1024:.0f} -> {end.rss_kib / 1024:.0f} MiB")
    for mode, count in results.abandoned_connections.items():
        analysis.problems.append(
            f"{count} {mode} AD connection(s) still open long after the fault: abandoned, not closed"
        )


def _timeline(results: Results, monitor: Monitor) -> list[tuple[float, Figures]]:
    """The main process's figures minute by minute (each the quiet minimum of its minute)."""
    start, end = results.settle_window[0], results.quiet_window[1]
    found = []
    minute = 0
    while start + 60 * minute < end:
        figures = quiet_figures(monitor.samples, start + 60 * minute, min(end, start + 60 * (minute + 1)))
        if figures is not None:
            found.append((float(minute), figures))
        minute += 1
    return found


def _rounds(results: Results, analysis: Analysis) -> None:
    interval = results.options.interval
    for number, record in enumerate(results.rounds, 1):
        name = f"state round {number} ({record.damage}: {record.detail})"
        if record.exit_code != 0:
            analysis.problems.append(f"{name}: the exporter before it exited {record.exit_code} on SIGTERM")
        if record.stop_seconds > 6.0:
            analysis.problems.append(f"{name}: SIGTERM took {record.stop_seconds:.1f}s")
        if not record.alive:
            analysis.problems.append(f"{name}: the exporter exited")
        if record.healthy_after is None or record.healthy_after > 5.0:
            analysis.problems.append(f"{name}: no HTTP answer within 5s ({record.healthy_after})")
        if record.ready_after is None:
            analysis.problems.append(f"{name}: never ready")
        if record.exact_after is None:
            analysis.problems.append(f"{name}: counts never exact again")
        elif record.ready_after is not None and record.exact_after > record.ready_after + 2 * interval + 2:
            analysis.problems.append(
                f"{name}: counts exact only {record.exact_after:.1f}s after the start (ready after "
                f"{record.ready_after:.1f}s): the damage was served until a later full read replaced it"
            )
        if record.damage == "clean" and not record.exact_at_ready:
            analysis.problems.append(f"{name}: the restored snapshot was not exact when ready")
        damage = DAMAGES_BY_NAME.get(record.damage)
        if damage is not None and damage.needs_repair and not damage.refused:
            if not record.write_failures:
                analysis.problems.append(
                    f"{name}: intune_exporter_state_write_failures_total did not count it"
                )
            if record.repaired_write_after is None:
                analysis.problems.append(f"{name}: no state write after the damage was repaired")
        analysis.problems += [f"{name}: {note}" for note in record.notes]


def _log_checks(
    results: Results, lines: list[tuple[float, str, str, tuple[str, str, str] | None]], analysis: Analysis
) -> None:
    for path in _logs(results):
        text = path.read_text(errors="replace")
        analysis.tracebacks += text.count("Traceback (most recent call last)")
        for secret in results.secrets:
            if secret and secret in text:
                analysis.problems.append(f"a configured secret appears in {path.name}")
    if results.state_file and results.state_file.is_file():
        manifest = results.state_file.read_text(errors="replace")
        for secret in results.secrets:
            if secret and secret in manifest:
                analysis.problems.append("a configured secret appears in the state manifest")
    analysis.log_errors = Counter(
        re.sub(r"\d+(\.\d+)?", "N", message)[:160] for _t, level, message, _f in _raw_errors(results)
    )
    if analysis.tracebacks:
        analysis.problems.append(f"{analysis.tracebacks} traceback(s) in the exporter logs")


def _raw_errors(results: Results) -> Iterable[tuple[float, str, str, None]]:
    for path in _logs(results):
        for line in path.read_text(errors="replace").splitlines():
            match = _LOG_LINE.match(line)
            if match and match.group(2) == "error":
                yield _epoch(match.group(1)), "error", match.group(4), None


def _logs(results: Results) -> list[Path]:
    if results.main_log is None:
        return []
    return sorted(results.main_log.parent.glob("exporter-*.log"))


def _log_lines(paths: list[Path]) -> Iterable[tuple[float, str, str, tuple[str, str, str] | None]]:
    """(time, level, logger, (source description, reason, message) for a failed refresh, else None)."""
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            match = _LOG_LINE.match(line)
            if not match:
                continue
            message = match.group(4).replace('\\"', '"')
            failed = _FAILED.match(message)
            yield (
                _epoch(match.group(1)),
                match.group(2),
                match.group(3),
                (failed.group(1), failed.group(2), failed.group(3)) if failed else None,
            )


def _epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _clock(t: float) -> str:
    return datetime.fromtimestamp(t).strftime("%H:%M:%S")


# ============================================================================== printing
def render(results: Results, analysis: Analysis) -> list[str]:
    options = results.options
    lines = [
        "",
        f"fault soak: {options.users} users, seed {options.seed}, {options.minutes:g} min of faults, "
        f"refresh_interval {options.interval:g}s, refresh_timeout {options.timeout:g}s, "
        f"backend timeouts {options.backend_timeout:g}s, full_resync_interval {options.full_resync:g}s",
        f"exporter: {results.exporter}; started {datetime.fromtimestamp(results.started):%Y-%m-%d %H:%M}; "
        f"load average {results.load_average.get('start', '?')} -> {results.load_average.get('end', '?')}",
        "",
        "exporter process (quiet minimum; peak RSS is VmHWM)",
        f"  start: {_figures(results.start_figures)}",
        f"  end:   {_figures(results.end_figures)}",
        "  by minute: "
        + ", ".join(f"{m:g}: {f.rss_kib / 1024:.0f} MiB/{f.fds}/{f.threads}" for m, f in analysis.timeline),
        "",
        "errors by source and reason (intune_exporter_source_errors_total)",
    ]
    keys = sorted(set(results.start_errors) | set(results.end_errors))
    if not keys:
        lines.append("  none")
    for key in keys:
        lines.append(
            f"  {key[0]:<20} {key[1]:<10} start {int(results.start_errors.get(key, 0)):>4}"
            f"   end {int(results.end_errors.get(key, 0)):>4}"
        )
    lines += ["", "faults (recovery: seconds from the fault clearing to the first good refresh ending)"]
    for outcome in analysis.outcomes:
        record = outcome.record
        recovery = ", ".join(
            f"{s} {'never' if v is None else f'{v:.1f}s'}" for s, v in outcome.recovery.items()
        )
        reasons = ", ".join(f"{r} x{n}" for r, n in sorted(outcome.reasons.items())) or "no failure"
        lines.append(
            f"  {_clock(record.applied_at)} {record.kind:<19} {record.cleared_at - record.applied_at:5.1f}s "
            f"{'OK  ' if not outcome.problems else 'FAIL'} down: {', '.join(outcome.down) or '-'}; "
            f"{reasons}; recovered: {recovery or '-'}"
        )
        lines.append(f"      {record.detail}")
        for message in outcome.messages[:3]:
            lines.append(f"      > {message}")
    lines += ["", "state file rounds"]
    for number, record in enumerate(results.rounds, 1):
        lines.append(
            f"  {number:>2}. {record.damage:<22} SIGTERM {record.stop_seconds:.1f}s exit {record.exit_code}; "
            f"HTTP {_seconds(record.healthy_after)}, ready {_seconds(record.ready_after)}, "
            f"exact {_seconds(record.exact_after)}{' (at ready)' if record.exact_at_ready else ''}"
            + ("" if record.alive else ", EXITED")
        )
        lines.append(f"      {record.detail}")
        if record.refusal:
            lines.append(f"      refused to start (by design), then repaired: {record.refusal}")
        if record.write_failures is not None:
            lines.append(
                f"      state writes failed {int(record.write_failures)}x while blocked; written again "
                f"{_seconds(record.repaired_write_after)} after the repair"
            )
    requests = analysis.requests
    lines += [
        "",
        f"requests: {requests.get('scrapes')} scrapes of /metrics, {requests.get('pages')} pages, "
        f"{requests.get('failed')} failed; /metrics latency p50 {requests.get('latency_p50_ms')} ms, "
        f"p99 {requests.get('latency_p99_ms')} ms, max {requests.get('latency_max_ms')} ms "
        f"(slowest at {', '.join(requests.get('slowest', []))})",
    ]
    for path, counts in requests.get("statuses", {}).items():
        lines.append(f"  {path:<16} " + ", ".join(f"{status}: {n}" for status, n in sorted(counts.items())))
    if requests.get("not_200"):
        lines.append("  pages not 200: " + ", ".join(requests["not_200"]))
    lines += [
        f"counts compared with the truth on {analysis.compared_scrapes} scrapes, "
        f"{analysis.inexact_scrapes} differed; after the faults: "
        f"{'exact' if results.final_check and results.final_check.ok else 'NOT exact'}",
        f"exporter logs: {analysis.tracebacks} tracebacks, "
        f"{sum(analysis.log_errors.values())} error lines"
        + (
            ": " + "; ".join(f"{m} (x{n})" for m, n in analysis.log_errors.most_common(5))
            if analysis.log_errors
            else ""
        ),
        "",
    ]
    if analysis.problems:
        lines.append(f"PROBLEMS ({len(analysis.problems)}):")
        lines += [f"  - {problem}" for problem in analysis.problems]
    else:
        lines.append("every check passed")
    return lines


def _figures(figures: Figures | None) -> str:
    if figures is None:
        return "-"
    return (
        f"RSS {figures.rss_kib / 1024:.1f} MiB (peak {figures.hwm_kib / 1024:.1f}), "
        f"{figures.fds} fds, {figures.threads} threads"
    )


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f}s"


def as_json(results: Results, analysis: Analysis) -> dict[str, Any]:
    def figures(f: Figures | None) -> dict[str, int] | None:
        return (
            None
            if f is None
            else {"rss_kib": f.rss_kib, "hwm_kib": f.hwm_kib, "fds": f.fds, "threads": f.threads}
        )

    return {
        "options": {k: str(v) for k, v in vars(results.options).items()},
        "exporter": results.exporter,
        "started": results.started,
        "load_average": results.load_average,
        "timeline": [{"minute": m, **(figures(f) or {})} for m, f in analysis.timeline],
        "start": figures(results.start_figures),
        "end": figures(results.end_figures),
        "errors_start": {f"{s}/{r}": v for (s, r), v in results.start_errors.items()},
        "errors_end": {f"{s}/{r}": v for (s, r), v in results.end_errors.items()},
        "faults": [
            {
                "kind": o.record.kind,
                "detail": o.record.detail,
                "applied_at": o.record.applied_at,
                "seconds": o.record.cleared_at - o.record.applied_at,
                "down": o.down,
                "reasons": dict(o.reasons),
                "recovery_seconds": o.recovery,
                "messages": o.messages,
                "problems": o.problems,
            }
            for o in analysis.outcomes
        ],
        "rounds": [
            {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(r).items()} for r in results.rounds
        ],
        "requests": analysis.requests,
        "compared_scrapes": analysis.compared_scrapes,
        "inexact_scrapes": analysis.inexact_scrapes,
        "tracebacks": analysis.tracebacks,
        "problems": analysis.problems,
    }


def write_json(path: Path, results: Results, analysis: Analysis) -> None:
    path.write_text(json.dumps(as_json(results, analysis), indent=2, default=str))
