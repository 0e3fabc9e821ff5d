"""What the `ldap` store reads from an entry: the presets for OpenLDAP and Active Directory, the
attribute mapping that the config lays over them, and the values of attributes and filters."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from ldap3.utils.conv import escape_filter_chars

from indexer.settings import LdapStoreConfig

DISABLED_ACCOUNT = "(!(userAccountControl:1.2.840.113556.1.4.803:=2))"
PRESETS: dict[str, dict[str, Any]] = {
    "openldap": {
        "filter": "(objectClass=inetOrgPerson)",
        "attributes": {
            "user_id": "uid",
            "stable_id": "entryUUID",
            "changed": "modifyTimestamp",
            "display_name": ["displayName", "cn"],
            "threepids": {"email": ["mail"], "msisdn": ["telephoneNumber", "mobile"]},
        },
    },
    "active_directory": {
        "filter": f"(&(objectCategory=person)(objectClass=user){DISABLED_ACCOUNT})",
        "attributes": {
            "user_id": "sAMAccountName",
            "stable_id": "objectGUID",
            "changed": "uSNChanged",
            "display_name": ["displayName", "cn"],
            "threepids": {"email": ["mail"], "msisdn": ["telephoneNumber", "mobile"]},
        },
    },
}


def filter_value(value: str | bytes) -> str:
    """value as an RFC 4515 assertion value: `*`, `(`, `)`, `\\` and NUL (every byte, for binary
    values) escaped, so no input can change what a filter selects."""
    if isinstance(value, bytes):
        return "".join(f"\\{b:02x}" for b in value)
    return escape_filter_chars(value)


def normalize_time(value: str) -> str:
    """A generalizedTime as UTC "YYYYMMDDHHMMSS.ffffffZ", so that string order is time order."""
    if len(value) == 15 and value[14] == "Z" and value[:14].isascii() and value[:14].isdigit():
        # Whole seconds in UTC, as OpenLDAP's modifyTimestamp always is: no date to parse (a full
        # sync's mark reads every entry changed in the last hour).
        return f"{value[:14]}.000000Z"
    text = value.strip().replace(",", ".")
    offset = UTC
    if text.endswith("Z"):
        text = text[:-1]
    elif len(text) > 5 and text[-5] in "+-":
        sign = 1 if text[-5] == "+" else -1
        offset = timezone(sign * timedelta(hours=int(text[-4:-2]), minutes=int(text[-2:])))
        text = text[:-5]
    whole, _, fraction = text.partition(".")
    moment = datetime.strptime(whole.ljust(14, "0"), "%Y%m%d%H%M%S").replace(tzinfo=offset)
    moment += timedelta(seconds=float(f"0.{fraction or 0}"))
    return moment.astimezone(UTC).strftime("%Y%m%d%H%M%S.%fZ")


def first_value(values: list[bytes] | None) -> str | None:
    """The first value of a raw attribute as text, or None."""
    return values[0].decode("utf-8", "replace") if values else None


@dataclass
class Mapping:
    """Which attributes hold what, after the preset and the config are merged."""

    filter: str
    user_id: str
    user_id_type: str
    lowercase: bool
    stable_id: str
    changed: str
    display_name: list[str]
    threepids: dict[str, list[str]]
    binary_id: bool = field(init=False)
    by_usn: bool = field(init=False)

    def __post_init__(self) -> None:
        self.binary_id = self.stable_id.lower() == "objectguid"
        self.by_usn = self.changed.lower() == "usnchanged"

    @classmethod
    def from_config(cls, settings: LdapStoreConfig) -> Mapping:
        """The store's preset with the store's own filter and attributes over it."""
        preset = PRESETS[settings.preset]
        attrs = settings.attributes
        # Media merge one by one: adding a medium keeps the preset's email and msisdn attributes.
        threepids = {**preset["attributes"]["threepids"], **(attrs.threepids or {})}
        return cls(
            filter=settings.filter or preset["filter"],
            user_id=attrs.user_id or preset["attributes"]["user_id"],
            user_id_type=attrs.user_id_type,
            lowercase=attrs.lowercase,
            stable_id=attrs.stable_id or preset["attributes"]["stable_id"],
            changed=attrs.changed or preset["attributes"]["changed"],
            display_name=list(attrs.display_name or preset["attributes"]["display_name"]),
            threepids={m: list(a) for m, a in threepids.items()},
        )

    def wanted(self) -> list[str]:
        names = [self.user_id, self.stable_id, self.changed, *self.display_name]
        names += [a for attrs in self.threepids.values() for a in attrs]
        return list(dict.fromkeys(names))

    def store_id(self, entry: dict[str, Any]) -> str | None:
        """The entry's stable id (objectGUID as a UUID, any other attribute lowercased), or None."""
        raw: list[bytes] | None = entry["raw_attributes"].get(self.stable_id)
        if not raw:
            return None
        if self.binary_id:
            return str(uuid.UUID(bytes_le=raw[0]))
        return raw[0].decode("utf-8", "replace").lower()

    def mark_of(self, entry: dict[str, Any]) -> Any:
        """When the entry last changed: a USN, or a normalized generalizedTime; None if not read."""
        value = first_value(entry["raw_attributes"].get(self.changed))
        if value is None:
            return None
        return int(value) if self.by_usn else normalize_time(value)
