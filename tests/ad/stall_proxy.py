"""A TCP proxy in front of a real server that can stall it: pass bytes through, trickle the
server's answer one byte per interval (the connection stays alive, so per-read timeouts never
fire), or accept and say nothing at all. The mode is taken per connection when it is accepted.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any, Literal

Mode = Literal["pass", "trickle", "hang"]


class StallingProxy:
    def __init__(self, target_port: int, interval: float = 1.0, trickle_after: int = 0) -> None:
        self.target_port = target_port
        self.interval = interval
        self.trickle_after = trickle_after  # bytes of the server's answer passed on before trickling
        self.mode: Mode = "pass"
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.listener.settimeout(0.2)
        self.port: int = self.listener.getsockname()[1]
        self.stop = threading.Event()
        self.connections: dict[Mode, int] = {"pass": 0, "trickle": 0, "hang": 0}
        self._sockets: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                continue
            mode = self.mode
            self.connections[mode] += 1
            self._sockets.append(client)
            if mode == "hang":
                continue  # held open, never answered, closed at the end
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            upstream.settimeout(None)
            self._sockets.append(upstream)
            self._pump(client, upstream, trickle=False)
            self._pump(upstream, client, trickle=mode == "trickle")

    def _pump(self, source: socket.socket, target: socket.socket, trickle: bool) -> None:
        def run() -> None:
            passed = 0
            with contextlib.suppress(OSError):
                while not self.stop.is_set():
                    data = source.recv(65536)
                    if not data:
                        target.shutdown(socket.SHUT_WR)
                        return
                    if trickle:
                        now = max(0, min(len(data), self.trickle_after - passed))
                        target.sendall(data[:now])
                        passed += now
                        data = data[now:]
                    for index in range(len(data) if trickle else 0):
                        if self.stop.wait(self.interval):
                            return
                        target.sendall(data[index : index + 1])
                    if not trickle:
                        target.sendall(data)

        threading.Thread(target=run, daemon=True).start()

    def close(self) -> None:
        self.stop.set()
        self._thread.join(timeout=5)
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()
        self.listener.close()


@contextlib.contextmanager
def stalling_proxy(target_port: int, **options: Any) -> Iterator[StallingProxy]:
    proxy = StallingProxy(target_port, **options)
    try:
        yield proxy
    finally:
        proxy.close()
