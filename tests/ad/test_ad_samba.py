"""The AD source against a real directory (Samba AD DC on loopback)."""

from __future__ import annotations

import base64
import inspect
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import ldap3
import pytest

from exporter.config import ActiveDirectoryConfig
from exporter.ids import immutable_id
from exporter.model import AdTable, AdUser
from exporter.sources.ad import ActiveDirectorySource
from exporter.sources.base import Source, SourceError
from tests.ad.conftest import (
    BULK_OU,
    BULK_USERS,
    CONTRACTORS_OU,
    DOMAIN_DN,
    LDAP_PORT,
    NETBIOS,
    SERVICE_PASSWORD,
    STAFF_OU,
    Directory,
    SambaDC,
    make_config,
)

NAMED_STAFF = {"zoe.angstrom", "lilei", "nora"}


def read(config: ActiveDirectoryConfig) -> AdTable:
    source = ActiveDirectorySource(config)
    try:
        return source.refresh(None)
    finally:
        source.close()


def users_of(table: AdTable) -> list[AdUser]:
    return [table.record(row) for row in range(table.n)]


def failure(config: ActiveDirectoryConfig) -> SourceError:
    with pytest.raises(SourceError) as caught:
        read(config)
    return caught.value


@dataclass
class SearchCall:
    base: str
    search_filter: str
    paged_size: int | None


@pytest.fixture
def searches(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[SearchCall]]:
    """Every LDAP search request the source sends (base, filter, page size)."""
    calls: list[SearchCall] = []
    original = ldap3.Connection.search
    signature = inspect.signature(original)

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(self, *args, **kwargs)
        calls.append(
            SearchCall(
                bound.arguments["search_base"],
                bound.arguments["search_filter"],
                bound.arguments.get("paged_size"),
            )
        )
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ldap3.Connection, "search", spy)
    yield calls


@pytest.fixture
def unbinds(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bool]]:
    """One entry per unbind; the value says whether the connection was still open."""
    calls: list[bool] = []
    original = ldap3.Connection.unbind

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(not self.closed)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ldap3.Connection, "unbind", spy)
    yield calls


# ------------------------------------------------------------------------------- what is read
def test_reads_enabled_users_under_the_search_base_only(samba_dc: SambaDC, directory: Directory) -> None:
    data = read(make_config(samba_dc))

    sams = [user.sam_account_name for user in users_of(data)]
    assert len(sams) == len(set(sams)) == data.records == len(NAMED_STAFF) + BULK_USERS
    assert set(sams) == directory.expected_in_staff()
    assert "dana" not in sams  # disabled (userAccountControl 514), excluded by the default filter
    assert "carl" not in sams  # outside the search base
    assert "svc-intune" not in sams
    assert data.netbios_domain == NETBIOS


def test_identifiers_are_what_samba_stores(samba_dc: SambaDC, directory: Directory) -> None:
    by_sam = {user.sam_account_name: user for user in users_of(read(make_config(samba_dc)))}

    for sam in directory.expected_in_staff():
        stored, user = directory.users[sam], by_sam[sam]
        assert user.object_guid == stored.guid_raw
        assert len(user.object_guid) == 16
        assert uuid.UUID(bytes_le=user.object_guid) == uuid.UUID(stored.guid_text)  # ldap3's rendering
        assert user.object_sid == stored.sid_text
        assert user.object_sid.startswith(directory.domain_sid + "-")
        assert user.when_created == stored.when_created.timestamp()
        assert user.user_principal_name == stored.upn
        assert stored.uac == 512  # enabled: the default filter keeps only these
        assert user.source_anchor == stored.guid_raw  # default source_anchor: objectGUID
        assert immutable_id(user.source_anchor) == base64.b64encode(stored.guid_raw).decode()


def test_unicode_names_and_missing_upn(samba_dc: SambaDC, directory: Directory) -> None:
    by_sam = {user.sam_account_name: user for user in users_of(read(make_config(samba_dc)))}

    assert directory.users["zoe.angstrom"].dn == f"CN=Zoë Ångström,{STAFF_OU}"
    assert by_sam["zoe.angstrom"].user_principal_name == "zoe.angstrom@test.local"
    assert by_sam["lilei"].user_principal_name == "李雷@test.local"
    assert by_sam["nora"].user_principal_name is None


def test_when_created_is_recent_posix_seconds(samba_dc: SambaDC, directory: Directory) -> None:
    users = users_of(read(make_config(samba_dc)))
    stored = directory.users["zoe.angstrom"].when_created
    offset = stored.utcoffset()
    assert offset is not None and offset.total_seconds() == 0  # ldap3 renders whenCreated as UTC
    created = [user.when_created for user in users if isinstance(user.when_created, float)]
    assert len(created) == len(users)
    # Created by this session's fixture: within the last hour of each other.
    assert max(created) - min(created) < 3600


def test_paged_search_spans_several_pages(
    samba_dc: SambaDC, directory: Directory, searches: list[SearchCall]
) -> None:
    config = make_config(samba_dc, page_size=100, netbios_domain="TEST")
    data = read(config)

    assert data.records == len(NAMED_STAFF) + BULK_USERS  # 253 users: 3 pages of at most 100
    user_pages = [
        call for call in searches if call.base == STAFF_OU and call.search_filter == config.user_filter
    ]
    assert [call.paged_size for call in user_pages] == [100, 100, 100]


def test_consistency_guid_anchor_falls_back_to_object_guid(samba_dc: SambaDC, directory: Directory) -> None:
    by_sam = {
        user.sam_account_name: user
        for user in users_of(read(make_config(samba_dc, source_anchor="mS-DS-ConsistencyGuid")))
    }

    zoe, lilei = directory.users["zoe.angstrom"], directory.users["lilei"]
    assert zoe.consistency_guid is not None and zoe.consistency_guid != zoe.guid_raw
    assert by_sam["zoe.angstrom"].source_anchor == zoe.consistency_guid
    assert by_sam["zoe.angstrom"].object_guid == zoe.guid_raw
    assert (
        immutable_id(by_sam["zoe.angstrom"].source_anchor) == base64.b64encode(zoe.consistency_guid).decode()
    )
    assert lilei.consistency_guid is None
    assert by_sam["lilei"].source_anchor == lilei.guid_raw


def test_overlapping_search_bases_return_each_user_once(samba_dc: SambaDC, directory: Directory) -> None:
    config = make_config(samba_dc, search_bases=(STAFF_OU, BULK_OU, CONTRACTORS_OU))
    sams = [user.sam_account_name for user in users_of(read(config))]

    assert len(sams) == len(set(sams)) == len(NAMED_STAFF) + BULK_USERS + 1
    assert "carl" in sams


def test_custom_filter_is_used(samba_dc: SambaDC, directory: Directory) -> None:
    config = make_config(samba_dc, user_filter="(&(objectClass=user)(sAMAccountName=bulk00*))")
    sams = sorted(user.sam_account_name for user in users_of(read(config)))
    assert sams == [f"bulk{index:04d}" for index in range(100)]


# --------------------------------------------------------------------------------- transport
def test_start_tls(samba_dc: SambaDC, directory: Directory) -> None:
    config = make_config(samba_dc, url=f"ldap://localhost:{LDAP_PORT}", start_tls=True)
    source = ActiveDirectorySource(config)

    assert source.describe() == "ldap://localhost:389 (StartTLS)"
    assert source.refresh(None).records == len(NAMED_STAFF) + BULK_USERS
    source.close()


def test_describe_names_the_server(samba_dc: SambaDC) -> None:
    source = ActiveDirectorySource(make_config(samba_dc))
    assert isinstance(source, Source)
    assert source.kind == "ad"
    assert source.describe() == "ldaps://localhost:636"


def test_plain_ldap_simple_bind_is_refused_with_a_hint(samba_dc: SambaDC, directory: Directory) -> None:
    # Samba (like a hardened AD) refuses simple binds on an unencrypted connection.
    error = failure(make_config(samba_dc, url=f"ldap://localhost:{LDAP_PORT}"))
    assert error.reason == "auth"
    assert "ldaps://" in error.message and "start_tls" in error.message
    assert SERVICE_PASSWORD not in error.message


def test_certificate_name_is_verified(samba_dc: SambaDC, directory: Directory) -> None:
    # The DC certificate names localhost and dc1.test.local, not 127.0.0.1.
    error = failure(make_config(samba_dc, url="ldaps://127.0.0.1:636"))
    assert error.reason == "network"
    assert "certificate" in error.message and "127.0.0.1" in error.message
    assert "mismatch" in error.message


def test_certificate_name_is_verified_after_start_tls(samba_dc: SambaDC, directory: Directory) -> None:
    error = failure(make_config(samba_dc, url="ldap://127.0.0.1:389", start_tls=True))
    assert error.reason == "network"
    assert "TLS certificate verification failed" in error.message


def with_server_name(config: ActiveDirectoryConfig, name: str) -> ActiveDirectoryConfig:
    return replace(config, tls_server_name=name)


def test_tls_server_name_verifies_an_ip_url_against_the_dc_name(
    samba_dc: SambaDC, directory: Directory
) -> None:
    by_ip = make_config(samba_dc, url="ldaps://127.0.0.1:636")
    assert read(with_server_name(by_ip, "dc1.test.local")).records == len(NAMED_STAFF) + BULK_USERS

    error = failure(with_server_name(by_ip, "dc2.test.local"))
    assert error.reason == "network"
    assert "mismatch" in error.message and "dc2.test.local" in error.message


def test_tls_verify_false_accepts_any_certificate(samba_dc: SambaDC, directory: Directory) -> None:
    config = make_config(samba_dc, url="ldaps://127.0.0.1:636", tls_verify=False, ca_file=None)
    assert read(config).records == len(NAMED_STAFF) + BULK_USERS


def test_wrong_ca_is_a_tls_network_error(samba_dc: SambaDC, directory: Directory) -> None:
    error = failure(make_config(samba_dc, ca_file=samba_dc.other_ca_file))
    assert error.reason == "network"
    assert "TLS certificate verification failed for ldaps://localhost:636" in error.message
    assert "certificate verify failed" in error.message


def test_system_trust_does_not_know_the_test_ca(
    samba_dc: SambaDC, directory: Directory, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("SSL_CERT_FILE", "SSL_CERT_DIR"):
        monkeypatch.delenv(name, raising=False)
    error = failure(make_config(samba_dc, ca_file=None))
    assert error.reason == "network"
    assert "certificate" in error.message


# ----------------------------------------------------------------------------------- failures
def test_wrong_password_is_an_auth_error(samba_dc: SambaDC, directory: Directory) -> None:
    from exporter.config import Secret

    wrong = "Not-The-Password-42"
    error = failure(make_config(samba_dc, bind_password=Secret(wrong)))
    assert error.reason == "auth"
    assert "ldaps://localhost:636" in error.message and "svc-intune@test.local" in error.message
    assert "invalid credentials" in error.message
    assert wrong not in error.message and wrong not in repr(error)


def test_nonexistent_search_base_is_a_data_error(samba_dc: SambaDC, directory: Directory) -> None:
    missing = f"OU=Nowhere,{DOMAIN_DN}"
    error = failure(make_config(samba_dc, search_bases=(STAFF_OU, missing)))
    assert error.reason == "data"
    assert missing in error.message
    assert "ldaps://localhost:636" in error.message


def test_base_outside_the_domain_is_a_data_error(samba_dc: SambaDC, directory: Directory) -> None:
    # Samba answers noSuchObject here; Windows DCs may answer with a referral, which ldap3 does not
    # raise for (that path is covered in test_ad_unit.py). Either way: no silent empty result.
    foreign = "OU=Staff,DC=fabrikam,DC=com"
    error = failure(make_config(samba_dc, search_bases=(STAFF_OU, foreign)))
    assert error.reason == "data"
    assert foreign in error.message


def test_closed_port_is_a_network_error(samba_dc: SambaDC) -> None:
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]  # bound but not listening: connections are refused
        error = failure(make_config(samba_dc, url=f"ldaps://127.0.0.1:{port}"))
    assert error.reason == "network"
    assert f"ldaps://127.0.0.1:{port}" in error.message
    assert "refused" in error.message.lower()


# ------------------------------------------------------------------------------------- netbios
def test_netbios_domain_is_discovered_once(
    samba_dc: SambaDC, directory: Directory, searches: list[SearchCall]
) -> None:
    source = ActiveDirectorySource(make_config(samba_dc, search_bases=(CONTRACTORS_OU,)))
    first = source.refresh(None)
    partitions = [call for call in searches if call.base.startswith("CN=Partitions,")]
    assert first.netbios_domain == "TEST"
    assert [call.base for call in partitions] == [f"CN=Partitions,CN=Configuration,{DOMAIN_DN}"]

    second = source.refresh(first)
    assert second.netbios_domain == "TEST"
    assert len([call for call in searches if call.base.startswith("CN=Partitions,")]) == 1  # cached
    source.close()


def test_configured_netbios_domain_skips_discovery(
    samba_dc: SambaDC, directory: Directory, searches: list[SearchCall]
) -> None:
    data = read(make_config(samba_dc, search_bases=(CONTRACTORS_OU,), netbios_domain="CONTOSO"))
    assert data.netbios_domain == "CONTOSO"
    assert data.record(0).sam_account_name == "carl"
    assert not [call for call in searches if call.base.startswith("CN=Partitions,")]


# ------------------------------------------------------------------------------ connection use
def test_every_refresh_unbinds(samba_dc: SambaDC, directory: Directory, unbinds: list[bool]) -> None:
    source = ActiveDirectorySource(make_config(samba_dc, search_bases=(CONTRACTORS_OU,)))
    source.refresh(None)
    source.refresh(None)
    assert unbinds == [True, True]
    source.close()  # nothing left to unbind
    assert unbinds == [True, True]


def test_failed_refresh_unbinds_too(samba_dc: SambaDC, directory: Directory, unbinds: list[bool]) -> None:
    failure(make_config(samba_dc, search_bases=(f"OU=Nowhere,{DOMAIN_DN}",)))
    assert unbinds == [True]
