"""The shipped alert rules: valid, unit-tested with promtool, conventional, documented, and built on
metrics the exporter really exports."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from alerts import generate
from tests.alerts.support import (
    ALERTS_DIR,
    EXAMPLES_DIR,
    REPO_ROOT,
    RUNBOOK_BASE_URL,
    RUNBOOKS,
    alerting_rules,
    all_rules,
    duration_seconds,
    recording_rule_names,
    rule_files,
    rule_test_files,
    runbook_anchors,
)
from tests.conftest import require_executable

PROMETHEUS_HINT = "apt-get install -y --no-install-recommends prometheus prometheus-alertmanager"
# The alerts CONTRACT.md requires; checked against the contract itself when it is available.
CONTRACT_ALERTS = {
    "IntuneProvisioningUsersStuck",
    "IntuneProvisioningStuckUser",
    "IntuneUsersMissingCloudUserId",
    "IntuneCloudUserIdMismatch",
    "IntuneEntraConnectSyncStale",
    "IntuneConfigMgrComponentUnhealthy",
    "IntuneLicenseUnitsNearlyExhausted",
    "IntuneLicenseUnitsExhausted",
    "IntuneLicenseSubscriptionExpiring",
    "IntuneExporterSourceDown",
    "IntuneExporterDown",
}
CONTRACT_PATHS = (REPO_ROOT.parent / "shared" / "CONTRACT.md", REPO_ROOT / "docs" / "CONTRACT.md")
SEVERITIES = {"critical", "warning", "info"}
# Stage data older than this holds the stuck-user alerts back (see the rules file's header).
STALE_GATE_SECONDS = int(generate.duration_seconds(generate.DEFAULTS.stale_after))
STALE_GATES = (
    "estate:intune_provisioning_data_stale:max",
    "estate_source:intune_exporter_source_data_age:seconds",
)
EXPORTER_JOB = generate.DEFAULT_JOB
# Labels Prometheus attaches to every scraped series: the exporter's /metrics never shows them.
TARGET_LABELS = {"job", "instance"}


def run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False, cwd=REPO_ROOT)


def selectors(expr: str) -> Iterator[promql_parser.VectorSelector]:
    found: list[promql_parser.VectorSelector] = []

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            found.append(node)
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    yield from found


def matches(matcher: Any, value: str) -> bool:
    op = matcher.op
    if op == promql_parser.MatchOp.Equal:
        return bool(value == matcher.value)
    if op == promql_parser.MatchOp.NotEqual:
        return bool(value != matcher.value)
    found = re.fullmatch(matcher.value, value) is not None
    return found if op == promql_parser.MatchOp.Re else not found


# ---------------------------------------------------------------------------------------- promtool
def test_alerts_dir_holds_rule_files_only_under_the_rules_suffix() -> None:
    assert rule_files(), "no alerts/*.rules.yml"
    stray = sorted(p.name for p in ALERTS_DIR.glob("*.y*ml") if not p.name.endswith(".rules.yml"))
    assert not stray, f"rule files must be named *.rules.yml (examples/prometheus.yml globs them): {stray}"


@pytest.mark.component("prometheus")
@pytest.mark.parametrize("path", rule_files(), ids=lambda p: p.name)
def test_promtool_check_rules(path: Path) -> None:
    promtool = require_executable("promtool", PROMETHEUS_HINT)
    result = run([promtool, "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.component("prometheus")
@pytest.mark.parametrize("path", rule_test_files(), ids=lambda p: p.name)
def test_promtool_rule_unit_tests(path: Path) -> None:
    promtool = require_executable("promtool", PROMETHEUS_HINT)
    result = run([promtool, "test", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_unit_tested_firing_silent_and_resolving() -> None:
    """Each alert has a promtool case where it fires, one where it stays silent, and one where a
    firing alert goes away later in the same scenario."""
    fires: set[str] = set()
    silent: set[str] = set()
    resolves: set[str] = set()
    for path in rule_test_files():
        for case in yaml.safe_load(path.read_text(encoding="utf-8"))["tests"]:
            timeline: dict[str, list[tuple[float, set[frozenset[tuple[str, str]]]]]] = {}
            for check in case.get("alert_rule_test", []):
                expected = {
                    frozenset((k, str(v)) for k, v in alert.get("exp_labels", {}).items())
                    for alert in check.get("exp_alerts") or []
                }
                timeline.setdefault(check["alertname"], []).append(
                    (duration_seconds(check["eval_time"]), expected)
                )
            for name, checks in timeline.items():
                checks.sort(key=lambda item: item[0])
                if any(expected for _, expected in checks):
                    fires.add(name)
                if any(not expected for _, expected in checks):
                    silent.add(name)
                for i, (_, earlier) in enumerate(checks):
                    if any(earlier - later for _, later in checks[i + 1 :]):
                        resolves.add(name)
    names = {rule["alert"] for rule in alerting_rules()}
    assert names - fires == set(), "alerts never seen firing in alerts/tests"
    assert names - silent == set(), "alerts never checked to stay silent in alerts/tests"
    assert names - resolves == set(), "alerts never checked to resolve in alerts/tests"


# ------------------------------------------------------------------------------------- conventions
def test_every_contract_alert_exists() -> None:
    required = set(CONTRACT_ALERTS)
    contract = next((p for p in CONTRACT_PATHS if p.is_file()), None)
    if contract is not None:
        section = contract.read_text(encoding="utf-8").split("## Alert rules", 1)[-1]
        from_contract = set(re.findall(r"`(Intune[A-Za-z]+)`", section))
        assert from_contract, f"no alert names found in {contract}"
        required |= from_contract
    defined = {rule["alert"] for rule in alerting_rules()}
    assert required - defined == set()


@pytest.mark.parametrize("rule", alerting_rules(), ids=lambda r: f"{r['alert']}-{r['labels']['severity']}")
def test_alert_follows_the_mixin_conventions(rule: dict[str, Any]) -> None:
    assert re.fullmatch(r"Intune[A-Z][A-Za-z]+", rule["alert"])
    assert rule["labels"]["severity"] in SEVERITIES
    annotations = rule["annotations"]
    assert set(annotations) >= {"summary", "description", "runbook_url"}
    assert "{{" not in annotations["summary"], "summary is static text"
    assert "{{" in annotations["description"], "description names the estate/stage/user/value"
    assert annotations["runbook_url"] == f"{RUNBOOK_BASE_URL}#{rule['alert'].lower()}"


def test_every_runbook_url_anchor_exists_in_docs_runbooks() -> None:
    anchors = runbook_anchors()
    missing = {
        rule["annotations"]["runbook_url"]
        for rule in alerting_rules()
        if rule["annotations"]["runbook_url"].split("#", 1)[1] not in anchors
    }
    assert missing == set(), f"no such section in {RUNBOOKS.relative_to(REPO_ROOT)}"


def test_every_runbook_alert_section_names_an_alert() -> None:
    headings = re.findall(r"^## (Intune\w+) *$", RUNBOOKS.read_text(encoding="utf-8"), flags=re.MULTILINE)
    assert set(headings) == {rule["alert"] for rule in alerting_rules()}


def test_gated_alerts_wait_longer_than_the_staleness_gate() -> None:
    """A user who looks stuck only because a source froze must never fire: every alert held back on
    stale data needs a `for:` longer than the staleness threshold (see the rules file header)."""
    recording = {rule["record"]: rule["expr"] for rule in all_rules() if "record" in rule}
    assert f"> bool {STALE_GATE_SECONDS}" in recording["estate:intune_provisioning_data_stale:max"]
    gated = [rule for rule in alerting_rules() if any(gate in rule["expr"] for gate in STALE_GATES)]
    assert {rule["alert"] for rule in gated} >= {
        "IntuneProvisioningUsersStuck",
        "IntuneProvisioningStuckUser",
        "IntuneCloudUserIdMismatch",
        "IntuneUsersMissingCloudUserId",
        "IntuneEntraConnectSyncStale",
    }
    for rule in gated:
        if "unless" in rule["expr"]:
            assert duration_seconds(rule["for"]) > STALE_GATE_SECONDS, rule["alert"]
            assert f"> {STALE_GATE_SECONDS}" in rule["expr"] or "data_stale:max == 1" in rule["expr"]


# --------------------------------------------------------------------------- against the exporter
def test_every_selector_matches_a_series_of_the_demo_exporter(demo_metrics: str) -> None:
    """Every metric the rules read is exported, with label values the matchers can match (a typo in
    a metric or label value would otherwise just make an alert silently never fire)."""
    samples = [sample for family in text_string_to_metric_families(demo_metrics) for sample in family.samples]
    exported = {sample.name for sample in samples}
    recorded = recording_rule_names()
    problems = []
    for rule in all_rules():
        for selector in selectors(rule["expr"]):
            name = selector.name
            if name in recorded or name == "up":  # made by the rules / by Prometheus itself
                continue
            if name not in exported:
                problems.append(f"{rule.get('alert') or rule.get('record')}: {name} is not exported")
                continue
            wanted = [m for m in selector.matchers.matchers if m.name not in ("__name__", *TARGET_LABELS)]
            if not any(
                sample.name == name and all(matches(m, sample.labels.get(m.name, "")) for m in wanted)
                for sample in samples
            ):
                problems.append(f"{rule.get('alert') or rule.get('record')}: nothing matches {selector}")
    assert problems == []


def test_recording_rules_only_read_exporter_metrics_or_earlier_recordings() -> None:
    seen: set[str] = set()
    for rule in all_rules():
        if "record" not in rule:
            continue
        for selector in selectors(rule["expr"]):
            assert selector.name is not None
            assert selector.name.startswith("intune_") or selector.name in seen, rule["record"]
        seen.add(rule["record"])


# ---------------------------------------------------------------------------------------- examples
@pytest.mark.component("prometheus")
def test_example_prometheus_config_is_valid_and_loads_every_rule_file() -> None:
    promtool = require_executable("promtool", PROMETHEUS_HINT)
    result = run([promtool, "check", "config", str(EXAMPLES_DIR / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr
    for path in rule_files():
        assert str(path.relative_to(REPO_ROOT)) in result.stdout


def test_example_scrape_job_is_the_one_the_rules_select() -> None:
    config = yaml.safe_load((EXAMPLES_DIR / "prometheus.yml").read_text(encoding="utf-8"))
    assert [job["job_name"] for job in config["scrape_configs"]] == [EXPORTER_JOB]
    recorded = recording_rule_names()
    for rule in all_rules():
        for selector in selectors(rule["expr"]):
            if selector.name in recorded:
                continue  # recorded from selected series: they keep their job
            jobs = {
                (m.op == promql_parser.MatchOp.Equal, m.value)
                for m in selector.matchers.matchers
                if m.name == "job"
            }
            assert jobs == {(True, EXPORTER_JOB)}, f"{rule.get('alert') or rule.get('record')}: {selector}"


def test_no_alert_pins_a_stage_so_both_pipelines_are_covered() -> None:
    # The stuck-user alerts serve hybrid_mdm and cloud estates alike: a provisioning_stage matcher
    # would silently leave one pipeline's stages out.
    for rule in all_rules():
        for selector in selectors(rule["expr"]):
            pinned = [
                m.name for m in selector.matchers.matchers if m.name in ("provisioning_stage", "reason")
            ]
            assert pinned == [], f"{rule.get('alert') or rule.get('record')}: {selector}"


@pytest.mark.component("alertmanager")
def test_example_alertmanager_config_is_valid() -> None:
    amtool = require_executable("amtool", PROMETHEUS_HINT)
    result = run([amtool, "check-config", str(EXAMPLES_DIR / "alertmanager.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.component("alertmanager")
@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        (
            "alertname=IntuneProvisioningStuckUser estate=contoso provisioning_stage=cm_discovered "
            "user=anna@contoso.com severity=warning",
            "intune-provisioning-team",
        ),
        (
            "alertname=IntuneProvisioningUsersStuck estate=contoso provisioning_stage=ad_created "
            "severity=warning",
            "intune-provisioning-team",
        ),
        (
            "alertname=IntuneExporterSourceDown estate=contoso source=configmgr severity=warning",
            "monitoring-team",
        ),
        (
            "alertname=IntuneExporterDown job=intune-provisioning-exporter severity=critical",
            "monitoring-team",
        ),
        (
            "alertname=IntuneLicenseUnitsExhausted estate=contoso sku=SPE_E5 severity=critical",
            "intune-admins",
        ),
        ("alertname=IntuneConfigMgrComponentUnhealthy estate=contoso severity=info", "null"),
    ],
)
def test_example_alertmanager_routes(labels: str, receiver: str) -> None:
    amtool = require_executable("amtool", PROMETHEUS_HINT)
    command = [amtool, "config", "routes", "test", f"--config.file={EXAMPLES_DIR / 'alertmanager.yml'}"]
    result = run([*command, f"--verify.receivers={receiver}", *labels.split()])
    assert result.returncode == 0, result.stdout + result.stderr


def test_example_alertmanager_groups_stuck_pages_by_estate_and_stage() -> None:
    config = yaml.safe_load((EXAMPLES_DIR / "alertmanager.yml").read_text(encoding="utf-8"))
    stuck_routes = [
        route
        for route in config["route"]["routes"]
        if any("IntuneProvisioningStuckUser" in matcher for matcher in route.get("matchers", []))
    ]
    assert len(stuck_routes) == 1
    assert stuck_routes[0]["group_by"] == ["alertname", "estate", "provisioning_stage"]
