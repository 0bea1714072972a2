"""The decoding floor: what the client libraries alone cost to read the estate.

The exporter cannot read its sources for less CPU than the libraries it reads them with, so its
CPU is compared with these figures:

- AD: ldap3 paged search of the same entries, same attributes, same connection settings as the
  exporter (SYNC strategy over LDAPS, no schema), raw attributes only: BER decoding in ldap3.
- Entra: the same ``GET /v1.0/users`` pages, fetched once (their HTTP+TLS cost is shown apart), then
  ``json.loads`` of every page.
- ConfigMgr: pyodbc ``fetchmany`` of every v_R_User row the exporter selects, no conversion.

Each figure is this process's CPU time (``time.process_time``) for that loop alone.
"""

from __future__ import annotations

import json
import ssl
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from benchmarks.scale.cmdb import PostgresServer
from benchmarks.scale.estate import SERVICE_DN, STAFF_OU, USER_FILTER
from benchmarks.scale.graph import GraphService
from benchmarks.scale.slapd import SERVICE_PASSWORD, SlapdServer

AD_ATTRIBUTES = [
    "objectGUID",
    "objectSid",
    "sAMAccountName",
    "userPrincipalName",
    "whenCreated",
    "userAccountControl",
    "distinguishedName",
]
GRAPH_SELECT = (
    "id,userPrincipalName,accountEnabled,createdDateTime,onPremisesSyncEnabled,onPremisesImmutableId,"
    "onPremisesSecurityIdentifier,onPremisesSamAccountName,onPremisesLastSyncDateTime,"
    "onPremisesProvisioningErrors,assignedLicenses"
)
CM_SQL = (
    "SELECT ResourceID, Unique_User_Name0, User_Principal_Name0, Full_User_Name0, SID0, Object_GUID0, "
    "User_Account_Control0, Creation_Date0, CloudUserId FROM v_R_User"
)


@dataclass
class Measured:
    records: int
    cpu: float
    wall: float

    def line(self, what: str) -> str:
        return f"{what:<44} {self.records:>9} records  CPU {self.cpu:7.2f}s  wall {self.wall:7.2f}s"


def _measure(loop: Any) -> Measured:
    cpu, wall = time.process_time(), time.perf_counter()
    records = loop()
    return Measured(records, time.process_time() - cpu, time.perf_counter() - wall)


def ldap_floor(slapd: SlapdServer) -> Measured:
    import ldap3

    tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=str(slapd.ca_file))
    server = ldap3.Server("127.0.0.1", port=slapd.ldaps_port, use_ssl=True, tls=tls, get_info=ldap3.NONE)
    connection = ldap3.Connection(server, user=SERVICE_DN, password=SERVICE_PASSWORD, read_only=True)

    def loop() -> int:
        connection.open()
        connection.bind()
        count = 0
        for item in connection.extend.standard.paged_search(
            STAFF_OU, USER_FILTER, ldap3.SUBTREE, attributes=AD_ATTRIBUTES, paged_size=1000, generator=True
        ):
            if item.get("type") == "searchResEntry":
                count += 1 if item["raw_attributes"] else 0
        connection.unbind()
        return count

    return _measure(loop)


def graph_pages(graph: GraphService) -> tuple[list[bytes], Measured]:
    """Every page of the exporter's user query, as bytes (and what fetching them cost)."""
    context = ssl.create_default_context(cafile=str(graph.ca_file))
    form = urllib.parse.urlencode(
        {
            "grant_type": "client_credentials",
            "client_id": graph.client_id,
            "client_secret": graph.client_secret,
            "scope": f"{graph.base_url}/.default",
        }
    ).encode()
    token_url = f"{graph.base_url}/{graph.tenant_id}/oauth2/v2.0/token"
    with urllib.request.urlopen(token_url, data=form, context=context, timeout=60) as response:
        token = json.loads(response.read())["access_token"]
    pages: list[bytes] = []

    def loop() -> int:
        url: str | None = f"{graph.base_url}/v1.0/users?$select={GRAPH_SELECT}&$top=999"
        while url:
            request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(request, context=context, timeout=300) as response:
                body = response.read()
            pages.append(body)
            url = json.loads(body).get("@odata.nextLink")
        return len(pages)

    fetched = _measure(loop)
    return pages, fetched


def json_floor(pages: list[bytes]) -> Measured:
    def loop() -> int:
        return sum(len(json.loads(page)["value"]) for page in pages)

    return _measure(loop)


def odbc_floor(cm: PostgresServer, connection_string: str) -> Measured:
    import pyodbc

    def loop() -> int:
        connection = pyodbc.connect(connection_string, autocommit=True, timeout=30)
        try:
            cursor = connection.cursor()
            cursor.execute(CM_SQL)
            count = 0
            while rows := cursor.fetchmany(5000):
                count += len(rows)
            return count
        finally:
            connection.close()

    return _measure(loop)


@dataclass
class Floor:
    ldap: Measured
    graph_fetch: Measured
    graph_json: Measured
    odbc: Measured

    @property
    def total_cpu(self) -> float:
        """The floor the brief defines: decoding only (HTTP/TLS of Graph is shown apart)."""
        return self.ldap.cpu + self.graph_json.cpu + self.odbc.cpu

    def lines(self) -> list[str]:
        return [
            self.ldap.line("ldap3 paged search, raw attributes"),
            self.graph_fetch.line("Graph pages over HTTPS (urllib, pages)"),
            self.graph_json.line("json.loads of the Graph pages"),
            self.odbc.line("pyodbc fetchmany of v_R_User"),
            f"{'floor (ldap3 + json.loads + pyodbc)':<44} CPU {self.total_cpu:7.2f}s",
        ]


def measure_floor(
    slapd: SlapdServer, graph: GraphService, cm: PostgresServer, connection_string: str
) -> Floor:
    ldap = ldap_floor(slapd)
    pages, fetched = graph_pages(graph)
    return Floor(ldap, fetched, json_floor(pages), odbc_floor(cm, connection_string))
