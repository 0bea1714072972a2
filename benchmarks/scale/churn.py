"""Applying the generated 1% change set to the running servers.

The victims were drawn by the generator (churn.json) and truth.json already holds the counts after
the change (``truth_after_churn``). Timestamps of what the change creates (whenCreated of new AD
accounts, createdDateTime of newly synced users, Creation_Date0 of new discovery records) are the
moment of the change: fresh, so never stuck during a run.

- AD: one LDIF of modifications through ``ldapmodify`` (OpenLDAP's C client, over LDAPS as the
  manager), each bumping ``uSNChanged`` past the published ``highestCommittedUSN``; then the new
  highest USN is published (slapd restart, see slapd.py).
- Entra: upserts, patches and deletions through the simulator's admin route.
- ConfigMgr: UPDATEs and INSERTs through the same ODBC driver the exporter uses.
"""

from __future__ import annotations

import base64
import os
import subprocess
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from benchmarks.scale.cmdb import PostgresServer
from benchmarks.scale.estate import NETBIOS, TENANT_ID, UPN_SUFFIX, graph_time, ldap_time
from benchmarks.scale.graph import GraphService
from benchmarks.scale.priority import niced
from benchmarks.scale.slapd import MANAGER_DN, SlapdServer
from tests.entra.tenant_data import INTUNE_A_SKU

Victims = dict[str, list[dict[str, Any]]]


@dataclass
class ChurnReport:
    ad_entries: int = 0
    entra_users: int = 0
    configmgr_rows: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    applied_at: float = 0.0


def apply_churn(churn: Victims, slapd: SlapdServer, graph: GraphService, cm: PostgresServer) -> ChurnReport:
    report = ChurnReport(applied_at=time.time())
    for name, step in (("ad", _apply_ad), ("entra", _apply_entra), ("configmgr", _apply_configmgr)):
        started = time.monotonic()
        count = step(churn, slapd, graph, cm, report.applied_at)
        setattr(
            report, {"ad": "ad_entries", "entra": "entra_users", "configmgr": "configmgr_rows"}[name], count
        )
        report.seconds[name] = time.monotonic() - started
    return report


# ------------------------------------------------------------------------------------ AD
def _apply_ad(churn: Victims, slapd: SlapdServer, graph: Any, cm: Any, now: float) -> int:
    usn = slapd.identity.highest_usn
    changed = ldap_time(now)
    blocks: list[str] = []

    def modify(dn: str, attribute: str, value: str) -> None:
        nonlocal usn
        usn += 1
        blocks.append(
            f"dn: {dn}\nchangetype: modify\nreplace: {attribute}\n{attribute}: {value}\n-\n"
            f"replace: uSNChanged\nuSNChanged: {usn}\n-\nreplace: whenChanged\nwhenChanged: {changed}\n"
        )

    for victim in churn.get("ad_touch", []):
        modify(victim["dn"], "description", f"password changed {changed}")
    for victim in churn.get("ad_disable", []):
        modify(victim["dn"], "userAccountControl", "514")
    for victim in churn.get("ad_upn", []):
        modify(victim["dn"], "userPrincipalName", f"{victim['sam']}@contoso.local")
    for new in churn.get("ad_new", []):
        usn += 1
        cn = new["dn"].split(",", 1)[0][3:]
        blocks.append(
            f"dn: {new['dn']}\nchangetype: add\nobjectClass: top\nobjectClass: person\n"
            f"objectClass: organizationalPerson\nobjectClass: user\ncn: {cn}\nsn: {new['surname']}\n"
            f"givenName: {new['given']}\nuserPrincipalName: {new['upn']}\nsAMAccountName: {new['sam']}\n"
            f"objectCategory: CN=Person,CN=Schema,CN=Configuration,DC=contoso,DC=com\n"
            f"objectGUID:: {new['guid']}\nobjectSid:: {new['sid']}\nuserAccountControl: {new['uac']}\n"
            f"whenCreated: {changed}\nwhenChanged: {changed}\nuSNCreated: {usn}\nuSNChanged: {usn}\n"
        )
    changes = slapd.root / "churn.ldif"
    changes.write_text("\n".join(blocks))
    subprocess.run(
        niced(
            [
                "ldapmodify",
                "-H",
                slapd.ldaps_url,
                "-x",
                "-D",
                MANAGER_DN,
                "-w",
                slapd.manager_password,
                "-f",
                str(changes),
            ]
        ),
        check=True,
        capture_output=True,
        env={**os.environ, "LDAPTLS_CACERT": str(slapd.ca_file), "LDAPTLS_REQCERT": "demand"},
    )
    slapd.publish_usn(usn)
    return len(blocks)


# ------------------------------------------------------------------------------------ Entra
def _apply_entra(churn: Victims, slapd: Any, graph: GraphService, cm: Any, now: float) -> int:
    upserts = [_newly_synced_user(victim, now) for victim in churn.get("entra_sync", [])]
    patches = [{"id": v["entra_id"], "accountEnabled": False} for v in churn.get("entra_disable", [])]
    patches += [
        {"id": v["entra_id"], "onPremisesLastSyncDateTime": graph_time(now)}
        for v in churn.get("entra_touch", [])
    ]
    deletes = [v["entra_id"] for v in churn.get("entra_delete", [])]
    graph.apply(upsert=upserts, patch=patches, delete=deletes)
    return len(upserts) + len(patches) + len(deletes)


def _newly_synced_user(victim: dict[str, Any], now: float) -> dict[str, Any]:
    return {
        "id": victim["entra_id"],
        "displayName": victim["full_name"],
        "userPrincipalName": victim["upn"],
        "mail": victim["upn"],
        "accountEnabled": True,
        "createdDateTime": graph_time(now),
        "onPremisesSyncEnabled": True,
        "onPremisesImmutableId": victim["guid"],
        "onPremisesSecurityIdentifier": victim["sid"],
        "onPremisesSamAccountName": victim["sam"],
        "onPremisesDomainName": UPN_SUFFIX,
        "onPremisesLastSyncDateTime": graph_time(now),
        "onPremisesProvisioningErrors": [],
        "assignedLicenses": [{"disabledPlans": [], "skuId": INTUNE_A_SKU}],
    }


# ------------------------------------------------------------------------------------ ConfigMgr
def _apply_configmgr(churn: Victims, slapd: Any, graph: Any, cm: PostgresServer, now: float) -> int:
    connection = cm.connect()
    try:
        cursor = connection.cursor()
        enable = [(v["entra_id"].upper(), v["resource_id"]) for v in churn.get("cm_enable", [])]
        if enable:
            cursor.executemany("UPDATE User_DISC SET CloudUserId = ? WHERE ItemKey = ?", enable)
        touch = [(v["resource_id"],) for v in churn.get("cm_touch", [])]
        if touch:
            cursor.executemany(
                "UPDATE User_DISC SET Full_User_Name0 = Full_User_Name0 || ' (renamed)' WHERE ItemKey = ?",
                touch,
            )
        cursor.execute("SELECT MAX(ItemKey) FROM User_DISC")
        next_id = int(cursor.fetchone()[0])
        rows = []
        for victim in churn.get("cm_new", []):
            next_id += 1
            rows.append(_discovery_row(next_id, victim, now))
        if rows:
            marks = ", ".join("?" * len(rows[0]))
            cursor.executemany(
                "INSERT INTO User_DISC (ItemKey, Name0, Unique_User_Name0, User_Name0, Windows_NT_Domain0, "
                "Full_User_Name0, User_Principal_Name0, Mail0, SID0, Object_GUID0, Distinguished_Name0, "
                f"User_Account_Control0, Creation_Date0, AADUserID, AADTenantID) VALUES ({marks})",
                rows,
            )
        connection.commit()
        return len(enable) + len(touch) + len(rows)
    finally:
        connection.close()


def _discovery_row(resource_id: int, victim: dict[str, Any], now: float) -> tuple[Any, ...]:
    unique = f"{NETBIOS}\\{victim['sam']}"
    return (
        resource_id,
        f"{unique} ({victim['full_name']})",
        unique,
        victim["sam"],
        NETBIOS,
        victim["full_name"],
        victim["upn"],
        victim["upn"],
        victim["sid"],
        base64.b64decode(victim["guid"]),
        victim["dn"],
        512,
        datetime.fromtimestamp(int(now), UTC).replace(tzinfo=None),  # ConfigMgr stores UTC
        victim["entra_id"],
        TENANT_ID,
    )
