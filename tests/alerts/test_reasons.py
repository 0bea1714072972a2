"""Every reason of both pipelines pages with its own action: promtool unit tests built from
exporter/pipelines/definitions.py and run against the shipped rules.

The expected descriptions are assembled here from the definitions (reason name and action), so a
reason missing from the generated template chain, or mapped to another reason's action, fails."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from alerts import generate
from exporter.pipelines.definitions import PIPELINES, Reason
from tests.conftest import require_executable

PROMETHEUS_HINT = "apt-get install -y --no-install-recommends prometheus prometheus-alertmanager"
JOB = generate.DEFAULT_JOB
INSTANCE = "exporter:9863"
RUNBOOK = generate.DEFAULTS.runbook_base_url
TOP = generate.DEFAULTS.stuck_top_reasons
FIRED_AT = "25m"  # well after `for:`


def every_reason() -> list[Reason]:
    """Each (stage, reason) pair once: pipelines share the identity stages' reasons."""
    seen: dict[tuple[str, str], Reason] = {}
    for definition in PIPELINES.values():
        for reason in definition.reasons:
            seen.setdefault((reason.stage, reason.name), reason)
    return list(seen.values())


def labels(**values: str) -> str:
    return ", ".join(
        f'{key}="{value}"' for key, value in {"job": JOB, "instance": INSTANCE, **values}.items()
    )


def series(metric: str, values: str, **label_values: str) -> dict[str, str]:
    return {"series": f"{metric}{{{labels(**label_values)}}}", "values": values}


def expected_alert(alertname: str, description: str, **label_values: str) -> dict[str, Any]:
    return {
        "exp_labels": {"severity": "warning", "job": JOB, "instance": INSTANCE, **label_values},
        "exp_annotations": {
            "summary": (
                "Users are stuck in the Intune provisioning pipeline."
                if alertname == "IntuneProvisioningUsersStuck"
                else "A user is stuck in the Intune provisioning pipeline."
            ),
            "description": description,
            "runbook_url": f"{RUNBOOK}#{alertname.lower()}",
        },
    }


def one_user_per_reason() -> dict[str, Any]:
    """An estate per reason, with one user stuck for that reason: both alerts must name the reason
    and its action."""
    inputs: list[dict[str, str]] = []
    per_stage: list[dict[str, Any]] = []
    per_user: list[dict[str, Any]] = []
    for reason in every_reason():
        estate = f"{reason.stage}-{reason.name}"
        stage = {"estate": estate, "provisioning_stage": reason.stage}
        user = f"user@{estate}.example"
        inputs += [
            series("intune_provisioning_stuck_users", "1x40", **stage),
            series("intune_provisioning_stuck_reason_users", "1x40", **stage, reason=reason.name),
            series("intune_provisioning_stuck_user_info", "1x40", **stage, reason=reason.name, user=user),
        ]
        # The other reasons of the stage are exported as 0 and must not be named.
        for other in every_reason():
            if other.stage == reason.stage and other.name != reason.name:
                inputs.append(
                    series("intune_provisioning_stuck_reason_users", "0x40", **stage, reason=other.name)
                )
        waited = (
            f"in estate {estate} have waited at stage {reason.stage} longer than its stuck_after threshold."
        )
        per_stage.append(
            expected_alert(
                "IntuneProvisioningUsersStuck",
                f"1 user(s) {waited} Top reasons: {reason.name} (1): {reason.action}",
                **stage,
            )
        )
        per_user.append(
            expected_alert(
                "IntuneProvisioningStuckUser",
                f"{user} in estate {estate} has waited at stage {reason.stage} longer than its stuck_after "
                f"threshold. Reason: {reason.name}. {reason.action}",
                **stage,
                reason=reason.name,
                user=user,
            )
        )
    return {
        "name": "every reason of both pipelines, with its action",
        "interval": "1m",
        "input_series": inputs,
        "alert_rule_test": [
            {"eval_time": FIRED_AT, "alertname": "IntuneProvisioningUsersStuck", "exp_alerts": per_stage},
            {"eval_time": FIRED_AT, "alertname": "IntuneProvisioningStuckUser", "exp_alerts": per_user},
        ],
    }


def most_frequent_reasons_first() -> dict[str, Any]:
    """Per stage with more reasons than the alert names: the most frequent, in order, and no more."""
    inputs: list[dict[str, str]] = []
    expected: list[dict[str, Any]] = []
    for definition in PIPELINES.values():
        for stage_name in definition.waiting_stages:
            reasons = definition.reasons_of(stage_name)
            if len(reasons) <= TOP:
                continue
            estate = f"{definition.name}-{stage_name}"
            stage = {"estate": estate, "provisioning_stage": stage_name}
            # Counts 1, 2, 3, ... in table order: the last reasons of the table are the most frequent.
            counts = {reason.name: index + 1 for index, reason in enumerate(reasons)}
            inputs.append(series("intune_provisioning_stuck_users", f"{sum(counts.values())}x40", **stage))
            for reason in reasons:
                inputs.append(
                    series(
                        "intune_provisioning_stuck_reason_users",
                        f"{counts[reason.name]}x40",
                        **stage,
                        reason=reason.name,
                    )
                )
            top = sorted(reasons, key=lambda reason: -counts[reason.name])[:TOP]
            named = " ".join(f"{reason.name} ({counts[reason.name]}): {reason.action}" for reason in top)
            expected.append(
                expected_alert(
                    "IntuneProvisioningUsersStuck",
                    f"{sum(counts.values())} user(s) in estate {estate} have waited at stage {stage_name} longer "
                    f"than its stuck_after threshold. Top reasons: {named}",
                    **stage,
                )
            )
    assert expected, "no stage has more reasons than the alert names: this case tests nothing"
    return {
        "name": f"the {TOP} most frequent reasons, most frequent first",
        "interval": "1m",
        "input_series": inputs,
        "alert_rule_test": [
            {"eval_time": FIRED_AT, "alertname": "IntuneProvisioningUsersStuck", "exp_alerts": expected}
        ],
    }


def run_promtool(tmp_path: Path, case: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    promtool = require_executable("promtool", PROMETHEUS_HINT)
    test_file = tmp_path / "reasons_test.yml"
    document = {"rule_files": [str(generate.RULES_FILE)], "evaluation_interval": "1m", "tests": [case]}
    test_file.write_text(yaml.safe_dump(document, sort_keys=False, width=1000), encoding="utf-8")
    return subprocess.run(
        [promtool, "test", "rules", str(test_file)], capture_output=True, text=True, timeout=120, check=False
    )


def test_every_pair_of_both_pipelines_is_covered() -> None:
    pairs = {(reason.stage, reason.name) for reason in every_reason()}
    for definition in PIPELINES.values():
        assert set(definition.stage_reason_pairs()) <= pairs
        assert {stage for stage, _ in definition.stage_reason_pairs()} == set(definition.waiting_stages)


@pytest.mark.component("prometheus")
def test_each_reason_pages_with_its_own_action(tmp_path: Path) -> None:
    result = run_promtool(tmp_path, one_user_per_reason())
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.component("prometheus")
def test_the_stage_alert_names_the_most_frequent_reasons_first(tmp_path: Path) -> None:
    result = run_promtool(tmp_path, most_frequent_reasons_first())
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.component("prometheus")
def test_a_wrong_action_fails_the_check(tmp_path: Path) -> None:
    """The check above is only worth something if promtool compares the whole description."""
    case = one_user_per_reason()
    first = case["alert_rule_test"][1]["exp_alerts"][0]["exp_annotations"]
    first["description"] = first["description"].replace("Reason:", "Reason is")
    result = run_promtool(tmp_path, case)
    assert result.returncode != 0
