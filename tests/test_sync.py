"""Full sync into a real Redis: mark-and-sweep, safe failures, the deletion guard, the change stream."""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Iterator
from typing import Any

import bcrypt
import jsonschema
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from indexer.cache import Cache
from indexer.config import ConfigError, load_schema
from indexer.identity import Identity
from indexer.normalize import lookup_hash
from indexer.rediskeys import RedisKeys
from indexer.settings import Config, StoreConfig
from indexer.status import HostBounds
from indexer.stores import Change, Store, StoreError
from indexer.sync import SyncBusy, full_sync, incremental_sync, sync_store
from tests.conftest import cached, cached_all, make_store, store_settings

CONFIG = {"matrix": {"domain": "example.org"}, "threepids": {"msisdn": {"default_region": "GB"}}}
HR = {"name": "hr", "kind": "file", "path": "/dev/null"}  # the settings of the test's own Store classes


@pytest.fixture
def people_file(tmp_path):
    path = tmp_path / "people.yml"

    def write(people):
        path.write_text(yaml.safe_dump(people))
        return make_store({"name": "hr", "kind": "file", "path": str(path)}, CONFIG)

    return write


def changes(cache: Cache) -> list[tuple[str, str]]:
    return [(c.store_id, c.op) for c in cache.read_changes("0-0", 10_000, None)]


def test_full_sync_writes_identities_lookups_and_hashes(cache, people_file):
    store = people_file([
        {"localpart": "Alice", "display_name": " Alice ", "emails": ["ALICE@example.org"], "phones": ["07700 900123"]},
        {"localpart": "bob", "emails": ["bob@bücher.example"]},
    ])
    result = full_sync(cache, store, 0.2)
    assert (result.outcome, result.read, result.added, result.changed, result.removed) == ("ok", 2, 2, 0, 0)
    [alice] = cache.get("hr", ["alice"])
    assert alice.mxid == "@alice:example.org" and alice.display_name == "Alice"
    assert alice.threepids == (("email", "alice@example.org"), ("msisdn", "447700900123"))
    assert cache.mxid_of("hr", "email", "alice@example.org") == "@alice:example.org"
    assert cache.mxid_of("hr", "msisdn", "447700900123") == "@alice:example.org"
    assert cache.mxid_of("hr", "email", "bob@xn--bcher-kva.example") == "@bob:example.org"
    hashed = cached(cache, cache.k.hashes, "hr", lookup_hash("alice@example.org", "email", "pepper"))
    assert hashed == "@alice:example.org"
    assert cache.state("hr")["last_full"]["outcome"] == "ok"
    assert sorted(changes(cache)) == [("alice", "upsert"), ("bob", "upsert")]


def test_unchanged_records_are_not_rewritten(cache, people_file):
    store = people_file([{"localpart": "alice", "emails": ["alice@example.org"]}])
    full_sync(cache, store, 0.2)
    again = full_sync(cache, store, 0.2)
    assert (again.read, again.added, again.changed, again.removed) == (1, 0, 0, 0)
    assert changes(cache) == [("alice", "upsert")]


def test_addresses_move_between_people_and_renames_keep_the_record(cache, people_file):
    full_sync(cache, people_file([
        {"id": "u1", "localpart": "alice", "emails": ["shared@example.org", "alice@example.org"]},
        {"id": "u2", "localpart": "bob", "emails": ["bob@example.org"]},
    ]), 0.2)
    result = full_sync(cache, people_file([
        {"id": "u1", "localpart": "alice", "emails": ["alice@example.org"]},
        {"id": "u2", "localpart": "robert", "emails": ["bob@example.org", "shared@example.org"]},
    ]), 0.2)
    assert (result.added, result.changed, result.removed) == (0, 2, 0)
    assert cache.mxid_of("hr", "email", "shared@example.org") == "@robert:example.org"
    assert cache.mxid_of("hr", "email", "bob@example.org") == "@robert:example.org"
    assert cache.mxid_of("hr", "email", "alice@example.org") == "@alice:example.org"
    assert cache.count("hr") == 2
    assert cached(cache, cache.k.mxids, "hr", "@bob:example.org") is None


def test_removed_people_disappear_with_their_addresses(cache, people_file):
    people = [{"localpart": f"user{i}", "emails": [f"user{i}@example.org"]} for i in range(10)]
    full_sync(cache, people_file(people), 0.2)
    result = full_sync(cache, people_file(people[:8]), 0.2)
    assert (result.outcome, result.removed) == ("ok", 2)
    assert cache.mxid_of("hr", "email", "user9@example.org") is None
    assert cache.get("hr", ["user9"]) == [None]
    assert ("user9", "delete") in changes(cache)
    hashes = cached_all(cache, cache.k.hashes, "hr")
    assert len(hashes) == 8


def test_removing_too_many_is_refused(cache, people_file):
    people = [{"localpart": f"user{i}", "emails": [f"user{i}@example.org"]} for i in range(10)]
    full_sync(cache, people_file(people), 0.2)
    result = full_sync(cache, people_file(people[:7]), 0.2)
    assert result.outcome == "refused"
    assert "would remove 3 of 10 identities" in result.error
    assert cache.count("hr") == 10
    assert cache.mxid_of("hr", "email", "user9@example.org") == "@user9:example.org"
    assert cache.state("hr")["last_full"]["outcome"] == "refused"
    # An emptied file is the classic mistake.
    assert full_sync(cache, people_file([]), 0.2).outcome == "refused"
    assert cache.count("hr") == 10


def test_one_removal_is_always_allowed(cache, people_file):
    full_sync(cache, people_file([{"localpart": "a"}, {"localpart": "b"}]), 0.2)
    assert full_sync(cache, people_file([{"localpart": "a"}]), 0.2).outcome == "ok"


class DiesMidway(Store):
    """A source that drops the connection after its first entries (as a directory can)."""

    kind = "test"

    def enumerate(self) -> Iterator[Identity]:
        yield self.build_identity("alice", "alice", "Alice II", [("email", "alice2@example.org")])
        raise StoreError("connection reset by peer")


def test_a_failed_sync_removes_nothing(cache, people_file):
    full_sync(cache, people_file([{"localpart": "alice", "emails": ["alice@example.org"]},
                                  {"localpart": "bob", "emails": ["bob@example.org"]}]), 0.2)
    broken = DiesMidway(*store_settings(HR, CONFIG))
    result = full_sync(cache, broken, 1.0)
    assert (result.outcome, result.error) == ("failed", "connection reset by peer")
    assert cache.mxid_of("hr", "email", "bob@example.org") == "@bob:example.org"
    assert cache.state("hr")["last_full"]["error"] == "connection reset by peer"


class EmptiedMidway(Store):
    """A source read while someone empties the cache (FLUSHDB) between two batches."""

    kind = "test"

    def __init__(self, settings: StoreConfig, config: Config, cache: Cache) -> None:
        super().__init__(settings, config)
        self.cache = cache

    def enumerate(self) -> Iterator[Identity]:
        for i in range(600):  # more than one batch
            yield self.build_identity(f"p{i}", f"p{i}", f"Person {i}", [("email", f"p{i}@example.org")])
            if i == 550:
                self.cache.r.delete(*self.cache.r.scan_iter(match=f"{self.cache.k.prefix}*"))


def test_a_cache_emptied_during_a_full_sync_fails_it_and_leaves_the_store_incomplete(cache):
    assert cache.incomplete_stores(["hr"]) == ["hr"]
    result = full_sync(cache, EmptiedMidway(*store_settings(HR, CONFIG), cache), 0.2)
    assert result.outcome == "failed" and "emptied while running" in result.error
    cache.initialize()  # as the indexer does before it syncs it in full again
    assert cache.incomplete_stores(["hr"]) == ["hr"]
    people = make_store({"name": "hr", "kind": "file", "path": "/dev/null"}, CONFIG)
    assert full_sync(cache, people, 0.2).outcome == "ok" and cache.incomplete_stores(["hr"]) == []


def test_unreadable_file_fails_the_sync(cache, tmp_path):
    store = make_store({"name": "hr", "kind": "file", "path": str(tmp_path / "missing.yml")}, CONFIG)
    result = full_sync(cache, store, 0.2)
    assert result.outcome == "failed" and "cannot read" in result.error
    (tmp_path / "missing.yml").write_text("people: {}\n")
    assert "expected a YAML list of people" in full_sync(cache, store, 0.2).error


def test_invalid_entries_and_addresses_are_skipped_and_logged(cache, people_file, caplog):
    caplog.set_level(logging.WARNING)
    store = people_file([
        {"localpart": "alice", "emails": ["alice@example.org", "not-an-address"], "phones": ["12"]},
        {"localpart": "bad name"},
        {"display_name": "nobody"},
        {"localpart": "carol", "colour": "blue"},
    ])
    result = full_sync(cache, store, 0.2)
    assert result.outcome == "ok" and cache.count("hr") == 1
    [alice] = cache.get("hr", ["alice"])
    assert alice.threepids == (("email", "alice@example.org"),)
    text = caplog.text
    assert "record alice: email left out" in text and "record alice: msisdn left out" in text
    assert "record bad name skipped" in text
    assert "entry 2 of" in text and "entry 3 of" in text and "colour: unknown key" in text


def test_only_one_indexer_syncs_a_store(cache, people_file):
    store = people_file([{"localpart": "alice"}])
    lock = cache.lock("hr", 30)
    assert lock.acquire(blocking=False)
    with pytest.raises(SyncBusy):
        full_sync(cache, store, 0.2)
    lock.release()
    assert full_sync(cache, store, 0.2).outcome == "ok"


def test_file_store_checks_bcrypt_passwords(people_file):
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()
    store = people_file([{"localpart": "alice", "password": hashed}, {"localpart": "bob"}])
    alice, bob = list(store.enumerate())
    assert store.authenticate(alice, "s3cret") is True
    assert store.authenticate(alice, "wrong") is False
    assert store.authenticate(alice, "") is False
    assert store.authenticate(bob, "anything") is False


def test_identity_records_match_their_schema(cache, people_file):
    alice = {"localpart": "alice", "emails": ["a@example.org"], "phones": ["+447700900123"]}
    full_sync(cache, people_file([alice]), 0.2)
    raw = cached(cache, cache.k.records, "hr", "alice")
    jsonschema.validate(json.loads(raw), load_schema("identity.schema.json"))


# A record as written before roles existed, with the hash it was given then.
OLD_RECORD = ('{"mxid":"@alice:example.org","localpart":"alice","display_name":"Alice","threepids":[{"medium":"email",'
              '"address":"alice@example.org"}],"store":"hr","store_id":"alice",'
              '"hash":"11fdb494483d5564259e1d492408b366987c393fc4e1fd1a6e821191c83ab1a8"}')


def test_records_without_roles_keep_their_hash_and_bytes():
    old = Identity.from_json(OLD_RECORD)
    assert old.roles == ()
    same = Identity.build(mxid="@alice:example.org", localpart="alice", display_name="Alice",
                          threepids=[("email", "alice@example.org")], store="hr", store_id="alice")
    # An upgrade rewrites nobody without roles: same hash (the sync skips them) and the same record.
    assert same.hash == old.hash and same.to_json() == OLD_RECORD
    with_roles = Identity.build(mxid="@alice:example.org", localpart="alice", display_name="Alice",
                                threepids=[("email", "alice@example.org")], store="hr", store_id="alice",
                                roles=["staff", "admins", "staff"])
    assert with_roles.roles == ("admins", "staff") and with_roles.hash != old.hash
    assert Identity.from_json(with_roles.to_json()) == with_roles
    jsonschema.validate(json.loads(with_roles.to_json()), load_schema("identity.schema.json"))


class Versioned(Store):
    """A source that numbers its changes, as a directory's USN or a table's sequence column does."""

    kind = "test"

    def __init__(self) -> None:
        super().__init__(*store_settings(dict(HR, name="dir"), CONFIG))
        self.rows: dict[str, tuple[int, str | None]] = {}  # id -> (sequence, email or None when gone)
        self.sequence = 0
        self.fail_after: int | None = None

    def put(self, store_id: str, email: str | None) -> None:
        self.sequence += 1
        self.rows[store_id] = (self.sequence, email)

    def _identity(self, store_id: str, email: str) -> Identity:
        return self.build_identity(store_id, store_id, None, [("email", email)])

    def enumerate(self) -> Iterator[Identity]:
        for store_id, (_, email) in self.rows.items():
            if email is not None:
                yield self._identity(store_id, email)

    def high_water_mark(self) -> int:
        return self.sequence

    def changes_since(self, mark: int) -> Iterator[Change]:
        for count, (store_id, (seq, email)) in enumerate(sorted(self.rows.items(), key=lambda r: r[1][0])):
            if self.fail_after is not None and count >= self.fail_after:
                raise StoreError("timed out")
            if seq > mark:
                yield Change(store_id, self._identity(store_id, email) if email else None, seq)


def test_incremental_sync_applies_changes_and_advances_the_mark(cache):
    source = Versioned()
    source.put("ann", "ann@example.org")
    source.put("ben", "ben@example.org")
    assert incremental_sync(cache, source) is None  # no mark before the first full sync
    assert full_sync(cache, source, 0.2).outcome == "ok"
    assert cache.state("dir")["high_water_mark"] == 2

    source.put("ann", "ann.new@example.org")
    source.put("cid", "cid@example.org")
    source.put("ben", None)  # disabled: no longer selected
    result = incremental_sync(cache, source)
    assert (result.kind, result.outcome, result.read, result.added, result.changed, result.removed) == (
        "incremental", "ok", 3, 1, 1, 1)
    assert cache.state("dir")["high_water_mark"] == 5
    assert cache.mxid_of("dir", "email", "ann.new@example.org") == "@ann:example.org"
    assert cache.mxid_of("dir", "email", "ann@example.org") is None
    assert cache.mxid_of("dir", "email", "cid@example.org") == "@cid:example.org"
    assert cache.mxid_of("dir", "email", "ben@example.org") is None
    assert cache.state("dir")["last_incremental"]["outcome"] == "ok"
    nothing = incremental_sync(cache, source)
    assert (nothing.read, nothing.added, nothing.changed, nothing.removed) == (0, 0, 0, 0)
    # Records written by an incremental sync belong to the current generation: a full sync keeps them.
    assert full_sync(cache, source, 0.2).removed == 0
    assert cache.mxid_of("dir", "email", "cid@example.org") == "@cid:example.org"


def test_a_failed_incremental_sync_keeps_the_mark(cache):
    source = Versioned()
    source.put("ann", "ann@example.org")
    full_sync(cache, source, 0.2)
    source.put("ben", "ben@example.org")
    source.put("cid", "cid@example.org")
    source.fail_after = 2
    result = incremental_sync(cache, source)
    assert (result.outcome, result.error) == ("failed", "timed out")
    assert cache.state("dir")["high_water_mark"] == 1
    source.fail_after = None
    assert incremental_sync(cache, source).added == 2
    assert cache.state("dir")["high_water_mark"] == 3


def test_status_shows_incremental_runs_only_for_stores_that_list_changes(cache):
    source = Versioned()
    source.put("ann", "ann@example.org")
    cache.set_state("dir", next_full=2000.0, next_incremental=1000.0)
    before = cache.status(["dir"], HostBounds(15, 3600))["stores"]["dir"]
    assert before["identities"] == 0 and before["last_full"] is None and before["last_success"] is None
    assert before["next_incremental"] is None  # no mark yet: the scheduled run would do nothing
    full_sync(cache, source, 0.2)
    after = cache.status(["dir"], HostBounds(15, 3600))["stores"]["dir"]
    assert after["identities"] == 1 and after["last_full"]["outcome"] == "ok"
    assert after["last_success"] == after["last_full"]["ended"]
    assert (after["next_full"], after["next_incremental"]) == (2000.0, 1000.0)


def test_a_mark_left_by_another_kind_fails_cleanly_and_a_full_sync_drops_it(cache, people_file):
    store = people_file([{"localpart": "alice", "emails": ["alice@example.org"]}])
    full_sync(cache, store, 0.2)
    cache.set_state("hr", high_water_mark=42)  # as an ldap store of the same name would have left
    result = incremental_sync(cache, store)
    assert result.outcome == "failed" and "cannot list changes" in result.error
    assert cache.mxid_of("hr", "email", "alice@example.org") == "@alice:example.org"
    assert full_sync(cache, store, 0.2).outcome == "ok"
    assert "high_water_mark" not in cache.state("hr")
    assert incremental_sync(cache, store) is None


def answers(cache: Cache, store: str, medium: str, address: str) -> str | None:
    """The mxid a v1 lookup and a v2 sha256 lookup find in one store's cache for a 3PID; both must agree."""
    plain = cache.mxid_of(store, medium, address)
    hashed = cached(cache, cache.k.hashes, store, lookup_hash(address, medium, "pepper"))
    assert plain == hashed, (address, plain, hashed)
    return plain


@pytest.mark.parametrize("batch", [1, 500])
def test_a_person_deleted_and_created_again_keeps_their_addresses(cache, people_file, monkeypatch, batch):
    monkeypatch.setattr("indexer.sync.BATCH", batch)
    person = {"localpart": "alice", "emails": ["alice@example.org"], "phones": ["+44 7700 900123"]}
    full_sync(cache, people_file([{"id": "old-uuid", **person}, {"id": "b", "localpart": "bob"}]), 0.5)
    # The directory entry was deleted and made again: same user id and addresses, a new stable id.
    store = people_file([{"id": "new-uuid", **person}, {"id": "b", "localpart": "bob"}])
    result = full_sync(cache, store, 0.5)
    assert (result.outcome, result.added, result.removed) == ("ok", 1, 1)
    for _ in range(2):  # and later syncs keep it so
        assert answers(cache, "hr", "email", "alice@example.org") == "@alice:example.org"
        assert answers(cache, "hr", "msisdn", "447700900123") == "@alice:example.org"
        assert cache.identity_by_mxid("hr", "@alice:example.org").store_id == "new-uuid"
        assert full_sync(cache, store, 0.5).outcome == "ok"


def test_a_rename_never_drops_an_address_that_a_live_record_holds(cache, people_file, monkeypatch):
    monkeypatch.setattr("indexer.sync.BATCH", 1)  # the two records are written in separate batches
    full_sync(cache, people_file([{"id": "u1", "localpart": "alice", "emails": ["alice@example.org", "a@example.org"]},
                                  {"id": "u3", "localpart": "carol"}]), 0.5)
    # alice is renamed alicia; a newcomer gets her old user id and address, and is read first.
    result = full_sync(cache, people_file([
        {"id": "u2", "localpart": "alice", "emails": ["alice@example.org"]},
        {"id": "u1", "localpart": "alicia", "emails": ["alicia@example.org", "a@example.org"]},
        {"id": "u3", "localpart": "carol"},
    ]), 0.5)
    assert (result.outcome, result.added, result.changed, result.removed) == ("ok", 1, 1, 0)
    assert answers(cache, "hr", "email", "alice@example.org") == "@alice:example.org"
    assert answers(cache, "hr", "email", "alicia@example.org") == "@alicia:example.org"
    assert answers(cache, "hr", "email", "a@example.org") == "@alicia:example.org"
    assert cache.identity_by_mxid("hr", "@alice:example.org").store_id == "u2"
    assert cache.identity_by_mxid("hr", "@alicia:example.org").store_id == "u1"


def test_an_address_two_records_hold_stays_until_neither_holds_it(cache, people_file):
    both = [{"id": "u1", "localpart": "alice", "emails": ["desk@example.org"]},
            {"id": "u2", "localpart": "bob", "emails": ["desk@example.org"]},
            {"id": "u3", "localpart": "alice"},  # the same user id twice, in two places of a directory
            {"id": "u4", "localpart": "carol"}]
    full_sync(cache, people_file(both), 1.0)
    assert answers(cache, "hr", "email", "desk@example.org") == "@bob:example.org"  # the record written last
    assert sorted(cached_all(cache, cache.k.claims, "hr")) == ["@alice:example.org", "email desk@example.org"]
    full_sync(cache, people_file([p for p in both if p["id"] != "u2"]), 1.0)
    assert answers(cache, "hr", "email", "desk@example.org") == "@alice:example.org"
    full_sync(cache, people_file([p for p in both if p["id"] not in ("u2", "u3")]), 1.0)
    assert cache.identity_by_mxid("hr", "@alice:example.org").store_id == "u1"
    full_sync(cache, people_file([both[3]]), 1.0)
    assert answers(cache, "hr", "email", "desk@example.org") is None
    assert cache.identity_by_mxid("hr", "@alice:example.org") is None
    assert list(cached_all(cache, cache.k.claims, "hr")) == []  # lists are kept only while several records hold


@pytest.mark.parametrize("order", [("a", "b"), ("b", "a")])
def test_a_person_moving_between_stores_keeps_their_addresses(cache, tmp_path, order):
    def store(name: str, people: list[dict]) -> Store:
        path = tmp_path / f"{name}.yml"
        path.write_text(yaml.safe_dump(people))
        return make_store({"name": name, "kind": "file", "path": str(path)}, CONFIG)

    alice = {"id": "u1", "localpart": "alice", "emails": ["alice@example.org"], "phones": ["+44 7700 900123"]}
    others = {"a": [{"localpart": "ann"}], "b": [{"localpart": "ben"}]}
    full_sync(cache, store("a", [alice, *others["a"]]), 0.5)
    full_sync(cache, store("b", others["b"]), 0.5)
    now = {"a": others["a"], "b": [alice, *others["b"]]}
    for name in order:
        full_sync(cache, store(name, now[name]), 0.5)
    assert answers(cache, "b", "email", "alice@example.org") == "@alice:example.org"
    assert answers(cache, "b", "msisdn", "447700900123") == "@alice:example.org"
    assert answers(cache, "a", "email", "alice@example.org") is None
    assert cache.identity_by_mxid("b", "@alice:example.org").store_id == "u1"
    assert cache.identity_by_mxid("a", "@alice:example.org") is None


def test_a_cache_written_before_records_owned_addresses_is_upgraded(cache, people_file):
    alice = {"localpart": "alice", "emails": ["alice@example.org", "desk@example.org"]}
    full_sync(cache, people_file([{"id": "u1", **alice},
                                  {"id": "u2", "localpart": "bob", "emails": ["desk@example.org"]},
                                  {"id": "u3", "localpart": "carol"}]), 0.5)
    # As an older version left it: no claim lists, desk@ answered by alice.
    cache.r.delete(*(cache.k.claims("hr", bucket) for bucket in range(cache.k.spread("hr"))))
    cache.r.hdel(cache.k.state("hr"), "claims")
    field = "desk@example.org email"
    cache.r.hset(cache.k.threepids("hr", cache.k.bucket("hr", field)), field, "@alice:example.org")
    result = full_sync(cache, people_file([
        {"id": "u9", **alice}, {"id": "u2", "localpart": "bob", "emails": ["desk@example.org"], "display_name": "Bob"},
        {"id": "u3", "localpart": "carol"}]), 0.5)
    assert (result.added, result.changed, result.removed) == (1, 1, 1)
    assert answers(cache, "hr", "email", "alice@example.org") == "@alice:example.org"
    assert answers(cache, "hr", "email", "desk@example.org") == "@bob:example.org"
    full_sync(cache, people_file([{"id": "u9", **alice}, {"id": "u3", "localpart": "carol"}]), 0.5)
    assert answers(cache, "hr", "email", "desk@example.org") == "@alice:example.org"


class Scripted(Store):
    """People changed by a test, listing its changes in the order they were made, as a directory
    with a USN does (deletions included)."""

    kind = "test"

    def __init__(self, people: dict[str, dict]) -> None:
        super().__init__(*store_settings(HR, CONFIG))
        self.people = people
        self.changed: dict[str, int] = {}
        self.sequence = 0
        self.order: list[str] = []

    def touch(self, store_id: str) -> None:
        self.sequence += 1
        self.changed[store_id] = self.sequence

    def _identity(self, store_id: str) -> Identity | None:
        return self.person_identity(store_id, self.people[store_id])

    def enumerate(self) -> Iterator[Identity]:
        for store_id in self.order:
            if (identity := self._identity(store_id)) is not None:
                yield identity

    def high_water_mark(self) -> int:
        return self.sequence

    def changes_since(self, mark: int) -> Iterator[Change]:
        for store_id, sequence in sorted(self.changed.items(), key=lambda c: c[1]):
            if sequence > mark:
                yield Change(store_id, self._identity(store_id) if store_id in self.people else None, sequence)


@pytest.mark.parametrize("seed", [15, 16, 17])
def test_lookups_answer_exactly_what_live_records_hold_through_random_changes(cache, monkeypatch, seed):
    """Deletions, re-creations under new ids, renames and shared addresses and Matrix IDs, in random
    batches of full and incremental syncs: after every sync, each address and Matrix ID a record
    holds answers with a record that holds it, and nothing else answers."""
    rng = random.Random(seed)
    names, addresses = ["ann", "ben", "cid", "dee", "eve"], [f"a{i}@example.org" for i in range(8)]
    people: dict[str, dict] = {}
    source = Scripted(people)
    any_deletes = store_settings(dict(HR, sync={"max_delete_ratio": 1.0}), CONFIG)[0].sync
    next_id = 0
    for _ in range(40):
        monkeypatch.setattr("indexer.sync.BATCH", rng.choice([1, 2, 500]))
        for _ in range(rng.randint(1, 4)):
            action = rng.random()
            if action < 0.4 or not people:
                next_id += 1
                people[f"id{next_id}"] = {"localpart": rng.choice(names),
                                          "emails": rng.sample(addresses, rng.randint(0, 3))}
                source.touch(f"id{next_id}")
            elif action < 0.6:
                gone = rng.choice(sorted(people))
                del people[gone]
                source.touch(gone)
            elif action < 0.8:  # deleted and created again: the same person under a new id
                old = rng.choice(sorted(people))
                next_id += 1
                people[f"id{next_id}"] = people.pop(old)
                source.touch(old)
                source.touch(f"id{next_id}")
            else:
                changed = rng.choice(sorted(people))
                people[changed] = {"localpart": rng.choice(names), "emails": rng.sample(addresses, rng.randint(0, 3))}
                source.touch(changed)
        source.order = sorted(people, key=lambda _: rng.random())
        if rng.random() < 0.5:
            assert full_sync(cache, source, 1.0).outcome == "ok"
        else:
            assert sync_store(cache, source, any_deletes, False).outcome == "ok"
        holders: dict[str, set[str]] = {}
        for person in people.values():
            for address in person["emails"]:
                holders.setdefault(address, set()).add(f"@{person['localpart']}:example.org")
        for address in addresses:
            answer = answers(cache, "hr", "email", address)
            assert (answer in holders[address]) if address in holders else answer is None, (address, people)
        mxids = cached_all(cache, cache.k.mxids, "hr")
        assert set(mxids) == {f"@{p['localpart']}:example.org" for p in people.values()}
        for mxid, store_id in mxids.items():
            assert f"@{people[store_id]['localpart']}:example.org" == mxid
        # Lists of holders are kept exactly for what several records hold.
        shared: dict[str, set[str]] = {}
        for store_id, person in people.items():
            for claim in [f"@{person['localpart']}:example.org"] + [f"email {a}" for a in person["emails"]]:
                shared.setdefault(claim, set()).add(store_id)
        listed = {k: set(json.loads(v)) for k, v in cached_all(cache, cache.k.claims, "hr").items()}
        assert listed == {claim: ids for claim, ids in shared.items() if len(ids) > 1}


def test_a_cache_written_with_other_buckets_is_refused(rclient, prefix):
    """The number of buckets is recorded with the epoch: another one would read the wrong keys. A
    cache written before buckets existed counts as one bucket."""
    Cache(rclient, prefix, 8).initialize()
    assert Cache(rclient, prefix, 8).initialize()
    with pytest.raises(ConfigError, match="written with 8 bucket"):
        Cache(rclient, prefix, 1).initialize()
    rclient.delete(RedisKeys(prefix).bucket_count)
    assert Cache(rclient, prefix).initialize()
    with pytest.raises(ConfigError, match="written with 1 bucket"):
        Cache(rclient, prefix, 64).initialize()


def test_a_batch_failing_part_way_over_buckets_is_repaired_by_the_next_sync(rclient, prefix, people_file,
                                                                             monkeypatch):
    """With several buckets (a Redis Cluster) a batch is written in steps: one that fails after the
    lookup keys leaves the records as they were, and the next sync writes them again."""
    cache = Cache(rclient, prefix, 8)
    cache.initialize(pepper="pepper")
    both = [{"id": "u1", "localpart": "alice", "emails": ["desk@example.org"]},
            {"id": "u2", "localpart": "bob", "emails": ["desk@example.org", "bob@example.org"]},
            {"id": "u3", "localpart": "carol", "emails": ["carol@example.org"]}]
    full_sync(cache, people_file(both), 1.0)
    assert answers(cache, "hr", "email", "desk@example.org") == "@bob:example.org"
    # bob gives up desk@, which alice still holds.
    moved = [both[0], {"id": "u2", "localpart": "bob", "emails": ["bob@example.net"]}, both[2]]
    monkeypatch.setattr("indexer.claims._RECORDS", "return redis.error_reply('ERR a master was lost')")
    assert full_sync(cache, people_file(moved), 1.0).outcome == "failed"
    assert changes(cache) == [("u1", "upsert"), ("u2", "upsert"), ("u3", "upsert")]  # nothing announced
    assert ("email", "bob@example.org") in cache.get("hr", ["u2"])[0].threepids  # the record as it was
    monkeypatch.undo()
    result = full_sync(cache, people_file(moved), 1.0)
    assert (result.outcome, result.changed) == ("ok", 1)
    assert answers(cache, "hr", "email", "desk@example.org") == "@alice:example.org"
    assert answers(cache, "hr", "email", "bob@example.org") is None
    assert answers(cache, "hr", "email", "bob@example.net") == "@bob:example.org"
    full_sync(cache, people_file(moved[1:]), 1.0)
    assert answers(cache, "hr", "email", "desk@example.org") is None
    assert cached_all(cache, cache.k.claims, "hr") == {}


_texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)


@settings(max_examples=300, deadline=None)
@given(_texts, _texts, st.none() | _texts, st.lists(st.tuples(_texts, _texts), max_size=3), _texts,
       st.lists(_texts, max_size=3))
def test_identity_json_is_what_json_dumps_gives(user, store_id, name, threepids, store, roles):
    # Identity writes its hashed body and its record directly; they must stay byte for byte what
    # json.dumps gave, or every cached record would be rewritten (and its lookups re-claimed).
    identity = Identity.build(mxid=f"@{user}:example.org", localpart=user, display_name=name, threepids=threepids,
                              store=store, store_id=store_id, roles=roles)
    body: dict[str, Any] = {"mxid": identity.mxid, "localpart": user, "display_name": name,
                            "threepids": [list(t) for t in sorted(set(threepids))], "store": store,
                            "store_id": store_id}
    record = {**body, "threepids": identity.threepid_objects(), "hash": identity.hash}
    if identity.roles:
        body["roles"] = record["roles"] = list(identity.roles)
    hashed = json.dumps(body, sort_keys=True, ensure_ascii=False).encode()
    assert identity.hash == hashlib.sha256(hashed).hexdigest()
    assert identity.to_json() == json.dumps(record, ensure_ascii=False, separators=(",", ":"))
    assert Identity.from_json(identity.to_json()) == identity
