"""The Entra ID sources of one estate, over Microsoft Graph.

Entra is split into two sources sharing one :class:`~exporter.sources.graph.GraphClient`, so that
an app registration without Organization.Read.All still delivers the user metrics:

- ``entra`` (:class:`EntraUsersSource`): ``GET /v1.0/users`` -> :class:`EntraData`; needs
  User.Read.All.
- ``entra_organization`` (:class:`EntraOrganizationSource`): ``/v1.0/organization``,
  ``/v1.0/subscribedSkus`` and ``/v1.0/directory/subscriptions`` -> :class:`OrganizationData`;
  needs Organization.Read.All. Only built when ``licenses`` is enabled.

Graph's JSON is normalised here (lower-case GUIDs, upper-case SIDs, POSIX times); anything of an
unexpected shape fails the refresh with reason ``data`` rather than producing half-right metrics.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from exporter.config import EntraConfig
from exporter.ids import epoch_seconds, guid_text, sid_text
from exporter.model import (
    AssignedLicense,
    EntraTable,
    EntraTableBuilder,
    EntraUser,
    HttpStats,
    OrganizationData,
    ServicePlan,
    SourceData,
    SourceKind,
    SubscribedSku,
    Subscription,
)
from exporter.sources.base import Source, SourceError
from exporter.sources.graph import Endpoint, GraphClient, RetryBudget

USER_PROPERTIES = (
    "id",
    "userPrincipalName",
    "accountEnabled",
    "createdDateTime",
    "onPremisesSyncEnabled",
    "onPremisesImmutableId",
    "onPremisesSecurityIdentifier",
    "onPremisesSamAccountName",
    "onPremisesLastSyncDateTime",
    "onPremisesProvisioningErrors",
    "assignedLicenses",
)
ORGANIZATION_PROPERTIES = ("id", "onPremisesSyncEnabled", "onPremisesLastSyncDateTime")


class ShapeError(ValueError):
    """A Graph object that does not have the documented shape."""


class _GraphSource:
    """What both Entra sources share: one Graph client per tenant, released by its last user."""

    def __init__(self, config: EntraConfig, client: GraphClient) -> None:
        self.config = config
        self.client = client
        self._closed = False
        client.retain()

    def describe(self) -> str:
        return self.client.describe()

    def http_stats(self) -> HttpStats:
        """Cumulative statistics of the Graph client, shared by both sources of the tenant."""
        return self.client.http_stats()

    def close(self) -> None:
        if not self._closed:  # the client is shared: it closes when its last source does
            self._closed = True
            self.client.release()

    def _shape_error(self, exc: ShapeError) -> SourceError:
        return SourceError("data", f"Graph ({self.client.graph_host}) returned {exc}")


class EntraUsersSource(_GraphSource):
    """Every user of the tenant, keeping the synced ones (``kind = "entra"``)."""

    kind: SourceKind = "entra"

    def refresh(self, previous: SourceData | None, deadline: float | None = None) -> EntraTable:
        # Always a full read for now (incremental reads via /users/delta come with issue 13).
        return self.full_read()

    def full_read(self) -> EntraTable:
        budget = self.client.new_budget()
        builder = EntraTableBuilder()
        for page in self.client.get_pages("users", self.users_url(), budget):
            for item in page:
                builder.add(self._parse(item))
        table = builder.build()
        table.meta["read"] = "full"
        return table.prepare()

    def users_url(self) -> str:
        query = urlencode({"$select": ",".join(USER_PROPERTIES), "$top": self.config.page_size}, safe="$,")
        return self.client.url(f"/v1.0/users?{query}")

    def _parse(self, item: dict[str, Any]) -> EntraUser:
        try:
            return parse_user(item)
        except ShapeError as exc:
            raise self._shape_error(exc) from None


class EntraOrganizationSource(_GraphSource):
    """Directory sync status and licensing (``kind = "entra_organization"``)."""

    kind: SourceKind = "entra_organization"

    def refresh(self, previous: SourceData | None, deadline: float | None = None) -> OrganizationData:
        budget = self.client.new_budget()
        query = urlencode({"$select": ",".join(ORGANIZATION_PROPERTIES)}, safe="$,")
        organization_url = self.client.url(f"/v1.0/organization?{query}")
        organization = self.client.get_json("organization", organization_url, budget)
        skus = self._collect("subscribedSkus", "/v1.0/subscribedSkus", budget)
        subscriptions = self._collect("subscriptions", "/v1.0/directory/subscriptions", budget)
        try:
            sync_enabled, last_sync = parse_organization(organization)
            return OrganizationData(
                sync_enabled=sync_enabled,
                last_sync=last_sync,
                skus=tuple(parse_sku(item) for item in skus),
                subscriptions=tuple(parse_subscription(item) for item in subscriptions),
            )
        except ShapeError as exc:
            raise self._shape_error(exc) from None

    def _collect(self, endpoint: Endpoint, path: str, budget: RetryBudget) -> list[dict[str, Any]]:
        return [
            item for page in self.client.get_pages(endpoint, self.client.url(path), budget) for item in page
        ]


def build_entra_sources(config: EntraConfig) -> list[Source]:
    """The Entra sources of one estate, sharing one Graph client (one token cache per tenant)."""
    client = GraphClient(config)
    sources: list[Source] = [EntraUsersSource(config, client)]
    if config.licenses:
        sources.append(EntraOrganizationSource(config, client))
    return sources


# ---------------------------------------------------------------------------- parsing
def parse_user(item: dict[str, Any]) -> EntraUser:
    user_id = _guid(item, "id", "user", required=True)
    what = f"user {user_id}"
    errors = item.get("onPremisesProvisioningErrors") or []
    if not isinstance(errors, list) or not all(isinstance(e, dict) for e in errors):
        raise ShapeError(f"{what}: onPremisesProvisioningErrors is not a list of objects")
    return EntraUser(
        id=user_id or "",
        user_principal_name=_str(item, "userPrincipalName", what),
        on_premises_sync_enabled=_bool(item, "onPremisesSyncEnabled", what) is True,
        on_premises_immutable_id=_str(item, "onPremisesImmutableId", what),
        on_premises_security_identifier=_sid(item, "onPremisesSecurityIdentifier", what),
        created=_time(item, "createdDateTime", what),
        account_enabled=_bool(item, "accountEnabled", what),
        provisioning_error_categories=tuple(
            _str(error, "category", f"{what} provisioning error") or "Unknown" for error in errors
        ),
        assigned_licenses=tuple(
            _assigned_license(lic, what) for lic in _objects(item, "assignedLicenses", what)
        ),
    )


def _assigned_license(item: dict[str, Any], what: str) -> AssignedLicense:
    sku_id = _guid(item, "skuId", f"{what} assigned license", required=True) or ""
    disabled = item.get("disabledPlans") or []
    if not isinstance(disabled, list) or not all(isinstance(plan, str) for plan in disabled):
        raise ShapeError(f"{what}: disabledPlans of license {sku_id} is not a list of GUIDs")
    try:
        plans = tuple(guid_text(plan) or "" for plan in disabled)
    except ValueError:
        raise ShapeError(
            f"{what}: disabledPlans of license {sku_id} holds something that is not a GUID"
        ) from None
    return AssignedLicense(sku_id=sku_id, disabled_plans=plans)


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
    if value is None or isinstance(value, str):
        return value
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
