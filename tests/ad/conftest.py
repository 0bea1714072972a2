"""Directory data for the AD source tests, on the real Samba AD DC.

The DC itself is the session fixture ``samba_dc`` of ``tests/conftest.py`` (built by
:mod:`tests.ad.samba`): it listens on the fixed ports 389/636, so there must be exactly one per test
session, shared with the end-to-end pipeline test. The ``directory`` fixture here creates the OUs
and users these tests read and records what Samba assigned to them, read back as Administrator
with ldap3's own formatting.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import ldap3
import pytest

from exporter.config import ActiveDirectoryConfig, Secret
from tests.ad.samba import (
    ADMIN_PASSWORD,
    ADMIN_USER,
    DOMAIN_DN,
    LDAP_PORT,
    LDAPS_PORT,
    NETBIOS,
    REALM,
    SAMBA_HINT,
    START_DEADLINE,
    USER_CLASSES,
    SambaDC,
)

# Re-exported: the AD tests import the DC's names from here.
__all__ = [
    "ADMIN_PASSWORD",
    "ADMIN_USER",
    "BULK_OU",
    "BULK_USERS",
    "CONTRACTORS_OU",
    "DOMAIN_DN",
    "LDAPS_PORT",
    "LDAP_PORT",
    "NETBIOS",
    "REALM",
    "SAMBA_HINT",
    "SERVICE_PASSWORD",
    "SERVICE_USER",
    "STAFF_OU",
    "START_DEADLINE",
    "USER_PASSWORD",
    "Directory",
    "SambaDC",
    "StoredUser",
    "make_config",
]

SERVICE_USER = "svc-intune@test.local"
SERVICE_PASSWORD = "Svc!Intune-2024-pw"
USER_PASSWORD = "User!Passw0rd-1234"
STAFF_OU = f"OU=Staff,{DOMAIN_DN}"
BULK_OU = f"OU=Bulk,{STAFF_OU}"
CONTRACTORS_OU = f"OU=Contractors,{DOMAIN_DN}"
BULK_USERS = 250


# ------------------------------------------------------------------------------ directory data
@dataclass(frozen=True)
class StoredUser:
    """What Samba stores for one user, read back as Administrator."""

    dn: str
    sam: str
    upn: str | None
    guid_raw: bytes
    guid_text: str  # ldap3's own rendering, "{...}"
    sid_text: str  # ldap3's own rendering
    when_created: datetime
    uac: int
    consistency_guid: bytes | None


@dataclass
class Directory:
    users: dict[str, StoredUser] = field(default_factory=dict)  # by sAMAccountName
    domain_sid: str = ""

    def expected_in_staff(self) -> set[str]:
        return {u.sam for u in self.users.values() if u.dn.endswith(STAFF_OU) and not u.uac & 2}


def _add_user(
    conn: ldap3.Connection,
    cn: str,
    ou: str,
    sam: str,
    upn: str | None,
    uac: int = 512,
    extra: dict[str, Any] | None = None,
) -> str:
    dn = f"CN={cn},{ou}"
    attributes: dict[str, Any] = {
        "sAMAccountName": sam,
        "unicodePwd": f'"{USER_PASSWORD}"'.encode("utf-16-le"),
        "userAccountControl": uac,
        **(extra or {}),
    }
    if upn:
        attributes["userPrincipalName"] = upn
    conn.add(dn, USER_CLASSES, attributes)
    return dn


@pytest.fixture(scope="session")
def directory(samba_dc: SambaDC) -> Directory:
    consistency_guid = uuid.uuid4().bytes_le
    with samba_dc.admin() as conn:
        for ou in (STAFF_OU, BULK_OU, CONTRACTORS_OU):
            conn.add(ou, ["top", "organizationalUnit"])
        # The exporter's service account: an ordinary domain user in CN=Users.
        conn.add(
            f"CN=svc-intune,CN=Users,{DOMAIN_DN}",
            USER_CLASSES,
            {
                "sAMAccountName": "svc-intune",
                "userPrincipalName": SERVICE_USER,
                "unicodePwd": f'"{SERVICE_PASSWORD}"'.encode("utf-16-le"),
                "userAccountControl": 512,
            },
        )
        _add_user(
            conn,
            "Zoë Ångström",
            STAFF_OU,
            "zoe.angstrom",
            "zoe.angstrom@test.local",
            extra={"mS-DS-ConsistencyGuid": consistency_guid},
        )
        _add_user(conn, "李雷", STAFF_OU, "lilei", "李雷@test.local")
        _add_user(conn, "Nora No-UPN", STAFF_OU, "nora", None)
        _add_user(conn, "Dana Disabled", STAFF_OU, "dana", "dana@test.local", uac=514)
        _add_user(conn, "Carl Contractor", CONTRACTORS_OU, "carl", "carl@test.local")
        for index in range(BULK_USERS):
            sam = f"bulk{index:04d}"
            _add_user(conn, f"Bulk User {index:04d}", BULK_OU, sam, f"{sam}@test.local")
    return _read_back(samba_dc)


def _read_back(samba_dc: SambaDC) -> Directory:
    found = Directory()
    attributes = [
        "sAMAccountName",
        "userPrincipalName",
        "objectGUID",
        "objectSid",
        "whenCreated",
        "userAccountControl",
        "mS-DS-ConsistencyGuid",
    ]
    with samba_dc.admin(schema=True) as conn:
        conn.search(DOMAIN_DN, "(objectClass=domain)", ldap3.BASE, attributes=["objectSid"])
        found.domain_sid = conn.entries[0].objectSid.value
        for base in (STAFF_OU, CONTRACTORS_OU):
            entries = conn.extend.standard.paged_search(
                base,
                "(objectClass=user)",
                ldap3.SUBTREE,
                attributes=attributes,
                paged_size=500,
                generator=True,
            )
            for item in entries:
                if item["type"] != "searchResEntry":
                    continue
                values, raw = item["attributes"], item["raw_attributes"]
                cguid = raw.get("mS-DS-ConsistencyGuid") or []
                found.users[values["sAMAccountName"]] = StoredUser(
                    dn=item["dn"],
                    sam=values["sAMAccountName"],
                    upn=values.get("userPrincipalName") or None,
                    guid_raw=raw["objectGUID"][0],
                    guid_text=values["objectGUID"],
                    sid_text=values["objectSid"],
                    when_created=values["whenCreated"],
                    uac=values["userAccountControl"],
                    consistency_guid=cguid[0] if cguid else None,
                )
    return found


def make_config(samba_dc: SambaDC, **overrides: Any) -> ActiveDirectoryConfig:
    """The config the tests read with: LDAPS to localhost as the low-privilege service account."""
    config = ActiveDirectoryConfig(
        url=f"ldaps://localhost:{LDAPS_PORT}",
        bind_user=SERVICE_USER,
        bind_password=Secret(SERVICE_PASSWORD),
        search_bases=(STAFF_OU,),
        ca_file=samba_dc.ca_file,
        page_size=100,
        timeout=10.0,
    )
    return replace(config, **overrides)
