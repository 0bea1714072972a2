"""The two provisioning chains as data: their stages, reasons and the admin's next step.

Everything that names a stage or a reason (the stage model, collectors, pages, the trace command,
config validation, dashboards, alerts and docs) reads it from here, so each fact is written once.
This module is plain data on purpose: importing it loads nothing else.

The order of ``stages`` is the order of the chain. The order of ``reasons`` is the order of the
contract's table: for a user who is not at the last stage, the FIRST reason of its stage whose
condition holds is its reason (the last reason of every stage is the "otherwise" row).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PipelineName = Literal["hybrid_mdm", "cloud"]
DEFAULT_PIPELINE: PipelineName = "hybrid_mdm"

HOUR = 3600.0
DAY = 86400.0


@dataclass(frozen=True)
class Reason:
    stage: str
    name: str
    action: str  # what the admin does next (one line, shown in /stuck, /trace, alerts)


@dataclass(frozen=True)
class PipelineDefinition:
    name: PipelineName
    stages: tuple[str, ...]
    reasons: tuple[Reason, ...]
    default_stuck_after: dict[str, float]
    description: str

    @property
    def waiting_stages(self) -> tuple[str, ...]:
        """Stages a user can be stuck at: every stage but the last."""
        return self.stages[:-1]

    @property
    def final_stage(self) -> str:
        return self.stages[-1]

    def reasons_of(self, stage: str) -> tuple[Reason, ...]:
        return tuple(r for r in self.reasons if r.stage == stage)

    def reason(self, name: str) -> Reason:
        for reason in self.reasons:
            if reason.name == name:
                return reason
        raise KeyError(name)

    def stage_reason_pairs(self) -> tuple[tuple[str, str], ...]:
        return tuple((r.stage, r.name) for r in self.reasons)


_IDENTITY_REASONS = (
    Reason(
        "ad_created",
        "entra_cloud_user_conflict",
        "A cloud-only Entra user blocks the hard/soft match: remove it or clear its immutable id, "
        "then run an Entra Connect sync.",
    ),
    Reason(
        "ad_created",
        "entra_sync_pending",
        "Entra Connect has not run since the user was created: check its scheduler, staging mode and "
        "export errors.",
    ),
    Reason(
        "ad_created",
        "entra_not_synced",
        "The user's OU or group is outside Entra Connect's sync scope, or a sync rule filters it: "
        "fix the scope or the rule.",
    ),
)

HYBRID_MDM = PipelineDefinition(
    name="hybrid_mdm",
    stages=(
        "ad_created",
        "entra_synced",
        "cm_discovered",
        "in_intune_collection",
        "connector_synced",
        "intune_enabled",
    ),
    reasons=(
        *_IDENTITY_REASONS,
        Reason(
            "entra_synced",
            "configmgr_stale_record",
            "The account was recreated and the old discovery record is stale: run AD User Discovery and "
            "delete the stale record.",
        ),
        Reason(
            "entra_synced",
            "configmgr_discovery_unhealthy",
            "AD User Discovery (SMS_AD_USER_DISCOVERY_AGENT) is critical: fix it (adusrdis.log).",
        ),
        Reason(
            "entra_synced",
            "configmgr_not_discovered",
            "Add the user's OU to AD User Discovery, or wait for delta discovery.",
        ),
        Reason(
            "cm_discovered",
            "intune_collection_removed",
            "The user was enabled once and has since left the Intune collection: add it back if it "
            "should have Intune.",
        ),
        Reason(
            "cm_discovered",
            "not_in_intune_collection",
            "Add the user to one of the Intune collections (the step admins forget).",
        ),
        Reason(
            "in_intune_collection",
            "upn_mismatch",
            "The connector looks users up by UPN (UserNotFound in cloudusersync.log): add and verify the "
            "UPN suffix in Entra, or fix the UPN.",
        ),
        Reason(
            "in_intune_collection",
            "entra_account_disabled",
            "The Entra account is blocked from sign-in (by an admin or a sync rule): unblock it.",
        ),
        Reason(
            "in_intune_collection",
            "connector_unhealthy",
            "The Intune connector (SMS_CLOUD_USERSYNC) is critical: fix it (cloudusersync.log).",
        ),
        Reason(
            "in_intune_collection",
            "connector_sync_pending",
            "Wait for the next connector cycle; if it persists, read cloudusersync.log.",
        ),
        Reason(
            "connector_synced",
            "cloud_user_id_other_user",
            "The record points at a different (often deleted-and-recreated) Entra account: remove the user "
            "from the collection, let the connector clear it, add it back.",
        ),
        Reason(
            "connector_synced",
            "cloud_user_id_unknown",
            "The Entra object was deleted or recreated: remove the user from the collection, let the "
            "connector clear CloudUserID, add it back.",
        ),
    ),
    default_stuck_after={
        "ad_created": 2 * HOUR,
        "entra_synced": 1 * HOUR,
        "cm_discovered": 4 * HOUR,
        "in_intune_collection": 1 * HOUR,
        "connector_synced": 1 * HOUR,
    },
    description="AD -> Entra ID -> ConfigMgr discovery -> Intune collection -> connector CloudUserID",
)

CLOUD = PipelineDefinition(
    name="cloud",
    stages=("ad_created", "entra_synced", "intune_licensed", "device_enrolled", "device_compliant"),
    reasons=(
        *_IDENTITY_REASONS,
        Reason(
            "entra_synced",
            "license_count_violation",
            "The Intune-granting SKU has no free units: buy more or remove unused assignments, then "
            "reprocess the user's licences.",
        ),
        Reason(
            "entra_synced",
            "license_usage_location_missing",
            "The user has no usage location (or one where the plan is not offered): set usageLocation, "
            "then reprocess the licences.",
        ),
        Reason(
            "entra_synced",
            "license_conflict",
            "The licence conflicts with another one or lacks a required plan: remove the conflicting "
            "licence or assign the dependency.",
        ),
        Reason(
            "entra_synced",
            "license_error_other",
            "The licence assignment failed: read the error on the user's licences in the Entra admin "
            "center and reprocess.",
        ),
        Reason(
            "entra_synced",
            "intune_plan_disabled",
            "The SKU is assigned with its Intune plan turned off: enable the Intune service plan in the "
            "assignment (or the group's licence options).",
        ),
        Reason(
            "entra_synced",
            "no_intune_license",
            "Assign an Intune-granting licence, directly or through the licensing group.",
        ),
        Reason(
            "intune_licensed",
            "entra_account_disabled",
            "The Entra account is blocked from sign-in: unblock it so the user can enroll.",
        ),
        Reason(
            "intune_licensed",
            "device_enrollment_pending",
            "The user has not enrolled a device yet: check enrollment restrictions and follow up with "
            "the user.",
        ),
        Reason(
            "device_enrolled",
            "device_stale",
            "Every device of the user stopped checking in: have the user sync or re-enroll; retire dead "
            "devices.",
        ),
        Reason(
            "device_enrolled",
            "device_noncompliant",
            "A device fails a compliance policy: read the device's compliance report and remediate.",
        ),
        Reason(
            "device_enrolled",
            "device_in_grace_period",
            "A device is in its compliance grace period: remediate before it turns noncompliant.",
        ),
        Reason(
            "device_enrolled",
            "device_compliance_unknown",
            "Compliance is not evaluated (unknown, conflict, error or owned by ConfigMgr): check policy "
            "assignment and the co-management compliance workload.",
        ),
    ),
    default_stuck_after={
        "ad_created": 2 * HOUR,
        "entra_synced": 1 * HOUR,
        "intune_licensed": 7 * DAY,
        "device_enrolled": 1 * DAY,
    },
    description="AD -> Entra ID -> Intune licence -> enrolled device -> compliant device",
)

PIPELINES: dict[str, PipelineDefinition] = {p.name: p for p in (HYBRID_MDM, CLOUD)}
PIPELINE_NAMES: tuple[PipelineName, ...] = ("hybrid_mdm", "cloud")

# Defaults of a cloud estate (CONTRACT.md, "Second pipeline profile").
DEFAULT_INTUNE_SERVICE_PLANS: tuple[str, ...] = ("INTUNE_A", "INTUNE_EDU", "INTUNE_SMBIZ", "INTUNE_A_VL")
DEFAULT_COMPLIANT_STATES: tuple[str, ...] = ("compliant",)
DEFAULT_DEVICE_STALE_AFTER = 30 * DAY
COMPLIANCE_STATES: tuple[str, ...] = (
    "unknown",
    "compliant",
    "noncompliant",
    "conflict",
    "error",
    "inGracePeriod",
    "configManager",
)


def pipeline(name: str) -> PipelineDefinition:
    return PIPELINES[name]


def all_stages() -> tuple[str, ...]:
    """Every stage name of every pipeline, each once, in chain order."""
    seen: dict[str, None] = {}
    for definition in PIPELINES.values():
        for stage in definition.stages:
            seen.setdefault(stage, None)
    return tuple(seen)
