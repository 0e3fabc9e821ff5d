"""Durable SQL state the identity server owns: accounts, accepted terms, validation sessions,
bindings and pending invites. SQLite in data_dir by default, PostgreSQL by URL.

Every method here blocks: the HTTP server calls them through `Storage.run`, in a thread pool.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

log = logging.getLogger(__name__)

T = TypeVar("T")

SCHEMA_VERSION = 4

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
    sa.Index("invites_threepid", "medium", "address"),
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


# version -> the upgrade from version-1; version 1 creates everything.
MIGRATIONS: dict[int, Callable[[Connection], None]] = {
    1: lambda conn: metadata.create_all(conn, tables=[accounts, accepted_terms, sessions, bindings, invites]),
    2: _add_onbind_deliveries,
    3: _add_counters,
    4: _add_known_mxid,
}


def _counter(conn: Connection, name: str) -> int:
    return int(conn.execute(sa.select(counters.c.value).where(counters.c.name == name)).scalar() or 0)


def _next_generation(conn: Connection) -> int:
    # The update takes the row's lock: concurrent binds get distinct generations in commit order.
    conn.execute(counters.update().where(counters.c.name == BINDINGS_GENERATION).values(value=counters.c.value + 1))
    return _counter(conn, BINDINGS_GENERATION)


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


class StorageError(Exception):
    """The database cannot be used; the message says why (no credentials)."""


def engine_url(url: str | None, data_dir: str) -> sa.URL:
    """The SQLAlchemy URL: SQLite in data_dir when none is configured; postgresql:// uses psycopg 3."""
    if not url:
        return sa.make_url(f"sqlite:///{Path(data_dir) / 'mxisd.sqlite3'}")
    parsed = sa.make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL with synchronous=FULL: a commit is on disk before the HTTP answer that reports it.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


class Storage:
    """The durable state; one per process, shared by its threads."""

    def __init__(self, url: str | None, data_dir: str, threads: int = 8) -> None:
        self.url = engine_url(url, data_dir)
        if self.url.get_backend_name() == "sqlite":
            Path(data_dir).mkdir(parents=True, exist_ok=True)
            self.engine: Engine = sa.create_engine(self.url)
            event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            self.engine = sa.create_engine(self.url, pool_pre_ping=True, pool_size=threads)
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="storage")

    def describe(self) -> str:
        """The URL without its password, for logs."""
        return self.url.render_as_string(hide_password=True)

    def upgrade(self) -> int:
        """Create or upgrade the schema to SCHEMA_VERSION; the version found before."""
        try:
            with self.engine.begin() as conn:
                if self.engine.dialect.name == "postgresql":
                    # Two servers starting at once must not both run the same upgrade.
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(7245001)"))
                metadata.create_all(conn, tables=[schema_version])
                found = conn.execute(sa.select(schema_version.c.version)).scalar()
                current = found or 0
                if current > SCHEMA_VERSION:
                    raise StorageError(f"the database {self.describe()} has schema version {current}, newer "
                                       f"than this mxisd understands ({SCHEMA_VERSION}); upgrade mxisd")
                for version in range(current + 1, SCHEMA_VERSION + 1):
                    MIGRATIONS[version](conn)
                    log.info("storage: upgraded schema to version %d", version)
                if found is None:
                    conn.execute(schema_version.insert().values(version=SCHEMA_VERSION))
                elif current != SCHEMA_VERSION:
                    conn.execute(schema_version.update().values(version=SCHEMA_VERSION))
                return current
        except sa.exc.OperationalError as exc:
            raise StorageError(f"cannot open the database {self.describe()}: {exc.orig}") from None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) in the storage thread pool, so the event loop never waits on the database."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, partial(fn, *args))

    def version(self) -> int | None:
        """The schema version of the database as it is (None: no schema yet), changing nothing."""
        with self.engine.connect() as conn:
            if not sa.inspect(conn).has_table(schema_version.name):
                return None
            found = conn.execute(sa.select(schema_version.c.version)).scalar()
            return None if found is None else int(found)

    def ping(self) -> None:
        """Raise when the database does not answer."""
        with self.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.engine.dispose()

    # -- import (mxisd import-data) ----------------------------------------------------------------

    def import_rows(self, rows: dict[str, list[dict[str, Any]]]) -> dict[str, int]:
        """Insert, per table name, each row that the table does not hold yet (no row shares its
        primary key or any of its unique keys); how many were new per table. One transaction, so
        an import that fails part-way leaves nothing behind."""
        added: dict[str, int] = {}
        with self.engine.begin() as conn:
            for name, new_rows in rows.items():
                table = metadata.tables[name]
                keys = [list(table.primary_key.columns)] + [
                    list(c.columns) for c in table.constraints if isinstance(c, sa.UniqueConstraint)]
                added[name] = 0
                for row in new_rows:
                    clash = sa.or_(*(sa.and_(*(col == row[col.name] for col in key)) for key in keys))
                    if conn.execute(sa.select(sa.literal(1)).select_from(table).where(clash).limit(1)).first():
                        continue
                    conn.execute(table.insert().values(**row))
                    added[name] += 1
        return added

    # -- accounts ---------------------------------------------------------------------------------

    def add_account(self, token: str, user_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(accounts.insert().values(token_hash=token_hash(token), user_id=user_id,
                                                  created_at=now_ms()))

    def account_user(self, token: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(accounts.c.user_id)
                                .where(accounts.c.token_hash == token_hash(token))).scalar()

    def remove_account(self, token: str) -> bool:
        with self.engine.begin() as conn:
            return conn.execute(accounts.delete().where(accounts.c.token_hash == token_hash(token))).rowcount > 0

    # -- terms ------------------------------------------------------------------------------------

    def accept_terms(self, user_id: str, urls: list[str]) -> None:
        with self.engine.begin() as conn:
            known = set(conn.execute(sa.select(accepted_terms.c.url)
                                     .where(accepted_terms.c.user_id == user_id)).scalars())
            new = [{"user_id": user_id, "url": u, "accepted_at": now_ms()} for u in dict.fromkeys(urls)
                   if u not in known]
            if new:
                conn.execute(accepted_terms.insert(), new)

    def accepted_urls(self, user_id: str) -> set[str]:
        with self.engine.connect() as conn:
            return set(conn.execute(sa.select(accepted_terms.c.url)
                                    .where(accepted_terms.c.user_id == user_id)).scalars())

    # -- validation sessions ----------------------------------------------------------------------

    def find_session(self, medium: str, address: str, client_secret: str) -> Session | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(sessions).where(
                sessions.c.medium == medium, sessions.c.address == address,
                sessions.c.client_secret == client_secret)).first()
        return Session(**row._mapping) if row else None

    def session(self, sid: str, client_secret: str) -> Session | None:
        """The session, or None when the sid is unknown or the secret is wrong (indistinguishable)."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(sessions).where(
                sessions.c.sid == sid, sessions.c.client_secret == client_secret)).first()
        return Session(**row._mapping) if row else None

    def create_session(self, session: Session) -> Session:
        """Insert the session; when another request created one for the same 3PID and secret first,
        that one is returned instead."""
        try:
            with self.engine.begin() as conn:
                conn.execute(sessions.insert().values(**session.__dict__))
            return session
        except sa.exc.IntegrityError:
            existing = self.find_session(session.medium, session.address, session.client_secret)
            if existing is None:
                raise
            return existing

    def update_session(self, sid: str, values: dict[str, Any]) -> None:
        with self.engine.begin() as conn:
            conn.execute(sessions.update().where(sessions.c.sid == sid).values(**values))

    def claim_token_attempt(self, sid: str, most: int) -> int | None:
        """Count one token attempt of the session when it has had fewer than most: the new count,
        else None. One conditional UPDATE, so concurrent attempts can never exceed most."""
        with self.engine.begin() as conn:
            claimed = conn.execute(sessions.update().where(sessions.c.sid == sid, sessions.c.failed_attempts < most)
                                   .values(failed_attempts=sessions.c.failed_attempts + 1)).rowcount
            if not claimed:
                return None
            return conn.execute(sa.select(sessions.c.failed_attempts).where(sessions.c.sid == sid)).scalar() or 0

    def return_token_attempt(self, sid: str) -> None:
        """Uncount an attempt that brought the right token."""
        with self.engine.begin() as conn:
            conn.execute(sessions.update().where(sessions.c.sid == sid, sessions.c.failed_attempts > 0)
                         .values(failed_attempts=sessions.c.failed_attempts - 1))

    def delete_sessions_before(self, modified_before: int) -> int:
        """Forget sessions last changed before this time (ms); how many."""
        with self.engine.begin() as conn:
            return conn.execute(sessions.delete().where(sessions.c.modified_at < modified_before)).rowcount

    # -- bindings ---------------------------------------------------------------------------------

    def bind(self, medium: str, address: str, mxid: str, ts: int) -> tuple[Binding | None, int]:
        """Bind the 3PID to mxid (replacing any earlier binding); the binding it replaced and the
        bindings generation this bind made."""
        try:
            return self._bind(medium, address, mxid, ts)
        except sa.exc.IntegrityError:
            # Another request bound the same new 3PID at the same moment: now there is a row to replace.
            return self._bind(medium, address, mxid, ts)

    def _bind(self, medium: str, address: str, mxid: str, ts: int) -> tuple[Binding | None, int]:
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(bindings).where(
                bindings.c.medium == medium, bindings.c.address == address).with_for_update()).first()
            if row is None:
                conn.execute(bindings.insert().values(medium=medium, address=address, mxid=mxid, ts=ts))
                return None, _next_generation(conn)
            conn.execute(bindings.update().where(bindings.c.medium == medium, bindings.c.address == address)
                         .values(mxid=mxid, ts=ts))
            return Binding(**row._mapping), _next_generation(conn)

    def unbind(self, medium: str, address: str, mxid: str) -> int | None:
        """Remove the binding of the 3PID if it is bound to mxid; the bindings generation this made,
        or None when there was no such binding."""
        with self.engine.begin() as conn:
            removed = conn.execute(bindings.delete().where(
                bindings.c.medium == medium, bindings.c.address == address, bindings.c.mxid == mxid)).rowcount
            return _next_generation(conn) if removed else None

    def binding(self, medium: str, address: str) -> Binding | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(bindings).where(
                bindings.c.medium == medium, bindings.c.address == address)).first()
        return Binding(**row._mapping) if row is not None else None

    def all_bindings(self) -> list[Binding]:
        with self.engine.connect() as conn:
            return [Binding(**row._mapping) for row in conn.execute(sa.select(bindings))]

    # -- counters ---------------------------------------------------------------------------------

    def counter(self, name: str) -> int:
        with self.engine.connect() as conn:
            return _counter(conn, name)

    def raise_counter(self, name: str, value: int) -> None:
        """Set the counter to value unless it is already at least that."""
        with self.engine.begin() as conn:
            conn.execute(counters.update().where(counters.c.name == name, counters.c.value < value).values(value=value))

    # -- invites ----------------------------------------------------------------------------------

    def add_invite(self, invite: Invite) -> None:
        with self.engine.begin() as conn:
            conn.execute(invites.insert().values(**invite.__dict__))

    def delete_invite(self, token: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(invites.delete().where(invites.c.token == token))

    def invite(self, token: str) -> Invite | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(invites).where(invites.c.token == token)).first()
        return Invite(**row._mapping) if row else None

    def ephemeral_key_known(self, public_key: str) -> bool:
        """Whether a stored invite (delivered or not, until it expires) was given this ephemeral key."""
        with self.engine.connect() as conn:
            return conn.execute(sa.select(invites.c.token)
                                .where(invites.c.ephemeral_public_key == public_key).limit(1)).first() is not None

    def unsettled_threepids(self) -> list[tuple[str, str]]:
        """(medium, address) of invites neither settled nor queued for delivery."""
        queued = sa.select(onbind_deliveries.c.id).where(onbind_deliveries.c.medium == invites.c.medium,
                                                         onbind_deliveries.c.address == invites.c.address)
        with self.engine.connect() as conn:
            return [(r.medium, r.address) for r in conn.execute(
                sa.select(invites.c.medium, invites.c.address).distinct()
                .where(invites.c.settled_at.is_(None), ~queued.exists()))]

    def unsettled_invites(self, medium: str, address: str) -> list[Invite]:
        with self.engine.connect() as conn:
            return [Invite(**r._mapping) for r in conn.execute(sa.select(invites).where(
                invites.c.medium == medium, invites.c.address == address, invites.c.settled_at.is_(None))
                .order_by(invites.c.created_at))]

    def delete_invites_before(self, created_before: int) -> int:
        """Forget invites stored before this time (ms), and deliveries left without invites; how many invites."""
        with self.engine.begin() as conn:
            count = conn.execute(invites.delete().where(invites.c.created_at < created_before)).rowcount
            if count:
                pending = sa.select(invites.c.token).where(
                    invites.c.medium == onbind_deliveries.c.medium, invites.c.address == onbind_deliveries.c.address,
                    invites.c.settled_at.is_(None))
                conn.execute(onbind_deliveries.delete().where(~pending.exists()))
            return count

    # -- onbind deliveries ------------------------------------------------------------------------

    def queue_deliveries(self, threepids: list[tuple[str, str]], mxid: str, now: int,
                         delay_ms: int = 0) -> list[tuple[str, str]]:
        """Queue a delivery to mxid, due delay_ms after now, of the invites of each (medium, address)
        that has unsettled invites (a queued one for the 3PID is pointed at mxid); the 3PIDs queued.
        One query when none has invites, as on nearly every login."""
        if not threepids:
            return []
        with self.engine.connect() as conn:
            pending = [(m, a) for m, a in conn.execute(
                sa.select(invites.c.medium, invites.c.address).distinct().where(
                    sa.tuple_(invites.c.medium, invites.c.address).in_(threepids), invites.c.settled_at.is_(None)))]
        for medium, address in pending:
            with self.engine.begin() as conn:
                changed = conn.execute(onbind_deliveries.update().where(
                    onbind_deliveries.c.medium == medium, onbind_deliveries.c.address == address,
                    onbind_deliveries.c.mxid != mxid)
                    .values(mxid=mxid, attempts=0, next_at=now + delay_ms)).rowcount
            if changed:
                continue
            try:
                with self.engine.begin() as conn:
                    conn.execute(onbind_deliveries.insert().values(
                        medium=medium, address=address, mxid=mxid, attempts=0, next_at=now + delay_ms,
                        created_at=now))
            except sa.exc.IntegrityError:
                pass  # already queued (by another worker, or earlier)
        return pending

    def claim_due_deliveries(self, now: int, lease_until: int) -> list[Delivery]:
        """Deliveries due by now, each taken for this caller until lease_until (so that another
        worker does not send the same one meanwhile)."""
        with self.engine.connect() as conn:
            due = [Delivery(**r._mapping) for r in conn.execute(
                sa.select(onbind_deliveries).where(onbind_deliveries.c.next_at <= now))]
        claimed = []
        with self.engine.begin() as conn:
            for delivery in due:
                if conn.execute(onbind_deliveries.update().where(
                        onbind_deliveries.c.id == delivery.id, onbind_deliveries.c.next_at == delivery.next_at)
                        .values(next_at=lease_until)).rowcount:
                    claimed.append(delivery)
        return claimed

    def next_delivery_at(self) -> int | None:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.min(onbind_deliveries.c.next_at))).scalar()

    def finish_delivery(self, delivery_id: int, tokens: list[str], ts: int) -> None:
        """The delivery is over (accepted or refused for good): its invites are settled."""
        with self.engine.begin() as conn:
            conn.execute(invites.update().where(invites.c.token.in_(tokens)).values(settled_at=ts))
            conn.execute(onbind_deliveries.delete().where(onbind_deliveries.c.id == delivery_id))

    def retry_delivery(self, delivery_id: int, attempts: int, next_at: int, error: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(onbind_deliveries.update().where(onbind_deliveries.c.id == delivery_id)
                         .values(attempts=attempts, next_at=next_at, last_error=error[:2000]))
