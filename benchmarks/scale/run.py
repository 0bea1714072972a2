"""The driver: build the estate, start the servers, run the exporter through its phases, measure.

Phases of one run (all against the same three servers):

1. **first start**: the exporter starts without a state file; time to the first HTTP answer and to
   ``/-/ready``; the first full refresh of every source (wall time from the exporter's own
   ``intune_exporter_source_refresh_duration_seconds``, CPU from /proc); the first state file write;
   a quiet window; the stage counts are checked against the ground truth.
2. **1% churn**: the change set is applied to AD, Entra and ConfigMgr; the second refresh of every
   source (which the exporter may read incrementally) is measured: wall, CPU, Graph requests (from
   the simulator's counters), AD entries returned (from slapd's log), and the counts are checked
   against the ground truth after the change.
3. **SIGTERM** once the state file is written: time to exit.
4. **restart with the state file**: time to the first HTTP answer and to ready, counts checked on
   the restored snapshot, then the first refresh after the restart (incremental if the exporter
   resumes from its stored delta state) and a SIGTERM during a refresh.
5. **each source alone** (optional): the exporter with only that source, start to ready: CPU, RSS.
6. **decoding floor** (optional): the client libraries alone, see floor.py.

Twenty scrapers (scrapers.py) hit /metrics in bursts throughout phases 1-3; each request is
classified afterwards by what the exporter was doing (first refresh, refresh, state write, quiet).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.scale import report
from benchmarks.scale.churn import ChurnReport, apply_churn
from benchmarks.scale.cmdb import PostgresServer
from benchmarks.scale.estate import EstateFiles, EstateParams, Truth, load_or_generate
from benchmarks.scale.exporter_proc import (
    ESTATE,
    SOURCE_KINDS,
    Backends,
    ExporterProcess,
    config_document,
    exporter_command,
    snapshot_exporter,
    write_config,
)
from benchmarks.scale.floor import Floor, measure_floor
from benchmarks.scale.graph import REPO, GraphService
from benchmarks.scale.metrics import CheckResult, SourceStatus, check_truth
from benchmarks.scale.priority import describe, run_niced, scheduler_groups_off, set_backend_priority
from benchmarks.scale.procmon import Sampler, state_size
from benchmarks.scale.slapd import SlapdServer

ALL_KINDS = ("ad", "entra", "entra_organization", "configmgr")
READY_TIMEOUT = 3600.0


@dataclass
class Options:
    users: int
    seed: int = 1
    data_dir: Path | None = None
    refresh_interval: float | None = None  # None: chosen from the estate size
    scrapers: int = 20
    scrape_every: float = 1.0
    quiet_seconds: float = 15.0
    solo: bool = True
    floor: bool = True
    restart: bool = True
    churn: bool = True
    exporter_src: Path | None = None
    exporter_rev: str | None = None
    declare_fetch: bool = True  # stream rows as SQL Server's driver does (see cmdb.py)
    connector_critical: bool = False
    discovery_critical: bool = False
    json_out: Path | None = None
    backend_nice: int = 10  # see priority.py
    backend_idle: bool = True

    @property
    def directory(self) -> Path:
        return self.data_dir or Path(f"/tmp/intune-scale/{self.users}")

    def interval(self) -> float:
        # Room for the first full refresh, the state write, a quiet window and the churn before
        # the second cycle starts (the landed exporter needs ~120 s to ready at 500k users).
        return self.refresh_interval or 60.0 + self.users * 0.0005


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------- servers
@dataclass
class Servers:
    slapd: SlapdServer
    cm: PostgresServer
    graph: GraphService
    load_seconds: dict[str, float] = field(default_factory=dict)

    def backends(self, declare_fetch: bool) -> Backends:
        return Backends(
            ldaps_url=self.slapd.ldaps_url,
            ldap_ca_file=self.slapd.ca_file,
            graph_url=self.graph.base_url,
            graph_ca_file=self.graph.ca_file,
            tenant_id=self.graph.tenant_id,
            client_id=self.graph.client_id,
            client_secret=self.graph.client_secret,
            odbc_connection_string=self.cm.connection_string(declare_fetch=declare_fetch),
        )


@contextmanager
def running_servers(root: Path, estate_dir: Path, highest_usn: int) -> Iterator[Servers]:
    slapd = SlapdServer(root / "ldap")
    cm = PostgresServer(root / "pg")
    graph = GraphService(estate_dir, root / "graph")
    servers = Servers(slapd, cm, graph)
    try:
        started = time.monotonic()
        (root / "ldap").mkdir(parents=True, exist_ok=True)
        slapd.prepare([estate_dir / EstateFiles.LDIF], highest_usn, log=say)
        slapd.start()
        servers.load_seconds["slapd (slapadd + start)"] = time.monotonic() - started
        started = time.monotonic()
        cm.start()
        cm.load(estate_dir, log=say)
        servers.load_seconds["postgresql (initdb + COPY)"] = time.monotonic() - started
        started = time.monotonic()
        graph.start()
        servers.load_seconds["graph simulator"] = time.monotonic() - started
        say(f"servers up: {slapd.ldaps_url}, postgresql 127.0.0.1:{cm.port}, graph {graph.base_url}")
        yield servers
    finally:
        graph.stop()
        cm.stop()
        slapd.stop()


# ---------------------------------------------------------------------------------- watching
@dataclass
class StatusPoint:
    t: float
    sources: dict[str, SourceStatus]


class StatusPoller:
    """Scrapes /metrics once a second for the sources' status (refresh ends and durations)."""

    def __init__(self, exporter: ExporterProcess, every: float = 1.0) -> None:
        self.exporter = exporter
        self.every = every
        self.points: list[StatusPoint] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="status", daemon=True)

    def start(self) -> StatusPoller:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self.every)

    def poll(self) -> dict[str, SourceStatus]:
        try:
            sources = self.exporter.scrape().sources(ESTATE)
        except OSError:
            return {}
        self.points.append(StatusPoint(time.time(), sources))
        return sources

    def latest(self) -> dict[str, SourceStatus]:
        return self.poll() or (self.points[-1].sources if self.points else {})

    def refresh_windows(self) -> list[tuple[str, float, float]]:
        """(source, start, end) of every refresh seen, from last_success and duration."""
        seen: set[tuple[str, float]] = set()
        windows = []
        for point in self.points:
            for kind, status in point.sources.items():
                if status.last_success and (kind, status.last_success) not in seen:
                    seen.add((kind, status.last_success))
                    windows.append((kind, status.last_success - status.duration, status.last_success))
        return sorted(windows, key=lambda w: w[1])

    def wait_for_refresh_after(
        self, moment: float, kinds: tuple[str, ...], timeout: float, *, started: bool = False
    ) -> dict[str, SourceStatus]:
        """The statuses once every source finished a refresh after ``moment`` (that also
        *started* after it, with ``started``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            sources = self.latest()
            if all(kind in sources and _refreshed_after(sources[kind], moment, started) for kind in kinds):
                return sources
            time.sleep(0.5)
        raise TimeoutError(f"not every source refreshed within {timeout:g}s")


def _refreshed_after(status: SourceStatus, moment: float, started: bool) -> bool:
    return (status.last_success - status.duration if started else status.last_success) > moment


class ScraperProcess:
    def __init__(self, url: str, out: Path, concurrency: int, every: float) -> None:
        self.out = out
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.scale.scrapers",
                "--url",
                url,
                "--out",
                str(out),
                "--concurrency",
                str(concurrency),
                "--every",
                str(every),
            ],
            cwd=REPO,
            stdin=subprocess.PIPE,
        )

    def stop(self) -> list[dict[str, Any]]:
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        if not self.out.exists():
            return []
        return [json.loads(line) for line in self.out.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------- results
@dataclass
class RefreshFigures:
    durations: dict[str, float]  # source -> seconds (the exporter's own figure)
    cpu: float  # exporter CPU seconds over the refresh window (its refresh children included)
    wall: float  # first refresh start to last refresh end
    graph_requests: dict[str, int]
    ad_searches: int
    ad_entries: int
    peak_rss_mib: float  # the exporter process
    peak_tree_rss_mib: float = 0.0  # the exporter and its refresh children (sum of VmRSS)
    own_cpu: float = 0.0  # the exporter process alone


@dataclass
class Results:
    options: dict[str, Any]
    estate: dict[str, Any]
    load_seconds: dict[str, float] = field(default_factory=dict)
    phases: dict[str, Any] = field(default_factory=dict)
    checks: list[CheckResult] = field(default_factory=list)
    scrape_latency: dict[str, dict[str, float]] = field(default_factory=dict)
    solo: dict[str, dict[str, float]] = field(default_factory=dict)
    floor: Floor | None = None
    warnings: list[str] = field(default_factory=list)
    load_average: dict[str, str] = field(default_factory=dict)  # other work on the machine skews figures
    timeline: dict[str, Any] = field(default_factory=dict)  # raw windows, for a second look afterwards


def _diff(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in sorted(set(after) | set(before))}


# ---------------------------------------------------------------------------------- the run
class Driver:
    def __init__(self, options: Options) -> None:
        self.options = options
        self.root = options.directory
        self.estate_dir = self.root / "estate"
        self.exporter_dir = self.root / "exporter"
        self.state_file = self.exporter_dir / "state.json"
        self.params = EstateParams(
            users=options.users,
            seed=options.seed,
            connector_critical=options.connector_critical,
            discovery_critical=options.discovery_critical,
        )

    def run(self) -> Results:
        document = load_or_generate(self.params, self.estate_dir, log=say)
        self.anchor = float(document["anchor"])
        self.truth = Truth.from_json(document["truth"])
        self.truth_after = Truth.from_json(document["truth_after_churn"])
        self.churn = json.loads((self.estate_dir / EstateFiles.CHURN).read_text())
        results = Results(
            options={k: str(v) for k, v in vars(self.options).items()} | {"backend_priority": describe()},
            estate={
                "ad_users_in_scope": self.truth.records["ad"],
                "entra_users": self.truth.records["entra"],
                "configmgr_records": self.truth.records["configmgr"],
                "stages": dict(self.truth.users),
                "churn": document["churn_counts"],
            },
        )
        self.results = results
        results.load_average["start"] = load_average()
        self.command, self.env = self._exporter_command()
        shutil.rmtree(self.exporter_dir, ignore_errors=True)
        self.exporter_dir.mkdir(parents=True)
        with running_servers(self.root, self.estate_dir, int(document["highest_usn"])) as servers:
            self.servers = servers
            results.load_seconds = dict(servers.load_seconds)
            self.full_resync = self._full_resync_supported()
            self.main_run()
            if self.options.restart:
                self.restart_runs()
            if self.options.solo:
                for source in ("ad", "entra", "configmgr"):
                    results.solo[source] = self.solo_run(source)
            if self.options.floor:
                say("measuring the decoding floor")
                conn = servers.cm.connection_string(declare_fetch=self.options.declare_fetch)
                results.floor = measure_floor(servers.slapd, servers.graph, servers.cm, conn)
        results.load_average["end"] = load_average()
        return results

    def _exporter_command(self) -> tuple[list[str], dict[str, str]]:
        source = self.options.exporter_src
        if self.options.exporter_rev:
            revision = subprocess.run(
                ["git", "-C", str(REPO), "rev-parse", "--short", self.options.exporter_rev],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.strip()
            self.results.options["exporter_rev"] = revision
            source = snapshot_exporter(revision, self.root / "exporter-src", REPO)
            say(f"exporter from git revision {revision} ({source})")
        return exporter_command(source)

    def _config(
        self, name: str, *, sources: tuple[str, ...] = ("ad", "entra", "configmgr"), state: bool = True
    ) -> Path:
        path = self.exporter_dir / f"{name}.yml"
        document = config_document(
            self.servers.backends(self.options.declare_fetch),
            anchor=self.anchor,
            refresh_interval=self.options.interval(),
            state_file=self.state_file if state else None,
            sources=sources,
            full_resync_interval="24h" if self.full_resync else None,
        )
        write_config(path, document)
        return path

    def _full_resync_supported(self) -> bool:
        """Whether this exporter knows ``full_resync_interval`` (the incremental-refresh key)."""
        self.full_resync = True
        probe = ExporterProcess(
            self.command, self._config("probe"), self.exporter_dir / "probe.log", self.env
        )
        if probe.check_config()[0] == 0:
            return True
        self.full_resync = False
        probe.config = self._config("probe")
        code, output = probe.check_config()
        if code != 0:
            raise RuntimeError(f"the exporter rejects the generated config: {output}")
        self.results.warnings.append("this exporter has no full_resync_interval key (no incremental refresh)")
        return False

    def _sampler(self, exporter: ExporterProcess) -> Sampler:
        servers = self.servers
        others: dict[str, Callable[[], int | None]] = {
            "slapd": lambda: servers.slapd.pid,
            "graph": lambda: servers.graph.pid,
        }
        return Sampler(exporter.pid, self.state_file, others).start()

    # -- phase 1-3
    def main_run(self) -> None:
        options, results, servers = self.options, self.results, self.servers
        config = self._config("main")
        exporter = ExporterProcess(self.command, config, self.exporter_dir / "main.log", self.env)
        graph_before = servers.graph.request_counts()
        ldap_start = servers.slapd.log_offset()
        say(f"starting the exporter (refresh_interval {options.interval():.0f}s)")
        t0 = exporter.start()
        sampler = self._sampler(exporter)
        poller = StatusPoller(exporter)
        scrapers: ScraperProcess | None = None
        samples: list[dict[str, Any]] = []
        t_ready = float("inf")
        try:
            t_http = exporter.wait_http(120)
            scrapers = self._start_scrapers(exporter)
            poller.start()
            t_ready = exporter.wait_ready(READY_TIMEOUT)
            say(f"ready after {t_ready - t0:.1f}s (HTTP after {t_http - t0:.2f}s)")
            results.phases["start"] = self._first_checks(exporter, t0, t_http, t_ready)
            first = self._refresh_figures(poller, sampler, t0, t_ready, graph_before, ldap_start, None)
            results.phases["first_refresh"] = {
                **vars(first),
                "cpu_to_ready": sampler.cpu_at(t_ready),
                "own_cpu_to_ready": sampler.own_cpu_at(t_ready),
                "rss_at_ready_mib": sampler.peak_rss_mib(t_ready - 0.5, t_ready + 0.5),
                "tree_rss_at_ready_mib": sampler.peak_tree_rss_mib(t_ready - 0.5, t_ready + 0.5),
            }
            last_end = max((s.last_success for s in poller.latest().values()), default=t_ready)
            self._wait_for_state_write(sampler, last_end)
            time.sleep(options.quiet_seconds)
            self._await_idle_gap(poller, sampler, t0)
            if options.churn:
                self._churn_phase(exporter, poller, sampler)
            else:
                self._converged_check(exporter, self.truth, "steady state", settled=True)
            if scrapers is not None:
                samples, scrapers = scrapers.stop(), None
            say("SIGTERM")
            exit_seconds, code = exporter.terminate()
            results.phases["sigterm_idle"] = {"seconds": exit_seconds, "exit_code": code}
        finally:
            poller.stop()
            if scrapers is not None:
                samples = scrapers.stop()
            sampler.stop()
            exporter.kill()
        writes = self._write_windows(sampler, poller)
        results.scrape_latency = report.latency_by_phase(
            samples, t0, t_ready, poller.refresh_windows(), writes
        )
        results.timeline = {
            "start": t0,
            "ready": t_ready,
            "refreshes": poller.refresh_windows(),
            "state_writes": writes,
            "state_file_changes": [(c.t, c.size) for c in sampler.file_changes],
            # (time, exporter RSS MiB, with refresh children MiB), one a second: where the peaks are
            "rss_mib": [
                (s.t, round(s.rss_kib / 1024), round(s.tree_rss_kib / 1024)) for s in sampler.samples[::10]
            ],
        }
        results.phases["main_process"] = {
            "peak_rss_mib": sampler.hwm_mib(),
            "peak_tree_rss_mib": sampler.peak_tree_rss_mib(),
            "cpu_total": sampler.last_cpu(),
            "state_file_mib": state_size(self.state_file) / 2**20 if self.state_file.exists() else 0.0,
            "state_writes": self._write_durations(sampler, poller),
        }

    def _start_scrapers(self, exporter: ExporterProcess) -> ScraperProcess | None:
        if not self.options.scrapers:
            return None
        out = self.exporter_dir / "scrapes.jsonl"
        out.unlink(missing_ok=True)
        url = exporter.base_url + "/metrics"
        return ScraperProcess(url, out, self.options.scrapers, self.options.scrape_every)

    def _first_checks(
        self, exporter: ExporterProcess, t0: float, t_http: float, t_ready: float
    ) -> dict[str, float]:
        """Check the counts at /-/ready and, if they do not match yet (an exporter that evaluates
        after it is ready), until they do."""
        start = {"http_seconds": t_http - t0, "ready_seconds": t_ready - t0}
        scrape = exporter.scrape()
        at_ready = check_truth(scrape, self.truth, ESTATE, "at first ready", settled=False)
        self.results.checks.append(at_ready)
        if at_ready.ok:
            return start
        if not scrape.has("intune_provisioning_users"):
            self.results.warnings.append("/-/ready answered 200 before the stage metrics were exported")
        converged = self._converged_check(exporter, self.truth, "once evaluated after ready", settled=False)
        start["counts_exact_seconds"] = t_ready - t0 + converged.after_seconds
        return start

    def _converged_check(
        self, exporter: ExporterProcess, truth: Truth, label: str, *, settled: bool, timeout: float = 120.0
    ) -> CheckResult:
        """Check until the counts match, at most ``timeout`` seconds: an exporter that evaluates
        outside its refresh publishes the counts a moment after the refresh (that lag is kept)."""
        started = time.monotonic()
        while True:
            result = check_truth(exporter.scrape(), truth, ESTATE, label, settled=settled)
            if result.ok or time.monotonic() - started > timeout:
                result.after_seconds = time.monotonic() - started
                self.results.checks.append(result)
                return result
            time.sleep(0.2)

    def _churn_phase(self, exporter: ExporterProcess, poller: StatusPoller, sampler: Sampler) -> None:
        results, servers = self.results, self.servers
        graph_before = servers.graph.request_counts()
        say("applying the 1% change set")
        applied: ChurnReport = run_niced(
            lambda: apply_churn(self.churn, servers.slapd, servers.graph, servers.cm)
        )
        done = time.time()
        ldap_after_churn = servers.slapd.log_offset()
        results.phases["churn"] = vars(applied)
        overlapping = [w for w in poller.refresh_windows() if w[2] > applied.applied_at and w[1] < done]
        if overlapping:
            results.warnings.append(
                f"refreshes ran while the change set was applied ({', '.join(w[0] for w in overlapping)}): "
                "the Graph and AD counts of the next refresh may include part of them"
            )
        say(f"change set applied in {done - applied.applied_at:.1f}s; waiting for the next refresh")
        timeout = self.options.interval() + READY_TIMEOUT
        statuses = poller.wait_for_refresh_after(done, ALL_KINDS, timeout, started=True)
        second = self._refresh_figures(poller, sampler, done, None, graph_before, ldap_after_churn, statuses)
        results.phases["second_refresh"] = vars(second)
        self._converged_check(exporter, self.truth_after, "after the 1% change", settled=True)
        self._wait_for_state_write(sampler, max(s.last_success for s in statuses.values()))

    def _await_idle_gap(self, poller: StatusPoller, sampler: Sampler, t0: float) -> None:
        """Return when no refresh cycle is due while the change set is applied: every source is
        refreshed every interval from the start, so if the next cycle is near, let it pass first."""
        interval = self.options.interval()
        budget = 10.0 + self.options.users * 5e-5  # applying the change set (slapd restart included)
        now = time.time()
        due = t0 + (math.floor((now - t0) / interval) + 1) * interval
        if now + budget < due - 2:
            return
        say(f"letting the refresh cycle due in {due - now:.0f}s pass before the change set")
        statuses = poller.wait_for_refresh_after(due - 2, ALL_KINDS, interval + READY_TIMEOUT, started=True)
        self._wait_for_state_write(sampler, max(s.last_success for s in statuses.values()))

    def _refresh_figures(
        self,
        poller: StatusPoller,
        sampler: Sampler,
        since: float,
        until: float | None,
        graph_before: dict[str, int],
        ldap_offset: int,
        statuses: dict[str, SourceStatus] | None,
    ) -> RefreshFigures:
        statuses = statuses or poller.latest()
        windows = [
            (k, s.last_success - s.duration, s.last_success) for k, s in statuses.items() if s.last_success
        ]
        start = min((w[1] for w in windows), default=since)
        end = max((w[2] for w in windows), default=until or time.time())
        searches, entries = self.servers.slapd.entries_returned(ldap_offset)
        return RefreshFigures(
            durations={kind: status.duration for kind, status in sorted(statuses.items())},
            cpu=sampler.cpu_at(end) - sampler.cpu_at(start),
            wall=end - start,
            graph_requests=_diff(self.servers.graph.request_counts(), graph_before),
            ad_searches=searches,
            ad_entries=entries,
            peak_rss_mib=sampler.peak_rss_mib(start, end),
            peak_tree_rss_mib=sampler.peak_tree_rss_mib(start, end),
            own_cpu=sampler.own_cpu_at(end) - sampler.own_cpu_at(start),
        )

    def _wait_for_state_write(
        self, sampler: Sampler, after: float, timeout: float = 600.0, quiet: bool = False
    ) -> float:
        """Wall time the state file was replaced after ``after`` (0 when no state file is written)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            changes = [c.t for c in sampler.file_changes if c.t > after]
            if changes:
                return changes[0]
            time.sleep(0.1)
        if not quiet:
            self.results.warnings.append(f"no state file write seen within {timeout:g}s")
        return 0.0

    def _write_windows(self, sampler: Sampler, poller: StatusPoller) -> list[tuple[float, float]]:
        """(start, end) of each state write, ending when the state file was replaced.

        It starts at the end of the refresh that made the write due, or, for an exporter that
        defers its writes (at most one per interval), at the last moment the process was idle
        before the rename: serialising is busy work, waiting is not.
        """
        ends = sorted(w[2] for w in poller.refresh_windows())
        windows, previous = [], 0.0
        for change in sampler.file_changes:
            due = [end for end in ends if previous < end <= change.t]
            if due:
                idle = sampler.last_idle_before(change.t, after=due[0])
                windows.append((idle if idle is not None else due[0], change.t))
            previous = change.t
        return windows

    def _write_durations(self, sampler: Sampler, poller: StatusPoller) -> list[float]:
        return [round(end - start, 2) for start, end in self._write_windows(sampler, poller)]

    # -- phase 4
    def restart_runs(self) -> None:
        results, servers = self.results, self.servers
        truth = self.truth_after if self.options.churn else self.truth
        exporter = ExporterProcess(
            self.command, self._config("restart"), self.exporter_dir / "restart.log", self.env
        )
        graph_before = servers.graph.request_counts()
        ldap_start = servers.slapd.log_offset()
        say("restarting with the state file")
        t0 = exporter.start()
        sampler = self._sampler(exporter)
        poller = StatusPoller(exporter)
        try:
            t_http = exporter.wait_http(READY_TIMEOUT)
            t_ready = exporter.wait_ready(READY_TIMEOUT, poll=0.02)
            self._converged_check(exporter, truth, "restored after restart", settled=True)
            poller.start()
            statuses = poller.wait_for_refresh_after(t0, ALL_KINDS, READY_TIMEOUT)
            refresh = self._refresh_figures(poller, sampler, t0, None, graph_before, ldap_start, statuses)
            self._converged_check(exporter, truth, "after the first refresh after restart", settled=True)
            results.phases["restart"] = {
                "http_seconds": t_http - t0,
                "ready_seconds": t_ready - t0,
                "peak_rss_to_ready_mib": sampler.peak_rss_mib(t0, t_ready),
                "first_refresh": vars(refresh),
            }
            # An exporter that writes only what changed may not write at all now.
            self._wait_for_state_write(
                sampler, max(s.last_success for s in statuses.values()), timeout=5, quiet=True
            )
            seconds, code = exporter.terminate()
            results.phases["sigterm_after_restart"] = {"seconds": seconds, "exit_code": code}
        finally:
            poller.stop()
            sampler.stop()
            exporter.kill()
        self._sigterm_during_refresh()

    def _sigterm_during_refresh(self) -> None:
        """Restart once more and send SIGTERM while the start-up refresh is running."""
        exporter = ExporterProcess(
            self.command, self._config("restart"), self.exporter_dir / "sigterm.log", self.env
        )
        t0 = exporter.start()
        try:
            exporter.wait_http(READY_TIMEOUT)
            time.sleep(1.0)
            sources = StatusPoller(exporter).latest()
            in_flight = not all(kind in sources and sources[kind].last_success > t0 for kind in ALL_KINDS)
            seconds, code = exporter.terminate()
            self.results.phases["sigterm_during_refresh"] = {
                "seconds": seconds,
                "exit_code": code,
                "refresh_in_flight": in_flight,
                "sent_after_seconds": time.time() - t0 - seconds,
            }
        finally:
            exporter.kill()

    # -- phase 5
    def solo_run(self, source: str) -> dict[str, float]:
        say(f"the exporter with {source} alone")
        config = self._config(f"solo-{source}", sources=(source,), state=False)
        exporter = ExporterProcess(self.command, config, self.exporter_dir / f"solo-{source}.log", self.env)
        graph_before = self.servers.graph.request_counts()
        t0 = exporter.start()
        sampler = self._sampler(exporter)
        try:
            t_ready = exporter.wait_ready(READY_TIMEOUT)
            sources = StatusPoller(exporter).latest()
            exporter.terminate()
        finally:
            sampler.stop()
            exporter.kill()
        figures = {
            "ready_seconds": t_ready - t0,
            "cpu_to_ready": sampler.cpu_at(t_ready),
            "peak_rss_mib": sampler.hwm_mib(),
            "peak_tree_rss_mib": sampler.peak_tree_rss_mib(),
        }
        for kind in SOURCE_KINDS[source]:
            if kind in sources:
                figures[f"refresh_seconds_{kind}"] = sources[kind].duration
        if source == "entra":
            figures["graph_users_requests"] = _diff(self.servers.graph.request_counts(), graph_before).get(
                "users", 0
            )
        return figures


def run(options: Options) -> Results:
    set_backend_priority(options.backend_nice, options.backend_idle)
    with scheduler_groups_off():
        results = Driver(options).run()
    for line in report.render(results):
        print(line)
    if options.json_out is not None:
        options.json_out.write_text(json.dumps(report.as_json(results), indent=2))
    return results
