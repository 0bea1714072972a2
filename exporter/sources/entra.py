"""The Entra ID sources of one estate, over Microsoft Graph.

Entra is split into sources sharing one :class:`~exporter.sources.graph.GraphClient` (one token
cache per tenant), so that a missing permission takes down only what needs it:

- ``entra`` (:class:`EntraUsersSource`): every user of the tenant -> :class:`EntraTable`;
  User.Read.All (group names for licence errors: GroupMember.Read.All, optional).
- ``entra_organization`` (:class:`EntraOrganizationSource`): ``/v1.0/organization``,
  ``/v1.0/subscribedSkus`` and ``/v1.0/directory/subscriptions`` -> :class:`OrganizationData`;
  Organization.Read.All. Only built when ``licenses`` is enabled.
- ``intune_devices`` (:class:`exporter.sources.devices.IntuneDevicesSource`), when devices are read.

How the users table stays equal to a full read
----------------------------------------------
A *full read* asks ``/users/delta?$deltatoken=latest`` first (a delta link that tracks changes from
that moment: changes made while the listing runs come again in the next round, which is harmless
because merging is idempotent), then ``/users/$count`` (advanced query, ``ConsistencyLevel:
eventual``), then lists ``/users`` in pages of ``page_size`` (999). A listing that ends clearly short
of the count (a page without ``@odata.nextLink`` in the middle) fails with reason ``data``; the
tolerance (10 users or 0.05%) covers the count's eventual consistency and deletions during the read.

An *incremental read* (``previous`` given) follows the stored delta link to the next deltaLink and
merges the changes: a change may carry only the changed properties (and leaves out properties
never set), so it is merged into the user held; ``@removed`` users leave. It falls back to a full
read when the link is missing, older than 7 days, issued for another tenant / Graph / selection,
rejected (400 ``syncStateNotFound``, 410 ``resyncRequired``, any 4xx), when a page carries neither a
nextLink nor a deltaLink, or when the round takes more pages than a full read would.

Licence states: delta does not track ``licenseAssignmentStates`` (and ``assignedLicenses`` not
reliably). A user that surfaces for another reason brings its current licences, and a *licence
sweep* (``/users?$select=id,assignedLicenses,licenseAssignmentStates&$top=999``, one resource unit
per page) replaces every user's licences: on every refresh while it costs at most
``CHEAP_SWEEP_PAGES`` requests (tenants up to 9,990 users), else once per
``license_refresh_interval`` (default 1 h). So licence errors and states of large tenants may lag by
up to that interval, while an incremental refresh with 1% churn stays near 5% of a full read's
requests (delta pages hold 200 users, listing pages 999).
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from urllib.parse import quote, urlencode

import numpy as np

from exporter.config import EntraConfig
from exporter.ids import guid_text, sid_text
from exporter.model import (
    EntraTable,
    EntraTableBuilder,
    EntraUser,
    OrganizationData,
    SourceData,
    SourceKind,
    object_id_bytes,
)
from exporter.sources.base import Source, SourceError
from exporter.sources.entra_licences import GroupNames, Licences, replace_licences, used_groups
from exporter.sources.graph import Endpoint, GraphClient, GraphError, GraphSource, RetryBudget, page_values
from exporter.sources.graph_records import (
    ORGANIZATION_PROPERTIES,
    USER_PROPERTIES,
    ShapeError,
    carries_every_property,
    license_properties,
    merge_user,
    parse_licences,
    parse_organization,
    parse_sku,
    parse_subscription,
    parse_user,
    user_columns,
    user_id_of,
    user_properties,
)
from exporter.turns import step_aside

log = logging.getLogger(__name__)

DELTA_TOKEN_LIFETIME = 7 * 86400.0  # directory delta tokens expire after 7 days
_DELTA_TOKEN_MARGIN = 3600.0  # do not start a round with a token about to expire
DEFAULT_LICENSE_REFRESH_INTERVAL = 3600.0
CHEAP_SWEEP_PAGES = 10  # a licence sweep this short runs on every refresh
FILTER_BATCH = 15  # values per `in (...)` of a look-up (Graph's limit for directory objects)
EVENTUAL = {"ConsistencyLevel": "eventual"}
# $filter on these needs the advanced query parameters (Microsoft's table of filterable user
# properties); the others take eq/in by default.
_ADVANCED_FILTER = frozenset({"onPremisesImmutableId"})
_SID = re.compile(r"^S-1-\d+(-\d+)+$")
_UNSUPPORTED_QUERY = frozenset({"Request_UnsupportedQuery", "Request_BadRequest"})

__all__ = [
    "USER_PROPERTIES",
    "EntraOrganizationSource",
    "EntraUsersSource",
    "build_entra_sources",
    "parse_user",
]


class _Resync(Exception):
    """The delta link cannot be followed (or its round is inconsistent): do a full read instead."""


class EntraUsersSource(GraphSource):
    """Every user of the tenant, cloud-only included (``kind = "entra"``)."""

    kind: SourceKind = "entra"

    def __init__(
        self,
        config: EntraConfig,
        client: GraphClient,
        *,
        license_refresh_interval: float = DEFAULT_LICENSE_REFRESH_INTERVAL,
        clock: Callable[[], float] = time.time,
        license_states: bool = True,
    ) -> None:
        super().__init__(config, client)
        self.license_refresh_interval = license_refresh_interval
        # licenseAssignmentStates and usageLocation: read for cloud estates (their licence stage).
        self.properties = user_properties(license_states)
        self._clock = clock
        self._groups = GroupNames(clock=clock)

    # ------------------------------------------------------------------ refresh
    def refresh(self, previous: SourceData | None, deadline: float | None = None) -> EntraTable:
        held = previous if isinstance(previous, EntraTable) else None
        if held is not None:
            self._groups.seed(held.group_names, _number(held.meta.get("group_names_at")))
        with self.refreshing(deadline) as budget:
            table = self._read(held, budget)
            table = self._name_groups(table, budget)
        return table.prepare()

    def carry_over(self) -> dict[str, Any]:
        """What a refresh in a child process must remember (exporter.sources.isolated): the group
        names and a refused permission to read them."""
        return {"groups": self._groups}

    def take_over(self, memory: dict[str, Any]) -> None:
        groups = memory.get("groups")
        if isinstance(groups, GroupNames):
            self._groups = groups

    def _read(self, held: EntraTable | None, budget: RetryBudget) -> EntraTable:
        if held is not None:
            reason = self._delta_unusable(held)
            if reason is None:
                try:
                    return self._incremental(held, budget)
                except _Resync as resync:
                    reason = str(resync)
            log.info("Entra users of %s: full read, because %s", self.describe(), reason)
        return self._full_read(budget)

    def _sweep_url(self) -> str:
        return self.users_url(license_properties("licenseAssignmentStates" in self.properties))

    def users_url(self, properties: Sequence[str] | None = None) -> str:
        properties = self.properties if properties is None else properties
        query = urlencode({"$select": ",".join(properties), "$top": self.config.page_size}, safe="$,")
        return self.client.url(f"/v1.0/users?{query}")

    # ------------------------------------------------------------------ full read
    def _full_read(self, budget: RetryBudget) -> EntraTable:
        started = self._clock()
        delta_link = self._latest_delta_link(budget)
        expected = self._user_count(budget)
        builder = EntraTableBuilder()
        for page in self.client.get_pages("users", self.users_url(), budget):
            try:
                builder.add_columns(user_columns(page))
            except ShapeError as exc:
                raise self._shape_error(exc) from None
            del page
        self._check_complete(builder.rows, expected)
        table = builder.build()
        table.meta.update(read="full", licenses_at=started, delta_scope=self._delta_scope())
        if delta_link is not None:
            table.meta.update(delta_link=delta_link, delta_at=started)
        return table

    def _latest_delta_link(self, budget: RetryBudget) -> str | None:
        """A delta link that tracks changes from now on (``$deltatoken=latest`` answers at once)."""
        query = urlencode({"$select": ",".join(self.properties), "$deltatoken": "latest"}, safe="$,")
        url = self.client.url(f"/v1.0/users/delta?{query}")
        try:
            body = self.client.get_json("usersDelta", url, budget)
        except GraphError as exc:
            if exc.status is None or exc.reason != "other":
                raise
            log.warning(
                "Entra users of %s: no delta link (%s); every refresh reads all users", self.describe(), exc
            )
            return None
        link = self.client.next_link(body, "@odata.deltaLink", set())
        if link is None:
            log.warning(
                "Entra users of %s: Graph returned no deltaLink; every refresh reads all users",
                self.describe(),
            )
        return link

    def _user_count(self, budget: RetryBudget) -> int | None:
        url = self.client.url("/v1.0/users/$count")
        try:
            text = self.client.get_text("usersCount", url, budget, headers=EVENTUAL)
        except GraphError as exc:
            if exc.status is None or exc.reason != "other":
                raise
            log.warning(
                "Entra users of %s: cannot count users (%s); listings are not checked", self.describe(), exc
            )
            return None
        try:
            return int(text.strip().lstrip("\ufeff"))
        except ValueError:
            raise GraphError(
                "data", f"Graph ({self.client.graph_host}) GET /v1.0/users/$count returned {text[:40]!r}"
            ) from None

    def _check_complete(self, read: int, expected: int | None) -> None:
        """Fail a listing that ended clearly short of the users' count (a lost nextLink)."""
        if expected is None:
            return
        tolerance = max(10, expected // 2000)
        if expected - read > tolerance:
            raise GraphError(
                "data",
                f"Graph ({self.client.graph_host}) listed {read} users but counts {expected} "
                "(GET /v1.0/users/$count): the listing ended early, a page came without @odata.nextLink",
            )

    # ------------------------------------------------------------------ incremental read
    def _delta_scope(self) -> str:
        """What a delta link is valid for: this Graph, tenant and property selection."""
        scope = f"{self.config.graph_url}|{self.config.tenant_id}|{','.join(self.properties)}"
        return hashlib.sha256(scope.encode("utf-8")).hexdigest()[:16]

    def _delta_unusable(self, held: EntraTable) -> str | None:
        link = held.meta.get("delta_link")
        if not isinstance(link, str) or not link:
            return "no delta link is stored with the users"
        if held.meta.get("delta_scope") != self._delta_scope() or not self.client.is_graph_url(link):
            return "the stored delta link belongs to another tenant, Graph URL or property selection"
        issued = _number(held.meta.get("delta_at"))
        if issued is None or self._clock() - issued >= DELTA_TOKEN_LIFETIME - _DELTA_TOKEN_MARGIN:
            return "the stored delta token is (about to be) older than 7 days"
        return None

    def _incremental(self, held: EntraTable, budget: RetryBudget) -> EntraTable:
        started = self._clock()
        page_limit = math.ceil(held.n / self.config.page_size) + 2  # what a full read costs
        changes, delta_link = self._delta_round(str(held.meta["delta_link"]), budget, page_limit)
        table = self._apply(held, changes)
        table.meta.update(read="incremental", delta_link=delta_link, delta_at=started)
        if self._licences_due(table):
            table = self._sweep_licences(table, budget, started)
        return table

    def _delta_round(
        self, link: str, budget: RetryBudget, page_limit: int
    ) -> tuple[dict[str, dict[str, Any] | None], str]:
        """The changes of one round (user id -> merged change, None when removed) and its deltaLink."""
        changes: dict[str, dict[str, Any] | None] = {}
        seen: set[str] = set()
        url, pages = link, 0
        while True:
            try:
                body = self.client.get_json("usersDelta", url, budget)
            except GraphError as exc:
                if exc.status is not None and 400 <= exc.status < 500 and exc.status not in (401, 403, 429):
                    raise _Resync(f"Graph rejected the delta link ({exc.code or exc.status})") from None
                raise
            pages += 1
            for item in page_values(body, self.client.graph_host, url):
                step_aside()  # an incremental read decodes in the serving process (exporter.turns)
                self._collect(changes, item)
            try:
                delta_link = self.client.next_link(body, "@odata.deltaLink", seen)
                next_link = self.client.next_link(body, "@odata.nextLink", seen)
            except GraphError as exc:
                raise _Resync(str(exc)) from None
            if delta_link is not None:
                return changes, delta_link
            if next_link is None:
                raise _Resync(
                    "a delta page carried neither a nextLink nor a deltaLink (the round was cut short)"
                )
            if pages >= page_limit:
                raise _Resync(f"the changes fill more than {page_limit} delta pages, more than a full read")
            url = next_link

    def _collect(self, changes: dict[str, dict[str, Any] | None], item: dict[str, Any]) -> None:
        try:
            user_id = user_id_of(item)
        except ShapeError as exc:
            raise self._shape_error(exc) from None
        if "@removed" in item:
            changes[user_id] = None
            return
        # The same user may come more than once in a round (replays): later properties win.
        earlier = changes.get(user_id)
        changes[user_id] = {**earlier, **item} if earlier is not None else dict(item)

    def _apply(self, held: EntraTable, changes: dict[str, dict[str, Any] | None]) -> EntraTable:
        partial = [
            uid
            for uid, item in changes.items()
            if item is not None and not carries_every_property(item, self.properties)
        ]
        bases = _held_users(held, partial)
        upserts: list[EntraUser] = []
        removed: list[str] = []
        for user_id, item in changes.items():
            step_aside()
            if item is None:
                removed.append(user_id)
                continue
            base = bases.get(user_id)
            try:
                upserts.append(merge_user(base, item) if base is not None else parse_user(item))
            except ShapeError as exc:
                raise self._shape_error(exc) from None
        return held.with_changes(upserts, removed)

    # ------------------------------------------------------------------ licence sweep
    def _licences_due(self, table: EntraTable) -> bool:
        if (
            self.license_refresh_interval <= 0
            or math.ceil(table.n / self.config.page_size) <= CHEAP_SWEEP_PAGES
        ):
            return True
        last = _number(table.meta.get("licenses_at"))
        return last is None or self._clock() - last >= self.license_refresh_interval

    def _sweep_licences(self, table: EntraTable, budget: RetryBudget, started: float) -> EntraTable:
        """Every user's licences read again (delta does not report licence state changes)."""
        fresh: dict[bytes, Licences] = {}
        for page in self.client.get_pages("users", self._sweep_url(), budget):
            for item in page:
                try:
                    user_id = user_id_of(item)
                    fresh[object_id_bytes(user_id)] = parse_licences(item, f"user {user_id}")
                except ShapeError as exc:
                    raise self._shape_error(exc) from None
        updated, covered = replace_licences(table, fresh)
        if table.n - covered > max(10, table.n // 2000):
            # A sweep cut short still replaced what it read; the rest is read again next refresh.
            log.warning(
                "Entra users of %s: the licence sweep covered %d of %d users; it runs again next refresh",
                self.describe(),
                covered,
                table.n,
            )
        else:
            updated.meta["licenses_at"] = started
        return updated

    # ------------------------------------------------------------------ group names
    def _name_groups(self, table: EntraTable, budget: RetryBudget) -> EntraTable:
        """The table with the display names of its licence-assigning groups (ids where unknown)."""
        if not self.config.group_names:
            named = table.with_group_names({})
            named.meta.pop("warning", None)
            return named
        groups = used_groups(table)
        for group_id in self._groups.due(groups):
            if not self._look_up_group(group_id, budget):
                break
        named = table.with_group_names(self._groups.names(groups))
        named.meta["group_names_at"] = self._clock()
        if self._groups.denied:
            named.meta["warning"] = (
                "licence-assigning groups are shown by id: the app registration needs GroupMember.Read.All "
                "to read their names"
            )
        else:
            named.meta.pop("warning", None)
        return named

    def _look_up_group(self, group_id: str, budget: RetryBudget) -> bool:
        """Look one group's name up; False when no more look-ups should be tried in this refresh.

        A missing permission or any failure never fails the users read: the group keeps its id.
        """
        url = self.client.url(f"/v1.0/groups/{quote(group_id)}?$select=id,displayName")
        try:
            body = self.client.get_json("group", url, budget)
        except GraphError as exc:
            if exc.status == 404:
                self._groups.store(group_id, None)
                return True
            if exc.status == 403:
                if not self._groups.denied:
                    log.warning("Entra users of %s: %s", self.describe(), exc)
                self._groups.deny()
            else:
                log.info("Entra users of %s: group names not read this time: %s", self.describe(), exc)
            return False
        name = body.get("displayName")
        self._groups.store(group_id, name if isinstance(name, str) and name else None)
        return True

    # ------------------------------------------------------------------ trace look-ups
    def find_related(
        self,
        *,
        ids: Sequence[str] = (),
        immutable_ids: Sequence[str] = (),
        sids: Sequence[str] = (),
        upns: Sequence[str] = (),
        deadline: float,
    ) -> EntraTable:
        """Every user (synced or not) whose id, onPremisesImmutableId, onPremisesSecurityIdentifier or
        userPrincipalName (case-insensitive) is one of the given ones, with $filter point queries."""
        keys = (
            ("id", _valid(ids, guid_text)),
            ("userPrincipalName", _unique(u.strip() for u in upns)),
            ("onPremisesSecurityIdentifier", _valid(sids, _sid)),
            ("onPremisesImmutableId", _unique(i.strip() for i in immutable_ids)),
        )
        found: dict[str, EntraUser] = {}
        with self.refreshing(deadline) as budget:
            for prop, values in keys:
                for start in range(0, len(values), FILTER_BATCH):
                    for item in self._filter_users(prop, values[start : start + FILTER_BATCH], budget):
                        user = self._parse(item)
                        found.setdefault(user.id, user)
            table = self._name_groups(EntraTable.from_records(found.values()), budget)
        table.meta["read"] = "lookup"
        return table

    def _filter_users(self, prop: str, values: Sequence[str], budget: RetryBudget) -> list[dict[str, Any]]:
        """Users whose ``prop`` is one of ``values``: in the query mode Microsoft documents for the
        property, then in the other one if Graph refuses; never a listing of all users."""
        literals = [_odata_string(value) for value in values]
        expression = f"{prop} eq {literals[0]}" if len(literals) == 1 else f"{prop} in ({','.join(literals)})"
        first = prop in _ADVANCED_FILTER
        for advanced in (first, not first):
            query: dict[str, Any] = {"$filter": expression, "$select": ",".join(self.properties), "$top": 999}
            if advanced:
                query["$count"] = "true"
            url = self.client.url(f"/v1.0/users?{urlencode(query, quote_via=quote, safe='$,()')}")
            headers = EVENTUAL if advanced else None
            try:
                return [
                    item
                    for page in self.client.get_pages("users", url, budget, headers=headers)
                    for item in page
                ]
            except GraphError as exc:
                if exc.status != 400 or exc.code not in _UNSUPPORTED_QUERY:
                    raise
                log.info(
                    "Graph refused a %s filter on %s (%s)",
                    "advanced" if advanced else "default",
                    prop,
                    exc.code,
                )
        log.warning("Graph filters users by %s in neither query mode: that key is not looked up", prop)
        return []

    # ------------------------------------------------------------------ helpers
    def _parse(self, item: dict[str, Any]) -> EntraUser:
        try:
            return parse_user(item)
        except ShapeError as exc:
            raise self._shape_error(exc) from None

    def _shape_error(self, exc: ShapeError) -> SourceError:
        return GraphError("data", self.client.mask(f"Graph ({self.client.graph_host}) returned {exc}"))


class EntraOrganizationSource(GraphSource):
    """Directory sync status and licensing (``kind = "entra_organization"``)."""

    kind: SourceKind = "entra_organization"

    def refresh(self, previous: SourceData | None, deadline: float | None = None) -> OrganizationData:
        with self.refreshing(deadline) as budget:
            query = urlencode({"$select": ",".join(ORGANIZATION_PROPERTIES)}, safe="$,")
            organization = self.client.get_json(
                "organization", self.client.url(f"/v1.0/organization?{query}"), budget
            )
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
            raise GraphError(
                "data", self.client.mask(f"Graph ({self.client.graph_host}) returned {exc}")
            ) from None

    def _collect(self, endpoint: Endpoint, path: str, budget: RetryBudget) -> list[dict[str, Any]]:
        return [
            item for page in self.client.get_pages(endpoint, self.client.url(path), budget) for item in page
        ]


def build_entra_sources(
    config: EntraConfig,
    *,
    devices: bool = False,
    license_refresh_interval: float = DEFAULT_LICENSE_REFRESH_INTERVAL,
    license_states: bool = True,
) -> list[Source]:
    """The Graph sources of one estate, sharing one Graph client (one token cache per tenant)."""
    from exporter.sources.devices import IntuneDevicesSource

    client = GraphClient(config)
    sources: list[Source] = [
        EntraUsersSource(
            config, client, license_refresh_interval=license_refresh_interval, license_states=license_states
        )
    ]
    if config.licenses:
        sources.append(EntraOrganizationSource(config, client))
    if devices:
        sources.append(IntuneDevicesSource(config, client))
    return sources


# ---------------------------------------------------------------------------- helpers
def _held_users(held: EntraTable, user_ids: Sequence[str]) -> dict[str, EntraUser]:
    """The records of the held users among ``user_ids`` (taken out first: a record of the whole
    table scans its child tables once per user)."""
    pairs = [(user_id, row) for user_id in user_ids if (row := held.row_of_id(user_id)) is not None]
    if not pairs:
        return {}
    subset = held.take(np.array([row for _, row in pairs], dtype=np.int64))
    return {user_id: subset.record(i) for i, (user_id, _) in enumerate(pairs)}


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _sid(value: object) -> str | None:
    text = sid_text(value)
    if text is not None and not _SID.match(text):
        raise ValueError(f"not a SID: {value!r}")
    return text


def _odata_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _unique(values: Iterator[str] | Sequence[str]) -> list[str]:
    seen: dict[str, str] = {}
    for value in values:
        if value:
            seen.setdefault(value.lower(), value)
    return list(seen.values())


def _valid(values: Sequence[str], normalise: Callable[[object], str | None]) -> list[str]:
    valid: list[str] = []
    for value in values:
        try:
            text = normalise(value.strip().strip("{}") if isinstance(value, str) else value)
        except ValueError:
            continue
        if text and text not in valid:
            valid.append(text)
    return valid
