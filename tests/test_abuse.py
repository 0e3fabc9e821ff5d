"""Hostile clients against `mxisd run` over real HTTP (issue 14): spoofed invite mail, limits walked
around with X-Forwarded-For or concurrent bursts, patterns passing a trailing newline, recursion
from clients not allowed to, internationalised and control-character addresses, slow federation
peers, private addresses inside IPv6 ones, and forged log lines."""

from __future__ import annotations

import json
import socket
import sqlite3
import ssl
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import redis

from indexer.cache import Cache
from tests.conftest import V1, V2, free_port, started, wait_until
from tests.fakes import Mailbox
from tests.test_federation import TinyDns

INVITER = "@tester:example.org"
ROOM = "!room:example.org"


@pytest.fixture
def server(make_server, redis_url, prefix):
    srv = make_server()
    srv.config["server"]["public_url"] = srv.url
    Cache(redis.Redis.from_url(redis_url, decode_responses=True), prefix).initialize(pepper="matrixrocks")
    return srv


def store_invite(srv, address, sender=INVITER, headers=None, **extra):
    body = {"medium": "email", "address": address, "room_id": ROOM, "sender": sender, **extra}
    return srv.http.post(V1 + "/store-invite", json=body, headers=headers)


def request_token(srv, address, secret="s3cret", prefix=V2, headers=None):
    return srv.http.post(prefix + "/validate/email/requestToken", json={
        "client_secret": secret, "email": address, "send_attempt": 1},
        headers={**(headers or {}), **(srv.auth() if prefix == V2 else {})})


def error_of(response: httpx.Response) -> tuple[int, str]:
    return response.status_code, response.json().get("errcode")


def stored_invites(srv) -> int:
    with sqlite3.connect(srv.root / "data" / "mxisd.sqlite3") as db:
        return db.execute("SELECT count(*) FROM invites").fetchone()[0]


def burst(count: int, send: Callable[[int], httpx.Response]) -> list[httpx.Response]:
    """count requests sent at once, each from a thread of its own, all released together."""
    gate = threading.Barrier(count)

    def one(i: int) -> httpx.Response:
        gate.wait()
        return send(i)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


# -- 1. mail content comes from the config and the template only ------------------------------------


def test_invite_fields_cannot_set_sender_recipient_subject_or_headers(server, mailbox):
    started(server)
    response = store_invite(
        server, "victim@corp.example",
        from_name="Bank Security Team", from_email="security@bank.test", recipient_address="ceo@victim.test",
        subject="Urgent: verify your account", to="ceo@victim.test", FROM_EMAIL="security@bank.test",
        recipient_medium="sms", domain="bank.test",
        room_name="Payroll\r\nBcc: everyone@corp.example\r\nX-Evil: 1", sender_display_name="Tess " + "T" * 5000,
        room_avatar_url="mxc://example.org/avatar\n\nInjected body")
    assert response.status_code == 200, response.text
    wait_until(lambda: mailbox.messages, what="the invite email")
    [(recipients, message)] = mailbox.messages
    [raw] = mailbox.raw
    assert recipients == ["victim@corp.example"]
    assert message["From"] == "Example ID <mxisd@id.example.org>"
    assert message["To"] == "victim@corp.example"
    assert message.get_all("Bcc") is None and message.get_all("X-Evil") is None
    for spoofed in (b"bank.test", b"Bank Security", b"victim.test", b"Urgent"):
        assert spoofed not in raw
    # The room name and the sender's display name fill the template's Subject, on one line and cut short.
    subject = message["Subject"]
    assert subject.startswith("Tess TTT") and "\n" not in subject and len(subject) < 600
    assert "Bcc: everyone@corp.example X-Evil: 1" in message.get_content()
    assert b"\r\nBcc:" not in raw.split(b"\r\n\r\n", 1)[0]


def test_store_invite_is_limited_per_sender_per_address_and_per_client(server):
    server.config["invites"] = {"rate_limit": {
        "per_sender": {"requests": 2, "window": "1h"}, "per_address": {"requests": 3, "window": "1h"},
        "per_ip": {"requests": 5, "window": "1h"}}}
    started(server)
    assert store_invite(server, "one@corp.example").status_code == 200
    assert store_invite(server, "two@corp.example").status_code == 200
    limited = store_invite(server, "three@corp.example")
    assert error_of(limited) == (429, "M_LIMIT_EXCEEDED")
    assert 0 < limited.json()["retry_after_ms"] <= 3_600_000
    # Other senders still may, but not a fourth time to the same address.
    assert store_invite(server, "one@corp.example", sender="@b:example.org").status_code == 200
    assert store_invite(server, "one@corp.example", sender="@c:example.org").status_code == 200
    assert error_of(store_invite(server, "one@corp.example", sender="@d:example.org")) == (429, "M_LIMIT_EXCEEDED")
    # Per client address: five counted so far (a request refused by an earlier limit is not), a sixth is refused.
    assert error_of(store_invite(server, "new@corp.example", sender="@e:example.org")) == (429, "M_LIMIT_EXCEEDED")


# -- 2. internationalised and control-character addresses ------------------------------------------


def test_internationalised_addresses_without_smtputf8(server, mailbox):
    started(server)
    # An ASCII local part on an internationalised domain goes out with the domain in IDNA form.
    assert store_invite(server, "zoe@exämple.org").status_code == 200
    assert request_token(server, "Zoe@Exämple.org").status_code == 200
    wait_until(lambda: len(mailbox.messages) == 2, what="both emails")
    assert [r for r, _ in mailbox.messages] == [["zoe@xn--exmple-cua.org"]] * 2
    # A local part beyond ASCII needs SMTPUTF8, which this SMTP server does not offer.
    for address in ("jörg@exämple.org", "jörg@example.org"):
        assert error_of(store_invite(server, address)) == (400, "M_EMAIL_SEND_ERROR")
        assert error_of(request_token(server, address)) == (400, "M_EMAIL_SEND_ERROR")
    assert stored_invites(server) == 1
    for address in ("a\x00b@example.org", "ab@exa\x00mple.org", "a\rb@example.org", "a\x1b@example.org"):
        assert error_of(store_invite(server, address)) == (400, "M_INVALID_EMAIL")
        assert error_of(request_token(server, address)) == (400, "M_INVALID_EMAIL")
    assert len(mailbox.messages) == 2


def test_internationalised_addresses_with_smtputf8(server):
    box = Mailbox(free_port(), smtputf8=True)
    try:
        server.config["email"]["smtp"]["port"] = box.port
        started(server)
        assert store_invite(server, "jörg@exämple.org").status_code == 200
        assert request_token(server, "Jörg@Exämple.org").status_code == 200
        wait_until(lambda: len(box.messages) == 2, what="both emails")
        assert [r for r, _ in box.messages] == [["jörg@xn--exmple-cua.org"]] * 2
        assert all("jörg@xn--exmple-cua.org".encode() in raw for raw in box.raw)
        assert stored_invites(server) == 1
    finally:
        box.close()


# -- 3. client addresses behind proxies -------------------------------------------------------------


def test_rotating_forwarded_for_entries_stays_one_client(server):
    server.config["server"]["proxies_count"] = 1
    server.config["sessions"] = {"rate_limit": {"per_ip": {"requests": 3, "window": "1h"}}}
    started(server)
    # What the proxy sends on: the client's own X-Forwarded-For, then the address it came from.
    answers = [request_token(server, f"user{i}@corp.example",
                             headers={"X-Forwarded-For": f"198.51.100.{i}, 203.0.113.9"}).status_code
               for i in range(5)]
    assert answers == [200, 200, 200, 429, 429]
    other = request_token(server, "user9@corp.example", headers={"X-Forwarded-For": "203.0.113.9, 203.0.113.10"})
    assert other.status_code == 200


def test_recursion_and_store_invite_ask_only_for_allowed_clients(server, mailbox):
    dns = TinyDns({"_matrix-identity._tcp.other.example": "0 0 9 127.0.0.1."})
    try:
        server.config["server"]["proxies_count"] = 1
        server.config["recursion"] = {"allow": ["10.5.0.0/16"], "resolvers": [f"127.0.0.1:{dns.port}"],
                                      "scheme": "http", "budget_s": 2}
        started(server)
        # The client wrote an allowed address on the left; the proxy's entry on the right says otherwise.
        spoofed = {"X-Forwarded-For": "10.5.0.1, 192.0.2.7"}
        lookup = server.http.get(V1 + "/lookup", params={"medium": "email", "address": "pat@other.example"},
                                 headers=spoofed)
        assert lookup.status_code == 200 and lookup.json() == {}
        assert store_invite(server, "pat@other.example", headers=spoofed).status_code == 200
        assert dns.queries == []
        # An allowed client's lookup does recurse (and finds nobody at the dead port).
        server.http.get(V1 + "/lookup", params={"medium": "email", "address": "kim@other.example"},
                        headers={"X-Forwarded-For": "192.0.2.7, 10.5.0.1"})
        assert set(dns.queries) == {"_matrix-identity._tcp.other.example"}
    finally:
        dns.close()


# -- 4. attempts counted atomically ----------------------------------------------------------------


def test_a_burst_of_wrong_tokens_gets_no_more_tries_than_the_limit(server, mailbox, postgres_url):
    server.config["sessions"] = {"max_token_attempts": 5}
    server.config["server"]["workers"] = 2
    server.config["storage"] = {"url": postgres_url}
    started(server)
    response = request_token(server, "burst@corp.example", secret="burstsecret")
    sid = response.json()["sid"]
    headers = server.auth()
    answers = burst(20, lambda i: httpx.post(server.url + V2 + "/validate/email/submitToken", headers=headers, json={
        "sid": sid, "client_secret": "burstsecret", "token": f"wrong{i}"}, timeout=30))
    codes = sorted(r.json()["errcode"] for r in answers)
    assert codes == ["M_SESSION_EXPIRED"] * 15 + ["M_TOKEN_INCORRECT"] * 5


def test_a_burst_of_logins_reaches_the_homeserver_no_more_than_the_limit(make_server, client_homeserver):
    srv = make_server()
    srv.config["homeserver"] = {"url": client_homeserver.url}
    srv.config["auth"] = {"rate_limit": {"per_user": 100, "per_ip": 4, "window": "1h"}}
    client_homeserver.identity_server = srv.url
    started(srv)
    answers = burst(16, lambda i: httpx.post(srv.url + "/_matrix/client/v3/login", timeout=30, json={
        "type": "m.login.password", "password": "wrong", "identifier": {"type": "m.id.user", "user": f"u{i}"}}))
    assert sorted(r.status_code for r in answers) == [403] * 4 + [429] * 12
    assert len([r for r in client_homeserver.requests if r[1].endswith("/login")]) == 4


def test_a_burst_of_invites_gets_no_more_than_the_limit(server, mailbox):
    server.config["invites"] = {"rate_limit": {"per_sender": {"requests": 3, "window": "1h"}}}
    started(server)
    answers = burst(10, lambda i: httpx.post(server.url + V1 + "/store-invite", timeout=30, json={
        "medium": "email", "address": f"b{i}@corp.example", "room_id": ROOM, "sender": INVITER}))
    assert sorted(r.status_code for r in answers) == [200] * 3 + [429] * 7
    assert stored_invites(server) == 3


# -- 5. patterns match the whole string ------------------------------------------------------------


def test_a_trailing_newline_fails_every_pattern(server):
    started(server)
    for prefix in (V1, V2):
        assert error_of(request_token(server, "nl@corp.example", secret="abc\n", prefix=prefix)) == \
            (400, "M_INVALID_PARAM")
        submitted = server.http.post(prefix + "/validate/email/submitToken", headers=server.auth(),
                                     json={"sid": "abc", "client_secret": "abc\n", "token": "1"})
        assert error_of(submitted) == (400, "M_INVALID_PARAM")
        validated = server.http.get(prefix + "/3pid/getValidated3pid", headers=server.auth(),
                                    params={"sid": "abc", "client_secret": "abc\n"})
        assert error_of(validated) == (400, "M_INVALID_PARAM")
        bound = server.http.post(prefix + "/3pid/bind", headers=server.auth(),
                                 json={"sid": "abc", "client_secret": "abc", "mxid": "@alice:example.org\n"})
        assert error_of(bound) == (400, "M_INVALID_PARAM")
    assert error_of(store_invite(server, "nl@corp.example", sender="@alice:example.org\n")) == (400, "M_INVALID_PARAM")


# -- 7. slow federation peers ----------------------------------------------------------------------


class SlowPeer:
    """A TLS server that answers every request one byte per second, forever; it counts the
    connections it has accepted and those still open."""

    def __init__(self, certificate: Any) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        certificate.configure_cert(self.context)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.open = 0
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.accepted += 1
                self.open += 1
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn: socket.socket) -> None:
        try:
            with self.context.wrap_socket(conn, server_side=True) as tls:
                tls.recv(65536)
                for byte in b"HTTP/1.1 200 OK\r\n" + b"X-Slow: " + b"a" * 10_000:
                    if self.stopped.wait(1):
                        return
                    tls.sendall(bytes([byte]))
        except OSError:
            pass
        finally:
            with self.lock:
                self.open -= 1

    def close(self) -> None:
        self.stopped.set()
        self.sock.close()


def test_a_slow_homeserver_is_cut_off_and_starves_no_one(server, homeserver):
    peer = SlowPeer(homeserver.ca.issue_cert("slow.example", "127.0.0.1"))
    try:
        server.config["accounts"] = {"homeservers": ["*"]}
        server.config["federation"].update({"timeout_s": 2, "deadline_s": 6, "max_in_flight": 2})
        server.config["federation"]["overrides"]["slow.example"] = f"127.0.0.1:{peer.port}"
        started(server)

        def register_slow(i: int) -> httpx.Response:
            return httpx.post(server.url + V2 + "/account/register", timeout=30, json={
                "access_token": f"t{i}", "token_type": "Bearer", "matrix_server_name": "slow.example",
                "expires_in": 3600})

        with ThreadPoolExecutor(6) as pool:
            slow = [pool.submit(register_slow, i) for i in range(6)]
            wait_until(lambda: peer.open == 2, what="two connections to the slow homeserver")
            # While the slow homeserver holds its two connections, users of others register as usual,
            # and the other four requests for it wait their turn instead of opening more.
            healthy = server.http.post(V2 + "/account/register", json=homeserver.openid_token("@ok:example.org"))
            assert healthy.status_code == 200, healthy.text
            assert peer.accepted == 2
            # Each is answered once its deadline has passed: no request waits on it for longer.
            assert [error_of(f.result()) for f in slow] == [(502, "M_UNKNOWN")] * 6
    finally:
        peer.close()


# -- 8. private addresses inside IPv6 ones ---------------------------------------------------------


def test_ipv4_inside_ipv6_is_checked_as_ipv4(server, homeserver):
    server.config["accounts"] = {"homeservers": ["*"]}
    server.config["federation"]["allow_private_networks"] = []
    started(server)
    for literal in ("[64:ff9b::7f00:1]", "[2002:7f00:1::1]", "[::127.0.0.1]", "[::ffff:127.0.0.1]",
                    "[2001:0:4136:e378:8000:63bf:80ff:fffe]", "[64:ff9b::a00:1]"):
        response = server.http.post(V2 + "/account/register", json={
            "access_token": "t", "token_type": "Bearer", "matrix_server_name": f"{literal}:{homeserver.port}",
            "expires_in": 3600})
        assert error_of(response) == (502, "M_UNKNOWN"), literal
        assert f"{literal} resolves only to non-public addresses" in server.log()


# -- 9. untrusted strings in log lines -------------------------------------------------------------


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_login_ids_cannot_forge_or_flood_log_lines(server, log_format):
    server.config["log_format"] = log_format
    started(server)
    forged = "nobody\n2026-01-01 00:00:00,000 INFO server server.api.auth: check_credentials: admin authenticated"
    marker = uuid.uuid4().hex
    for user in (forged, marker + "x" * 1_000_000, "bell\x07\x1b[31mred\u2028sep"):
        response = server.http.post("/_matrix-internal/identity/v1/check_credentials",
                                    json={"user": {"id": user, "password": "wrong"}})
        assert response.status_code == 200 and response.json()["auth"]["success"] is False
    wait_until(lambda: "bell" in server.log(), what="the log lines")
    lines = server.log().splitlines()
    assert not [line for line in lines if line.startswith("2026-01-01")]
    assert not [line for line in lines if "\x1b" in line or "\x07" in line or "\u2028" in line]
    [flood] = [line for line in lines if marker in line]
    assert len(flood) < 2000 and "characters)" in flood
    if log_format == "json":
        events = [json.loads(line) for line in lines if line.startswith("{")]
        [forged_event] = [e for e in events if "nobody" in e["message"]]
        assert "\\n2026-01-01" in forged_event["message"]
    else:
        assert any("nobody\\n2026-01-01" in line for line in lines)
