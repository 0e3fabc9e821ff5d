"""The rows of the durable state as the rest of the server sees them, and the clock and digest they use."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any


def now_ms() -> int:
    return int(time.time() * 1000)


def token_hash(token: str) -> str:
    """Tokens are kept only as digests: a copy of the database does not let anyone in."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Session:
    """One 3PID validation session."""

    sid: str
    medium: str
    address: str
    client_secret: str
    token: str
    send_attempt: int
    next_link: str | None
    failed_attempts: int
    created_at: int
    modified_at: int
    validated_at: int | None


@dataclass(frozen=True)
class Binding:
    medium: str
    address: str
    mxid: str
    ts: int
    local_address: bool  # a store knew the address when it was bound (lookup.share_binds)


@dataclass(frozen=True)
class Invite:
    """A 3PID invite stored by /store-invite."""

    token: str
    medium: str
    address: str
    room_id: str
    sender: str
    ephemeral_public_key: str
    properties: dict[str, Any]
    created_at: int
    settled_at: int | None
    known_mxid: str | None = None
    link_code: str | None = None  # of the short link in an invite SMS


@dataclass(frozen=True)
class Delivery:
    """A queued POST of the invites of a 3PID to the homeserver of the Matrix ID it resolved to."""

    id: int
    medium: str
    address: str
    mxid: str
    attempts: int
    next_at: int
    created_at: int
    last_error: str | None
