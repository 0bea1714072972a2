"""Graph objects for the simulated tenant, shaped as Graph v1.0 returns them."""

from __future__ import annotations

import base64
import uuid
from typing import Any

from tests.entra.sim_model import SimApp, SimTenant

TENANT_ID = "7f3b9c2e-1d4a-4e8b-9a6c-2b5d8e1f0a3c"
CLIENT_ID = "5c1e8a4d-2b7f-4c3e-9d1a-6e8f0b2c4d6a"
CLIENT_SECRET = "Qx8~secret.Value_with-Symbols~0123456789"

INTUNE_A_SKU = "061f9ace-7d42-4136-88ac-31dc755f143f"
INTUNE_A_PLAN = "c1ec4a95-1f05-45b3-a911-aa3fa01094f5"
E3_SKU = "6fd2c87f-b296-42f0-b197-1e91e994b900"
EMS_SKU = "efccb6f7-5641-4e0e-bd10-b4976e1bf68e"
EXCHANGE_PLAN = "efb87545-963c-4e0d-99df-69c6916d9eb0"
TEAMS_PLAN = "57ff2da0-773e-42df-b2af-ffb7a2317929"
UNKNOWN_SKU = "0b1c2d3e-4f50-4617-8293-a4b5c6d7e8f9"
INTUNE_USERS_GROUP = "9e0f1a2b-3c4d-4e5f-8a6b-7c8d9e0f1a2b"
LICENSE_UPDATED = "2024-03-01T09:00:00Z"


def user_id(index: int) -> str:
    return str(uuid.UUID(int=0x1D000000_0000_4000_8000_000000000000 + index))


def immutable_id(index: int) -> str:
    return base64.b64encode(uuid.UUID(int=0xAD000000_0000_4000_8000_000000000000 + index).bytes_le).decode()


def sid(index: int) -> str:
    return f"S-1-5-21-1004336348-1177238915-682003330-{1000 + index}"


def license_state(
    sku_id: str,
    *,
    state: str = "Active",
    error: str = "None",
    group: str | None = None,
    disabled: tuple[str, ...] = (),
    updated: str | None = LICENSE_UPDATED,
) -> dict[str, Any]:
    """One entry of a user's licenseAssignmentStates (assigned directly unless `group` is given)."""
    return {
        "assignedByGroup": group,
        "disabledPlans": list(disabled),
        "error": error,
        "lastUpdatedDateTime": updated,
        "skuId": sku_id,
        "state": state,
    }


def graph_user(
    index: int,
    *,
    synced: bool = True,
    immutable: bool = True,
    created: str | None = "2024-03-01T08:15:00Z",
    errors: tuple[str, ...] = (),
    licenses: list[dict[str, Any]] | None = None,
    license_states: list[dict[str, Any]] | None = None,
    usage_location: str | None = "DE",
    enabled: bool = True,
) -> dict[str, Any]:
    """A user with every property the simulator knows (it projects them per $select).

    licenseAssignmentStates default to one active, direct state per assigned licence.
    """
    name = f"user{index:05d}"
    assigned: list[dict[str, Any]] = (
        licenses if licenses is not None else [{"disabledPlans": [], "skuId": INTUNE_A_SKU}]
    )
    states = (
        license_states
        if license_states is not None
        else [
            license_state(str(lic["skuId"]), disabled=tuple(lic.get("disabledPlans", ()))) for lic in assigned
        ]
    )
    return {
        "id": user_id(index),
        "businessPhones": [],
        "displayName": f"User {index}",
        "givenName": "User",
        "surname": str(index),
        "jobTitle": None,
        "mail": f"{name}@contoso.example",
        "mobilePhone": None,
        "officeLocation": None,
        "preferredLanguage": "en-US",
        "userPrincipalName": f"{name}@contoso.example",
        "accountEnabled": enabled,
        "createdDateTime": created,
        "usageLocation": usage_location,
        "department": "Staff",
        "onPremisesSyncEnabled": True if synced else None,
        "onPremisesImmutableId": immutable_id(index) if synced and immutable else None,
        "onPremisesSecurityIdentifier": sid(index) if synced else None,
        "onPremisesSamAccountName": name if synced else None,
        "onPremisesDomainName": "contoso.example" if synced else None,
        "onPremisesDistinguishedName": f"CN={name},OU=Staff,DC=contoso,DC=example" if synced else None,
        "onPremisesLastSyncDateTime": "2024-05-01T10:00:00Z" if synced else None,
        "onPremisesProvisioningErrors": [
            {
                "category": category,
                "occurredDateTime": "2024-05-01T10:00:00Z",
                "propertyCausingError": "UserPrincipalName",
                "value": f"{name}@contoso.example",
            }
            for category in errors
        ],
        "assignedLicenses": assigned,
        "assignedPlans": [],
        "licenseAssignmentStates": states,
    }


def users(count: int, *, cloud_every: int = 0) -> list[dict[str, Any]]:
    """`count` users; every `cloud_every`-th one (if set) is cloud-only."""
    return [
        graph_user(i, synced=not (cloud_every and i % cloud_every == cloud_every - 1)) for i in range(count)
    ]


def device_id(index: int) -> str:
    return str(uuid.UUID(int=0xDE000000_0000_4000_8000_000000000000 + index))


def managed_device(
    index: int,
    user_index: int | None,
    *,
    compliance: str = "compliant",
    operating_system: str = "Windows",
    agent: str = "mdm",
    enrolled: str | None = "2024-03-02T10:00:00Z",
    last_sync: str | None = "2024-05-01T12:00:00Z",
) -> dict[str, Any]:
    """An Intune managedDevice (user_index None: a device without a primary user)."""
    name = f"user{user_index:05d}" if user_index is not None else None
    return {
        "id": device_id(index),
        "userId": user_id(user_index) if user_index is not None else None,
        "deviceName": f"DESKTOP-{index:06d}",
        "managedDeviceOwnerType": "company",
        "enrolledDateTime": enrolled,
        "lastSyncDateTime": last_sync,
        "operatingSystem": operating_system,
        "osVersion": "10.0.22631.3527" if operating_system == "Windows" else "17.4.1",
        "complianceState": compliance,
        "jailBroken": "Unknown",
        "managementAgent": agent,
        "azureADRegistered": True,
        "azureADDeviceId": str(uuid.UUID(int=0xAADE0000_0000_4000_8000_000000000000 + index)),
        "deviceEnrollmentType": "windowsAzureADJoin" if operating_system == "Windows" else "userEnrollment",
        "deviceRegistrationState": "registered",
        "emailAddress": f"{name}@contoso.example" if name else "",
        "userPrincipalName": f"{name}@contoso.example" if name else None,
        "userDisplayName": f"User {user_index}" if user_index is not None else None,
        "model": "Virtual Machine",
        "manufacturer": "Contoso",
        "serialNumber": f"SN{index:08d}",
        "isEncrypted": True,
        "isSupervised": False,
    }


def group(group_id: str = INTUNE_USERS_GROUP, name: str = "Intune Users") -> dict[str, Any]:
    return {
        "id": group_id,
        "displayName": name,
        "description": f"{name} (licensing group)",
        "mail": None,
        "mailEnabled": False,
        "mailNickname": name.lower().replace(" ", "-"),
        "securityEnabled": True,
        "groupTypes": [],
        "createdDateTime": "2023-01-10T08:00:00Z",
        "onPremisesSyncEnabled": None,
        "visibility": None,
    }


def sku(
    sku_id: str,
    part: str,
    *,
    enabled: int,
    consumed: int,
    warning: int = 0,
    suspended: int = 0,
    locked_out: int = 0,
    plans: tuple[tuple[str, str], ...] = (),
) -> dict[str, Any]:
    return {
        "accountId": TENANT_ID,
        "accountName": "Contoso",
        "appliesTo": "User",
        "capabilityStatus": "Enabled" if not suspended else "Warning",
        "consumedUnits": consumed,
        "id": f"{TENANT_ID}_{sku_id}",
        "skuId": sku_id,
        "skuPartNumber": part,
        "subscriptionIds": [],
        "prepaidUnits": {
            "enabled": enabled,
            "suspended": suspended,
            "warning": warning,
            "lockedOut": locked_out,
        },
        "servicePlans": [
            {
                "servicePlanId": plan_id,
                "servicePlanName": plan_name,
                "provisioningStatus": "Success",
                "appliesTo": "User",
            }
            for plan_id, plan_name in plans
        ],
    }


def default_skus() -> list[dict[str, Any]]:
    return [
        sku(INTUNE_A_SKU, "INTUNE_A", enabled=100, consumed=90, plans=((INTUNE_A_PLAN, "INTUNE_A"),)),
        # Units in grace period and suspended, as after a missed renewal.
        sku(
            E3_SKU.upper(),
            "ENTERPRISEPACK",
            enabled=50,
            consumed=40,
            warning=10,
            suspended=5,
            plans=((EXCHANGE_PLAN, "EXCHANGE_S_ENTERPRISE"), (TEAMS_PLAN.upper(), "TEAMS1")),
        ),
        # More assigned than purchased: Graph reports it as is.
        sku(EMS_SKU, "EMS", enabled=20, consumed=25, plans=((INTUNE_A_PLAN, "INTUNE_A"),)),
        sku(UNKNOWN_SKU, "CONTOSO_CUSTOM_SKU", enabled=3, consumed=0, locked_out=2),
    ]


def subscription(
    sub_id: str,
    sku_id: str,
    part: str,
    *,
    status: str = "Enabled",
    trial: bool = False,
    total: int = 10,
    next_lifecycle: str | None = "2025-06-30T00:00:00Z",
    created: str | None = "2024-07-01T00:00:00Z",
) -> dict[str, Any]:
    return {
        "id": sub_id,
        "commerceSubscriptionId": str(uuid.uuid5(uuid.NAMESPACE_URL, sub_id)),
        "createdDateTime": created,
        "isTrial": trial,
        "nextLifecycleDateTime": next_lifecycle,
        "ownerId": None,
        "ownerTenantId": None,
        "ownerType": None,
        "serviceStatus": [],
        "skuId": sku_id,
        "skuPartNumber": part,
        "status": status,
        "totalLicenses": total,
    }


def default_subscriptions() -> list[dict[str, Any]]:
    return [
        subscription("sub-intune-1", INTUNE_A_SKU, "INTUNE_A", total=100),
        subscription(
            "sub-e3-1",
            E3_SKU,
            "ENTERPRISEPACK",
            status="Warning",
            total=50,
            next_lifecycle="2025-01-15T12:30:00Z",
        ),
        subscription(
            "sub-ems-trial", EMS_SKU, "EMS", trial=True, total=25, next_lifecycle="2024-12-01T00:00:00Z"
        ),
        # Free/viral subscriptions have no lifecycle dates.
        subscription("sub-custom", UNKNOWN_SKU, "CONTOSO_CUSTOM_SKU", next_lifecycle=None, created=None),
    ]


def organization(
    *, sync_enabled: bool | None = True, last_sync: str | None = "2024-05-01T10:00:00Z"
) -> dict[str, Any]:
    return {
        "id": TENANT_ID,
        "displayName": "Contoso",
        "onPremisesSyncEnabled": sync_enabled,
        "onPremisesLastSyncDateTime": last_sync,
        "verifiedDomains": [{"name": "contoso.example", "isDefault": True}],
    }


def tenant(
    user_list: list[dict[str, Any]] | None = None,
    *,
    permissions: frozenset[str] = frozenset({"User.Read.All", "Organization.Read.All"}),
    apps: list[SimApp] | None = None,
    devices: list[dict[str, Any]] | None = None,
    groups: list[dict[str, Any]] | None = None,
) -> SimTenant:
    """The default tenant: 10 synced users, 4 SKUs, 4 subscriptions, one group, no devices."""
    return SimTenant(
        TENANT_ID,
        users=user_list if user_list is not None else users(10),
        organization=organization(),
        skus=default_skus(),
        subscriptions=default_subscriptions(),
        apps={app.client_id: app for app in (apps or [SimApp(CLIENT_ID, CLIENT_SECRET, None, permissions)])},
        devices=devices if devices is not None else [],
        groups=groups if groups is not None else [group()],
    )
