"""Recursive lookups against `mxisd run`: a second instance of our server as the other
organisation's identity server, found through a DNS server of the test's own; misbehaving remotes
(garbage, hanging, bad signature), the requester's network, forwarders and bridges."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import redis
from signedjson.key import decode_verify_key_bytes, encode_verify_key_base64, generate_signing_key, get_verify_key
from signedjson.sign import sign_json, verify_signed_json
from unpaddedbase64 import decode_base64

from indexer.cache import Cache
from indexer.normalize import lookup_hash
from tests.conftest import V1, V2, wait_until
from tests.test_federation import TinyDns
from tests.test_health_metrics import scrape

PAT = "@pat:other.example"


class FakeIdentityServer:
    """An identity server on 127.0.0.1 answering v1 lookups in one of several ways: "good" (a signed
    association for `known`), "garbage", "hang", "bad_signature"; v2 needs a token it never gives,
    except in mode "v2", where v2 sha256 lookups are open and v1 is gone."""

    def __init__(self, mode: str, known: dict[str, str]) -> None:
        self.mode = mode
        self.known = known
        self.asked: list[str] = []
        self.key = generate_signing_key("0")
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def answer(self, status: int, body: Any) -> None:
                raw = body if isinstance(body, bytes) else json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up on a hanging answer

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                if fake.mode != "v2" or self.path != V2 + "/lookup" or body.get("pepper") != "open":
                    self.answer(401, {"errcode": "M_UNAUTHORIZED", "error": "token needed"})
                    return
                fake.asked.extend(body["addresses"])
                hashes = {lookup_hash(a, "email", "open"): mxid for a, mxid in fake.known.items()}
                self.answer(200, {"mappings": {h: hashes[h] for h in body["addresses"] if h in hashes}})

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                if fake.mode == "v2" and url.path == V2 + "/hash_details":
                    self.answer(200, {"algorithms": ["sha256"], "lookup_pepper": "open"})
                elif fake.mode == "v2":
                    self.answer(404, {"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"})
                elif url.path == "/_matrix/identity/api/v1/pubkey/ed25519:0":
                    self.answer(200, {"public_key": encode_verify_key_base64(get_verify_key(fake.key))})
                elif url.path == V1 + "/lookup":
                    query = {k: v[0] for k, v in parse_qs(url.query).items()}
                    fake.asked.append(query["address"])
                    fake.respond(self, query["medium"], query["address"])
                else:
                    self.answer(401, {"errcode": "M_UNAUTHORIZED", "error": "token needed"})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def respond(self, handler: Any, medium: str, address: str) -> None:
        mxid = self.known.get(address)
        if self.mode == "garbage":
            handler.answer(200, b"<html>not json")
        elif self.mode == "hang":
            time.sleep(15)
            handler.answer(200, {})
        elif mxid is None:
            handler.answer(200, {})
        else:
            now = int(time.time() * 1000)
            association = {"address": address, "medium": medium, "mxid": mxid, "not_before": now,
                           "not_after": now + 3600_000, "ts": now}
            key = self.key if self.mode == "good" else generate_signing_key("0")
            handler.answer(200, sign_json(association, "id.fake.example", key))

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fakes():
    made: list[FakeIdentityServer] = []

    def make(mode: str, known: dict[str, str]) -> FakeIdentityServer:
        made.append(FakeIdentityServer(mode, known))
        return made[-1]

    yield make
    for fake in made:
        fake.close()


@pytest.fixture
def dns():
    server = TinyDns({})
    yield server
    server.close()


@pytest.fixture
def peer(make_server, prefix):
    """The other organisation's identity server: our server with its own people, prefix and key."""
    srv = make_server(people=[{"localpart": "pat", "emails": ["pat@other.example"]}])
    srv.config["matrix"]["domain"] = "other.example"
    srv.config["server"]["name"] = "id.other.example"
    srv.config["redis"]["prefix"] = prefix + "peer:"
    srv.start()
    wait_until(lambda: srv.lookup_v1("email", "pat@other.example").get("mxid"), what="the peer's first sync")
    return srv


@pytest.fixture
def server(make_server, redis_url, prefix, dns):
    srv = make_server()
    srv.config["recursion"] = {"allow": ["127.0.0.0/8"], "resolvers": [f"127.0.0.1:{dns.port}"], "scheme": "http",
                               "budget_s": 3}
    srv.config["federation"]["timeout_s"] = 2
    Cache(redis.Redis.from_url(redis_url, decode_responses=True), prefix).initialize(pepper="matrixrocks")
    return srv


def srv_record(port: int) -> str:
    return f"0 0 {port} 127.0.0.1."


def started(srv):
    srv.start()
    wait_until(lambda: srv.lookup_v1("email", "alice@example.com").get("mxid"), what="the first sync")
    return srv


def test_lookup_of_another_organisation_through_dns(server, peer, dns, homeserver, mailbox):
    dns.srv["_matrix-identity._tcp.other.example"] = srv_record(peer.port)
    started(server)
    answer = server.lookup_v1("email", "Pat@Other.Example")
    assert answer["mxid"] == PAT and answer["address"] == "pat@other.example"
    ours = server.http.get(V2 + "/pubkey/ed25519:0").json()["public_key"]
    verify_signed_json(answer, "id.example.org", decode_verify_key_bytes("ed25519:0", decode_base64(ours)))
    assert "id.other.example" not in answer["signatures"]

    bulk = server.http.post(V1 + "/bulk_lookup", json={"threepids": [
        ["email", "pat@other.example"], ["email", "nobody@other.example"], ["email", "alice@example.com"]]}).json()
    assert bulk == {"threepids": [["email", "pat@other.example", PAT],
                                  ["email", "alice@example.com", "@alice:example.org"]]}
    v2 = server.http.post(V2 + "/lookup", headers=server.auth(), json={
        "algorithm": "none", "pepper": "matrixrocks", "addresses": ["pat@other.example email"]})
    assert v2.json()["mappings"] == {"pat@other.example email": PAT}

    invite = server.http.post(V2 + "/store-invite", headers=server.auth(), json={
        "medium": "email", "address": "pat@other.example", "room_id": "!r:example.org", "sender": "@tester:example.org"})
    # A homeserver's hashed lookup never recurses, so it missed Pat: the invite goes to Pat by onbind, not by email.
    assert invite.status_code == 200 and invite.json()["token"]
    wait_until(lambda: f"queued for delivery to {PAT}" in server.log(), what="the onbind queued for Pat")
    assert mailbox.messages == []

    # Answers are remembered: the peer gone, the same lookup is still answered.
    assert peer.stop() == 0
    assert server.lookup_v1("email", "pat@other.example")["mxid"] == PAT
    # Our own domain is never asked elsewhere.
    assert "_matrix-identity._tcp.example.org" not in dns.queries
    # Answers found at another identity server are counted as such: v1, bulk, v2 and the remembered one.
    assert scrape(server).get(("mxisd_lookups_total", (("source", "federation"),))) == 4


def test_a_requester_outside_the_networks_gets_no_recursion(server, peer, dns):
    dns.srv["_matrix-identity._tcp.other.example"] = srv_record(peer.port)
    server.config["recursion"]["allow"] = ["10.1.2.3/32"]
    started(server)
    forwarded = {"X-Forwarded-For": "10.1.2.3"}
    assert server.http.get(V1 + "/lookup", headers=forwarded,
                           params={"medium": "email", "address": "pat@other.example"}).json() == {}
    assert dns.queries == []
    server.stop()
    server.config["recursion"]["proxies"] = ["127.0.0.1/32"]  # now we sit behind a proxy that says who asks
    server.start()
    assert server.http.get(V1 + "/lookup", headers=forwarded,
                           params={"medium": "email", "address": "pat@other.example"}).json()["mxid"] == PAT
    other = {"X-Forwarded-For": "10.1.2.4"}
    assert server.http.get(V1 + "/lookup", headers=other,
                           params={"medium": "email", "address": "pat@other.example"}).json() == {}


def test_misbehaving_remotes_are_contained(server, dns, fakes):
    known = {"q@garbage.example": "@q:garbage.example", "q@hang.example": "@q:hang.example",
             "q@forged.example": "@q:forged.example", "q@good.example": "@q:good.example"}
    for mode, domain in (("garbage", "garbage.example"), ("hang", "hang.example"),
                         ("bad_signature", "forged.example"), ("good", "good.example")):
        dns.srv[f"_matrix-identity._tcp.{domain}"] = srv_record(fakes(mode, known).port)
    server.config["federation"]["timeout_s"] = 10  # longer than the budget: the budget cuts the hang short
    started(server)
    for address in ("q@garbage.example", "q@hang.example", "q@forged.example"):
        assert server.lookup_v1("email", address) == {}, address
    # All at once, the hanging one does not keep the others from being answered.
    bulk = server.http.post(V1 + "/bulk_lookup", json={"threepids": [
        ["email", "q@hang.example"], ["email", "q@good.example"], ["email", "q@forged.example"]]}).json()
    assert bulk == {"threepids": [["email", "q@good.example", "@q:good.example"]]}
    log = server.log()
    assert "the signature does not verify" in log and "missed the 3.0 s budget" in log and "no JSON object" in log


def test_forwarders_are_off_by_default_and_bridges_answer_last(server, dns, fakes, rclient, prefix):
    forwarder = fakes("good", {"r@elsewhere.example": "@r:elsewhere.example"})
    bridge = fakes("good", {"447700900123": "@sms-bridge:example.org"})
    started(server)
    assert server.lookup_v1("email", "r@elsewhere.example") == {}
    assert forwarder.asked == []
    assert server.lookup_v1("msisdn", "447700900123") == {}
    server.stop()
    rclient.delete(*rclient.keys(f"{prefix}remote:*"))  # forget the remembered misses
    server.config["recursion"]["forwarders"] = [forwarder.url]
    server.config["recursion"]["bridges"] = {"msisdn": bridge.url}
    server.start()
    assert server.lookup_v1("email", "r@elsewhere.example")["mxid"] == "@r:elsewhere.example"
    assert server.lookup_v1("msisdn", "447700900123")["mxid"] == "@sms-bridge:example.org"


def test_a_remote_open_to_v2_lookups_is_asked_by_hash(server, dns, fakes):
    remote = fakes("v2", {"s@v2.example": "@s:v2.example"})
    dns.srv["_matrix-identity._tcp.v2.example"] = srv_record(remote.port)
    started(server)
    assert server.lookup_v1("email", "s@v2.example")["mxid"] == "@s:v2.example"
    assert remote.asked == [lookup_hash("s@v2.example", "email", "open")]  # the address itself never sent
    assert server.lookup_v1("email", "t@v2.example") == {}
