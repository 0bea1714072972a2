"""Small builders of model records and tables for unit tests (no backend involved)."""

from __future__ import annotations

import dataclasses
import itertools
import uuid
from collections.abc import Mapping, Sequence

from exporter.ids import immutable_id
from exporter.model import (
    AdTable,
    AdUser,
    AssignedLicense,
    CmComponent,
    CmTable,
    CmUser,
    DeviceTable,
    EntraTable,
    EntraUser,
    LicenseState,
    ManagedDevice,
    OrganizationData,
    ServicePlan,
    SubscribedSku,
)
from exporter.pipelines.cloud import CloudPipeline
from exporter.pipelines.definitions import (
    CLOUD,
    DEFAULT_COMPLIANT_STATES,
    DEFAULT_DEVICE_STALE_AFTER,
    DEFAULT_INTUNE_SERVICE_PLANS,
    HYBRID_MDM,
)
from exporter.pipelines.evaluation import EstateData, Evaluation, FirstSeen, PipelineSettings, evaluate
from exporter.pipelines.hybrid import HybridMdmPipeline

DOMAIN_SID = "S-1-5-21-1111111111-2222222222-3333333333"
NETBIOS = "CONTOSO"
COLLECTION = "PS100012"
_counter = itertools.count(1000)


def ad_user(
    sam: str,
    *,
    when_created: float | None = 1_000.0,
    upn: str | None = "",
    anchor: bytes | None = None,
    rid: int | None = None,
) -> AdUser:
    rid = rid if rid is not None else next(_counter)
    guid = uuid.uuid5(uuid.NAMESPACE_DNS, sam).bytes_le
    return AdUser(
        object_guid=guid,
        object_sid=f"{DOMAIN_SID}-{rid}",
        sam_account_name=sam,
        user_principal_name=f"{sam}@contoso.com" if upn == "" else upn,
        source_anchor=anchor if anchor is not None else guid,
        when_created=when_created,
    )


def entra_for(
    user: AdUser,
    *,
    by: str = "immutable_id",
    created: float | None = 2_000.0,
    sync_enabled: bool = True,
    object_id: str | None = None,
    upn: str | None = "",
    account_enabled: bool | None = True,
) -> EntraUser:
    return EntraUser(
        id=object_id or str(uuid.uuid5(uuid.NAMESPACE_URL, user.sam_account_name)),
        user_principal_name=user.user_principal_name if upn == "" else upn,
        on_premises_sync_enabled=sync_enabled,
        on_premises_immutable_id=immutable_id(user.source_anchor) if by == "immutable_id" else None,
        on_premises_security_identifier=user.object_sid if by in ("immutable_id", "sid") else None,
        created=created,
        account_enabled=account_enabled,
    )


def cm_for(
    user: AdUser,
    *,
    by: str = "sid",
    in_collection: bool = False,
    cloud_user_id: str | None = None,
    creation_date: float | None = 3_000.0,
    resource_id: int | None = None,
    domain: str = NETBIOS,
    upn: str | None = "",
) -> CmUser:
    return CmUser(
        resource_id=resource_id if resource_id is not None else next(_counter),
        unique_user_name=f"{domain}\\{user.sam_account_name}",
        user_principal_name=user.user_principal_name if upn == "" else upn,
        sid=user.object_sid if by == "sid" else None,
        object_guid=user.object_guid if by in ("sid", "guid") else None,
        creation_date=creation_date,
        cloud_user_id=cloud_user_id,
        collections=(COLLECTION,) if in_collection else (),
    )


def ad(*users: AdUser) -> AdTable:
    return AdTable.from_records(users, NETBIOS)


def entra(*users: EntraUser) -> EntraTable:
    return EntraTable.from_records(users)


def cm(*users: CmUser, components: Sequence[CmComponent] = ()) -> CmTable:
    return CmTable.from_records(users, components, collection_ids=(COLLECTION,))


# ------------------------------------------------------------------------------- cloud chain data
INTUNE_A = ServicePlan("c1ec4a95-1f05-45b3-a911-aa3fa01094f5", "INTUNE_A")
INTUNE_EDU = ServicePlan("da24caf9-af8e-485c-b7c8-e73336da2693", "INTUNE_EDU")
AAD_PREMIUM = ServicePlan("41781fb2-bc02-4b7c-bd55-b576c07bb09d", "AAD_PREMIUM")
EXCHANGE = ServicePlan("efb87545-963c-4e0d-99df-69c6916d9eb0", "EXCHANGE_S_ENTERPRISE")
INTUNE_O365 = ServicePlan("882e1d05-acd1-4ccb-8708-6ee03664b117", "INTUNE_O365")  # not Intune

INTUNE_SKU = "061f9ace-7d42-4136-88ac-31dc755f143f"  # INTUNE_A: only the Intune plan
EMS_SKU = "efccb6f7-5641-4e0e-bd10-b4976e1bf68e"  # EMS: Intune and Entra ID P1
E3_SKU = "6fd2c87f-b296-42f0-b197-1e91e994b900"  # Office 365 E3: no Intune plan (INTUNE_O365 only)
EDU_SKU = "e82ae690-a2d5-4d76-8d30-7c6e01e6022e"  # two Intune plans (INTUNE_A and INTUNE_EDU)


def subscribed_sku(
    sku_id: str, part_number: str, plans: Sequence[ServicePlan], *, consumed: int = 1, enabled: int = 10
) -> SubscribedSku:
    return SubscribedSku(sku_id, part_number, consumed, enabled, 0, 0, 0, tuple(plans))


DEFAULT_SKUS = (
    subscribed_sku(INTUNE_SKU, "INTUNE_A", (INTUNE_A,)),
    subscribed_sku(EMS_SKU, "EMS", (INTUNE_A, AAD_PREMIUM)),
    subscribed_sku(E3_SKU, "ENTERPRISEPACK", (EXCHANGE, INTUNE_O365)),
    subscribed_sku(EDU_SKU, "M365EDU_A3_STUDENT", (INTUNE_A, INTUNE_EDU, EXCHANGE)),
)


def organization(
    *, last_sync: float | None = None, skus: Sequence[SubscribedSku] = DEFAULT_SKUS, sync_enabled: bool = True
) -> OrganizationData:
    return OrganizationData(sync_enabled, last_sync, tuple(skus), ())


def cloud_only(
    *,
    upn: str | None,
    immutable_id: str | None = None,
    sid: str | None = None,
    object_id: str | None = None,
    sync_enabled: bool | None = False,
) -> EntraUser:
    """An Entra user that onPremisesSyncEnabled does not mark as synced (false or null)."""
    return EntraUser(
        id=object_id or str(uuid.uuid4()),
        user_principal_name=upn,
        on_premises_sync_enabled=sync_enabled,  # type: ignore[arg-type]  # None: Graph's null
        on_premises_immutable_id=immutable_id,
        on_premises_security_identifier=sid,
        created=1_500.0,
        account_enabled=True,
    )


def licensed(
    user: EntraUser,
    *,
    assigned: Sequence[AssignedLicense] = (),
    states: Sequence[LicenseState] = (),
    usage_location: str | None = "DE",
) -> EntraUser:
    return dataclasses.replace(
        user, assigned_licenses=tuple(assigned), license_states=tuple(states), usage_location=usage_location
    )


def device_for(
    user: EntraUser | str | None,
    *,
    compliance: str | None = "compliant",
    last_sync: float | None = 900_000.0,
    enrolled: float | None = 800_000.0,
    agent: str | None = "mdm",
    operating_system: str | None = "Windows",
    name: str | None = None,
    device_id: str | None = None,
) -> ManagedDevice:
    user_id = user.id if isinstance(user, EntraUser) else user
    return ManagedDevice(
        id=device_id or str(uuid.uuid4()),
        user_id=user_id,
        operating_system=operating_system,
        compliance_state=compliance,
        management_agent=agent,
        enrolled=enrolled,
        last_sync=last_sync,
        device_name=name,
    )


def devices(*items: ManagedDevice) -> DeviceTable:
    return DeviceTable.from_records(items)


# ------------------------------------------------------------------------------- running a pipeline
def run_hybrid(
    ad_table: AdTable,
    entra_table: EntraTable,
    cm_table: CmTable,
    *,
    now: float,
    organization: OrganizationData | None = None,
    first_seen: FirstSeen | None = None,
    stuck_after: Mapping[str, float] | None = None,
) -> Evaluation:
    settings = PipelineSettings(HYBRID_MDM, dict(stuck_after or HYBRID_MDM.default_stuck_after))
    data = EstateData(ad=ad_table, entra=entra_table, organization=organization, configmgr=cm_table)
    return evaluate(HybridMdmPipeline(), data, settings, first_seen, now)


def run_cloud(
    ad_table: AdTable,
    entra_table: EntraTable,
    *,
    now: float,
    organization: OrganizationData | None,
    device_table: DeviceTable | None,
    first_seen: FirstSeen | None = None,
    stuck_after: Mapping[str, float] | None = None,
    plans: tuple[str, ...] = DEFAULT_INTUNE_SERVICE_PLANS,
    compliant_states: tuple[str, ...] = DEFAULT_COMPLIANT_STATES,
    device_stale_after: float = DEFAULT_DEVICE_STALE_AFTER,
) -> Evaluation:
    settings = PipelineSettings(
        CLOUD,
        dict(stuck_after or CLOUD.default_stuck_after),
        intune_service_plans=plans,
        compliant_states=compliant_states,
        device_stale_after=device_stale_after,
    )
    data = EstateData(ad=ad_table, entra=entra_table, organization=organization, devices=device_table)
    return evaluate(CloudPipeline(), data, settings, first_seen, now)


def row_of(evaluation: Evaluation, sam: str) -> int:
    """The AD row of the user with this sAMAccountName."""
    table = evaluation.ad
    rows = [i for i in range(table.n) if table.text("sam", i) == sam]
    assert len(rows) == 1, f"{sam}: {len(rows)} rows"
    return rows[0]


def placed(evaluation: Evaluation, sam: str) -> tuple[str, str | None]:
    """(stage, reason) of one user."""
    row = row_of(evaluation, sam)
    return evaluation.stage_name(row), evaluation.reason_name(row)
