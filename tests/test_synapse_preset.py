"""The sql store's synapse preset against databases laid out like Synapse's current schema."""

from __future__ import annotations

import hashlib
import unicodedata
from base64 import urlsafe_b64encode

import bcrypt
import pytest
import sqlalchemy
from conftest import make_store, wait_until

from indexer.cache import Cache
from indexer.sync import full_sync, incremental_sync

CONFIG = {"matrix": {"domain": "example.org"}, "threepids": {"msisdn": {"default_region": None}}}

# From Synapse's schema (synapse/storage/schema/main/full_schemas and later deltas), the columns of
# the three tables the preset reads.
SYNAPSE_TABLES = [
    """CREATE TABLE users (
        name text, password_hash text, creation_ts bigint, admin smallint DEFAULT 0 NOT NULL,
        upgrade_ts bigint, is_guest smallint DEFAULT 0 NOT NULL, appservice_id text, consent_version text,
        consent_server_notice_sent text, user_type text, deactivated smallint DEFAULT 0 NOT NULL,
        shadow_banned boolean, consent_ts bigint, approved boolean, locked boolean DEFAULT false NOT NULL,
        suspended boolean DEFAULT false NOT NULL, UNIQUE (name))""",
    """CREATE TABLE profiles (
        user_id text NOT NULL, displayname text, avatar_url text, full_user_id text, UNIQUE (user_id))""",
    """CREATE TABLE user_threepids (
        user_id text NOT NULL, medium text NOT NULL, address text NOT NULL, validated_at bigint NOT NULL,
        added_at bigint NOT NULL, UNIQUE (medium, address))""",
]
DAY0 = 1_767_225_600  # 2026-01-01, seconds (users.creation_ts); user_threepids times are milliseconds


class Synapse:
    def __init__(self, url: str) -> None:
        self.engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        with self.engine.begin() as c:
            for ddl in SYNAPSE_TABLES:
                c.execute(sqlalchemy.text(ddl))

    def run(self, sql: str, **params) -> None:
        with self.engine.begin() as c:
            c.execute(sqlalchemy.text(sql), params)

    def register(self, local: str, at: int, name: str | None = None, password: str | None = None,
                 pepper: str = "", **flags: object) -> None:
        hashed = None
        if password is not None:
            secret = unicodedata.normalize("NFKC", password).encode() + pepper.encode()
            hashed = bcrypt.hashpw(secret, bcrypt.gensalt(4)).decode()
        self.run("INSERT INTO users (name, password_hash, creation_ts, is_guest, appservice_id, deactivated) "
                 "VALUES (:name, :hash, :ts, :guest, :appservice, :deactivated)",
                 name=f"@{local}:example.org", hash=hashed, ts=at, guest=flags.get("guest", 0),
                 appservice=flags.get("appservice"), deactivated=flags.get("deactivated", 0))
        if name is not None:
            self.run("INSERT INTO profiles (user_id, displayname, full_user_id) VALUES (:l, :n, :f)",
                     l=local, n=name, f=f"@{local}:example.org")

    def add_threepid(self, local: str, medium: str, address: str, at_ms: int) -> None:
        self.run("INSERT INTO user_threepids (user_id, medium, address, validated_at, added_at) "
                 "VALUES (:u, :m, :a, :t, :t)", u=f"@{local}:example.org", m=medium, a=address, t=at_ms)


@pytest.fixture
def synapse(database):
    db = Synapse(database)
    db.url = database
    yield db
    db.engine.dispose()


@pytest.fixture
def cache(rclient, prefix):
    c = Cache(rclient, prefix)
    c.initialize(pepper="pepper")
    return c


def populate(db: Synapse) -> None:
    db.register("alice", DAY0, "Alice", password="correct horse")
    db.add_threepid("alice", "email", "alice@example.org", DAY0 * 1000)
    db.add_threepid("alice", "msisdn", "447700900123", DAY0 * 1000)
    db.register("bob", DAY0, "Bob", deactivated=1)
    db.add_threepid("bob", "email", "bob@example.org", DAY0 * 1000)
    db.register("guest1", DAY0, guest=1)
    db.register("irc_bridge_user", DAY0, "IRC person", appservice="irc")
    db.add_threepid("irc_bridge_user", "email", "irc@example.org", DAY0 * 1000)
    db.register("dave", DAY0)  # no profile row, no 3PIDs


@pytest.mark.parametrize("database", ["sqlite", "postgresql"], indirect=True)
def test_preset_indexes_real_users_only_and_follows_new_ones(cache, synapse):
    populate(synapse)
    store = make_store({"name": "synapse", "kind": "sql", "url": synapse.url, "preset": "synapse",
                         "timeout": "20s"}, CONFIG)
    result = full_sync(cache, store, 0.2)
    assert (result.outcome, result.read) == ("ok", 2)
    alice, dave = cache.get("synapse", ["@alice:example.org", "@dave:example.org"])
    assert alice.display_name == "Alice" and dave.display_name is None and dave.threepids == ()
    assert alice.threepids == (("email", "alice@example.org"), ("msisdn", "447700900123"))
    for address in ("bob@example.org", "irc@example.org"):
        assert cache.mxid_of("synapse", "email", address) is None
    assert cache.state("synapse")["high_water_mark"] == DAY0 * 1000

    synapse.register("erin", DAY0 + 60, "Erin")
    synapse.add_threepid("erin", "email", "erin@example.org", (DAY0 + 61) * 1000)
    synapse.add_threepid("dave", "email", "dave@example.org", (DAY0 + 120) * 1000)
    result = incremental_sync(cache, store)
    assert (result.outcome, result.added, result.changed) == ("ok", 1, 1)
    assert cache.mxid_of("synapse", "email", "erin@example.org") == "@erin:example.org"
    assert cache.mxid_of("synapse", "email", "dave@example.org") == "@dave:example.org"
    assert cache.state("synapse")["high_water_mark"] == (DAY0 + 120) * 1000

    # Deactivation leaves no timestamp in Synapse: the full sync takes the person out.
    synapse.run("UPDATE users SET deactivated = 1 WHERE name = '@erin:example.org'")
    assert incremental_sync(cache, store).removed == 0
    assert full_sync(cache, store, 0.5).removed == 1
    assert cache.mxid_of("synapse", "email", "erin@example.org") is None
    store.close()


@pytest.mark.parametrize("database", ["sqlite", "postgresql"], indirect=True)
def test_preset_checks_synapse_password_hashes(synapse):
    synapse.register("alice", DAY0, "Alice", password="ｐａｓｓ word")  # full-width: NFKC matters
    synapse.register("pepe", DAY0, "Pepe", password="secret", pepper="SomePepper")
    synapse.register("sso", DAY0, "SSO only")
    plain = make_store({"name": "s", "kind": "sql", "url": synapse.url, "preset": "synapse", "timeout": "20s"},
                        CONFIG)
    peppered = make_store({"name": "s", "kind": "sql", "url": synapse.url, "preset": "synapse", "timeout": "20s",
                            "password": {"pepper": "SomePepper"}}, CONFIG)
    people = {i.localpart: i for i in plain.enumerate()}
    assert plain.authenticate(people["alice"], "pass word") is True
    assert plain.authenticate(people["alice"], "ｐａｓｓ word") is True
    assert plain.authenticate(people["alice"], "pass w0rd") is False
    assert plain.authenticate(people["pepe"], "secret") is False
    assert peppered.authenticate(people["pepe"], "secret") is True
    assert plain.authenticate(people["sso"], "") is False and plain.authenticate(people["sso"], "x") is False
    plain.close()
    peppered.close()


def test_a_config_naming_only_the_database_serves_lookups(make_server, tmp_path):
    url = f"sqlite:///{tmp_path / 'homeserver.db'}"
    db = Synapse(url)
    populate(db)
    server = make_server()
    server.config["stores"] = [{"name": "synapse", "kind": "sql", "url": url, "preset": "synapse"}]
    server.start()
    found = wait_until(lambda: server.lookup_v1("email", "alice@example.org").get("mxid"), 60, "the first sync")
    assert found == "@alice:example.org"
    assert server.lookup_v1("email", "bob@example.org") == {}
    auth = server.auth()
    pepper = server.http.get("/_matrix/identity/v2/hash_details", headers=auth).json()["lookup_pepper"]
    digest = urlsafe_b64encode(hashlib.sha256(f"447700900123 msisdn {pepper}".encode()).digest()).decode().rstrip("=")
    answer = server.http.post("/_matrix/identity/v2/lookup", headers=auth,
                              json={"algorithm": "sha256", "pepper": pepper, "addresses": [digest]})
    assert answer.json() == {"mappings": {digest: "@alice:example.org"}}
    db.engine.dispose()
