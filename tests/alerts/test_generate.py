"""The rules are generated from one config block: the shipped file is the rendering with the defaults,
a rendering for another scrape job passes the same promtool tests, and bad values are refused."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml

from alerts import generate
from tests.alerts.support import REPO_ROOT, rule_test_files
from tests.conftest import require_executable

PROMETHEUS_HINT = "apt-get install -y --no-install-recommends prometheus prometheus-alertmanager"
OTHER_JOB = "intune"


def run(command: list[str], cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False, cwd=cwd)


def rules_of(text: str) -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(text)["groups"] for rule in group["rules"]]


def exporter_selectors(text: str) -> Iterator[tuple[str, promql_parser.VectorSelector]]:
    """(rule name, selector) of every selector in the rules that reads a series Prometheus scraped."""
    rules = rules_of(text)
    recorded = {rule["record"] for rule in rules if "record" in rule}
    for rule in rules:
        found: list[promql_parser.VectorSelector] = []

        def visit(node: Any, into: list[promql_parser.VectorSelector] = found) -> bool:
            if isinstance(node, promql_parser.VectorSelector):
                into.append(node)
            return True

        promql_parser.walk(promql_parser.parse(rule["expr"]), visit)
        for selector in found:
            if selector.name not in recorded:
                yield rule.get("alert") or rule["record"], selector


def job_matchers(selector: promql_parser.VectorSelector) -> list[str]:
    return [str(m.value) for m in selector.matchers.matchers if m.name == "job"]


# ------------------------------------------------------------------------------------- shipped files
def test_shipped_rules_and_docs_are_the_rendering_with_the_defaults() -> None:
    stale = [
        str(path.relative_to(REPO_ROOT))
        for path, text in generate.expected_files().items()
        if not path.exists() or path.read_text(encoding="utf-8") != text
    ]
    assert stale == [], f"stale generated files {stale}: run python -m alerts.generate"


def test_check_mode_reports_a_stale_file_and_never_rewrites_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rules = tmp_path / generate.RULES_FILE_NAME
    alerts_doc, runbooks = tmp_path / "alerts.md", tmp_path / "runbooks.md"
    for source, copy in (
        (generate.RULES_FILE, rules),
        (generate.ALERTS_DOC, alerts_doc),
        (generate.RUNBOOKS_DOC, runbooks),
    ):
        copy.write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
    monkeypatch.setattr(generate, "RULES_FILE", rules)
    monkeypatch.setattr(generate, "ALERTS_DOC", alerts_doc)
    monkeypatch.setattr(generate, "RUNBOOKS_DOC", runbooks)
    assert generate.main(["--check"]) == 0
    hand_edited = rules.read_text(encoding="utf-8").replace("> bool 900", "> bool 1800")
    rules.write_text(hand_edited, encoding="utf-8")
    assert generate.main(["--check"]) == 1
    assert rules.read_text(encoding="utf-8") == hand_edited
    assert generate.main([]) == 0
    assert generate.main(["--check"]) == 0


def test_every_exporter_selector_carries_the_job_selector() -> None:
    text = generate.RULES_FILE.read_text(encoding="utf-8")
    selectors = list(exporter_selectors(text))
    assert len(selectors) > 15
    for name, selector in selectors:
        assert job_matchers(selector) == [generate.DEFAULT_JOB], f"{name}: {selector}"


# ------------------------------------------------------------------------- another job, same tests
@pytest.fixture(scope="module")
def other_job_rendering(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The rules and their unit tests rendered for job="intune", by the documented command."""
    directory = tmp_path_factory.mktemp("rendered-for-another-job")
    command = [sys.executable, "-m", "alerts.generate", "--job", OTHER_JOB, "--output", str(directory)]
    result = run([*command, "--with-tests"])
    assert result.returncode == 0, result.stdout + result.stderr
    return directory


def test_rendering_for_another_job_selects_that_job_everywhere(other_job_rendering: Path) -> None:
    text = (other_job_rendering / generate.RULES_FILE_NAME).read_text(encoding="utf-8")
    assert f'"{generate.DEFAULT_JOB}"' not in text
    for name, selector in exporter_selectors(text):
        assert job_matchers(selector) == [OTHER_JOB], f"{name}: {selector}"
    # Only the job differs: the same rules otherwise.
    shipped = rules_of(generate.RULES_FILE.read_text(encoding="utf-8"))
    rendered = rules_of(text)
    as_default = json.loads(
        json.dumps(rendered).replace(f'job=\\"{OTHER_JOB}\\"', f'job=\\"{generate.DEFAULT_JOB}\\"')
    )
    assert as_default == shipped


def test_rule_tests_rendered_for_another_job_name_it_only(other_job_rendering: Path) -> None:
    for source in rule_test_files():
        rendered = (other_job_rendering / "tests" / source.name).read_text(encoding="utf-8")
        assert f'job="{OTHER_JOB}"' in rendered, source.name
        without_urls = rendered.replace(generate.DEFAULTS.runbook_base_url, "")
        assert f'job="{generate.DEFAULT_JOB}"' not in without_urls, source.name
        assert f"job: {generate.DEFAULT_JOB}" not in without_urls, source.name


@pytest.mark.component("prometheus")
def test_promtool_check_rules_on_the_rendering_for_another_job(other_job_rendering: Path) -> None:
    promtool = require_executable("promtool", PROMETHEUS_HINT)
    result = run([promtool, "check", "rules", str(other_job_rendering / generate.RULES_FILE_NAME)])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.component("prometheus")
@pytest.mark.parametrize("source", rule_test_files(), ids=lambda p: p.name)
def test_promtool_unit_tests_pass_on_the_rendering_for_another_job(
    other_job_rendering: Path, source: Path
) -> None:
    promtool = require_executable("promtool", PROMETHEUS_HINT)
    result = run([promtool, "test", "rules", str(other_job_rendering / "tests" / source.name)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.component("prometheus")
def test_the_shipped_rules_fail_the_tests_rendered_for_another_job(
    other_job_rendering: Path, tmp_path: Path
) -> None:
    """The rendered tests really depend on the job: against the default rules they must fail."""
    promtool = require_executable("promtool", PROMETHEUS_HINT)
    (tmp_path / generate.RULES_FILE_NAME).write_text(generate.render_rules(), encoding="utf-8")
    (tmp_path / "tests").mkdir()
    source = other_job_rendering / "tests" / "provisioning_test.yml"
    copy = tmp_path / "tests" / source.name
    copy.write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
    result = run([promtool, "test", "rules", str(copy)])
    assert result.returncode != 0, result.stdout


# --------------------------------------------------------------------------------------- other values
def test_rendering_with_other_values_changes_those_values(tmp_path: Path) -> None:
    overrides = tmp_path / "my-alerts.yml"
    overrides.write_text(
        "stale_after: 45m\nstuck_for: 1h\nmismatch_for: 1h\nsync_stale_for: 1h\n", encoding="utf-8"
    )
    command = [sys.executable, "-m", "alerts.generate", "--config", str(overrides), "--output", str(tmp_path)]
    result = run([*command, "--set", "stuck_user_severity=critical", "--set", "stuck_top_reasons=5"])
    assert result.returncode == 0, result.stdout + result.stderr
    rules = {
        (rule.get("alert") or rule["record"]): rule
        for rule in rules_of((tmp_path / generate.RULES_FILE_NAME).read_text(encoding="utf-8"))
    }
    assert "> bool 2700" in rules["estate:intune_provisioning_data_stale:max"]["expr"]
    assert rules["IntuneProvisioningStuckUser"]["for"] == "1h"
    assert rules["IntuneProvisioningStuckUser"]["labels"]["severity"] == "critical"
    assert rules["IntuneProvisioningUsersStuck"]["labels"]["severity"] == "warning"
    assert "topk(5," in rules["IntuneProvisioningUsersStuck"]["annotations"]["description"]
    assert rules["IntuneExporterSourceDown"]["expr"].rstrip().endswith("> 2700")


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"stale_after": "30m", "stuck_for": "20m"}, "stuck_for"),
        ({"license_assignment_errors_for": "10m"}, "license_assignment_errors_for"),
        ({"stale_after": "fifteen minutes"}, "stale_after"),
        ({"stuck_user_severity": "page"}, "stuck_user_severity"),
        ({"job_selector": ""}, "job_selector"),
        ({"job_selector": "job=intune"}, "job_selector"),
        ({"license_nearly_exhausted_ratio": 1.2}, "license_nearly_exhausted_ratio"),
        ({"sync_stale_warning_after": "2d"}, "sync_stale_warning_after"),
    ],
)
def test_values_that_would_break_the_rules_are_refused_naming_the_key(
    changes: dict[str, Any], key: str
) -> None:
    with pytest.raises(ValueError, match=key):
        generate.DEFAULTS.replace(**changes)


def test_cli_refuses_an_unknown_key_and_rendering_over_the_shipped_files(tmp_path: Path) -> None:
    unknown = run([sys.executable, "-m", "alerts.generate", "--set", "stale=1h", "--output", str(tmp_path)])
    assert unknown.returncode == 2 and "unknown key 'stale'" in unknown.stderr
    in_place = run([sys.executable, "-m", "alerts.generate", "--job", OTHER_JOB])
    assert in_place.returncode == 2 and "--output" in in_place.stderr
    assert not list(tmp_path.iterdir())


def test_unit_tests_are_only_rendered_for_default_thresholds(tmp_path: Path) -> None:
    config = generate.DEFAULTS.replace(job_selector=f'job="{OTHER_JOB}"', stuck_for="30m")
    with pytest.raises(ValueError, match="stuck_for"):
        generate.render_into(tmp_path, config, with_tests=True)


def test_every_config_key_is_documented_with_its_default() -> None:
    doc = generate.ALERTS_DOC.read_text(encoding="utf-8")
    for item in dataclasses.fields(generate.AlertsConfig):
        assert f"| `{item.name}` |" in doc, item.name
        assert item.metadata["help"], item.name


def test_emitter_refuses_text_it_cannot_write_faithfully() -> None:
    # A folded line that starts with a space would keep its line break: the round trip catches it.
    broken = generate.Group(
        "g",
        (generate.Rule({"alert": "X", "expr": "up", "annotations": {"d": generate.Folded(("a", " b"))}}),),
    )
    with pytest.raises(AssertionError, match="emitter"):
        generate.emit([broken], ["header"])
