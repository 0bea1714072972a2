"""Graph v1.0 resources of the simulator (everything but delta queries): users (list, point look-up,
``$count``), groups, Intune managed devices, organization, subscribedSkus, directory subscriptions.

Every handler runs under the simulator's lock and returns a :class:`Reply` that is sent after it.

Behaviour of real Graph that the handlers copy (learn.microsoft.com unless noted):

- ``/users``: without ``$select`` only the default properties; ``$top`` 1..999 (default page 100);
  opaque ``$skiptoken`` in ``@odata.nextLink``; ``$filter`` as in :mod:`tests.entra.sim_filter` (default
  or advanced mode); ``$count=true`` adds ``@odata.count`` only in advanced mode (header
  ``ConsistencyLevel: eventual``) and is silently ignored without the header.
- ``/users/$count`` answers the number as text/plain and needs ``ConsistencyLevel: eventual``; without
  it: 400 ``Request_BadRequest`` "$count is not currently supported."
- ``/users/{id | userPrincipalName}``: 404 ``Request_ResourceNotFound`` when there is no such user
  (soft-deleted users are not found).
- ``/groups/{id}``: ``GroupMember.Read.All``, ``Group.Read.All`` or ``Directory.Read.All``.
- ``/deviceManagement/managedDevices``: Intune pages hold up to 1,000 devices (observed: clients get
  1,000 per page; ``$top`` is honoured, so ``$top=1`` gives a nextLink - Microsoft Tech Community
  2480958). ``$top`` above the page size is capped (assumed). Errors come in Intune's shape: the Graph
  error whose message is Intune's own JSON document (``"_version": 3``, ``"Message": "... - Operation
  ID ..."``); a missing permission is 403 ``Forbidden`` "Application is not authorized to perform this
  operation. Application must have one of the following scopes: ...".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlencode

from tests.entra import sim_filter
from tests.entra.sim_http import Reply, graph_error, intune_error
from tests.entra.sim_model import (
    DEFAULT_USER_PROPERTIES,
    MANAGED_DEVICE_PROPERTIES,
    USER_PROPERTIES,
    SimTenant,
)
from tests.entra.sim_store import RecordStore

if TYPE_CHECKING:
    from tests.entra.graph_sim import GraphSimulator
    from tests.entra.sim_http import Exchange

GROUP_PROPERTIES = frozenset(
    {
        "id",
        "displayName",
        "description",
        "mail",
        "mailEnabled",
        "mailNickname",
        "securityEnabled",
        "groupTypes",
        "createdDateTime",
        "membershipRule",
        "onPremisesSyncEnabled",
        "onPremisesSecurityIdentifier",
        "assignedLicenses",
        "hasMembersWithLicenseErrors",
        "visibility",
    }
)
DEVICE_PERMISSION_MESSAGE = (
    "Application is not authorized to perform this operation. Application must have one of the following "
    "scopes: DeviceManagementManagedDevices.Read.All, DeviceManagementManagedDevices.ReadWrite.All"
)


@dataclass
class ListCursor:
    """What a ``$skiptoken`` of a listing stands for."""

    tenant_id: str
    endpoint: str
    fields: tuple[str, ...] | None  # None: whole records
    top: int
    position: int  # a slot, or an index into `slots`
    slots: list[int] | None  # a filtered listing's matching slots, fixed at its first page
    layout: int
    count: int | None  # @odata.count, repeated on every page
    link: dict[str, str]  # what the nextLink repeats besides $skiptoken


def select_of(query: dict[str, str]) -> tuple[str, ...] | None:
    if "$select" not in query:
        return None
    return tuple(name.strip() for name in query["$select"].split(",") if name.strip())


def unknown_option(query: dict[str, str], allowed: set[str]) -> str | None:
    return next((key for key in query if key.startswith("$") and key not in allowed), None)


def bad_property(select: tuple[str, ...] | None, known: frozenset[str]) -> str | None:
    return next((name for name in select or () if name not in known), None)


def is_eventual(exchange: Exchange) -> bool:
    return exchange.header("ConsistencyLevel").lower() == "eventual"


# ---------------------------------------------------------------------------- users
def list_users(sim: GraphSimulator, exchange: Exchange, tenant: SimTenant) -> Reply:
    query = exchange.query
    option = unknown_option(query, {"$select", "$top", "$skiptoken", "$filter", "$count"})
    if option:
        return graph_error(400, "Request_UnsupportedQuery", f"Unsupported query option {option}.")
    store = tenant.directory
    if "$skiptoken" in query:
        return _next_page(sim, exchange, tenant, store, "users", "/v1.0/users")
    select = select_of(query)
    bad = bad_property(select, USER_PROPERTIES)
    if bad:
        return _no_such_property(bad, "user")
    top_text = query.get("$top", "100")
    if not top_text.isdigit() or not 1 <= int(top_text) <= 999:
        return graph_error(
            400,
            "Request_BadRequest",
            f"Invalid page size specified: '{top_text}'. Must be between 1 and 999 inclusive.",
        )
    count_text = query.get("$count", "false").lower()
    if count_text not in {"true", "false"}:
        return graph_error(400, "Request_BadRequest", f"Invalid value '{count_text}' for $count.")
    advanced = is_eventual(exchange) and count_text == "true"
    slots: list[int] | None = None
    if "$filter" in query:
        try:
            slots = filtered_slots(store, query["$filter"], advanced=advanced)
        except sim_filter.FilterError as error:
            return graph_error(error.status, error.code, error.message)
    count = (len(store) if slots is None else len(slots)) if advanced else None
    link: dict[str, str] = {name: query[name] for name in ("$select", "$filter", "$count") if name in query}
    link["$top"] = top_text
    fields = select or DEFAULT_USER_PROPERTIES
    cursor = ListCursor(tenant.tenant_id, "users", fields, int(top_text), 0, slots, store.layout, count, link)
    return listing_page(sim, exchange, store, cursor, "/v1.0/users")


def filtered_slots(store: RecordStore, text: str, *, advanced: bool) -> list[int]:
    node = sim_filter.parse(text)
    sim_filter.check_support(node, sim_filter.USER_FILTER_SUPPORT, "User", advanced=advanced)
    return matching_slots(store, node)


def matching_slots(store: RecordStore, node: sim_filter.Node) -> list[int]:
    ids = sim_filter.candidates(node, store.lookup)
    if ids is None:
        slots: list[int] = list(store.live_slots())
    else:
        slots = sorted(slot for slot in map(store.slot_of, ids) if slot is not None)
    return [slot for slot in slots if sim_filter.matches(node, store.decode(store.row(slot)))]


def count_users(sim: GraphSimulator, exchange: Exchange, tenant: SimTenant) -> Reply:
    if not is_eventual(exchange):
        return graph_error(400, "Request_BadRequest", "$count is not currently supported.")
    option = unknown_option(exchange.query, {"$filter"})
    if option:
        return graph_error(400, "Request_UnsupportedQuery", f"Unsupported query option {option}.")
    store = tenant.directory
    count = len(store)
    if "$filter" in exchange.query:
        try:
            count = len(filtered_slots(store, exchange.query["$filter"], advanced=True))
        except sim_filter.FilterError as error:
            return graph_error(error.status, error.code, error.message)
    return Reply(200, str(count).encode("ascii"), content_type="text/plain;charset=utf-8")


def get_user(sim: GraphSimulator, exchange: Exchange, tenant: SimTenant, key: str) -> Reply:
    option = unknown_option(exchange.query, {"$select"})
    if option:
        return graph_error(400, "Request_UnsupportedQuery", f"Unsupported query option {option}.")
    select = select_of(exchange.query)
    bad = bad_property(select, USER_PROPERTIES)
    if bad:
        return _no_such_property(bad, "user")
    store = tenant.directory
    key = unquote(key)
    user_id = (
        key
        if key in store
        else next(iter(store.lookup("id", key) or store.lookup("userPrincipalName", key)), None)
    )
    slot = None if user_id is None else store.slot_of(user_id)
    if slot is None:
        return _not_found(key)
    row = store.row(slot)
    assert row is not None
    fields = select or DEFAULT_USER_PROPERTIES
    context = f"users({','.join(select)})/$entity" if select else "users/$entity"
    return Reply(
        200, {"@odata.context": f"{sim.base_url}/v1.0/$metadata#{context}", **store.project(row, fields)}
    )


# ---------------------------------------------------------------------------- groups
def get_group(sim: GraphSimulator, exchange: Exchange, tenant: SimTenant, group_id: str) -> Reply:
    option = unknown_option(exchange.query, {"$select"})
    if option:
        return graph_error(400, "Request_UnsupportedQuery", f"Unsupported query option {option}.")
    select = select_of(exchange.query)
    bad = bad_property(select, GROUP_PROPERTIES)
    if bad:
        return _no_such_property(bad, "group")
    group_id = unquote(group_id)
    group = next((g for g in tenant.groups if str(g.get("id", "")).lower() == group_id.lower()), None)
    if group is None:
        return _not_found(group_id)
    body = {name: group.get(name) for name in select} if select else dict(group)
    context = f"groups({','.join(select)})/$entity" if select else "groups/$entity"
    return Reply(200, {"@odata.context": f"{sim.base_url}/v1.0/$metadata#{context}", **body})


# ---------------------------------------------------------------------------- Intune devices
def list_devices(sim: GraphSimulator, exchange: Exchange, tenant: SimTenant) -> Reply:
    query = exchange.query
    path = "/v1.0/deviceManagement/managedDevices"
    option = unknown_option(query, {"$select", "$top", "$skiptoken", "$filter"})
    if option:
        return intune_error(400, "BadRequest", f"The query parameter '{option}' is not supported.", path)
    store = tenant.device_store
    if "$skiptoken" in query:
        return _next_page(sim, exchange, tenant, store, "managedDevices", path)
    select = select_of(query)
    bad = bad_property(select, MANAGED_DEVICE_PROPERTIES)
    if bad:
        return intune_error(
            400,
            "BadRequest",
            f"Could not find a property named '{bad}' on type 'microsoft.graph.managedDevice'.",
            path,
        )
    top_text = query.get("$top", str(sim.devices_page_size))
    if not top_text.isdigit() or int(top_text) < 1:
        return intune_error(400, "BadRequest", f"Invalid value '{top_text}' for $top.", path)
    slots = None
    if "$filter" in query:
        try:
            node = sim_filter.parse(query["$filter"])
            sim_filter.check_support(node, sim_filter.DEVICE_FILTER_SUPPORT, "managedDevice", advanced=True)
        except sim_filter.FilterError as error:
            return intune_error(400, "BadRequest", error.message, path)
        slots = matching_slots(store, node)
    link: dict[str, str] = {name: query[name] for name in ("$select", "$filter", "$top") if name in query}
    top = min(int(top_text), sim.devices_page_size)
    cursor = ListCursor(tenant.tenant_id, "managedDevices", select, top, 0, slots, store.layout, None, link)
    return listing_page(sim, exchange, store, cursor, path)


def get_device(sim: GraphSimulator, exchange: Exchange, tenant: SimTenant, device_id: str) -> Reply:
    path = exchange.path
    select = select_of(exchange.query)
    bad = bad_property(select, MANAGED_DEVICE_PROPERTIES)
    if bad:
        return intune_error(
            400,
            "BadRequest",
            f"Could not find a property named '{bad}' on type 'microsoft.graph.managedDevice'.",
            path,
        )
    store = tenant.device_store
    slot = store.slot_of(unquote(device_id))
    if slot is None:
        return intune_error(
            404, "ResourceNotFound", f"Resource not found for the segment '{device_id}'.", path
        )
    row = store.row(slot)
    assert row is not None
    body = store.project(row, select) if select else store.decode(row)
    return Reply(
        200,
        {"@odata.context": f"{sim.base_url}/v1.0/$metadata#deviceManagement/managedDevices/$entity", **body},
    )


# ---------------------------------------------------------------------------- organization and licences
def organization(sim: GraphSimulator, exchange: Exchange, tenant: SimTenant) -> Reply:
    option = unknown_option(exchange.query, {"$select"})
    if option:
        return graph_error(400, "Request_UnsupportedQuery", f"Unsupported query option {option}.")
    select = select_of(exchange.query)
    org = {name: tenant.organization.get(name) for name in select} if select else tenant.organization
    return Reply(200, {"@odata.context": f"{sim.base_url}/v1.0/$metadata#organization", "value": [org]})


def subscribed_skus(sim: GraphSimulator, exchange: Exchange, tenant: SimTenant) -> Reply:
    option = unknown_option(exchange.query, {"$select"})
    if option:
        return graph_error(400, "Request_UnsupportedQuery", f"Unsupported query option {option}.")
    return Reply(
        200, {"@odata.context": f"{sim.base_url}/v1.0/$metadata#subscribedSkus", "value": tenant.skus}
    )


def subscriptions(sim: GraphSimulator, exchange: Exchange, tenant: SimTenant) -> Reply:
    query = exchange.query
    option = unknown_option(query, {"$select", "$top", "$skiptoken"})
    if option:
        return graph_error(400, "Request_UnsupportedQuery", f"Unsupported query option {option}.")
    store = RecordStore(tenant.subscriptions)  # small: rebuilt per request so that edits of the list show
    path = "/v1.0/directory/subscriptions"
    if "$skiptoken" in query:
        return _next_page(sim, exchange, tenant, store, "subscriptions", path, check_layout=False)
    top_text = query.get("$top", str(sim.subscriptions_page_size))
    if not top_text.isdigit() or not 1 <= int(top_text) <= 999:
        return graph_error(
            400,
            "Request_BadRequest",
            f"Invalid page size specified: '{top_text}'. Must be between 1 and 999 inclusive.",
        )
    select = select_of(query)
    link = {"$select": query["$select"]} if select else {}
    link["$top"] = top_text
    cursor = ListCursor(tenant.tenant_id, "subscriptions", select, int(top_text), 0, None, 0, None, link)
    return listing_page(sim, exchange, store, cursor, path)


# ---------------------------------------------------------------------------- paging
def listing_page(
    sim: GraphSimulator, exchange: Exchange, store: RecordStore, cursor: ListCursor, path: str
) -> Reply:
    if cursor.slots is None:
        rows, following = store.page(cursor.position, cursor.top)
    else:
        chosen = cursor.slots[cursor.position : cursor.position + cursor.top]
        rows = [row for row in map(store.row, chosen) if row is not None]
        end = cursor.position + cursor.top
        following = end if end < len(cursor.slots) else None
    fields = cursor.fields
    context = "deviceManagement/managedDevices" if cursor.endpoint == "managedDevices" else cursor.endpoint
    body: dict[str, Any] = {"@odata.context": f"{sim.base_url}/v1.0/$metadata#{context}"}
    if cursor.count is not None:
        body["@odata.count"] = cursor.count
    body["value"] = [store.project(row, fields) if fields else store.decode(row) for row in rows]
    if following is not None and not exchange.truncate:
        skiptoken = sim.store_cursor(dataclasses.replace(cursor, position=following))
        params = {**cursor.link, "$skiptoken": skiptoken}
        body["@odata.nextLink"] = f"{sim.base_url}{path}?{urlencode(params, safe='$,')}"
    return Reply(200, body)


def _next_page(
    sim: GraphSimulator,
    exchange: Exchange,
    tenant: SimTenant,
    store: RecordStore,
    endpoint: str,
    path: str,
    *,
    check_layout: bool = True,
) -> Reply:
    cursor = sim.load_cursor(exchange.query["$skiptoken"])
    if (
        not isinstance(cursor, ListCursor)
        or cursor.tenant_id != tenant.tenant_id
        or cursor.endpoint != endpoint
        or (check_layout and cursor.layout != store.layout)
    ):
        if endpoint == "managedDevices":
            return intune_error(400, "BadRequest", "The skip token is not valid.", path)
        return graph_error(400, "Directory_ExpiredPageToken", "The specified page token value has expired.")
    return listing_page(sim, exchange, store, cursor, path)


def _no_such_property(name: str, entity: str) -> Reply:
    return graph_error(
        400,
        "Request_BadRequest",
        f"Could not find a property named '{name}' on type 'microsoft.graph.{entity}'.",
    )


def _not_found(key: str) -> Reply:
    return graph_error(
        404,
        "Request_ResourceNotFound",
        f"Resource '{key}' does not exist or one of its queried reference-property objects are not present.",
    )
