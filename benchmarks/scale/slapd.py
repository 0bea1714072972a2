"""An AD-shaped OpenLDAP server on high loopback ports, bulk-loaded with ``slapadd``.

The schema is our own, with Active Directory's attribute names and OIDs but matching rules
OpenLDAP can evaluate (the bundled ``msuser.schema`` has the names without matching rules, so
equality filters on it never match): objectGUID, objectSid and mS-DS-ConsistencyGuid are octet
strings with ``octetStringMatch``; sAMAccountName and userPrincipalName compare case-insensitively;
userAccountControl is an integer (the bitwise rule 1.2.840.113556.1.4.803 works on it);
whenCreated is a generalized time; objectCategory is a DN; ``user`` and ``computer`` are object
classes below organizationalPerson, as in AD.

AD's incremental read needs ``uSNChanged`` (an integer with ORDERING, so ``(uSNChanged>=N)``
works, set on every entry), the rootDSE attributes ``highestCommittedUSN`` and ``dsServiceName``,
and the ``invocationId`` of the DC's NTDS Settings object that ``dsServiceName`` names (AD keeps it
there, not in the rootDSE: the object exists here too, under CN=Configuration, with a new
invocationId per load, as after a restore). slapd serves extra rootDSE attributes from the LDIF
file named by its ``rootDSE`` directive, read at start: :meth:`SlapdServer.publish_usn` rewrites it
and restarts slapd. slapd runs with the ``stats`` log level, whose ``SEARCH RESULT ... nentries=N`` lines tell
how many entries each search returned (:meth:`SlapdServer.entries_returned`).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.scale.estate import DOMAIN_DN, SERVICE_DN, b64, ldap_time
from benchmarks.scale.priority import niced

SLAPD = "/usr/sbin/slapd"
SLAPADD = "/usr/sbin/slapadd"
SCHEMA_DIR = Path("/etc/ldap/schema")
MANAGER_DN = f"CN=Manager,{DOMAIN_DN}"
SERVICE_PASSWORD = "Bench!Svc-2024-pw"
DC_NAME = "DC01"
DS_SERVICE_NAME = (
    f"CN=NTDS Settings,CN={DC_NAME},CN=Servers,CN=Default-First-Site-Name,CN=Sites,"
    f"CN=Configuration,{DOMAIN_DN}"
)
# OIDs: AD's own for attributes AD has in its schema; the rootDSE-only attributes (which AD computes
# and does not define in its schema) under OpenLDAP's experimental arc 1.3.6.1.4.1.4203.666.
_OCTETS = "EQUALITY octetStringMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.40 SINGLE-VALUE"
_NAME_TEXT = (
    "EQUALITY caseIgnoreMatch SUBSTR caseIgnoreSubstringsMatch "
    "SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE"
)
_INTEGER = (
    "EQUALITY integerMatch ORDERING integerOrderingMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.27 SINGLE-VALUE"
)
_TIME = (
    "EQUALITY generalizedTimeMatch ORDERING generalizedTimeOrderingMatch "
    "SYNTAX 1.3.6.1.4.1.1466.115.121.1.24 SINGLE-VALUE"
)
_DN = "EQUALITY distinguishedNameMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.12 SINGLE-VALUE"
SCHEMA = f"""# AD's user attributes with matching rules OpenLDAP can evaluate (benchmarks/scale).
attributetype ( 1.2.840.113556.1.4.2 NAME 'objectGUID' {_OCTETS} )
attributetype ( 1.2.840.113556.1.4.146 NAME 'objectSid' {_OCTETS} )
attributetype ( 1.2.840.113556.1.4.1360 NAME 'mS-DS-ConsistencyGuid' {_OCTETS} )
attributetype ( 1.2.840.113556.1.4.221 NAME 'sAMAccountName' {_NAME_TEXT} )
attributetype ( 1.2.840.113556.1.4.656 NAME 'userPrincipalName' {_NAME_TEXT} )
attributetype ( 1.2.840.113556.1.4.8 NAME 'userAccountControl' {_INTEGER} )
attributetype ( 1.2.840.113556.1.2.2 NAME 'whenCreated' {_TIME} )
attributetype ( 1.2.840.113556.1.2.3 NAME 'whenChanged' {_TIME} )
attributetype ( 1.2.840.113556.1.4.782 NAME 'objectCategory' {_DN} )
attributetype ( 1.2.840.113556.1.2.19 NAME 'uSNCreated' {_INTEGER} )
attributetype ( 1.2.840.113556.1.2.120 NAME 'uSNChanged' {_INTEGER} )
attributetype ( 1.2.840.113556.1.2.115 NAME 'invocationId' {_OCTETS} )
attributetype ( 1.3.6.1.4.1.4203.666.11.10.1 NAME 'highestCommittedUSN' {_INTEGER} )
attributetype ( 1.3.6.1.4.1.4203.666.11.10.2 NAME 'dsServiceName' {_DN} )
attributetype ( 1.3.6.1.4.1.4203.666.11.10.3 NAME 'defaultNamingContext' {_DN} )
attributetype ( 1.3.6.1.4.1.4203.666.11.10.4 NAME 'configurationNamingContext' {_DN} )
objectclass ( 1.3.6.1.4.1.4203.666.11.10.100 NAME 'adTopAux' DESC 'what AD keeps on every object'
    AUXILIARY MAY ( objectGUID $ uSNCreated $ uSNChanged $ whenCreated $ whenChanged $ objectCategory ) )
objectclass ( 1.2.840.113556.1.5.9 NAME 'user' SUP organizationalPerson STRUCTURAL
    MUST ( sAMAccountName $ objectGUID $ objectSid )
    MAY ( userPrincipalName $ userAccountControl $ whenCreated $ whenChanged $ objectCategory $
          uSNCreated $ uSNChanged $ mS-DS-ConsistencyGuid $ givenName $ mail ) )
objectclass ( 1.2.840.113556.1.3.30 NAME 'computer' SUP user STRUCTURAL )
objectclass ( 1.2.840.113556.1.3.23 NAME 'container' SUP top STRUCTURAL MUST cn
    MAY ( objectGUID $ uSNCreated $ uSNChanged $ whenCreated $ whenChanged $ objectCategory ) )
objectclass ( 1.2.840.113556.1.5.7000.47 NAME 'nTDSDSA' SUP top STRUCTURAL MUST cn
    MAY ( invocationId $ objectGUID $ uSNCreated $ uSNChanged $ whenCreated $ whenChanged $ objectCategory ) )
"""
_NENTRIES = re.compile(rb" SEARCH RESULT .*?nentries=(\d+)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def ssha(password: str) -> str:
    """An OpenLDAP {SSHA} userPassword value."""
    salt = secrets.token_bytes(8)
    digest = hashlib.sha1(password.encode("utf-8") + salt).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode("ascii")


@dataclass
class DirectoryIdentity:
    """What AD's rootDSE says about the DC, for incremental reads."""

    highest_usn: int
    invocation_id: bytes


class SlapdServer:
    def __init__(self, root: Path, *, ldap_port: int | None = None, ldaps_port: int | None = None) -> None:
        self.root = root
        self.ldap_port = ldap_port or free_port()
        self.ldaps_port = ldaps_port or free_port()
        self.db_dir = root / "db"
        self.conf = root / "slapd.conf"
        self.rootdse = root / "rootdse.ldif"
        self.log_path = root / "slapd.log"
        self.ca_file = root / "ca.pem"
        self.manager_password = secrets.token_urlsafe(16)
        self.identity = DirectoryIdentity(0, uuid.uuid4().bytes_le)
        self._process: subprocess.Popen[bytes] | None = None
        self._log_handle: Any = None

    # ---------------------------------------------------------------------------- setup
    @property
    def ldaps_url(self) -> str:
        return f"ldaps://127.0.0.1:{self.ldaps_port}"

    @property
    def ldap_url(self) -> str:
        return f"ldap://127.0.0.1:{self.ldap_port}"

    def prepare(
        self, ldif_files: Sequence[Path], highest_usn: int, log: Callable[[str], None] = print
    ) -> None:
        """Fresh database from the LDIF files (offline ``slapadd``), TLS material and config."""
        if self.db_dir.exists():
            shutil.rmtree(self.db_dir)
        self.db_dir.mkdir(parents=True)
        self._write_tls()
        (self.root / "ad-scale.schema").write_text(SCHEMA)
        self.conf.write_text(self._config())
        # A new invocationId per load: a restored or rebuilt DC is another database for AD clients.
        self.identity = DirectoryIdentity(highest_usn, uuid.uuid4().bytes_le)
        configuration, usn = self._configuration_entries(highest_usn)
        self.identity.highest_usn = usn + 1
        service = self.root / "service.ldif"
        service.write_text(configuration + self._service_entry(usn + 1))
        self._write_rootdse()
        for ldif in (*ldif_files, service):
            started = time.monotonic()
            # -q: no consistency checks (the generator writes parents first); far faster.
            subprocess.run(
                [SLAPADD, "-q", "-f", str(self.conf), "-l", str(ldif)], check=True, capture_output=True
            )
            log(f"slapadd {ldif.name}: {time.monotonic() - started:.1f}s")

    def _write_tls(self) -> None:
        import trustme

        ca = trustme.CA(organization_name="Scale benchmark CA")
        cert = ca.issue_cert("127.0.0.1", "localhost", "dc01.contoso.com")
        ca.cert_pem.write_to_path(str(self.ca_file))
        cert.private_key_pem.write_to_path(str(self.root / "server.key"))
        cert.cert_chain_pems[0].write_to_path(str(self.root / "server.pem"))
        os.chmod(self.root / "server.key", 0o600)

    def _config(self) -> str:
        root = self.root
        return f"""# slapd for the scale benchmark (generated)
include {SCHEMA_DIR / "core.schema"}
include {SCHEMA_DIR / "cosine.schema"}
include {root / "ad-scale.schema"}
pidfile {root / "slapd.pid"}
argsfile {root / "slapd.args"}
modulepath /usr/lib/ldap
moduleload back_mdb
rootDSE {self.rootdse}
TLSCACertificateFile {self.ca_file}
TLSCertificateFile {root / "server.pem"}
TLSCertificateKeyFile {root / "server.key"}
sizelimit unlimited
timelimit unlimited
access to dn.base="" by * read
access to dn.base="cn=Subschema" by * read
access to attrs=userPassword by anonymous auth by self write by * none
access to * by users read by * none

database mdb
maxsize 34359738368
suffix "{DOMAIN_DN}"
rootdn "{MANAGER_DN}"
rootpw {self.manager_password}
directory {self.db_dir}
dbnosync
index objectClass eq
index objectCategory eq
index uSNChanged eq
index sAMAccountName eq
index userPrincipalName eq
index objectGUID eq
"""

    def _configuration_entries(self, usn: int) -> tuple[str, int]:
        """LDIF of CN=Configuration down to the DC's NTDS Settings object (with its invocationId),
        and the last USN used."""
        parts = DS_SERVICE_NAME.split(",")
        entries = []
        for depth in range(len(parts) - len(DOMAIN_DN.split(",")) - 1, -1, -1):
            dn = ",".join(parts[depth:])
            cn = parts[depth][3:]
            usn += 1
            ntds = depth == 0
            extra = f"invocationId:: {b64(self.identity.invocation_id)}\n" if ntds else ""
            entries.append(
                f"dn: {dn}\nobjectClass: top\nobjectClass: {'nTDSDSA' if ntds else 'container'}\ncn: {cn}\n"
                f"{extra}objectGUID:: {b64(uuid.uuid4().bytes_le)}\nuSNCreated: {usn}\nuSNChanged: {usn}\n\n"
            )
        return "".join(entries), usn

    def _service_entry(self, usn: int) -> str:
        """The exporter's bind account, outside the search base."""
        return (
            f"dn: {SERVICE_DN}\nobjectClass: top\nobjectClass: person\nobjectClass: organizationalPerson\n"
            f"objectClass: user\ncn: svc-intune\nsn: svc-intune\nsAMAccountName: svc-intune\n"
            f"userPrincipalName: svc-intune@contoso.com\nobjectGUID:: {b64(uuid.uuid4().bytes_le)}\n"
            f"objectSid:: {b64(bytes(28))}\nuserAccountControl: 66048\n"
            f"whenCreated: {ldap_time(time.time())}\nuSNCreated: {usn}\nuSNChanged: {usn}\n"
            f"userPassword: {ssha(SERVICE_PASSWORD)}\n\n"
        )

    def _write_rootdse(self) -> None:
        self.rootdse.write_text(
            "dn:\n"
            f"defaultNamingContext: {DOMAIN_DN}\n"
            f"configurationNamingContext: CN=Configuration,{DOMAIN_DN}\n"
            f"dsServiceName: {DS_SERVICE_NAME}\n"
            f"highestCommittedUSN: {self.identity.highest_usn}\n"
        )

    # ---------------------------------------------------------------------------- process
    def start(self, timeout: float = 60.0) -> None:
        self._log_handle = self.log_path.open("ab")
        self._process = subprocess.Popen(
            niced(
                [
                    SLAPD,
                    "-d",
                    "256",  # stats: one line per operation and result; keeps slapd in the foreground
                    "-h",
                    f"{self.ldap_url}/ {self.ldaps_url}/",
                    "-f",
                    str(self.conf),
                ]
            ),
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"slapd exited with {self._process.returncode}: {self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.ldaps_port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"slapd did not listen within {timeout:g}s: {self.log_tail()}"
                    ) from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGINT)
            try:
                self._process.wait(30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def publish_usn(self, highest_usn: int) -> None:
        """Publish a new highestCommittedUSN in the rootDSE: slapd reads that file only at start."""
        self.identity.highest_usn = highest_usn
        self._write_rootdse()
        self.stop()
        self.start()

    def log_tail(self) -> str:
        try:
            return self.log_path.read_bytes()[-2000:].decode("utf-8", "replace")
        except OSError:
            return ""

    def log_offset(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def entries_returned(self, start: int, end: int | None = None) -> tuple[int, int]:
        """(searches, entries returned) logged between two log offsets (``end``: now)."""
        with self.log_path.open("rb") as handle:
            handle.seek(start)
            data = handle.read() if end is None else handle.read(max(0, end - start))
        counts = [int(m.group(1)) for m in _NENTRIES.finditer(data)]
        return len(counts), sum(counts)

    # ---------------------------------------------------------------------------- clients
    def connection(self, *, manager: bool = True) -> Any:
        """An ldap3 connection over LDAPS, as the manager (writes) or the service account."""
        import ldap3

        tls = ldap3.Tls(ca_certs_file=str(self.ca_file), validate=2)
        server = ldap3.Server("127.0.0.1", port=self.ldaps_port, use_ssl=True, tls=tls, get_info=ldap3.NONE)
        user, password = (MANAGER_DN, self.manager_password) if manager else (SERVICE_DN, SERVICE_PASSWORD)
        return ldap3.Connection(server, user=user, password=password, auto_bind=True, raise_exceptions=True)
