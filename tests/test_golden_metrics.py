"""A golden /metrics: the whole exposition of the demo at a fixed seed and clock, checked in.

Any change to a metric name, label, help text or value shows up as a diff here; regenerate with
``python -m tests.golden.render`` after a deliberate change. promtool lints the file as Prometheus
would (naming, units, _total on counters, help text).
"""

from __future__ import annotations

import difflib
import subprocess

from tests.conftest import require_executable
from tests.golden.render import GOLDEN, promtool_form, render


def test_demo_exposition_matches_the_golden_file():
    expected = GOLDEN.read_text(encoding="utf-8")
    actual = render()
    if actual != expected:
        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(keepends=True), actual.splitlines(keepends=True), "golden", "now", n=1
            )
        )
        raise AssertionError(f"/metrics changed (python -m tests.golden.render to accept):\n{diff[:6000]}")


def test_golden_file_passes_promtool_check_metrics():
    promtool = require_executable("promtool", "apt-get install prometheus")
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=promtool_form(GOLDEN.read_text(encoding="utf-8")),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_golden_file_covers_every_contract_metric():
    text = GOLDEN.read_text(encoding="utf-8")
    for name in (
        "intune_provisioning_users",
        "intune_provisioning_stuck_users",
        "intune_provisioning_stage_oldest_entry_timestamp_seconds",
        "intune_provisioning_stuck_user_info",
        "intune_provisioning_stuck_reason_users",
        "intune_provisioning_users_missing_cloud_user_id",
        "intune_provisioning_cloud_user_id_mismatch_users",
        "intune_provisioning_orphan_users",
        "intune_provisioning_pipeline_info",
        "intune_entra_connect_sync_enabled",
        "intune_entra_connect_last_sync_timestamp_seconds",
        "intune_entra_provisioning_error_users",
        "intune_configmgr_component_status",
        "intune_license_prepaid_units",
        "intune_license_consumed_units",
        "intune_license_subscription_expiry_timestamp_seconds",
        "intune_license_assignment_error_users",
        "intune_devices",
        "intune_exporter_source_up",
        "intune_exporter_source_last_success_timestamp_seconds",
        "intune_exporter_source_refresh_duration_seconds",
        "intune_exporter_source_records",
        "intune_exporter_source_errors_total",
        "intune_exporter_build_info",
    ):
        assert f"\n{name}{{" in text or f"\n{name} " in text, name
