"""``GET /v1.0/users/delta`` of the Graph simulator.

What real Graph does (learn.microsoft.com: "user: delta", "Use delta query to track changes", the
Microsoft 365 dev blog "Duration of change tracking tokens for identity and education resources"):

- A round is one or more calls: follow ``@odata.nextLink`` (``$skiptoken``) until a page carries
  ``@odata.deltaLink`` (``$deltatoken``); query parameters of the first call are encoded in the tokens.
  Each deltaLink call issues a new token, even when nothing changed.
- The first round (no token) returns every user that exists now; ``$deltatoken=latest`` answers at once
  with only a deltaLink ("sync from now"), and an empty ``$deltatoken=`` starts a first round.
- Later rounds return users created or changed since the token, and removed users as
  ``{"id": ..., "@removed": {"reason": "changed"}}`` (soft-deleted, restorable) or ``"deleted"``
  (permanently). ``$select`` names the tracked properties: a change to another property does not surface.
  ``id`` is always returned. By default a changed user carries all selected properties; with
  ``Prefer: return=minimal`` only the changed ones (the simulator's ``delta_partial`` forces that).
  Changes of ``licenseAssignmentStates`` are not tracked at all (domain.md): such a change alone never
  surfaces, though the current value is returned whenever the user surfaces for another reason.
- The same user may appear more than once in a round, and changes already delivered may come again
  (replays): ``delta_duplicates`` repeats the first N entries of every round at its end,
  ``delta_replay`` starts every change round N logged changes before its token.
- ``$top`` is not supported for users (docs); real Graph was observed to ignore it (Microsoft Q&A
  1090464), and so does the simulator. Page size: undocumented; a Microsoft moderator states 200 per
  page for users and contacts, also when ``Prefer: odata.maxpagesize`` asks for more (Q&A 2052165).
  The simulator serves ``delta_page_size`` (200) and honours a smaller ``odata.maxpagesize``.
  ``$expand``, ``$orderby``, ``$search``, ``$count`` answer 400; ``$filter`` takes only
  ``id eq '...' [or id eq '...']`` (at most 50).
- Directory delta tokens live 7 days (``delta_token_lifetime``, on the simulator clock that
  ``advance()`` moves). An expired or forgotten token answers 400 ``syncStateNotFound`` "The sync state
  generation is not found. The delta token is expired and data must be synchronized again." With
  ``delta_expired_status = 410`` it answers 410 Gone with a ``Location`` header holding the first-round
  URL with an empty ``$deltatoken`` (the documented "synchronization reset"; code ``resyncRequired``).
  A token that is not even of the simulator's format answers 400 ``Request_BadRequest`` (a guess: Graph
  cannot decode it).
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from tests.entra import sim_filter
from tests.entra.sim_graph import bad_property, select_of, unknown_option
from tests.entra.sim_http import Reply, graph_error
from tests.entra.sim_model import DEFAULT_USER_PROPERTIES, USER_PROPERTIES, SimTenant
from tests.entra.sim_store import PendingChange, UserStore

if TYPE_CHECKING:
    from tests.entra.graph_sim import GraphSimulator
    from tests.entra.sim_http import Exchange

TOKEN_FORMAT = re.compile(r"^[A-Za-z0-9_-]{30,}$")
DELTA_PATH = "/v1.0/users/delta"
EXPIRED_MESSAGE = (
    "The sync state generation is not found. The delta token is expired and data must be synchronized again."
)


@dataclass
class DeltaState:
    """What a ``$deltatoken`` stands for: changes after `version`, of these properties and users."""

    tenant_id: str
    version: int
    select: tuple[str, ...]
    ids: frozenset[str] | None  # lower-case ids of a $filter=id eq ... scope
    issued_at: float  # simulator clock
    invalid_status: int | None = None  # set by GraphSimulator.invalidate_delta_tokens


@dataclass
class DeltaRound:
    """What a delta ``$skiptoken`` stands for: where a round is and what it closes with."""

    state: DeltaState
    closing_version: int  # the version the round's deltaLink will carry
    position: int
    slots: list[int] | None  # first round: fixed slots of a filtered round (None: walk the store)
    changes: list[PendingChange] | None  # change round: what it reports (None: a first round)
    layout: int
    duplicates: int  # entries repeated at the end of the round


def users_delta(sim: GraphSimulator, exchange: Exchange, tenant: SimTenant) -> Reply:
    query = exchange.query
    option = unknown_option(query, {"$select", "$filter", "$top", "$skiptoken", "$deltatoken"})
    if option:
        return graph_error(
            400, "Request_UnsupportedQuery", f"The query option {option} is not supported with delta."
        )
    if "$skiptoken" in query:
        return _continue_round(sim, exchange, tenant, query["$skiptoken"])
    token = query.get("$deltatoken", "")
    if token and token != "latest":
        return _change_round(sim, exchange, tenant, token)
    select = select_of(query)
    bad = bad_property(select, USER_PROPERTIES)
    if bad:
        return graph_error(
            400,
            "Request_BadRequest",
            f"Could not find a property named '{bad}' on type 'microsoft.graph.user'.",
        )
    ids = None
    if "$filter" in query:
        try:
            ids = sim_filter.id_scope(sim_filter.parse(query["$filter"]))
        except sim_filter.FilterError as error:
            return graph_error(error.status, error.code, error.message)
    store = tenant.directory
    tracked = _tracked(select)
    state = DeltaState(tenant.tenant_id, store.version, tracked, ids, sim.now())
    if token == "latest":
        return Reply(200, _page_body(sim, [], delta_link=_delta_link(sim, state)))
    slots = (
        None if ids is None else sorted(s for s in map(store.slot_of, _present(store, ids)) if s is not None)
    )
    first = DeltaRound(state, store.version, 0, slots, None, store.layout, sim.delta_duplicates)
    return _serve(sim, exchange, tenant, first)


def _tracked(select: tuple[str, ...] | None) -> tuple[str, ...]:
    fields = select or DEFAULT_USER_PROPERTIES
    return fields if "id" in fields else (*fields, "id")


def _present(store: UserStore, ids: frozenset[str]) -> list[str]:
    return [user_id for user_id in store.ids() if user_id.lower() in ids]


def _change_round(sim: GraphSimulator, exchange: Exchange, tenant: SimTenant, token: str) -> Reply:
    state = sim.delta_states.get(token)
    problem = _token_problem(sim, tenant, state, token)
    if problem is not None:
        return problem
    assert state is not None
    select = select_of(exchange.query)
    if select:  # Graph lets a deltaLink change the tracked properties
        bad = bad_property(select, USER_PROPERTIES)
        if bad:
            return graph_error(
                400,
                "Request_BadRequest",
                f"Could not find a property named '{bad}' on type 'microsoft.graph.user'.",
            )
        state = replace(state, select=_tracked(select))
    store = tenant.directory
    since = store.version_before(state.version, sim.delta_replay) if sim.delta_replay else state.version
    tracked = set(state.select)
    changes = [
        change
        for change in store.pending(since, store.version)
        if (state.ids is None or change.user_id.lower() in state.ids)
        and (change.state != "changed" or change.properties & tracked)
    ]
    round_ = DeltaRound(state, store.version, 0, None, changes, store.layout, sim.delta_duplicates)
    return _serve(sim, exchange, tenant, round_)


def _continue_round(sim: GraphSimulator, exchange: Exchange, tenant: SimTenant, skiptoken: str) -> Reply:
    round_ = sim.load_cursor(skiptoken)
    if not isinstance(round_, DeltaRound):
        return _token_problem(sim, tenant, None, skiptoken) or graph_error(
            400, "Request_BadRequest", "Bad token."
        )
    problem = _token_problem(sim, tenant, round_.state, skiptoken)
    if problem is not None:
        return problem
    return _serve(sim, exchange, tenant, round_)


def _token_problem(
    sim: GraphSimulator, tenant: SimTenant, state: DeltaState | None, token: str
) -> Reply | None:
    if state is None and not TOKEN_FORMAT.match(token):
        return graph_error(400, "Request_BadRequest", f"The delta token '{token[:40]}' is not valid.")
    status = None
    if state is None or state.tenant_id != tenant.tenant_id:
        status = 400
    elif state.invalid_status is not None:
        status = state.invalid_status
    elif sim.now() - state.issued_at > sim.delta_token_lifetime:
        status = sim.delta_expired_status
    if status is None:
        return None
    if status == 410:
        params = {"$select": ",".join(state.select)} if state is not None else {}
        location = f"{sim.base_url}{DELTA_PATH}?{urlencode({**params, '$deltatoken': ''}, safe='$,')}"
        return graph_error(
            410,
            "resyncRequired",
            "The delta token is no longer valid, and the app must reset the sync state.",
            headers={"Location": location},
        )
    return graph_error(400, "syncStateNotFound", EXPIRED_MESSAGE)


def _serve(sim: GraphSimulator, exchange: Exchange, tenant: SimTenant, round_: DeltaRound) -> Reply:
    store = tenant.directory
    if round_.layout != store.layout:  # the user list was replaced wholesale: the round cannot go on
        return graph_error(400, "syncStateNotFound", EXPIRED_MESSAGE)
    size, applied = _page_size(sim, exchange.header("Prefer"))
    minimal = sim.delta_partial or "return=minimal" in exchange.header("Prefer").replace(" ", "").lower()
    select = round_.state.select
    total = _entry_count(store, round_)
    end = min(round_.position + size, total)
    entries = (_entry(store, round_, index, select, minimal) for index in range(round_.position, end))
    value = [item for item in entries if item is not None]
    headers = {"Preference-Applied": applied} if applied else {}
    if end < total:
        following = replace(round_, position=end)
        if exchange.truncate:
            return Reply(200, _page_body(sim, value), headers)
        link = f"{sim.base_url}{DELTA_PATH}?$skiptoken={sim.store_cursor(following)}"
        return Reply(200, _page_body(sim, value, next_link=link), headers)
    closing = replace(round_.state, version=round_.closing_version, issued_at=sim.now(), invalid_status=None)
    return Reply(200, _page_body(sim, value, delta_link=_delta_link(sim, closing)), headers)


def _page_size(sim: GraphSimulator, prefer: str) -> tuple[int, str]:
    match = re.search(r"odata\.maxpagesize\s*=\s*(\d+)", prefer, re.IGNORECASE)
    if match and 0 < int(match.group(1)) < sim.delta_page_size:
        return int(match.group(1)), f"odata.maxpagesize={match.group(1)}"
    return sim.delta_page_size, ""


# A first round without an id scope walks the store's slots; its entries are "slot numbers" and holes are
# skipped when rendered. Every round ends with `duplicates` repeats of its first entries.
def _walk_end(store: UserStore, round_: DeltaRound) -> int:
    return store.slot_count + min(round_.duplicates, len(store))


def _entry_count(store: UserStore, round_: DeltaRound) -> int:
    if round_.changes is not None:
        return len(round_.changes) + min(round_.duplicates, len(round_.changes))
    if round_.slots is not None:
        return len(round_.slots) + min(round_.duplicates, len(round_.slots))
    return _walk_end(store, round_)


def _entry(
    store: UserStore, round_: DeltaRound, index: int, select: tuple[str, ...], minimal: bool
) -> dict[str, Any] | None:
    if round_.changes is not None:
        changes = round_.changes
        change = changes[index] if index < len(changes) else changes[index - len(changes)]
        return _render_change(store, change, select, minimal)
    slot: int | None
    if round_.slots is not None:
        slots = round_.slots
        slot = slots[index] if index < len(slots) else slots[index - len(slots)]
    else:
        slot = index if index < store.slot_count else _nth_live_slot(store, index - store.slot_count)
    row = store.row(slot) if slot is not None else None
    return None if row is None else store.project(row, select)


def _nth_live_slot(store: UserStore, n: int) -> int | None:
    for count, slot in enumerate(store.live_slots()):
        if count == n:
            return slot
    return None


def _render_change(
    store: UserStore, change: PendingChange, select: tuple[str, ...], minimal: bool
) -> dict[str, Any]:
    slot = store.slot_of(change.user_id)
    row = None if slot is None else store.row(slot)
    if row is None:  # removed, possibly after the round started
        reason = "changed" if store.is_soft_deleted(change.user_id) else "deleted"
        return {"id": change.user_id, "@removed": {"reason": reason}}
    if minimal and change.state == "changed":
        changed = [name for name in select if name in change.properties and name != "id"]
        return {"id": change.user_id, **store.project(row, changed)}
    return store.project(row, select)


def _page_body(
    sim: GraphSimulator, value: list[dict[str, Any]], *, next_link: str = "", delta_link: str = ""
) -> dict[str, Any]:
    body: dict[str, Any] = {"@odata.context": f"{sim.base_url}/v1.0/$metadata#users"}
    if next_link:
        body["@odata.nextLink"] = next_link
    if delta_link:
        body["@odata.deltaLink"] = delta_link
    body["value"] = value
    return body


def _delta_link(sim: GraphSimulator, state: DeltaState) -> str:
    token = secrets.token_urlsafe(48)
    sim.delta_states[token] = state
    return f"{sim.base_url}{DELTA_PATH}?$deltatoken={token}"
