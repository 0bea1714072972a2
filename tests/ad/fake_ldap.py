"""A loopback TCP server that speaks just enough LDAP (BER by hand) to misbehave on purpose.

Samba answers correctly; these tests need a server that does not: one that answers a bind with
``invalidDNSyntax`` (as OpenLDAP does for a UPN), sends bytes that are no LDAP message, hangs
after accepting, trickles its answer a byte a second, or ends a search with a referral or a limit.
Each accepted connection runs ``behaviour(client)`` in its own thread.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

BIND_REQUEST = 0x60
UNBIND_REQUEST = 0x42
SEARCH_REQUEST = 0x63
EXTENDED_REQUEST = 0x77


# ----------------------------------------------------------------------------------------- BER
def _length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def tlv(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + _length(len(content)) + content


def integer(value: int, tag: int = 0x02) -> bytes:
    size = max(1, (value.bit_length() + 8) // 8)
    return tlv(tag, value.to_bytes(size, "big", signed=True))


def octets(value: bytes | str, tag: int = 0x04) -> bytes:
    return tlv(tag, value.encode("utf-8") if isinstance(value, str) else value)


def message(message_id: int, operation: bytes) -> bytes:
    return tlv(0x30, integer(message_id) + operation)


def _result(tag: int, code: int, diagnostic: str, referrals: Sequence[str] = ()) -> bytes:
    body = integer(code, tag=0x0A) + octets(b"") + octets(diagnostic)
    if referrals:
        body += tlv(0xA3, b"".join(octets(url) for url in referrals))
    return tlv(tag, body)


def bind_response(code: int = 0, diagnostic: str = "") -> bytes:
    return _result(0x61, code, diagnostic)


def search_done(code: int = 0, diagnostic: str = "", referrals: Sequence[str] = ()) -> bytes:
    return _result(0x65, code, diagnostic, referrals)


def search_entry(dn: str, attributes: dict[str, list[bytes]]) -> bytes:
    parts = b"".join(
        tlv(0x30, octets(name) + tlv(0x31, b"".join(octets(v) for v in values)))
        for name, values in attributes.items()
    )
    return tlv(0x64, octets(dn) + tlv(0x30, parts))


# -------------------------------------------------------------------------------------- server
@dataclass
class Request:
    message_id: int
    operation: int  # the protocolOp tag, e.g. BIND_REQUEST
    body: bytes  # the content of the protocolOp

    @property
    def search_base(self) -> str:
        """The baseObject of a search request (the first field of its body)."""
        _, content, _ = _read_tlv(self.body, 0)
        return content.decode("utf-8")


def _read_tlv(data: bytes, position: int) -> tuple[int, bytes, int]:
    """(tag, content, position after it) of the TLV at ``position``."""
    tag, first = data[position], data[position + 1]
    position += 2
    if first & 0x80:
        size = first & 0x7F
        length = int.from_bytes(data[position : position + size], "big")
        position += size
    else:
        length = first
    return tag, data[position : position + length], position + length


class Client:
    """One accepted connection, as the behaviour sees it."""

    def __init__(self, sock: socket.socket, stop: threading.Event) -> None:
        self.sock = sock
        self.stop = stop
        self._buffer = b""

    def _fill(self, size: int) -> bool:
        while len(self._buffer) < size:
            chunk = self.sock.recv(65536)
            if not chunk:
                return False
            self._buffer += chunk
        return True

    def read_request(self) -> Request | None:
        """The next LDAP message of the client; None when it closed the connection."""
        if not self._fill(2):
            return None
        first = self._buffer[1]
        header = 2 + (first & 0x7F if first & 0x80 else 0)
        if not self._fill(header):
            return None
        length = int.from_bytes(self._buffer[2:header], "big") if first & 0x80 else first
        if not self._fill(header + length):
            return None
        raw, self._buffer = self._buffer[: header + length], self._buffer[header + length :]
        _, content, _ = _read_tlv(raw, 0)
        _, message_id, position = _read_tlv(content, 0)
        operation, body, _ = _read_tlv(content, position)
        return Request(int.from_bytes(message_id, "big"), operation, body)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def trickle(self, data: bytes, interval: float = 1.0) -> None:
        """Send ``data`` one byte at a time, ``interval`` seconds apart (until stopped)."""
        for index in range(len(data)):
            if self.stop.wait(interval):
                return
            self.sock.sendall(data[index : index + 1])

    def hold(self) -> None:
        """Keep the connection open without a word until the server stops."""
        self.stop.wait()


Behaviour = Callable[[Client], None]


class FakeLdapServer:
    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.listener.settimeout(0.2)
        self.port: int = self.listener.getsockname()[1]
        self.stop = threading.Event()
        self.accepted = 0
        self._clients: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                sock, _ = self.listener.accept()
            except OSError:
                continue
            self.accepted += 1
            self._clients.append(sock)
            threading.Thread(target=self._run, args=(sock,), daemon=True).start()

    def _run(self, sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            self.behaviour(Client(sock, self.stop))

    def close(self) -> None:
        self.stop.set()
        self._thread.join(timeout=5)
        for sock in self._clients:
            with contextlib.suppress(OSError):
                sock.close()
        self.listener.close()


@contextlib.contextmanager
def fake_ldap(behaviour: Behaviour) -> Iterator[FakeLdapServer]:
    server = FakeLdapServer(behaviour)
    try:
        yield server
    finally:
        server.close()


# --------------------------------------------------------------------------------- behaviours
def answer_bind_then(after_bind: Behaviour) -> Behaviour:
    """Accept the bind, then hand the connection to ``after_bind``."""

    def behaviour(client: Client) -> None:
        request = client.read_request()
        if request is None:
            return
        client.send(message(request.message_id, bind_response(0)))
        after_bind(client)

    return behaviour


def reply_to_first_request(payload: Callable[[Request], bytes], then_close: bool = False) -> Behaviour:
    def behaviour(client: Client) -> None:
        request = client.read_request()
        if request is None:
            return
        client.send(payload(request))
        if then_close:
            client.sock.shutdown(socket.SHUT_RDWR)
        else:
            client.hold()

    return behaviour


def serve_searches(answer: Callable[[Request], Sequence[bytes]]) -> Behaviour:
    """Answer every search with the operations ``answer`` returns (entries, then a done)."""

    def behaviour(client: Client) -> None:
        while (request := client.read_request()) is not None:
            if request.operation == SEARCH_REQUEST:
                for operation in answer(request):
                    client.send(message(request.message_id, operation))
            elif request.operation == UNBIND_REQUEST:
                return

    return answer_bind_then(behaviour)
