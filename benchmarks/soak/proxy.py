"""A fault-injecting TCP proxy in front of a real server (the soak's AD path).

Every accepted connection takes the proxy's mode at that moment and keeps it for its life:

- ``pass``: bytes flow both ways unchanged;
- ``trickle``: the client's bytes go through, the server's answer is passed on ``trickle_after``
  bytes at once and then ONE BYTE PER ``interval`` (the connection looks alive, so per-read timeouts
  never fire); a trickling connection keeps trickling after the fault clears, until the client
  closes it, as a backend that never finishes would;
- ``hang``: accepted, read, never answered (held until the client closes it);
- ``reset``: accepted and reset at once (RST);
- ``refuse``: not a connection mode but the proxy's state: it stops listening (clients get
  "connection refused") and cuts every open connection, as a server that went down.

The proxy counts the connections open per mode: a trickling or hanging connection still open long
after its fault cleared is one the client (the exporter) abandoned instead of closing.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

Mode = Literal["pass", "trickle", "hang", "reset"]
MODES: tuple[Mode, ...] = ("pass", "trickle", "hang", "reset")


@dataclass(eq=False)  # identity: kept in a set
class _Connection:
    mode: Mode
    client: socket.socket
    upstream: socket.socket | None
    opened: float
    closed: threading.Event = field(default_factory=threading.Event)
    down_bytes: int = 0  # server bytes received for this client


class FaultProxy:
    def __init__(self, target_port: int, *, port: int = 0, name: str = "proxy") -> None:
        self.target_port = target_port
        self.name = name
        self.mode: Mode = "pass"
        self.interval = 1.0
        self.trickle_after = 0
        self._lock = threading.Lock()
        self._connections: set[_Connection] = set()
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._accepter: threading.Thread | None = None
        self.accepted: dict[str, int] = dict.fromkeys(MODES, 0)
        # Server bytes of recently closed pass-through connections: how long a conversation is.
        self.recent_sizes: deque[int] = deque(maxlen=20)
        self.port = port
        self._listen()

    # ------------------------------------------------------------------ control
    def set_mode(self, mode: Mode, *, interval: float = 1.0, trickle_after: int = 0) -> None:
        with self._lock:
            self.mode, self.interval, self.trickle_after = mode, interval, trickle_after

    @property
    def refusing(self) -> bool:
        return self._listener is None

    def refuse(self) -> None:
        """Stop listening and cut every open connection: new clients get "connection refused"."""
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.close()
        if self._accepter is not None:
            self._accepter.join(5)
            self._accepter = None
        for connection in self.open_connections():
            self._close(connection, reset=True)

    def listen_again(self) -> None:
        if self._listener is None:
            self._listen()

    def close(self) -> None:
        self._stop.set()
        self.refuse()

    def open_connections(self) -> list[_Connection]:
        with self._lock:
            return list(self._connections)

    def open_counts(self, older_than: float = 0.0) -> dict[str, int]:
        """Connections open now per mode (only those opened more than ``older_than`` seconds ago)."""
        counts = dict.fromkeys(MODES, 0)
        now = time.monotonic()
        for connection in self.open_connections():
            if now - connection.opened >= older_than:
                counts[connection.mode] += 1
        return counts

    # ------------------------------------------------------------------ serving
    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        deadline = time.monotonic() + 10
        while True:
            try:
                listener.bind(("127.0.0.1", self.port))
                break
            except OSError:
                if time.monotonic() > deadline:
                    listener.close()
                    raise
                time.sleep(0.1)
        listener.listen(64)
        listener.settimeout(0.2)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._accepter = threading.Thread(target=self._accept, args=(listener,), name=self.name, daemon=True)
        self._accepter.start()

    def _accept(self, listener: socket.socket) -> None:
        while not self._stop.is_set() and self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                mode, interval, after = self.mode, self.interval, self.trickle_after
                self.accepted[mode] += 1
            threading.Thread(
                target=self._serve,
                args=(client, mode, interval, after),
                name=f"{self.name}-{mode}",
                daemon=True,
            ).start()

    def _serve(self, client: socket.socket, mode: Mode, interval: float, after: int) -> None:
        if mode == "reset":
            _reset(client)
            return
        upstream = None
        if mode != "hang":
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                _reset(client)
                return
        connection = _Connection(mode, client, upstream, time.monotonic())
        with self._lock:
            self._connections.add(connection)
        try:
            if upstream is None:
                self._hold(connection)
            else:
                self._pump(connection, trickle=mode == "trickle", interval=interval, after=after)
        finally:
            self._close(connection)

    def _hold(self, connection: _Connection) -> None:
        """Read and drop what the client sends until it closes (or the proxy stops)."""
        client = connection.client
        while not (self._stop.is_set() or connection.closed.is_set()):
            ready, _, _ = select.select([client], [], [], 0.2)
            if ready:
                try:
                    if not client.recv(65536):
                        return
                except OSError:
                    return

    def _pump(self, connection: _Connection, *, trickle: bool, interval: float, after: int) -> None:
        client, upstream = connection.client, connection.upstream
        assert upstream is not None
        backlog = bytearray()  # server bytes not yet passed on (trickle)
        passed = 0
        next_byte = time.monotonic()
        upstream_open = True
        while not (self._stop.is_set() or connection.closed.is_set()):
            wait = 0.2
            if backlog:
                wait = max(0.0, min(wait, next_byte - time.monotonic()))
            readable = [client] + ([upstream] if upstream_open else [])
            try:
                ready, _, _ = select.select(readable, [], [], wait)
            except (OSError, ValueError):
                return
            try:
                if client in ready:
                    data = client.recv(65536)
                    if not data:
                        return  # the client closed: done
                    upstream.sendall(data)
                if upstream_open and upstream in ready:
                    data = upstream.recv(65536)
                    connection.down_bytes += len(data)
                    if not data:
                        upstream_open = False
                        if not backlog:
                            return
                    elif not trickle:
                        client.sendall(data)
                    else:
                        free = max(0, after - passed)
                        client.sendall(data[:free])
                        passed += min(free, len(data))
                        backlog += data[free:]
                if backlog and time.monotonic() >= next_byte:
                    client.sendall(bytes(backlog[:1]))
                    del backlog[:1]
                    next_byte = time.monotonic() + interval
                    if not backlog and not upstream_open:
                        return
            except OSError:
                return

    def typical_conversation(self) -> int:
        """Median server bytes of the recent pass-through connections (0 when none was seen)."""
        sizes = sorted(self.recent_sizes)
        return sizes[len(sizes) // 2] if sizes else 0

    def _close(self, connection: _Connection, reset: bool = False) -> None:
        first = not connection.closed.is_set()
        connection.closed.set()
        with self._lock:
            self._connections.discard(connection)
            if first and connection.mode == "pass" and connection.down_bytes:
                self.recent_sizes.append(connection.down_bytes)
        for sock in (connection.client, connection.upstream):
            if sock is None:
                continue
            if reset:
                _reset(sock)
            else:
                with contextlib.suppress(OSError):
                    sock.close()


def _reset(sock: socket.socket) -> None:
    """Close with RST instead of FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()
