"""Acceptance (issue 11): ``intune-provisioning-exporter trace USER`` on the hybrid estates.

The command runs as a user would run it (a subprocess, ``--config.file``, no running exporter), after
the session's exporter run has stopped and left its state file (the first-seen times of the stages
without evidence). For every in-scope user its JSON must give the ground truth's stage and reason,
like /trace does; then the exit codes of the contract, every way of naming a user, and proof that it
only makes point look-ups (the Graph simulator's request log; the SQL the SQLite ODBC driver traced).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration import hybrid_estate as he
from tests.integration.conftest import HybridRun
from tests.integration.harness import TraceRun, run_trace, run_traces, sql_statements


@dataclass
class CliRuns:
    by_args: dict[tuple[str, ...], TraceRun]
    config: Path

    def get(self, *args: str) -> TraceRun:
        return self.by_args[args]


@pytest.fixture(scope="session")
def cli_runs(hybrid_run: HybridRun) -> CliRuns:
    config = str(hybrid_run.config)
    env = hybrid_run.backends.env
    arg_lists: list[tuple[str, ...]] = [
        (s.sam, "--config.file", config, "--format", "json") for spec in he.ESTATES for s in spec.in_scope()
    ]
    arg_lists += [
        (
            he.identifier(hybrid_run.backends.estates["hq"], sam, how),
            "--config.file",
            config,
            "--format",
            "json",
        )
        for _, sam, how in he.IDENTIFIERS
    ]
    arg_lists += [
        ("h.upnmis", "--config.file", config),  # text output
        ("h.off", "--config.file", config),
        ("h.away", "--config.file", config),
        ("nobody@test.local", "--config.file", config),
        ("b.enabled", "--config.file", config, "--estate", "hq"),
        ("b.enabled", "--config.file", config, "--estate", "branch", "--format", "json"),
    ]
    runs = run_traces(sorted(set(arg_lists)), env)
    return CliRuns({r.args: r for r in runs}, hybrid_run.config)


def _all_in_scope() -> list[tuple[he.EstateSpec, he.Scenario]]:
    return [(spec, s) for spec in he.ESTATES for s in spec.in_scope()]


@pytest.mark.parametrize(
    ("spec", "scenario"), _all_in_scope(), ids=lambda x: getattr(x, "sam", getattr(x, "name", ""))
)
def test_trace_cli_gives_every_user_its_stage_and_reason(
    cli_runs: CliRuns, hybrid_run: HybridRun, spec: he.EstateSpec, scenario: he.Scenario
) -> None:
    run = cli_runs.get(scenario.sam, "--config.file", str(cli_runs.config), "--format", "json")
    expected_code = 0 if scenario.reason is None else 1
    assert run.code == expected_code, run
    he.check_trace_document(
        run.document(), hybrid_run.backends.estates[spec.name], scenario, stuck=scenario.reason is not None
    )
    # The exporter's /trace said the same.
    status, served = hybrid_run.traces[scenario.sam]
    document = run.document()
    assert status == 200
    assert (document["stage"], document["reason"]) == (served["stage"], served["reason"])


@pytest.mark.parametrize(
    ("label", "sam", "how"), he.IDENTIFIERS, ids=[label for label, _, _ in he.IDENTIFIERS]
)
def test_trace_cli_finds_the_user_by_every_identifier(
    cli_runs: CliRuns, hybrid_run: HybridRun, label: str, sam: str, how: str
) -> None:
    user = he.identifier(hybrid_run.backends.estates["hq"], sam, how)
    run = cli_runs.get(user, "--config.file", str(cli_runs.config), "--format", "json")
    scenario = hybrid_run.backends.estates["hq"].scenario(sam)
    assert run.code == (0 if scenario.reason is None else 1), run
    document = run.document()
    assert document["user"]["sam"] == sam, run
    assert (document["estate"], document["stage"], document["reason"]) == (
        "hq",
        scenario.stage,
        scenario.reason,
    )


def test_trace_cli_text_output_shows_steps_reason_and_action(cli_runs: CliRuns) -> None:
    run = cli_runs.get("h.upnmis", "--config.file", str(cli_runs.config))
    assert run.code == 1, run
    assert "✓" in run.stdout and "✗" in run.stdout
    assert "upn_mismatch" in run.stdout
    assert "h.upnmis@test.onmicrosoft.com" in run.stdout


@pytest.mark.parametrize("sam", ["h.off", "h.away"])
def test_trace_cli_reports_an_out_of_scope_match_on_stderr_and_exits_3(cli_runs: CliRuns, sam: str) -> None:
    run = cli_runs.get(sam, "--config.file", str(cli_runs.config))
    assert run.code == 3, run
    assert run.stdout.strip() == "", run
    assert sam in run.stderr and "scope" in run.stderr.lower(), run


def test_trace_cli_exits_3_when_nobody_matches(cli_runs: CliRuns) -> None:
    run = cli_runs.get("nobody@test.local", "--config.file", str(cli_runs.config))
    assert run.code == 3, run
    # Another estate's user is not in scope of --estate hq.
    run = cli_runs.get("b.enabled", "--config.file", str(cli_runs.config), "--estate", "hq")
    assert run.code == 3, run
    run = cli_runs.get(
        "b.enabled", "--config.file", str(cli_runs.config), "--estate", "branch", "--format", "json"
    )
    assert run.code == 0, run
    assert run.document()["estate"] == "branch"


def test_trace_cli_exits_2_on_bad_arguments_and_bad_config(hybrid_run: HybridRun, tmp_path: Path) -> None:
    config = str(hybrid_run.config)
    bad_yaml = tmp_path / "bad.yml"
    bad_yaml.write_text("estates: [\n")
    bad_key = tmp_path / "bad-key.yml"
    bad_key.write_text(hybrid_run.config.read_text().replace("refresh_interval: 5m", "refresh_intervall: 5m"))
    bad_value = tmp_path / "bad-value.yml"
    bad_value.write_text(hybrid_run.config.read_text().replace("ad_created: 0s", "ad_created: soon", 1))
    cases = [
        ("--config.file", config),  # no USER
        ("h.upnmis", "--config.file", config, "--format", "xml"),
        ("h.upnmis", "--config.file", config, "--bogus"),
        ("h.upnmis", "--config.file", str(tmp_path / "missing.yml")),
        ("h.upnmis", "--config.file", str(bad_yaml)),
        ("h.upnmis", "--config.file", str(bad_key)),
        ("h.upnmis", "--config.file", str(bad_value)),
        ("h.upnmis", "--config.file", config, "--estate", "nosuch"),
        ("", "--config.file", config),
    ]
    for run in run_traces(cases, hybrid_run.backends.env):
        assert run.code == 2, run
        assert run.stderr.strip(), run


# ------------------------------------------------------------------------------ point look-ups only
def test_trace_cli_makes_point_look_ups_only(hybrid_run: HybridRun) -> None:
    """Graph: no listing of /users without $filter, no delta; ConfigMgr: every read of users or
    memberships is a parameterised WHERE (the SQLite ODBC driver's Tracefile shows the SQL)."""
    backends = hybrid_run.backends
    workdir = backends.workdir
    sql_trace = workdir / "trace-odbc.log"
    config = workdir / "config-traced.yml"
    config.write_text(
        he.config_yaml(
            [backends.estate_yaml("hq", odbc_extra=f";Tracefile={sql_trace}")],
            state_file=hybrid_run.state_file,
            user_label="sam",
        )
    )
    sim = backends.graph.sim
    hq = backends.estates["hq"]
    for user in ("h.cuid.other", hq.entra_ids["h.enabled1"]):
        sql_trace.unlink(missing_ok=True)
        with sim.lock:
            mark = len(sim.log)
        run = run_trace([user, "--config.file", str(config), "--format", "json"], backends.env)
        assert run.code in (0, 1), run
        with sim.lock:
            requests = list(sim.log)[mark:]
        assert requests, "the trace made no Graph request"
        for record in requests:
            assert record.endpoint != "usersDelta", record
            if record.endpoint in ("users", "managedDevices"):
                assert "$filter" in record.query, f"unfiltered listing: {record.path}?{record.query}"
        statements = sql_statements(sql_trace)
        user_reads = [s for s in statements if re.search(r"\bv_R_User\b|\bUser_DISC\b", s, re.IGNORECASE)]
        member_reads = [
            s for s in statements if re.search(r"\bv_FullCollectionMembership\b", s, re.IGNORECASE)
        ]
        assert user_reads, statements
        for statement in user_reads + member_reads:
            assert re.search(r"\bWHERE\b", statement, re.IGNORECASE) and "?" in statement, statement
            assert "h.cuid" not in statement.lower() and "s-1-5-21" not in statement.lower(), statement
