"""Generate the Prometheus alert rules of intune-provisioning-exporter from one config block.

    python -m alerts.generate                    rewrite alerts/intune-provisioning.rules.yml and the
                                                 generated sections of docs/alerts.md and docs/runbooks.md
    python -m alerts.generate --check            exit 1 when a committed file differs from what this builds
    python -m alerts.generate --job intune --output DIR
                                                 render with another scrape job into DIR (the shipped files
                                                 are left alone); --set KEY=VALUE and --config FILE change
                                                 any other value of the config block, --with-tests also
                                                 renders the promtool unit tests for that job

Like a monitoring mixin, every value a deployment may need to change (the selector of the exporter's
series, the freshness gate, thresholds, `for:` durations, severities, the runbook URL) lives in
:class:`AlertsConfig` and nowhere else; the rules are built from it. Stage and reason names, and the
admin's next step for each reason, are imported from ``exporter.pipelines.definitions``.

The rules file is written by a small emitter of our own (PyYAML drops comments, and the comments say
why each rule is built as it is); every rendering is parsed back and compared with the data it was
built from, so the emitter cannot silently change a rule.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from exporter.pipelines.definitions import PIPELINES

ALERTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = ALERTS_DIR.parent
RULES_FILE_NAME = "intune-provisioning.rules.yml"
RULES_FILE = ALERTS_DIR / RULES_FILE_NAME
RULE_TESTS_DIR = ALERTS_DIR / "tests"
ALERTS_DOC = REPO_ROOT / "docs" / "alerts.md"
RUNBOOKS_DOC = REPO_ROOT / "docs" / "runbooks.md"

SEVERITIES = ("critical", "warning", "info")
# Sources whose data the stage model (stages, stuck users, reasons) is computed from, in either
# pipeline: hybrid_mdm reads ad, entra and configmgr; cloud reads ad, entra and intune_devices.
STAGE_SOURCES = ("ad", "entra", "configmgr", "intune_devices")
DEFAULT_JOB = "intune-provisioning-exporter"
# Errors of licenseAssignmentStates that Entra retries by itself (domain.md): never worth a page.
SELF_HEALING_LICENSE_ERRORS = ("LicenseAssignmentAttributeConcurrencyException",)


# --------------------------------------------------------------------------------------------------
# The config block


def _option(default: Any, help_text: str) -> Any:
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True)
class AlertsConfig:
    """Every value of the rules a deployment may want to change. Durations use Prometheus syntax."""

    # Which series are the exporter's.
    job_selector: str = _option(
        f'job="{DEFAULT_JOB}"',
        "Label matchers added to every selector of an exporter series and of `up` (PromQL syntax, "
        'e.g. `job="intune"` or `job="intune", env="prod"`). Must not be empty.',
    )
    runbook_base_url: str = _option(
        "https://github.com/intune-provisioning-exporter/intune-provisioning-exporter/blob/main/docs/runbooks.md",
        "Each alert's `runbook_url` is this plus `#<alertname in lower case>`.",
    )
    # The freshness gate.
    stale_after: str = _option(
        "15m",
        "A source whose last successful refresh is older than this holds back the alerts computed from "
        "its data (IntuneExporterSourceDown fires instead). About three refresh_interval.",
    )
    # Stuck users.
    stuck_for: str = _option("20m", "`for:` of IntuneProvisioningUsersStuck and IntuneProvisioningStuckUser.")
    stuck_keep_firing_for: str = _option(
        "10m", "`keep_firing_for:` of the stuck-user alerts (rides out an exporter restart)."
    )
    stuck_severity: str = _option("warning", "Severity of IntuneProvisioningUsersStuck.")
    stuck_user_severity: str = _option("warning", "Severity of IntuneProvisioningStuckUser.")
    stuck_top_reasons: int = _option(
        3, "How many reasons (with their counts and actions) IntuneProvisioningUsersStuck names."
    )
    # CloudUserID (hybrid_mdm).
    missing_cloud_user_id_window: str = _option(
        "1h", "IntuneUsersMissingCloudUserId: the backlog must not have emptied within this window..."
    )
    missing_cloud_user_id_for: str = _option("1h", "...and for this long (`for:`).")
    missing_cloud_user_id_severity: str = _option("warning", "Severity of IntuneUsersMissingCloudUserId.")
    mismatch_for: str = _option("30m", "`for:` of IntuneCloudUserIdMismatch.")
    mismatch_keep_firing_for: str = _option("10m", "`keep_firing_for:` of IntuneCloudUserIdMismatch.")
    mismatch_severity: str = _option("warning", "Severity of IntuneCloudUserIdMismatch.")
    # Entra Connect and ConfigMgr.
    sync_stale_warning_after: str = _option(
        "3h", "IntuneEntraConnectSyncStale (warning): last directory sync older than this."
    )
    sync_stale_critical_after: str = _option(
        "24h", "IntuneEntraConnectSyncStale (critical): last directory sync older than this."
    )
    sync_stale_for: str = _option("20m", "`for:` of IntuneEntraConnectSyncStale.")
    sync_disabled_for: str = _option("1h", "`for:` of IntuneEntraConnectSyncDisabled.")
    sync_disabled_severity: str = _option("warning", "Severity of IntuneEntraConnectSyncDisabled.")
    component_critical_for: str = _option(
        "30m", "`for:` of IntuneConfigMgrComponentUnhealthy on a critical component (severity warning)."
    )
    component_warning_for: str = _option(
        "1h", "`for:` of IntuneConfigMgrComponentUnhealthy on a component in warning (severity info)."
    )
    # Licences.
    license_nearly_exhausted_ratio: float = _option(
        0.9, "IntuneLicenseUnitsNearlyExhausted: assigned / enabled units at or above this (below 1)."
    )
    license_nearly_exhausted_for: str = _option("1h", "`for:` of IntuneLicenseUnitsNearlyExhausted.")
    license_exhausted_for: str = _option("30m", "`for:` of IntuneLicenseUnitsExhausted.")
    trial_expiry_within: str = _option(
        "14d", "IntuneLicenseSubscriptionExpiring (warning): a trial ends within this."
    )
    subscription_expiry_within: str = _option(
        "30d",
        "IntuneLicenseSubscriptionExpiring: a paid subscription in trouble (warning) or an active one "
        "(info) reaches its next lifecycle date within this.",
    )
    subscription_expiry_for: str = _option("1h", "`for:` of IntuneLicenseSubscriptionExpiring.")
    license_assignment_errors_for: str = _option("1h", "`for:` of IntuneLicenseAssignmentErrors.")
    license_assignment_errors_severity: str = _option("warning", "Severity of IntuneLicenseAssignmentErrors.")
    license_assignment_errors_ignored: tuple[str, ...] = _option(
        SELF_HEALING_LICENSE_ERRORS,
        "Licence assignment `error` values IntuneLicenseAssignmentErrors ignores (Entra retries these).",
    )
    # The exporter itself.
    source_down_for: str = _option("10m", "`for:` of IntuneExporterSourceDown.")
    source_down_severity: str = _option("warning", "Severity of IntuneExporterSourceDown.")
    source_errors_per_hour: int = _option(
        2, "IntuneExporterSourceErrors: more failed refreshes of one source and reason than this per hour."
    )
    source_errors_for: str = _option("15m", "`for:` of IntuneExporterSourceErrors.")
    source_errors_severity: str = _option("info", "Severity of IntuneExporterSourceErrors.")
    collector_failing_for: str = _option("15m", "`for:` of IntuneExporterCollectorFailing.")
    collector_failing_severity: str = _option("warning", "Severity of IntuneExporterCollectorFailing.")
    exporter_down_for: str = _option("5m", "`for:` of IntuneExporterDown.")
    exporter_down_severity: str = _option("critical", "Severity of IntuneExporterDown.")

    def __post_init__(self) -> None:
        problems = list(_config_problems(self))
        if problems:
            raise ValueError("invalid alert config: " + "; ".join(problems))

    def replace(self, **changes: Any) -> AlertsConfig:
        return dataclasses.replace(self, **changes)

    def runbook_url(self, alert: str) -> str:
        return f"{self.runbook_base_url}#{alert.lower()}"


# Alerts that must hold back on stale data: their `for:` must outlast the freshness gate, or a user
# who only looks stuck because the data froze could fire before the gate closes.
GATED_FOR_FIELDS = (
    "stuck_for",
    "mismatch_for",
    "missing_cloud_user_id_for",
    "sync_stale_for",
    "license_assignment_errors_for",
)
_MATCHER = r'\s*[A-Za-z_][A-Za-z0-9_]*\s*(=|!=|=~|!~)\s*"(?:[^"\\]|\\.)*"\s*'
_MATCHER_LIST = re.compile(rf"{_MATCHER}(,{_MATCHER})*")


def _config_problems(config: AlertsConfig) -> Iterable[str]:
    if not _MATCHER_LIST.fullmatch(config.job_selector):
        yield f'job_selector: {config.job_selector!r} is not a list of label matchers like job="name"'
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if item.type == "str" and (item.name.endswith(("_for", "_after", "_within", "_window"))):
            try:
                duration_seconds(value)
            except ValueError as error:
                yield f"{item.name}: {error}"
        if item.name.endswith("_severity") and value not in SEVERITIES:
            yield f"{item.name}: {value!r} is not one of {', '.join(SEVERITIES)}"
    if not 0 < config.license_nearly_exhausted_ratio < 1:
        yield "license_nearly_exhausted_ratio: must be between 0 and 1"
    if config.stuck_top_reasons < 1:
        yield "stuck_top_reasons: must be at least 1"
    try:
        gate = duration_seconds(config.stale_after)
        for name in GATED_FOR_FIELDS:
            if duration_seconds(getattr(config, name)) <= gate:
                yield f"{name}: must be longer than stale_after ({config.stale_after}), see docs/alerts.md"
        if duration_seconds(config.sync_stale_warning_after) >= duration_seconds(
            config.sync_stale_critical_after
        ):
            yield "sync_stale_warning_after: must be shorter than sync_stale_critical_after"
    except ValueError:
        pass  # reported above


_DURATION_PART = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


def duration_seconds(text: str) -> float:
    """Seconds in a Prometheus duration such as ``1h30m``."""
    parts = _DURATION_PART.findall(text) if isinstance(text, str) else []
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a Prometheus duration: {text!r}")
    return sum(int(number) * _UNIT_SECONDS[unit] for number, unit in parts)


DEFAULTS = AlertsConfig()


_WORDS = ((86400, "day"), (3600, "hour"), (60, "minute"), (1, "second"))


def humane(duration: str) -> str:
    """A duration in words for descriptions: 1h -> "an hour", 10m -> "10 minutes"."""
    seconds = int(duration_seconds(duration))
    parts = []
    for size, word in _WORDS:
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count} {word}{'s' if count > 1 else ''}")
    if parts == ["1 hour"]:
        return "an hour"
    return " ".join(parts) or "0 seconds"


def seconds_expr(duration: str) -> str:
    """A duration as a PromQL number a reader can check at a glance: 900, 3 * 3600, 14 * 86400."""
    seconds = int(duration_seconds(duration))
    if seconds % 86400 == 0 and seconds >= 2 * 86400:
        return f"{seconds // 86400} * 86400"
    if seconds % 3600 == 0 and seconds >= 3600:
        return f"{seconds // 3600} * 3600"
    return str(seconds)


# --------------------------------------------------------------------------------------------------
# Rules as data


@dataclass(frozen=True)
class Folded:
    """A YAML folded scalar (``>-``): the lines are joined with single spaces. Used for Go templates,
    where `{{-` and `-}}` then trim the joins that must not show."""

    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(self.lines)


@dataclass(frozen=True)
class Rule:
    body: dict[str, Any]
    comment: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return str(self.body.get("alert") or self.body.get("record"))


@dataclass(frozen=True)
class Group:
    name: str
    rules: tuple[Rule, ...]


class Series:
    """Selectors of the exporter's series, each carrying the config's job selector."""

    def __init__(self, config: AlertsConfig) -> None:
        self.config = config

    def __call__(self, metric: str, *matchers: str) -> str:
        return f"{metric}{{{', '.join([self.config.job_selector.strip(), *matchers])}}}"


def label(name: str, value: str, op: str = "=") -> str:
    """A label matcher such as trial="true"."""
    return f'{name}{op}"{value}"'


def alert(
    config: AlertsConfig,
    name: str,
    expr: str,
    *,
    for_: str,
    severity: str,
    summary: str,
    description: Sequence[str],
    keep_firing_for: str | None = None,
    comment: Sequence[str] = (),
) -> Rule:
    body: dict[str, Any] = {"alert": name, "expr": expr, "for": for_}
    if keep_firing_for is not None:
        body["keep_firing_for"] = keep_firing_for
    body["labels"] = {"severity": severity}
    body["annotations"] = {
        "summary": summary,
        "description": Folded(tuple(description)),
        "runbook_url": config.runbook_url(name),
    }
    return Rule(body, tuple(comment))


def block(*lines: str) -> str:
    """A multi-line PromQL expression (a YAML literal block ends with a newline)."""
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Reasons and actions, from the pipeline definitions


def stage_reason_actions() -> list[tuple[str, str, str]]:
    """(stage, reason, action) of every pipeline, each pair once. A pair names one action in every
    pipeline: the alert templates cannot tell the pipelines apart, only stage and reason."""
    actions: dict[tuple[str, str], str] = {}
    for definition in PIPELINES.values():
        for reason in definition.reasons:
            key = (reason.stage, reason.name)
            if actions.setdefault(key, reason.action) != reason.action:
                raise ValueError(
                    f"reason {reason.name} at stage {reason.stage} has different actions in different "
                    "pipelines; the alert templates can only tell them apart by stage and reason"
                )
    return [(stage, reason, action) for (stage, reason), action in actions.items()]


def action_chain(stage: str, reason: str, fallback: str) -> list[str]:
    """Go-template lines printing the action of the (stage, reason) the two template expressions
    hold, so Alertmanager shows it without any lookup."""
    lines = []
    for index, (stage_name, reason_name, action) in enumerate(stage_reason_actions()):
        keyword = "{{ if" if index == 0 else "{{- else if"
        lines.append(f'{keyword} and (eq {stage} "{stage_name}") (eq {reason} "{reason_name}") }}}}{action}')
    lines += [f"{{{{- else }}}}{fallback}", "{{- end }}"]
    return lines


def top_reasons_template(config: AlertsConfig) -> list[str]:
    """The stage's most frequent reasons with their counts and actions, read with the `query`
    template function from the same target (job, instance) and estate as the alert."""
    query = (
        f"sort_desc(topk({config.stuck_top_reasons}, intune_provisioning_stuck_reason_users"
        "{job=%q, instance=%q, estate=%q, provisioning_stage=%q} > 0))"
    )
    labels = "$labels.job $labels.instance $labels.estate $labels.provisioning_stage"
    return [
        f'{{{{ with query (printf "{query}" {labels}) -}}}}',
        "Top reasons:",
        "{{ range $i, $top := . -}}",
        "{{ if $i }} {{ end }}{{ $top.Labels.reason }} ({{ $top.Value }}):",
        *action_chain(
            "$top.Labels.provisioning_stage",
            "$top.Labels.reason",
            "see the exporter's /stuck page.",
        ),
        "{{- end }}",
        "{{- else -}}",
        "The exporter's /stuck page gives each user's reason and the next step.",
        "{{- end }}",
    ]


# --------------------------------------------------------------------------------------------------
# The rule groups


def recording_group(config: AlertsConfig) -> Group:
    series = Series(config)
    gate = int(duration_seconds(config.stale_after))
    stage_sources = label("source", "|".join(STAGE_SOURCES), "=~")
    return Group(
        "intune-provisioning.recording",
        (
            Rule(
                {
                    "record": "estate_source:intune_exporter_source_data_age:seconds",
                    "expr": f"time() - {series('intune_exporter_source_last_success_timestamp_seconds')}",
                },
                ("Seconds since the last successful refresh of each source (its data age).",),
            ),
            Rule(
                {
                    "record": "estate:intune_provisioning_data_stale:max",
                    "expr": block(
                        "max by (job, instance, estate) (",
                        f"  estate_source:intune_exporter_source_data_age:seconds{{{stage_sources}}}"
                        f" > bool {gate}",
                        ")",
                    ),
                },
                (
                    "1 when any source the stage model reads is stale, 0 when all are fresh. Gates every",
                    "alert computed from the stage metrics (both pipelines: an estate only has the sources",
                    "it is configured with).",
                ),
            ),
            Rule(
                {
                    "record": "estate_sku:intune_license_units_utilisation:ratio",
                    "expr": block(
                        series("intune_license_consumed_units"),
                        "/ ignoring (status)",
                        series("intune_license_prepaid_units", label("status", "enabled")),
                    ),
                },
                (
                    "Assigned / enabled units per SKU. +Inf when units are assigned but none is enabled",
                    "(every subscription of the SKU expired); NaN for a SKU with neither.",
                ),
            ),
        ),
    )


MISSING_CLOUD_USER_ID = "intune_provisioning_users_missing_cloud_user_id"
STALE_STAGE_DATA = "unless on (job, instance, estate) (estate:intune_provisioning_data_stale:max == 1)"


def source_stale(config: AlertsConfig, source: str) -> str:
    gate = int(duration_seconds(config.stale_after))
    return (
        "unless on (job, instance, estate)\n"
        f'  (estate_source:intune_exporter_source_data_age:seconds{{source="{source}"}} > {gate})'
    )


def pipeline_group(config: AlertsConfig) -> Group:
    series = Series(config)
    stuck_user_description = [
        "{{ $labels.user }} in estate {{ $labels.estate }} has waited at stage",
        "{{ $labels.provisioning_stage }} longer than its stuck_after threshold.",
        "{{ with $labels.reason -}}",
        "Reason: {{ . }}.",
        *action_chain(
            "$labels.provisioning_stage", "$labels.reason", "The exporter's /stuck page gives the next step."
        ),
        "{{- else -}}",
        "The exporter's /stuck page gives the reason and the next step.",
        "{{- end }}",
    ]
    return Group(
        "intune-provisioning.pipeline",
        (
            alert(
                config,
                "IntuneProvisioningUsersStuck",
                block(f"{series('intune_provisioning_stuck_users')} > 0", STALE_STAGE_DATA),
                for_=config.stuck_for,
                keep_firing_for=config.stuck_keep_firing_for,
                severity=config.stuck_severity,
                summary="Users are stuck in the Intune provisioning pipeline.",
                description=[
                    "{{ $value }} user(s) in estate {{ $labels.estate }} have waited at stage",
                    "{{ $labels.provisioning_stage }} longer than its stuck_after threshold.",
                    *top_reasons_template(config),
                ],
                comment=(
                    "Per estate and stage, for either pipeline: nothing here names a stage. The",
                    "description names the stage's most frequent reasons and what to do about each.",
                ),
            ),
            alert(
                config,
                "IntuneProvisioningStuckUser",
                block(f"{series('intune_provisioning_stuck_user_info')} > 0", STALE_STAGE_DATA),
                for_=config.stuck_for,
                keep_firing_for=config.stuck_keep_firing_for,
                severity=config.stuck_user_severity,
                summary="A user is stuck in the Intune provisioning pipeline.",
                description=stuck_user_description,
                comment=(
                    "One alert per stuck user, so a notification can name them, with the user's reason",
                    "(a label, so Alertmanager can route on it) and the admin's next step. The exporter",
                    "lists at most stuck_users_listed users per estate (the longest-waiting first); the",
                    "count of IntuneProvisioningUsersStuck is complete. A user whose reason changes is a",
                    "new series: the alert under the old reason resolves, the new one waits its `for:`.",
                ),
            ),
            alert(
                config,
                "IntuneUsersMissingCloudUserId",
                block(
                    f"min_over_time({series(MISSING_CLOUD_USER_ID, label('in_intune_collection', 'true'))}"
                    f"[{config.missing_cloud_user_id_window}]) > 0",
                    source_stale(config, "configmgr"),
                ),
                for_=config.missing_cloud_user_id_for,
                severity=config.missing_cloud_user_id_severity,
                summary="Intune collection members have no CloudUserID.",
                description=[
                    "The Intune collection of estate {{ $labels.estate }} has had members without a",
                    f"CloudUserID at every scrape for over {humane(config.missing_cloud_user_id_window)}"
                    " (at least {{ $value }} at a time): the Intune",
                    "connector is not enabling users.",
                ],
                comment=(
                    "Counts every ConfigMgr user record in an Intune collection, in the AD scope or not.",
                    "A new member legitimately waits a few minutes for the connector's delta sync, so the",
                    "alert wants the backlog never to have emptied for the window plus `for:`.",
                ),
            ),
            alert(
                config,
                "IntuneCloudUserIdMismatch",
                block(f"{series('intune_provisioning_cloud_user_id_mismatch_users')} > 0", STALE_STAGE_DATA),
                for_=config.mismatch_for,
                keep_firing_for=config.mismatch_keep_firing_for,
                severity=config.mismatch_severity,
                summary="ConfigMgr CloudUserIDs point at the wrong Entra ID users.",
                description=[
                    "{{ $value }} user(s) in estate {{ $labels.estate }} have a CloudUserID in ConfigMgr",
                    "that is not their Entra ID object id; Intune does not know them until it is corrected.",
                ],
            ),
        ),
    )


def directory_group(config: AlertsConfig) -> Group:
    series = Series(config)
    last_sync = series("intune_entra_connect_last_sync_timestamp_seconds")
    sync_enabled = series("intune_entra_connect_sync_enabled")
    sync_description = [
        "Entra ID last received a directory synchronisation for estate {{ $labels.estate }}",
        "{{ $value | humanizeDuration }} ago; new and changed AD users are not reaching Entra ID.",
    ]

    def sync_stale(after: str, severity: str, comment: Sequence[str]) -> Rule:
        return alert(
            config,
            "IntuneEntraConnectSyncStale",
            block(
                f"time() - {last_sync} > {seconds_expr(after)}",
                f"and on (job, instance, estate) ({sync_enabled} == 1)",
                source_stale(config, "entra_organization"),
            ),
            for_=config.sync_stale_for,
            severity=severity,
            summary="Entra Connect has not synchronised recently.",
            description=sync_description,
            comment=comment,
        )

    def component(status: int, for_: str, severity: str, word: str, comment: Sequence[str] = ()) -> Rule:
        return alert(
            config,
            "IntuneConfigMgrComponentUnhealthy",
            f"{series('intune_configmgr_component_status')} == {status}",
            for_=for_,
            severity=severity,
            summary="A ConfigMgr component of the Intune pipeline is unhealthy.",
            description=[
                "ConfigMgr component {{ $labels.component }} on site {{ $labels.site_code }} of estate",
                f"{{{{ $labels.estate }}}} reports status {word}.",
            ],
            comment=comment,
        )

    return Group(
        "intune-provisioning.directory",
        (
            sync_stale(
                config.sync_stale_warning_after,
                "warning",
                (
                    "Only for tenants that have directory sync enabled: a disabled sync is its own alert,",
                    "and its last sync date only gets older. Gated on the organization source, whose last",
                    "good read would otherwise make the sync look older and older during an outage.",
                ),
            ),
            sync_stale(
                config.sync_stale_critical_after,
                "critical",
                ("A day without sync also means leavers disabled in AD are still enabled in the cloud.",),
            ),
            alert(
                config,
                "IntuneEntraConnectSyncDisabled",
                f"{sync_enabled} == 0",
                for_=config.sync_disabled_for,
                severity=config.sync_disabled_severity,
                summary="Directory synchronisation is disabled in the tenant.",
                description=[
                    "The tenant of estate {{ $labels.estate }} reports directory synchronisation as",
                    "disabled: no AD user reaches Entra ID, ConfigMgr's connector or Intune until it is",
                    "enabled again.",
                ],
            ),
            component(
                2,
                config.component_critical_for,
                "warning",
                "critical",
                (
                    "ConfigMgr's component status is a tally of status messages since midnight, so it",
                    "stays red after the cause is gone; the stuck-user alerts are the symptoms worth",
                    "waking up for.",
                ),
            ),
            component(1, config.component_warning_for, "info", "warning"),
        ),
    )


LICENSE_ERROR_HINTS = (
    ("CountViolation", "The SKU has no free units: buy more or free some, then reprocess the assignments."),
    (
        "MutuallyExclusiveViolation",
        "The licence conflicts with another licence of the user: remove one of the two.",
    ),
    (
        "DependencyViolation",
        "A plan of the licence needs a plan the user does not have: assign that licence or plan first.",
    ),
    (
        "ProhibitedInUsageLocationViolation",
        "A plan is not offered in the user's usage location (or none is set): set usageLocation, "
        "then reprocess.",
    ),
    (
        "UniquenessViolation",
        "A plan needs a unique attribute (such as a proxy address) another object already holds: "
        "resolve the duplicate.",
    ),
)


def license_error_hint() -> list[str]:
    lines = []
    for index, (error, hint) in enumerate(LICENSE_ERROR_HINTS):
        keyword = "{{ if" if index == 0 else "{{- else if"
        lines.append(f'{keyword} eq $labels.error "{error}" }}}}{hint}')
    lines += [
        "{{- else }}Read the error on the users' licences in the Entra admin center, fix it and reprocess.",
        "{{- end }}",
    ]
    return lines


PAID_IN_TROUBLE = "warning|suspended|locked_out"


def licenses_group(config: AlertsConfig) -> Group:
    series = Series(config)
    ratio = "estate_sku:intune_license_units_utilisation:ratio"
    expiry = "intune_license_subscription_expiry_timestamp_seconds"
    paid_window = seconds_expr(config.subscription_expiry_within)
    ignored = "|".join(config.license_assignment_errors_ignored)
    error_matchers = [f'error!~"{ignored}"'] if ignored else []
    return Group(
        "intune-provisioning.licenses",
        (
            alert(
                config,
                "IntuneLicenseUnitsNearlyExhausted",
                block(f"{ratio} >= {config.license_nearly_exhausted_ratio:g}", f"and {ratio} < 1"),
                for_=config.license_nearly_exhausted_for,
                severity="warning",
                summary="License units are nearly exhausted.",
                description=[
                    "{{ $labels.sku_name }} ({{ $labels.sku }}) in estate {{ $labels.estate }} has",
                    "{{ $value | humanizePercentage }} of its enabled units assigned; new users cannot be",
                    "licensed once it reaches 100%.",
                ],
            ),
            alert(
                config,
                "IntuneLicenseUnitsExhausted",
                f"{ratio} >= 1",
                for_=config.license_exhausted_for,
                severity="critical",
                summary="No license units are left.",
                description=[
                    "{{ $labels.sku_name }} ({{ $labels.sku }}) in estate {{ $labels.estate }} has",
                    "{{ $value | humanizePercentage }} of its enabled units assigned; new assignments fail",
                    "until units are bought or freed.",
                ],
            ),
            alert(
                config,
                "IntuneLicenseSubscriptionExpiring",
                block(
                    f"{series(expiry, label('trial', 'true'), label('status', 'deleted', '!='))} - time()",
                    f"< {seconds_expr(config.trial_expiry_within)}",
                    "or",
                    series(expiry, label("trial", "false"), label("status", PAID_IN_TROUBLE, "=~")),
                    f"- time() < {paid_window}",
                ),
                for_=config.subscription_expiry_for,
                severity="warning",
                summary="A license subscription reaches its next lifecycle date soon.",
                description=[
                    '{{ if eq $labels.trial "true" -}}',
                    "Trial subscription {{ $labels.subscription_id }} ({{ $labels.sku }}) in estate",
                    "{{ $labels.estate }} ends in {{ $value | humanizeDuration }}; licenses assigned from it",
                    "stop working unless it is converted to a paid subscription.",
                    "{{- else -}}",
                    "Subscription {{ $labels.subscription_id }} ({{ $labels.sku }}) in estate",
                    "{{ $labels.estate }} is in status {{ $labels.status }}; its next lifecycle step is in",
                    "{{ $value | humanizeDuration }}.",
                    "{{- end }}",
                ],
                comment=(
                    "Trials end for good; a paid subscription in status warning (expired, in its grace",
                    "period) or worse takes its licenses away at the next step.",
                ),
            ),
            alert(
                config,
                "IntuneLicenseSubscriptionExpiring",
                block(
                    f"{series(expiry, label('trial', 'false'), label('status', 'enabled'))} - time()",
                    f"< {paid_window}",
                ),
                for_=config.subscription_expiry_for,
                severity="info",
                summary="A license subscription reaches its next lifecycle date soon.",
                description=[
                    "Subscription {{ $labels.subscription_id }} ({{ $labels.sku }}) in estate",
                    "{{ $labels.estate }} renews or ends in {{ $value | humanizeDuration }}; make sure it is",
                    "set to renew.",
                ],
                comment=("An active paid subscription's next lifecycle date is its renewal or its end.",),
            ),
            alert(
                config,
                "IntuneLicenseAssignmentErrors",
                block(
                    f"{series('intune_license_assignment_error_users', *error_matchers)} > 0",
                    source_stale(config, "entra"),
                ),
                for_=config.license_assignment_errors_for,
                severity=config.license_assignment_errors_severity,
                summary="Licence assignments fail for some users.",
                description=[
                    "{{ $value }} user(s) in estate {{ $labels.estate }} have had a failed assignment of",
                    "{{ $labels.sku }} ({{ $labels.error }}),",
                    '{{ if eq $labels.assigned_by "direct" }}assigned directly{{ else }}assigned by group',
                    "{{ $labels.assigned_by }}{{ end }},",
                    f"for over {humane(config.license_assignment_errors_for)}; without the licence they",
                    "get no Intune (or other) service.",
                    *license_error_hint(),
                ],
                comment=(
                    "Per SKU, error and assigning group: the group is where group-based licensing is fixed",
                    "and reprocessed. Errors Entra retries by itself are left out. The users come from the",
                    "entra source, so its stale data holds the alert back.",
                ),
            ),
        ),
    )


def exporter_group(config: AlertsConfig) -> Group:
    series = Series(config)
    gate = int(duration_seconds(config.stale_after))
    errors = series("intune_exporter_source_errors_total")
    up = series("up")
    return Group(
        "intune-provisioning.exporter",
        (
            alert(
                config,
                "IntuneExporterSourceDown",
                block(
                    f"{series('intune_exporter_source_up')} == 0",
                    "or",
                    f"estate_source:intune_exporter_source_data_age:seconds > {gate}",
                ),
                for_=config.source_down_for,
                severity=config.source_down_severity,
                summary="A data source of the exporter is failing.",
                description=[
                    "Source {{ $labels.source }} of estate {{ $labels.estate }} has had no successful",
                    f"refresh for over {humane(config.source_down_for)}. The metrics that need it keep the",
                    "values of its last good read, and the alerts computed from them are held back until",
                    "it recovers.",
                ],
                comment=(
                    "Down for a while, or no good data for stale_after (the same threshold that suspends the",
                    "stuck-user alerts, so they are never held back without this alert firing).",
                ),
            ),
            alert(
                config,
                "IntuneExporterSourceErrors",
                f"increase({errors}[1h]) > {config.source_errors_per_hour}",
                for_=config.source_errors_for,
                severity=config.source_errors_severity,
                summary="A data source of the exporter fails intermittently.",
                description=[
                    "Source {{ $labels.source }} of estate {{ $labels.estate }} failed about",
                    '{{ $value | printf "%.0f" }} refreshes in the last hour (reason {{ $labels.reason }}).',
                ],
                comment=(
                    "A source that recovers between failures keeps its data fresh enough to alert on, so",
                    "this is for information only.",
                ),
            ),
            alert(
                config,
                "IntuneExporterCollectorFailing",
                f"{series('intune_exporter_collector_success')} == 0",
                for_=config.collector_failing_for,
                severity=config.collector_failing_severity,
                summary="A collector of the exporter fails.",
                description=[
                    "The {{ $labels.collector }} collector of {{ $labels.instance }} fails on every scrape;",
                    "its metrics are missing and the alerts computed from them cannot fire.",
                ],
            ),
            alert(
                config,
                "IntuneExporterDown",
                block(f"{up} == 0", "or", f"absent({up})"),
                for_=config.exporter_down_for,
                severity=config.exporter_down_severity,
                summary="The Intune provisioning exporter cannot be scraped.",
                description=[
                    "{{ with $labels.instance -}}",
                    "Prometheus has failed to scrape {{ . }} (job {{ $labels.job }})",
                    f"for {humane(config.exporter_down_for)}",
                    "{{- else -}}",
                    "Prometheus has no target in job {{ $labels.job }}; check the scrape configuration and",
                    "service discovery",
                    "{{- end }}. No provisioning, sync or license alert can fire meanwhile.",
                ],
                comment=(
                    "Selects the scrape job with job_selector: a job with another name needs another",
                    "rendering (docs/alerts.md), or this alert reports the exporter as missing.",
                ),
            ),
        ),
    )


def rule_groups(config: AlertsConfig) -> list[Group]:
    return [
        recording_group(config),
        pipeline_group(config),
        directory_group(config),
        licenses_group(config),
        exporter_group(config),
    ]


# --------------------------------------------------------------------------------------------------
# The header of the rules file


def header(config: AlertsConfig) -> list[str]:
    stale = config.stale_after
    gate = int(duration_seconds(stale))
    return [
        "Prometheus rules for intune-provisioning-exporter.",
        "",
        "GENERATED by `python -m alerts.generate` from the config block in alerts/generate.py; do not edit.",
        "To change the job selector, the freshness gate, thresholds or severities, render your own copy:",
        "see docs/alerts.md (e.g. `python -m alerts.generate --job intune --output /etc/prometheus/rules`).",
        "",
        "Requires Prometheus >= 2.42 (keep_firing_for). Every alert carries a `severity` label",
        "(critical, warning or info) and the annotations summary, description and runbook_url; the",
        "runbooks are in docs/runbooks.md, one section per alert.",
        "",
        "Rendered with:",
        f"- job_selector {config.job_selector}: every selector of an exporter series (and `up` in",
        "  IntuneExporterDown) carries it, so the rules only read the exporter's own scrape job.",
        f"- stale_after {stale} ({gate} s): stage data counts as stale when a source it is computed from",
        f"  ({', '.join(STAGE_SOURCES)}) last refreshed successfully longer ago than that. That assumes",
        "  a refresh_interval of about a third of it (the default 5m fits 15m).",
        "",
        "Why the stuck-user alerts are gated on data age and not on intune_exporter_source_up == 0:",
        "- While a source is down the exporter keeps serving the stage metrics of its last good read,",
        "  and time keeps running, so users who in reality moved on look stuck (a user added to the",
        '  Intune collection during a ConfigMgr outage still looks "not in the collection"). Those must',
        "  not page; IntuneExporterSourceDown pages instead.",
        f"- The gate closes once any stage source has no successful refresh for {stale}, and every",
        "  gated alert needs a `for:` longer than that (the generator refuses anything else). An alert",
        f"  can therefore only fire if it held on data no older than {stale} for its whole `for:` window:",
        "  a user who looks stuck only because the data stopped moving goes pending at most, and the gate",
        "  resets that before it fires.",
        "- Gating on a single failed refresh (source_up == 0) would be wrong the other way round: a",
        "  source that fails one refresh in six (a busy site database timing out) would reset every",
        "  pending stuck alert of its estate and no stuck user would ever be paged.",
        f"- keep_firing_for: {config.stuck_keep_firing_for} keeps an already firing stuck alert through an"
        " exporter restart or a",
        '  few missed scrapes instead of sending "resolved" and paging again minutes later. Alerts that',
        "  are still firing when the gate closes stay firing for that long; Alertmanager's inhibit rules",
        "  (examples/alertmanager.yml) mute them while IntuneExporterSourceDown fires.",
    ]


# --------------------------------------------------------------------------------------------------
# YAML emitter


def _plain_or_quoted(value: str) -> str:
    """The value as a plain YAML scalar when that reads back as the same string, else double-quoted
    (JSON strings are valid YAML double-quoted scalars)."""
    if value and value == value.strip() and "\n" not in value:
        try:
            if yaml.safe_load(f"key: {value}") == {"key": value}:
                return value
        except yaml.YAMLError:
            pass
    return json.dumps(value, ensure_ascii=False)


def _emit_value(key: str, value: Any, indent: int, first_prefix: str) -> list[str]:
    pad = " " * indent
    head = f"{first_prefix}{key}:"
    if isinstance(value, Folded):
        return [f"{head} >-", *(f"{pad}  {line}" for line in value.lines)]
    if isinstance(value, dict):
        lines = [head]
        for child_key, child in value.items():
            lines += _emit_value(child_key, child, indent + 2, f"{pad}  ")
        return lines
    if isinstance(value, str) and "\n" in value:
        style = "|" if value.endswith("\n") and not value.endswith("\n\n") else "|-"
        body = value[:-1] if style == "|" else value
        return [f"{head} {style}", *(f"{pad}  {line}" if line else "" for line in body.split("\n"))]
    if isinstance(value, str):
        return [f"{head} {_plain_or_quoted(value)}"]
    return [f"{head} {value}"]


def plain_data(value: Any) -> Any:
    """What a YAML parser reads back from the emitted text."""
    if isinstance(value, Folded):
        return value.text
    if isinstance(value, dict):
        return {key: plain_data(child) for key, child in value.items()}
    if isinstance(value, list | tuple):
        return [plain_data(child) for child in value]
    return value


def groups_data(groups: Sequence[Group]) -> dict[str, Any]:
    return {"groups": [{"name": g.name, "rules": [plain_data(r.body) for r in g.rules]} for g in groups]}


def emit(groups: Sequence[Group], header_lines: Sequence[str]) -> str:
    lines = [f"# {line}".rstrip() for line in header_lines]
    lines += ["", "groups:"]
    for group_index, group in enumerate(groups):
        if group_index:
            lines.append("")
        lines += [f"  - name: {group.name}", "    rules:"]
        for rule_index, rule in enumerate(group.rules):
            if rule_index:
                lines.append("")
            lines += [f"      # {line}".rstrip() for line in rule.comment]
            for key_index, (key, value) in enumerate(rule.body.items()):
                prefix = "      - " if key_index == 0 else "        "
                lines += _emit_value(key, value, 8, prefix)
    text = "\n".join(lines) + "\n"
    if yaml.safe_load(text) != groups_data(groups):
        raise AssertionError("the YAML emitter changed a rule: fix alerts/generate.py")
    return text


def render_rules(config: AlertsConfig = DEFAULTS) -> str:
    return emit(rule_groups(config), header(config))


# --------------------------------------------------------------------------------------------------
# Rendering the promtool unit tests for another scrape job


def job_name(config: AlertsConfig) -> str:
    match = re.fullmatch(r'\s*job\s*=\s*"([^"\\]+)"\s*', config.job_selector)
    if not match:
        raise ValueError(
            f'the unit tests can only be rendered for a selector job="name", not {config.job_selector}'
        )
    return match.group(1)


def render_rule_test(text: str, config: AlertsConfig) -> str:
    """A promtool test file of alerts/tests/ (written for the defaults) for ``config``, which may
    differ from the defaults in its job and runbook URL only: their timings assume the default
    thresholds."""
    differing = [
        item.name
        for item in dataclasses.fields(config)
        if item.name not in ("job_selector", "runbook_base_url")
        and getattr(config, item.name) != getattr(DEFAULTS, item.name)
    ]
    if differing:
        raise ValueError(f"the unit tests assume the default {', '.join(differing)}")
    old, new = DEFAULT_JOB, job_name(config)
    rendered = text.replace(DEFAULTS.runbook_base_url, config.runbook_base_url)
    rendered = rendered.replace(f'job="{old}"', f'job="{new}"')
    rendered = re.sub(rf"\bjob: {re.escape(old)}\b", f"job: {new}", rendered)
    rendered = re.sub(rf"\bjob {re.escape(old)}\b", f"job {new}", rendered)
    # Every mention of the old job must have been rewritten (runbook URLs may name the project).
    leftover = rendered.replace(config.runbook_base_url, "")
    if old != new and re.search(rf"(?<![\w/.-]){re.escape(old)}(?![\w-])", _without_comments(leftover)):
        raise ValueError(f"a mention of job {old} in a rule test was not rewritten")
    return rendered


def _without_comments(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


def render_into(directory: Path, config: AlertsConfig, with_tests: bool) -> list[Path]:
    """Write the rules (and, with_tests, the unit tests beside them as in alerts/) into directory."""
    directory.mkdir(parents=True, exist_ok=True)
    written = [directory / RULES_FILE_NAME]
    written[0].write_text(render_rules(config), encoding="utf-8")
    if with_tests:
        tests_dir = directory / "tests"
        tests_dir.mkdir(exist_ok=True)
        for source in sorted(RULE_TESTS_DIR.glob("*.yml")):
            target = tests_dir / source.name
            target.write_text(render_rule_test(source.read_text(encoding="utf-8"), config), encoding="utf-8")
            written.append(target)
    return written


# --------------------------------------------------------------------------------------------------
# Generated documentation


def _markers(name: str) -> tuple[str, str]:
    return (
        f"<!-- BEGIN GENERATED {name} (python -m alerts.generate) -->",
        f"<!-- END GENERATED {name} -->",
    )


def replace_section(current: str, name: str, body: str) -> str:
    begin, end = _markers(name)
    start = current.index(begin) + len(begin)
    stop = current.index(end)
    return current[:start] + "\n\n" + body.strip() + "\n\n" + current[stop:]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def config_table() -> str:
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for item in dataclasses.fields(AlertsConfig):
        default = getattr(DEFAULTS, item.name)
        shown = ", ".join(default) if isinstance(default, tuple) else str(default)
        lines.append(f"| `{item.name}` | `{_cell(shown)}` | {_cell(item.metadata['help'])} |")
    return "\n".join(lines)


def alert_table(config: AlertsConfig = DEFAULTS) -> str:
    lines = ["| alert | severity | `for:` | summary |", "|---|---|---|---|"]
    for group in rule_groups(config):
        for rule in group.rules:
            if "alert" not in rule.body:
                continue
            body = rule.body
            link = f"[{body['alert']}](runbooks.md#{body['alert'].lower()})"
            cells = [link, body["labels"]["severity"], body["for"], body["annotations"]["summary"]]
            lines.append(f"| {' | '.join(cells)} |")
    return "\n".join(lines)


def reason_tables() -> str:
    parts = []
    for definition in PIPELINES.values():
        parts += [
            f"### Reasons of the `{definition.name}` pipeline",
            "",
            f"{definition.description}.",
            "",
            "| stage | reason | what to do |",
            "|---|---|---|",
        ]
        parts += [f"| `{r.stage}` | `{r.name}` | {_cell(r.action)} |" for r in definition.reasons]
        parts.append("")
    return "\n".join(parts)


def expected_files() -> dict[Path, str]:
    alerts_doc = ALERTS_DOC.read_text(encoding="utf-8")
    alerts_doc = replace_section(alerts_doc, "CONFIG TABLE", config_table())
    alerts_doc = replace_section(alerts_doc, "ALERT LIST", alert_table())
    runbooks = replace_section(RUNBOOKS_DOC.read_text(encoding="utf-8"), "REASON TABLES", reason_tables())
    return {RULES_FILE: render_rules(DEFAULTS), ALERTS_DOC: alerts_doc, RUNBOOKS_DOC: runbooks}


# --------------------------------------------------------------------------------------------------
# Command line


def _coerce(name: str, raw: Any) -> Any:
    item = next((f for f in dataclasses.fields(AlertsConfig) if f.name == name), None)
    if item is None:
        known = ", ".join(f.name for f in dataclasses.fields(AlertsConfig))
        raise ValueError(f"unknown key {name!r}; known keys: {known}")
    kind = item.type
    if kind == "tuple[str, ...]":
        values = raw if isinstance(raw, list) else ([] if raw in (None, "") else [raw])
        return tuple(str(value) for value in values)
    if kind == "int":
        return int(raw)
    if kind == "float":
        return float(raw)
    return str(raw)


def config_from(overrides: dict[str, Any]) -> AlertsConfig:
    return DEFAULTS.replace(**{name: _coerce(name, value) for name, value in overrides.items()})


def _parse_set(text: str) -> tuple[str, Any]:
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--set wants KEY=VALUE, got {text!r}")
    if value.strip().startswith("["):
        return name.strip(), yaml.safe_load(value)
    return name.strip(), value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate the alert rules of intune-provisioning-exporter")
    parser.add_argument("--check", action="store_true", help="only report shipped files that are out of date")
    parser.add_argument("--output", type=Path, help="render into this directory instead of alerts/")
    parser.add_argument("--job", help="shorthand for --set job_selector='job=\"JOB\"'")
    parser.add_argument("--config", type=Path, help="YAML mapping of config keys to change")
    parser.add_argument("--set", action="append", default=[], type=_parse_set, metavar="KEY=VALUE")
    parser.add_argument("--with-tests", action="store_true", help="with --output: render the unit tests too")
    args = parser.parse_args(argv)

    overrides: dict[str, Any] = {}
    if args.config:
        loaded = yaml.safe_load(args.config.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            parser.error(f"{args.config}: must be a mapping of config keys")
        overrides.update(loaded)
    if args.job:
        overrides["job_selector"] = f'job="{args.job}"'
    overrides.update(dict(args.set))
    try:
        config = config_from(overrides)
    except (ValueError, TypeError) as error:
        parser.error(str(error))

    if args.output is not None:
        try:
            written = render_into(args.output, config, args.with_tests)
        except ValueError as error:
            parser.error(str(error))
        for path in written:
            print(f"wrote: {path}")
        return 0
    if overrides:
        parser.error("rendering with other values needs --output DIR (the shipped files keep the defaults)")
    stale = []
    for path, text in expected_files().items():
        if path.exists() and path.read_text(encoding="utf-8") == text:
            continue
        stale.append(path)
        if not args.check:
            path.write_text(text, encoding="utf-8")
    for path in stale:
        print(f"{'stale' if args.check else 'wrote'}: {path}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
