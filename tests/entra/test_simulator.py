"""The simulator itself behaves like the identity platform and Graph where the client relies on it.

These talk raw HTTP to it, so that a simulator too lenient to catch a client bug fails here.
"""

from __future__ import annotations

import time
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
