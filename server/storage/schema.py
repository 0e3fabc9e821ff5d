"""The SQL schema of the durable state: its tables, its version and the migrations up to it."""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.engine import Connection

SCHEMA_VERSION = 6

metadata = sa.MetaData()

schema_version = sa.Table(
    "schema_version", metadata,
    sa.Column("version", sa.Integer, nullable=False),
)

accounts = sa.Table(
    "accounts", metadata,
    sa.Column("token_hash", sa.String(64), primary_key=True),
    sa.Column("user_id", sa.String(255), nullable=False, index=True),
    sa.Column("created_at", sa.BigInteger, nullable=False),
)

accepted_terms = sa.Table(
    "accepted_terms", metadata,
    sa.Column("user_id", sa.String(255), primary_key=True),
    sa.Column("url", sa.String(2048), primary_key=True),
    sa.Column("accepted_at", sa.BigInteger, nullable=False),
)

sessions = sa.Table(
    "sessions", metadata,
    sa.Column("sid", sa.String(64), primary_key=True),
    sa.Column("medium", sa.String(16), nullable=False),
    sa.Column("address", sa.String(512), nullable=False),
    sa.Column("client_secret", sa.String(255), nullable=False),
    sa.Column("token", sa.String(255), nullable=False),
    sa.Column("send_attempt", sa.BigInteger, nullable=False),
    sa.Column("next_link", sa.Text, nullable=True),
    sa.Column("failed_attempts", sa.Integer, nullable=False, default=0),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("modified_at", sa.BigInteger, nullable=False),
    sa.Column("validated_at", sa.BigInteger, nullable=True),
    sa.UniqueConstraint("medium", "address", "client_secret", name="sessions_threepid_secret"),
)

bindings = sa.Table(
    "bindings", metadata,
    sa.Column("medium", sa.String(16), primary_key=True),
    sa.Column("address", sa.String(512), primary_key=True),
    sa.Column("mxid", sa.String(255), nullable=False, index=True),
    sa.Column("ts", sa.BigInteger, nullable=False),
    # Version 6: whether a store knew the address when it was bound (lookup.share_binds).
    sa.Column("local_address", sa.Boolean, nullable=False, server_default=sa.false()),
)

invites = sa.Table(
    "invites", metadata,
    sa.Column("token", sa.String(255), primary_key=True),
    sa.Column("medium", sa.String(16), nullable=False),
    sa.Column("address", sa.String(512), nullable=False),
    sa.Column("room_id", sa.String(255), nullable=False),
    sa.Column("sender", sa.String(255), nullable=False),
    sa.Column("ephemeral_public_key", sa.String(255), nullable=False),
    sa.Column("properties", sa.JSON, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    # Version 2: when the invite was delivered to the invitee's homeserver, or refused for good by it.
    sa.Column("settled_at", sa.BigInteger, nullable=True),
    # Version 4: the Matrix ID the address was already known to when the invite was stored (sent in
    # another letter case, or known only to a read-through store or another identity server, so the
    # homeserver's own lookup missed it); null for an address nobody knew.
    sa.Column("known_mxid", sa.String(255), nullable=True),
    # Version 5: the code of the invite's short link (/i/<code>) in an invite SMS; null for other invites.
    sa.Column("link_code", sa.String(32), nullable=True),
    sa.Index("invites_threepid", "medium", "address"),
    sa.Index("invites_link_code", "link_code", unique=True),
)

onbind_deliveries = sa.Table(
    "onbind_deliveries", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("medium", sa.String(16), nullable=False),
    sa.Column("address", sa.String(512), nullable=False),
    sa.Column("mxid", sa.String(255), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("next_at", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.UniqueConstraint("medium", "address", name="onbind_threepid"),
)

# Version 3: counters that Redis copies are checked against, to tell a Redis that lost or went back
# in time (restored from an older copy) from one that is up to date.
counters = sa.Table(
    "counters", metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.BigInteger, nullable=False),
)
# Moves with every bind and unbind, in the same transaction.
BINDINGS_GENERATION = "bindings"
# The highest cache generation (a Redis counter moved by every completed sync) any server has seen.
CACHE_GENERATION = "cache"


def _add_counters(conn: Connection) -> None:
    metadata.create_all(conn, tables=[counters])
    present = set(conn.execute(sa.select(counters.c.name)).scalars())
    missing = [{"name": name, "value": 0} for name in (BINDINGS_GENERATION, CACHE_GENERATION) if name not in present]
    if missing:
        conn.execute(counters.insert(), missing)


def _add_onbind_deliveries(conn: Connection) -> None:
    # Version 1 of a new database already created invites as they are now.
    if "settled_at" not in {c["name"] for c in sa.inspect(conn).get_columns("invites")}:
        conn.execute(sa.text("ALTER TABLE invites ADD COLUMN settled_at BIGINT NULL"))
    metadata.create_all(conn, tables=[onbind_deliveries])


def _add_known_mxid(conn: Connection) -> None:
    # A database created at an earlier version by this code already has the column.
    if "known_mxid" not in {c["name"] for c in sa.inspect(conn).get_columns("invites")}:
        conn.execute(sa.text("ALTER TABLE invites ADD COLUMN known_mxid VARCHAR(255) NULL"))


def _add_link_code(conn: Connection) -> None:
    # A database created at an earlier version by this code already has the column and its index.
    if "link_code" not in {c["name"] for c in sa.inspect(conn).get_columns("invites")}:
        conn.execute(sa.text("ALTER TABLE invites ADD COLUMN link_code VARCHAR(32) NULL"))
    if "invites_link_code" not in {i["name"] for i in sa.inspect(conn).get_indexes("invites")}:
        conn.execute(sa.text("CREATE UNIQUE INDEX invites_link_code ON invites (link_code)"))


def _add_binding_local(conn: Connection) -> None:
    # Bindings made before it are counted as remote: nothing said whether a store knew them.
    if "local_address" not in {c["name"] for c in sa.inspect(conn).get_columns("bindings")}:
        conn.execute(sa.text("ALTER TABLE bindings ADD COLUMN local_address BOOLEAN NOT NULL DEFAULT FALSE"))


# version -> the upgrade from version-1; version 1 creates everything.
MIGRATIONS: dict[int, Callable[[Connection], None]] = {
    1: lambda conn: metadata.create_all(conn, tables=[accounts, accepted_terms, sessions, bindings, invites]),
    2: _add_onbind_deliveries,
    3: _add_counters,
    4: _add_known_mxid,
    5: _add_link_code,
    6: _add_binding_local,
}
