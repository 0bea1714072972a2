"""A real Active Directory for the AD source tests: a Samba AD DC on loopback.

The session fixture provisions a throw-away domain (realm TEST.LOCAL, NetBIOS name TEST) into a
temporary directory, gives the DC a certificate from a test CA (subjectAltName ``localhost`` and
``dc1.test.local``, so that host name verification can be exercised), starts ``samba`` in the
foreground and stops it at the end. A second fixture creates the OUs and users the tests read and
records what Samba assigned to them, read back as Administrator with ldap3's own formatting.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import ldap3
import pytest
import trustme

from exporter.config import ActiveDirectoryConfig, Secret
from tests.conftest import require_component

REALM = "TEST.LOCAL"
NETBIOS = "TEST"
DOMAIN_DN = "DC=test,DC=local"
ADMIN_USER = "Administrator@test.local"
ADMIN_PASSWORD = "Passw0rd!Passw0rd"
SERVICE_USER = "svc-intune@test.local"
SERVICE_PASSWORD = "Svc!Intune-2024-pw"
USER_PASSWORD = "User!Passw0rd-1234"
STAFF_OU = f"OU=Staff,{DOMAIN_DN}"
BULK_OU = f"OU=Bulk,{STAFF_OU}"
CONTRACTORS_OU = f"OU=Contractors,{DOMAIN_DN}"
BULK_USERS = 250
LDAP_PORT = 389
LDAPS_PORT = 636
START_DEADLINE = 60.0
SAMBA_HINT = "apt-get install -y --no-install-recommends samba samba-ad-dc samba-ad-provision"


@dataclass
class SambaDC:
    directory: Path
    ca_file: str  # the CA that issued the DC's certificate
    other_ca_file: str  # an unrelated CA, for "wrong CA" tests
    process: subprocess.Popen[bytes]

    @contextlib.contextmanager
    def admin(self, schema: bool = False) -> Iterator[ldap3.Connection]:
        # ldap3's own context manager leaves a connection open that was bound before "with".
        conn = self.admin_connection(schema)
        try:
            yield conn
        finally:
            conn.unbind()

    def admin_connection(self, schema: bool = False) -> ldap3.Connection:
        tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=self.ca_file)
        server = ldap3.Server(
            "localhost",
            port=LDAPS_PORT,
            use_ssl=True,
            tls=tls,
            connect_timeout=10,
            get_info=ldap3.SCHEMA if schema else ldap3.NONE,
        )
        return ldap3.Connection(
            server, ADMIN_USER, ADMIN_PASSWORD, receive_timeout=30, raise_exceptions=True, auto_bind=True
        )

    def log_tail(self, lines: int = 30) -> str:
        log_file = self.directory / "samba.out"
        text = log_file.read_text(errors="replace") if log_file.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _write_certificates(directory: Path) -> tuple[str, str]:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "dc1.test.local")
    key_file = directory / "dc-key.pem"
    cert.private_key_pem.write_to_path(str(key_file))
    key_file.chmod(0o600)  # Samba refuses a private key others can read
    cert.cert_chain_pems[0].write_to_path(str(directory / "dc-cert.pem"))
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    trustme.CA().cert_pem.write_to_path(str(directory / "other-ca.pem"))
    return str(directory / "ca.pem"), str(directory / "other-ca.pem")


def _provision(samba_tool: str, directory: Path) -> None:
    options = [
        "interfaces=lo",
        "bind interfaces only=yes",
        "server services=ldap, cldap, kdc",
        f"log file={directory}/log.%m",
        "tls enabled=yes",
        f"tls keyfile={directory}/dc-key.pem",
        f"tls certfile={directory}/dc-cert.pem",
        f"tls cafile={directory}/ca.pem",
    ]
    command = [
        samba_tool,
        "domain",
        "provision",
        f"--realm={REALM}",
        f"--domain={NETBIOS}",
        "--server-role=dc",
        "--dns-backend=NONE",
        f"--adminpass={ADMIN_PASSWORD}",
        "--use-rfc2307",
        f"--targetdir={directory}/domain",
        "--host-ip=127.0.0.1",
        *(f"--option={option}" for option in options),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    if result.returncode != 0:
        pytest.fail(f"samba-tool domain provision failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")


def _wait_until_ready(dc: SambaDC) -> None:
    deadline = time.monotonic() + START_DEADLINE
    last_error = "no attempt"
    while time.monotonic() < deadline:
        if dc.process.poll() is not None:
            pytest.fail(f"samba exited with {dc.process.returncode}:\n{dc.log_tail()}")
        if _port_open(LDAPS_PORT):
            try:
                dc.admin_connection().unbind()
                return
            except ldap3.core.exceptions.LDAPException as exc:
                last_error = repr(exc)
        time.sleep(0.2)
    pytest.fail(f"Samba did not answer LDAPS within {START_DEADLINE:.0f}s ({last_error}):\n{dc.log_tail()}")


def _find_program(name: str) -> str:
    # samba lives in /usr/sbin, which is not on every user's PATH.
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin")
    require_component(name, path is not None, SAMBA_HINT)
    assert path is not None
    return path


@pytest.fixture(scope="session")
def samba_dc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SambaDC]:
    samba_tool = _find_program("samba-tool")
    samba = _find_program("samba")
    taken = [port for port in (LDAP_PORT, LDAPS_PORT) if _port_open(port)]
    if taken:
        pytest.fail(
            f"127.0.0.1 port(s) {taken} already in use: the Samba AD DC needs the fixed LDAP ports "
            "389/636 (is another Samba or test session running?)"
        )
    directory = tmp_path_factory.mktemp("samba-ad")
    ca_file, other_ca_file = _write_certificates(directory)
    _provision(samba_tool, directory)
    with (directory / "samba.out").open("wb") as out:
        process = subprocess.Popen(
            [samba, "-i", "-M", "single", "-s", str(directory / "domain/etc/smb.conf")],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    dc = SambaDC(directory=directory, ca_file=ca_file, other_ca_file=other_ca_file, process=process)
    try:
        _wait_until_ready(dc)
        yield dc
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


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


USER_CLASSES = ["top", "person", "organizationalPerson", "user"]


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
