"""Graph JSON -> records: users (whole, or one delta change merged into the user held), licences,
managed devices, organization, SKUs and subscriptions.

Everything is normalised here (lower-case GUIDs, upper-case SIDs, POSIX times); anything of an
unexpected shape raises :class:`ShapeError`, which the sources turn into a refresh failure with
reason ``data`` rather than producing half-right metrics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from exporter.ids import epoch_seconds, guid_text, sid_text
from exporter.model import (
    AssignedLicense,
    EntraColumns,
    EntraUser,
    LicenseState,
    ManagedDevice,
    ServicePlan,
    SubscribedSku,
    Subscription,
    plans_text,
)
from exporter.sources.bulk import iso_times

# The user properties every read selects (full read, delta, licence sweep, look-ups): exactly what
# EntraUser holds. Fewer properties also mean fewer delta changes to read (a property that is not
# selected does not make a user surface in /users/delta). The licence states and usage location are
# only read where the cloud chain needs them (its licence stage and reasons, and the licence
# assignment error metric of cloud estates).
HYBRID_USER_PROPERTIES = (
    "id",
    "userPrincipalName",
    "accountEnabled",
    "createdDateTime",
    "onPremisesSyncEnabled",
    "onPremisesImmutableId",
    "onPremisesSecurityIdentifier",
    "onPremisesProvisioningErrors",
    "assignedLicenses",
)
USER_PROPERTIES = (*HYBRID_USER_PROPERTIES, "licenseAssignmentStates", "usageLocation")


def user_properties(license_states: bool) -> tuple[str, ...]:
    return USER_PROPERTIES if license_states else HYBRID_USER_PROPERTIES


def license_properties(license_states: bool) -> tuple[str, ...]:
    """What the licence sweep reads (changes of licenseAssignmentStates are invisible to /users/delta)."""
    sweep = ("id", "assignedLicenses")
    return (*sweep, "licenseAssignmentStates") if license_states else sweep


ORGANIZATION_PROPERTIES = ("id", "onPremisesSyncEnabled", "onPremisesLastSyncDateTime")
DEVICE_PROPERTIES = (
    "id",
    "deviceName",
    "userId",
    "operatingSystem",
    "complianceState",
    "managementAgent",
    "enrolledDateTime",
    "lastSyncDateTime",
)


MAX_TEXT_CHARS = 1024


class ShapeError(ValueError):
    """A Graph object that does not have the documented shape."""


# ---------------------------------------------------------------------------- users
def user_id_of(item: dict[str, Any]) -> str:
    """The normalised object id of a user object or delta entry."""
    return _guid(item, "id", "user", required=True) or ""


def parse_user(item: dict[str, Any]) -> EntraUser:
    """A user from a listing (a property Graph left out is null: never set)."""
    user_id = user_id_of(item)
    base = EntraUser(
        id=user_id,
        user_principal_name=None,
        on_premises_sync_enabled=False,
        on_premises_immutable_id=None,
        on_premises_security_identifier=None,
    )
    return dataclasses.replace(base, **user_fields(item, f"user {user_id}"))


def merge_user(held: EntraUser, item: dict[str, Any]) -> EntraUser:
    """A delta change merged into the user held: the properties it carries replace the held ones.

    /users/delta may return only the changed properties (``Prefer: return=minimal``) and leaves out
    properties that were never set; either way, what is absent keeps its held value.
    """
    return dataclasses.replace(held, **user_fields(item, f"user {held.id}"))


def carries_every_property(item: dict[str, Any], properties: tuple[str, ...] = USER_PROPERTIES) -> bool:
    return all(name in item for name in properties)


def user_fields(item: dict[str, Any], what: str) -> dict[str, Any]:
    """EntraUser fields for the user properties present in ``item``."""
    fields: dict[str, Any] = {}
    for prop, (name, read) in _USER_FIELDS.items():
        if prop in item:
            fields[name] = read(item, what)
    return fields


def parse_licences(
    item: dict[str, Any], what: str
) -> tuple[tuple[AssignedLicense, ...], tuple[LicenseState, ...]]:
    return _assigned_licenses(item, what), _license_states(item, what)


def _provisioning_errors(item: dict[str, Any], what: str) -> tuple[str, ...]:
    errors = item.get("onPremisesProvisioningErrors") or []
    if not isinstance(errors, list) or not all(isinstance(e, dict) for e in errors):
        raise ShapeError(f"{what}: onPremisesProvisioningErrors is not a list of objects")
    return tuple(_str(error, "category", f"{what} provisioning error") or "Unknown" for error in errors)


def _assigned_licenses(item: dict[str, Any], what: str) -> tuple[AssignedLicense, ...]:
    return tuple(_assigned_license(lic, what) for lic in _objects(item, "assignedLicenses", what))


def _assigned_license(item: dict[str, Any], what: str) -> AssignedLicense:
    sku_id = _guid(item, "skuId", f"{what} assigned license", required=True) or ""
    return AssignedLicense(sku_id=sku_id, disabled_plans=_plans(item, f"{what}: license {sku_id}"))


def _license_states(item: dict[str, Any], what: str) -> tuple[LicenseState, ...]:
    return tuple(_license_state(state, what) for state in _objects(item, "licenseAssignmentStates", what))


def _license_state(item: dict[str, Any], what: str) -> LicenseState:
    sku_id = _guid(item, "skuId", f"{what} licence state", required=True) or ""
    where = f"{what}: licence state of {sku_id}"
    return LicenseState(
        sku_id=sku_id,
        state=_str(item, "state", where),
        error=_str(item, "error", where),
        assigned_by_group=_guid(item, "assignedByGroup", where),
        disabled_plans=_plans(item, where),
        last_updated=_time(item, "lastUpdatedDateTime", where),
    )


def _plans(item: dict[str, Any], what: str) -> tuple[str, ...]:
    disabled = item.get("disabledPlans") or []
    if not isinstance(disabled, list) or not all(isinstance(plan, str) for plan in disabled):
        raise ShapeError(f"{what}: disabledPlans is not a list of GUIDs")
    try:
        return tuple(guid_text(plan) or "" for plan in disabled)
    except ValueError:
        raise ShapeError(f"{what}: disabledPlans holds something that is not a GUID") from None


_USER_FIELDS: dict[str, tuple[str, Callable[[dict[str, Any], str], Any]]] = {
    "userPrincipalName": ("user_principal_name", lambda item, what: _str(item, "userPrincipalName", what)),
    "accountEnabled": ("account_enabled", lambda item, what: _bool(item, "accountEnabled", what)),
    "createdDateTime": ("created", lambda item, what: _time(item, "createdDateTime", what)),
    "onPremisesSyncEnabled": (
        "on_premises_sync_enabled",
        lambda item, what: _bool(item, "onPremisesSyncEnabled", what) is True,
    ),
    "onPremisesImmutableId": (
        "on_premises_immutable_id",
        lambda item, what: _str(item, "onPremisesImmutableId", what),
    ),
    "onPremisesSecurityIdentifier": (
        "on_premises_security_identifier",
        lambda item, what: _sid(item, "onPremisesSecurityIdentifier", what),
    ),
    "onPremisesProvisioningErrors": ("provisioning_error_categories", _provisioning_errors),
    "assignedLicenses": ("assigned_licenses", _assigned_licenses),
    "licenseAssignmentStates": ("license_states", _license_states),
    "usageLocation": ("usage_location", lambda item, what: _str(item, "usageLocation", what)),
}


# ---------------------------------------------------------------------------- users in bulk
class _PageCaches:
    """Normalised forms of the values that repeat across a tenant (SKU and plan ids, plan sets)."""

    def __init__(self) -> None:
        self.guids: dict[str, str | None] = {}
        self.plans: dict[tuple[str, ...], str | None] = {}

    def guid(self, value: object) -> str | None:
        """Lower-case GUID text of a canonical GUID string; None for anything else (the exact
        parser then decides)."""
        if type(value) is not str:
            return None
        known = self.guids.get(value, _UNKNOWN)
        if known is not _UNKNOWN:
            return known  # type: ignore[return-value]
        normal = value.lower() if canonical_guid_bytes(value) is not None else None
        if len(self.guids) < 10_000:
            self.guids[value] = normal
        return normal

    def plan_set(self, value: object) -> str | None:
        """plans_text of a disabledPlans list of canonical GUIDs; None for anything else."""
        if value is None:
            return ""
        if type(value) is not list:
            return None
        key = tuple(value)
        known = self.plans.get(key, _UNKNOWN)
        if known is not _UNKNOWN:
            return known  # type: ignore[return-value]
        normal: list[str] = []
        for plan in value:
            text = self.guid(plan)
            if text is None:
                return None
            normal.append(text)
        result = plans_text(normal)
        if len(self.plans) < 10_000:
            self.plans[key] = result
        return result


_UNKNOWN = object()
_NAN = float("nan")


def canonical_guid_bytes(value: str) -> bytes | None:
    """The 16 bytes (RFC 4122 order) of ``8-4-4-4-12`` hex GUID text, None for any other form."""
    if len(value) != 36 or value[8] != "-" or value[13] != "-" or value[18] != "-" or value[23] != "-":
        return None
    try:
        raw = bytes.fromhex(value[:8] + value[9:13] + value[14:18] + value[19:23] + value[24:])
    except ValueError:
        return None
    return raw if len(raw) == 16 else None


def user_columns(items: Sequence[Any]) -> EntraColumns:
    """The users of one listing page, field by field: what :func:`parse_user` makes of each item.

    Items of the usual shape (canonical GUIDs, values of the documented JSON types) are converted
    here in bulk; any other item goes through :func:`parse_user`, which accepts it or raises its
    :class:`ShapeError` naming the user and property.
    """
    columns = EntraColumns()
    caches = _PageCaches()
    created: list[tuple[int, str, str]] = []  # (row, value, user id) parsed in bulk below
    updated: list[tuple[int, str, str]] = []  # (state row, value, user id)
    for item in items:
        if not _add_plain_user(columns, item, caches, created, updated):
            columns.add_user(parse_user(item if isinstance(item, dict) else {}))
    _fill_times(columns.created, created, "createdDateTime")
    _fill_times(columns.state_updated, updated, "lastUpdatedDateTime")
    return columns


def _fill_times(target: list[float], pending: list[tuple[int, str, str]], key: str) -> None:
    if not pending:
        return
    seconds = iso_times([value for _, value, _ in pending]).tolist()
    for (row, value, user_id), parsed in zip(pending, seconds, strict=True):
        if parsed != parsed:  # not the common form: the exact parser (and its error)
            parsed = _time({key: value}, key, f"user {user_id}")
            parsed = _NAN if parsed is None else parsed
        target[row] = parsed


def _add_plain_user(
    columns: EntraColumns,
    item: Any,
    caches: _PageCaches,
    created: list[tuple[int, str, str]],
    updated: list[tuple[int, str, str]],
) -> bool:
    """Append ``item`` when every value has the usual shape; False (nothing appended) otherwise."""
    if type(item) is not dict:
        return False
    get = item.get
    user_id = get("id")
    raw_id = canonical_guid_bytes(user_id) if type(user_id) is str else None
    upn, enabled, synced = get("userPrincipalName"), get("accountEnabled"), get("onPremisesSyncEnabled")
    immutable, sid = get("onPremisesImmutableId"), get("onPremisesSecurityIdentifier")
    when, usage = get("createdDateTime"), get("usageLocation")
    if (
        raw_id is None
        or not (upn is None or type(upn) is str)
        or not (enabled is None or type(enabled) is bool)
        or not (synced is None or type(synced) is bool)
        or not (immutable is None or type(immutable) is str)
        or not (when is None or type(when) is str)
        or not (usage is None or type(usage) is str)
    ):
        return False
    if sid is not None:
        if type(sid) is not str:
            return False
        sid = sid.strip().upper() or None
        if sid is not None and not sid.startswith("S-1-"):
            return False
    errors = _plain_errors(get("onPremisesProvisioningErrors"))
    licenses = _plain_licenses(get("assignedLicenses"), caches)
    states = _plain_states(get("licenseAssignmentStates"), caches)
    if errors is None or licenses is None or states is None:
        return False
    row = len(columns.ids)
    columns.ids.append(raw_id)
    columns.upns.append(upn)
    columns.synced.append(synced is True)
    columns.imms.append(immutable)
    columns.sids.append(sid)
    columns.created.append(_NAN)
    if when:
        created.append((row, when, str(user_id).lower()))
    columns.enabled.append(-1 if enabled is None else int(enabled))
    columns.usage_locations.append(usage)
    for category in errors:
        columns.error_rows.append(row)
        columns.error_categories.append(category)
    for sku, disabled in licenses:
        columns.license_rows.append(row)
        columns.license_skus.append(sku)
        columns.license_disabled.append(disabled)
    for sku, state, error, group, disabled, last in states:
        if last:
            updated.append((len(columns.state_rows), last, str(user_id).lower()))
        columns.state_rows.append(row)
        columns.state_skus.append(sku)
        columns.state_states.append(state)
        columns.state_errors.append(error)
        columns.state_groups.append(group)
        columns.state_disabled.append(disabled)
        columns.state_updated.append(_NAN)
    return True


def _plain_errors(value: Any) -> list[str] | None:
    if not value:
        return [] if value is None or type(value) is list else None
    if type(value) is not list:
        return None
    categories: list[str] = []
    for error in value:
        category = error.get("category") if type(error) is dict else 0
        if not (category is None or type(category) is str):
            return None
        categories.append(category or "Unknown")
    return categories


def _plain_licenses(value: Any, caches: _PageCaches) -> list[tuple[str, str]] | None:
    if value is None:
        return []
    if type(value) is not list:
        return None
    licenses: list[tuple[str, str]] = []
    for lic in value:
        if type(lic) is not dict:
            return None
        sku, disabled = caches.guid(lic.get("skuId")), caches.plan_set(lic.get("disabledPlans"))
        if sku is None or disabled is None:
            return None
        licenses.append((sku, disabled))
    return licenses


_State = tuple[str, str | None, str | None, str | None, str, str | None]


def _plain_states(value: Any, caches: _PageCaches) -> list[_State] | None:
    if value is None:
        return []
    if type(value) is not list:
        return None
    states: list[_State] = []
    for entry in value:
        if type(entry) is not dict:
            return None
        get = entry.get
        sku, disabled = caches.guid(get("skuId")), caches.plan_set(get("disabledPlans"))
        state, error, group = get("state"), get("error"), get("assignedByGroup")
        last = get("lastUpdatedDateTime")
        if (
            sku is None
            or disabled is None
            or not (state is None or type(state) is str)
            or not (error is None or type(error) is str)
            or not (last is None or type(last) is str)
        ):
            return None
        if group:
            group = caches.guid(group)
            if group is None:
                return None
        elif group is not None and type(group) is not str:
            return None
        states.append((sku, state, error, group or None, disabled, last))
    return states


# ---------------------------------------------------------------------------- managed devices
def parse_device(item: dict[str, Any]) -> ManagedDevice:
    device_id = _guid(item, "id", "managed device", required=True) or ""
    what = f"managed device {device_id}"
    return ManagedDevice(
        id=device_id,
        user_id=_guid(item, "userId", what),
        operating_system=_str(item, "operatingSystem", what),
        compliance_state=_str(item, "complianceState", what),
        management_agent=_str(item, "managementAgent", what),
        enrolled=_device_time(item, "enrolledDateTime", what),
        last_sync=_device_time(item, "lastSyncDateTime", what),
        device_name=_str(item, "deviceName", what),
    )


def _device_time(item: dict[str, Any], key: str, what: str) -> float | None:
    # Intune says "never" with 0001-01-01T00:00:00Z.
    value = _time(item, key, what)
    return value if value is not None and value > 0 else None


# ---------------------------------------------------------------------------- organization and licences
def parse_organization(body: dict[str, Any]) -> tuple[bool | None, float | None]:
    """(onPremisesSyncEnabled, onPremisesLastSyncDateTime) of the tenant's organization object."""
    value = body.get("value")
    if not isinstance(value, list) or not value or not isinstance(value[0], dict):
        raise ShapeError("no organization object")
    organization = value[0]
    return (
        _bool(organization, "onPremisesSyncEnabled", "organization"),
        _time(organization, "onPremisesLastSyncDateTime", "organization"),
    )


def parse_sku(item: dict[str, Any]) -> SubscribedSku:
    sku_id = _guid(item, "skuId", "subscribed SKU", required=True) or ""
    what = f"subscribed SKU {sku_id}"
    prepaid = item.get("prepaidUnits") or {}
    if not isinstance(prepaid, dict):
        raise ShapeError(f"{what}: prepaidUnits is not an object")
    return SubscribedSku(
        sku_id=sku_id,
        sku_part_number=_str(item, "skuPartNumber", what) or "",
        # As Graph says: consumed units can exceed the enabled ones and that is worth seeing.
        consumed_units=_int(item, "consumedUnits", what),
        prepaid_enabled=_int(prepaid, "enabled", what),
        prepaid_warning=_int(prepaid, "warning", what),
        prepaid_suspended=_int(prepaid, "suspended", what),
        prepaid_locked_out=_int(prepaid, "lockedOut", what),
        service_plans=tuple(_service_plan(plan, what) for plan in _objects(item, "servicePlans", what)),
    )


def _service_plan(item: dict[str, Any], what: str) -> ServicePlan:
    plan_id = _guid(item, "servicePlanId", f"{what} service plan", required=True) or ""
    return ServicePlan(id=plan_id, name=_str(item, "servicePlanName", f"{what} service plan") or "")


def parse_subscription(item: dict[str, Any]) -> Subscription:
    subscription_id = _str(item, "id", "subscription")
    if not subscription_id:
        raise ShapeError("a subscription without id")
    what = f"subscription {subscription_id}"
    return Subscription(
        id=subscription_id,
        sku_id=_guid(item, "skuId", what) or "",
        sku_part_number=_str(item, "skuPartNumber", what) or "",
        status=_str(item, "status", what) or "",
        is_trial=_bool(item, "isTrial", what) is True,
        total_licenses=_int(item, "totalLicenses", what),
        next_lifecycle=_time(item, "nextLifecycleDateTime", what),
    )


# ---------------------------------------------------------------------------- field readers
def _str(item: dict[str, Any], key: str, what: str) -> str | None:
    value = item.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        # No Graph identifier or name is this long; garbage must not grow metrics or the state file.
        return value if len(value) <= MAX_TEXT_CHARS else value[:MAX_TEXT_CHARS]
    raise ShapeError(f"{what}: {key} is not a string")


def _bool(item: dict[str, Any], key: str, what: str) -> bool | None:
    value = item.get(key)
    if value is None or isinstance(value, bool):
        return value
    raise ShapeError(f"{what}: {key} is not true/false")


def _int(item: dict[str, Any], key: str, what: str) -> int:
    value = item.get(key)
    if value is None:
        return 0
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ShapeError(f"{what}: {key} is not an integer")


def _time(item: dict[str, Any], key: str, what: str) -> float | None:
    value = _str(item, key, what)
    try:
        return epoch_seconds(value)
    except ValueError:
        raise ShapeError(f"{what}: {key} is not a time") from None


def _guid(item: dict[str, Any], key: str, what: str, *, required: bool = False) -> str | None:
    value = _str(item, key, what)
    if not value:
        if required:
            raise ShapeError(f"{what} without {key}")
        return None
    try:
        return guid_text(value)
    except ValueError:
        raise ShapeError(f"{what}: {key} is not a GUID") from None


def _sid(item: dict[str, Any], key: str, what: str) -> str | None:
    try:
        return sid_text(_str(item, key, what))
    except ValueError:
        raise ShapeError(f"{what}: {key} is not a SID") from None


def _objects(item: dict[str, Any], key: str, what: str) -> list[dict[str, Any]]:
    value = item.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(entry, dict) for entry in value):
        raise ShapeError(f"{what}: {key} is not a list of objects")
    return value
