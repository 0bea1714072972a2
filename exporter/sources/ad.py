"""Active Directory source: the user accounts that start the provisioning chain.

Every refresh opens a fresh LDAP connection (LDAPS or StartTLS), binds with the service account,
reads and unbinds again. The first refresh (and every ``full_resync_interval``) reads every user
under ``search_bases`` with a paged search; the others read only what changed since, by
``uSNChanged`` against the same domain controller (see exporter.sources.ad_sync for how and what
stays exact). ``find_users`` serves ``trace`` with point look-ups (exporter.sources.ad_trace).

Every call is bounded by the refresh deadline, and at the deadline the connection is shut down
(by a watchdog of the refresh itself, and by ``abort()`` from the engine), so a DC that hangs or
trickles bytes can never keep a refresh running past it (exporter.sources.ad_ldap).

The modules: ad_ldap (transport, TLS, the bounded session), ad_records (entries -> AdUser),
ad_sync (incremental reads), ad_trace (look-ups), ad_errors (failures -> SourceError).
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import ldap3
from ldap3.core import exceptions as ldap_errors

from exporter.config import ActiveDirectoryConfig
from exporter.model import AdTable, AdTableBuilder, SourceData, SourceKind
from exporter.secrets import SecretMask
from exporter.sources import ad_errors, ad_sync, ad_trace
from exporter.sources.ad_errors import classify
from exporter.sources.ad_ldap import (
    BaseNotFound,
    DeadlineReached,
    Endpoint,
    HandshakeVerifyingTls,
    IncompleteSearch,
    LdapSession,
    ProtocolError,
    build_ssl_context,
    connect_timeout,
    escape_text,
    parse_endpoint,
    receive_timeout,
)
from exporter.sources.ad_records import (
    BASE_ATTRIBUTES,
    SkippedEntries,
    generalized_time_seconds,
    stream_users,
    text_value,
    user_attributes,
    user_from_raw,
)
from exporter.sources.ad_sync import (
    DELETIONS_EXACT,
    DELETIONS_LAG,
    META_CONTAINERS,
    META_DC,
    META_DELETIONS,
    META_SCOPE,
    DcState,
    RootDse,
    Scope,
)
from exporter.sources.base import ConfigurationError, SourceError
from exporter.sources.isolated import CHANGES_ONLY

log = logging.getLogger(__name__)

META_ENTRIES_READ = "entries_read"
META_EMPTY_BASES = "empty_bases"
META_WARNING = "warning"
META_REMOVED = "removed"  # objectGUIDs (hex) that left, in a table of only the changes
_AT_DEADLINE = 0.1  # seconds: a call that timed out this close to the deadline timed out because of it


def discover_netbios_domain(session: LdapSession, root: RootDse) -> str:
    """nETBIOSName of the crossRef whose nCName is the domain's defaultNamingContext."""
    if not root.default_nc or not root.config_nc:
        raise ValueError("the rootDSE has no defaultNamingContext/configurationNamingContext")
    partitions = f"CN=Partitions,{root.config_nc}"
    found = session.search(
        partitions,
        f"(&(objectClass=crossRef)(nCName={escape_text(root.default_nc)})(nETBIOSName=*))",
        ["nETBIOSName"],
        scope=ldap3.LEVEL,
    )
    for _, raw in found:
        name = text_value(raw, "nETBIOSName")
        if name:
            return name.upper()
    raise ValueError(f"no crossRef with a nETBIOSName for {root.default_nc} under {partitions}")


class ActiveDirectorySource:
    """Reads the users under ``search_bases`` from one domain controller."""

    kind: SourceKind = "ad"

    def __init__(self, config: ActiveDirectoryConfig) -> None:
        self.config = config
        try:
            self.endpoint = parse_endpoint(config.url, config.start_tls)
        except ValueError as exc:
            raise ConfigurationError(f"active_directory.url: {exc}") from None
        self._mask = SecretMask(config.secrets())
        self._netbios_domain: str | None = config.netbios_domain
        self._lock = threading.Lock()
        self._sessions: set[LdapSession] = set()  # in progress, for abort()
        self._no_incremental_logged = ""
        if self.endpoint.encrypted:
            try:
                self._ssl_context()
            except SourceError as exc:
                raise ConfigurationError(exc.message) from None
        elif config.authentication == "simple":
            log.warning(
                "Active Directory %s: simple bind without TLS sends the password in clear text; "
                "use ldaps:// or start_tls: true",
                self.endpoint,
            )

    def describe(self) -> str:
        return str(self.endpoint)

    # -- connection -------------------------------------------------------------------------
    def _ssl_context(self) -> ssl.SSLContext:
        # Loaded for every connection so that a renewed CA file is picked up without a restart.
        cfg = self.config
        try:
            return build_ssl_context(cfg.ca_file, cfg.tls_verify)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            message = f"cannot load ca_file {cfg.ca_file!r} for {self.endpoint}: {exc}"
            raise SourceError("other", message) from None

    def _tls(self) -> ldap3.Tls:
        # The name the certificate must carry. When the URL holds an IP address or an alias the
        # certificate does not list, tls_server_name lets the operator name the DC explicitly
        # instead of turning verification off.
        name = self.config.tls_server_name or self.endpoint.host
        return HandshakeVerifyingTls(self._ssl_context(), name)

    def build_connection(self, deadline: float | None = None) -> ldap3.Connection:
        """The (not yet opened) connection, configured from the config; no network I/O.

        Its timeouts are the configured per-call ``timeout``, shortened to the time left until
        ``deadline``; the session re-derives the socket timeout before every request.
        """
        cfg = self.config
        server = ldap3.Server(
            self.endpoint.host,
            port=self.endpoint.port,
            use_ssl=self.endpoint.use_ssl,
            tls=self._tls() if self.endpoint.encrypted else None,
            connect_timeout=connect_timeout(cfg.timeout, deadline),
            get_info=ldap3.NONE,
        )
        return ldap3.Connection(
            server,
            user=cfg.bind_user,
            password=cfg.bind_password.value,
            authentication=ldap3.NTLM if cfg.authentication == "ntlm" else ldap3.SIMPLE,
            client_strategy=ldap3.SYNC,
            read_only=True,
            raise_exceptions=True,
            receive_timeout=receive_timeout(cfg.timeout, deadline),
            auto_referrals=False,
        )

    @contextlib.contextmanager
    def _session(self, deadline: float | None) -> Iterator[LdapSession]:
        """An open, bound session; every failure inside comes out as a (masked) SourceError."""
        session: LdapSession | None = None
        watchdog: threading.Timer | None = None
        try:
            session = LdapSession(
                self.build_connection(deadline), self.config.timeout, deadline, self.endpoint.start_tls
            )
            with self._lock:
                self._sessions.add(session)
            if deadline is not None:
                # The refresh ends by its deadline even when nobody calls abort().
                watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), session.abort)
                watchdog.daemon = True
                watchdog.start()
            session.open()
            yield session
        except Exception as exc:
            error = self._translate(exc, session)
            if error is None:
                raise
            raise SourceError(error.reason, self._mask.mask(error.message)) from None
        finally:
            if watchdog is not None:
                watchdog.cancel()
            if session is not None:
                with self._lock:
                    self._sessions.discard(session)
                session.close()

    def _translate(self, exc: Exception, session: LdapSession | None) -> SourceError | None:
        """The SourceError for a failure; None for a bug of ours (it propagates as it is)."""
        endpoint, bind_user = self.endpoint, self.config.bind_user
        aborted = session is not None and session.aborted
        activity = session.activity if session is not None else "connecting"
        if isinstance(exc, SourceError):
            return exc
        if isinstance(exc, DeadlineReached) or (aborted and not isinstance(exc, ProtocolError)):
            return ad_errors.deadline_error(DeadlineReached(activity), endpoint)
        if isinstance(exc, ProtocolError):
            return ad_errors.protocol_error(exc, endpoint)
        if isinstance(exc, BaseNotFound):
            return ad_errors.base_not_found(exc, endpoint, bind_user)
        if isinstance(exc, IncompleteSearch):
            return ad_errors.incomplete_search(exc, endpoint)
        if isinstance(exc, ldap_errors.LDAPException | OSError):
            error = classify(exc, endpoint, bind_user, activity)
            left = session.time_left() if session is not None else None
            if error.reason == "timeout" and left is not None and left <= _AT_DEADLINE:
                # A per-call timeout that ran out with the operation's time: say so plainly.
                return ad_errors.deadline_error(DeadlineReached(activity), endpoint)
            return error
        if isinstance(exc, ValueError):  # UnicodeDecodeError included
            return SourceError("data", f"unexpected data from {endpoint}: {exc}")
        return None

    # -- refresh ----------------------------------------------------------------------------
    def refresh(self, previous: SourceData | None, deadline: float | None = None) -> AdTable:
        """A full read when ``previous`` is None, else the changes since ``previous`` merged in."""
        with self._session(deadline) as session:
            root = ad_sync.read_root(session)
            scope = self._scope(session, root)
            dc, why_not = ad_sync.read_dc_state(session, root)
            untracked = ad_sync.untracked_filter_reason(scope.user_filter)
            if untracked:
                dc, why_not = None, untracked
            if dc is None:
                self._explain_no_incremental(why_not)
            before = previous if isinstance(previous, AdTable) else None
            reason = ad_sync.full_read_reason(before, dc, scope)
            if reason is None and before is not None and dc is not None:
                table = self._incremental(session, root, scope, dc, before)
            else:
                if before is not None and dc is not None:  # (no DC state: explained once above)
                    log.info("Active Directory %s: full read (%s)", self.endpoint, reason)
                table = self._full(session, root, scope, dc)
            table.meta[META_ENTRIES_READ] = session.entries_read
        return table.prepare()

    def _scope(self, session: LdapSession, root: RootDse) -> Scope:
        cfg = self.config
        return Scope(
            search_bases=tuple(cfg.search_bases),
            user_filter=cfg.user_filter,
            source_anchor=cfg.source_anchor,
            netbios_domain=self._netbios(session, root),
            page_size=cfg.page_size,
        )

    def _full(self, session: LdapSession, root: RootDse, scope: Scope, dc: DcState | None) -> AdTable:
        skipped = SkippedEntries()
        per_base: dict[str, int] = {}
        builder = AdTableBuilder(scope.netbios_domain)
        for page in scope.user_pages(session, scope.user_filter, skipped=skipped, per_base=per_base):
            page.add_to(builder)
        table = builder.build()
        self._report_skipped(skipped)
        empty = [base for base in scope.search_bases if not per_base.get(base)]
        table.meta.update(read="full", **{META_EMPTY_BASES: empty})
        if dc is not None:
            table.meta[META_DC] = dc.to_meta()
            table.meta[META_SCOPE] = scope.fingerprint()
            table.meta[META_CONTAINERS] = sorted(
                ad_sync.read_containers(session, scope.search_bases, scope.page_size)
            )
            visible = ad_sync.deletions_visible(session, root)
            table.meta[META_DELETIONS] = DELETIONS_EXACT if visible else DELETIONS_LAG
        self._set_warning(table, empty, previous_warning=None)
        return table

    def _incremental(
        self, session: LdapSession, root: RootDse, scope: Scope, dc: DcState, previous: AdTable
    ) -> AdTable:
        before = DcState.from_meta(previous.meta.get(META_DC))
        assert before is not None  # full_read_reason checked it
        changes_only = bool(previous.meta.get(CHANGES_ONLY))  # previous: an empty table, the held one's meta
        meta = dict(previous.meta)
        if dc.usn == before.usn:
            table = previous.derive(previous.columns(), previous.children, meta)  # nothing committed since
        else:
            skipped = SkippedEntries()
            known = set(previous.meta.get(META_CONTAINERS) or ())
            changes = ad_sync.read_changes(session, root, scope, before.usn + 1, known, skipped)
            self._report_skipped(skipped)
            table = previous.with_changes(changes.upserts.values(), changes.removed)
            if changes_only:
                meta[META_REMOVED] = sorted(guid.hex() for guid in changes.removed)
            meta[META_CONTAINERS] = sorted(changes.containers)
            # A base that had no user stops being reported once a changed user shows up under it.
            meta[META_EMPTY_BASES] = [
                base for base in meta.get(META_EMPTY_BASES) or () if not changes.in_scope_per_base.get(base)
            ]
            table = table.derive(table.columns(), table.children, meta)
            log.debug(
                "Active Directory %s: USN %d -> %d: %d users changed or entered the scope, %d -> %d users",
                self.endpoint,
                before.usn,
                dc.usn,
                len(changes.upserts),
                previous.n,
                table.n,
            )
        table.meta.update(read="incremental", **{META_DC: dc.to_meta()})
        if not changes_only:  # else the parent warns, from the merged table (settle)
            empty = list(table.meta.get(META_EMPTY_BASES) or ())
            self._set_warning(table, empty, previous_warning=previous.meta.get(META_WARNING))
        return table

    # -- in a child process (exporter.sources.isolated) -------------------------------------
    def child_refresh(self, previous: SourceData | None) -> tuple[bool, SourceData | None]:
        """Always in a child. A full read when there is nothing to continue from; otherwise the
        child is given an empty table with the held table's meta and hands back only the users that
        changed and the objectGUIDs that left (:meth:`settle` merges them), or a full table when
        it had to read everything (another DC, a USN gone backwards, a changed scope)."""
        if not isinstance(previous, AdTable):
            return True, None
        return True, AdTable.empty(meta={**previous.meta, CHANGES_ONLY: True})

    def settle(self, previous: SourceData | None, result: SourceData) -> SourceData:
        """The held table with a child's changes merged in; a full read as it came."""
        if not isinstance(result, AdTable) or not result.meta.get(CHANGES_ONLY):
            return result
        if not isinstance(previous, AdTable):
            raise SourceError("other", f"{self.describe()}: changes came back for data that is not held")
        meta = {key: value for key, value in result.meta.items() if key not in (CHANGES_ONLY, META_REMOVED)}
        removed = [bytes.fromhex(guid) for guid in result.meta.get(META_REMOVED) or ()]
        table = previous.merged_with(result.derive(result.columns(), result.children, meta), removed)
        empty = list(table.meta.get(META_EMPTY_BASES) or ())
        self._set_warning(table, empty, previous_warning=previous.meta.get(META_WARNING))
        return table

    def _set_warning(self, table: AdTable, empty_bases: Sequence[str], previous_warning: object) -> None:
        """Say when the scope finds no user at all (or none under a base): a wrong base or filter
        (e.g. the default objectCategory=person on a directory where objectCategory is a DN)."""
        where = f"on {self.endpoint}"
        user_filter = self.config.user_filter
        if table.n == 0:
            bases = "; ".join(self.config.search_bases)
            warning = (
                f"no user under {bases} matches user_filter {user_filter} {where}: "
                "check search_bases and user_filter"
            )
        elif empty_bases:
            warning = f"no user under {'; '.join(empty_bases)} matches user_filter {user_filter} {where}"
        else:
            table.meta.pop(META_WARNING, None)
            return
        table.meta[META_WARNING] = warning
        if warning != previous_warning:
            log.warning("Active Directory %s: %s", self.endpoint, warning)

    def _report_skipped(self, skipped: SkippedEntries) -> None:
        if skipped.count:
            log.warning(
                "Active Directory %s: skipped %d entries without the attributes of a user account, e.g. %s",
                self.endpoint,
                skipped.count,
                self._mask.mask(skipped.example),
            )

    def _explain_no_incremental(self, why: str) -> None:
        if why != self._no_incremental_logged:
            self._no_incremental_logged = why
            log.info("Active Directory %s: every refresh is a full read: %s", self.endpoint, why)

    # -- between refreshes (a refresh may run in a child process: exporter.sources.isolated) ----
    def carry_over(self) -> dict[str, Any]:
        return {"netbios": self._netbios_domain, "no_incremental": self._no_incremental_logged}

    def take_over(self, memory: dict[str, Any]) -> None:
        self._netbios_domain = memory.get("netbios") or self._netbios_domain
        self._no_incremental_logged = str(memory.get("no_incremental") or "")

    def _netbios(self, session: LdapSession, root: RootDse) -> str:
        if self._netbios_domain:
            return self._netbios_domain
        try:
            name = discover_netbios_domain(session, root)
        except ValueError as exc:
            raise SourceError(
                "data",
                f"cannot discover the NetBIOS domain name from {self.endpoint}: {exc}; set netbios_domain",
            ) from None
        self._netbios_domain = name
        return name

    # -- trace ------------------------------------------------------------------------------
    def find_users(
        self,
        *,
        text: str | None = None,
        sids: Sequence[str] = (),
        guids: Sequence[bytes] = (),
        deadline: float | None = None,
    ) -> tuple[AdTable, list[str]]:
        """The in-scope users matching the query, and one line per match outside the scope."""
        with self._session(deadline) as session:
            root = ad_sync.read_root(session)
            scope = self._scope(session, root)
            return ad_trace.find_users(session, root, scope, str(self.endpoint), text, sids, guids)

    # -- lifecycle --------------------------------------------------------------------------
    def abort(self) -> None:
        """Shut down the connections of refreshes and look-ups in progress (any thread)."""
        with self._lock:
            sessions = list(self._sessions)
        for session in sessions:
            session.abort()

    def close(self) -> None:
        self.abort()


__all__ = [
    "BASE_ATTRIBUTES",
    "ActiveDirectorySource",
    "Endpoint",
    "build_ssl_context",
    "classify",
    "discover_netbios_domain",
    "generalized_time_seconds",
    "parse_endpoint",
    "stream_users",
    "user_attributes",
    "user_from_raw",
]
