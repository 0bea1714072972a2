"""The ``hybrid_mdm`` chain: AD -> Entra ID -> ConfigMgr -> Intune collection -> connector -> enabled.

CONTRACT.md, "Provisioning stages" and "Why a user is stuck: reasons". Pure functions over the
source tables; every condition is evaluated for all users of a stage at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from exporter.columns import I64, Bools, safe_take
from exporter.model import AdTable, CmTable, EntraTable, OrganizationData, SourceKind
from exporter.pipelines.definitions import HYBRID_MDM
from exporter.pipelines.evaluation import (
    EstateData,
    PipelineSettings,
    Placement,
    broadcast,
    chain,
    first_match,
    guids_equal,
    key_at,
)
from exporter.pipelines.identity import cloud_user_conflict, entra_sync_pending, match_entra

AD_USER_DISCOVERY = "SMS_AD_USER_DISCOVERY_AGENT"
CLOUD_USER_SYNC = "SMS_CLOUD_USERSYNC"


def component_critical(cm: CmTable, component: str) -> bool:
    """The component's intune_configmgr_component_status is 2 (on any site system)."""
    return any(c.component_name == component and c.status == 2 for c in cm.components)


def match_configmgr(ad: AdTable, cm: CmTable) -> I64:
    """Stage 3 join: SID0 = objectSid, else Object_GUID0 = objectGUID, else DOMAIN\\sam."""
    return first_match(
        ad.n,
        (cm.join_index("k_sid"), ad.index("k_sid")),
        (cm.join_index("k_guid"), ad.index("k_guid")),
        (cm.join_index("k_name"), ad.index("k_name")),
    )


class HybridMdmPipeline:
    definition = HYBRID_MDM
    required: frozenset[SourceKind] = frozenset({"ad", "entra", "configmgr"})

    def place(self, data: EstateData, settings: PipelineSettings, now: float) -> Placement:
        ad, entra, cm = _tables(data)
        e = match_entra(ad, entra)
        c = match_configmgr(ad, cm)
        in_collection = np.asarray(safe_take(cm.in_collection(), c, False), dtype=np.bool_)
        has_cloud = np.asarray(safe_take(cm.array("has_cloud"), c, False), dtype=np.bool_)
        enabled = guids_equal(cm.array("cloud"), np.where(has_cloud, c, -1), entra.array("id"), e)
        stage = chain(e >= 0, c >= 0, in_collection, has_cloud, enabled)
        evidence = np.full(ad.n, np.nan)
        evidence[stage == 0] = ad.array("created")[stage == 0]
        at = stage == 1
        evidence[at] = entra.array("created")[e[at]]
        at = stage == 2
        evidence[at] = cm.array("created")[c[at]]
        return Placement(stage, evidence, {"entra": e, "configmgr": c, "enabled": enabled})

    def conditions(
        self,
        data: EstateData,
        settings: PipelineSettings,
        placement: Placement,
        stage: str,
        rows: I64,
        now: float,
    ) -> Mapping[str, Bools]:
        ad, entra, cm = _tables(data)
        e = placement.links["entra"][rows]
        c = placement.links["configmgr"][rows]
        if stage == "ad_created":
            return {
                "entra_cloud_user_conflict": cloud_user_conflict(ad, entra, rows),
                "entra_sync_pending": entra_sync_pending(ad, data.organization, rows),
            }
        if stage == "entra_synced":
            return {
                "configmgr_stale_record": cm.join_index("k_upn").contains(ad.array("k_upn")[rows]),
                "configmgr_discovery_unhealthy": broadcast(
                    component_critical(cm, AD_USER_DISCOVERY), len(rows)
                ),
            }
        if stage == "cm_discovered":
            return {"intune_collection_removed": cm.array("has_cloud")[c]}
        if stage == "in_intune_collection":
            return {
                "upn_mismatch": entra.array("k_upn")[e] != ad.array("k_upn")[rows],
                "entra_account_disabled": entra.array("enabled")[e] == 0,
                "connector_unhealthy": broadcast(component_critical(cm, CLOUD_USER_SYNC), len(rows)),
            }
        if stage == "connector_synced":
            return {"cloud_user_id_other_user": entra.index("k_id").contains(cm.array("k_cloud")[c])}
        return {}

    def side_metrics(
        self, data: EstateData, settings: PipelineSettings, placement: Placement
    ) -> Mapping[str, Any]:
        _, entra, cm = _tables(data)
        e = placement.links["entra"]
        c = placement.links["configmgr"]
        has_cloud = safe_take(cm.array("has_cloud"), c, False)
        mismatch = (
            (e >= 0)
            & has_cloud
            & ~guids_equal(cm.array("cloud"), np.where(has_cloud, c, -1), entra.array("id"), e)
        )
        matched_entra = np.zeros(entra.n, dtype=np.bool_)
        matched_entra[e[e >= 0]] = True
        matched_cm = np.zeros(cm.n, dtype=np.bool_)
        matched_cm[c[c >= 0]] = True
        side: dict[str, Any] = {
            "cloud_user_id_mismatch": int(mismatch.sum()),
            "orphans": {
                "entra": int((entra.array("synced") & ~matched_entra).sum()),
                "configmgr": int((~matched_cm).sum()),
            },
            "enabled_without_intune_license": None,
        }
        if data.organization is not None:
            final = placement.stage == len(self.definition.stages) - 1
            side["enabled_without_intune_license"] = enabled_without_license(
                entra, e[final], data.organization, settings.intune_service_plans
            )
        return side


def enabled_without_license(
    entra: EntraTable, rows: I64, organization: OrganizationData, plans: tuple[str, ...]
) -> int:
    """Of these Entra users, those whose assigned licences carry no enabled Intune service plan.

    Expected in hybrid MDM, where the connector enables users without an Entra licence flag;
    exported for information, not as a fault.
    """
    from exporter.pipelines.licensing import granting_entries

    licenses = entra.children["licenses"]
    granting = granting_entries(licenses, organization, plans)
    licensed = np.zeros(entra.n, dtype=np.bool_)
    licensed[licenses.array("row")[granting]] = True
    return int((~licensed[rows]).sum())


def _tables(data: EstateData) -> tuple[AdTable, EntraTable, CmTable]:
    assert data.ad is not None and data.entra is not None and data.configmgr is not None
    return data.ad, data.entra, data.configmgr


__all__ = ["HybridMdmPipeline", "component_critical", "key_at", "match_configmgr"]
