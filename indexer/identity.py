"""The one record every store's entries become: schemas/identity.schema.json."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Identity:
    """One person as the cache holds them. threepids are (medium, canonical address) pairs.

    roles are the person's roles in the organisation (directory groups, a SQL query's rows...),
    sorted and unique; the invite policy and GET /_matrix-internal/profile/v1/{userId} read them.

    locator is where the store finds the person to check a password (an LDAP entry's DN). It is
    kept beside the record in the cache, never in it nor in its hash: a moved entry is the same person.
    """

    mxid: str
    localpart: str
    display_name: str | None
    threepids: tuple[tuple[str, str], ...]
    store: str
    store_id: str
    hash: str = field(default="", compare=False)
    locator: str | None = field(default=None, compare=False)
    roles: tuple[str, ...] = ()

    @classmethod
    def build(
        cls,
        *,
        mxid: str,
        localpart: str,
        display_name: str | None,
        threepids: list[tuple[str, str]] | tuple[tuple[str, str], ...],
        store: str,
        store_id: str,
        locator: str | None = None,
        roles: Iterable[str] = (),
    ) -> Identity:
        """An identity with duplicate 3PIDs and roles removed, both in a stable order, and its content hash."""
        unique = tuple(sorted(set(threepids)))
        role_set = tuple(sorted(set(roles)))
        body: dict[str, Any] = {
            "mxid": mxid,
            "localpart": localpart,
            "display_name": display_name,
            "threepids": [list(t) for t in unique],
            "store": store,
            "store_id": store_id,
        }
        if role_set:  # absent when empty: records from before roles existed keep their hash, and are not rewritten
            body["roles"] = list(role_set)
        digest = hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
        return cls(mxid, localpart, display_name, unique, store, store_id, digest, locator, role_set)

    def threepid_objects(self) -> list[dict[str, str]]:
        """The 3PIDs as the Matrix APIs write them: [{"medium", "address"}]."""
        return [{"medium": m, "address": a} for m, a in self.threepids]

    def to_json(self) -> str:
        """The record as stored in the cache."""
        record: dict[str, Any] = {
            "mxid": self.mxid,
            "localpart": self.localpart,
            "display_name": self.display_name,
            "threepids": self.threepid_objects(),
            "store": self.store,
            "store_id": self.store_id,
            "hash": self.hash,
        }
        if self.roles:  # absent when empty, like in the hash: a record without roles reads the same as before
            record["roles"] = list(self.roles)
        return json.dumps(
            record,
            ensure_ascii=False,
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Identity:
        """Read back a record written by to_json (records from before roles existed have none)."""
        data: dict[str, Any] = json.loads(text)
        return cls(
            data["mxid"],
            data["localpart"],
            data.get("display_name"),
            tuple((t["medium"], t["address"]) for t in data["threepids"]),
            data["store"],
            data["store_id"],
            data["hash"],
            roles=tuple(data.get("roles", ())),
        )
