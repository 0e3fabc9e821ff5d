"""The one record every store's entries become: schemas/identity.schema.json."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from json.encoder import encode_basestring as _text  # a str as JSON, non-ASCII as it is (in C)
from typing import Any


def _text_or_null(value: str | None) -> str:
    return "null" if value is None else _text(value)


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
        # What json.dumps(body, sort_keys=True, ensure_ascii=False) gives for the body {mxid,
        # localpart, display_name, threepids as pairs, store, store_id, roles unless none}, written
        # directly: json.dumps was a tenth of a full sync's CPU (tests/test_sync.py compares them).
        roles_text = f'"roles": [{", ".join(map(_text, role_set))}], ' if role_set else ""
        body = (f'{{"display_name": {_text_or_null(display_name)}, "localpart": {_text(localpart)}, '
                f'"mxid": {_text(mxid)}, {roles_text}"store": {_text(store)}, "store_id": {_text(store_id)}, '
                f'"threepids": [{", ".join(f"[{_text(m)}, {_text(a)}]" for m, a in unique)}]}}')
        digest = hashlib.sha256(body.encode()).hexdigest()
        return cls(mxid, localpart, display_name, unique, store, store_id, digest, locator, role_set)

    def threepid_objects(self) -> list[dict[str, str]]:
        """The 3PIDs as the Matrix APIs write them: [{"medium", "address"}]."""
        return [{"medium": m, "address": a} for m, a in self.threepids]

    def to_json(self) -> str:
        """The record as stored in the cache."""
        # json.dumps(record, ensure_ascii=False, separators=(",", ":")) of {mxid, localpart,
        # display_name, threepids as objects, store, store_id, hash, roles unless none}, written
        # directly (see build).
        threepids = ",".join(f'{{"medium":{_text(m)},"address":{_text(a)}}}' for m, a in self.threepids)
        roles = f',"roles":[{",".join(map(_text, self.roles))}]' if self.roles else ""
        return (f'{{"mxid":{_text(self.mxid)},"localpart":{_text(self.localpart)},'
                f'"display_name":{_text_or_null(self.display_name)},"threepids":[{threepids}],'
                f'"store":{_text(self.store)},"store_id":{_text(self.store_id)},"hash":{_text(self.hash)}{roles}}}')

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
