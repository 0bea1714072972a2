"""The three real backends of the soak, holding one seeded estate with a known ground truth.

- **Active Directory**: the scale benchmark's AD-shaped OpenLDAP (``slapd`` on high loopback ports,
  so the test suite's Samba on 389/636 is left alone), loaded with ``slapadd``, behind a
  :class:`~benchmarks.soak.proxy.FaultProxy` that the exporter connects through (LDAPS).
- **Entra ID / Graph**: the test suite's Graph simulator, in this process, so that the soak can use
  its whole fault API (scripted 429/503 with Retry-After, 5xx, resets, malformed or truncated pages,
  hangs, trickles) and ``pause()``/``resume()`` (connection refused, then back on the same port).
- **ConfigMgr**: the test suite's ConfigMgr tables and v_* views in a SQLite file, read by the
  exporter through the ``SQLite3`` ODBC driver.

The estate and its truth come from :mod:`benchmarks.scale.estate` (a pure function of the user
count and the seed); nothing here runs the exporter's own stage model.
"""

from __future__ import annotations

import argparse
import csv
import sqlite3
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.scale.estate import EstateFiles, Truth
from benchmarks.scale.exporter_proc import Backends
from benchmarks.scale.graph import tenant_document
from benchmarks.scale.slapd import SlapdServer
from benchmarks.soak.proxy import FaultProxy
from tests.configmgr.cmdb import USER_DISC_COLUMNS, schema

_INTEGER_COLUMNS = {"ItemKey", "User_Account_Control0", "ResourceID", "ResourceType", "CollectionType"}
_INTEGER_COLUMNS |= {"MemberCount", "Status", "State"}
_TABLES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (EstateFiles.CM_USERS, "User_DISC", USER_DISC_COLUMNS),
    (EstateFiles.CM_MEMBERS, "CollectionMembers", ("CollectionID", "ResourceID", "ResourceType")),
    (EstateFiles.CM_COLLECTIONS, "Collections_G", ("CollectionID", "Name", "CollectionType", "MemberCount")),
    (
        EstateFiles.CM_COMPONENTS,
        "Summarizer_Components",
        ("SiteCode", "MachineName", "ComponentName", "Status", "State", "TallyInterval"),
    ),
)


def _value(column: str, text: str) -> object:
    """A CSV field as PostgreSQL's COPY would store it: empty is NULL, ``\\x..`` is bytes."""
    if text == "":
        return None
    if column in _INTEGER_COLUMNS:
        return int(text)
    if text.startswith("\\x"):
        return bytes.fromhex(text[2:])
    return text


def build_cm_database(estate_dir: Path, path: Path) -> None:
    """The ConfigMgr site database as a SQLite file (the suite's DDL, the estate's rows)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    connection = sqlite3.connect(path)
    try:
        for statement in schema("sqlite"):
            connection.execute(statement)
        for file_name, table, columns in _TABLES:
            with (estate_dir / file_name).open(newline="", encoding="utf-8") as handle:
                rows = [
                    tuple(_value(column, field) for column, field in zip(columns, row, strict=True))
                    for row in csv.reader(handle)
                ]
            marks = ", ".join("?" * len(columns))
            connection.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", rows)
        connection.execute(
            "CREATE INDEX ix_members_collection ON CollectionMembers (CollectionID, ResourceType)"
        )
        connection.commit()
    finally:
        connection.close()


class GraphBackend:
    """The Graph simulator in this process, serving the estate's tenant."""

    def __init__(self, estate_dir: Path, root: Path) -> None:
        import trustme

        from tests.entra.graph_sim import GraphSimulator
        from tests.entra.sim_server import DEFAULT_PERMISSIONS, build_tenant

        root.mkdir(parents=True, exist_ok=True)
        self.ca_file = root / "graph-ca.pem"
        ca = trustme.CA(organization_name="Fault soak Graph CA")
        ca.cert_pem.write_to_path(str(self.ca_file))
        arguments = argparse.Namespace(
            tenant_file=str(tenant_document(estate_dir)),
            synthetic_users=None,
            seed=1,
            device_share=0.0,
            tenant_id="",
            client_id="",
            client_secret="",
            permissions=",".join(DEFAULT_PERMISSIONS),
        )
        tenant, secret = build_tenant(arguments)
        self.tenant_id = tenant.tenant_id
        self.client_id = next(iter(tenant.apps))
        self.client_secret = secret
        self.sim = GraphSimulator(ca)
        self.sim.log = deque(maxlen=5000)  # the request log would otherwise grow for the whole soak
        self.sim.add_tenant(tenant)

    def start(self) -> None:
        self.sim.start()

    def stop(self) -> None:
        self.sim.stop()

    @property
    def base_url(self) -> str:
        return self.sim.base_url


@dataclass
class Servers:
    slapd: SlapdServer
    ad_proxy: FaultProxy
    graph: GraphBackend
    cm_path: Path  # the SQLite file; its directory is renamed away to take the database "down"

    def backends(self) -> Backends:
        return Backends(
            ldaps_url=f"ldaps://127.0.0.1:{self.ad_proxy.port}",
            ldap_ca_file=self.slapd.ca_file,
            graph_url=self.graph.base_url,
            graph_ca_file=self.graph.ca_file,
            tenant_id=self.graph.tenant_id,
            client_id=self.graph.client_id,
            client_secret=self.graph.client_secret,
            odbc_connection_string=f"DRIVER={{SQLite3}};Database={self.cm_path}",
        )


def start_servers(
    root: Path, estate_dir: Path, highest_usn: int, say: Callable[[str], None]
) -> Iterator[Servers]:
    """Start the servers (a generator: the caller closes it to stop them)."""
    slapd = SlapdServer(root / "ldap")
    (root / "ldap").mkdir(parents=True, exist_ok=True)
    slapd.prepare([estate_dir / EstateFiles.LDIF], highest_usn, log=lambda _: None)
    slapd.start()
    proxy: FaultProxy | None = None
    graph: GraphBackend | None = None
    try:
        proxy = FaultProxy(slapd.ldaps_port, name="ad-proxy")
        graph = GraphBackend(estate_dir, root / "graph")
        graph.start()
        cm_path = root / "cmdb" / "cm.sqlite"
        build_cm_database(estate_dir, cm_path)
        say(
            f"servers up: slapd {slapd.ldaps_url} behind the fault proxy on port {proxy.port}, "
            f"Graph simulator {graph.base_url}, ConfigMgr SQLite {cm_path}"
        )
        yield Servers(slapd, proxy, graph, cm_path)
    finally:
        if graph is not None:
            graph.stop()
        if proxy is not None:
            proxy.close()
        slapd.stop()


def first_upn(estate_dir: Path) -> str:
    """An in-scope user's UPN from the LDIF (for /trace): an enabled user under OU=Staff."""
    text = (estate_dir / EstateFiles.LDIF).read_text(encoding="utf-8")
    for entry in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in entry.splitlines() if ": " in line)
        enabled = not int(fields.get("userAccountControl", "2")) & 2
        person = "OU=Staff" in fields.get("dn", "") and fields.get("objectClass") != "computer"
        if enabled and person and "userPrincipalName" in fields:
            return fields["userPrincipalName"]
    raise RuntimeError("no enabled user with a UPN in the estate")


def load_truth(document: dict[str, Any]) -> Truth:
    return Truth.from_json(document["truth"])
