"""The faults the soak injects, and the seeded plan of when each one runs.

A fault belongs to one *target* (``ad``, ``graph``, ``configmgr``, ``http``); at most one fault per
target is active at a time, faults of different targets overlap freely. Each fault names the
exporter sources it may take down and the failure reasons that name its cause (what
docs/hardening.md promises); ``alters_data`` marks faults that change what a healthy read returns
(bad ConfigMgr rows), during which the stage counts are not compared with the ground truth.
"""

from __future__ import annotations

import contextlib
import random
import socket
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from benchmarks.scale.estate import INTUNE_COLLECTION
from benchmarks.soak.backends import Servers

GRAPH_SOURCES = ("entra", "entra_organization")
# Graph endpoints the exporter reads on every refresh (the token and discovery ones are separate).
GRAPH_DATA_ENDPOINTS = (
    "users",
    "usersCount",
    "usersDelta",
    "organization",
    "subscribedSkus",
    "subscriptions",
)
BAD_ROW_FIRST_ID = 990_000_000
LONG_VALUE = 4 << 20  # characters of a value no identifier comes near
_EVERY = 10**9  # "times" of a simulator fault that lasts until it is cleared


@dataclass
class FaultKind:
    name: str
    target: str
    sources: tuple[str, ...]
    reasons: frozenset[str]  # acceptable failure reasons; "" = the source may stay up
    describe: str
    alters_data: bool = False


@dataclass
class ActiveFault:
    """One fault as applied: what it did (``detail``) and how to undo it."""

    kind: FaultKind
    detail: str
    undo: Callable[[], None]


def _kind(
    name: str, target: str, sources: tuple[str, ...], reasons: str, describe: str, alters: bool = False
) -> FaultKind:
    return FaultKind(name, target, sources, frozenset(reasons.split(",")), describe, alters)


KINDS: dict[str, FaultKind] = {
    k.name: k
    for k in (
        _kind("ad_down", "ad", ("ad",), "network", "the DC refuses connections (proxy stops listening)"),
        _kind("ad_reset", "ad", ("ad",), "network", "every connection is reset (RST) at once"),
        _kind("ad_hang", "ad", ("ad",), "timeout", "connections are accepted and never answered"),
        _kind(
            "ad_trickle",
            "ad",
            ("ad",),
            "timeout",
            "the DC's answers arrive one byte a second (the connection stays alive)",
        ),
        _kind(
            "graph_down", "graph", GRAPH_SOURCES, "network", "Graph refuses connections (simulator paused)"
        ),
        _kind(
            "graph_throttle",
            "graph",
            GRAPH_SOURCES,
            "throttled",
            "a 429/503 storm with Retry-After on every Graph endpoint",
        ),
        _kind(
            "graph_server_error",
            "graph",
            GRAPH_SOURCES,
            "network",
            "500/502 answers or connection resets on every Graph endpoint",
        ),
        _kind(
            "graph_malformed",
            "graph",
            GRAPH_SOURCES,
            "data",
            "bodies cut in half, or HTML instead of JSON, on every Graph endpoint",
        ),
        _kind(
            "graph_truncate",
            "graph",
            ("entra",),
            "data",
            "the delta link is rejected and the /users listing ends after its first page (no nextLink)",
        ),
        _kind(
            "graph_long_values",
            "graph",
            ("entra_organization",),
            ",data",
            "a 4 MiB skuPartNumber and subscription status (to be cut or refused, never served whole)",
        ),
        _kind("graph_hang", "graph", GRAPH_SOURCES, "timeout", "Graph reads requests and never answers"),
        _kind(
            "graph_trickle",
            "graph",
            GRAPH_SOURCES,
            "timeout",
            "Graph sends headers, then the body one byte a second",
        ),
        _kind(
            "graph_token",
            "graph",
            GRAPH_SOURCES,
            "network",
            "tokens expire and the token endpoint answers 503/500",
        ),
        _kind("cm_down", "configmgr", ("configmgr",), "network,other", "the database file is gone"),
        _kind("cm_locked", "configmgr", ("configmgr",), "timeout", "another process holds an exclusive lock"),
        _kind(
            "cm_bad_rows",
            "configmgr",
            ("configmgr",),
            ",data",
            "malformed user rows: bad GUID/SID/date/CloudUserID, NUL, invalid UTF-8",
            alters=True,
        ),
        _kind(
            "cm_long_values",
            "configmgr",
            ("configmgr",),
            ",data",
            "a user row with an 8 MiB account name and UPN (to be cut, never kept whole)",
            alters=True,
        ),
        _kind(
            "cm_bad_collection",
            "configmgr",
            ("configmgr",),
            "data",
            "the Intune collection turns into a device collection",
        ),
        _kind("cm_bad_view", "configmgr", ("configmgr",), "data", "v_R_User loses its SID0 column"),
        _kind("http_idle", "http", (), "", "300 idle or half-sent HTTP connections to the exporter"),
    )
}
TARGETS = ("ad", "graph", "configmgr", "http")


# ============================================================================== the plan
@dataclass(frozen=True)
class Planned:
    start: float  # seconds after the fault phase began
    duration: float
    kind: str


def make_plan(
    seed: int, phase_seconds: float, interval: float, kinds: dict[str, FaultKind] = KINDS
) -> list[Planned]:
    """Per target, faults back to back with healthy gaps, the kinds in a seeded shuffled cycle (so
    every kind of a target runs once before any runs twice). A fault lasts 1.5 to 3 refresh
    intervals (at least one refresh meets it); the gap after it (at least 1.75 intervals) leaves
    room to see the source recover before the target's next fault."""
    rng = random.Random(seed)
    plan: list[Planned] = []
    for target in TARGETS:
        names = sorted(k.name for k in kinds.values() if k.target == target)
        if not names:
            continue
        t = rng.uniform(0.5, 1.5) * interval
        cycle: list[str] = []
        while True:
            if not cycle:
                cycle = names[:]
                rng.shuffle(cycle)
            duration = rng.uniform(1.5, 3.0) * interval
            if t + duration > phase_seconds:
                break
            plan.append(Planned(round(t, 2), round(duration, 2), cycle.pop()))
            t += duration + rng.uniform(1.75, 2.5) * interval
    return sorted(plan, key=lambda p: p.start)


# ============================================================================== applying
@dataclass
class Injector:
    """Applies faults to the running servers (and to the exporter's HTTP port)."""

    servers: Servers
    seed: int
    exporter_port: Callable[[], int]
    _rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed * 7919 + 1)

    def apply(self, kind: FaultKind) -> ActiveFault:
        method: Callable[[], tuple[str, Callable[[], None]]] = getattr(self, "_" + kind.name)
        detail, undo = method()
        return ActiveFault(kind, detail, undo)

    # ------------------------------------------------------------------ AD (the proxy)
    def _ad_down(self) -> tuple[str, Callable[[], None]]:
        proxy = self.servers.ad_proxy
        proxy.refuse()
        return "proxy closed", proxy.listen_again

    def _ad_mode(self, mode: Any, **options: Any) -> Callable[[], None]:
        proxy = self.servers.ad_proxy
        proxy.set_mode(mode, **options)
        return lambda: proxy.set_mode("pass")

    def _ad_reset(self) -> tuple[str, Callable[[], None]]:
        return "RST on accept", self._ad_mode("reset")

    def _ad_hang(self) -> tuple[str, Callable[[], None]]:
        return "accept, never answer", self._ad_mode("hang")

    def _ad_trickle(self) -> tuple[str, Callable[[], None]]:
        # Somewhere inside a typical refresh's conversation (an incremental read is a few KiB):
        # 0 trickles the TLS handshake itself, later the bind or the search results.
        typical = self.servers.ad_proxy.typical_conversation()
        after = int(self._rng.choice((0.0, 0.3, 0.6, 0.9)) * typical)
        detail = f"1 byte/s after {after} of a typical {typical} bytes"
        return detail, self._ad_mode("trickle", interval=1.0, trickle_after=after)

    # ------------------------------------------------------------------ Graph (the simulator)
    def _graph_faults(self, endpoints: tuple[str, ...], kind: str, **options: Any) -> Callable[[], None]:
        sim = self.servers.graph.sim
        sim.reset_counters()  # fault "nth" counts from here
        for endpoint in endpoints:
            sim.add_fault(endpoint, 1, kind, times=_EVERY, **options)
        return sim.clear_faults

    def _graph_down(self) -> tuple[str, Callable[[], None]]:
        sim = self.servers.graph.sim
        sim.pause()
        return "paused", sim.resume

    def _graph_throttle(self) -> tuple[str, Callable[[], None]]:
        status = self._rng.choice(("429", "503"))
        retry_after = self._rng.choice((1.0, 2.0, 5.0))
        undo = self._graph_faults(GRAPH_DATA_ENDPOINTS, status, retry_after=retry_after)
        return f"HTTP {status}, Retry-After {retry_after:g}", undo

    def _graph_server_error(self) -> tuple[str, Callable[[], None]]:
        kind = self._rng.choice(("500", "502", "reset"))
        return kind, self._graph_faults(GRAPH_DATA_ENDPOINTS, kind)

    def _graph_malformed(self) -> tuple[str, Callable[[], None]]:
        kind = self._rng.choice(("malformed", "garbage"))
        return kind, self._graph_faults(GRAPH_DATA_ENDPOINTS, kind)

    def _graph_truncate(self) -> tuple[str, Callable[[], None]]:
        sim = self.servers.graph.sim
        undo = self._graph_faults(("users",), "truncate")
        sim.invalidate_delta_tokens(status=410)  # the next refresh must list /users in full
        return "410 on the delta link, /users without nextLink", undo

    def _graph_long_values(self) -> tuple[str, Callable[[], None]]:
        sim = self.servers.graph.sim
        with sim.lock:
            tenant = next(iter(sim.tenants.values()))
            sku, subscription = tenant.skus[0], tenant.subscriptions[0]
            saved = (sku["skuPartNumber"], subscription.get("status"))
            sku["skuPartNumber"] = "Z" * LONG_VALUE
            subscription["status"] = "Y" * LONG_VALUE

        def undo() -> None:
            with sim.lock:
                sku["skuPartNumber"], subscription["status"] = saved

        return f"skuPartNumber of {saved[0]} and a subscription status of {LONG_VALUE >> 20} MiB", undo

    def _graph_hang(self) -> tuple[str, Callable[[], None]]:
        return "hang", self._graph_faults(GRAPH_DATA_ENDPOINTS, "hang")

    def _graph_trickle(self) -> tuple[str, Callable[[], None]]:
        undo = self._graph_faults(GRAPH_DATA_ENDPOINTS, "trickle", interval=1.0, duration=None, then="finish")
        return "body 1 byte/s until cleared", undo

    def _graph_token(self) -> tuple[str, Callable[[], None]]:
        status = self._rng.choice(("503", "500"))
        undo = self._graph_faults(("token",), status)
        self.servers.graph.sim.expire_tokens()
        return f"tokens expired, token endpoint HTTP {status}", undo

    # ------------------------------------------------------------------ ConfigMgr (the SQLite file)
    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(
            self.servers.cm_path, isolation_level=None, check_same_thread=False, timeout=30
        )

    def _cm_down(self) -> tuple[str, Callable[[], None]]:
        directory = self.servers.cm_path.parent
        away = directory.with_name(directory.name + ".down")
        directory.rename(away)
        return f"{directory.name} renamed away", lambda: away.rename(directory)

    def _cm_locked(self) -> tuple[str, Callable[[], None]]:
        connection = self._connect()
        connection.execute("BEGIN EXCLUSIVE")

        def undo() -> None:
            connection.execute("ROLLBACK")
            connection.close()

        return "BEGIN EXCLUSIVE held", undo

    def _cm_bad_rows(self) -> tuple[str, Callable[[], None]]:
        return self._cm_rows(bad_user_rows(self._rng))

    def _cm_long_values(self) -> tuple[str, Callable[[], None]]:
        big = "x" * (8 << 20)
        row = (BAD_ROW_FIRST_ID, "huge", "CONTOSO\\" + big, big + "@contoso.com", None, None, None, None)
        return self._cm_rows([row])

    def _cm_rows(self, rows: list[tuple[object, ...]]) -> tuple[str, Callable[[], None]]:
        with contextlib.closing(self._connect()) as connection:
            connection.execute("BEGIN")
            connection.executemany(
                "INSERT INTO User_DISC (ItemKey, Name0, Unique_User_Name0, User_Principal_Name0, SID0,"
                " Object_GUID0, Creation_Date0, CloudUserId) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            connection.executemany(
                "INSERT INTO CollectionMembers (CollectionID, ResourceID, ResourceType) VALUES (?, ?, 4)",
                [(INTUNE_COLLECTION, row[0]) for row in rows],
            )
            connection.execute("COMMIT")

        def undo() -> None:
            with contextlib.closing(self._connect()) as connection:
                connection.execute("DELETE FROM User_DISC WHERE ItemKey >= ?", (BAD_ROW_FIRST_ID,))
                connection.execute("DELETE FROM CollectionMembers WHERE ResourceID >= ?", (BAD_ROW_FIRST_ID,))

        return f"{len(rows)} rows", undo

    def _cm_bad_collection(self) -> tuple[str, Callable[[], None]]:
        with contextlib.closing(self._connect()) as connection:
            connection.execute(
                "UPDATE Collections_G SET CollectionType = 2 WHERE CollectionID = ?", (INTUNE_COLLECTION,)
            )

        def undo() -> None:
            with contextlib.closing(self._connect()) as connection:
                connection.execute(
                    "UPDATE Collections_G SET CollectionType = 1 WHERE CollectionID = ?", (INTUNE_COLLECTION,)
                )

        return f"{INTUNE_COLLECTION} CollectionType 2", undo

    def _cm_bad_view(self) -> tuple[str, Callable[[], None]]:
        with contextlib.closing(self._connect()) as connection:
            (original,) = connection.execute(
                "SELECT sql FROM sqlite_master WHERE name = 'v_R_User'"
            ).fetchone()
            connection.execute("DROP VIEW v_R_User")
            connection.execute(original.replace(" u.SID0,", ""))

        def undo() -> None:
            with contextlib.closing(self._connect()) as connection:
                connection.execute("DROP VIEW v_R_User")
                connection.execute(original)

        return "view without SID0", undo

    # ------------------------------------------------------------------ the exporter's HTTP server
    def _http_idle(self) -> tuple[str, Callable[[], None]]:
        clients = SlowClients(self.exporter_port(), 300)
        clients.start()
        return f"{clients.opened} connections", clients.close


def bad_user_rows(rng: random.Random) -> list[tuple[object, ...]]:
    """User_DISC rows no real site database should hold (ItemKey, Name0, Unique_User_Name0,
    User_Principal_Name0, SID0, Object_GUID0, Creation_Date0, CloudUserId)."""
    rows: list[tuple[object, ...]] = [
        (
            0,
            "bad guid",
            "CONTOSO\\badguid",
            "badguid@contoso.com",
            "S-1-5-21-1-2-3-4",
            b"\x01\x02\x03",
            None,
            None,
        ),
        (1, "bad sid", "CONTOSO\\badsid", "badsid@contoso.com", "not-a-sid", None, None, None),
        (2, "bad date", "CONTOSO\\baddate", "baddate@contoso.com", None, None, "yesterday", None),
        (4, "nul", "CONTOSO\\nul\x00user", "nul\x00@contoso.com", None, None, None, None),
        (5, "bad utf8", b"CONTOSO\\\xff\xfe\xfd", b"\xc3(@contoso.com", None, None, None, None),
        (6, "bad cloud id", "CONTOSO\\badcloud", "badcloud@contoso.com", None, None, None, "not-a-guid"),
        (
            7,
            "date 9999",
            "CONTOSO\\date9999",
            "date9999@contoso.com",
            None,
            None,
            "9999-99-99 99:99:99",
            None,
        ),
    ]
    rng.shuffle(rows)
    return [(BAD_ROW_FIRST_ID + number, *row[1:]) for number, row in enumerate(rows)]


class SlowClients:
    """Connections that never finish a request: half idle, half with a partial header."""

    def __init__(self, port: int, count: int) -> None:
        self.port = port
        self.count = count
        self.sockets: list[socket.socket] = []
        self.opened = 0
        self.refused = 0
        self._lock = threading.Lock()

    def start(self) -> None:
        for number in range(self.count):
            try:
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=2)
                if number % 2:
                    sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: soak\r\nX-Slow: ")
            except OSError:
                self.refused += 1
                continue
            self.sockets.append(sock)
            self.opened += 1

    def close(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()
        self.sockets.clear()
