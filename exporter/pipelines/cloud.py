"""The ``cloud`` chain: AD -> Entra ID -> Intune licence -> enrolled device -> compliant device.

CONTRACT.md, "Second pipeline profile: cloud". Pure functions over the source tables.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from exporter.columns import I64, Bools, Floats, safe_take
from exporter.model import AdTable, DeviceTable, EntraTable, OrganizationData, SourceKind
from exporter.pipelines.definitions import CLOUD
from exporter.pipelines.evaluation import EstateData, PipelineSettings, Placement, chain
from exporter.pipelines.identity import cloud_user_conflict, entra_sync_pending, match_entra
from exporter.pipelines.licensing import (
    active_states,
    all_intune_plans_disabled,
    granting_entries,
    intune_sku_entries,
)
from exporter.tables import Table


@dataclass(frozen=True)
class Licensing:
    """Per Entra user: does a licence grant Intune, and since when (NaN: no timestamp)."""

    licensed: Bools
    since: Floats


def _per_user(size: int, rows: I64, mask: Bools) -> Bools:
    flags = np.zeros(size, dtype=np.bool_)
    flags[rows[mask]] = True
    return flags


def licensing(entra: EntraTable, organization: OrganizationData | None, plans: tuple[str, ...]) -> Licensing:
    """Intune-granting licences per Entra user (CONTRACT: stage 3 of the cloud chain).

    licenseAssignmentStates with state Active/ActiveWithError count; a user for whom Graph returned
    no states is judged by assignedLicenses instead.
    """
    licensed = np.zeros(entra.n, dtype=np.bool_)
    since = np.full(entra.n, np.nan)
    if organization is None:
        return Licensing(licensed, since)
    states = entra.children["states"]
    assigned = entra.children["licenses"]
    state_rows = states.array("row")
    has_states = np.zeros(entra.n, dtype=np.bool_)
    has_states[state_rows] = True
    good_states = granting_entries(states, organization, plans) & active_states(states)
    licensed |= _per_user(entra.n, state_rows, good_states)
    # The earliest lastUpdatedDateTime of the granting entries is when the user got the licence.
    updated = states.array("updated")[good_states]
    np.fmin.at(since, state_rows[good_states], updated)
    assigned_rows = assigned.array("row")
    good_assigned = granting_entries(assigned, organization, plans) & ~has_states[assigned_rows]
    licensed |= _per_user(entra.n, assigned_rows, good_assigned)
    return Licensing(licensed, since)


@dataclass(frozen=True)
class Devices:
    """Per Entra user: the devices found for it and what they say."""

    count: I64
    first_enrolled: Floats
    compliant: Bools  # a device in compliant_states that synced within device_stale_after
    all_stale: Bools
    noncompliant: Bools
    in_grace: Bools
    entra_row: I64  # per device: the Entra user it belongs to, -1 if none


def devices_per_user(
    entra: EntraTable, devices: DeviceTable | None, settings: PipelineSettings, now: float
) -> Devices:
    size = entra.n
    if devices is None or devices.n == 0 or size == 0:
        zeros = np.zeros(size, dtype=np.bool_)
        return Devices(
            np.zeros(size, np.int64),
            np.full(size, np.nan),
            zeros,
            zeros,
            zeros,
            zeros,
            np.full(0, -1, np.int64),
        )
    owner = entra.index("k_id").lookup_sorted(devices.user_index(), devices.n)
    known = owner >= 0
    rows = owner[known]
    compliance = devices.cat("compliance")
    last_sync = devices.array("last_sync")[known]
    with np.errstate(invalid="ignore"):
        fresh = (now - last_sync) <= settings.device_stale_after  # NaN (never synced) -> stale
    state = compliance.codes[known]
    is_compliant = np.isin(state, compliance.codes_of(settings.compliant_states)) & fresh
    count = np.bincount(rows, minlength=size).astype(np.int64)
    stale_count = np.bincount(rows[~fresh], minlength=size)
    first = np.full(size, np.nan)
    np.fmin.at(first, rows, devices.array("enrolled")[known])
    return Devices(
        count=count,
        first_enrolled=first,
        compliant=_per_user(size, rows, is_compliant),
        all_stale=(count > 0) & (stale_count == count),
        noncompliant=_per_user(size, rows, state == compliance.code("noncompliant")),
        in_grace=_per_user(size, rows, state == compliance.code("inGracePeriod")),
        entra_row=owner,
    )


class CloudPipeline:
    definition = CLOUD
    required: frozenset[SourceKind] = frozenset({"ad", "entra", "entra_organization", "intune_devices"})

    def place(self, data: EstateData, settings: PipelineSettings, now: float) -> Placement:
        ad, entra = _tables(data)
        e = match_entra(ad, entra)
        lic = licensing(entra, data.organization, settings.intune_service_plans)
        dev = devices_per_user(entra, data.devices, settings, now)
        licensed = np.asarray(safe_take(lic.licensed, e, False), dtype=np.bool_)
        enrolled = np.asarray(safe_take(dev.count, e, 0), dtype=np.int64) > 0
        compliant = np.asarray(safe_take(dev.compliant, e, False), dtype=np.bool_)
        stage = chain(e >= 0, licensed, enrolled, compliant)
        evidence = np.full(ad.n, np.nan)
        for index, values in (
            (0, ad.array("created")),
            (1, safe_take(entra.array("created"), e, np.nan)),
            (2, safe_take(lic.since, e, np.nan)),
            (3, safe_take(dev.first_enrolled, e, np.nan)),
        ):
            at = stage == index
            evidence[at] = values[at]
        return Placement(stage, evidence, {"entra": e, "licensing": lic, "devices": dev})

    def conditions(
        self,
        data: EstateData,
        settings: PipelineSettings,
        placement: Placement,
        stage: str,
        rows: I64,
        now: float,
    ) -> Mapping[str, Bools]:
        ad, entra = _tables(data)
        e = placement.links["entra"][rows]
        if stage == "ad_created":
            return {
                "entra_cloud_user_conflict": cloud_user_conflict(ad, entra, rows),
                "entra_sync_pending": entra_sync_pending(ad, data.organization, rows),
            }
        if stage == "entra_synced":
            return {
                name: flags[e] for name, flags in licence_problems(entra, data.organization, settings).items()
            }
        if stage == "intune_licensed":
            return {"entra_account_disabled": entra.array("enabled")[e] == 0}
        if stage == "device_enrolled":
            dev: Devices = placement.links["devices"]
            return {
                "device_stale": dev.all_stale[e],
                "device_noncompliant": dev.noncompliant[e],
                "device_in_grace_period": dev.in_grace[e],
            }
        return {}

    def side_metrics(
        self, data: EstateData, settings: PipelineSettings, placement: Placement
    ) -> Mapping[str, Any]:
        _, entra = _tables(data)
        e = placement.links["entra"]
        matched = np.zeros(entra.n, dtype=np.bool_)
        matched[e[e >= 0]] = True
        return {"orphans": {"entra": int((entra.array("synced") & ~matched).sum())}}


LICENCE_ERROR_REASONS = (
    ("license_count_violation", ("CountViolation",)),
    ("license_conflict", ("MutuallyExclusiveViolation", "DependencyViolation")),
)


def licence_problems(
    entra: EntraTable, organization: OrganizationData | None, settings: PipelineSettings
) -> dict[str, Bools]:
    """Per Entra user, the licence conditions of the entra_synced reasons (CONTRACT, cloud table)."""
    size = entra.n
    if organization is None:
        return {}
    plans = settings.intune_service_plans
    states = entra.children["states"]
    rows = states.array("row")
    intune = intune_sku_entries(states, organization, plans)
    errors = states.cat("error")
    problems: dict[str, Bools] = {}
    for reason, names in LICENCE_ERROR_REASONS:
        problems[reason] = _per_user(size, rows, intune & np.isin(errors.codes, errors.codes_of(names)))
    no_location = np.zeros(size, dtype=np.bool_)
    no_location[entra.blob("usage_location").null_mask()] = True
    prohibited = errors.codes == errors.code("ProhibitedInUsageLocationViolation")
    not_active = ~active_states(states)
    problems["license_usage_location_missing"] = _per_user(
        size, rows, intune & (prohibited | (no_location[rows] & not_active))
    )
    real_error = (errors.codes >= 0) & (errors.codes != errors.code("None"))
    problems["license_error_other"] = _per_user(size, rows, intune & real_error)
    problems["intune_plan_disabled"] = _plan_disabled(entra, organization, plans)
    return problems


def _plan_disabled(entra: EntraTable, organization: OrganizationData, plans: tuple[str, ...]) -> Bools:
    flags = np.zeros(entra.n, dtype=np.bool_)
    child: Table
    for child in (entra.children["states"], entra.children["licenses"]):
        off = all_intune_plans_disabled(child, organization, plans)
        flags |= _per_user(entra.n, child.array("row"), off)
    return flags


def licence_errors(entra: EntraTable) -> dict[tuple[str, str, str | None], int]:
    """(sku id, error, assigning group id or None) -> users whose licence state carries that error."""
    states = entra.children["states"]
    errors = states.cat("error")
    real = (errors.codes >= 0) & (errors.codes != errors.code("None"))
    if not real.any():
        return {}
    sku, group = states.cat("sku"), states.cat("group")
    rows = states.array("row")[real]
    triples = np.stack([sku.codes[real], errors.codes[real], group.codes[real]], axis=1).astype(np.int64)
    # Distinct users per (sku, error, group): drop repeats of the same user first.
    unique_rows = np.unique(np.column_stack([triples, rows]), axis=0)
    counted, counts = np.unique(unique_rows[:, :3], axis=0, return_counts=True)
    result: dict[tuple[str, str, str | None], int] = {}
    for (s, err, g), count in zip(counted.tolist(), counts.tolist(), strict=True):
        result[(sku.vocab[s] if s >= 0 else "", errors.vocab[err], group.vocab[g] if g >= 0 else None)] = (
            count
        )
    return result


def _tables(data: EstateData) -> tuple[AdTable, EntraTable]:
    assert data.ad is not None and data.entra is not None
    return data.ad, data.entra
