"""A hung, trickling or garbage-speaking DC must never keep the AD source down (issue 12).

Reproduced with real servers: a TCP proxy in front of the Samba DC that trickles its answer one
byte a second or never answers (every socket read succeeds in time, so only a whole-operation
deadline ends it), and a fake LDAP server for what Samba never does (garbage messages,
invalidDNSyntax on a UPN bind).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from ldap3.core import exceptions as ldap_errors

from exporter.config import ActiveDirectoryConfig, Config, EstateConfig, Secret
from exporter.engine import Engine
from exporter.snapshot import SourceStatus
from exporter.sources.ad import ActiveDirectorySource
from exporter.sources.base import SourceError
from tests.ad.conftest import (
    BULK_USERS,
    DOMAIN_DN,
    LDAPS_PORT,
    STAFF_OU,
    Directory,
    SambaDC,
    make_config,
)
from tests.ad.fake_ldap import (
    Client,
    Request,
    answer_bind_then,
    bind_response,
    fake_ldap,
    integer,
    message,
    reply_to_first_request,
    tlv,
)
from tests.ad.stall_proxy import stalling_proxy

STAFF_USERS = 3 + BULK_USERS
EMPTY_OU = f"OU=Empty,{DOMAIN_DN}"


def fake_config(port: int, **overrides: Any) -> ActiveDirectoryConfig:
    values: dict[str, Any] = {
        "url": f"ldap://127.0.0.1:{port}",
        "bind_user": "svc-intune@contoso.com",
        "bind_password": Secret("Fake-Passw0rd"),
        "search_bases": ("OU=Staff,DC=contoso,DC=com",),
        "netbios_domain": "CONTOSO",
        "timeout": 5.0,
    }
    values.update(overrides)
    return ActiveDirectoryConfig(**values)


def ad_status(engine: Engine) -> SourceStatus:
    estate = engine.snapshot().estate("e")
    assert estate is not None
    return estate.sources["ad"]


def refresh_failure(source: ActiveDirectorySource, deadline_in: float = 10.0) -> tuple[SourceError, float]:
    started = time.monotonic()
    with pytest.raises(SourceError) as caught:
        source.refresh(None, deadline=started + deadline_in)
    return caught.value, time.monotonic() - started


# --------------------------------------------------------------------- stalls, with Samba behind
@pytest.mark.parametrize(
    ("mode", "trickle_after"),
    [
        ("trickle", 0),  # the TLS handshake arrives a byte a second
        ("trickle", 16384),  # the search results do, after a normal start (handshake, bind, rootDSE)
        ("hang", 0),  # accepted, never a word
    ],
)
def test_stalled_dc_ends_the_refresh_by_its_deadline_and_the_next_one_succeeds(
    samba_dc: SambaDC, directory: Directory, mode: str, trickle_after: int
) -> None:
    with stalling_proxy(LDAPS_PORT, trickle_after=trickle_after) as proxy:
        # Per-call timeout 30 s: a per-read timeout alone would keep this refresh alive for minutes.
        source = ActiveDirectorySource(
            make_config(samba_dc, url=f"ldaps://localhost:{proxy.port}", timeout=30.0)
        )
        proxy.mode = mode  # type: ignore[assignment]
        error, elapsed = refresh_failure(source, deadline_in=3.0)
        assert error.reason == "timeout"
        assert f"ldaps://localhost:{proxy.port}" in error.message and "deadline" in error.message
        assert elapsed < 3.5  # ended by its deadline (plus the time to close the connection)

        proxy.mode = "pass"  # the DC recovers
        started = time.monotonic()
        table = source.refresh(None, deadline=time.monotonic() + 20)
        assert table.n == STAFF_USERS
        assert time.monotonic() - started < 5  # at once: nothing of the stalled refresh is left
        assert proxy.connections[mode] == 1 and proxy.connections["pass"] == 1


def test_engine_recovers_from_a_trickling_dc_at_the_next_refresh(
    samba_dc: SambaDC, directory: Directory
) -> None:
    # The symptom: after the engine gave up on a trickling refresh, every later refresh
    # reported "the previous refresh is still running" long after the DC was healthy again.
    with stalling_proxy(LDAPS_PORT, trickle_after=16384) as proxy:
        ad = make_config(samba_dc, url=f"ldaps://localhost:{proxy.port}", timeout=60.0)
        config = Config(estates=(EstateConfig(name="e", active_directory=ad),), refresh_timeout=3.0)
        source = ActiveDirectorySource(ad)
        engine = Engine(config, {"e": [source]})
        proxy.mode = "trickle"
        started = time.monotonic()
        engine.refresh("e", "ad")
        status = ad_status(engine)
        assert not status.up and status.last_error is not None and status.last_error.startswith("timeout")
        assert time.monotonic() - started < 3.0 + 1.0  # no wait for the abort grace period

        proxy.mode = "pass"
        engine.refresh("e", "ad")
        status = ad_status(engine)
        assert status.up, status.last_error
        assert status.records == STAFF_USERS
        assert [thread.name for thread in threading.enumerate() if thread.name.startswith("read-e-ad")] == []
        engine.stop(timeout=2)


# ---------------------------------------------------------------------- stalls, fake LDAP server
@pytest.mark.parametrize(
    "behaviour",
    [
        pytest.param(lambda client: client.hold(), id="hang-before-bind"),
        pytest.param(answer_bind_then(lambda client: client.hold()), id="hang-after-bind"),
        pytest.param(
            answer_bind_then(lambda client: client.trickle(b"\x30\x84\x00\x00\x10\x00" + b"\x00" * 64)),
            id="trickle-search",
        ),
    ],
)
def test_hung_or_trickling_server_ends_at_the_deadline(behaviour: Callable[[Client], None]) -> None:
    with fake_ldap(behaviour) as server:
        source = ActiveDirectorySource(fake_config(server.port, timeout=30.0))
        error, elapsed = refresh_failure(source, deadline_in=2.0)
    assert error.reason == "timeout"
    assert 1.9 < elapsed < 2.5


def test_abort_from_another_thread_unblocks_a_read_at_once() -> None:
    with fake_ldap(answer_bind_then(lambda client: client.hold())) as server:
        source = ActiveDirectorySource(fake_config(server.port, timeout=60.0))
        outcome: dict[str, BaseException] = {}

        def work() -> None:
            try:
                source.refresh(None, deadline=time.monotonic() + 60)
            except BaseException as exc:
                outcome["error"] = exc

        worker = threading.Thread(target=work)
        worker.start()
        time.sleep(0.5)  # bound, and blocked in the first search
        aborted = time.monotonic()
        source.abort()
        worker.join(timeout=5)
        assert not worker.is_alive()
        assert time.monotonic() - aborted < 0.5
    error = outcome["error"]
    assert isinstance(error, SourceError) and error.reason == "timeout"
    assert "while searching" in error.message


# ------------------------------------------------------------------------------- garbage
def _garbage(payload: Callable[[Request], bytes], then_close: bool = False) -> Callable[[Client], None]:
    return reply_to_first_request(payload, then_close)


def _garbage_after_bind(payload: Callable[[Request], bytes]) -> Callable[[Client], None]:
    def behaviour(client: Client) -> None:
        request = client.read_request()
        if request is not None:
            client.send(payload(request))
            client.hold()

    return answer_bind_then(behaviour)


@pytest.mark.parametrize(
    ("behaviour", "reason"),
    [
        # The "unexpected KeyError: 31": a protocolOp tag no LDAP message has.
        pytest.param(_garbage(lambda r: tlv(0x30, integer(r.message_id) + b"\x1f\x00")), "data", id="tag-31"),
        pytest.param(
            _garbage(lambda r: tlv(0x30, integer(r.message_id) + b"\x7f\x1f\x00")),
            "data",
            id="app-31",
        ),
        pytest.param(_garbage(lambda r: b"\x00" * 16, then_close=True), "data", id="zeros"),
        pytest.param(_garbage(lambda r: message(r.message_id + 7, bind_response(0))), "data", id="wrong-id"),
        pytest.param(
            _garbage(lambda r: b"HTTP/1.1 400 Bad Request\r\n\r\n", then_close=True), "network", id="http"
        ),
        pytest.param(
            _garbage_after_bind(lambda r: tlv(0x30, integer(r.message_id) + b"\x1f\x00")),
            "data",
            id="search-answer-tag-31",
        ),
        pytest.param(
            # A search result entry whose DN claims 5 bytes and has 1.
            _garbage_after_bind(lambda r: tlv(0x30, integer(r.message_id) + b"\x64\x03\x04\x05\x41")),
            "data",
            id="search-entry-garbage",
        ),
    ],
)
def test_garbage_from_the_server_is_a_clear_error(behaviour: Callable[[Client], None], reason: str) -> None:
    with fake_ldap(behaviour) as server:
        source = ActiveDirectorySource(fake_config(server.port))
        error, elapsed = refresh_failure(source)
    assert error.reason == reason, error.message
    assert f"ldap://127.0.0.1:{server.port}" in error.message
    assert not error.message.startswith("unexpected")
    assert elapsed < 2  # recognised, not waited out
    if reason == "data":
        assert "LDAP" in error.message and "?" in error.message  # names the likely cause


# ------------------------------------------------------------------------- bind_user form
def _bind_answer(code: int, diagnostic: str) -> Callable[[Client], None]:
    return reply_to_first_request(lambda r: message(r.message_id, bind_response(code, diagnostic)))


def test_upn_bind_user_refused_by_a_dn_only_server_says_to_use_the_dn() -> None:
    # OpenLDAP (and other non-AD directories) answer a UPN simple bind with invalidDNSyntax.
    with fake_ldap(_bind_answer(34, "invalid DN")) as server:
        error, _ = refresh_failure(ActiveDirectorySource(fake_config(server.port)))
    assert error.reason == "auth"
    assert "svc-intune@contoso.com" in error.message
    assert "distinguished name" in error.message and "DOMAIN\\user" in error.message


def test_misspelt_dn_bind_user_is_named_as_such() -> None:
    with fake_ldap(_bind_answer(34, "invalid DN")) as server:
        config = fake_config(server.port, bind_user="CN=svc intune,OU=Service,DC=contoso,DC=com")
        error, _ = refresh_failure(ActiveDirectorySource(config))
    assert error.reason == "auth"
    assert "check the spelling" in error.message


def test_samba_accepts_the_upn_bind(samba_dc: SambaDC, directory: Directory) -> None:
    # Real AD (and Samba) take a UPN: the hint above is only for servers that refuse it.
    assert ActiveDirectorySource(make_config(samba_dc)).refresh(None).n == STAFF_USERS


# ------------------------------------------------------------------------ nobody found
@pytest.fixture(scope="module")
def empty_ou(samba_dc: SambaDC, directory: Directory) -> Iterator[str]:
    with samba_dc.admin() as conn, contextlib.suppress(ldap_errors.LDAPEntryAlreadyExistsResult):
        conn.add(EMPTY_OU, ["top", "organizationalUnit"])
    yield EMPTY_OU


def test_search_that_matches_no_user_warns_with_base_and_filter(
    samba_dc: SambaDC, directory: Directory, empty_ou: str, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(samba_dc, search_bases=(empty_ou,))
    source = ActiveDirectorySource(config)
    with caplog.at_level(logging.WARNING, logger="exporter.sources.ad"):
        table = source.refresh(None)
    assert table.n == 0
    warning = table.meta["warning"]
    assert empty_ou in warning and config.user_filter in warning
    assert empty_ou in caplog.text and config.user_filter in caplog.text

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="exporter.sources.ad"):
        again = source.refresh(table)  # incremental: still nobody, still said, not logged again
    assert again.meta["read"] == "incremental" and again.meta["warning"] == warning
    assert caplog.text == ""


def test_one_empty_base_among_others_is_named(samba_dc: SambaDC, directory: Directory, empty_ou: str) -> None:
    table = ActiveDirectorySource(make_config(samba_dc, search_bases=(STAFF_OU, empty_ou))).refresh(None)
    assert table.n == STAFF_USERS
    assert empty_ou in table.meta["warning"] and STAFF_OU not in table.meta["warning"]


def test_no_warning_when_users_are_found(samba_dc: SambaDC, directory: Directory) -> None:
    assert "warning" not in ActiveDirectorySource(make_config(samba_dc)).refresh(None).meta


def test_warning_reaches_the_source_status(samba_dc: SambaDC, directory: Directory, empty_ou: str) -> None:
    ad = make_config(samba_dc, search_bases=(empty_ou,))
    engine = Engine(
        Config(estates=(EstateConfig(name="e", active_directory=ad),)), {"e": [ActiveDirectorySource(ad)]}
    )
    engine.refresh("e", "ad")
    status = ad_status(engine)
    assert status.up and status.warning is not None and empty_ou in status.warning
    engine.stop(timeout=2)
