"""The sql store against real SQLite, PostgreSQL and MariaDB databases made by each test."""

from __future__ import annotations

import datetime
import logging
from collections.abc import Iterator
from typing import Any

import argon2
import bcrypt
import pytest
import sqlalchemy
import yaml
from passlib.hash import django_pbkdf2_sha256, pbkdf2_sha256, sha512_crypt

from indexer.cache import Cache
from indexer.config import ConfigError, load_config
from indexer.identity import Identity
from indexer.normalize import lookup_hash
from indexer.stores import StoreError, StoreUnavailable, build_store
from indexer.sync import full_sync, incremental_sync
from tests.conftest import cached, store_settings, wait_until

CONFIG = {"matrix": {"domain": "example.org"}, "threepids": {"msisdn": {"default_region": "GB"}}}
T0 = datetime.datetime(2026, 1, 1, 12, 0, 0)

# The documented generic queries, for a people table and a table of their addresses.
QUERIES = {
    "identities": """
        SELECT p.id AS id, p.login AS user_id, p.full_name AS display_name, a.medium AS medium, a.address AS address
        FROM people p LEFT JOIN addresses a ON a.person_id = p.id
        WHERE p.active = 1""",
    "changes": """
        SELECT p.id AS id, CASE WHEN p.active = 1 THEN p.login END AS user_id, p.full_name AS display_name,
               a.medium AS medium, a.address AS address, p.updated_at AS mark
        FROM people p LEFT JOIN addresses a ON a.person_id = p.id
        WHERE p.updated_at > :since""",
    "high_water_mark": "SELECT MAX(updated_at) FROM people",
    "password": "SELECT password_hash FROM people WHERE id = :id",
}


@pytest.fixture
def cache(rclient, prefix):
    c = Cache(rclient, prefix)
    c.initialize(pepper="pepper")
    return c


class Directory:
    """The test's tables, written through SQLAlchemy Core (so values are bound there too)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        self.meta = sqlalchemy.MetaData()
        self.people = sqlalchemy.Table(
            "people", self.meta,
            sqlalchemy.Column("id", sqlalchemy.String(64), primary_key=True),
            sqlalchemy.Column("login", sqlalchemy.String(255)),
            sqlalchemy.Column("full_name", sqlalchemy.String(255)),
            sqlalchemy.Column("active", sqlalchemy.Integer, nullable=False, default=1),
            sqlalchemy.Column("updated_at", sqlalchemy.DateTime(), nullable=False),
            sqlalchemy.Column("password_hash", sqlalchemy.String(255)),
        )
        self.addresses = sqlalchemy.Table(
            "addresses", self.meta,
            sqlalchemy.Column("person_id", sqlalchemy.String(64), nullable=False),
            sqlalchemy.Column("medium", sqlalchemy.String(16), nullable=False),
            sqlalchemy.Column("address", sqlalchemy.String(255), nullable=False),
        )
        self.meta.create_all(self.engine)

    def add(self, pid: str, login: str, name: str | None, at: datetime.datetime, *addresses: tuple[str, str],
            password: str | None = None, active: int = 1) -> None:
        with self.engine.begin() as c:
            c.execute(self.people.insert().values(id=pid, login=login, full_name=name, active=active,
                                                  updated_at=at, password_hash=password))
            for medium, address in addresses:
                c.execute(self.addresses.insert().values(person_id=pid, medium=medium, address=address))

    def update(self, pid: str, at: datetime.datetime, **values: Any) -> None:
        with self.engine.begin() as c:
            c.execute(self.people.update().where(self.people.c.id == pid).values(updated_at=at, **values))

    def delete(self, pid: str) -> None:
        with self.engine.begin() as c:
            c.execute(self.addresses.delete().where(self.addresses.c.person_id == pid))
            c.execute(self.people.delete().where(self.people.c.id == pid))

    def tables(self) -> set[str]:
        return set(sqlalchemy.inspect(self.engine).get_table_names())

    def count(self) -> int:
        with self.engine.connect() as c:
            return c.execute(sqlalchemy.select(sqlalchemy.func.count()).select_from(self.people)).scalar_one()


def stamp(directory: Directory, iso: str) -> str:
    return iso.replace("T", " ") if directory.url.startswith("sqlite") else iso


@pytest.fixture
def directory(database) -> Iterator[Directory]:
    d = Directory(database)
    yield d
    d.engine.dispose()


@pytest.fixture
def make_store():
    stores = []

    def make(url: str, **extra: Any):
        store = build_store(*store_settings({"name": "hr", "kind": "sql", "url": url, "timeout": "20s",
                                             "queries": dict(QUERIES), **extra}, CONFIG))
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


def test_full_sync_merges_rows_per_person(cache, directory, make_store):
    directory.add("1", "alice", "Alice Liddell", T0, ("email", "Alice@Example.org"), ("msisdn", "07700 900123"))
    directory.add("2", "@Bob:example.org", None, T0, ("email", "bob@example.org"))
    directory.add("3", "carol", "Carol", T0)
    directory.add("4", "dave", "Dave", T0, ("email", "dave@example.org"), active=0)
    result = full_sync(cache, make_store(directory.url), 0.2)
    assert (result.outcome, result.read, result.added) == ("ok", 3, 3)
    [alice, bob, carol, dave] = cache.get("hr", ["1", "2", "3", "4"])
    assert alice.mxid == "@alice:example.org" and alice.display_name == "Alice Liddell"
    assert alice.threepids == (("email", "alice@example.org"), ("msisdn", "447700900123"))
    assert bob.mxid == "@bob:example.org" and carol.threepids == () and dave is None
    assert cache.mxid_of("hr", "msisdn", "447700900123") == "@alice:example.org"
    assert cached(cache, cache.k.hashes, "hr", lookup_hash("bob@example.org", "email", "pepper")) == "@bob:example.org"
    assert cache.mxid_of("hr", "email", "dave@example.org") is None
    # A timestamp mark in one fixed format, so that string order is time order (SQLite has no
    # timestamp type: the text as stored is the mark).
    assert cache.state("hr")["high_water_mark"] == stamp(directory, "2026-01-01T12:00:00.000000")


def test_incremental_sync_by_timestamp_and_deletion(cache, directory, make_store):
    for i in range(6):
        directory.add(str(i), f"user{i}", f"User {i}", T0, ("email", f"user{i}@example.org"))
    store = make_store(directory.url)
    assert full_sync(cache, store, 0.5).outcome == "ok"

    later = T0 + datetime.timedelta(minutes=5)
    directory.update("1", later, full_name="Renamed One")
    directory.update("2", later + datetime.timedelta(seconds=1), active=0)  # disabled
    directory.add("9", "newbie", "New", later, ("email", "newbie@example.org"))
    result = incremental_sync(cache, store)
    assert (result.outcome, result.read, result.added, result.changed, result.removed) == ("ok", 3, 1, 1, 1)
    assert cache.get("hr", ["1"])[0].display_name == "Renamed One"
    assert cache.mxid_of("hr", "email", "user2@example.org") is None
    assert cache.mxid_of("hr", "email", "newbie@example.org") == "@newbie:example.org"
    assert cache.state("hr")["high_water_mark"] == stamp(directory, "2026-01-01T12:05:01.000000")
    again = incremental_sync(cache, store)
    assert (again.read, again.added, again.changed, again.removed) == (0, 0, 0, 0)

    # A row deleted outright leaves no trace for the changes query: the next full sync removes it.
    directory.delete("3")
    assert incremental_sync(cache, store).removed == 0
    assert full_sync(cache, store, 0.5).removed == 1
    assert cache.mxid_of("hr", "email", "user3@example.org") is None


def test_a_row_without_a_mark_takes_the_person_s_other_rows_mark(cache, directory, make_store):
    """A LEFT JOIN whose mark comes from the joined table gives NULL on some rows of a person: that
    used to end the indexer with TypeError (max of a mark and None)."""
    directory.add("1", "alice", "Alice", T0, ("email", "alice@example.org"))
    store = make_store(directory.url, queries=dict(
        QUERIES, changes=QUERIES["changes"].replace(
            "p.updated_at AS mark", "CASE WHEN a.medium = 'msisdn' THEN NULL ELSE p.updated_at END AS mark")))
    assert full_sync(cache, store, 0.5).outcome == "ok"
    later = T0 + datetime.timedelta(minutes=5)
    directory.add("2", "bob", "Bob", later, ("email", "bob@example.org"), ("msisdn", "07700 900123"))
    result = incremental_sync(cache, store)
    assert (result.outcome, result.added) == ("ok", 1)
    assert cache.mxid_of("hr", "msisdn", "447700900123") == "@bob:example.org"
    assert cache.state("hr")["high_water_mark"] == stamp(directory, "2026-01-01T12:05:00.000000")

    # Only NULL marks for a person: that sync fails and says why; the mark stays where it was.
    directory.add("3", "carol", "Carol", later + datetime.timedelta(seconds=1), ("msisdn", "07700 900124"))
    failed = incremental_sync(cache, store)
    assert failed.outcome == "failed" and "no mark for record 3" in failed.error
    assert cache.state("hr")["high_water_mark"] == stamp(directory, "2026-01-01T12:05:00.000000")


def test_each_hash_format_and_wrong_passwords(directory, make_store, caplog):
    hashes = {
        "bcrypt": bcrypt.hashpw("pässword".encode(), bcrypt.gensalt(4)).decode(),
        "argon2": argon2.PasswordHasher(time_cost=1, memory_cost=1024).hash("pässword"),
        "pbkdf2": pbkdf2_sha256.using(rounds=1000).hash("pässword"),
        "django": django_pbkdf2_sha256.using(rounds=1000).hash("pässword"),
        "sha512": sha512_crypt.using(rounds=1000).hash("pässword"),
        "unknown": "{SSHA}bm90IGEgaGFzaCB3ZSBrbm93",
        "broken": "$2b$12$truncated",
        "none": None,
    }
    for name, stored in hashes.items():
        directory.add(name, name, None, T0, password=stored)
    store = make_store(directory.url)
    people = {i.store_id: i for i in store.enumerate()}
    for name in ("bcrypt", "argon2", "pbkdf2", "django", "sha512"):
        assert store.authenticate(people[name], "pässword") is True, name
        assert store.authenticate(people[name], "passwörd") is False, name
        assert store.authenticate(people[name], "") is False, name
    caplog.set_level(logging.INFO)
    for name in ("unknown", "broken", "none"):
        assert store.authenticate(people[name], "pässword") is False
    assert "login for @unknown:example.org refused: the stored password hash is in none of the formats" in caplog.text
    assert "login for @broken:example.org refused: malformed bcrypt hash" in caplog.text
    assert "login for @none:example.org refused: the account has no password hash" in caplog.text
    assert "bm90IGEgaGFzaCB3ZSBrbm93" not in caplog.text


def test_pepper_is_appended_like_synapse(directory, make_store):
    directory.add("1", "alice", None, T0, password=bcrypt.hashpw(b"secret" + b"PEPPER", bcrypt.gensalt(4)).decode())
    [alice] = make_store(directory.url, password={"pepper": "PEPPER"}).enumerate()
    assert make_store(directory.url, password={"pepper": "PEPPER"}).authenticate(alice, "secret") is True
    assert make_store(directory.url).authenticate(alice, "secret") is False


HOSTILE = ["x' OR '1'='1", "1; DROP TABLE people; --", "'); DELETE FROM people; --", "\\'; DROP TABLE addresses; #"]


def test_values_reach_queries_only_as_bound_parameters(cache, directory, make_store):
    shared = bcrypt.hashpw(b"hunter2", bcrypt.gensalt(4)).decode()
    directory.add("1", "alice", "Robert'); DROP TABLE people; --", T0, ("email", "alice@example.org"),
                  password=shared)
    directory.add(HOSTILE[0], "mallory", "Mallory", T0, password=None)
    store = make_store(directory.url)
    assert full_sync(cache, store, 0.2).outcome == "ok"
    assert cache.get("hr", ["1"])[0].display_name == "Robert'); DROP TABLE people; --"
    for value in HOSTILE:
        # Were any of these spliced into the password query, "OR '1'='1" would return alice's hash.
        intruder = Identity.build(mxid="@mallory:example.org", localpart="mallory", display_name=None,
                                  threepids=[], store="hr", store_id=value)
        assert store.authenticate(intruder, "hunter2") is False
        # The mark is read back from Redis, so it is input too: compared as a value, never run as SQL
        # (PostgreSQL refuses it as a timestamp; the others compare it as text).
        try:
            assert {c.store_id for c in store.changes_since(value)} <= {"1", HOSTILE[0]}
        except StoreError as exc:
            assert "timestamp" in str(exc)
    assert {"people", "addresses"} <= directory.tables() and directory.count() == 2
    # The hostile id is an ordinary row: its own (empty) password is what is checked.
    [mallory] = [i for i in store.enumerate() if i.store_id == HOSTILE[0]]
    assert store.authenticate(mallory, "hunter2") is False
    assert incremental_sync(cache, store).outcome == "ok"
    assert directory.count() == 2 and cache.count("hr") == 2


def test_unreachable_or_broken_source_keeps_the_cache(cache, directory, make_store):
    directory.add("1", "alice", None, T0, ("email", "alice@example.org"))
    directory.add("2", "bob", None, T0, ("email", "bob@example.org"))
    assert full_sync(cache, make_store(directory.url), 0.2).outcome == "ok"

    wrong = dict(QUERIES, identities="SELECT id, login AS user_id FROM people")
    result = full_sync(cache, make_store(directory.url, queries=wrong), 1.0)
    assert result.outcome == "failed" and "no column 'display_name'" in result.error
    missing_table = dict(QUERIES, identities=QUERIES["identities"].replace("people p", "staff p"))
    result = full_sync(cache, make_store(directory.url, queries=missing_table), 1.0)
    assert result.outcome == "failed" and result.error.startswith("identities query on ")
    assert cache.mxid_of("hr", "email", "bob@example.org") == "@bob:example.org" and cache.count("hr") == 2


def test_a_database_that_is_down_fails_the_sync(cache, tmp_path):
    cache.set_state("hr", high_water_mark=5)
    store = build_store(*store_settings({"name": "hr", "kind": "sql", "url": "postgresql://nobody:secret@127.0.0.1:1/none",
                                         "timeout": "5s", "queries": dict(QUERIES)}, CONFIG))
    result = full_sync(cache, store, 0.2)
    assert result.outcome == "failed" and "127.0.0.1" in result.error and "secret" not in result.error
    assert incremental_sync(cache, store).outcome == "failed"
    assert cache.state("hr")["high_water_mark"] == 5
    # A password check it cannot make is not a wrong password: the login answers 503, not counted.
    bob = Identity(mxid="@bob:example.org", localpart="bob", display_name=None, threepids=(), store="hr",
                   store_id="2")
    with pytest.raises(StoreUnavailable, match="store hr"):
        store.authenticate(bob, "bob's password")
    store.close()


def _config_file(tmp_path, store: dict[str, Any]) -> str:
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump({"matrix": {"domain": "example.org"}, "stores": [store]}))
    return str(path)


@pytest.mark.parametrize("store, message", [
    ({"url": "sqlite:///x.db"}, "stores[0].queries.identities: missing required key (or set preset: synapse)"),
    ({"url": "sqlite:///x.db", "queries": {"identities": "SELECT * FROM t WHERE x = :name"}},
     "stores[0].queries.identities: unknown parameter :name; this query may use :domain"),
    ({"url": "sqlite:///x.db", "queries": {"identities": "SELECT 1", "changes": "SELECT 1 WHERE 2 > :since"}},
     "stores[0].queries.high_water_mark: missing required key (needed by queries.changes)"),
    ({"url": "oracle+nothing://x/y", "preset": "synapse"}, "stores[0].url: expected a SQLAlchemy database URL"),
    ({"url": "not a url", "preset": "synapse"}, "stores[0].url: expected a database URL like postgresql://user@host/db"),
    ({"url": "sqlite:///x.db", "preset": "synapse", "password": {"normalize": "NFX"}},
     "stores[0].password.normalize: expected one of"),
])
def test_config_mistakes_name_the_key(tmp_path, store, message):
    with pytest.raises(ConfigError) as error:
        load_config(_config_file(tmp_path, {"name": "db", "kind": "sql", **store}))
    assert str(error.value).startswith(message)


def test_relative_sqlite_paths_are_relative_to_the_config(tmp_path):
    config = load_config(_config_file(tmp_path, {"name": "db", "kind": "sql", "url": "sqlite:///people.db",
                                                 "queries": {"identities": "SELECT * FROM people"}}))
    store = build_store(config.stores[0], config)
    assert store.where == f"sqlite:///{tmp_path / 'people.db'}"
    with pytest.raises(StoreError, match="no such table: people"):
        list(store.enumerate())
    store.close()


@pytest.mark.parametrize("database, sleep, error", [
    ("postgresql", "pg_sleep(2)", "canceling statement due to statement timeout"),
    ("mariadb", "SLEEP(2)", "Lost connection to MySQL server during query"),
], indirect=["database"])
def test_a_slow_database_times_out_and_keeps_the_cache(cache, directory, make_store, sleep, error):
    directory.add("1", "alice", None, T0, ("email", "alice@example.org"))
    directory.add("2", "bob", None, T0, ("email", "bob@example.org"))
    assert full_sync(cache, make_store(directory.url), 0.2).outcome == "ok"
    slow = dict(QUERIES, identities=f"SELECT * FROM ({QUERIES['identities']}) AS q WHERE {sleep} IS NOT NULL")
    result = full_sync(cache, make_store(directory.url, queries=slow, timeout="1s"), 1.0)
    assert result.outcome == "failed" and error in result.error
    assert cache.count("hr") == 2 and cache.mxid_of("hr", "email", "bob@example.org") == "@bob:example.org"


def test_roles_query_reaches_the_internal_profile_after_each_sync(directory, make_server):
    roles = sqlalchemy.Table("person_roles", directory.meta,
                             sqlalchemy.Column("person_id", sqlalchemy.String(64), nullable=False),
                             sqlalchemy.Column("role_name", sqlalchemy.String(64), nullable=False))
    directory.meta.create_all(directory.engine)
    directory.add("1", "alice", "Alice", T0, ("email", "alice@example.org"))
    directory.add("2", "bob", "Bob", T0, ("email", "bob@example.org"))
    with directory.engine.begin() as c:
        c.execute(roles.insert(), [{"person_id": "1", "role_name": "inviters"},
                                   {"person_id": "1", "role_name": "staff"}, {"person_id": "2", "role_name": "staff"}])
    server = make_server([])
    server.config["stores"] = [{
        "name": "hr", "kind": "sql", "url": directory.url, "sync": {"full_every": "6h", "changes_every": None},
        "queries": {**QUERIES, "roles": "SELECT person_id AS id, role_name AS role FROM person_roles"}}]
    server.start()

    def roles_of(mxid: str) -> list[str] | None:
        response = server.http.get(f"/_matrix-internal/profile/v1/{mxid}")
        return response.json()["roles"] if response.status_code == 200 else None

    assert wait_until(lambda: roles_of("@alice:example.org"), 60, "the first sync") == ["inviters", "staff"]
    assert roles_of("@bob:example.org") == ["staff"]

    # An incremental sync reads the roles of the people the changes query returns.
    with directory.engine.begin() as c:
        c.execute(roles.delete().where(roles.c.person_id == "1", roles.c.role_name == "inviters"))
    directory.update("1", T0 + datetime.timedelta(hours=1))
    done = server.cli("index")
    assert done.returncode == 0 and "incremental sync" in done.stderr, done.stdout + done.stderr
    assert roles_of("@alice:example.org") == ["staff"]

    # A role removed without the person changing leaves at the next full sync.
    with directory.engine.begin() as c:
        c.execute(roles.delete().where(roles.c.person_id == "2"))
    done = server.cli("index", "--full")
    assert done.returncode == 0, done.stdout + done.stderr
    assert roles_of("@bob:example.org") == []
    assert roles_of("@alice:example.org") == ["staff"]
