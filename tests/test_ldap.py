"""The ldap store against a real OpenLDAP slapd: full and incremental sync, deletions and their
guard, filter escaping, password checks, TLS, and a directory that fails mid-sync."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ldap3
import pytest
from ldap3.operation.search import search_result_entry_response_to_dict_fast
from ldap3.utils.asn1 import decode_message_fast

from indexer.identity import Identity
from indexer.normalize import lookup_hash
from indexer.stores import StoreUnavailable
from indexer.stores.ldap import LdapStore
from indexer.stores.ldap_decode import search_entry
from indexer.stores.ldap_mapping import filter_value, normalize_time
from indexer.stores.ldap_roles import dn_key, unescape_value
from indexer.sync import full_sync, incremental_sync
from tests.conftest import cached, make_store, wait_until
from tests.slapd import ADMIN_DN, ADMIN_PASSWORD, READER_DN, READER_PASSWORD, SUFFIX, Slapd

CONFIG = {"matrix": {"domain": "example.org"}, "threepids": {"msisdn": {"default_region": "GB"}}}


def admin(server: Slapd) -> ldap3.Connection:
    return ldap3.Connection(server.uri, ADMIN_DN, ADMIN_PASSWORD, auto_bind=True, raise_exceptions=True)


class Directory:
    """An organizational unit of the test's own, changed with ldap3 as an administrator would."""

    def __init__(self, server: Slapd) -> None:
        self.server = server
        self.conn = admin(server)
        self.base = f"ou=t{uuid.uuid4().hex[:10]},{SUFFIX}"
        self.conn.add(self.base, ["organizationalUnit"])

    def dn(self, uid: str, ou: str | None = None) -> str:
        return f"uid={uid},{f'ou={ou},' if ou else ''}{self.base}"

    def add_ou(self, name: str) -> None:
        self.conn.add(f"ou={name},{self.base}", ["organizationalUnit"])

    def add(self, uid: str, *, mail: list[str] | None = None, phones: list[str] | None = None,
            password: str | None = None, ou: str | None = None, **extra: Any) -> str:
        attrs: dict[str, Any] = {"uid": uid, "cn": extra.pop("cn", uid.title()), "sn": "Person"}
        if mail:
            attrs["mail"] = mail
        if phones:
            attrs["telephoneNumber"] = phones
        if password:
            attrs["userPassword"] = password
        attrs.update(extra)
        dn = self.dn(uid, ou)
        self.conn.add(dn, ["inetOrgPerson"], attrs)
        return dn

    def modify(self, dn: str, **attrs: Any) -> None:
        self.conn.modify(dn, {k: [(ldap3.MODIFY_REPLACE, v if isinstance(v, list) else [v])] for k, v in attrs.items()})

    def delete(self, dn: str) -> None:
        self.conn.delete(dn)

    def store(self, **overrides: Any) -> LdapStore:
        config = {"name": "dir", "kind": "ldap", "preset": "openldap", "uri": self.server.uri,
                  "bind": {"dn": READER_DN, "password": READER_PASSWORD}, "base_dns": [self.base],
                  "page_size": 50}
        config.update(overrides)
        return make_store(config, CONFIG)


@pytest.fixture
def directory(slapd: Slapd) -> Iterator[Directory]:
    d = Directory(slapd)
    yield d
    d.conn.unbind()


def people(directory: Directory, count: int, ou: str | None = None) -> list[str]:
    return [
        directory.add(f"user{i:03d}", mail=[f"user{i}@example.org", f"u.{i}@mail.example.com"],
                      phones=[f"+44 7700 9{i:05d}"], mobile=f"07700 8{i:05d}", displayName=f"User Number {i}",
                      ou=ou)
        for i in range(count)
    ]


def test_full_sync_reads_every_page(directory, cache):
    people(directory, 260)
    directory.add("Zoe.Mixed", mail=["Zoe@Example.ORG"])
    store = directory.store()
    result = full_sync(cache, store, 0.2)
    assert (result.outcome, result.read, result.added, result.removed) == ("ok", 261, 261, 0)
    assert cache.count("dir") == 261
    assert cache.mxid_of("dir", "email", "user7@example.org") == "@user007:example.org"
    assert cache.mxid_of("dir", "email", "u.259@mail.example.com") == "@user259:example.org"
    assert cache.mxid_of("dir", "msisdn", "447700900042") == "@user042:example.org"
    assert cache.mxid_of("dir", "msisdn", "447700800042") == "@user042:example.org"  # mobile, national form
    assert cache.mxid_of("dir", "email", "zoe@example.org") == "@zoe.mixed:example.org"
    hashed = lookup_hash("user12@example.org", "email", "pepper")
    assert cached(cache, cache.k.hashes, "dir", hashed) == "@user012:example.org"
    user = cache.identity_by_mxid("dir", "@user012:example.org")
    assert user.display_name == "User Number 12"
    assert uuid.UUID(user.store_id)  # keyed by entryUUID
    assert user.locator == directory.dn("user012")
    assert isinstance(cache.state("dir")["high_water_mark"], str)
    store.close()


def test_attribute_mapping_overrides_the_preset(directory, cache):
    directory.add("bob", mail=["bob@example.org"], phones=["+44 7700 900555"], description="@Bob.B:Example.org",
                  employeeNumber="E-1234")
    store = directory.store(attributes={"user_id": "description", "user_id_type": "mxid", "lowercase": False,
                                        "display_name": ["sn"],
                                        "threepids": {"msisdn": [], "employee": ["employeeNumber"]}})
    assert full_sync(cache, store, 0.2).added == 1
    bob = cache.identity_by_mxid("dir", "@Bob.B:example.org")
    assert bob.display_name == "Person"
    assert bob.threepids == (("email", "bob@example.org"), ("employee", "E-1234"))
    assert cache.mxid_of("dir", "employee", "E-1234") == "@Bob.B:example.org"
    store.close()


def test_incremental_sync_sees_modify_add_rename_and_leaving_the_filter(directory, cache):
    for uid in ("ann", "ben", "cid", "dee"):
        directory.add(uid, mail=[f"{uid}@example.org"])
    store = directory.store(filter="(&(objectClass=inetOrgPerson)(!(description=left)))")
    assert full_sync(cache, store, 0.2).added == 4
    cid_before = cache.identity_by_mxid("dir", "@cid:example.org")

    directory.modify(directory.dn("ann"), mail=["ann.new@example.org"])
    directory.add("eve", mail=["eve@example.org"])
    directory.conn.modify_dn(directory.dn("cid"), "uid=carl")
    directory.modify(directory.dn("dee"), description="left")
    result = incremental_sync(cache, store)
    assert result.outcome == "ok", result.error
    assert (result.added, result.changed, result.removed) == (1, 2, 1)
    assert cache.mxid_of("dir", "email", "ann.new@example.org") == "@ann:example.org"
    assert cache.mxid_of("dir", "email", "ann@example.org") is None
    assert cache.mxid_of("dir", "email", "eve@example.org") == "@eve:example.org"
    assert cache.mxid_of("dir", "email", "dee@example.org") is None
    carl = cache.identity_by_mxid("dir", "@carl:example.org")
    assert carl.store_id == cid_before.store_id and carl.locator == directory.dn("carl")
    assert cache.mxid_of("dir", "email", "cid@example.org") == "@carl:example.org"
    assert cache.identity_by_mxid("dir", "@cid:example.org") is None
    assert cache.count("dir") == 4
    mark = cache.state("dir")["high_water_mark"]
    again = incremental_sync(cache, store)
    assert (again.added, again.changed, again.removed) == (0, 0, 0)
    assert cache.state("dir")["high_water_mark"] >= mark
    store.close()


def test_deleted_entries_leave_with_the_next_full_sync(directory, cache):
    dns = people(directory, 10)
    store = directory.store()
    full_sync(cache, store, 0.2)
    directory.delete(dns[3])
    result = full_sync(cache, store, 0.2)
    assert (result.outcome, result.removed) == ("ok", 1)
    assert cache.mxid_of("dir", "email", "user3@example.org") is None
    assert cache.identity_by_mxid("dir", "@user003:example.org") is None
    store.close()


def test_an_entry_deleted_and_created_again_answers_throughout(directory, cache):
    def entry() -> str:
        return directory.add("jdoe", mail=["john.doe@example.org"], phones=["+44 7700 900123"])

    def answers() -> tuple[str | None, str | None, str | None]:
        hashed = cached(cache, cache.k.hashes, "dir", lookup_hash("john.doe@example.org", "email", "pepper"))
        return cache.mxid_of("dir", "email", "john.doe@example.org"), cache.mxid_of("dir", "msisdn", "447700900123"), \
            hashed

    dn = entry()
    directory.add("other")
    store = directory.store()
    full_sync(cache, store, 0.5)
    old = cache.identity_by_mxid("dir", "@jdoe:example.org").store_id
    directory.delete(dn)
    entry()
    both = incremental_sync(cache, store)  # OpenLDAP does not tell deletions: the new entry comes alone
    assert (both.outcome, both.added, both.removed) == ("ok", 1, 0) and cache.count("dir") == 3
    assert answers() == ("@jdoe:example.org",) * 3
    new = cache.identity_by_mxid("dir", "@jdoe:example.org").store_id
    assert new != old
    swept = full_sync(cache, store, 0.5)
    assert (swept.outcome, swept.removed) == ("ok", 1) and cache.get("dir", [old]) == [None]
    assert answers() == ("@jdoe:example.org",) * 3
    assert cache.identity_by_mxid("dir", "@jdoe:example.org").store_id == new
    store.close()


def test_a_mistyped_filter_cannot_wipe_the_cache(directory, cache):
    people(directory, 10)
    full_sync(cache, directory.store(), 0.2)
    mistyped = directory.store(filter="(objectClass=inetOrgPersn)")
    result = full_sync(cache, mistyped, 0.2)
    assert result.outcome == "refused"
    assert "would remove 10 of 10 identities" in result.error
    assert cache.count("dir") == 10
    assert cache.mxid_of("dir", "email", "user9@example.org") == "@user009:example.org"
    mistyped.close()


def test_filter_values_are_escaped(directory, cache):
    assert filter_value("a*b(c)d\\e\x00") == "a\\2ab\\28c\\29d\\5ce\\00"
    assert filter_value(b"\x01\xff") == "\\01\\ff"
    directory.add("star", description="a*(b)\\c")
    directory.add("other", description="anything")
    store = directory.store()
    crafted = filter_value("a*(b)\\c")
    literal = list(store.directory.search(directory.base, f"(description={crafted})", ["uid"]))
    assert [e["dn"] for e in literal] == [directory.dn("star")]
    assert list(store.directory.search(directory.base, f"(description={filter_value('*')})", ["uid"])) == []
    store.close()


def test_a_crafted_id_cannot_log_in_as_someone_else(directory, cache):
    directory.add("alice", password="alice-pw")
    store = directory.store()
    full_sync(cache, store, 0.2)
    alice = cache.identity_by_mxid("dir", "@alice:example.org")
    for crafted in ("*", f"{alice.store_id[:8]}*", "x)(uid=alice", "\\2a", "x\x00"):
        attacker = alice.__class__.build(mxid="@mallory:example.org", localpart="mallory", display_name=None,
                                         threepids=[], store="dir", store_id=crafted)
        assert store.authenticate(attacker, "alice-pw") is False, crafted
    assert store.authenticate(alice, "alice-pw") is True
    store.close()


def test_authentication_binds_as_the_entry(directory, cache, caplog):
    caplog.set_level(logging.INFO)
    directory.add_ou("staff")
    directory.add_ou("alumni")
    directory.add("alice", password="correct horse", ou="staff")
    directory.add("bob", password="bob-pw", ou="staff")
    store = directory.store()
    full_sync(cache, store, 0.2)
    alice = cache.identity_by_mxid("dir", "@alice:example.org")
    assert alice.locator == directory.dn("alice", "staff")
    assert store.authenticate(alice, "correct horse") is True
    assert store.authenticate(alice, "wrong horse") is False
    assert store.authenticate(alice, "bob-pw") is False
    assert store.authenticate(alice, "") is False
    assert "empty password for @alice:example.org refused" in caplog.text

    directory.conn.modify_dn(directory.dn("alice", "staff"), "uid=alice", new_superior=f"ou=alumni,{directory.base}")
    assert store.authenticate(alice, "correct horse") is True  # the cached DN is stale: found by entryUUID
    assert "moved from" in caplog.text
    assert store.authenticate(alice, "wrong horse") is False
    assert incremental_sync(cache, store).outcome == "ok"
    assert cache.identity_by_mxid("dir", "@alice:example.org").locator == directory.dn("alice", "alumni")
    assert "correct horse" not in caplog.text and "bob-pw" not in caplog.text
    store.close()


def checks_from_the_event_loop(store: LdapStore, identity: Identity, passwords: list[str]) -> tuple[list[bool], int]:
    """store.authenticate_async's answers for each password in turn, as the server asks them, and
    how many of them needed a thread."""
    threaded: list[Callable[[], bool]] = []
    executor = ThreadPoolExecutor(2)

    async def in_thread(check: Callable[[], bool]) -> bool:
        threaded.append(check)
        return await asyncio.get_running_loop().run_in_executor(executor, check)

    async def run() -> list[bool]:
        return [await store.authenticate_async(identity, password, in_thread) for password in passwords]

    try:
        return asyncio.run(run()), len(threaded)
    finally:
        executor.shutdown()


@pytest.mark.parametrize("ldaps", [False, True])
def test_checks_awaited_on_the_event_loop_answer_as_those_in_a_thread(directory, cache, slapd, caplog, ldaps):
    caplog.set_level(logging.INFO)
    directory.add_ou("staff")
    directory.add_ou("alumni")
    directory.add("alice", password="correct horse", ou="staff")
    directory.add("bob", password="bob-pw", ou="staff")
    store = directory.store(uri=slapd.ldaps_uri, tls={"ca_file": str(slapd.cert)}) if ldaps else directory.store()
    full_sync(cache, store, 0.2)
    alice = cache.identity_by_mxid("dir", "@alice:example.org")
    answers, threaded = checks_from_the_event_loop(
        store, alice, ["correct horse", "correct horse", "wrong horse", "bob-pw", "", "correct horse"])
    assert answers == [True, True, False, False, False, True]
    # A thread for the first (connecting), each refused bind (whether the entry moved) and the empty
    # password (refused unsent); the other binds went on the connection left open.
    assert threaded == 4
    assert "empty password for @alice:example.org refused" in caplog.text
    directory.conn.modify_dn(directory.dn("alice", "staff"), "uid=alice", new_superior=f"ou=alumni,{directory.base}")
    assert checks_from_the_event_loop(store, alice, ["correct horse", "wrong horse"])[0] == [True, False]
    assert "moved from" in caplog.text
    assert "correct horse" not in caplog.text and "bob-pw" not in caplog.text
    store.close()


def test_checks_awaited_on_the_event_loop_survive_a_restart_and_time_out_on_a_hang(own_slapd, caplog):
    caplog.set_level(logging.INFO)
    store = make_store({"name": "dir", "kind": "ldap", "uri": own_slapd.uri, "base_dns": [f"ou=people,{SUFFIX}"],
                        "bind": {"dn": READER_DN, "password": READER_PASSWORD}, "timeout": "2s"}, CONFIG)
    p7 = store.build_identity("x", "p7", None, [], locator=f"uid=p7,ou=people,{SUFFIX}")
    assert checks_from_the_event_loop(store, p7, ["pw7", "pw7"])[0] == [True, True]
    own_slapd.stop()  # the connection left open is closed
    own_slapd.start()
    assert checks_from_the_event_loop(store, p7, ["pw7", "wrong", "pw7"])[0] == [True, False, True]
    own_slapd.freeze()
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="no answer to a bind: timed out"):
            checks_from_the_event_loop(store, p7, ["pw7"])
        assert time.monotonic() - started < 20  # only a hang guard: the bound is the 2 s timeout
    finally:
        own_slapd.thaw()
    assert checks_from_the_event_loop(store, p7, ["pw7", "pw7"])[0] == [True, True]
    assert caplog.text.count("password checks fail until the directory answers again") == 1
    assert caplog.text.count("password checks reach the directory again") == 1
    store.close()


def test_an_empty_password_never_reaches_the_directory(cache, caplog):
    caplog.set_level(logging.INFO)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    store = make_store({"name": "dir", "kind": "ldap", "uri": f"ldap://127.0.0.1:{port}",
                         "base_dns": ["dc=example,dc=org"]}, CONFIG)
    someone = store.build_identity("x", "alice", None, [], locator="uid=alice,dc=example,dc=org")
    assert store.authenticate(someone, "") is False
    assert "empty password for @alice:example.org refused" in caplog.text and "cannot reach" not in caplog.text
    with pytest.raises(StoreUnavailable):
        store.authenticate(someone, "something")  # this one is sent, to a directory that is not there
    assert caplog.text.count("password checks fail until the directory answers again: cannot reach") == 1
    closed.close()


def test_ldaps_and_starttls_with_the_directory_certificate(directory, cache, slapd):
    people(directory, 3)
    over_ldaps = directory.store(uri=slapd.ldaps_uri, tls={"ca_file": str(slapd.cert)})
    assert full_sync(cache, over_ldaps, 0.2).added == 3
    over_ldaps.close()
    directory.add("tls", password="tls-pw", mail=["tls@example.org"])
    starttls = directory.store(start_tls=True, tls={"ca_file": str(slapd.cert)})
    assert full_sync(cache, starttls, 0.2).added == 1
    assert starttls.authenticate(cache.identity_by_mxid("dir", "@tls:example.org"), "tls-pw") is True
    starttls.close()
    untrusted = directory.store(uri=slapd.ldaps_uri)  # the system's CAs do not know the test's certificate
    result = full_sync(cache, untrusted, 0.2)
    assert result.outcome == "failed" and "certificate" in result.error.lower()
    assert cache.count("dir") == 4
    untrusted.close()


def test_failover_to_the_next_uri(directory, cache, slapd):
    people(directory, 2)
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead = f"ldap://127.0.0.1:{unused.getsockname()[1]}"
    store = directory.store(uri=[dead, slapd.uri], connect_timeout="2s")
    assert full_sync(cache, store, 0.2).added == 2
    store.close()


@pytest.fixture
def own_slapd(tmp_path: Path) -> Iterator[Slapd]:
    """A slapd of this test's own, to stop while a sync reads it."""
    server = Slapd(tmp_path)
    ou = f"ou=people,{SUFFIX}"
    ldif = f"dn: {ou}\nobjectClass: organizationalUnit\nou: people\n\n" + "".join(
        f"dn: uid=p{i},{ou}\nobjectClass: inetOrgPerson\nuid: p{i}\ncn: P {i}\nsn: P\nmail: p{i}@example.org\n"
        f"userPassword: pw{i}\n\n"
        for i in range(300)
    )
    server.load(ldif)
    server.start()
    yield server
    server.stop()


def test_directory_stopped_mid_sync_changes_nothing(own_slapd, cache):
    config = {"name": "dir", "kind": "ldap", "uri": own_slapd.uri, "base_dns": [f"ou=people,{SUFFIX}"],
              "bind": {"dn": READER_DN, "password": READER_PASSWORD}, "page_size": 50}
    store = make_store(config, CONFIG)
    assert full_sync(cache, store, 0.2).added == 300
    p100 = cache.identity_by_mxid("dir", "@p100:example.org")
    assert store.authenticate(p100, "pw100") is True  # leaves a pooled connection open
    with admin(own_slapd) as conn:
        for i in range(20):
            conn.delete(f"uid=p{i},ou=people,{SUFFIX}")
    reading = store.enumerate

    def dies_after_120() -> Iterator[Any]:
        for count, identity in enumerate(reading()):
            if count == 120:
                own_slapd.kill()
            yield identity

    store.enumerate = dies_after_120  # type: ignore[method-assign]
    result = full_sync(cache, store, 0.2)
    assert result.outcome == "failed" and "failed mid-read" in result.error
    assert cache.count("dir") == 300
    assert cache.mxid_of("dir", "email", "p3@example.org") == "@p3:example.org"
    assert cache.state("dir")["last_full"]["outcome"] == "failed"
    assert incremental_sync(cache, store).outcome == "failed"
    assert cache.count("dir") == 300

    store.enumerate = reading  # type: ignore[method-assign]
    own_slapd.start()
    result = full_sync(cache, store, 0.2)
    assert (result.outcome, result.removed) == ("ok", 20)
    assert store.authenticate(p100, "pw100") is True  # the pooled connection died with slapd
    store.close()


def test_a_size_limit_fails_the_sync_and_says_what_to_change(tmp_path, cache):
    limited = Slapd(tmp_path, sizelimit="50")  # OpenLDAP's default is 500, paged searches included
    limited.load(f"dn: ou=people,{SUFFIX}\nobjectClass: organizationalUnit\nou: people\n\n" + "".join(
        f"dn: uid=p{i},ou=people,{SUFFIX}\nobjectClass: inetOrgPerson\nuid: p{i}\ncn: P\nsn: P\n\n"
        for i in range(60)))
    limited.start()
    try:
        store = make_store({"name": "dir", "kind": "ldap", "uri": limited.uri, "base_dns": [f"ou=people,{SUFFIX}"],
                             "bind": {"dn": READER_DN, "password": READER_PASSWORD}, "page_size": 20}, CONFIG)
        result = full_sync(cache, store, 0.2)
        assert result.outcome == "failed"
        assert "sizeLimitExceeded" in result.error and "size=unlimited" in result.error
        assert cache.state("dir").get("high_water_mark") is None
        store.close()
    finally:
        limited.stop()


def test_a_directory_that_never_answers_times_out(cache):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(5)  # connections complete in the backlog, but nothing ever answers
    store = make_store({"name": "dir", "kind": "ldap", "uri": f"ldap://127.0.0.1:{silent.getsockname()[1]}",
                         "base_dns": [SUFFIX], "timeout": "1s"}, CONFIG)
    result = full_sync(cache, store, 0.2)
    assert result.outcome == "failed" and "cannot reach" in result.error
    store.close()
    silent.close()


@pytest.mark.slow  # waits out a 10 s timeout
def test_a_directory_that_never_answers_bounds_a_login_by_the_timeout(caplog):
    caplog.set_level(logging.DEBUG)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(5)  # connections complete in the backlog, but nothing ever answers
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        refused = f"ldap://127.0.0.1:{unused.getsockname()[1]}"
    silent_uri = f"ldap://127.0.0.1:{silent.getsockname()[1]}"
    jdoe = Identity.build(mxid="@jdoe:example.org", localpart="jdoe", display_name=None, threepids=[], store="dir",
                          store_id="0b5b1c3e-0000-4000-8000-000000000001", locator=f"uid=jdoe,{SUFFIX}")
    for uris, reason in (([silent_uri], "no answer to a bind: .*timed out"),
                         ([refused, silent_uri], "no answer to a bind"),
                         ([refused], f"cannot reach the directory: {refused}: .*refused")):
        store = make_store({"name": "dir", "kind": "ldap", "uri": uris, "base_dns": [SUFFIX], "timeout": "1s",
                             "bind": {"dn": READER_DN, "password": READER_PASSWORD}}, CONFIG)
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match=reason):
                store.authenticate(jdoe, "secret")
            assert time.monotonic() - started < 20  # only a hang guard: the bound is the 1 s timeout
        store.close()
    # While one check tries the unreachable directory, others fail at once instead of queueing.
    store = make_store({"name": "dir", "kind": "ldap", "uri": silent_uri, "base_dns": [SUFFIX], "timeout": "2s"},
                        CONFIG)
    with pytest.raises(StoreUnavailable):
        store.authenticate(jdoe, "secret")
    outcome: list[str] = []

    def attempt() -> None:
        try:
            store.authenticate(jdoe, "secret")
        except StoreUnavailable as exc:
            outcome.append(str(exc))

    trying = threading.Thread(target=attempt)
    trying.start()
    wait_until(store._probing.locked, 10, "the check trying the directory again")
    with pytest.raises(StoreUnavailable, match="another password check is trying it again"):
        store.authenticate(jdoe, "secret")
    trying.join(20)
    assert not trying.is_alive() and len(outcome) == 1 and "cannot reach the directory" in outcome[0]
    store.close()
    # One line per store when the directory became unreachable, not one per login, and none at ERROR.
    warnings = [r for r in caplog.records if r.name == "indexer.stores.ldap" and r.levelno >= logging.WARNING]
    assert [r.levelname for r in warnings] == ["WARNING"] * 4
    assert all("password checks fail until the directory answers again" in r.getMessage() for r in warnings)
    assert "secret" not in caplog.text
    silent.close()


def test_generalized_times_sort_as_times():
    assert normalize_time("20240102030405Z") == "20240102030405.000000Z"
    assert normalize_time("20240102030405.5Z") == "20240102030405.500000Z"
    assert normalize_time("20240102040405+0100") == "20240102030405.000000Z"
    assert normalize_time("20240102030405.5Z") > normalize_time("20240102030405Z")


def test_a_server_indexes_a_directory_from_a_minimal_config(directory, make_server: Callable[..., Any]):
    directory.add("alice", mail=["alice@example.org"], password="pw")
    server = make_server()
    server.config["stores"] = [{
        "name": "corp", "kind": "ldap", "preset": "openldap", "uri": directory.server.uri,
        "bind": {"dn": READER_DN, "password": READER_PASSWORD}, "base_dns": [directory.base],
    }]
    server.start()
    found = wait_until(lambda: server.lookup_v1("email", "alice@example.org").get("mxid"), 60, "the LDAP entry")
    assert found == "@alice:example.org"
    details = server.http.get("/_matrix/identity/v2/hash_details", headers=server.auth())
    pepper = details.json()["lookup_pepper"]
    answer = server.http.post("/_matrix/identity/v2/lookup", headers=server.auth(), json={
        "addresses": [lookup_hash("alice@example.org", "email", pepper)], "algorithm": "sha256", "pepper": pepper})
    assert answer.json()["mappings"] == {lookup_hash("alice@example.org", "email", pepper): "@alice:example.org"}


def test_the_admin_api_syncs_a_directory_and_reports_progress(directory, make_server: Callable[..., Any]):
    people(directory, 120)
    admin = {"Authorization": "Bearer admin-token-for-the-ldap-test"}
    server = make_server()
    server.config["admin"] = {"token": admin["Authorization"][len("Bearer "):]}
    server.config["stores"] = [{
        "name": "corp", "kind": "ldap", "preset": "openldap", "uri": directory.server.uri, "page_size": 25,
        "bind": {"dn": READER_DN, "password": READER_PASSWORD}, "base_dns": [directory.base],
        "sync": {"full_every": "6h", "changes_every": None},
    }]
    server.start()
    wait_until(lambda: server.lookup_v1("email", "user7@example.org").get("mxid"), 60, "the first sync")
    directory.add("newbie", mail=["newbie@example.org"])
    assert server.lookup_v1("email", "newbie@example.org") == {}

    started = server.http.post("/_mxisd/admin/v1/stores/corp/sync", headers=admin, json={"full": True})
    assert started.status_code == 202, started.text
    job_id = started.json()["job"]["id"]
    seen: list[dict[str, Any]] = []

    def finished() -> dict[str, Any] | None:
        job = server.http.get(f"/_mxisd/admin/v1/jobs/{job_id}", headers=admin).json()
        seen.append(job)
        return job if job["state"] == "done" else None

    done = wait_until(finished, 60, "the admin-triggered sync")
    assert done["outcome"] == "ok" and done["read"] == 121 and done["percent"] == 100
    assert done["result"]["added"] == 1 and done["result"]["removed"] == 0
    reads = [job["read"] for job in seen]
    assert reads == sorted(reads)
    assert server.lookup_v1("email", "newbie@example.org")["mxid"] == "@newbie:example.org"


def test_an_entry_deleted_and_created_again_keeps_its_addresses_and_logins(directory, make_server: Callable[..., Any]):
    def entry() -> str:
        return directory.add("jdoe", mail=["john.doe@example.org"], phones=["+44 7700 900123"], password="ldap-pw",
                             displayName="John Doe")

    def logs_in(login: str) -> bool:
        response = server.http.post("/_matrix-internal/identity/v1/check_credentials",
                                    json={"user": {"id": login, "password": "ldap-pw"}})
        assert response.status_code == 200, response.text
        return response.json()["auth"]["success"]

    def entry_uuid(dn: str) -> str:
        directory.conn.search(dn, "(objectClass=*)", attributes=["entryUUID"])
        return str(directory.conn.entries[0].entryUUID.value)

    dn = entry()
    directory.add("other")
    before = entry_uuid(dn)
    server = make_server([])
    server.config["stores"] = [{
        "name": "corp", "kind": "ldap", "preset": "openldap", "uri": directory.server.uri,
        "bind": {"dn": READER_DN, "password": READER_PASSWORD}, "base_dns": [directory.base],
        "sync": {"full_every": "6h", "changes_every": "1h", "max_delete_ratio": 0.5},
    }]
    server.start()
    wait_until(lambda: server.lookup_v1("email", "john.doe@example.org").get("mxid"), 60, "the first sync")
    directory.delete(dn)
    entry()
    assert entry_uuid(dn) != before
    for run in range(2):  # the full sync that sees the re-created entry, and the one after
        done = server.cli("index", "--full")
        assert done.returncode == 0, done.stdout + done.stderr
        assert ("added 1, changed 0, removed 1" if run == 0 else "added 0, changed 0, removed 0") in done.stderr
        assert server.lookup_v1("email", "john.doe@example.org").get("mxid") == "@jdoe:example.org"
        assert server.lookup_v1("msisdn", "447700900123").get("mxid") == "@jdoe:example.org"
        assert logs_in("john.doe@example.org") and logs_in("+44 7700 900123") and logs_in("@jdoe:example.org")


def test_logins_while_the_directory_hangs_fail_with_503_and_are_not_counted(own_slapd, make_server: Callable[..., Any]):
    server = make_server([])
    server.config["stores"] = [{
        "name": "corp", "kind": "ldap", "uri": own_slapd.uri, "base_dns": [f"ou=people,{SUFFIX}"], "timeout": "2s",
        "bind": {"dn": READER_DN, "password": READER_PASSWORD}, "sync": {"full_every": "6h", "changes_every": None},
    }]
    server.start()
    wait_until(lambda: server.lookup_v1("email", "p7@example.org").get("mxid"), 60, "the first sync")

    def check(user: str) -> Any:
        return server.http.post("/_matrix-internal/identity/v1/check_credentials",
                                json={"user": {"id": user, "password": "pw7"}})

    assert check("@p7:example.org").json()["auth"]["success"] is True  # leaves a pooled connection open
    own_slapd.freeze()
    try:
        for user in ["@p7:example.org", "p7@example.org"] * 4:  # more than auth.rate_limit.per_user
            started = time.monotonic()
            answer = check(user)
            assert time.monotonic() - started < 30  # only a hang guard: the bound is the 2 s timeout
            assert answer.status_code == 503, answer.text
            assert answer.json()["errcode"] == "M_UNKNOWN" and "directory does not answer" in answer.json()["error"]
    finally:
        own_slapd.thaw()
    # The refused checks were not counted as failed logins: the right password is taken at once.
    assert check("p7@example.org").json()["auth"]["success"] is True
    log = server.log()
    assert log.count("password checks fail until the directory answers again") == 1, log
    assert log.count("password checks reach the directory again (8 failed while it was unreachable)") == 1, log
    assert " ERROR " not in log, log


def profile_roles(server: Any, mxid: str) -> list[str] | None:
    """The roles at GET /_matrix-internal/profile/v1/{userId}, None while the user is unknown."""
    response = server.http.get(f"/_matrix-internal/profile/v1/{mxid}")
    return response.json()["roles"] if response.status_code == 200 else None


def test_roles_from_a_group_search_reach_the_internal_profile(directory, make_server: Callable[..., Any]):
    alice, bob = directory.add("alice", mail=["alice@example.org"]), directory.add("bob")
    carol = directory.add("carol")
    directory.add_ou("groups")
    groups = f"ou=groups,{directory.base}"
    # Spelled as administrators do: case and blanks in member values differ from the entries' DNs.
    directory.conn.add(f"cn=Inviters,{groups}", ["groupOfNames"], {"member": [alice.upper().replace(",", ", ")]})
    directory.conn.add(f"cn=staff,{groups}", ["groupOfNames"], {"member": [alice, bob]})
    directory.conn.add(f"cn=empty,{groups}", ["groupOfNames"], {"member": [f"uid=gone,{directory.base}"]})
    server = make_server([])
    server.config["stores"] = [{
        "name": "corp", "kind": "ldap", "preset": "openldap", "uri": directory.server.uri,
        "bind": {"dn": READER_DN, "password": READER_PASSWORD}, "base_dns": [directory.base],
        "sync": {"full_every": "6h", "changes_every": None},
        "roles": {"source": "groups", "base_dns": [groups]},
    }]
    server.start()
    assert wait_until(lambda: profile_roles(server, "@alice:example.org"), 60, "the first sync") == [
        "Inviters", "staff"]
    assert profile_roles(server, "@bob:example.org") == ["staff"]
    assert profile_roles(server, "@carol:example.org") == []

    # A member added to a group: the group changed, so the next incremental sync re-reads its members.
    time.sleep(1.1)  # modifyTimestamp has whole seconds
    directory.conn.modify(f"cn=Inviters,{groups}", {"member": [(ldap3.MODIFY_ADD, [carol])]})
    done = server.cli("index")
    assert done.returncode == 0 and "incremental sync" in done.stderr, done.stdout + done.stderr
    assert profile_roles(server, "@carol:example.org") == ["Inviters"]
    # A member removed: nothing names them any more; the next full sync reads everyone's groups again.
    directory.conn.modify(f"cn=Inviters,{groups}", {"member": [(ldap3.MODIFY_DELETE, [carol])]})
    done = server.cli("index", "--full")
    assert done.returncode == 0, done.stdout + done.stderr
    assert profile_roles(server, "@carol:example.org") == []
    assert profile_roles(server, "@alice:example.org") == ["Inviters", "staff"]


def test_roles_from_posix_groups_by_member_uid_and_by_dn(directory, cache):
    directory.add("alice")
    directory.add("bob")
    directory.add_ou("groups")
    groups = f"ou=groups,{directory.base}"
    directory.conn.add(f"cn=wheel,{groups}", ["posixGroup"], {"gidNumber": 10, "memberUid": ["Alice"]})
    directory.conn.add(f"cn=users,{groups}", ["posixGroup"], {"gidNumber": 100, "memberUid": ["alice", "bob"]})
    store = directory.store(roles={"source": "groups", "base_dns": [groups], "filter": "(objectClass=posixGroup)",
                                   "member_attribute": "memberUid", "name": "dn"})
    assert full_sync(cache, store, 0.2).outcome == "ok"
    assert cache.identity_by_mxid("dir", "@alice:example.org").roles == (f"cn=users,{groups}", f"cn=wheel,{groups}")
    assert cache.identity_by_mxid("dir", "@bob:example.org").roles == (f"cn=users,{groups}",)
    # An incremental sync finds the groups of a changed person with one search of its own.
    time.sleep(1.1)
    directory.modify(directory.dn("bob"), mail="bob@example.org")
    assert incremental_sync(cache, store).outcome == "ok"
    assert cache.identity_by_mxid("dir", "@bob:example.org").roles == (f"cn=users,{groups}",)
    store.close()


@pytest.fixture(scope="module")
def memberof_slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    """A slapd with the memberOf overlay, which keeps memberOf on the members of groupOfNames groups."""
    server = Slapd(tmp_path_factory.mktemp("memberof"), modules="moduleload memberof", extra="overlay memberof")
    server.load()
    server.start()
    yield server
    server.stop()


def test_roles_from_member_of_reach_the_internal_profile(memberof_slapd, make_server: Callable[..., Any]):
    directory = Directory(memberof_slapd)
    alice, bob = directory.add("alice", mail=["alice@example.org"]), directory.add("bob")
    directory.conn.add(f"cn=inviters,{directory.base}", ["groupOfNames"], {"member": [alice]})
    # A role named by an attribute other than the group's RDN is read from the group entry.
    directory.conn.add(f"ou=staff,{directory.base}", ["groupOfNames"], {"cn": "All staff", "member": [alice, bob]})
    directory.conn.add(f"cn=Sales\\, EMEA,{directory.base}", ["groupOfNames"], {"member": [alice]})
    server = make_server([])
    server.config["stores"] = [{
        "name": "corp", "kind": "ldap", "preset": "openldap", "uri": memberof_slapd.uri,
        "bind": {"dn": READER_DN, "password": READER_PASSWORD}, "base_dns": [directory.base],
        "sync": {"full_every": "6h", "changes_every": None}, "roles": {"source": "member_of"},
    }]
    server.start()
    assert wait_until(lambda: profile_roles(server, "@alice:example.org"), 60, "the first sync") == [
        "All staff", "Sales, EMEA", "inviters"]
    assert profile_roles(server, "@bob:example.org") == ["All staff"]
    time.sleep(1.1)
    directory.conn.modify(f"cn=inviters,{directory.base}", {"member": [(ldap3.MODIFY_ADD, [bob])]})
    done = server.cli("index")
    assert done.returncode == 0 and "incremental sync" in done.stderr, done.stdout + done.stderr
    assert profile_roles(server, "@bob:example.org") == ["All staff", "inviters"]
    directory.conn.modify(f"ou=staff,{directory.base}", {"member": [(ldap3.MODIFY_DELETE, [bob])]})
    done = server.cli("index", "--full")
    assert done.returncode == 0, done.stdout + done.stderr
    assert profile_roles(server, "@bob:example.org") == ["inviters"]
    directory.conn.unbind()


def test_a_group_of_many_changed_since_the_last_sync_gives_each_member_its_role(directory, cache):
    for ou in ("staff", "elsewhere", "groups"):
        directory.add_ou(ou)
    dns = people(directory, 60, ou="staff")
    outsider = directory.add("outsider", ou="elsewhere")  # in the group, but not where the store reads
    groups = f"ou=groups,{directory.base}"
    store = directory.store(base_dns=[f"ou=staff,{directory.base}"], roles={"source": "groups", "base_dns": [groups]})
    assert full_sync(cache, store, 0.2).added == 60
    assert cache.identity_by_mxid("dir", "@user059:example.org").roles == ()
    time.sleep(1.1)
    directory.conn.add(f"cn=everyone,{groups}", ["groupOfNames"], {"member": [*dns, outsider]})
    result = incremental_sync(cache, store)
    assert (result.outcome, result.changed, result.added) == ("ok", 60, 0), result.error
    assert [i.roles for i in cache.iter_identities("dir")] == [("everyone",)] * 60
    store.close()


def test_group_member_values_match_however_the_dn_is_spelled():
    # Directories other than slapd may keep a member value as an administrator typed it.
    assert dn_key("UID=Alice, OU=People,  DC=Example,DC=org") == dn_key("uid=alice,ou=people,dc=example,dc=org")
    assert dn_key(r"CN=Sales\, EMEA,DC=example") == dn_key(r"cn=sales\, emea,dc=example")
    assert unescape_value(r"Sales\2C EMEA") == unescape_value(r"Sales\, EMEA") == "Sales, EMEA"
    assert unescape_value(r"\C3\89quipe") == "Équipe"


def _ber(tag: int, value: bytes) -> bytes:
    size = len(value)
    length = bytes([size]) if size < 0x80 else bytes([0x80 | (size.bit_length() + 7) // 8]) + size.to_bytes(
        (size.bit_length() + 7) // 8, "big")
    return bytes([tag]) + length + value


def test_entries_decoded_lean_hold_what_ldap3_decodes():
    # Short and long BER lengths, binary and multiple values, a name in any case, a ranged value.
    attributes = [("objectGUID", [uuid.UUID(int=7).bytes_le]), ("mail", [b"a@example.org", b"b@example.org"]),
                  ("displayName", ["Zoë ".encode() * 60]), ("description", [bytes(range(256)) * 300]),
                  ("member;range=0-1499", [b"cn=x"]), ("cn", [])]
    entry = _ber(0x04, "cn=Zoë,dc=example,dc=org".encode()) + _ber(0x30, b"".join(
        _ber(0x30, _ber(0x04, name.encode()) + _ber(0x31, b"".join(_ber(0x04, v) for v in values)))
        for name, values in attributes))
    message = _ber(0x30, _ber(0x02, (300).to_bytes(2, "big")) + _ber(0x64, entry))
    ours = search_entry(message, 300)
    theirs = search_result_entry_response_to_dict_fast(decode_message_fast(message)["payload"], None, None, True)
    assert ours is not None and ours["type"] == "searchResEntry"
    assert (ours["dn"], ours["raw_dn"]) == (theirs["dn"], theirs["raw_dn"])
    # (No values: ldap3 says None, which no reader of ours would iterate.)
    assert ours["raw_attributes"] == {name.lower(): values or [] for name, values in theirs["raw_attributes"].items()}
    assert ours["raw_attributes"].get("OBJECTGUID") == theirs["raw_attributes"]["objectguid"]
    assert list(ours["attributes"]) == ["member;range=0-1499"]  # for ldap3's auto_range to complete
    assert search_entry(message, 301) is None  # another search's entry: ldap3's, as anything else
    assert search_entry(_ber(0x30, _ber(0x02, b"\x01") + _ber(0x65, b"")), 1) is None
