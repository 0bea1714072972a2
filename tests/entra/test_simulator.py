"""The simulator itself behaves like the identity platform and Graph where the client relies on it.

These talk raw HTTP to it, so that a simulator too lenient to catch a client bug fails here.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.entra import tenant_data
from tests.entra.graph_sim import DEFAULT_USER_PROPERTIES, GraphSimulator, SimApp


def _session(ca_file: str) -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    session.verify = ca_file
    return session


def _token(sim: GraphSimulator, http: requests.Session, **form: str) -> requests.Response:
    data = {
        "grant_type": "client_credentials",
        "client_id": tenant_data.CLIENT_ID,
        "client_secret": tenant_data.CLIENT_SECRET,
        "scope": f"{sim.base_url}/.default",
        **form,
    }
    return http.post(f"{sim.base_url}/{tenant_data.TENANT_ID}/oauth2/v2.0/token", data=data, timeout=10)


@pytest.fixture
def http(ca_file: str) -> Any:
    with _session(ca_file) as session:
        yield session


@pytest.fixture
def bearer(sim: GraphSimulator, http: requests.Session) -> dict[str, str]:
    answer = _token(sim, http)
    assert answer.status_code == 200, answer.text
    return {"Authorization": f"Bearer {answer.json()['access_token']}"}


def test_openid_configuration_names_the_token_endpoint(sim: GraphSimulator, http: requests.Session) -> None:
    answer = http.get(
        f"{sim.base_url}/{tenant_data.TENANT_ID}/v2.0/.well-known/openid-configuration", timeout=10
    )
    assert answer.status_code == 200
    body = answer.json()
    assert body["token_endpoint"] == f"{sim.base_url}/{tenant_data.TENANT_ID}/oauth2/v2.0/token"
    assert {"issuer", "authorization_endpoint"} <= body.keys()


def test_unknown_tenant_is_invalid_tenant(sim: GraphSimulator, http: requests.Session) -> None:
    answer = http.get(f"{sim.base_url}/no-such-tenant/v2.0/.well-known/openid-configuration", timeout=10)
    assert answer.status_code == 400
    assert answer.json()["error"] == "invalid_tenant"
    assert answer.json()["error_codes"] == [90002]


def test_wrong_secret_is_invalid_client(sim: GraphSimulator, http: requests.Session) -> None:
    answer = _token(sim, http, client_secret="wrong")
    assert answer.status_code == 401
    assert answer.json()["error"] == "invalid_client"
    assert "AADSTS7000215" in answer.json()["error_description"]


def test_token_for_another_resource_is_refused(sim: GraphSimulator, http: requests.Session) -> None:
    answer = _token(sim, http, scope="https://graph.microsoft.com/.default")
    assert answer.status_code == 400
    assert answer.json()["error_codes"] == [500011]


def test_graph_needs_a_valid_bearer_token(sim: GraphSimulator, http: requests.Session) -> None:
    assert http.get(f"{sim.base_url}/v1.0/users", timeout=10).status_code == 401
    answer = http.get(f"{sim.base_url}/v1.0/users", headers={"Authorization": "Bearer forged"}, timeout=10)
    assert answer.status_code == 401
    assert answer.json()["error"]["code"] == "InvalidAuthenticationToken"


def test_tokens_expire_after_their_lifetime(sim: GraphSimulator, http: requests.Session) -> None:
    sim.token_lifetime = 1
    answer = _token(sim, http)
    assert answer.json()["expires_in"] == 1
    headers = {"Authorization": f"Bearer {answer.json()['access_token']}"}
    assert http.get(f"{sim.base_url}/v1.0/users", headers=headers, timeout=10).status_code == 200
    time.sleep(1.1)
    expired = http.get(f"{sim.base_url}/v1.0/users", headers=headers, timeout=10)
    assert expired.status_code == 401
    assert "expired" in expired.json()["error"]["message"]


def test_without_select_only_default_properties(
    sim: GraphSimulator, http: requests.Session, bearer: dict[str, str]
) -> None:
    user = http.get(f"{sim.base_url}/v1.0/users", headers=bearer, timeout=10).json()["value"][0]
    assert set(user) == set(DEFAULT_USER_PROPERTIES)
    assert "onPremisesImmutableId" not in user


def test_select_returns_exactly_the_selected_properties(
    sim: GraphSimulator, http: requests.Session, bearer: dict[str, str]
) -> None:
    url = f"{sim.base_url}/v1.0/users?$select=id,onPremisesSecurityIdentifier,assignedLicenses"
    user = http.get(url, headers=bearer, timeout=10).json()["value"][0]
    assert set(user) == {"id", "onPremisesSecurityIdentifier", "assignedLicenses"}
    bad = http.get(f"{sim.base_url}/v1.0/users?$select=id,nonsense", headers=bearer, timeout=10)
    assert bad.status_code == 400


@pytest.mark.parametrize("top", ["0", "1000", "abc"])
def test_top_outside_1_to_999_is_refused(
    sim: GraphSimulator, http: requests.Session, bearer: dict[str, str], top: str
) -> None:
    answer = http.get(f"{sim.base_url}/v1.0/users?$top={top}", headers=bearer, timeout=10)
    assert answer.status_code == 400
    assert "Invalid page size" in answer.json()["error"]["message"]


def test_paging_with_opaque_skiptoken(
    sim: GraphSimulator, http: requests.Session, bearer: dict[str, str]
) -> None:
    sim.tenants[tenant_data.TENANT_ID].users = tenant_data.users(5)
    first = http.get(f"{sim.base_url}/v1.0/users?$select=id&$top=2", headers=bearer, timeout=10).json()
    ids = [u["id"] for u in first["value"]]
    link = first["@odata.nextLink"]
    assert "$skiptoken=" in link and "$select=id" in link and "$top=2" in link
    while link:
        page = http.get(link, headers=bearer, timeout=10).json()
        ids += [u["id"] for u in page["value"]]
        link = page.get("@odata.nextLink")
    assert ids == [tenant_data.user_id(i) for i in range(5)]
    forged = http.get(f"{sim.base_url}/v1.0/users?$skiptoken=2", headers=bearer, timeout=10)
    assert forged.status_code == 400


def test_permissions_are_per_app(sim: GraphSimulator, http: requests.Session) -> None:
    tenant = sim.tenants[tenant_data.TENANT_ID]
    tenant.apps[tenant_data.CLIENT_ID] = SimApp(
        tenant_data.CLIENT_ID, tenant_data.CLIENT_SECRET, None, frozenset({"User.Read.All"})
    )
    headers = {"Authorization": f"Bearer {_token(sim, http).json()['access_token']}"}
    assert http.get(f"{sim.base_url}/v1.0/users", headers=headers, timeout=10).status_code == 200
    denied = http.get(f"{sim.base_url}/v1.0/subscribedSkus", headers=headers, timeout=10)
    assert denied.status_code == 403
    assert denied.json()["error"]["code"] == "Authorization_RequestDenied"


def test_scripted_faults_and_request_log(
    sim: GraphSimulator, http: requests.Session, bearer: dict[str, str]
) -> None:
    sim.add_fault("users", 1, "429", retry_after=1)
    throttled = http.get(f"{sim.base_url}/v1.0/users", headers=bearer, timeout=10)
    assert throttled.status_code == 429
    assert throttled.headers["Retry-After"] == "1"
    assert http.get(f"{sim.base_url}/v1.0/users", headers=bearer, timeout=10).status_code == 200
    sim.add_fault("users", 3, "reset")
    with pytest.raises(requests.ConnectionError):
        http.get(f"{sim.base_url}/v1.0/users", headers=bearer, timeout=10)
    assert [r.status for r in sim.requests_to("users")] == [429, 200, None]


# ---------------------------------------------------------------------------- helpers for the new endpoints
TENANT = tenant_data.TENANT_ID


def _grant(sim: GraphSimulator, http: requests.Session, *permissions: str) -> dict[str, str]:
    """A bearer header for the tenant's app after giving it exactly these permissions."""
    sim.tenants[TENANT].apps[tenant_data.CLIENT_ID] = SimApp(
        tenant_data.CLIENT_ID, tenant_data.CLIENT_SECRET, None, frozenset(permissions)
    )
    answer = _token(sim, http)
    assert answer.status_code == 200, answer.text
    return {"Authorization": f"Bearer {answer.json()['access_token']}"}


def _get(http: requests.Session, url: str, headers: dict[str, str], **extra: str) -> requests.Response:
    return http.get(url, headers={**headers, **extra}, timeout=10)


def _round(
    http: requests.Session, url: str, headers: dict[str, str], **extra: str
) -> tuple[list[list[dict[str, Any]]], str]:
    """Follow a delta round to its end: the pages' values and the deltaLink."""
    pages = []
    while True:
        answer = _get(http, url, headers, **extra)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert ("@odata.nextLink" in body) != ("@odata.deltaLink" in body)
        pages.append(body["value"])
        if "@odata.deltaLink" in body:
            return pages, body["@odata.deltaLink"]
        url = body["@odata.nextLink"]


def _flat(pages: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return [item for page in pages for item in page]


def _error_code(answer: requests.Response) -> str:
    return str(answer.json()["error"]["code"])


# ---------------------------------------------------------------------------- users delta
def test_delta_first_round_pages_through_every_user_then_gives_a_delta_link(
    sim: GraphSimulator, http: requests.Session, bearer: dict[str, str]
) -> None:
    sim.delta_page_size = 3
    pages, delta_link = _round(
        http, f"{sim.base_url}/v1.0/users/delta?$select=displayName,usageLocation", bearer
    )
    assert [len(page) for page in pages] == [3, 3, 3, 1]
    users = _flat(pages)
    assert [user["id"] for user in users] == [tenant_data.user_id(i) for i in range(10)]
    assert all(set(user) == {"displayName", "usageLocation", "id"} for user in users)  # id always comes
    assert "$deltatoken=" in delta_link
    requests_made = sim.requests_to("usersDelta")
    assert "$skiptoken" in requests_made[1].query and "$select" not in requests_made[1].query


def test_delta_ignores_top_and_honours_a_smaller_maxpagesize(
    sim: GraphSimulator, http: requests.Session, bearer: dict[str, str]
) -> None:
    pages, _ = _round(http, f"{sim.base_url}/v1.0/users/delta?$top=2", bearer)
    assert [len(page) for page in pages] == [10]  # $top is not supported for users: ignored
    assert set(pages[0][0]) == set(DEFAULT_USER_PROPERTIES)
    answer = _get(http, f"{sim.base_url}/v1.0/users/delta", bearer, Prefer="odata.maxpagesize=4")
    assert len(answer.json()["value"]) == 4
    assert answer.headers["Preference-Applied"] == "odata.maxpagesize=4"
    sim.delta_page_size = 5
    answer = _get(http, f"{sim.base_url}/v1.0/users/delta", bearer, Prefer="odata.maxpagesize=999")
    assert len(answer.json()["value"]) == 5  # never more than the server's page


def test_delta_spellings_and_refused_options(
    sim: GraphSimulator, http: requests.Session, bearer: dict[str, str]
) -> None:
    for path in ("users/delta()", "users/microsoft.graph.delta()", "users/microsoft.graph.delta"):
        assert len(_get(http, f"{sim.base_url}/v1.0/{path}", bearer).json()["value"]) == 10
    for option in ("$orderby=displayName", "$expand=manager", "$count=true"):
        answer = _get(http, f"{sim.base_url}/v1.0/users/delta?{option}", bearer)
        assert answer.status_code == 400, option
    bad = _get(http, f"{sim.base_url}/v1.0/users/delta?$filter=accountEnabled eq true", bearer)
    assert bad.status_code == 400 and _error_code(bad) == "Request_UnsupportedQuery"


def test_deltatoken_latest_starts_tracking_now(
    sim: GraphSimulator, http: requests.Session, bearer: dict[str, str]
) -> None:
    answer = _get(http, f"{sim.base_url}/v1.0/users/delta?$deltatoken=latest&$select=displayName", bearer)
    body = answer.json()
    assert body["value"] == [] and "@odata.nextLink" not in body
    sim.patch_user(TENANT, tenant_data.user_id(2), displayName="Renamed")
    pages, _ = _round(http, body["@odata.deltaLink"], bearer)
    assert _flat(pages) == [{"displayName": "Renamed", "id": tenant_data.user_id(2)}]


def test_delta_reports_created_changed_and_removed_users(
    sim: GraphSimulator, http: requests.Session, bearer: dict[str, str]
) -> None:
    url = f"{sim.base_url}/v1.0/users/delta?$select=displayName,accountEnabled"
    _, delta_link = _round(http, url, bearer)
    sim.patch_user(TENANT, tenant_data.user_id(1), accountEnabled=False)
    sim.delete_user(TENANT, tenant_data.user_id(3))
    sim.delete_user(TENANT, tenant_data.user_id(4), hard=True)
    sim.upsert_user(TENANT, tenant_data.graph_user(42))
    pages, next_link = _round(http, delta_link, bearer)
    assert _flat(pages) == [
        {"displayName": "User 1", "accountEnabled": False, "id": tenant_data.user_id(1)},
        {"id": tenant_data.user_id(3), "@removed": {"reason": "changed"}},
        {"id": tenant_data.user_id(4), "@removed": {"reason": "deleted"}},
        {"displayName": "User 42", "accountEnabled": True, "id": tenant_data.user_id(42)},
    ]
    # Nothing changed since: an empty round, and still a new token.
    pages, last_link = _round(http, next_link, bearer)
    assert _flat(pages) == [] and last_link != next_link
    # A restored user comes back whole; a soft-deleted one then hard-deleted is reported "deleted".
    sim.restore_user(TENANT, tenant_data.user_id(3))
    pages, last_link = _round(http, last_link, bearer)
    assert _flat(pages) == [{"displayName": "User 3", "accountEnabled": True, "id": tenant_data.user_id(3)}]
    sim.delete_user(TENANT, tenant_data.user_id(3))
    sim.delete_user(TENANT, tenant_data.user_id(3), hard=True)
    pages, _ = _round(http, last_link, bearer)
    assert _flat(pages) == [{"id": tenant_data.user_id(3), "@removed": {"reason": "deleted"}}]


def test_delta_tracks_only_selected_properties_and_not_license_states(
    sim: GraphSimulator, http: requests.Session, bearer: dict[str, str]
) -> None:
    url = f"{sim.base_url}/v1.0/users/delta?$select=displayName,licenseAssignmentStates"
    _, delta_link = _round(http, url, bearer)
    version = sim.user_version(TENANT, tenant_data.user_id(5))
    sim.patch_user(TENANT, tenant_data.user_id(5), department="Elsewhere")  # not selected
    errored = [tenant_data.license_state(tenant_data.INTUNE_A_SKU, state="Error", error="CountViolation")]
    assert sim.patch_user(TENANT, tenant_data.user_id(6), licenseAssignmentStates=errored) is None
    assert sim.user_version(TENANT, tenant_data.user_id(6)) == 0  # untracked: no change logged
    assert sim.user_version(TENANT, tenant_data.user_id(5)) > version
    pages, delta_link = _round(http, delta_link, bearer)
    assert _flat(pages) == []
    # When the user surfaces for a tracked change, the current licence states come along.
    sim.patch_user(TENANT, tenant_data.user_id(6), displayName="Six")
    pages, _ = _round(http, delta_link, bearer)
    assert _flat(pages) == [
        {"displayName": "Six", "licenseAssignmentStates": errored, "id": tenant_data.user_id(6)}
    ]
    listed = _get(
        http, f"{sim.base_url}/v1.0/users?$select=id,licenseAssignmentStates&$top=999", bearer
    ).json()
    assert listed["value"][6]["licenseAssignmentStates"] == errored


def test_delta_minimal_answers_carry_only_changed_properties(
    sim: GraphSimulator, http: requests.Session, bearer: dict[str, str]
) -> None:
    url = f"{sim.base_url}/v1.0/users/delta?$select=displayName,jobTitle,accountEnabled"
    _, first_link = _round(http, url, bearer)
    sim.patch_user(TENANT, tenant_data.user_id(7), jobTitle="Engineer")
    pages, _ = _round(http, first_link, bearer, Prefer="return=minimal")
    assert _flat(pages) == [{"id": tenant_data.user_id(7), "jobTitle": "Engineer"}]
    pages, _ = _round(http, first_link, bearer)  # the default: every selected property
    assert _flat(pages) == [
        {
            "displayName": "User 7",
            "jobTitle": "Engineer",
            "accountEnabled": True,
            "id": tenant_data.user_id(7),
        }
    ]
    sim.delta_partial = True
    sim.patch_user(TENANT, tenant_data.user_id(8), jobTitle=None, displayName="Eight")
    pages, _ = _round(http, first_link, bearer)
    assert _flat(pages)[1] == {
        "id": tenant_data.user_id(8),
        "displayName": "Eight",
    }  # jobTitle was null already


def test_delta_replays_and_duplicates_on_request(
    sim: GraphSimulator, http: requests.Session, bearer: dict[str, str]
) -> None:
    _, delta_link = _round(http, f"{sim.base_url}/v1.0/users/delta?$select=displayName", bearer)
    sim.patch_user(TENANT, tenant_data.user_id(1), displayName="One")
    _, delta_link = _round(http, delta_link, bearer)
    sim.patch_user(TENANT, tenant_data.user_id(2), displayName="Two")
    sim.delta_replay = 1
    pages, _ = _round(http, delta_link, bearer)
    assert [u["id"] for u in _flat(pages)] == [tenant_data.user_id(1), tenant_data.user_id(2)]
    sim.delta_replay = 0
    sim.delta_duplicates = 1
    sim.delta_page_size = 4
    pages, _ = _round(http, f"{sim.base_url}/v1.0/users/delta?$select=displayName", bearer)
    ids = [u["id"] for u in _flat(pages)]
    assert len(ids) == 11 and ids[-1] == ids[0] == tenant_data.user_id(0)


def test_delta_with_id_filter_tracks_only_those_users(
    sim: GraphSimulator, http: requests.Session, bearer: dict[str, str]
) -> None:
    wanted = (tenant_data.user_id(2), tenant_data.user_id(9))
    url = f"{sim.base_url}/v1.0/users/delta?$filter=id eq '{wanted[0]}' or id eq '{wanted[1]}'&$select=displayName"
    pages, delta_link = _round(http, url, bearer)
    assert [u["id"] for u in _flat(pages)] == list(wanted)
    sim.patch_user(TENANT, tenant_data.user_id(3), displayName="Three")
    sim.patch_user(TENANT, tenant_data.user_id(9), displayName="Nine")
    pages, _ = _round(http, delta_link, bearer)
    assert _flat(pages) == [{"displayName": "Nine", "id": tenant_data.user_id(9)}]


def test_expired_delta_token_answers_sync_state_not_found(
    sim: GraphSimulator, http: requests.Session, bearer: dict[str, str]
) -> None:
    _, delta_link = _round(http, f"{sim.base_url}/v1.0/users/delta?$select=displayName", bearer)
    sim.advance(7 * 86400 - 60)
    _, fresh_link = _round(http, delta_link, bearer)  # still valid, and the new token lives 7 days again
    sim.advance(120)
    expired = _get(http, delta_link, bearer)
    assert expired.status_code == 400
    assert _error_code(expired) == "syncStateNotFound"
    assert "expired" in expired.json()["error"]["message"]
    assert _get(http, fresh_link, bearer).status_code == 200


def test_expired_delta_token_can_answer_410_with_a_location_to_start_over(
    sim: GraphSimulator, http: requests.Session, bearer: dict[str, str]
) -> None:
    sim.delta_expired_status = 410
    _, delta_link = _round(http, f"{sim.base_url}/v1.0/users/delta?$select=displayName", bearer)
    sim.advance(8 * 86400)
    gone = _get(http, delta_link, bearer)
    assert gone.status_code == 410
    location = gone.headers["Location"]
    assert location.endswith("$deltatoken=") and "$select=displayName,id" in location
    pages, _ = _round(http, location, bearer)  # a full resync
    assert len(_flat(pages)) == 10 and set(_flat(pages)[0]) == {"displayName", "id"}


def test_invalidated_unknown_and_garbage_delta_tokens(
    sim: GraphSimulator, http: requests.Session, bearer: dict[str, str]
) -> None:
    sim.delta_page_size = 4
    first = _get(http, f"{sim.base_url}/v1.0/users/delta", bearer).json()
    _, delta_link = _round(http, f"{sim.base_url}/v1.0/users/delta", bearer)
    assert sim.invalidate_delta_tokens() >= 2
    assert _error_code(_get(http, delta_link, bearer)) == "syncStateNotFound"
    assert (
        _error_code(_get(http, first["@odata.nextLink"], bearer)) == "syncStateNotFound"
    )  # a round under way
    unknown = _get(http, f"{sim.base_url}/v1.0/users/delta?$deltatoken={'A' * 64}", bearer)
    assert unknown.status_code == 400 and _error_code(unknown) == "syncStateNotFound"
    garbage = _get(http, f"{sim.base_url}/v1.0/users/delta?$deltatoken=not%20a%20token", bearer)
    assert garbage.status_code == 400 and _error_code(garbage) == "Request_BadRequest"
    sim.invalidate_delta_tokens(status=410)
    assert _get(http, delta_link, bearer).status_code == 410


def test_replacing_the_user_list_is_seen_as_changes(
    sim: GraphSimulator, http: requests.Session, bearer: dict[str, str]
) -> None:
    _, delta_link = _round(http, f"{sim.base_url}/v1.0/users/delta?$select=displayName", bearer)
    users = tenant_data.users(10)
    users[0]["displayName"] = "Zero"
    sim.tenants[TENANT].users = users[:9]
    pages, _ = _round(http, delta_link, bearer)
    assert _flat(pages) == [
        {"id": tenant_data.user_id(9), "@removed": {"reason": "deleted"}},
        {"displayName": "Zero", "id": tenant_data.user_id(0)},
    ]


# ---------------------------------------------------------------------------- point look-ups, $filter, $count
def test_get_user_by_id_or_user_principal_name(
    sim: GraphSimulator, http: requests.Session, bearer: dict[str, str]
) -> None:
    by_id = _get(http, f"{sim.base_url}/v1.0/users/{tenant_data.user_id(4)}", bearer).json()
    assert set(by_id) == {"@odata.context", *DEFAULT_USER_PROPERTIES}
    url = f"{sim.base_url}/v1.0/users/USER00004@contoso.example?$select=id,usageLocation,licenseAssignmentStates"
    by_upn = _get(http, url, bearer).json()
    assert by_upn["id"] == tenant_data.user_id(4) and by_upn["usageLocation"] == "DE"
    assert by_upn["licenseAssignmentStates"][0]["skuId"] == tenant_data.INTUNE_A_SKU
    assert set(by_upn) == {"@odata.context", "id", "usageLocation", "licenseAssignmentStates"}
    missing = _get(http, f"{sim.base_url}/v1.0/users/nobody@contoso.example", bearer)
    assert missing.status_code == 404 and _error_code(missing) == "Request_ResourceNotFound"
    sim.delete_user(TENANT, tenant_data.user_id(4))
    assert _get(http, f"{sim.base_url}/v1.0/users/{tenant_data.user_id(4)}", bearer).status_code == 404
    bad = _get(http, f"{sim.base_url}/v1.0/users/{tenant_data.user_id(5)}?$select=nonsense", bearer)
    assert bad.status_code == 400


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("userPrincipalName eq 'USER00003@contoso.example'", [3]),
        (f"id eq '{tenant_data.user_id(7)}'", [7]),
        (f"onPremisesSecurityIdentifier eq '{tenant_data.sid(2)}'", [2]),
        ("startswith(displayName,'User 1')", [1]),
        ("startsWith(userPrincipalName, 'user0000') and accountEnabled eq true", list(range(10))),
        ("userPrincipalName in ('user00001@contoso.example', 'user00008@contoso.example')", [1, 8]),
        ("mail eq 'user00006@contoso.example' or usageLocation eq 'XX'", [6]),
        (f"assignedLicenses/any(x:x/skuId eq {tenant_data.INTUNE_A_SKU})", list(range(10))),
        ("onPremisesSyncEnabled eq true and displayName eq 'User 9'", [9]),
    ],
)
def test_filters_that_work_by_default(
    sim: GraphSimulator, http: requests.Session, bearer: dict[str, str], expression: str, expected: list[int]
) -> None:
    answer = _get(http, f"{sim.base_url}/v1.0/users?$filter={expression}&$select=id", bearer)
    assert answer.status_code == 200, answer.text
    assert [u["id"] for u in answer.json()["value"]] == [tenant_data.user_id(i) for i in expected]
    assert "@odata.count" not in answer.json()


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        (f"onPremisesImmutableId eq '{tenant_data.immutable_id(5)}'", [5]),
        ("onPremisesSamAccountName eq 'user00002'", [2]),
        ("endswith(userPrincipalName,'00004@contoso.example')", [4]),
        ("accountEnabled ne true", []),
        ("not(displayName eq 'User 0') and startswith(displayName,'User 1')", [1]),
        (
            "onPremisesLastSyncDateTime ge 2024-04-01T00:00:00Z and id eq '" + tenant_data.user_id(3) + "'",
            [3],
        ),
    ],
)
def test_filters_that_need_advanced_query_parameters(
    sim: GraphSimulator, http: requests.Session, bearer: dict[str, str], expression: str, expected: list[int]
) -> None:
    url = f"{sim.base_url}/v1.0/users?$filter={expression}&$select=id"
    refused = _get(http, url, bearer)
    assert refused.status_code == 400
    assert _error_code(refused) == "Request_UnsupportedQuery"
    refused = _get(http, url + "&$count=true", bearer)  # both parameters are needed
    assert refused.status_code == 400
    refused = _get(http, url, bearer, ConsistencyLevel="eventual")
    assert refused.status_code == 400
    answer = _get(http, url + "&$count=true", bearer, ConsistencyLevel="eventual")
    assert answer.status_code == 200, answer.text
    assert [u["id"] for u in answer.json()["value"]] == [tenant_data.user_id(i) for i in expected]
    assert answer.json()["@odata.count"] == len(expected)


@pytest.mark.parametrize(
    "expression",
    [
        "licenseAssignmentStates/any(x:x/state eq 'Error')",
        "nonsense eq 1",
        "displayName eq",
        "userPrincipalName gt 'a'",
    ],
)
def test_filters_graph_refuses_even_in_advanced_mode(
    sim: GraphSimulator, http: requests.Session, bearer: dict[str, str], expression: str
) -> None:
    url = f"{sim.base_url}/v1.0/users?$filter={expression}&$count=true"
    assert _get(http, url, bearer, ConsistencyLevel="eventual").status_code == 400


def test_filtered_listing_pages_with_the_filter_in_the_next_link(
    sim: GraphSimulator, http: requests.Session, bearer: dict[str, str]
) -> None:
    sim.tenants[TENANT].users = tenant_data.users(30)
    url = f"{sim.base_url}/v1.0/users?$filter=startswith(displayName,'User 1')&$select=id,displayName&$top=4"
    ids, link = [], url
    while link:
        body = _get(http, link, bearer).json()
        ids += [u["id"] for u in body["value"]]
        link = body.get("@odata.nextLink")
        assert link is None or "$filter=" in link
    assert ids == [tenant_data.user_id(i) for i in (1, *range(10, 20))]


def test_count_needs_consistency_level_eventual(
    sim: GraphSimulator, http: requests.Session, bearer: dict[str, str]
) -> None:
    silent = _get(http, f"{sim.base_url}/v1.0/users?$count=true", bearer)
    assert silent.status_code == 200 and "@odata.count" not in silent.json()  # ignored without the header
    counted = _get(http, f"{sim.base_url}/v1.0/users?$count=true&$top=3", bearer, ConsistencyLevel="eventual")
    assert counted.json()["@odata.count"] == 10 and len(counted.json()["value"]) == 3
    assert _get(http, counted.json()["@odata.nextLink"], bearer).json()["@odata.count"] == 10
    refused = _get(http, f"{sim.base_url}/v1.0/users/$count", bearer)
    assert (
        refused.status_code == 400
        and "$count is not currently supported" in refused.json()["error"]["message"]
    )
    plain = _get(http, f"{sim.base_url}/v1.0/users/%24count", bearer, ConsistencyLevel="eventual")
    assert (
        plain.status_code == 200
        and plain.text == "10"
        and plain.headers["Content-Type"].startswith("text/plain")
    )
    filtered = _get(
        http, f"{sim.base_url}/v1.0/users/$count?$filter=onPremisesSamAccountName eq 'user00001'", bearer,
        ConsistencyLevel="eventual",
    )  # fmt: skip
    assert filtered.text == "1"
    sim.delete_user(TENANT, tenant_data.user_id(0))
    assert _get(http, f"{sim.base_url}/v1.0/users/$count", bearer, ConsistencyLevel="eventual").text == "9"


# ---------------------------------------------------------------------------- Intune managed devices
def _devices(count: int) -> list[dict[str, Any]]:
    return [tenant_data.managed_device(i, i % 7) for i in range(count)]


def test_managed_devices_page_and_filter_by_user(sim: GraphSimulator, http: requests.Session) -> None:
    sim.tenants[TENANT].devices = _devices(25)
    sim.devices_page_size = 10
    headers = _grant(sim, http, "DeviceManagementManagedDevices.Read.All")
    url = f"{sim.base_url}/v1.0/deviceManagement/managedDevices?$select=id,userId,complianceState"
    seen, link, sizes = [], url, []
    while link:
        body = _get(http, link, headers).json()
        sizes.append(len(body["value"]))
        seen += body["value"]
        link = body.get("@odata.nextLink")
    assert sizes == [10, 10, 5]
    assert [d["id"] for d in seen] == [tenant_data.device_id(i) for i in range(25)]
    assert set(seen[0]) == {"id", "userId", "complianceState"}
    assert len(_get(http, url + "&$top=3", headers).json()["value"]) == 3
    assert len(_get(http, url + "&$top=50", headers).json()["value"]) == 10  # capped at the page size
    user = tenant_data.user_id(3)
    mine = _get(http, f"{url}&$filter=userId eq '{user}'", headers).json()["value"]
    assert [d["id"] for d in mine] == [tenant_data.device_id(i) for i in (3, 10, 17, 24)]
    whole = _get(http, f"{sim.base_url}/v1.0/deviceManagement/managedDevices", headers).json()["value"][0]
    assert whole == tenant_data.managed_device(0, 0)
    one = _get(
        http, f"{sim.base_url}/v1.0/deviceManagement/managedDevices/{tenant_data.device_id(4)}", headers
    )
    assert one.json()["deviceName"] == "DESKTOP-000004"


def test_managed_devices_refuse_like_intune(sim: GraphSimulator, http: requests.Session) -> None:
    sim.tenants[TENANT].devices = _devices(2)
    headers = _grant(sim, http, "User.Read.All", "Directory.Read.All")
    denied = _get(http, f"{sim.base_url}/v1.0/deviceManagement/managedDevices", headers)
    assert denied.status_code == 403
    assert _error_code(denied) == "Forbidden"
    inner = json.loads(denied.json()["error"]["message"])  # Intune's own error document, as text
    assert inner["_version"] == 3
    assert "DeviceManagementManagedDevices.Read.All" in inner["Message"]
    headers = _grant(sim, http, "DeviceManagementManagedDevices.ReadWrite.All")
    url = f"{sim.base_url}/v1.0/deviceManagement/managedDevices"
    assert _get(http, url, headers).status_code == 200
    assert _get(http, url + "?$select=nonsense", headers).status_code == 400
    assert _get(http, url + "?$filter=startswith(deviceName,'D')", headers).status_code == 400


# ---------------------------------------------------------------------------- groups
@pytest.mark.parametrize("permission", ["GroupMember.Read.All", "Group.Read.All", "Directory.Read.All"])
def test_group_by_id(sim: GraphSimulator, http: requests.Session, permission: str) -> None:
    headers = _grant(sim, http, permission)
    url = f"{sim.base_url}/v1.0/groups/{tenant_data.INTUNE_USERS_GROUP}?$select=id,displayName"
    body = _get(http, url, headers).json()
    assert body["displayName"] == "Intune Users" and set(body) == {"@odata.context", "id", "displayName"}
    missing = _get(http, f"{sim.base_url}/v1.0/groups/{tenant_data.user_id(1)}", headers)
    assert missing.status_code == 404 and _error_code(missing) == "Request_ResourceNotFound"


def test_group_needs_a_group_permission(sim: GraphSimulator, http: requests.Session) -> None:
    headers = _grant(sim, http, "User.Read.All")
    denied = _get(http, f"{sim.base_url}/v1.0/groups/{tenant_data.INTUNE_USERS_GROUP}", headers)
    assert denied.status_code == 403 and _error_code(denied) == "Authorization_RequestDenied"


# ---------------------------------------------------------------------------- throttling headers
def test_resource_units_as_graph_counts_them(
    sim: GraphSimulator, http: requests.Session, bearer: dict[str, str]
) -> None:
    def units(path: str) -> str | None:
        return _get(http, f"{sim.base_url}/v1.0/{path}", bearer).headers.get("x-ms-resource-unit")

    assert units("users") == "2"
    assert units("users?$select=id") == "1"
    assert units("users?$top=5") == "1"
    assert units("subscribedSkus") == "3"
    assert units("users/delta") == "1"
    assert units(f"users/{tenant_data.user_id(1)}") == "1"
    answer = _get(http, f"{sim.base_url}/v1.0/users", bearer)
    assert "x-ms-throttle-limit-percentage" not in answer.headers  # only above 0.8 of the budget


def test_throttle_limit_percentage_and_enforced_budget(
    sim: GraphSimulator, http: requests.Session, bearer: dict[str, str]
) -> None:
    sim.throttle.limit_percentage["users"] = 0.93
    assert _get(http, f"{sim.base_url}/v1.0/users", bearer).headers["x-ms-throttle-limit-percentage"] == "0.9"
    sim.throttle.limit_percentage.clear()
    sim.throttle.budget = 12
    sim.throttle.enforce = True
    statuses, percentages = [], []
    for _ in range(6):  # 2 units each, after the 2 above: 4, 6, 8, 10 (> 0.8), 12 (1.0), 14 (over)
        answer = _get(http, f"{sim.base_url}/v1.0/users", bearer)
        statuses.append(answer.status_code)
        percentages.append(answer.headers.get("x-ms-throttle-limit-percentage"))
    assert statuses == [200, 200, 200, 200, 200, 429]
    assert percentages == [None, None, None, "0.8", "1.0", "1.2"]
    assert int(answer.headers["Retry-After"]) >= 1
    assert (
        answer.headers["x-ms-throttle-scope"]
        == f"Tenant_Application/ReadWrite/{tenant_data.CLIENT_ID}/{TENANT}"
    )
    assert answer.headers["x-ms-throttle-information"] == "ResourceUnitLimitExceeded"


def test_intune_answers_carry_no_resource_units_unless_asked(
    sim: GraphSimulator, http: requests.Session
) -> None:
    headers = _grant(sim, http, "DeviceManagementManagedDevices.Read.All")
    url = f"{sim.base_url}/v1.0/deviceManagement/managedDevices"
    assert "x-ms-resource-unit" not in _get(http, url, headers).headers
    sim.throttle.resource_unit_headers["managedDevices"] = True
    assert _get(http, url, headers).headers["x-ms-resource-unit"] == "1"


# ---------------------------------------------------------------------------- fault kinds
def test_trickle_sends_the_body_a_byte_at_a_time(
    sim: GraphSimulator, http: requests.Session, bearer: dict[str, str]
) -> None:
    sim.add_fault("organization", 1, "trickle", interval=0.05, duration=0.5)
    started = time.monotonic()
    answer = http.get(f"{sim.base_url}/v1.0/organization", headers=bearer, timeout=(5, 0.3), stream=True)
    assert answer.status_code == 200  # status and headers come at once
    assert time.monotonic() - started < 0.3
    body = answer.content  # each byte arrives well within the 0.3 s read timeout
    assert time.monotonic() - started >= 0.5
    assert json.loads(body)["value"][0]["displayName"] == "Contoso"
    sim.add_fault("organization", 2, "trickle", interval=0.05, duration=0.2, then="close")
    with pytest.raises(requests.RequestException):
        http.get(f"{sim.base_url}/v1.0/organization", headers=bearer, timeout=5).json()


def test_trickle_without_duration_goes_on_until_the_faults_are_cleared(
    sim: GraphSimulator, http: requests.Session, bearer: dict[str, str]
) -> None:
    sim.add_fault("organization", 1, "trickle", interval=0.05)
    answer = http.get(f"{sim.base_url}/v1.0/organization", headers=bearer, timeout=5, stream=True)
    chunks = answer.iter_content(chunk_size=1)
    first = [next(chunks) for _ in range(5)]
    assert all(len(chunk) == 1 for chunk in first)
    sim.clear_faults()
    assert json.loads(b"".join(first) + b"".join(chunks))["value"]


def test_hang_answers_nothing_until_the_faults_are_cleared(
    sim: GraphSimulator, http: requests.Session, bearer: dict[str, str]
) -> None:
    sim.add_fault("users", 1, "hang", times=2)
    with pytest.raises(requests.ReadTimeout):
        http.get(f"{sim.base_url}/v1.0/users", headers=bearer, timeout=(5, 0.3))
    result: list[int] = []
    waiter = threading.Thread(
        target=lambda: result.append(
            http.get(f"{sim.base_url}/v1.0/users", headers=bearer, timeout=10).status_code
        )
    )
    waiter.start()
    time.sleep(0.3)
    assert result == []
    sim.clear_faults()
    waiter.join(timeout=5)
    assert result == [200]


def test_truncate_leaves_out_the_next_link(
    sim: GraphSimulator, http: requests.Session, bearer: dict[str, str]
) -> None:
    sim.add_fault("users", 1, "truncate")
    page = _get(http, f"{sim.base_url}/v1.0/users?$top=3", bearer).json()
    assert len(page["value"]) == 3 and "@odata.nextLink" not in page  # although 7 more users exist
    assert "@odata.nextLink" in _get(http, f"{sim.base_url}/v1.0/users?$top=3", bearer).json()
    sim.delta_page_size = 3
    sim.add_fault("usersDelta", 1, "truncate")
    body = _get(http, f"{sim.base_url}/v1.0/users/delta", bearer).json()
    assert len(body["value"]) == 3 and "@odata.nextLink" not in body and "@odata.deltaLink" not in body


def test_malformed_json_with_a_good_status(
    sim: GraphSimulator, http: requests.Session, bearer: dict[str, str]
) -> None:
    sim.add_fault("users", 1, "malformed")
    answer = _get(http, f"{sim.base_url}/v1.0/users", bearer)
    assert answer.status_code == 200 and answer.headers["Content-Type"].startswith("application/json")
    with pytest.raises(ValueError):
        answer.json()


def test_clear_faults_drops_faults_not_yet_hit(
    sim: GraphSimulator, http: requests.Session, bearer: dict[str, str]
) -> None:
    sim.add_fault("users", 2, "503", times=5)
    assert _get(http, f"{sim.base_url}/v1.0/users", bearer).status_code == 200
    sim.clear_faults()
    assert _get(http, f"{sim.base_url}/v1.0/users", bearer).status_code == 200


def test_pause_refuses_connections_and_resume_listens_on_the_same_port(
    sim: GraphSimulator, http: requests.Session, bearer: dict[str, str]
) -> None:
    port = sim.port
    assert _get(http, f"{sim.base_url}/v1.0/users", bearer).status_code == 200  # a pooled connection now
    sim.pause()
    try:
        with pytest.raises(requests.ConnectionError):
            _get(http, f"{sim.base_url}/v1.0/users", bearer)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        sim.resume()
    assert sim.port == port
    assert _get(http, f"{sim.base_url}/v1.0/users", bearer).status_code == 200
    sim.pause()
    sim.reset()  # listens again, so that one failed test cannot take the server down for the rest
    sim.add_tenant(tenant_data.tenant())
    assert _get(http, f"{sim.base_url}/v1.0/organization", _grant(sim, http, "Organization.Read.All")).ok


def test_pause_cuts_a_hanging_request(
    sim: GraphSimulator, http: requests.Session, bearer: dict[str, str]
) -> None:
    sim.add_fault("users", 1, "hang")
    errors: list[BaseException] = []

    def call() -> None:
        try:
            http.get(f"{sim.base_url}/v1.0/users", headers=bearer, timeout=10)
        except requests.RequestException as error:
            errors.append(error)

    waiter = threading.Thread(target=call)
    waiter.start()
    time.sleep(0.3)
    sim.pause()
    sim.resume()
    waiter.join(timeout=5)
    assert not waiter.is_alive() and len(errors) == 1
    assert [r.status for r in sim.requests_to("users")] == [None]


def test_counters_per_endpoint_and_status(
    sim: GraphSimulator, http: requests.Session, bearer: dict[str, str]
) -> None:
    sim.reset_counters()
    sim.add_fault("users", 2, "429", retry_after=1)
    for _ in range(3):
        _get(http, f"{sim.base_url}/v1.0/users", bearer)
    _get(http, f"{sim.base_url}/v1.0/users/delta", bearer)
    assert sim.request_counts() == {"users": 3, "usersDelta": 1}
    assert sim.status_counts() == {"users": {"200": 2, "429": 1}, "usersDelta": {"200": 1}}
    assert sim.requests_to("usersDelta")[0].headers == {}


# ---------------------------------------------------------------------------- standalone mode
REPO = Path(__file__).resolve().parents[2]


@contextmanager
def _standalone(tmp_path: Path, *source: str) -> Iterator[tuple[dict[str, Any], requests.Session]]:
    """Run `python -m tests.entra.graph_sim serve` and yield its JSON line and a session trusting its CA."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.entra.graph_sim",
            "serve",
            "--port",
            "0",
            "--cert-dir",
            str(tmp_path),
            *source,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line, process.stderr.read() if process.stderr else "no output"
        info = json.loads(line)
        with _session(info["ca_file"]) as session:
            yield info, session
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0


def _standalone_token(info: dict[str, Any], http: requests.Session) -> dict[str, str]:
    data = {
        "grant_type": "client_credentials",
        "client_id": info["client_id"],
        "client_secret": info["client_secret"],
        "scope": f"{info['base_url']}/.default",
    }
    answer = http.post(f"{info['base_url']}/{info['tenant_id']}/oauth2/v2.0/token", data=data, timeout=10)
    assert answer.status_code == 200, answer.text
    return {"Authorization": f"Bearer {answer.json()['access_token']}"}


def test_standalone_server_with_synthetic_users_and_admin_endpoints(tmp_path: Path) -> None:
    with _standalone(tmp_path, "--synthetic-users", "3000", "--seed", "3") as (info, http):
        assert info["users"] == 3000 and info["devices"] > 2500
        assert Path(info["ca_file"]).read_text().startswith("-----BEGIN CERTIFICATE-----")
        base, headers = info["base_url"], _standalone_token(info, http)
        listed, link = 0, f"{base}/v1.0/users?$select=id,licenseAssignmentStates&$top=999"
        while link:
            body = _get(http, link, headers).json()
            listed += len(body["value"])
            link = body.get("@odata.nextLink")
        assert listed == 3000
        pages, delta_link = _round(http, f"{base}/v1.0/users/delta?$select=displayName,department", headers)
        assert len(_flat(pages)) == 3000 and len(pages) == 15  # 200 per page
        churn = http.post(
            f"{base}/_sim/churn", json={"fraction": 0.01, "license_only": 5, "seed": 9}, timeout=30
        )
        assert churn.json()["patch"] == 30 and churn.json()["license_only"] == 5
        first = _get(http, f"{base}/v1.0/users?$top=1&$select=id", headers).json()["value"][0]["id"]
        http.post(f"{base}/_sim/users", json={"hard_delete": [first]}, timeout=10).raise_for_status()
        pages, _ = _round(http, delta_link, headers)
        changes = _flat(pages)
        # 30 patched users (the deleted one may be among them); licence-only changes are not tracked.
        assert len(changes) in {30, 31}
        assert {"id": first, "@removed": {"reason": "deleted"}} in changes
        devices = _get(http, f"{base}/v1.0/deviceManagement/managedDevices?$select=id,userId", headers).json()
        assert len(devices["value"]) == 1000 and "@odata.nextLink" in devices
        http.post(
            f"{base}/_sim/faults",
            json={"endpoint": "users", "nth": 1, "kind": "503", "times": 99},
            timeout=10,
        )
        assert _get(http, f"{base}/v1.0/users", headers).status_code == 503
        http.delete(f"{base}/_sim/faults", timeout=10).raise_for_status()
        counters = http.get(f"{base}/_sim/counters", timeout=10).json()
        assert counters["requests"]["usersDelta"] == 15 + 1
        assert counters["requests"]["users"] == 4 + 1 + 1  # 4 pages of 999, $top=1, the fault
        assert counters["statuses"]["users"] == {"200": 5, "503": 1}
        http.post(f"{base}/_sim/counters/reset", timeout=10).raise_for_status()
        assert http.get(f"{base}/_sim/counters", timeout=10).json()["requests"] == {}
        stats = http.get(f"{base}/_sim/stats", timeout=10).json()["tenants"][info["tenant_id"]]
        assert stats["users"] == 2999 and stats["version"] >= 31
        http.post(f"{base}/_sim/advance", json={"seconds": 8 * 86400}, timeout=10).raise_for_status()
        assert _error_code(_get(http, delta_link, headers)) == "syncStateNotFound"


def test_standalone_server_reads_a_tenant_file(tmp_path: Path) -> None:
    lines = [json.dumps(user) for user in tenant_data.users(12)]
    lines.append(json.dumps({"@type": "managedDevice", **tenant_data.managed_device(0, 3)}))
    lines.append(json.dumps({"@type": "group", **tenant_data.group(tenant_data.user_id(99), "Pilot")}))
    tenant_file = tmp_path / "tenant.jsonl"
    tenant_file.write_text("\n".join(lines) + "\n")
    with _standalone(tmp_path, "--tenant-file", str(tenant_file)) as (info, http):
        assert info["users"] == 12 and info["devices"] == 1
        base, headers = info["base_url"], _standalone_token(info, http)
        user = _get(http, f"{base}/v1.0/users/user00011@contoso.example?$select=id", headers).json()
        assert user["id"] == tenant_data.user_id(11)
        device = _get(http, f"{base}/v1.0/deviceManagement/managedDevices", headers).json()["value"]
        assert device == [tenant_data.managed_device(0, 3)]
        group = _get(
            http, f"{base}/v1.0/groups/{tenant_data.user_id(99)}?$select=displayName", headers
        ).json()
        assert group["displayName"] == "Pilot"


def test_admin_endpoints_answer_only_what_they_know(tmp_path: Path) -> None:
    with _standalone(tmp_path, "--synthetic-users", "20") as (info, http):
        base = info["base_url"]
        assert http.get(f"{base}/_sim/nothing", timeout=10).status_code == 404
        bad = http.post(f"{base}/_sim/users", json={"patch": [{"id": "no-such-user", "x": 1}]}, timeout=10)
        assert bad.status_code == 400
        assert http.post(f"{base}/_sim/users", data=b"{not json", timeout=10).status_code == 400
        config = http.post(
            f"{base}/_sim/config", json={"delta_page_size": 7, "delta_partial": True}, timeout=10
        )
        assert config.json()["delta_page_size"] == 7 and config.json()["delta_partial"] is True
        assert http.post(f"{base}/_sim/config", json={"_lock": 1}, timeout=10).status_code == 400
        headers = _standalone_token(info, http)
        assert len(_get(http, f"{base}/v1.0/users/delta", headers).json()["value"]) == 7
