"""Search result entries decoded by us, straight from the bytes ldap3 receives.

ldap3 decodes every LDAP message with a generic BER decoder into nested lists, then builds two
dictionaries per entry (the raw values and values formatted by attribute type, which the exporter
never reads) with case-insensitive keys. At 500,000 users that is about 80 µs per entry, most of
the AD source's CPU. A ``SearchResultEntry`` has a fixed shape (RFC 4511 4.5.2)::

    LDAPMessage ::= SEQUENCE { messageID INTEGER, protocolOp [APPLICATION 4] SEQUENCE {
        objectName OCTET STRING, attributes SEQUENCE OF SEQUENCE {
            type OCTET STRING, vals SET OF OCTET STRING } }, controls [0] ... OPTIONAL }

:func:`decode_search_entry` walks it directly (about 10 µs an entry) and keeps only the attributes
asked for. :class:`EntryDiverter` hooks the connection's receive step: entries of the search in
flight are decoded here and set aside, every other message (the search's result with its paging
cookie, referrals, binds, notices of disconnection) goes to ldap3 unchanged, so ldap3 still checks
message ids, results and errors. If the hook cannot be installed (another ldap3), entries simply
come back through ldap3 as before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

_SEQUENCE = 0x30
_SET = 0x31
_INTEGER = 0x02
_OCTETS = 0x04
_SEARCH_ENTRY = 0x64  # [APPLICATION 4], constructed


class MalformedEntry(ValueError):
    """A search result entry that is not valid BER (truncated, wrong tag, length past its end)."""


def _long_length(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """(length, position after it) of a long-form length whose first octet is at ``pos``."""
    count = data[pos] & 0x7F
    if count == 0 or count > 4 or pos + 1 + count > end:
        raise MalformedEntry("unsupported or truncated length")
    after = pos + 1 + count
    return int.from_bytes(data[pos + 1 : after], "big"), after


def message_id_and_op(data: bytes) -> tuple[int, int] | None:
    """(messageID, protocolOp tag) of one LDAP message; None when it is not shaped like one (ldap3
    then decodes it, and says what is wrong)."""
    try:
        if data[0] != _SEQUENCE:
            return None
        n = data[1]
        pos = _long_length(data, 1, len(data))[1] if n & 0x80 else 2
        if data[pos] != _INTEGER:
            return None
        n = data[pos + 1]
        if n & 0x80 or n == 0 or n > 4:
            return None
        message_id = int.from_bytes(data[pos + 2 : pos + 2 + n], "big", signed=True)
        return message_id, data[pos + 2 + n]
    except (IndexError, MalformedEntry):
        return None


def decode_search_entry(data: bytes, wanted: Mapping[bytes, str]) -> tuple[bytes, dict[str, list[bytes]]]:
    """(DN as bytes, {attribute: values}) of one SearchResultEntry message.

    ``wanted`` maps the attribute names asked for, lower-cased, to the spelling the caller uses;
    other attributes are left out (servers return names in their own case). Raises
    :class:`MalformedEntry` for anything that is not a well-formed entry.
    """
    try:
        return _decode(data, wanted)
    except IndexError:
        raise MalformedEntry("truncated search result entry") from None


def _decode(data: bytes, wanted: Mapping[bytes, str]) -> tuple[bytes, dict[str, list[bytes]]]:
    # The lengths are read inline (short form, < 128, is the common case): this runs once per user.
    end = len(data)
    if data[0] != _SEQUENCE:
        raise MalformedEntry("not an LDAP message")
    n = data[1]
    n, pos = _long_length(data, 1, end) if n & 0x80 else (n, 2)
    if pos + n != end:
        raise MalformedEntry("message length does not match")
    if data[pos] != _INTEGER or data[pos + 1] & 0x80:
        raise MalformedEntry("no message id")
    pos += 2 + data[pos + 1]
    if data[pos] != _SEARCH_ENTRY:
        raise MalformedEntry("not a search result entry")
    n = data[pos + 1]
    n, pos = _long_length(data, pos + 1, end) if n & 0x80 else (n, pos + 2)
    op_end = pos + n
    if op_end > end:
        raise MalformedEntry("entry longer than its message")
    if data[pos] != _OCTETS:
        raise MalformedEntry("no objectName")
    n = data[pos + 1]
    n, pos = _long_length(data, pos + 1, op_end) if n & 0x80 else (n, pos + 2)
    if pos + n > op_end:
        raise MalformedEntry("objectName longer than the entry")
    dn = data[pos : pos + n]
    pos += n
    if data[pos] != _SEQUENCE:
        raise MalformedEntry("no attribute list")
    n = data[pos + 1]
    n, pos = _long_length(data, pos + 1, op_end) if n & 0x80 else (n, pos + 2)
    attributes_end = pos + n
    if attributes_end != op_end:
        raise MalformedEntry("attribute list does not fill the entry")
    values: dict[str, list[bytes]] = {}
    while pos < attributes_end:
        if data[pos] != _SEQUENCE:
            raise MalformedEntry("attribute is not a sequence")
        n = data[pos + 1]
        n, pos = _long_length(data, pos + 1, attributes_end) if n & 0x80 else (n, pos + 2)
        attribute_end = pos + n
        if attribute_end > attributes_end or data[pos] != _OCTETS:
            raise MalformedEntry("attribute without a type")
        n = data[pos + 1]
        n, pos = _long_length(data, pos + 1, attribute_end) if n & 0x80 else (n, pos + 2)
        name = data[pos : pos + n]
        pos += n
        if data[pos] != _SET:
            raise MalformedEntry("attribute without a value set")
        n = data[pos + 1]
        n, pos = _long_length(data, pos + 1, attribute_end) if n & 0x80 else (n, pos + 2)
        if pos + n != attribute_end:
            raise MalformedEntry("value set does not fill the attribute")
        vals: list[bytes] = []
        while pos < attribute_end:
            if data[pos] != _OCTETS:
                raise MalformedEntry("value is not an octet string")
            n = data[pos + 1]
            n, pos = _long_length(data, pos + 1, attribute_end) if n & 0x80 else (n, pos + 2)
            if pos + n > attribute_end:
                raise MalformedEntry("value longer than its attribute")
            vals.append(data[pos : pos + n])
            pos += n
        key = wanted.get(name) or wanted.get(name.lower())
        if key is not None:
            values[key] = vals
    return dn, values


def wanted_names(attributes: Iterable[str]) -> dict[bytes, str]:
    """The ``wanted`` mapping of :func:`decode_search_entry` for the attribute names asked for."""
    return {name.lower().encode("utf-8"): name for name in attributes}


class EntryDiverter:
    """Takes the entries of the search in flight out of what an ldap3 connection receives.

    ldap3's synchronous strategy calls ``self.receiving()`` for each batch of complete messages;
    the diverter replaces that method on the connection's strategy object (not on the class), and
    ``send`` on the connection to learn the id of each request. While :meth:`collect` is armed,
    each entry of the current search is decoded (a malformed one raises ``on_error(exc)`` at once,
    as ldap3 would) and kept in :attr:`entries`; a batch made only of entries is not handed to
    ldap3 at all (it would take an empty batch for a closed connection): the next one is read.
    """

    def __init__(self, connection: Any, on_error: Callable[[MalformedEntry], Exception]) -> None:
        self.entries: list[tuple[bytes, dict[str, list[bytes]]]] = []
        self.installed = False
        self._on_error = on_error
        self._wanted: Mapping[bytes, str] | None = None
        self._message_id: int | None = None
        strategy = getattr(connection, "strategy", None)
        receive = getattr(strategy, "receiving", None)
        send = getattr(connection, "send", None)
        if strategy is None or not callable(receive) or not callable(send):
            return
        self._receive: Callable[[], list[bytes]] = receive
        self._send: Callable[..., Any] = send
        strategy.receiving = self._receiving
        connection.send = self._sending
        self.installed = True

    def collect(self, attributes: Iterable[str]) -> None:
        """Divert the entries of the next request sent (a search asking for ``attributes``)."""
        self.entries = []
        self._wanted = wanted_names(attributes)
        self._message_id = None

    def stop(self) -> list[tuple[bytes, dict[str, list[bytes]]]]:
        """Disarm; the entries diverted since :meth:`collect`."""
        entries, self.entries = self.entries, []
        self._wanted = None
        self._message_id = None
        return entries

    def _sending(self, *args: Any, **kwargs: Any) -> Any:
        message_id = self._send(*args, **kwargs)
        if self._wanted is not None and self._message_id is None:
            self._message_id = message_id if isinstance(message_id, int) else None
        return message_id

    def _receiving(self) -> list[bytes]:
        while True:
            messages = self._receive()
            if not messages or self._wanted is None or self._message_id is None:
                return messages
            rest = [message for message in messages if not self._take(message)]
            if rest:
                return rest

    def _take(self, message: bytes) -> bool:
        head = message_id_and_op(message)
        if head is None or head != (self._message_id, _SEARCH_ENTRY):
            return False
        assert self._wanted is not None
        try:
            self.entries.append(decode_search_entry(message, self._wanted))
        except MalformedEntry as exc:
            raise self._on_error(exc) from None
        return True


__all__ = ["EntryDiverter", "MalformedEntry", "decode_search_entry", "message_id_and_op", "wanted_names"]
