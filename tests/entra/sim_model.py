"""What the Graph simulator holds: apps, tenants, faults, the request log, and the resource vocabulary."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from tests.entra.sim_store import RecordStore, UserStore

DEFAULT_USER_PROPERTIES = (
    "businessPhones",
    "displayName",
    "givenName",
    "jobTitle",
    "mail",
    "mobilePhone",
    "officeLocation",
    "preferredLanguage",
    "surname",
    "userPrincipalName",
    "id",
)
# Properties a $select may name (the subset of microsoft.graph.user the simulator knows).
USER_PROPERTIES = frozenset(
    (
        *DEFAULT_USER_PROPERTIES,
        "accountEnabled",
        "createdDateTime",
        "onPremisesSyncEnabled",
        "onPremisesImmutableId",
        "onPremisesSecurityIdentifier",
        "onPremisesSamAccountName",
        "onPremisesLastSyncDateTime",
        "onPremisesProvisioningErrors",
        "onPremisesDomainName",
        "onPremisesDistinguishedName",
        "onPremisesUserPrincipalName",
        "assignedLicenses",
        "assignedPlans",
        "licenseAssignmentStates",
        "usageLocation",
        "department",
        "userType",
        "mailNickname",
        "proxyAddresses",
        "otherMails",
        "employeeId",
        "companyName",
        "city",
        "country",
    )
)
# microsoft.graph.managedDevice properties the simulator lets $select name.
MANAGED_DEVICE_PROPERTIES = frozenset(
    {
        "id",
        "userId",
        "deviceName",
        "managedDeviceOwnerType",
        "enrolledDateTime",
        "lastSyncDateTime",
        "operatingSystem",
        "osVersion",
        "complianceState",
        "jailBroken",
        "managementAgent",
        "azureADRegistered",
        "azureADDeviceId",
        "deviceEnrollmentType",
        "deviceRegistrationState",
        "emailAddress",
        "userPrincipalName",
        "userDisplayName",
        "model",
        "manufacturer",
        "serialNumber",
        "isEncrypted",
        "isSupervised",
        "complianceGracePeriodExpirationDateTime",
        "managementCertificateExpirationDate",
    }
)
_USER_READ = frozenset(
    {"User.Read.All", "User.ReadWrite.All", "Directory.Read.All", "Directory.ReadWrite.All"}
)
_ORGANIZATION_READ = frozenset({"Organization.Read.All", "Organization.ReadWrite.All", "Directory.Read.All"})
_GROUP_READ = frozenset(
    {
        "GroupMember.Read.All",
        "Group.Read.All",
        "Group.ReadWrite.All",
        "Directory.Read.All",
        "Directory.ReadWrite.All",
    }
)
_DEVICES_READ = frozenset(
    {"DeviceManagementManagedDevices.Read.All", "DeviceManagementManagedDevices.ReadWrite.All"}
)
# Application permissions that grant each read (least privileged first where it matters).
GRANTING_PERMISSIONS: dict[str, frozenset[str]] = {
    "users": _USER_READ,
    "usersDelta": _USER_READ,
    "user": _USER_READ,
    "usersCount": _USER_READ,
    "organization": _ORGANIZATION_READ,
    "subscribedSkus": _ORGANIZATION_READ,
    "subscriptions": _ORGANIZATION_READ,
    "group": _GROUP_READ,
    "managedDevices": _DEVICES_READ,
    "managedDevice": _DEVICES_READ,
}
DEFAULT_APP_PERMISSIONS = frozenset({"User.Read.All", "Organization.Read.All"})


@dataclass
class SimApp:
    client_id: str
    secret: str | None = None
    certificate: x509.Certificate | None = None
    permissions: frozenset[str] = DEFAULT_APP_PERMISSIONS


class SimTenant:
    """A tenant: users (compact store with change log), devices, groups, organization, SKUs, apps.

    ``users`` and ``devices`` read as lists of copies; assigning a list replaces the content (for users
    the differences are logged as changes, so delta queries see them). Change single users through the
    simulator (``upsert_user``, ``patch_user``, ``delete_user``): editing a returned dict changes nothing.
    """

    def __init__(
        self,
        tenant_id: str,
        users: Iterable[Mapping[str, Any]] | None = None,
        organization: dict[str, Any] | None = None,
        skus: list[dict[str, Any]] | None = None,
        subscriptions: list[dict[str, Any]] | None = None,
        apps: dict[str, SimApp] | None = None,
        devices: Iterable[Mapping[str, Any]] | None = None,
        groups: list[dict[str, Any]] | None = None,
    ) -> None:
        self.tenant_id = tenant_id
        self.directory = UserStore(users or ())
        self.device_store = RecordStore(devices or ())
        self.organization: dict[str, Any] = organization if organization is not None else {}
        self.skus: list[dict[str, Any]] = skus if skus is not None else []
        self.subscriptions: list[dict[str, Any]] = subscriptions if subscriptions is not None else []
        self.apps: dict[str, SimApp] = apps if apps is not None else {}
        self.groups: list[dict[str, Any]] = groups if groups is not None else []
        self.untracked = frozenset({"licenseAssignmentStates"})

    @property
    def users(self) -> list[dict[str, Any]]:
        return self.directory.records()

    @users.setter
    def users(self, value: Iterable[Mapping[str, Any]]) -> None:
        self.directory.replace_users(value, self.untracked)

    @property
    def devices(self) -> list[dict[str, Any]]:
        return self.device_store.records()

    @devices.setter
    def devices(self, value: Iterable[Mapping[str, Any]]) -> None:
        self.device_store.replace(value)

    def __repr__(self) -> str:
        return (
            f"SimTenant({self.tenant_id!r}, users={len(self.directory)}, devices={len(self.device_store)}, "
            f"groups={len(self.groups)}, apps={list(self.apps)})"
        )


@dataclass
class Fault:
    """Applied to requests number nth .. nth+times-1 (1-based) of an endpoint since the last reset.

    kind:
      - "429", "503", "500", "502", "403", "401": that status with a Graph error body (Retry-After if
        `retry_after` is set);
      - "reset": TCP reset, no answer; "delay": sleep `delay` seconds, then answer normally;
      - "expire_tokens": every issued token expires, then the request is handled;
      - "garbage": 200 with a body that is not JSON (text/html);
      - "malformed": the real answer (status and JSON content type) with its body cut in half;
      - "truncate": a listing page answered without its ``@odata.nextLink`` although more items exist;
      - "trickle": status line and headers at once, then the body one byte every `interval` seconds for
        `duration` seconds (None: until the fault is cleared or the simulator stops), then the rest of
        the body (`then="finish"`) or a closed connection (`then="close"`);
      - "hang": the request is read but not answered until the faults are cleared (then it is answered
        normally) or the simulator stops or pauses (then the connection is closed).
    """

    endpoint: str
    nth: int
    kind: str
    retry_after: float | None = None
    times: int = 1
    delay: float = 0.0
    interval: float = 1.0
    duration: float | None = None
    then: str = "finish"


@dataclass
class RequestRecord:
    method: str
    endpoint: str
    path: str
    query: dict[str, str]
    status: int | None  # None: the connection was reset or closed without an answer
    token: str | None = None
    form: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
