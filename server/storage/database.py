"""The database of the durable state: its engine (SQLite in data_dir by default, any SQLAlchemy URL),
the thread pool its blocking calls run in, and the schema upgrade at start."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine

from server.storage.schema import MIGRATIONS, SCHEMA_VERSION, metadata, schema_version

log = logging.getLogger(__name__)

T = TypeVar("T")


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


class Database:
    """The engine and its thread pool; one per process, shared by its threads."""

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

    def import_rows(self, rows: dict[str, list[dict[str, Any]]]) -> dict[str, int]:
        """Insert, per table name, each row that the table does not hold yet (no row shares its
        primary key or any of its unique keys); how many were new per table. One transaction, so
        an import that fails part-way leaves nothing behind (mxisd import-data)."""
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
