"""Turning a run's measurements into the printed report and the JSON file."""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from benchmarks.scale.run import Results

PHASES = ("first refresh", "refresh", "state write", "quiet")


# ------------------------------------------------------------------------------- latencies
def _overlaps(start: float, end: float, windows: list[tuple[float, float]]) -> bool:
    return any(start < w_end and end > w_start for w_start, w_end in windows)


def classify_scrape(
    sample: dict[str, Any],
    t_ready: float,
    refreshes: list[tuple[float, float]],
    writes: list[tuple[float, float]],
) -> str:
    start = sample["t"]
    end = start + sample.get("total", 0.0)
    if start < t_ready:
        return "first refresh"
    if _overlaps(start, end, writes):
        return "state write"
    if _overlaps(start, end, refreshes):
        return "refresh"
    return "quiet"


def percentile(values: list[float], share: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(share * (len(ordered) - 1))))
    return ordered[index]


def latency_by_phase(
    samples: list[dict[str, Any]],
    t0: float,
    t_ready: float,
    refresh_windows: list[tuple[str, float, float]],
    write_windows: list[tuple[float, float]],
) -> dict[str, dict[str, float]]:
    """p50/p99/max of /metrics (connect included) per phase of what the exporter was doing."""
    refreshes = [(start, end) for _, start, end in refresh_windows]
    grouped: dict[str, list[dict[str, Any]]] = {phase: [] for phase in PHASES}
    for sample in samples:
        if sample["t"] >= t0:
            grouped[classify_scrape(sample, t_ready, refreshes, writes=write_windows)].append(sample)
    table = {}
    for phase, group in grouped.items():
        good = [s for s in group if "error" not in s and s.get("status") == 200]
        totals = [s["total"] * 1000 for s in good]
        connects = [s["connect"] * 1000 for s in good]
        table[phase] = {
            "requests": len(group),
            "errors": len(group) - len(good),
            "p50_ms": percentile(totals, 0.50),
            "p99_ms": percentile(totals, 0.99),
            "max_ms": max(totals, default=float("nan")),
            "connect_p99_ms": percentile(connects, 0.99),
        }
    return table


# ------------------------------------------------------------------------------- rendering
def machine() -> str:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    python = platform.python_version()
    return f"{platform.platform()}, {os.cpu_count()} cores, {memory:.0f} GiB RAM, Python {python}"


def _seconds(value: Any) -> str:
    return f"{value:.2f}s" if isinstance(value, int | float) else "-"


def _refresh_lines(title: str, figures: dict[str, Any]) -> list[str]:
    durations = ", ".join(f"{k} {v:.1f}s" for k, v in figures["durations"].items())
    requests = figures["graph_requests"]
    return [
        f"{title}:",
        f"  per source (exporter's refresh_duration): {durations}",
        f"  wall (first start .. last end) {figures['wall']:.1f}s, exporter CPU {figures['cpu']:.1f}s "
        f"(serving process {figures.get('own_cpu', 0.0):.1f}s), peak RSS {figures['peak_rss_mib']:.0f} MiB "
        f"(with refresh children {figures.get('peak_tree_rss_mib', 0.0):.0f} MiB)",
        f"  Graph requests: {requests.get('users', 0)} users pages, "
        f"{sum(requests.values())} in all ({', '.join(f'{k} {v}' for k, v in requests.items() if v)})",
        f"  AD: {figures['ad_entries']} entries returned by {figures['ad_searches']} searches (slapd log)",
    ]


def render(results: Results) -> list[str]:
    r = results
    estate = r.estate
    lines = [
        "",
        f"== Scale benchmark: {r.options['users']} AD users, seed {r.options['seed']} ==",
        f"machine: {machine()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"estate: {estate['ad_users_in_scope']} AD users in scope, {estate['entra_users']} Entra users, "
        f"{estate['configmgr_records']} ConfigMgr records; stages {estate['stages']}",
        "loading: " + ", ".join(f"{k} {v:.1f}s" for k, v in r.load_seconds.items()),
        f"load average (1/5/15 min): {r.load_average.get('start')} at start, "
        f"{r.load_average.get('end')} at end",
        f"servers and change set: {r.options.get('backend_priority', 'niceness 0, normal class')}"
        + " (exporter, scrapers: niceness 0, normal class)",
    ]
    phases = r.phases
    if "start" in phases:
        first = phases["first_refresh"]
        if "counts_exact_seconds" in phases["start"]:
            seconds = phases["start"]["counts_exact_seconds"]
            lines.append(f"stage counts exact only {seconds:.1f}s after the start (after ready)")
        lines += [
            f"start: HTTP answers after {phases['start']['http_seconds']:.2f}s, "
            f"/-/ready after {phases['start']['ready_seconds']:.1f}s "
            f"(exporter CPU to ready {first['cpu_to_ready']:.1f}s, "
            f"RSS at ready {first['rss_at_ready_mib']:.0f} MiB)",
            *_refresh_lines("first full refresh", first),
        ]
    if "second_refresh" in phases:
        churn = phases["churn"]
        lines += [
            f"1% change set: {churn['ad_entries']} AD entries, {churn['entra_users']} Entra users, "
            f"{churn['configmgr_rows']} ConfigMgr rows changed",
            *_refresh_lines("second refresh, after the change", phases["second_refresh"]),
        ]
    main = phases.get("main_process", {})
    if main:
        lines.append(
            f"state file: {main['state_file_mib']:.1f} MiB; writes (refresh end .. rename): "
            f"{', '.join(f'{d:.1f}s' for d in main['state_writes']) or '-'}; "
            f"exporter peak RSS (VmHWM) {main['peak_rss_mib']:.0f} MiB, "
            f"with its refresh children {main.get('peak_tree_rss_mib', 0.0):.0f} MiB (sum of VmRSS, sampled)"
        )
    if "sigterm_idle" in phases:
        lines.append(f"SIGTERM to exit (idle): {_seconds(phases['sigterm_idle']['seconds'])}")
    if "restart" in phases:
        restart = phases["restart"]
        lines += [
            f"restart with the state file: HTTP after {restart['http_seconds']:.2f}s, "
            f"ready after {restart['ready_seconds']:.2f}s "
            f"(peak RSS {restart['peak_rss_to_ready_mib']:.0f} MiB)",
            *_refresh_lines("first refresh after the restart", restart["first_refresh"]),
            f"SIGTERM to exit after that refresh: {_seconds(phases['sigterm_after_restart']['seconds'])}",
        ]
    if "sigterm_during_refresh" in phases:
        during = phases["sigterm_during_refresh"]
        lines.append(
            f"SIGTERM to exit during the start-up refresh (in flight: {during['refresh_in_flight']}): "
            f"{_seconds(during['seconds'])}"
        )
    lines += _latency_lines(r)
    lines += _solo_lines(r)
    if r.floor is not None:
        lines += [
            "decoding floor (client libraries alone, this process):",
            *("  " + x for x in r.floor.lines()),
        ]
        cpu = phases.get("first_refresh", {}).get("cpu")
        if cpu:
            lines.append(
                f"  exporter CPU of the first full refresh / floor = {cpu:.1f}s / {r.floor.total_cpu:.1f}s "
                f"= {cpu / r.floor.total_cpu:.2f}x"
            )
    lines.append("ground truth:")
    for check in r.checks:
        lines.append(f"  {check.summary()}")
        lines += [f"    {m}" for m in check.mismatches[:40]]
        lines += [f"    note: {n}" for n in check.notes]
    lines += [f"warning: {w}" for w in r.warnings]
    return lines


def _latency_lines(r: Results) -> list[str]:
    if not r.scrape_latency:
        return []
    lines = [
        f"/metrics under {r.options['scrapers']} concurrent scrapers (new connection each, connect included):"
    ]
    for phase, row in r.scrape_latency.items():
        if not row["requests"]:
            continue
        lines.append(
            f"  {phase:<14} {row['requests']:>6} requests, {row['errors']} errors: "
            f"p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms, max {row['max_ms']:.1f} ms "
            f"(connect p99 {row['connect_p99_ms']:.1f} ms)"
        )
    return lines


def _solo_lines(r: Results) -> list[str]:
    if not r.solo:
        return []
    lines = ["each source alone (start to ready):"]
    for source, row in r.solo.items():
        refreshes = ", ".join(
            f"{k[16:]} {v:.1f}s" for k, v in row.items() if k.startswith("refresh_seconds_")
        )
        lines.append(
            f"  {source:<10} ready {row['ready_seconds']:.1f}s, CPU {row['cpu_to_ready']:.1f}s, "
            f"peak RSS {row['peak_rss_mib']:.0f} MiB ({refreshes})"
        )
    return lines


def as_json(results: Results) -> dict[str, Any]:
    document = dataclasses.asdict(results)
    document["machine"] = machine()
    document["checks"] = [
        {
            "label": c.label,
            "ok": c.ok,
            "checked": c.checked,
            "after_seconds": c.after_seconds,
            "mismatches": c.mismatches,
            "notes": c.notes,
        }
        for c in results.checks
    ]
    if results.floor is not None:
        document["floor"]["total_cpu"] = results.floor.total_cpu
    return document


# ------------------------------------------------------------------------------- comparison
def _get(document: dict[str, Any], *path: str) -> Any:
    value: Any = document
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _fmt(value: Any, unit: str = "s", digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value != value:  # NaN
        return "-"
    return f"{value:.{digits}f}{unit}" if isinstance(value, int | float) else str(value)


def _users_pages(document: dict[str, Any], phase: str) -> str:
    requests = _get(document, "phases", *phase.split("."), "graph_requests") or {}
    if not requests:
        return "-"
    pages = requests.get("users", 0)
    delta = requests.get("usersDelta", 0)
    return f"{pages} + {delta} delta" if delta else str(pages)


def _ad_entries(document: dict[str, Any], phase: str) -> str:
    entries = _get(document, "phases", *phase.split("."), "ad_entries")
    return "-" if entries is None else str(entries)


def _latency(document: dict[str, Any], phase: str) -> str:
    row = _get(document, "scrape_latency", phase)
    if not row or not row.get("requests"):
        return "-"
    return f"{row['p50_ms']:.0f} / {row['p99_ms']:.0f} ms"


def _checks(document: dict[str, Any]) -> str:
    checks = document.get("checks") or []
    if not checks:
        return "-"
    failed = [c["label"] for c in checks if not c["ok"]]
    late = next((c for c in checks if c["label"] == "once evaluated after ready" and c["ok"]), None)
    if late is not None and failed == ["at first ready"]:
        start = _get(document, "phases", "start") or {}
        lag = start.get("counts_exact_seconds", 0.0) - start.get("ready_seconds", 0.0)
        return f"all exact ({lag:.1f}s after ready)"
    return f"differ: {', '.join(failed)}" if failed else "all exact"


def _at(*path: str, unit: str = "s", digits: int = 1) -> Any:
    return lambda d: _fmt(_get(d, *path), unit, digits)


def _pair(first: Any, second: Any) -> Any:
    return lambda d: f"{first(d)} / {second(d)}"


def _longest_write(document: dict[str, Any]) -> str:
    writes = _get(document, "phases", "main_process", "state_writes")
    return _fmt(max(writes)) if writes else "-"


_ROWS: tuple[tuple[str, Any], ...] = (
    ("HTTP answers after", _at("phases", "start", "http_seconds", digits=2)),
    ("`/-/ready` after (first start)", _at("phases", "start", "ready_seconds")),
    ("first full refresh: AD", _at("phases", "first_refresh", "durations", "ad")),
    ("first full refresh: Entra users", _at("phases", "first_refresh", "durations", "entra")),
    ("first full refresh: ConfigMgr", _at("phases", "first_refresh", "durations", "configmgr")),
    ("exporter CPU, first full refresh (children included)", _at("phases", "first_refresh", "cpu")),
    ("… of which the serving process", _at("phases", "first_refresh", "own_cpu")),
    ("decoding floor (ldap3 + json + pyodbc) CPU", _at("floor", "total_cpu")),
    ("AD alone: CPU to ready", _at("solo", "ad", "cpu_to_ready")),
    ("Entra alone: CPU to ready", _at("solo", "entra", "cpu_to_ready")),
    ("ConfigMgr alone: CPU to ready", _at("solo", "configmgr", "cpu_to_ready")),
    ("Graph users pages, full read", lambda d: _users_pages(d, "first_refresh")),
    ("Graph users pages, after 1% change", lambda d: _users_pages(d, "second_refresh")),
    ("AD entries, full read", lambda d: _ad_entries(d, "first_refresh")),
    ("AD entries, after 1% change", lambda d: _ad_entries(d, "second_refresh")),
    ("refresh after 1% change: wall", _at("phases", "second_refresh", "wall")),
    ("refresh after 1% change: exporter CPU", _at("phases", "second_refresh", "cpu")),
    ("RSS at first ready", _at("phases", "first_refresh", "rss_at_ready_mib", unit=" MiB", digits=0)),
    ("peak RSS (VmHWM), first process", _at("phases", "main_process", "peak_rss_mib", unit=" MiB", digits=0)),
    (
        "peak RSS, exporter + refresh children (sum, sampled)",
        _at("phases", "main_process", "peak_tree_rss_mib", unit=" MiB", digits=0),
    ),
    ("state file size", _at("phases", "main_process", "state_file_mib", unit=" MiB")),
    ("longest state write", _longest_write),
    (
        "restart with state: HTTP / ready",
        _pair(
            _at("phases", "restart", "http_seconds", digits=2),
            _at("phases", "restart", "ready_seconds", digits=2),
        ),
    ),
    (
        "first refresh after restart: Graph pages / AD entries",
        _pair(
            lambda d: _users_pages(d, "restart.first_refresh"),
            lambda d: _ad_entries(d, "restart.first_refresh"),
        ),
    ),
    (
        "SIGTERM to exit: idle / during a refresh",
        _pair(_at("phases", "sigterm_idle", "seconds"), _at("phases", "sigterm_during_refresh", "seconds")),
    ),
    ("`/metrics` p50 / p99, first refresh", lambda d: _latency(d, "first refresh")),
    ("`/metrics` p50 / p99, refresh", lambda d: _latency(d, "refresh")),
    ("`/metrics` p50 / p99, state write", lambda d: _latency(d, "state write")),
    ("`/metrics` p50 / p99, quiet", lambda d: _latency(d, "quiet")),
    ("stage counts vs ground truth", _checks),
    ("load average at start", lambda d: _get(d, "load_average", "start") or "-"),
)


def comparison_table(documents: list[dict[str, Any]]) -> list[str]:
    """A Markdown table, one column per results file (--json of a run)."""
    headers = []
    for document in documents:
        revision = _get(document, "options", "exporter_rev") or "installed"
        headers.append(f"{int(_get(document, 'options', 'users') or 0):,} users, {revision}")
    lines = ["| | " + " | ".join(headers) + " |", "|---|" + "---|" * len(documents)]
    for title, cell in _ROWS:
        lines.append(f"| {title} | " + " | ".join(str(cell(d)) for d in documents) + " |")
    return lines
