"""The rest store against a small HTTP service run by the test: sync by pages, changes, password
checks, faults, and read-through lookups through a real server."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from indexer.cache import Cache
from indexer.config import ConfigError, load_config
from indexer.normalize import lookup_hash
from indexer.stores import StoreUnavailable
from indexer.sync import full_sync, incremental_sync
from tests.conftest import cached, make_store, wait_until

CONFIG = {"matrix": {"domain": "example.org"}, "threepids": {"msisdn": {"default_region": "GB"}}}
AUTH = "/_mxisd/backend/api/v1/auth/login"
LOOKUP = "/_mxisd/backend/api/v1/identity/single"


class Service:
    """A web application speaking the REST store protocol, with faults on demand."""

    def __init__(self) -> None:
        self.people: list[dict[str, Any]] = []
        self.changes: list[dict[str, Any]] = []  # {id, mark, identity}
        self.passwords: dict[str, str] = {}  # mxid -> password
        self.directory: dict[tuple[str, str], dict[str, str]] = {}  # (medium, address) -> id {type, value}
        self.fault: dict[str, str] = {}  # path -> "garbage" | "error" | "slow" | "loop" | "shape"
        self.delay = 0.0
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.lock = threading.Lock()
        service = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with service.lock:
                    service.requests.append((self.path, body))
                    fault = service.fault.get(self.path)
                if self.headers.get("Authorization") != "Bearer app-token":
                    return self.reply(401, {"error": "unauthorised"})
                if fault == "slow" or self.path == LOOKUP:
                    time.sleep(service.delay if fault != "slow" else 5)
                if fault == "error":
                    return self.reply(500, {"error": "boom"})
                if fault == "garbage":
                    return self.reply(200, b"<html>Service Unavailable</html>")
                if fault == "shape":
                    return self.reply(200, {"people": "nope", "lookup": {"id": 42}, "auth": "yes"})
                self.reply(200, service.answer(self.path, body, fault))

            def reply(self, status: int, body: Any) -> None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def answer(self, path: str, body: dict[str, Any], fault: str | None) -> Any:
        if path == "/people":
            start = int(body["cursor"] or 0)
            page = self.people[start:start + body["limit"]]
            more = start + body["limit"] < len(self.people)
            return {"identities": page, "next_cursor": ("0" if fault == "loop" else str(start + body["limit"]))
                    if more else None}
        if path == "/changes":
            mark = max([c["mark"] for c in self.changes if isinstance(c["mark"], int)], default=0)
            newer = [c for c in self.changes if body["since"] is not None
                     and not (isinstance(c["mark"], int) and c["mark"] <= body["since"])]
            start = int(body["cursor"] or 0)
            page = newer[start:start + body["limit"]]
            more = start + body["limit"] < len(newer)
            return {"changes": page, "next_cursor": str(start + body["limit"]) if more else None,
                    "high_water_mark": mark}
        if path == AUTH:
            auth = body["auth"]
            return {"auth": {"success": self.passwords.get(auth["mxid"]) == auth["password"],
                             "id": {"type": "mxid", "value": auth["mxid"]}}}
        if path == LOOKUP:
            query = body["lookup"]
            found = self.directory.get((query["medium"], query["address"]))
            return {"lookup": {**query, "id": found}} if found else {}
        return {}

    def asked(self, path: str) -> list[dict[str, Any]]:
        with self.lock:
            return [b for p, b in self.requests if p == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def service() -> Iterator[Service]:
    s = Service()
    yield s
    s.close()


@pytest.fixture
def cache(rclient, prefix):
    c = Cache(rclient, prefix)
    c.initialize(pepper="pepper")
    return c


def store_config(service: Service, **endpoints: Any) -> dict[str, Any]:
    return {"name": "app", "kind": "rest", "url": service.url, "headers": {"Authorization": "Bearer app-token"},
            "timeout": "2s", "page_size": 2,
            "endpoints": {"auth": AUTH, "lookup": LOOKUP, "enumerate": "/people", "changes": "/changes", **endpoints}}


@pytest.fixture
def rest_store(service):
    stores = []

    def make(**endpoints: Any):
        store = make_store(store_config(service, **endpoints), CONFIG)
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


def person(i: int, **extra: Any) -> dict[str, Any]:
    return {"id": f"u{i}", "localpart": f"user{i}", "display_name": f"User {i}", "emails": [f"user{i}@example.org"],
            **extra}


def test_full_sync_reads_every_page(cache, service, rest_store):
    service.people = [person(i) for i in range(5)] + [{"display_name": "no user id"}, "not an object"]
    service.people[1]["phones"] = ["07700 900123"]
    result = full_sync(cache, rest_store(), 0.2)
    assert (result.outcome, result.read, result.added) == ("ok", 5, 5)
    assert [b["cursor"] for b in service.asked("/people")] == [None, "2", "4", "6"]
    assert cache.mxid_of("app", "msisdn", "447700900123") == "@user1:example.org"
    hashed = lookup_hash("user4@example.org", "email", "pepper")
    assert cached(cache, cache.k.hashes, "app", hashed) == "@user4:example.org"


def test_incremental_sync_applies_changes_and_deletions(cache, service, rest_store):
    service.people = [person(i) for i in range(4)]
    service.changes = [{"id": "u0", "mark": 1, "identity": person(0)}]
    store = rest_store()
    assert full_sync(cache, store, 0.5).outcome == "ok"
    assert cache.state("app")["high_water_mark"] == 1

    service.changes += [
        {"id": "u1", "mark": 2, "identity": person(1, display_name="Renamed")},
        {"id": "u2", "mark": 3, "identity": None},
        {"id": "u9", "mark": 4, "identity": person(9)},
    ]
    result = incremental_sync(cache, store)
    assert (result.outcome, result.added, result.changed, result.removed) == ("ok", 1, 1, 1)
    assert cache.get("app", ["u1"])[0].display_name == "Renamed"
    assert cache.mxid_of("app", "email", "user2@example.org") is None
    assert cache.mxid_of("app", "email", "user9@example.org") == "@user9:example.org"
    assert cache.state("app")["high_water_mark"] == 4


@pytest.mark.parametrize("fault, error", [
    ("garbage", "enumerate endpoint /people: the body is not JSON"),
    ("error", "enumerate endpoint /people: HTTP 500"),
    ("slow", "enumerate endpoint /people: ReadTimeout"),
    ("loop", "enumerate endpoint: cursor '0' came back a second time"),
    ("shape", 'enumerate endpoint: expected {"identities": [...], "next_cursor": string or null}'),
])
def test_a_broken_service_keeps_the_cache(cache, service, rest_store, fault, error):
    service.people = [person(i) for i in range(5)]
    store = rest_store()
    assert full_sync(cache, store, 0.5).outcome == "ok"
    service.people = service.people[:3]  # two pages, and most people gone
    service.fault["/people"] = fault
    result = full_sync(cache, store, 1.0)
    assert result.outcome == "failed" and result.error.startswith(error)
    assert cache.count("app") == 5 and cache.mxid_of("app", "email", "user4@example.org") == "@user4:example.org"


def test_changes_with_garbage_keep_the_mark(cache, service, rest_store):
    service.people = [person(0)]
    service.changes = [{"id": "u0", "mark": 1, "identity": person(0)}]
    store = rest_store()
    full_sync(cache, store, 0.5)
    service.changes.append({"id": "u1", "mark": "2", "identity": person(1)})  # a string mark among integers
    result = incremental_sync(cache, store)
    assert result.outcome == "failed" and "expected {\"id\", \"mark\" (like 1)" in result.error
    assert cache.state("app")["high_water_mark"] == 1 and cache.count("app") == 1


def test_password_checks_ask_the_auth_endpoint(service, rest_store, caplog):
    service.people = [person(1)]
    service.passwords["@user1:example.org"] = "s3cret"
    store = rest_store()
    [user] = store.enumerate()
    assert store.authenticate(user, "s3cret") is True
    assert store.authenticate(user, "wrong") is False
    assert service.asked(AUTH)[0] == {"auth": {"mxid": "@user1:example.org", "localpart": "user1",
                                               "domain": "example.org", "password": "s3cret"}}
    # An auth endpoint that fails or answers what is not JSON has not checked the password: the
    # login is unavailable (503, counted against nobody), not refused.
    for fault in ("garbage", "error"):
        service.fault[AUTH] = fault
        with pytest.raises(StoreUnavailable):
            store.authenticate(user, "s3cret")
    assert "cannot check the password of @user1:example.org" in caplog.text
    service.fault[AUTH] = "shape"
    assert store.authenticate(user, "s3cret") is False
    assert "s3cret" not in caplog.text
    assert "login for @user1:example.org refused" in caplog.text


def test_read_through_lookups_cache_hits_and_misses(make_server, service, homeserver, mailbox):
    service.directory[("email", "ann@example.org")] = {"type": "localpart", "value": "ann"}
    service.directory[("msisdn", "447700900123")] = {"type": "mxid", "value": "@ann:example.org"}
    service.delay = 1.0
    server = make_server()
    server.config["invites"] = {"known_address_delay": "1s"}
    rest = store_config(service, enumerate=None, changes=None)
    rest["read_through"] = {"ttl": "1h", "miss_ttl": "2s"}
    server.config["stores"].append(rest)
    server.start()

    # Ten clients ask for the same unknown address at once: the service is asked once.
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda _: server.lookup_v1("email", "ANN@example.org"), range(10)))
    assert {a["mxid"] for a in answers} == {"@ann:example.org"}
    assert len(service.asked(LOOKUP)) == 1
    assert service.asked(LOOKUP)[0] == {"lookup": {"medium": "email", "address": "ann@example.org"}}
    assert server.lookup_v1("email", "ann@example.org")["mxid"] == "@ann:example.org"
    assert len(service.asked(LOOKUP)) == 1  # cached for the ttl

    # Misses are remembered for miss_ttl, then asked again.
    assert server.lookup_v1("email", "nobody@example.org") == {}
    assert server.lookup_v1("email", "nobody@example.org") == {}
    assert len(service.asked(LOOKUP)) == 2
    service.directory[("email", "nobody@example.org")] = {"type": "localpart", "value": "somebody"}
    time.sleep(2.5)
    assert server.lookup_v1("email", "nobody@example.org")["mxid"] == "@somebody:example.org"

    # Synced stores answer first; bulk and v2 "none" lookups read through too.
    bulk = server.http.post("/_matrix/identity/api/v1/bulk_lookup", json={"threepids": [
        ["email", "alice@example.com"], ["msisdn", "447700900123"], ["email", "ann@example.org"]]}).json()
    assert bulk["threepids"] == [["email", "alice@example.com", "@alice:example.org"],
                                 ["msisdn", "447700900123", "@ann:example.org"],
                                 ["email", "ann@example.org", "@ann:example.org"]]
    auth = server.auth()
    pepper = server.http.get("/_matrix/identity/v2/hash_details", headers=auth).json()["lookup_pepper"]
    plain = server.http.post("/_matrix/identity/v2/lookup", headers=auth, json={
        "algorithm": "none", "pepper": pepper, "addresses": ["ann@example.org email"]}).json()
    assert plain == {"mappings": {"ann@example.org email": "@ann:example.org"}}
    # A hash cannot be sent to the service: sha256 lookups answer from synced stores alone.
    hashed = lookup_hash("ann@example.org", "email", pepper)
    assert server.http.post("/_matrix/identity/v2/lookup", headers=auth, json={
        "algorithm": "sha256", "pepper": pepper, "addresses": [hashed]}).json() == {"mappings": {}}
    # So a homeserver that looked Ann up that way stores an invite for her: it reaches her by onbind, not by email.
    stored = server.http.post("/_matrix/identity/v2/store-invite", headers=auth, json={
        "medium": "email", "address": "ann@example.org", "room_id": "!room:example.org",
        "sender": "@tester:example.org"})
    assert stored.status_code == 200, stored.text
    [onbind] = wait_until(lambda: homeserver.onbinds("ann@example.org"), what="the onbind for Ann")
    assert onbind["mxid"] == "@ann:example.org"
    assert [i["token"] for i in onbind["invites"]] == [stored.json()["token"]]
    assert mailbox.messages == []


def test_read_through_failures_answer_not_found_and_are_not_cached(make_server, service):
    service.directory[("email", "ann@example.org")] = {"type": "localpart", "value": "ann"}
    server = make_server()
    server.config["stores"].append(store_config(service, enumerate=None, changes=None))
    server.start()
    for fault in ("slow", "garbage", "error", "shape"):
        service.fault[LOOKUP] = fault
        response = server.http.get("/_matrix/identity/api/v1/lookup",
                                   params={"medium": "email", "address": "ann@example.org"})
        assert (response.status_code, response.json()) == (200, {})
    service.fault.clear()
    assert server.lookup_v1("email", "ann@example.org")["mxid"] == "@ann:example.org"
    assert len(service.asked(LOOKUP)) == 5
    log = server.log()
    assert "store app: email lookup failed, answered not found and not cached: ReadTimeout" in log
    assert "ann@example.org" not in log


@pytest.mark.parametrize("store, message", [
    ({}, "stores[0].url: missing required key"),
    ({"url": "ftp://app"}, 'stores[0].url: expected an http:// or https:// URL, got "ftp://app"'),
    ({"url": "http://app", "endpoints": {"search": "/x"}}, "stores[0].endpoints.search: unknown key"),
    ({"url": "http://app", "read_through": {"ttl": 60}},
     'stores[0].read_through.ttl: expected a duration like "1h", got 60'),
    ({"url": "http://app", "headers": {"X-Token": 5}}, "stores[0].headers.X-Token: expected string, got 5"),
])
def test_config_mistakes_name_the_key(tmp_path, store, message):
    path = tmp_path / "config.yml"
    path.write_text(json.dumps({"matrix": {"domain": "example.org"},
                                "stores": [{"name": "app", "kind": "rest", **store}]}))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value) == message


def test_roles_from_the_service_reach_the_internal_profile(make_server, service):
    service.people = [{"id": "1", "localpart": "ann", "emails": ["ann@example.org"], "roles": ["inviters", "staff"]},
                      {"id": "2", "localpart": "ben", "roles": ["staff"]}]
    server = make_server([])
    server.config["stores"] = [dict(store_config(service), sync={"full_every": "6h", "changes_every": None})]
    server.start()

    def roles_of(mxid: str) -> list[str] | None:
        response = server.http.get(f"/_matrix-internal/profile/v1/{mxid}")
        return response.json()["roles"] if response.status_code == 200 else None

    assert wait_until(lambda: roles_of("@ann:example.org"), 60, "the first sync") == ["inviters", "staff"]
    assert roles_of("@ben:example.org") == ["staff"]
    # A changed person comes with their roles as they are now.
    service.people[0]["roles"] = ["staff"]
    service.changes = [{"id": "1", "mark": 7, "identity": service.people[0]}]
    done = server.cli("index")
    assert done.returncode == 0 and "incremental sync" in done.stderr, done.stdout + done.stderr
    assert roles_of("@ann:example.org") == ["staff"]
    service.people[1]["roles"] = []
    done = server.cli("index", "--full")
    assert done.returncode == 0, done.stdout + done.stderr
    assert roles_of("@ben:example.org") == []
    assert roles_of("@ann:example.org") == ["staff"]
