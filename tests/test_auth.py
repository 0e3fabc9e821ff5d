"""Authentication for the homeserver over real HTTP: check_credentials against the YAML store,
a real slapd and a PostgreSQL table, failed-login limits, login with an email or phone number through a fake homeserver
that checks passwords the way Synapse's REST password provider does, and profiles; and the
failed-login counts of a login whose identity read fails."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, cast

import argon2
import bcrypt
import ldap3
import pytest
import sqlalchemy

from indexer.config import parse_config
from indexer.identity import Identity
from server.credentials import Credentials
from server.redis_pipe import PipelinedRedis
from server.services.lookups import Lookups
from tests.conftest import wait_until
from tests.fake_homeserver import ClientHomeserver
from tests.slapd import ADMIN_DN, ADMIN_PASSWORD, READER_DN, READER_PASSWORD, SUFFIX

PASSWORD = "correct horse battery"
PEOPLE = [
    {"localpart": "alice", "display_name": "Alice Liddell", "emails": ["alice@example.com"],
     "phones": ["+1 800 555 2067"], "password": bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()},
    {"localpart": "bob", "display_name": "Bob Builder", "emails": ["bob@example.com"]},  # no password
]
ALICE_PROFILE = {"display_name": "Alice Liddell", "three_pids": [
    {"medium": "email", "address": "alice@example.com"}, {"medium": "msisdn", "address": "18005552067"}]}
REFUSED = {"auth": {"success": False, "profile": {}}}


def check(server, user: str, password: str) -> dict[str, Any]:
    response = server.http.post("/_matrix-internal/identity/v1/check_credentials",
                                json={"user": {"id": user, "password": password}})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture
def started(make_server, client_homeserver: ClientHomeserver):
    def start(people: list[dict[str, Any]] = PEOPLE, **config: Any):
        server = make_server(people)
        server.config["homeserver"] = {"url": client_homeserver.url}
        server.config.update(config)
        client_homeserver.identity_server = server.url
        server.start()
        wait_until(lambda: server.lookup_v1("email", "alice@example.com").get("mxid"), 60, "the first sync")
        return server

    return start


def test_check_credentials_with_the_yaml_store(started):
    server = started()
    accepted = {"auth": {"success": True, "mxid": "@alice:example.org", "profile": ALICE_PROFILE}}
    assert check(server, "@alice:example.org", PASSWORD) == accepted  # as Synapse sends it
    assert check(server, "alice", PASSWORD) == accepted  # a bare localpart
    assert check(server, "@Alice@Example.com:example.org", PASSWORD) == accepted  # an email typed as username
    assert check(server, "alice@example.com", PASSWORD) == accepted
    assert check(server, "@+1 800 555 2067:example.org", PASSWORD) == accepted  # a phone number
    assert check(server, "+18005552067", PASSWORD) == accepted
    # Wrong, empty, unknown, foreign, password-less: one answer that says nothing about who exists.
    assert check(server, "@alice:example.org", "wrong") == REFUSED
    assert check(server, "@alice:example.org", "") == REFUSED
    assert check(server, "@nobody:example.org", PASSWORD) == REFUSED
    assert check(server, "@alice:other.example", PASSWORD) == REFUSED
    assert check(server, "@bob:example.org", "anything") == REFUSED
    assert "anything" not in server.log() and PASSWORD not in server.log()
    response = server.http.post("/_matrix-internal/identity/v1/check_credentials", json={"user": {"id": "@a:b"}})
    assert response.status_code == 400
    assert response.json() == {"errcode": "M_INVALID_PARAM", "error": "user.password: missing required key"}


def test_failed_logins_are_limited_per_user_and_per_address(started, client_homeserver):
    server = started(auth={"rate_limit": {"per_user": 3, "per_ip": 4, "window": "1h"}})
    for _ in range(3):
        assert check(server, "alice@example.com", "wrong") == REFUSED  # counted for alice, however named
    assert check(server, "@alice:example.org", PASSWORD) == REFUSED  # the right password, too late
    assert check(server, "@nobody:example.org", "x")["auth"]["success"] is False
    # Logins through us are counted per client address as well: the fourth failure is the last.
    login = {"type": "m.login.password", "password": "wrong"}
    for name in ("carol", "dave", "erin", "frank"):
        response = server.http.post("/_matrix/client/v3/login",
                                    json={**login, "identifier": {"type": "m.id.user", "user": name}})
        assert response.status_code == 403, response.text
    response = server.http.post("/_matrix/client/v3/login",
                                json={**login, "identifier": {"type": "m.id.user", "user": "gina"}})
    assert response.status_code == 429
    body = response.json()
    assert body["errcode"] == "M_LIMIT_EXCEEDED" and 0 < body["retry_after_ms"] <= 3_600_000


def test_login_with_an_email_or_phone_number(started, client_homeserver):
    server = started()
    response = server.http.post("/_matrix/client/v3/login", json={
        "type": "m.login.password", "password": PASSWORD,
        "identifier": {"type": "m.id.thirdparty", "medium": "email", "address": "ALICE@example.com"}})
    assert response.status_code == 200, response.text
    assert response.json()["user_id"] == "@alice:example.org"
    assert client_homeserver.requests[-1][2]["identifier"] == {"type": "m.id.user", "user": "@alice:example.org"}
    response = server.http.post("/_matrix/client/r0/login", json={
        "type": "m.login.password", "password": PASSWORD,
        "identifier": {"type": "m.id.phone", "country": "US", "phone": "(800) 555-2067"}})
    assert response.status_code == 200 and response.json()["user_id"] == "@alice:example.org"
    response = server.http.post("/_matrix/client/v3/login", json={  # the pre-identifier form
        "type": "m.login.password", "password": PASSWORD, "medium": "email", "address": "alice@example.com"})
    assert response.status_code == 200 and response.json()["user_id"] == "@alice:example.org"
    response = server.http.post("/_matrix/client/v3/login", json={
        "type": "m.login.password", "password": "wrong",
        "identifier": {"type": "m.id.thirdparty", "medium": "email", "address": "alice@example.com"}})
    assert response.status_code == 403 and response.json()["errcode"] == "M_FORBIDDEN"  # relayed
    # An address we do not know goes to the homeserver unchanged, for its own 3PIDs.
    unknown = {"type": "m.id.thirdparty", "medium": "email", "address": "who@example.com"}
    server.http.post("/_matrix/client/v3/login", json={"type": "m.login.password", "password": "x",
                                                       "identifier": unknown})
    assert client_homeserver.requests[-1][2]["identifier"] == unknown
    assert server.http.get("/_matrix/client/v3/login").json() == {"flows": [{"type": "m.login.password"}]}
    assert server.http.post("/_matrix/client/v3/login", content=b"{").json()["errcode"] == "M_NOT_JSON"


def test_profiles_with_threepids(started, client_homeserver):
    client_homeserver.profiles["@alice:example.org"] = {"displayname": "Alice L.", "avatar_url": "mxc://example.org/a"}
    client_homeserver.tokens["bobs-token"] = "@bob:example.org"
    server = started(profile={"threepids": True})
    plain = {"displayname": "Alice L.", "avatar_url": "mxc://example.org/a"}
    signed_in = {"Authorization": "Bearer bobs-token"}
    assert server.http.get("/_matrix/client/v3/profile/@alice:example.org", headers=signed_in).json() == {
        **plain, "threepids": ALICE_PROFILE["three_pids"]}
    assert server.http.get("/_matrix/client/r0/profile/@alice:example.org",
                           params={"access_token": "bobs-token"}).json()["threepids"] == ALICE_PROFILE["three_pids"]
    # The homeserver shows profiles to anyone; the 3PIDs are only for its users.
    assert server.http.get("/_matrix/client/v3/profile/@alice:example.org").json() == plain
    assert server.http.get("/_matrix/client/v3/profile/@alice:example.org",
                           headers={"Authorization": "Bearer forged"}).json() == plain
    response = server.http.get("/_matrix/client/r0/profile/%40nobody%3Aexample.org")
    assert response.status_code == 404 and response.json()["errcode"] == "M_NOT_FOUND"  # the homeserver's answer
    assert server.http.get("/_matrix-internal/profile/v1/@alice:example.org").json() == {
        "user_id": "@alice:example.org", "display_name": "Alice Liddell", "threepids": ALICE_PROFILE["three_pids"],
        "roles": []}
    assert server.http.get("/_matrix-internal/profile/v1/@nobody:example.org").status_code == 404


def test_profiles_without_threepids_by_default(started, client_homeserver):
    client_homeserver.profiles["@alice:example.org"] = {"displayname": "Alice L."}
    server = started()
    assert server.http.get("/_matrix/client/v3/profile/@alice:example.org").json() == {"displayname": "Alice L."}


def test_check_credentials_with_ldap_binds_as_the_entry(make_server, slapd):
    admin = ldap3.Connection(slapd.uri, ADMIN_DN, ADMIN_PASSWORD, auto_bind=True, raise_exceptions=True)
    base = f"ou=t{uuid.uuid4().hex[:10]},{SUFFIX}"
    admin.add(base, ["organizationalUnit"])
    admin.add(f"uid=jdoe,{base}", ["inetOrgPerson"], {
        "uid": "jdoe", "cn": "John Doe", "sn": "Doe", "mail": ["john.doe@example.org"],
        "telephoneNumber": ["+44 7700 900123"], "userPassword": "ldap-pw"})
    admin.unbind()
    server = make_server([])
    server.config["stores"] = [{"name": "staff", "kind": "ldap", "preset": "openldap", "uri": slapd.uri,
                                "bind": {"dn": READER_DN, "password": READER_PASSWORD}, "base_dns": [base],
                                "sync": {"full_every": "1h", "max_delete_ratio": 0.5}}]
    server.start()
    wait_until(lambda: server.lookup_v1("email", "john.doe@example.org").get("mxid"), 60, "the first sync")
    accepted = check(server, "@jdoe:example.org", "ldap-pw")
    assert accepted["auth"]["success"] is True and accepted["auth"]["mxid"] == "@jdoe:example.org"
    assert accepted["auth"]["profile"]["display_name"] == "John Doe"
    assert {"medium": "msisdn", "address": "447700900123"} in accepted["auth"]["profile"]["three_pids"]
    assert check(server, "john.doe@example.org", "ldap-pw")["auth"]["success"] is True
    assert check(server, "07700 900123", "ldap-pw")["auth"]["success"] is True  # default region GB
    assert check(server, "@jdoe:example.org", "wrong") == REFUSED
    assert check(server, "@jdoe:example.org", "") == REFUSED
    assert check(server, "@nobody:example.org", "ldap-pw") == REFUSED


def test_check_credentials_with_a_sql_store(make_server, postgres_url):
    engine = sqlalchemy.create_engine(postgres_url.replace("postgresql://", "postgresql+psycopg://"),
                                      poolclass=sqlalchemy.pool.NullPool)
    with engine.begin() as c:
        c.execute(sqlalchemy.text("CREATE TABLE staff (id INTEGER PRIMARY KEY, login TEXT, name TEXT, mail TEXT,"
                                  " pw TEXT)"))
        c.execute(sqlalchemy.text("INSERT INTO staff VALUES (7, 'cdarwin', 'Charles Darwin', 'cd@example.org', :pw)"),
                  {"pw": argon2.PasswordHasher().hash("finches")})
    engine.dispose()
    server = make_server([])
    server.config["stores"] = [{"name": "hr", "kind": "sql", "url": postgres_url, "sync": {"full_every": "1h"},
                                "queries": {
                                    "identities": "SELECT id, login AS user_id, name AS display_name,"
                                                  " 'email' AS medium, mail AS address FROM staff",
                                    "password": "SELECT pw FROM staff WHERE id = :id"}}]
    server.start()
    wait_until(lambda: server.lookup_v1("email", "cd@example.org").get("mxid"), 60, "the first sync")
    accepted = check(server, "cd@example.org", "finches")
    assert accepted == {"auth": {"success": True, "mxid": "@cdarwin:example.org", "profile": {
        "display_name": "Charles Darwin", "three_pids": [{"medium": "email", "address": "cd@example.org"}]}}}
    assert check(server, "cdarwin", "finches")["auth"]["success"] is True
    assert check(server, "@cdarwin:example.org", "wrong") == REFUSED
    assert check(server, "@cdarwin:example.org", "") == REFUSED
    assert "finches" not in server.log()


def test_failed_logins_per_address_behind_a_reverse_proxy(make_server, client_homeserver):
    def failed_logins(server, forwarded_for: str, count: int) -> list[int]:
        body = {"type": "m.login.password", "password": "wrong", "identifier": {"type": "m.id.user"}}
        return [server.http.post("/_matrix/client/v3/login", headers={"X-Forwarded-For": forwarded_for},
                                 json={**body, "identifier": {"type": "m.id.user", "user": f"u{i}"}}).status_code
                for i in range(count)]

    limits = {"rate_limit": {"per_user": 100, "per_ip": 2, "window": "1h"}}
    behind = make_server(PEOPLE)
    behind.config["server"]["proxies_count"] = 1
    behind.config.update(homeserver={"url": client_homeserver.url}, auth=limits)
    client_homeserver.identity_server = behind.url
    behind.start()
    # Each client address the proxy forwards has its own count, whoever connects to us.
    assert failed_logins(behind, "198.51.100.7", 3) == [403, 403, 429]
    assert failed_logins(behind, "203.0.113.9", 1) == [403]
    behind.stop()

    direct = make_server(PEOPLE)
    direct.config.update(homeserver={"url": client_homeserver.url}, auth=limits)
    client_homeserver.identity_server = direct.url
    direct.start()
    # Without proxies_count a client cannot escape its count by sending X-Forwarded-For.
    assert failed_logins(direct, "198.51.100.7", 2) == [403, 403]
    assert failed_logins(direct, "203.0.113.9", 1) == [429]


class _FailingCache:
    """Lookups whose identity reads fail, recording the failed-login counts."""

    def __init__(self, limited: bool) -> None:
        self.limited = limited
        self.counts: dict[tuple[str, str], int] = {}

    async def identities(self, mxids: list[str]) -> list[Any]:
        await asyncio.sleep(0.01)  # the claim, sent with this read, is answered first
        raise ConnectionError("Redis went away")

    async def claim_attempt(self, kind: str, who: str, window: int, most: int) -> int | None:
        self.counts[kind, who] = self.counts.get((kind, who), 0) + 1  # counted over the limit too
        return 1000 if self.limited else None

    async def return_attempt(self, kind: str, who: str) -> None:
        self.counts[kind, who] -= 1


@pytest.mark.parametrize("limited", [False, True])
def test_a_failed_identity_read_counts_nothing(tmp_path, limited):
    """A Matrix ID login's attempt is claimed while its identity is read: when the read fails, the
    attempt is returned, and the read's error is what is raised even when the login was over its limit."""
    (tmp_path / "people.yml").write_text("[]")
    config = parse_config({"matrix": {"domain": "example.org"}, "server": {"name": "id.example.org"},
                           "data_dir": str(tmp_path), "stores": [{"name": "people", "kind": "file",
                                                                  "path": str(tmp_path / "people.yml")}]}, tmp_path)
    cache = _FailingCache(limited)
    credentials = Credentials(config, cast(Lookups, cache))
    try:
        with pytest.raises(ConnectionError):
            asyncio.run(credentials.authenticate("@alice:example.org", PASSWORD, "10.0.0.1"))
    finally:
        credentials.close()
    assert all(count == 0 for count in cache.counts.values())
    assert set(cache.counts) == ({("user", "@alice:example.org")} if limited
                                 else {("user", "@alice:example.org"), ("ip", "10.0.0.1")})


def test_a_login_reads_the_identity_of_the_first_store_that_holds_the_user(cache, redis_url, prefix):
    """Whom a password is checked against: the identity (and where its store finds it) of the first
    store in config order that has the Matrix ID, read from the cache as the server reads it."""
    def person(store: str, mxid: str, name: str, locator: str) -> tuple[Identity, None]:
        return Identity.build(mxid=mxid, localpart=mxid[1:].split(":")[0], display_name=name, threepids=[],
                              store=store, store_id=f"{store}-{name}", locator=locator), None

    cache.apply("staff", [person("staff", "@alice:example.org", "Alice", "uid=alice,ou=staff")], [], 1)
    cache.apply("guests", [person("guests", "@alice:example.org", "Alice G.", "uid=alice,ou=guests"),
                           person("guests", "@carol:example.org", "Carol", "uid=carol,ou=guests")], [], 1)

    async def read() -> list[Identity | None]:
        pipe = PipelinedRedis(redis_url)
        try:
            lookups = Lookups(pipe, prefix, ["staff", "guests"], spread=cache.k.buckets)
            return await lookups.identities(["@carol:example.org", "@nobody:example.org", "@alice:example.org"])
        finally:
            pipe.close()

    carol, nobody, alice = asyncio.run(read())
    assert nobody is None
    assert carol is not None and (carol.store, carol.display_name, carol.locator) == \
        ("guests", "Carol", "uid=carol,ou=guests")
    assert alice is not None and (alice.store, alice.display_name, alice.locator) == \
        ("staff", "Alice", "uid=alice,ou=staff")
