"""A real Active Directory for the tests: a Samba AD DC on loopback.

:func:`run_samba_dc` provisions a throw-away domain (realm TEST.LOCAL, NetBIOS name TEST) into a
temporary directory, gives the DC a certificate from a test CA (subjectAltName ``localhost`` and
``dc1.test.local``, so that host name verification can be exercised), starts ``samba`` in the
foreground and stops it at the end.

The DC listens on the fixed LDAP ports 389/636, so only one can run at a time: the one session
fixture that runs it, ``samba_dc``, lives in ``tests/conftest.py`` and is shared by every test
directory (the AD source tests and the end-to-end pipeline test). This module holds the machinery
and is imported by that fixture, never turned into a fixture itself.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import ldap3
import pytest
import trustme

from tests.conftest import require_component

REALM = "TEST.LOCAL"
NETBIOS = "TEST"
DOMAIN_DN = "DC=test,DC=local"
ADMIN_USER = "Administrator@test.local"
ADMIN_PASSWORD = "Passw0rd!Passw0rd"
LDAP_PORT = 389
LDAPS_PORT = 636
START_DEADLINE = 60.0
SAMBA_HINT = "apt-get install -y --no-install-recommends samba samba-ad-dc samba-ad-provision"
USER_CLASSES = ["top", "person", "organizationalPerson", "user"]


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


def run_samba_dc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SambaDC]:
    """Provision and start a DC, yield it, stop it: the body of the one ``samba_dc`` fixture."""
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
