"""The `sql` store: people read from any SQLAlchemy database with configurable queries.

Query contract (README "The sql store"): `identities` returns rows of id, user_id, display_name,
medium, address, several rows per person merged by id; `changes` returns the same columns plus
`mark` for the people changed after `:since` (user_id NULL: the person is gone or no longer
selected); `high_water_mark` returns one value; `password` returns a person's hash for `:id`,
`:user_id` or `:localpart`; `roles` returns rows of id, role for every person. `:domain` is
matrix.domain everywhere. Values only ever reach a query
as bound parameters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import re
from collections.abc import Generator, Iterable, Iterator
from pathlib import Path
from typing import Any

import sqlalchemy
from sqlalchemy.engine import make_url

from indexer import logs, passwords
from indexer.config import ConfigError
from indexer.identity import Identity
from indexer.settings import Config, SqlStoreConfig
from indexer.stores import Change, Store, StoreError, StoreUnavailable, synapse

log = logging.getLogger(__name__)

PRESETS = {"synapse": (synapse.QUERIES, synapse.PASSWORD)}
PARAMETERS = {
    "identities": {"domain"},
    "changes": {"domain", "since"},
    "high_water_mark": {"domain"},
    "password": {"domain", "id", "user_id", "localpart"},
    "roles": {"domain"},
}
COLUMNS = ("id", "user_id", "display_name", "medium", "address")
# Without a driver in the URL SQLAlchemy would pick psycopg2 and MySQLdb, which are not installed.
DRIVERS = {"postgresql": "postgresql+psycopg", "postgres": "postgresql+psycopg",
           "mysql": "mysql+pymysql", "mariadb": "mariadb+pymysql"}
_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}(\+00:00)?$")


def _mark_out(value: Any) -> Any:
    """A mark as kept in the cache: JSON, and ordered by max() like the column it came from."""
    if isinstance(value, datetime.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(datetime.UTC)
        return value.isoformat(timespec="microseconds")
    if isinstance(value, datetime.date):
        return datetime.datetime.combine(value, datetime.time()).isoformat(timespec="microseconds")
    if hasattr(value, "is_integer") and not isinstance(value, float):  # Decimal from MAX()/arithmetic
        return int(value) if value.is_integer() else float(value)
    return value


def _mark_in(value: Any) -> Any:
    """The mark bound back as :since, with timestamps as datetimes again."""
    if isinstance(value, str) and _TIMESTAMP.match(value):
        return datetime.datetime.fromisoformat(value)
    return value


class SqlStore(Store):
    """People in a SQL database, merged from one row per 3PID."""

    kind = "sql"

    def __init__(self, settings: SqlStoreConfig, config: Config) -> None:
        super().__init__(settings, config)
        self.queries = {f.name: getattr(settings.queries, f.name) for f in dataclasses.fields(settings.queries)
                        if getattr(settings.queries, f.name) is not None}
        self.pepper = settings.password.pepper or ""
        self.normalize = settings.password.normalize
        url = self._url(settings.url)
        self.where = url.render_as_string(hide_password=True)
        backend = url.get_backend_name()
        timeout = settings.timeout
        connect_args: dict[str, Any] = {"timeout": timeout} if backend == "sqlite" else {"connect_timeout": timeout}
        if backend == "postgresql":
            # Added to, not replacing, options given in the URL (such as a search_path).
            connect_args["options"] = f"{url.query.get('options', '')} -c statement_timeout={timeout * 1000}".strip()
        elif backend in ("mysql", "mariadb"):
            connect_args["read_timeout"] = timeout
        self.engine = sqlalchemy.create_engine(url, connect_args=connect_args, pool_pre_ping=True)

    @staticmethod
    def _url(text: str) -> sqlalchemy.URL:
        url = make_url(text)
        return url.set(drivername=DRIVERS.get(url.drivername, url.drivername))

    @classmethod
    def complete_config(cls, store: dict[str, Any], path: str, base: Path) -> None:
        """The URL names a known database (an sqlite:// one's relative path is made absolute); the
        preset's queries and password settings are filled in where the store has none of its own;
        each query uses only the parameters it is given."""
        try:
            url = make_url(store["url"])
            cls._url(store["url"]).get_dialect()
        except (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError) as exc:
            raise ConfigError(f"{path}.url: expected a SQLAlchemy database URL "
                              f"(sqlite:///path, postgresql://..., mysql://...): {exc}") from None
        if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
            store["url"] = url.set(database=str(base / url.database)).render_as_string(hide_password=False)
        preset_queries, preset_password = PRESETS.get(store.get("preset") or "", ({}, {}))
        queries = store["queries"] = {**preset_queries, **store["queries"]}
        store["password"] = {**preset_password, **store["password"]}
        if "identities" not in queries:
            raise ConfigError(f"{path}.queries.identities: missing required key (or set preset: synapse)")
        for name, sql in queries.items():
            unknown = set(sqlalchemy.text(sql)._bindparams) - PARAMETERS[name]
            if unknown:
                raise ConfigError(f"{path}.queries.{name}: unknown parameter :{sorted(unknown)[0]}; "
                                  f"this query may use {', '.join(':' + p for p in sorted(PARAMETERS[name]))}")
        if "changes" in queries and "high_water_mark" not in queries:
            raise ConfigError(f"{path}.queries.high_water_mark: missing required key (needed by queries.changes)")

    def _rows(self, query: str, stream: bool = True, **params: Any) -> Generator[dict[str, Any], None, None]:
        """The rows of one configured query, as dicts; any database failure is a StoreError."""
        try:
            with self.engine.connect() as connection:
                result = connection.execution_options(stream_results=stream).execute(
                    sqlalchemy.text(self.queries[query]), {"domain": self.domain, **params})
                for row in result.mappings():
                    yield dict(row)
        except sqlalchemy.exc.SQLAlchemyError as exc:
            cause = getattr(exc, "orig", None) or exc
            reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
            raise StoreError(f"{query} query on {self.where} failed: {reason}") from None

    def _first_value(self, query: str, **params: Any) -> Any:
        """The first column of the first row of a query, or None."""
        with contextlib.closing(self._rows(query, stream=False, **params)) as rows:
            row = next(rows, None)
        value = next(iter(row.values()), None) if row else None
        if isinstance(value, (bytes, bytearray, memoryview)):  # a hash in a binary column (MySQL VARBINARY)
            return bytes(value).decode("utf-8", "replace")
        return value

    def _people(self, query: str, **params: Any) -> dict[str, dict[str, Any]]:
        """A query's rows merged by id: user_id, display_name, 3PIDs and the largest mark of each person."""
        with contextlib.closing(self._rows(query, **params)) as rows:  # a bad row must not leave a cursor open
            return self._merge(rows, query)

    def _merge(self, rows: Iterable[dict[str, Any]], query: str) -> dict[str, dict[str, Any]]:
        people: dict[str, dict[str, Any]] = {}
        for row in rows:
            missing = [c for c in COLUMNS + (("mark",) if query == "changes" else ()) if c not in row]
            if missing:
                raise StoreError(f"{query} query returned no column {missing[0]!r} (expected {', '.join(COLUMNS)})")
            if row["id"] is None:
                log.warning("store %s: %s query returned a row without an id; skipped", self.name, query)
                continue
            person = people.setdefault(str(row["id"]), {"user_id": None, "display_name": None,
                                                        "threepids": [], "mark": None})
            for key in ("user_id", "display_name"):
                if person[key] is None and row[key] is not None:
                    person[key] = str(row[key])
            if row["medium"] is not None and row["address"] is not None:
                person["threepids"].append((str(row["medium"]), str(row["address"])))
            # A row of a LEFT JOIN may carry no mark (NULL): the person's mark is that of their others.
            if query == "changes" and row["mark"] is not None:
                mark = _mark_out(row["mark"])
                person["mark"] = mark if person["mark"] is None else max(person["mark"], mark)
        return people

    def _roles(self, wanted: Iterable[str]) -> dict[str, list[str]]:
        """The roles query's rows merged by id, for the ids in wanted (empty without a roles query).
        One query for the whole store: much faster for a full sync than one per person, and an
        incremental sync runs it only when someone changed."""
        keep = set(wanted)
        if "roles" not in self.queries or not keep:
            return {}
        roles: dict[str, list[str]] = {}
        with contextlib.closing(self._rows("roles")) as rows:
            for row in rows:
                if "id" not in row or "role" not in row:
                    raise StoreError("roles query returned no column 'id' or 'role' (expected id, role)")
                if row["id"] is not None and row["role"] is not None and str(row["id"]) in keep:
                    roles.setdefault(str(row["id"]), []).append(str(row["role"]))
        return roles

    def _identity(self, store_id: str, person: dict[str, Any], roles: dict[str, list[str]]) -> Identity | None:
        if person["user_id"] is None:
            return None
        return self.build_identity(store_id, person["user_id"], person["display_name"], person["threepids"],
                                   roles=roles.get(store_id, ()))

    def enumerate(self) -> Iterator[Identity]:
        """Every person the identities query selects, with their roles."""
        people = self._people("identities")
        roles = self._roles(people)
        for store_id, person in people.items():
            if person["user_id"] is None:
                log.warning("store %s: record %s has no user_id; skipped", self.name, store_id)
                continue
            identity = self._identity(store_id, person, roles)
            if identity is not None:
                yield identity

    def high_water_mark(self) -> Any:
        """The high_water_mark query's value; None without a changes query."""
        if "changes" not in self.queries:
            return None
        value = self._first_value("high_water_mark")
        if value is None:
            log.info("store %s: high_water_mark query returned nothing; changes are read after the next full sync",
                     self.name)
        return _mark_out(value)

    def changes_since(self, mark: Any) -> Iterator[Change]:
        """The people the changes query returns for :since = mark, oldest first."""
        people = self._people("changes", since=_mark_in(mark))
        unmarked = next((i for i, p in people.items() if p["mark"] is None), None)
        if unmarked is not None:
            raise StoreError(f"changes query returned no mark for record {unmarked}")
        roles = self._roles(i for i, p in people.items() if p["user_id"] is not None)
        for store_id, person in sorted(people.items(), key=lambda item: item[1]["mark"]):
            yield Change(store_id, self._identity(store_id, person, roles), person["mark"])

    def authenticate(self, identity: Identity, password: str) -> bool:
        """Check password against the hash the password query returns for this person."""
        if "password" not in self.queries:
            log.info("store %s has no password query; login for %s refused", self.name, identity.mxid)
            return False
        if not password:
            return False
        try:
            stored = self._first_value("password", id=identity.store_id, user_id=identity.mxid,
                                       localpart=identity.localpart)
        except StoreError as exc:
            # Not a wrong password: the login is answered 503 and counts against nobody's limit.
            logs.repeated.error(log, "store %s: cannot check the password of %s: %s", self.name, identity.mxid,
                                exc, key=f"{self.name} password query")
            raise StoreUnavailable(f"store {self.name}: {exc}") from None
        return passwords.verify(password, stored if isinstance(stored, str) else None,
                                pepper=self.pepper, normalize=self.normalize, who=identity.mxid)

    def close(self) -> None:
        """Close the connection pool."""
        self.engine.dispose()
