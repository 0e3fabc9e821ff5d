"""Search entries decoded lean: ldap3 decodes each searchResEntry twice (its raw values, and every
value again as text, formatted by attribute type) with a generic BER decoder, which was most of a
full sync's CPU. The store reads only the raw values, so the sync's connections decode entries
straight from their BER bytes into those; every other message is ldap3's as before."""

from __future__ import annotations

from typing import Any, cast

import ldap3
from ldap3.strategy.sync import SyncStrategy
from ldap3.utils.conv import to_unicode

_SEQUENCE, _INTEGER, _OCTET_STRING, _SET = 0x30, 0x02, 0x04, 0x31
_SEARCH_RESULT_ENTRY = 0x64  # [APPLICATION 4], constructed
_RANGE = ";range="  # Active Directory's ranged values (ldap3 fetches the rest of them: auto_range)


class RawAttributes(dict[str, list[bytes]]):
    """An entry's raw values by attribute name, read in any case (as ldap3's raw_attributes); written
    under lowercased names (by search_entry, and by ldap3's auto_range under the names it found)."""

    def get(self, name: str, default: Any = None) -> Any:
        return super().get(name.lower(), default)

    def __getitem__(self, name: str) -> list[bytes]:
        return super().__getitem__(name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and super().__contains__(name.lower())


def _length(data: bytes, at: int) -> tuple[int, int]:
    """The BER length whose first octet is at `at`, and where its value starts."""
    first = data[at]
    if first < 0x80:
        return first, at + 1
    octets = first & 0x7F
    return int.from_bytes(data[at + 1:at + 1 + octets], "big"), at + 1 + octets


def search_entry(message: bytes, message_id: int) -> dict[str, Any] | None:
    """The searchResEntry answering message_id in one whole LDAP message, as ldap3 gives it with its
    raw values (under "attributes", only ranged values, for ldap3's auto_range to complete); None
    for any other message, which ldap3 decodes."""
    if message[0] != _SEQUENCE:
        return None
    _, at = _length(message, 1)
    if message[at] != _INTEGER:
        return None
    size, at = _length(message, at + 1)
    if int.from_bytes(message[at:at + size], "big", signed=True) != message_id:
        return None
    at += size
    if message[at] != _SEARCH_RESULT_ENTRY:
        return None
    _, at = _length(message, at + 1)
    size, at = _length(message, at + 1)  # objectName, an OCTET STRING
    raw_dn = message[at:at + size]
    at += size
    size, at = _length(message, at + 1)  # attributes, a SEQUENCE OF PartialAttribute
    stop = at + size
    attributes = RawAttributes()
    ranged: dict[str, list[bytes]] = {}
    # Short lengths (one octet, nearly all of them) are read inline: this loop is most of a sync's
    # reading.
    while at < stop:
        # The PartialAttribute SEQUENCE's own length is not needed: its parts follow.
        at = at + 2 if message[at + 1] < 0x80 else _length(message, at + 1)[1]
        size = message[at + 1]  # its type, an OCTET STRING
        if size < 0x80:
            at += 2
        else:
            size, at = _length(message, at + 1)
        raw_name = message[at:at + size]
        name = _NAMES.get(raw_name) or _name(raw_name)
        at += size
        size = message[at + 1]  # its values, a SET OF OCTET STRING
        if size < 0x80:
            at += 2
        else:
            size, at = _length(message, at + 1)
        end = at + size
        values = []
        while at < end:
            size = message[at + 1]
            if size < 0x80:
                at += 2
            else:
                size, at = _length(message, at + 1)
            values.append(message[at:at + size])
            at += size
        attributes[name] = values
        if _RANGE in name:
            ranged[name] = list(values)
    try:
        dn = raw_dn.decode("utf-8")
    except UnicodeDecodeError:
        dn = to_unicode(raw_dn, from_server=True)
    return {"type": "searchResEntry", "raw_dn": raw_dn, "dn": dn, "raw_attributes": attributes, "attributes": ranged}


# Attribute names as they come, lowercased: a directory has a few hundred (ranged ones may vary).
_NAMES: dict[bytes, str] = {}


def _name(raw: bytes) -> str:
    if len(_NAMES) >= 4096:
        _NAMES.clear()
    name = _NAMES[raw] = raw.decode("utf-8", "replace").lower()
    return name


class LeanSync(SyncStrategy):
    """ldap3's synchronous strategy, with the entries answering a search decoded by search_entry."""

    def __init__(self, connection: ldap3.Connection) -> None:
        super().__init__(connection)
        self._awaited = -1
        self._entries: list[dict[str, Any]] = []

    def _get_response(self, message_id: int, timeout: Any) -> Any:
        self._awaited, self._entries = message_id, []
        # (types-ldap3 does not describe the strategies' internals.)
        responses = cast(Any, super())._get_response(message_id, timeout)
        if isinstance(responses, list):
            responses = self._entries + responses
        self._entries = []
        return responses

    def receiving(self) -> Any:
        """The messages received for ldap3 to decode: entries of the awaited search are taken out,
        decoded; never an empty list unless the connection ended (ldap3 takes that as the end)."""
        while True:
            messages: list[bytes] = cast(Any, super()).receiving()
            kept = []
            for message in messages:
                entry = search_entry(message, self._awaited)
                if entry is None:
                    kept.append(message)
                else:
                    self._entries.append(entry)
            if kept or not messages:
                return kept


def lean(connection: ldap3.Connection) -> ldap3.Connection:
    """connection (new, not yet opened), reading with LeanSync."""
    strategy = LeanSync(connection)
    connection.strategy = strategy
    # ldap3's Connection calls these through its own attributes, bound when it was made.
    connection.send = strategy.send
    connection.open = strategy.open
    connection.get_response = strategy.get_response
    connection.post_send_single_response = strategy.post_send_single_response
    connection.post_send_search = strategy.post_send_search
    return connection
