"""One user, explained: the evidence of every step of the chain and a one-line detail of its reason.

Used by ``/stuck``, ``/trace`` and the ``trace`` command alike, on an :class:`Evaluation`. Texts name
the records and keys an administrator would otherwise look up in SQL, Graph or the logs.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from exporter.columns import I64, text_key
from exporter.durations import format_duration
from exporter.model import (
    AdTable,
    CmTable,
    DeviceTable,
    EntraTable,
    OrganizationData,
    ad_guid_text,
    guid_text_of,
)
from exporter.pipelines.cloud import Devices, Licensing, licence_problems
from exporter.pipelines.evaluation import Evaluation
from exporter.pipelines.hybrid import AD_USER_DISCOVERY, CLOUD_USER_SYNC
from exporter.pipelines.identity import conflicting_entra_row
from exporter.pipelines.licensing import ACTIVE_STATES, intune_plan_ids
from exporter.tables import Table


@dataclass(frozen=True)
class Step:
    stage: str
    done: bool
    evidence: str


@dataclass(frozen=True)
class UserExplanation:
    estate: str
    pipeline: str
    sam: str
    upn: str | None
    object_guid: str
    object_sid: str
    stage: str
    reason: str | None
    stuck: bool
    entered: float
    waiting: float
    stuck_after: float | None
    steps: tuple[Step, ...]
    detail: str
    action: str | None

    def document(self) -> dict[str, Any]:
        """The contract's trace JSON."""
        return {
            "estate": self.estate,
            "pipeline": self.pipeline,
            "user": {
                "sam": self.sam,
                "upn": self.upn,
                "object_guid": self.object_guid,
                "object_sid": self.object_sid,
            },
            "stage": self.stage,
            "reason": self.reason,
            "stuck": self.stuck,
            "entered_stage_at": iso(self.entered),
            "waiting_seconds": round(max(0.0, self.waiting), 1),
            "stuck_after_seconds": self.stuck_after,
            "steps": [{"stage": s.stage, "done": s.done, "evidence": s.evidence} for s in self.steps],
            "detail": self.detail,
            "action": self.action,
        }


def iso(ts: float | None) -> str | None:
    """ISO 8601 UTC text of POSIX seconds; None for unknown (or absurd) times."""
    if ts is None or ts != ts:
        return None
    try:
        return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    except (OverflowError, OSError, ValueError):
        return None


def short(text: str, keep: int = 8) -> str:
    return text if len(text) <= keep else text[:keep] + "…"


def child_rows(table: Table, child: str, row: int) -> I64:
    """Rows of a child table (e.g. licence states) that belong to one parent row."""
    entries = table.children[child]

    def build() -> tuple[Any, Any]:
        parents = entries.array("row")
        order = np.argsort(parents, kind="stable")
        return parents[order], order

    parents, order = table.cached(f"child:{child}", build)
    low, high = np.searchsorted(parents, row, "left"), np.searchsorted(parents, row, "right")
    return np.asarray(order[low:high], dtype=np.int64)


def explain(evaluation: Evaluation, row: int, now: float, estate: str) -> UserExplanation:
    """Everything the pages and the trace command say about one in-scope AD user."""
    ad = evaluation.ad
    definition = evaluation.definition
    stage_index = int(evaluation.stage[row])
    reason = evaluation.reason_name(row)
    explainer = (
        _HybridExplainer(evaluation, row)
        if definition.name == "hybrid_mdm"
        else _CloudExplainer(evaluation, row, now)
    )
    evidence = explainer.evidence()
    steps = tuple(
        Step(stage, index <= stage_index, evidence[index]) for index, stage in enumerate(definition.stages)
    )
    entered = float(evaluation.entered[row])
    stage = definition.stages[stage_index]
    return UserExplanation(
        estate=estate,
        pipeline=definition.name,
        sam=ad.text("sam", row) or "",
        upn=ad.text("upn", row),
        object_guid=ad_guid_text(bytes(ad.array("guid")[row].tobytes())),
        object_sid=ad.text("sid", row) or "",
        stage=stage,
        reason=reason,
        stuck=evaluation.is_stuck(row, now),
        entered=entered,
        waiting=now - entered,
        stuck_after=evaluation.settings.stuck_after.get(stage),
        steps=steps,
        detail=explainer.detail(reason) if reason else f"{ad.text('sam', row)} has completed the chain",
        action=definition.reason(reason).action if reason else None,
    )


# ---------------------------------------------------------------------------- shared identity part
class _Identity:
    def __init__(self, evaluation: Evaluation, row: int) -> None:
        self.evaluation = evaluation
        self.row = row
        self.ad: AdTable = evaluation.ad
        assert evaluation.data.entra is not None
        self.entra: EntraTable = evaluation.data.entra
        self.organization: OrganizationData | None = evaluation.data.organization
        self.e = int(evaluation.placement.links["entra"][row])

    @property
    def sam(self) -> str:
        return self.ad.text("sam", self.row) or ""

    def immutable_id(self) -> str:
        return base64.b64encode(self.ad.blob("anchor").raw(self.row) or b"").decode("ascii")

    def account(self) -> str:
        created = iso(float(self.ad.array("created")[self.row]))
        upn = self.ad.text("upn", self.row) or "none"
        return (
            f"AD account {self.ad.netbios_domain}\\{self.sam} (UPN {upn}, "
            f"objectSid {self.ad.text('sid', self.row)}, created {created or 'unknown'})"
        )

    def entra_user(self, entra_row: int) -> str:
        return f"{self.entra.text('upn', entra_row) or '(no UPN)'} (id {self.entra.id_text(entra_row)})"

    def synced(self) -> str:
        if self.e < 0:
            return (
                f"no synced Entra user has onPremisesImmutableId {self.immutable_id()} or "
                f"onPremisesSecurityIdentifier {self.ad.text('sid', self.row)}"
            )
        by = (
            f"onPremisesImmutableId {self.immutable_id()}"
            if self.entra.text("imm", self.e) == self.immutable_id()
            else f"onPremisesSecurityIdentifier {self.ad.text('sid', self.row)}"
        )
        created = iso(float(self.entra.array("created")[self.e]))
        return f"synced Entra user {self.entra_user(self.e)} matched by {by}, created {created or 'unknown'}"

    def synced_namesake(self) -> str:
        """A synced Entra user with this UPN that did not match: bound to another (often an earlier,
        deleted) AD account, which is why this one is not synced."""
        for other in self.entra.index("k_upn").rows_with(int(self.ad.array("k_upn")[self.row])):
            if self.entra.array("synced")[other]:
                bound = self.entra.text("imm", int(other)) or self.entra.text("sid", int(other))
                return (
                    f"; synced Entra user {self.entra_user(int(other))} has this UPN but belongs to "
                    f"another AD account (onPremisesImmutableId/SID {bound or 'null'})"
                )
        return ""

    def identity_detail(self, reason: str) -> str | None:
        if reason == "entra_cloud_user_conflict":
            found = conflicting_entra_row(self.ad, self.entra, self.row)
            if found is None:
                return "a cloud-only Entra user holds this user's identifiers"
            other, what = found
            value = {
                "immutable id": self.immutable_id(),
                "SID": self.ad.text("sid", self.row),
                "UPN": self.ad.text("upn", self.row),
            }[what]
            return (
                f"cloud-only Entra user {self.entra_user(other)} (onPremisesSyncEnabled not true) "
                f"has this user's {what} {value}"
            )
        if reason == "entra_sync_pending":
            last = self.organization.last_sync if self.organization else None
            return (
                f"Entra Connect last synced {iso(last)}, before the account was created "
                f"{iso(float(self.ad.array('created')[self.row]))}"
            )
        if reason == "entra_not_synced":
            last = self.organization.last_sync if self.organization else None
            when = f"; Entra Connect last synced {iso(last)}" if last is not None else ""
            return (
                f"no synced Entra user has onPremisesImmutableId {self.immutable_id()} or "
                f"onPremisesSecurityIdentifier {self.ad.text('sid', self.row)}, and no cloud-only user has "
                f"them or UPN {self.ad.text('upn', self.row)}{self.synced_namesake()}{when}"
            )
        if reason == "entra_account_disabled" and self.e >= 0:
            return f"Entra user {self.entra_user(self.e)} has accountEnabled false"
        return None


# ---------------------------------------------------------------------------- hybrid_mdm
class _HybridExplainer(_Identity):
    def __init__(self, evaluation: Evaluation, row: int) -> None:
        super().__init__(evaluation, row)
        assert evaluation.data.configmgr is not None
        self.cm: CmTable = evaluation.data.configmgr
        self.c = int(evaluation.placement.links["configmgr"][row])

    def record(self, cm_row: int) -> str:
        sid = self.cm.text("sid", cm_row)
        sid_text = f", SID …-{sid.rsplit('-', 1)[-1]}" if sid else ""
        return (
            f"ConfigMgr record {self.cm.text('name', cm_row) or '(no name)'} "
            f"(ResourceID {int(self.cm.array('resource_id')[cm_row])}{sid_text})"
        )

    def matched_by(self) -> str:
        ad, cm, row, c = self.ad, self.cm, self.row, self.c
        if cm.array("k_sid")[c] == ad.array("k_sid")[row] and cm.array("k_sid")[c]:
            return f"SID0 {ad.text('sid', row)}"
        if cm.array("k_guid")[c] == ad.array("k_guid")[row] and cm.array("k_guid")[c]:
            return f"Object_GUID0 {{{ad_guid_text(bytes(ad.array('guid')[row].tobytes()))}}}"
        return f"Unique_User_Name0 {ad.netbios_domain}\\{self.sam}"

    def collections(self) -> str:
        return ", ".join(self.cm.collection_ids) or "(none configured)"

    def evidence(self) -> list[str]:
        cm, c = self.cm, self.c
        steps = [self.account(), self.synced()]
        if c < 0:
            steps.append(
                f"no ConfigMgr record has SID0 {self.ad.text('sid', self.row)}, Object_GUID0 "
                f"{{{ad_guid_text(bytes(self.ad.array('guid')[self.row].tobytes()))}}} or Unique_User_Name0 "
                f"{self.ad.netbios_domain}\\{self.sam}"
            )
            steps += ["no ConfigMgr record"] * 3
            return steps
        created = iso(float(cm.array("created")[c]))
        steps.append(f"{self.record(c)} matched by {self.matched_by()}, discovered {created or 'unknown'}")
        member_of = cm.collections_of(c)
        steps.append(
            f"member of {', '.join(member_of)}" if member_of else f"not a member of {self.collections()}"
        )
        cloud = cm.cloud_text(c)
        steps.append(f"CloudUserID {cloud}" if cloud else "CloudUserID is null")
        if cloud is None:
            steps.append("no CloudUserID to compare")
        elif self.e < 0:
            steps.append(f"CloudUserID {cloud}, but no synced Entra user matched")
        elif cloud == self.entra.id_text(self.e):
            steps.append(f"CloudUserID equals the Entra user's id {cloud}")
        else:
            steps.append(f"CloudUserID {cloud} ≠ the Entra user's id {self.entra.id_text(self.e)}")
        return steps

    def detail(self, reason: str) -> str:
        found = self.identity_detail(reason)
        if found is not None:
            return found
        ad, cm, row, c = self.ad, self.cm, self.row, self.c
        if reason == "configmgr_stale_record":
            stale = cm.join_index("k_upn").rows_with(int(ad.array("k_upn")[row]))
            if len(stale):
                return f"{self.record(int(stale[0]))} has this UPN but another SID (and GUID and name)"
            return "a ConfigMgr record has this UPN but none of the user's keys"
        if reason == "configmgr_discovery_unhealthy":
            return _component_text(cm, AD_USER_DISCOVERY)
        if reason == "configmgr_not_discovered":
            return (
                f"no ConfigMgr record has SID0 {ad.text('sid', row)}, Object_GUID0 or "
                f"Unique_User_Name0 {ad.netbios_domain}\\{self.sam}"
            )
        if reason == "intune_collection_removed":
            return (
                f"{self.record(c)} has CloudUserID {cm.cloud_text(c)} but is in none of {self.collections()}"
            )
        if reason == "not_in_intune_collection":
            return f"{self.record(c)} is not a member of {self.collections()}"
        if reason == "upn_mismatch":
            return f"Entra UPN {self.entra.text('upn', self.e)} ≠ AD UPN {ad.text('upn', row)}"
        if reason == "connector_unhealthy":
            return _component_text(cm, CLOUD_USER_SYNC)
        if reason == "connector_sync_pending":
            return f"{self.record(c)} is in {', '.join(cm.collections_of(c))} but has no CloudUserID yet"
        cloud = cm.cloud_text(c) or ""
        if reason == "cloud_user_id_other_user":
            other = self.entra.row_of_id(cloud)
            owner = self.entra_user(other) if other is not None else "another user"
            return f"CloudUserID {short(cloud)} belongs to Entra user {owner}, not {self.entra_user(self.e)}"
        if reason == "cloud_user_id_unknown":
            return (
                f"CloudUserID {short(cloud)} is no Entra user's id (deleted or recreated); the user's Entra "
                f"id is {self.entra.id_text(self.e)}"
            )
        return reason


def _component_text(cm: CmTable, component: str) -> str:
    critical = [c for c in cm.components if c.component_name == component and c.status == 2]
    where = ", ".join(f"{c.machine_name} (site {c.site_code})" for c in critical) or "a site system"
    return f"{component} is critical on {where}"


# ---------------------------------------------------------------------------- cloud
class _CloudExplainer(_Identity):
    def __init__(self, evaluation: Evaluation, row: int, now: float) -> None:
        super().__init__(evaluation, row)
        self.now = now
        self.lic: Licensing = evaluation.placement.links["licensing"]
        self.dev: Devices = evaluation.placement.links["devices"]
        self.devices: DeviceTable | None = evaluation.data.devices

    def sku_name(self, sku_id: str) -> str:
        return self.organization.sku_part_number(sku_id) if self.organization else sku_id

    def states(self) -> list[dict[str, Any]]:
        if self.e < 0:
            return []
        states = self.entra.children["states"]
        result = []
        for i in child_rows(self.entra, "states", self.e):
            index = int(i)
            group = states.cat("group").get(index)
            result.append(
                {
                    "sku": states.cat("sku").get(index) or "",
                    "state": states.cat("state").get(index),
                    "error": states.cat("error").get(index),
                    "group": self.entra.group_names.get(group, group) if group else None,
                    "disabled": (states.cat("disabled").get(index) or "").split(","),
                    "updated": float(states.array("updated")[index]),
                }
            )
        return result

    def assigned(self) -> list[str]:
        if self.e < 0:
            return []
        licenses = self.entra.children["licenses"]
        return [licenses.cat("sku").get(int(i)) or "" for i in child_rows(self.entra, "licenses", self.e)]

    def device_rows(self) -> list[int]:
        if self.e < 0 or self.devices is None:
            return []
        key = int(self.entra.array("k_id")[self.e])
        return [int(r) for r in self.devices.user_index().rows_with(key)]

    def describe_device(self, row: int) -> str:
        assert self.devices is not None
        d = self.devices
        name = d.text("name", row) or guid_text_of(bytes(d.array("id")[row].tobytes()))
        last_sync = iso(float(d.array("last_sync")[row])) or "never"
        return (
            f"{name} ({d.cat('os').get(row) or 'unknown OS'}, {d.cat('compliance').get(row) or 'unknown'}, "
            f"{d.cat('agent').get(row) or 'unknown agent'}, last sync {last_sync})"
        )

    def licences(self) -> str:
        states = self.states()
        if states:
            parts = []
            for s in states:
                via = f" via group {s['group']}" if s["group"] else " directly"
                error = f", error {s['error']}" if s["error"] not in (None, "None") else ""
                parts.append(f"{self.sku_name(s['sku'])} {s['state']}{error}{via}")
            return "; ".join(parts)
        assigned = self.assigned()
        return (
            "assigned " + ", ".join(self.sku_name(s) for s in assigned) if assigned else "no licence assigned"
        )

    def evidence(self) -> list[str]:
        steps = [self.account(), self.synced()]
        licensed = self.e >= 0 and bool(self.lic.licensed[self.e])
        since = iso(float(self.lic.since[self.e])) if self.e >= 0 else None
        if self.e < 0:
            steps.append("no synced Entra user, so no licence")
        elif licensed:
            steps.append(f"Intune-granting licence ({self.licences()}){', since ' + since if since else ''}")
        else:
            steps.append(f"no Intune-granting licence ({self.licences()})")
        devices = self.device_rows()
        if not devices:
            steps.append("no Intune managed device has this user as userId")
            steps.append("no device")
            return steps
        steps.append(
            f"{len(devices)} managed device(s): " + "; ".join(self.describe_device(r) for r in devices)
        )
        compliant = bool(self.dev.compliant[self.e])
        states = ", ".join(self.evaluation.settings.compliant_states)
        stale = format_duration(self.evaluation.settings.device_stale_after)
        steps.append(
            f"a device is {states} and synced within {stale}"
            if compliant
            else f"no device is {states} with a sync within {stale}"
        )
        return steps

    def detail(self, reason: str) -> str:
        found = self.identity_detail(reason)
        if found is not None:
            return found
        plans = ", ".join(self.evaluation.settings.intune_service_plans)
        if reason in ("license_count_violation", "license_conflict", "license_error_other"):
            wanted = {
                "license_count_violation": ("CountViolation",),
                "license_conflict": ("MutuallyExclusiveViolation", "DependencyViolation"),
            }.get(reason)
            for s in self.intune_states():
                if s["error"] not in (None, "None") and (wanted is None or s["error"] in wanted):
                    via = f" (assigned by group {s['group']})" if s["group"] else " (assigned directly)"
                    failed = f"{self.sku_name(s['sku'])} assignment failed with {s['error']}"
                    return f"{failed}{via}{self.units(s['sku'])}"
        if reason == "license_usage_location_missing":
            location = self.entra.text("usage_location", self.e) if self.e >= 0 else None
            states = "; ".join(
                f"{self.sku_name(s['sku'])} {s['state']}, error {s['error']}" for s in self.intune_states()
            )
            return f"usageLocation is {location or 'not set'}; {states}"
        if reason == "intune_plan_disabled":
            return f"assigned with every Intune plan ({plans}) disabled: {self.licences()}"
        if reason == "no_intune_license" and self.organization is None:
            return (
                "the tenant's subscribedSkus were never read, so no licence shows an Intune plan: "
                f"{self.licences()}"
            )
        if reason == "no_intune_license":
            return f"no assigned licence has an Intune plan ({plans}): {self.licences()}"
        if reason == "device_enrollment_pending":
            since = iso(float(self.lic.since[self.e])) if self.e >= 0 else None
            return f"no Intune managed device has userId {self.entra.id_text(self.e)}" + (
                f"; licensed since {since}" if since else ""
            )
        devices = self.device_rows()
        listed = "; ".join(self.describe_device(r) for r in devices)
        if reason == "device_stale":
            stale = format_duration(self.evaluation.settings.device_stale_after)
            return f"every device last synced more than {stale} ago: {listed}"
        if reason == "device_noncompliant":
            return f"a device is noncompliant: {listed}"
        if reason == "device_in_grace_period":
            return f"a device is in its grace period: {listed}"
        if reason == "device_compliance_unknown":
            return f"no device is {', '.join(self.evaluation.settings.compliant_states)}: {listed}"
        return reason

    def intune_states(self) -> list[dict[str, Any]]:
        if self.organization is None:
            return []
        intune = intune_plan_ids(self.organization, self.evaluation.settings.intune_service_plans)
        return [s for s in self.states() if s["sku"].lower() in intune]

    def units(self, sku_id: str) -> str:
        if self.organization is None:
            return ""
        for sku in self.organization.skus:
            if sku.sku_id == sku_id:
                return f"; {sku.consumed_units} of {sku.prepaid_enabled} units consumed"
        return ""


def stuck_rows(evaluation: Evaluation, now: float) -> Sequence[int]:
    return [int(r) for r in evaluation.summary(now).stuck_rows]


__all__ = [
    "ACTIVE_STATES",
    "Step",
    "UserExplanation",
    "child_rows",
    "explain",
    "find_rows",
    "iso",
    "licence_problems",
]


def find_rows(evaluation: Evaluation, query: str) -> list[int]:
    """AD rows of the in-scope users a trace query names: a UPN, a sAMAccountName, DOMAIN\\sam, an
    objectGUID (GUID text, braces optional) or an Entra object id; case-insensitive."""
    ad = evaluation.ad
    text = query.strip()
    if not text:
        return []
    found: list[int] = []
    guid = _as_guid(text)
    if guid is not None:
        row = ad.row_of_guid(guid.bytes_le)
        if row is not None:
            found.append(row)
        entra = evaluation.data.entra
        entra_row = entra.row_of_id(str(guid)) if entra is not None else None
        if entra_row is not None:
            linked = evaluation.placement.links["entra"]
            found.extend(int(r) for r in np.flatnonzero(linked == entra_row))
    folded = text.casefold()
    if "\\" in text:
        candidates = ad.index("k_name").rows_with(text_key(text))
        found.extend(
            int(r)
            for r in candidates
            if f"{ad.netbios_domain}\\{ad.text('sam', int(r))}".casefold() == folded
        )
    else:
        for r in ad.index("k_upn").rows_with(text_key(text)):
            if (ad.text("upn", int(r)) or "").casefold() == folded:
                found.append(int(r))
        for r in ad.index("k_name").rows_with(text_key(f"{ad.netbios_domain}\\{text}")):
            if (ad.text("sam", int(r)) or "").casefold() == folded:
                found.append(int(r))
    return sorted(set(found))


def _as_guid(text: str) -> uuid.UUID | None:
    candidate = text.strip().strip("{}")
    if len(candidate) != 36:
        return None
    try:
        return uuid.UUID(candidate)
    except ValueError:
        return None
