"""The soak driver: real backends, an exporter process, a seeded fault plan, checks.

Phases:

1. **settle**: the exporter starts against healthy backends; once it is ready and its counts equal
   the ground truth, the start figures (RSS, fds, threads from /proc) and error counters are taken.
2. **faults**: the seeded plan (faults.py) runs for ``--minutes``; a scrape every second (pages now
   and then) is checked for failures and blanks, and the stage counts are compared with the truth
   on every scrape while no fault that changes data is active.
3. **quiet**: every fault is cleared; the sources recover, the counts must be exact, the end
   figures are taken over a quiet window.
4. **state file**: the exporter is stopped (SIGTERM), its state damaged (statefile.py), started
   again; it must serve at once and be exact again after its first refreshes. A clean restart
   before and after the damage rounds must restore exact counts from the state file alone.

Every check is evaluated afterwards from the monitor's timeline (report.py).
"""

from __future__ import annotations

import random
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.scale.estate import EstateParams, Truth, load_or_generate
from benchmarks.scale.exporter_proc import (
    ESTATE,
    ExporterProcess,
    config_document,
    exporter_command,
    snapshot_exporter,
    write_config,
)
from benchmarks.scale.graph import REPO
from benchmarks.scale.metrics import CheckResult, check_truth
from benchmarks.soak import statefile
from benchmarks.soak.backends import Servers, first_upn, start_servers
from benchmarks.soak.faults import KINDS, ActiveFault, Injector, Planned, make_plan
from benchmarks.soak.watch import Figures, Monitor, quiet_figures

ALL_SOURCES = ("ad", "entra", "entra_organization", "configmgr")


@dataclass
class Options:
    minutes: float = 4.0
    seed: int = 1
    users: int = 1000
    interval: float = 8.0  # refresh_interval
    timeout: float = 4.0  # refresh_timeout
    backend_timeout: float = 2.0  # AD timeout, Graph timeout, ConfigMgr query_timeout
    full_resync: float = 40.0
    state_rounds: int = 6
    data_dir: Path = Path("/tmp/fault-soak")
    json_out: Path | None = None
    exporter_rev: str | None = None  # run this git revision (git archive), not the working tree
    faults: tuple[str, ...] = ()  # only these fault kinds (default: every kind)
    damages: tuple[str, ...] = ()  # only these state-file damages (default: every damage)


@dataclass
class FaultRecord:
    """One executed fault (times are wall clock, comparable with the exporter's timestamps)."""

    planned: Planned
    kind: str
    detail: str = ""
    applied_at: float = 0.0
    cleared_at: float = 0.0


@dataclass
class RoundRecord:
    """One stop / damage / start cycle of the state-file phase."""

    damage: str
    detail: str
    stop_seconds: float = 0.0
    exit_code: int | None = None
    started_at: float = 0.0
    healthy_after: float | None = None
    ready_after: float | None = None
    exact_after: float | None = None
    exact_at_ready: bool | None = None
    alive: bool = True
    log: Path | None = None
    repaired_write_after: float | None = None
    write_failures: float | None = None  # intune_exporter_state_write_failures_total before the repair
    refusal: str = ""  # what the exporter said when it refused to start (by design)
    notes: list[str] = field(default_factory=list)


@dataclass
class Results:
    options: Options
    started: float = 0.0
    truth: Truth | None = None
    upn: str = ""
    secrets: tuple[str, ...] = ()
    faults: list[FaultRecord] = field(default_factory=list)
    fault_phase: tuple[float, float] = (0.0, 0.0)
    settle_window: tuple[float, float] = (0.0, 0.0)
    quiet_window: tuple[float, float] = (0.0, 0.0)
    start_figures: Figures | None = None
    end_figures: Figures | None = None
    start_errors: dict[tuple[str, str], float] = field(default_factory=dict)
    end_errors: dict[tuple[str, str], float] = field(default_factory=dict)
    final_check: CheckResult | None = None
    abandoned_connections: dict[str, int] = field(default_factory=dict)
    rounds: list[RoundRecord] = field(default_factory=list)
    main_log: Path | None = None
    state_file: Path | None = None
    exporter: str = "the installed package (working tree)"
    load_average: dict[str, str] = field(default_factory=dict)  # other work on the machine skews timings
    notes: list[str] = field(default_factory=list)


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class Soak:
    def __init__(self, options: Options) -> None:
        self.options = options
        self.root = options.data_dir
        self.estate_dir = self.root / "estate"
        self.run_dir = self.root / "run"
        self.state_file = self.run_dir / "state.json"
        self.results = Results(options, state_file=self.state_file)
        self.exporter: ExporterProcess | None = None
        self.generation = 0

    # ------------------------------------------------------------------ the whole run
    def run(self) -> Results:
        options, results = self.options, self.results
        document = load_or_generate(EstateParams(options.users, options.seed), self.estate_dir, log=say)
        self.truth = Truth.from_json(document["truth"])
        results.truth = self.truth
        results.upn = first_upn(self.estate_dir)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.run_dir.mkdir(parents=True)
        self.command, self.env = self._exporter_command()
        results.load_average["start"] = load_average()
        servers_context = start_servers(self.run_dir, self.estate_dir, int(document["highest_usn"]), say)
        servers = next(servers_context)
        self.servers = servers
        self.monitor = Monitor(self.truth, ESTATE, results.upn).start()
        try:
            self.config = self._write_config(servers, float(document["anchor"]))
            results.started = time.time()
            self._settle()
            self._fault_phase(servers)
            self._quiet()
            self._state_phase()
            results.load_average["end"] = load_average()
        finally:
            self.monitor.stop()
            if self.exporter is not None:
                self.exporter.kill()
            servers_context.close()
        return results

    def _exporter_command(self) -> tuple[list[str], dict[str, str]]:
        revision = self.options.exporter_rev
        if not revision:
            return exporter_command(None)
        short = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", revision],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        self.results.exporter = f"git revision {short}"
        return exporter_command(snapshot_exporter(short, self.root / "exporter-src", REPO))

    def _write_config(self, servers: Servers, anchor: float) -> Path:
        options = self.options
        backends = servers.backends()
        document: dict[str, Any] = config_document(
            backends,
            anchor=anchor,
            refresh_interval=options.interval,
            state_file=self.state_file,
            full_resync_interval=f"{options.full_resync:g}s",
        )
        estate = document["estates"][0]
        timeout = f"{options.backend_timeout:g}s"
        estate["active_directory"]["timeout"] = timeout
        estate["entra"]["timeout"] = timeout
        estate["entra"]["page_size"] = 100  # several pages per listing: a truncated one is visible
        estate["configmgr"]["query_timeout"] = timeout
        document["refresh_interval"] = f"{options.interval:g}s"
        document["refresh_timeout"] = f"{options.timeout:g}s"
        path = self.run_dir / "config.yml"
        write_config(path, document)
        self.results.secrets = (backends.client_secret, str(estate["active_directory"]["bind_password"]))
        return path

    # ------------------------------------------------------------------ the exporter process
    def _start_exporter(self) -> ExporterProcess:
        self.generation += 1
        log = self.run_dir / f"exporter-{self.generation}.log"
        exporter = ExporterProcess(self.command, self.config, log, self.env)
        exporter.start()
        self.exporter = exporter
        return exporter

    def _stop_exporter(self) -> tuple[float, int | None]:
        assert self.exporter is not None
        self.monitor.detach()
        seconds, code = self.exporter.terminate(timeout=30)
        return seconds, code

    def _wait_exact(self, exporter: ExporterProcess, timeout: float, *, settled: bool) -> CheckResult:
        """Poll until the counts equal the truth (or the timeout passes); the last check."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                result = check_truth(exporter.scrape(), self.truth, ESTATE, "exact", settled=settled)
            except OSError as exc:
                result = CheckResult("exact", mismatches=[f"scrape failed: {exc}"])
            if result.ok or time.monotonic() > deadline:
                return result
            time.sleep(0.5)

    # ------------------------------------------------------------------ phase 1
    def _settle(self) -> None:
        options, results = self.options, self.results
        exporter = self._start_exporter()
        results.main_log = exporter.log_path
        say(
            f"exporter {exporter.base_url} started (refresh_interval {options.interval:g}s, "
            f"refresh_timeout {options.timeout:g}s)"
        )
        exporter.wait_http(30)
        self.monitor.attach(exporter.port, exporter.pid)
        exporter.wait_ready(120)
        first = self._wait_exact(exporter, 3 * options.interval + 30, settled=False)
        if not first.ok:
            raise RuntimeError(
                f"the exporter never matched the ground truth on healthy backends: {first.mismatches[:5]}"
            )
        # Users of stages without evidence count as stuck from the second evaluation on.
        time.sleep(2 * options.interval)
        settled = self._wait_exact(exporter, 2 * options.interval, settled=True)
        if not settled.ok:
            raise RuntimeError(f"counts not exact once settled on healthy backends: {settled.mismatches[:5]}")
        self.monitor.settled = True
        self.monitor.compare = True
        window_start = time.time()
        time.sleep(max(3.0, options.interval))
        results.settle_window = (window_start, time.time())
        results.start_figures = quiet_figures(self.monitor.samples, *results.settle_window)
        latest = self.monitor.latest()
        results.start_errors = dict(latest.errors) if latest else {}
        shown = results.start_figures.show() if results.start_figures else "no figures"
        say(f"settled: counts exact; {shown}")

    # ------------------------------------------------------------------ phase 2
    def _fault_phase(self, servers: Servers) -> None:
        options, results = self.options, self.results
        seconds = options.minutes * 60
        kinds = {name: kind for name, kind in KINDS.items() if not options.faults or name in options.faults}
        plan = make_plan(options.seed, seconds, options.interval, kinds)
        injector = Injector(servers, options.seed, lambda: self.exporter.port if self.exporter else 0)
        events: list[tuple[float, int, Planned]] = []  # (offset, 0 clear / 1 apply, fault)
        for planned in plan:
            events.append((planned.start, 1, planned))
            events.append((planned.start + planned.duration, 0, planned))
        events.sort(key=lambda e: (e[0], e[1]))
        say(f"fault phase: {len(plan)} faults over {seconds:.0f}s (seed {options.seed})")
        active: dict[Planned, tuple[ActiveFault, FaultRecord]] = {}
        data_faults: dict[Planned, FaultRecord] = {}  # altering data: compare counts again once recovered
        begin = time.time()
        for offset, is_apply, planned in events:
            while time.time() < begin + offset:
                self._reenable_compare(data_faults)
                time.sleep(min(0.2, max(0.0, begin + offset - time.time())))
            kind = KINDS[planned.kind]
            if is_apply:
                record = FaultRecord(planned, planned.kind, applied_at=time.time())
                if kind.alters_data:
                    self.monitor.compare = False
                applied = injector.apply(kind)
                record.detail = applied.detail
                active[planned] = (applied, record)
                results.faults.append(record)
                say(f"  + {kind.name} ({applied.detail})")
            else:
                applied, record = active.pop(planned)
                applied.undo()
                record.cleared_at = time.time()
                if kind.alters_data:
                    data_faults[planned] = record
                say(f"  - {kind.name} cleared after {record.cleared_at - record.applied_at:.1f}s")
        while time.time() < begin + seconds:
            self._reenable_compare(data_faults)
            time.sleep(0.2)
        results.fault_phase = (begin, time.time())
        self._data_faults = data_faults

    def _reenable_compare(self, data_faults: dict[Planned, FaultRecord]) -> None:
        """Compare counts again once every source a cleared data fault touched read healthy data."""
        if not data_faults:
            return
        latest = self.monitor.latest()
        if latest is None:
            return
        for planned, record in list(data_faults.items()):
            sources = KINDS[planned.kind].sources
            if all(
                s in latest.sources and latest.sources[s].last_success > record.cleared_at for s in sources
            ):
                del data_faults[planned]
        still_active = any(KINDS[r.kind].alters_data and not r.cleared_at for r in self.results.faults)
        if not data_faults and not still_active:
            self.monitor.compare = True

    # ------------------------------------------------------------------ phase 3
    def _quiet(self) -> None:
        options, results = self.options, self.results
        assert self.exporter is not None
        deadline = time.monotonic() + 3 * options.interval + 30
        while time.monotonic() < deadline:
            self._reenable_compare(self._data_faults)
            latest = self.monitor.latest()
            if latest and all(
                s in latest.sources
                and latest.sources[s].up
                and latest.sources[s].last_success > results.fault_phase[1]
                for s in ALL_SOURCES
            ):
                break
            time.sleep(0.5)
        results.final_check = self._wait_exact(self.exporter, 2 * options.interval, settled=True)
        window_start = time.time()
        time.sleep(max(3.0, 2 * options.interval))
        results.quiet_window = (window_start, time.time())
        results.end_figures = quiet_figures(self.monitor.samples, *results.quiet_window)
        latest = self.monitor.latest()
        results.end_errors = dict(latest.errors) if latest else {}
        # Trickling or hanging AD connections still open now were abandoned by the exporter.
        counts = self.servers.ad_proxy.open_counts(older_than=2 * options.interval)
        results.abandoned_connections = {mode: n for mode, n in counts.items() if mode != "pass" and n}
        say(
            f"quiet: counts {'exact' if results.final_check.ok else 'NOT exact'}; "
            f"{results.end_figures.show() if results.end_figures else 'no figures'}"
        )

    # ------------------------------------------------------------------ phase 4
    def _state_phase(self) -> None:
        options = self.options
        rng = random.Random(options.seed * 104729 + 7)
        damages = [d for d in statefile.DAMAGES if not options.damages or d.name in options.damages]
        rng.shuffle(damages)
        chosen = [damages[i % len(damages)] for i in range(options.state_rounds)]
        say(f"state file phase: a clean restart, {len(chosen)} damaged restarts, a clean restart")
        self._round(None, rng)
        for damage in chosen:
            self._round(damage, rng)
        self._round(None, rng)

    def _round(self, damage: statefile.Damage | None, rng: random.Random) -> None:
        self.monitor.compare = False
        stop_seconds, code = 0.0, None
        if self.exporter is not None and self.exporter.alive():
            self._wait_state_written()
            stop_seconds, code = self._stop_exporter()
        detail = "none (clean restart)"
        if damage is not None:
            try:
                detail = damage.apply(self.state_file, rng)
            except (OSError, RuntimeError, ValueError, KeyError, IndexError) as exc:
                detail = f"could not apply: {type(exc).__name__}: {exc}"
        record = RoundRecord(damage.name if damage else "clean", detail, stop_seconds, code)
        self.results.rounds.append(record)
        try:
            if damage is not None and damage.refused:
                self._expect_refusal(record)
            self._restart_and_check(record, damage)
        finally:
            if damage is not None and damage.needs_repair:
                statefile.repair(self.state_file)  # never leave the next round a blocked state path
        say(
            f"  round {len(self.results.rounds)}: {record.damage} ({detail}): HTTP "
            f"{_seconds(record.healthy_after)}, ready {_seconds(record.ready_after)}, exact "
            f"{_seconds(record.exact_after)}{'' if record.alive else ', EXITED'}"
            + (f"; refused first: {record.refusal}" if record.refusal else "")
        )

    def _expect_refusal(self, record: RoundRecord) -> None:
        """A damage the exporter rejects as a configuration error: exit 2 naming state_file, then
        the soak repairs it and the round goes on with a normal start."""
        exporter = self._start_exporter()
        assert exporter.process is not None
        try:
            code = exporter.process.wait(15)
        except subprocess.TimeoutExpired:
            record.notes.append(
                "expected exit 2 (state_file is not a regular file), the exporter kept running"
            )
            self._stop_exporter()
            code = None
        text = exporter.log_path.read_text(errors="replace").strip()
        record.refusal = f"exit {code}: {text.splitlines()[-1] if text else '(no output)'}"[:200]
        if code is not None and (code != 2 or "state_file" not in text):
            record.notes.append(f"expected exit 2 naming state_file, got {record.refusal}")
        statefile.repair(self.state_file)

    def _restart_and_check(self, record: RoundRecord, damage: statefile.Damage | None) -> None:
        options = self.options
        exporter = self._start_exporter()
        record.log = exporter.log_path
        record.started_at = exporter.started_at
        try:
            healthy = exporter.wait_http(15)
            record.healthy_after = healthy - exporter.started_at
            self.monitor.attach(exporter.port, exporter.pid)
            ready = exporter.wait_ready(3 * options.interval + 30)
            record.ready_after = ready - exporter.started_at
            at_ready = check_truth(exporter.scrape(), self.truth, ESTATE, "at ready", settled=True)
            record.exact_at_ready = at_ready.ok
            budget = options.full_resync + 3 * options.interval + 10
            exact = self._wait_exact(exporter, budget, settled=False)
            if exact.ok:
                record.exact_after = time.time() - exporter.started_at
            else:
                record.notes.append(f"not exact within {budget:.0f}s: {'; '.join(exact.mismatches[:4])}")
            if damage is not None and damage.needs_repair and not damage.refused:
                record.write_failures = _write_failures(exporter)
                record.repaired_write_after = self._repair_and_wait()
            time.sleep(2.0)  # a few more scrapes and pages on this process
        except (RuntimeError, TimeoutError, OSError) as exc:
            record.notes.append(f"{type(exc).__name__}: {exc}")
        record.alive = exporter.alive()

    def _wait_state_written(self) -> None:
        """Before a stop: the exporter has a complete state on disk (its first write is at once)."""
        deadline = time.monotonic() + 2 * self.options.interval + 10
        while time.monotonic() < deadline:
            if self.state_file.is_file() and statefile.directory_of(self.state_file).is_dir():
                return
            time.sleep(0.5)

    def _repair_and_wait(self) -> float | None:
        """Repair what blocks state writes; seconds until the exporter wrote a manifest again."""
        statefile.repair(self.state_file)
        repaired = time.time()
        deadline = time.monotonic() + 3 * self.options.interval + 10
        while time.monotonic() < deadline:
            if self.state_file.is_file() and self.state_file.stat().st_mtime > repaired:
                return time.time() - repaired
            time.sleep(0.5)
        return None


def _write_failures(exporter: ExporterProcess) -> float | None:
    try:
        return exporter.scrape().value("intune_exporter_state_write_failures_total")
    except OSError:
        return None


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f}s"
