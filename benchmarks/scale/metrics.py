"""Reading the exporter's /metrics: source status, and the check against the ground truth."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from benchmarks.scale.estate import REASONS, STAGES, Truth

Labels = dict[str, str]


@dataclass(frozen=True)
class SourceStatus:
    up: bool
    last_success: float  # 0: never
    duration: float
    records: float


class Scrape:
    """One parsed /metrics body."""

    def __init__(self, text: str) -> None:
        self.samples: dict[str, list[tuple[Labels, float]]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))

    def values(self, name: str, **labels: str) -> list[float]:
        return [
            v for found, v in self.samples.get(name, ()) if all(found.get(k) == x for k, x in labels.items())
        ]

    def value(self, name: str, **labels: str) -> float | None:
        values = self.values(name, **labels)
        return values[0] if len(values) == 1 else None

    def has(self, name: str) -> bool:
        return name in self.samples

    def sources(self, estate: str) -> dict[str, SourceStatus]:
        found: dict[str, SourceStatus] = {}
        for labels, up in self.samples.get("intune_exporter_source_up", ()):
            if labels.get("estate") != estate:
                continue
            source = labels["source"]
            found[source] = SourceStatus(
                up=up == 1,
                last_success=self.value(
                    "intune_exporter_source_last_success_timestamp_seconds", estate=estate, source=source
                )
                or 0.0,
                duration=self.value(
                    "intune_exporter_source_refresh_duration_seconds", estate=estate, source=source
                )
                or 0.0,
                records=self.value("intune_exporter_source_records", estate=estate, source=source) or 0.0,
            )
        return found


def fetch(url: str, timeout: float = 30.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body: bytes = response.read()
    return body.decode("utf-8")


def try_fetch(url: str, timeout: float = 5.0) -> tuple[int | None, str]:
    """(status, body); status None when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except OSError:
        return None, ""


# ------------------------------------------------------------------------------------ checks
@dataclass
class CheckResult:
    label: str
    checked: int = 0
    mismatches: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    after_seconds: float = 0.0  # how long after the event the counts matched (the evaluation lag)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def expect(self, what: str, actual: float | None, least: int, most: int | None = None) -> None:
        most = least if most is None else most
        self.checked += 1
        if actual is None or not least <= actual <= most:
            wanted = str(least) if least == most else f"{least}..{most}"
            self.mismatches.append(f"{what}: got {_number(actual)}, expected {wanted}")

    def summary(self) -> str:
        if self.ok:
            lag = f", matched after {self.after_seconds:.1f}s" if self.after_seconds >= 0.05 else ""
            return f"{self.label}: OK ({self.checked} values exact{lag})"
        return f"{self.label}: {len(self.mismatches)} of {self.checked} values differ"


def _number(value: float | None) -> str:
    if value is None:
        return "absent"
    return str(int(value)) if value == int(value) else f"{value:g}"


def check_truth(scrape: Scrape, truth: Truth, estate: str, label: str, *, settled: bool) -> CheckResult:
    """Compare every count the ground truth knows with the scrape.

    ``settled``: the exporter has evaluated the estate at least once after first seeing every user
    at its current stage, so users of the stages without evidence (stuck_after 0s) count as stuck.
    """
    result = CheckResult(label)
    for stage in STAGES:
        users = scrape.value("intune_provisioning_users", estate=estate, provisioning_stage=stage)
        result.expect(f"users{{{stage}}}", users, truth.users[stage])
        if stage in REASONS:
            least, most = truth.stuck(stage, settled)
            stuck = scrape.value("intune_provisioning_stuck_users", estate=estate, provisioning_stage=stage)
            result.expect(f"stuck_users{{{stage}}}", stuck, least, most)
    _check_reasons(scrape, truth, estate, settled, result)
    for in_collection in ("true", "false"):
        result.expect(
            f"missing_cloud_user_id{{in_intune_collection={in_collection}}}",
            scrape.value(
                "intune_provisioning_users_missing_cloud_user_id",
                estate=estate,
                in_intune_collection=in_collection,
            ),
            truth.missing_cloud_user_id[in_collection],
        )
    result.expect(
        "cloud_user_id_mismatch",
        scrape.value("intune_provisioning_cloud_user_id_mismatch_users", estate=estate),
        truth.cloud_user_id_mismatch,
    )
    for source, count in truth.orphans.items():
        orphans = scrape.value("intune_provisioning_orphan_users", estate=estate, source=source)
        result.expect(f"orphan_users{{{source}}}", orphans, count)
    for source, count in truth.records.items():
        records = scrape.value("intune_exporter_source_records", estate=estate, source=source)
        result.expect(f"source_records{{{source}}}", records, count)
    for category, count in truth.provisioning_errors.items():
        errors = scrape.value("intune_entra_provisioning_error_users", estate=estate, category=category)
        result.expect(f"provisioning_error_users{{{category}}}", errors, count)
    unlicensed = "intune_provisioning_enabled_users_without_intune_license"
    if scrape.has(unlicensed):
        result.expect(
            unlicensed, scrape.value(unlicensed, estate=estate), truth.enabled_without_intune_license
        )
    return result


def _check_reasons(scrape: Scrape, truth: Truth, estate: str, settled: bool, result: CheckResult) -> None:
    name = "intune_provisioning_stuck_reason_users"
    if not scrape.has(name):
        result.notes.append(f"{name} is not exported by this exporter: reasons not checked")
        return
    for key, counts in truth.reasons.items():
        stage, reason = key.split("/")
        value = scrape.value(name, estate=estate, provisioning_stage=stage, reason=reason)
        settling = counts["settling"]
        least = counts["stuck"] + (settling if settled else 0)
        result.expect(f"stuck_reason_users{{{stage},{reason}}}", value, least, counts["stuck"] + settling)


def all_refreshed_after(statuses: dict[str, SourceStatus], kinds: Iterable[str], moment: float) -> bool:
    return all(kind in statuses and statuses[kind].last_success > moment for kind in kinds)
