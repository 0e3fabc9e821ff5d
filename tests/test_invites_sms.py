"""Black-box tests of 3PID invites by phone number against `mxisd run`: store-invite with medium
msisdn texts the invitee through a fake Twilio (the shipped template, a short link that redirects
only to invites.register_url), and the invite reaches the homeserver's onbind once the number is
bound (validated by SMS) or a store lists it; rate limits, bad numbers, no sms section, Twilio refusing."""

from __future__ import annotations

import re
import sqlite3

import httpx
import pytest
import redis
from signedjson.key import decode_verify_key_bytes
from signedjson.sign import verify_signed_json
from unpaddedbase64 import decode_base64

from indexer.cache import Cache
from tests.conftest import PEOPLE, V1, V2, wait_until

INVITER = "@tester:example.org"
ROOM = "!room:example.org"
REGISTER_URL = "https://chat.example.org/register?lang=en"
LINK = re.compile(r"(http://127\.0\.0\.1:\d+/i/)([A-Za-z0-9_-]{11})$")


@pytest.fixture
def server(make_server, redis_url, prefix, homeserver):
    srv = make_server()
    srv.config["server"]["public_url"] = srv.url
    srv.config["invites"] = {"check_every": "1s", "retry_first": "1s", "register_url": REGISTER_URL}
    Cache(redis.Redis.from_url(redis_url, decode_responses=True), prefix).initialize(pepper="matrixrocks")
    homeserver.onbind_status = 200
    return srv


def started(srv):
    srv.start()
    wait_until(lambda: srv.lookup_v1("email", "alice@example.com").get("mxid"), what="the first sync")
    return srv


def store_invite(srv, address, prefix=V2, headers=None, **extra):
    body = {"medium": "msisdn", "address": address, "room_id": ROOM, "sender": INVITER, **extra}
    if prefix == V2 and headers is None:
        headers = srv.auth()
    return srv.http.post(prefix + "/store-invite", json=body, headers=headers)


def kept_invites(srv):
    """The msisdn invites in the server's SQL storage (SQLite in its data_dir)."""
    with sqlite3.connect(srv.root / "data" / "mxisd.sqlite3") as db:
        return [row[0] for row in db.execute("SELECT address FROM invites WHERE medium = 'msisdn'")]


def check_onbind(srv, body, msisdn, mxid, token):
    """The onbind body is our signed association of the number with the invite inside."""
    public = srv.http.get(V2 + "/pubkey/ed25519:0").json()["public_key"]
    key = decode_verify_key_bytes("ed25519:0", decode_base64(public))
    verify_signed_json(body, "id.example.org", key)
    assert (body["medium"], body["address"], body["mxid"]) == ("msisdn", msisdn, mxid)
    [invite] = body["invites"]
    assert {k: invite[k] for k in ("medium", "address", "mxid", "room_id", "sender", "token")} == {
        "medium": "msisdn", "address": msisdn, "mxid": mxid, "room_id": ROOM, "sender": INVITER, "token": token}
    verify_signed_json(invite["signed"], "id.example.org", key)


def test_an_sms_invite_is_texted_with_a_short_link_and_delivered_when_the_number_is_bound(
        server, homeserver, twilio):
    started(server)
    stored = store_invite(server, "+44 7400 123456", room_name="Project X", sender_display_name="Tess Ter")
    assert stored.status_code == 200, stored.text
    answer = stored.json()
    assert answer["display_name"] == "+44 740..."  # what the room shows: not the number
    ephemeral = answer["public_keys"][1]
    assert httpx.get(ephemeral["key_validity_url"], params={"public_key": ephemeral["public_key"]}).json() == {
        "valid": True}

    [sms] = twilio.sent
    assert sms["To"] == "+447400123456" and sms["From"] == "+15005550006"
    text, link = sms["Body"].rsplit(" ", 1)
    assert text == "Tess Ter invited you to Project X on Matrix:"
    assert LINK.fullmatch(link) and link.startswith(server.url + "/i/")
    # The short link leads to register_url, with the invite's medium, address and room added to its query.
    opened = httpx.get(link, follow_redirects=False)
    assert opened.status_code == 302 and opened.headers["Cache-Control"] == "no-store"
    assert opened.headers["Location"] == (REGISTER_URL + "&medium=msisdn&address=447400123456"
                                          "&room_id=%21room%3Aexample.org")

    # The number validated by SMS and bound: the invite goes to the homeserver's onbind.
    requested = server.http.post(V2 + "/validate/msisdn/requestToken", headers=server.auth(), json={
        "client_secret": "tess-secret", "country": "GB", "phone_number": "07400 123456", "send_attempt": 1})
    assert requested.status_code == 200, requested.text
    sid = requested.json()["sid"]
    code = re.search(r"\b(\d{6})\b", twilio.sent[-1]["Body"]).group(1)
    submitted = server.http.post(V2 + "/validate/msisdn/submitToken", headers=server.auth(),
                                 json={"sid": sid, "client_secret": "tess-secret", "token": code})
    assert submitted.json() == {"success": True}
    bound = server.http.post(V2 + "/3pid/bind", headers=server.auth(),
                             json={"sid": sid, "client_secret": "tess-secret", "mxid": INVITER})
    assert bound.status_code == 200, bound.text
    [onbind] = wait_until(lambda: homeserver.onbinds("447400123456"), what="the onbind callback")
    check_onbind(server, onbind, "447400123456", INVITER, answer["token"])
    assert len(twilio.sent) == 2  # the invite and the validation code, nothing more


def test_the_short_link_is_no_open_redirect(server, twilio):
    started(server)
    assert store_invite(server, "447400123456").status_code == 200
    link = twilio.sent[0]["Body"].rsplit(" ", 1)[1]
    code = LINK.fullmatch(link).group(2)
    # Unknown, malformed or tampered codes, and whatever else the request carries, lead to register_url alone.
    for path in (f"/i/{code[:-1]}A" if code[-1] != "A" else f"/i/{code[:-1]}B", "/i/x", "/i/" + "A" * 300,
                 f"/i/{code}?next=https://evil.example/", "/i/%2F%2Fevil.example", "/i/https:%2F%2Fevil.example"):
        answer = server.http.get(path, follow_redirects=False)
        expected = REGISTER_URL if "?" not in path else REGISTER_URL + "&medium=msisdn&address=447400123456" \
            "&room_id=%21room%3Aexample.org"
        assert (answer.status_code, answer.headers.get("Location")) == (302, expected), path
    assert server.http.get("/i/a/b", follow_redirects=False).status_code == 404


def test_a_store_sync_resolves_an_sms_invite_and_a_known_number_gets_no_sms(server, homeserver, twilio):
    started(server)
    token = store_invite(server, "447400123499", prefix=V1).json()["token"]
    server.write_people(PEOPLE + [{"localpart": "walt", "phones": ["+44 7400 123499"]}])
    assert server.cli("index", "--store", "people").returncode == 0
    [onbind] = wait_until(lambda: homeserver.onbinds("447400123499"), what="the onbind after the sync")
    check_onbind(server, onbind, "447400123499", "@walt:example.org", token)

    # Alice's number as the homeserver's own lookup would have found it: it should have invited her Matrix ID.
    refused = store_invite(server, "18005552067")
    assert refused.status_code == 400
    assert refused.json() == {"errcode": "M_THREEPID_IN_USE", "mxid": "@alice:example.org",
                              "error": refused.json()["error"]}
    # Spelt in another way, which its lookup missed: the invite goes to her by onbind, without an SMS.
    other = store_invite(server, "+1 (800) 555-2067")
    assert other.status_code == 200, other.text
    [onbind] = wait_until(lambda: homeserver.onbinds("18005552067"), what="the onbind to alice")
    check_onbind(server, onbind, "18005552067", "@alice:example.org", other.json()["token"])
    assert [s["To"] for s in twilio.sent] == ["+447400123499"]


def test_bad_numbers_untrusted_fields_and_rate_limits(server, homeserver, twilio):
    server.config["invites"]["rate_limit"] = {"per_address": {"requests": 2, "window": "1h"},
                                              "per_sender": {"requests": 4, "window": "1h"},
                                              "per_ip": {"requests": 5, "window": "1h"}}
    started(server)
    for bad in ("12", "+4412", "07400 123456", "not a number", "", "+44740012345678901234"):
        answer = store_invite(server, bad)
        assert answer.status_code == 400 and answer.json()["errcode"] == "M_INVALID_ADDRESS", (bad, answer.text)
    unknown = store_invite(server, "447400123456", medium="fax")
    assert unknown.status_code == 400 and unknown.json()["errcode"] == "M_UNRECOGNIZED"
    assert twilio.sent == []  # and bad requests count towards no limit

    # A request's fields reach the SMS as one line each, cut short.
    long_room = "Evil\nRoom\x00" + "x" * 300
    first = store_invite(server, "447400123456", room_name=long_room, sender_display_name="\u2028Mallory\r")
    assert first.status_code == 200, first.text
    body = twilio.sent[0]["Body"]
    assert "\n" not in body and "\x00" not in body and len(body) <= 160
    # ...ending in an ASCII "...", which keeps the SMS in the GSM alphabet (160 characters, not 70).
    assert body.startswith("Mallory invited you to Evil Room " + "x" * 27 + "... on Matrix: ")
    # Without a room name: the alias, else the room ID; without a display name: the sender's Matrix ID.
    assert store_invite(server, "447400123456", prefix=V1, room_alias="#x:example.org").status_code == 200
    assert twilio.sent[1]["Body"].startswith("@tester:example.org invited you to #x:example.org on Matrix: ")

    limited = store_invite(server, "447400123456")  # a third invite for the number
    assert limited.status_code == 429 and limited.json()["errcode"] == "M_LIMIT_EXCEEDED"
    assert limited.json()["retry_after_ms"] > 0 and "(per_address)" in server.log()
    assert store_invite(server, "447400123457").status_code == 200
    limited = store_invite(server, "447400123458")  # the fifth from this sender
    assert limited.status_code == 429 and "(per_sender)" in server.log()
    other = server.register(homeserver, "@other:example.org")
    assert store_invite(server, "447400123459", sender="@other:example.org", headers=other).status_code == 200
    limited = store_invite(server, "447400123460", sender="@other:example.org", headers=other)
    assert limited.status_code == 429 and "(per_ip)" in server.log()
    assert [s["To"] for s in twilio.sent] == ["+447400123456", "+447400123456", "+447400123457", "+447400123459"]
    assert sorted(kept_invites(server)) == ["447400123456", "447400123456", "447400123457", "447400123459"]


def test_without_an_sms_section_no_invite_is_kept(server, twilio):
    del server.config["sms"]
    started(server)
    failed = store_invite(server, "447400123456")
    assert failed.status_code == 500 and failed.json()["errcode"] == "M_SEND_ERROR"
    assert "sms section is not configured" in failed.json()["error"]
    assert kept_invites(server) == [] and twilio.sent == []
    # A number somebody already has needs no SMS: its invite is still delivered by onbind.
    assert store_invite(server, "+18005552067").status_code == 200
    assert kept_invites(server) == ["18005552067"]


def test_when_twilio_refuses_no_invite_is_kept(server, twilio):
    started(server)
    twilio.fail = True  # Twilio will not send to this number: the client's to fix
    refused = store_invite(server, "447400123456")
    assert refused.status_code == 400 and refused.json()["errcode"] == "M_SEND_ERROR"
    twilio.fail, twilio.down = False, True  # Twilio fails: ours
    failed = store_invite(server, "447400123456")
    assert failed.status_code == 500 and failed.json()["errcode"] == "M_SEND_ERROR"
    assert "Twilio refused the SMS to +447400123456 (HTTP 500)" in server.log()
    assert kept_invites(server) == [] and twilio.sent == []
    twilio.down = False
    assert store_invite(server, "447400123456").status_code == 200
    assert kept_invites(server) == ["447400123456"]
