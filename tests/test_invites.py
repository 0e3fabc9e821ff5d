"""Black-box tests of 3PID invites against `mxisd run`: store-invite, ephemeral keys, sign-ed25519,
and onbind delivery to a fake homeserver over HTTPS (retried across a restart, refused for good,
triggered by a bind or by a store sync), and expiry."""

from __future__ import annotations

import re
import time

import bcrypt
import httpx
import pytest
import redis
from signedjson.key import decode_verify_key_bytes
from signedjson.sign import SignatureVerifyException, verify_signed_json
from unpaddedbase64 import decode_base64

from indexer.cache import Cache
from tests.conftest import PEOPLE, V1, V2, wait_until
from tests.test_api import validate_email

INVITER = "@tester:example.org"
ROOM = "!room:example.org"
TEMPLATE = """Subject: %SENDER_NAME_OR_ID% invites you to %ROOM_NAME_OR_ID%
From: %FROM_NAME% <%FROM_EMAIL%>

Join at %REGISTER_URL%.
Avatar: %ROOM_AVATAR_URL%
Key: <%EPHEMERAL_PRIVATE_KEY%>
"""


@pytest.fixture
def server(make_server, redis_url, prefix, homeserver, tmp_path):
    srv = make_server()
    srv.config["server"]["public_url"] = srv.url
    srv.config["invites"] = {"check_every": "1s", "retry_first": "1s", "register_url": "https://chat.example.org"}
    template = tmp_path / "invite.eml"
    template.write_text(TEMPLATE)
    srv.config["email"]["templates"] = {"invite": str(template)}
    Cache(redis.Redis.from_url(redis_url, decode_responses=True), prefix).initialize(pepper="matrixrocks")
    homeserver.onbind_status = 200
    yield srv
    homeserver.onbind_status = 200


def started(srv):
    srv.start()
    wait_until(lambda: srv.lookup_v1("email", "alice@example.com").get("mxid"), what="the first sync")
    return srv


def store_invite(srv, address, prefix=V2, **extra):
    body = {"medium": "email", "address": address, "room_id": ROOM, "sender": INVITER, **extra}
    return srv.http.post(prefix + "/store-invite", json=body, headers=srv.auth() if prefix == V2 else None)


def server_key(srv):
    public = srv.http.get(V2 + "/pubkey/ed25519:0").json()["public_key"]
    return decode_verify_key_bytes("ed25519:0", decode_base64(public))


def check_onbind(srv, body, address, mxid, token):
    """The onbind body is our signed association with the invite inside, its `signed` block signed too."""
    key = server_key(srv)
    verify_signed_json(body, "id.example.org", key)
    assert (body["medium"], body["address"], body["mxid"]) == ("email", address, mxid)
    [invite] = body["invites"]
    assert {k: invite[k] for k in ("medium", "address", "mxid", "room_id", "sender", "token")} == {
        "medium": "email", "address": address, "mxid": mxid, "room_id": ROOM, "sender": INVITER, "token": token}
    assert {k: invite["signed"][k] for k in ("mxid", "token")} == {"mxid": mxid, "token": token}
    verify_signed_json(invite["signed"], "id.example.org", key)


def test_invite_email_keys_and_delivery_on_bind(server, homeserver, mailbox):
    started(server)
    stored = store_invite(server, "Zoe.Q@Example.NET", room_name="Project X", sender_display_name="Tess Ter",
                          room_avatar_url="mxc://example.org/avatar")
    assert stored.status_code == 200, stored.text
    answer = stored.json()
    assert answer["display_name"] == "zoe...@exa..."
    server_public = server.http.get(V2 + "/pubkey/ed25519:0").json()["public_key"]
    long_term, ephemeral = answer["public_keys"]
    assert answer["public_key"] == long_term["public_key"] == server_public
    assert ephemeral["public_key"] != server_public
    for entry in (long_term, ephemeral):  # what a homeserver does with the invite event's keys
        assert entry["key_validity_url"].startswith(server.url + V2 + "/pubkey/")
        checked = httpx.get(entry["key_validity_url"], params={"public_key": entry["public_key"]})
        assert checked.status_code == 200 and checked.json() == {"valid": True}
    assert server.http.get(V2 + "/pubkey/ephemeral/isvalid", params={"public_key": server_public}).json() == {
        "valid": False}

    [message] = wait_until(lambda: mailbox.to("zoe.q@example.net"), what="the invite email")
    assert message["Subject"] == "Tess Ter invites you to Project X"
    text = message.get_content()
    assert "Join at https://chat.example.org." in text and "Avatar: mxc://example.org/avatar" in text

    # sign-ed25519 with the ephemeral private key from the email: it verifies with the ephemeral public key.
    private_key = re.search(r"Key: <([^>]+)>", text).group(1)
    signed = server.http.post(V2 + "/sign-ed25519", headers=server.auth(), json={
        "mxid": "@zoe:example.org", "token": answer["token"], "private_key": private_key})
    assert signed.status_code == 200, signed.text
    body = signed.json()
    assert {k: body[k] for k in ("mxid", "sender", "token")} == {
        "mxid": "@zoe:example.org", "sender": INVITER, "token": answer["token"]}
    verify_signed_json(body, "id.example.org",
                       decode_verify_key_bytes("ed25519:0", decode_base64(ephemeral["public_key"])))
    with pytest.raises(SignatureVerifyException):
        verify_signed_json(body, "id.example.org", server_key(server))

    sid = validate_email(server, mailbox, "zoe.q@example.net", "zoe-secret", headers=server.auth())
    bound = server.http.post(V2 + "/3pid/bind", headers=server.auth(),
                             json={"sid": sid, "client_secret": "zoe-secret", "mxid": INVITER})
    assert bound.status_code == 200, bound.text
    [onbind] = wait_until(lambda: homeserver.onbinds("zoe.q@example.net"), what="the onbind callback")
    check_onbind(server, onbind, "zoe.q@example.net", INVITER, answer["token"])
    # The association the bind answered, with the invites inside.
    assert {k: onbind[k] for k in ("ts", "not_before", "not_after")} == {
        k: bound.json()[k] for k in ("ts", "not_before", "not_after")}
    # The invitee's homeserver still checks the ephemeral key when she joins.
    assert httpx.get(ephemeral["key_validity_url"], params={"public_key": ephemeral["public_key"]}).json() == {
        "valid": True}


def test_invite_for_a_known_address_is_refused_without_mail(server, mailbox):
    started(server)
    refused = store_invite(server, "alice@example.com")  # as the homeserver's hashed lookup found it
    assert refused.status_code == 400
    assert refused.json() == {"errcode": "M_THREEPID_IN_USE", "mxid": "@alice:example.org",
                              "error": refused.json()["error"]}
    time.sleep(0.5)
    assert mailbox.to("alice@example.com") == []


def test_an_invite_for_an_address_known_in_another_letter_case_is_delivered_by_onbind(server, homeserver, mailbox):
    # What Synapse does when a client invites Carol@Example.ORG as typed: its hashed lookup of that
    # spelling misses, so it stores the invite here, and records the room's invite event only after our answer.
    server.config["invites"]["known_address_delay"] = "3s"
    started(server)  # the store writes Carol's address as Carol@Example.ORG
    stored = store_invite(server, "cAROL@example.ORG", room_name="Project X")
    assert stored.status_code == 200, stored.text
    assert homeserver.onbinds("carol@example.org") == []  # not before the homeserver can know the invite
    answer = stored.json()
    assert answer["display_name"] == "car...@exa..."
    long_term, ephemeral = answer["public_keys"]
    assert long_term["public_key"] == server.http.get(V2 + "/pubkey/ed25519:0").json()["public_key"]
    assert httpx.get(ephemeral["key_validity_url"], params={"public_key": ephemeral["public_key"]}).json() == {
        "valid": True}
    [onbind] = wait_until(lambda: homeserver.onbinds("carol@example.org"), what="the onbind after the delay")
    check_onbind(server, onbind, "carol@example.org", "@carol:example.org", answer["token"])
    # Carol already has an account: nobody is asked by email to make one.
    assert mailbox.to("carol@example.org") == []

    # An invite for an unknown address, which a store then lists in capitals: delivered for that address.
    token = store_invite(server, "Frank.Smith@Example.NET", prefix=V1).json()["token"]
    wait_until(lambda: mailbox.to("frank.smith@example.net"), what="the invite email")
    server.write_people(PEOPLE + [{"localpart": "frank", "emails": ["FRANK.SMITH@EXAMPLE.NET"]}])
    assert server.cli("index", "--store", "people").returncode == 0
    [onbind] = wait_until(lambda: homeserver.onbinds("frank.smith@example.net"), what="the onbind after the sync")
    check_onbind(server, onbind, "frank.smith@example.net", "@frank:example.org", token)
    # Once known, an invite for the address in another spelling goes to Frank by onbind, without a second email.
    again = store_invite(server, "frank.smith@EXAMPLE.net", prefix=V1)
    assert again.status_code == 200, again.text
    second = wait_until(lambda: homeserver.onbinds("frank.smith@example.net")[1:], what="the second onbind")
    check_onbind(server, second[0], "frank.smith@example.net", "@frank:example.org", again.json()["token"])
    assert len(mailbox.to("frank.smith@example.net")) == 1
    assert "known to @frank:example.org: no email" in server.log()


def test_a_refused_onbind_of_an_invite_for_a_known_address_is_retried_at_first(server, homeserver, mailbox):
    server.config["invites"].update({"known_address_delay": "1s", "known_address_retry_for": "5s"})
    started(server)
    # The homeserver refuses the first onbind (it has not recorded the room's invite event yet).
    homeserver.onbind_status = 403
    token = store_invite(server, "Alice@Example.COM").json()["token"]
    wait_until(lambda: homeserver.onbinds("alice@example.com", 403), what="the refused onbind")
    homeserver.onbind_status = 200
    [onbind] = wait_until(lambda: homeserver.onbinds("alice@example.com"), what="the retried onbind")
    check_onbind(server, onbind, "alice@example.com", "@alice:example.org", token)
    # A refusal that goes on past known_address_retry_for is final.
    homeserver.onbind_status = 403
    assert store_invite(server, "BOB@example.com").status_code == 200
    wait_until(lambda: "invites for email bob@example.com refused by the homeserver" in server.log(),
               what="the final refusal")
    refused = len(homeserver.onbinds("bob@example.com", 403))
    assert refused > 1
    time.sleep(3)  # retry_first is 1s: a retry would have come by now
    assert len(homeserver.onbinds("bob@example.com", 403)) == refused
    assert mailbox.messages == []


def test_invite_errors(server, homeserver, mailbox):
    started(server)
    fax = store_invite(server, "447700900123", medium="fax")
    assert fax.status_code == 400 and fax.json()["errcode"] == "M_UNRECOGNIZED"
    bad = store_invite(server, "not an address")
    assert bad.status_code == 400 and bad.json()["errcode"] == "M_INVALID_EMAIL"
    missing = server.http.post(V2 + "/store-invite", headers=server.auth(), json={"medium": "email"})
    assert missing.status_code == 400 and missing.json()["errcode"] == "M_MISSING_PARAMS"
    assert "room_id" in missing.json()["error"] and "sender" in missing.json()["error"]
    anonymous = server.http.post(V2 + "/store-invite", json={
        "medium": "email", "address": "x@example.net", "room_id": ROOM, "sender": INVITER})
    assert anonymous.status_code == 401
    other = store_invite(server, "x@example.net", sender="@someone:example.org")
    assert other.status_code == 403 and other.json()["errcode"] == "M_UNAUTHORIZED"
    unknown = server.http.post(V2 + "/sign-ed25519", headers=server.auth(), json={
        "mxid": "@x:example.org", "token": "nosuchtoken", "private_key": "YJDBA9Xnr2sVqXD9Vj7XVUnmFZcZrlw8Md7kMW+3XA1"})
    assert unknown.status_code == 404 and unknown.json()["errcode"] == "M_UNRECOGNIZED"
    token = store_invite(server, "x@example.net").json()["token"]
    garbage = server.http.post(V2 + "/sign-ed25519", headers=server.auth(), json={
        "mxid": "@x:example.org", "token": token, "private_key": "%%%"})
    assert garbage.status_code == 400 and garbage.json()["errcode"] == "M_INVALID_PARAM"
    assert server.http.get(V2 + "/pubkey/ephemeral/isvalid").json()["errcode"] == "M_MISSING_PARAMS"
    # Only the invite that could be stored was mailed.
    assert len(mailbox.messages) == 1


def test_invite_that_cannot_be_mailed_is_not_stored(server, mailbox):
    server.config["email"]["smtp"]["port"] = 1  # nothing listens there
    started(server)
    failed = store_invite(server, "yan@example.net")
    assert failed.status_code == 500 and failed.json()["errcode"] == "M_EMAIL_SEND_ERROR"
    assert "stored invite" not in server.log()


def test_delivery_is_retried_across_a_restart(server, homeserver, mailbox):
    started(server)
    homeserver.onbind_status = 502
    token = store_invite(server, "uma@example.net", prefix=V1).json()["token"]
    sid = validate_email(server, mailbox, "uma@example.net", "uma-secret", prefix=V1)
    assert server.http.post(V1 + "/3pid/bind", json={
        "sid": sid, "client_secret": "uma-secret", "mxid": "@uma:example.org"}).status_code == 200
    wait_until(lambda: homeserver.onbinds("uma@example.net", 502), what="a refused onbind")
    assert server.stop() == 0
    assert "retrying in" in server.log()
    homeserver.onbind_status = 200
    server.start()
    [onbind] = wait_until(lambda: homeserver.onbinds("uma@example.net"), what="the retried onbind")
    check_onbind(server, onbind, "uma@example.net", "@uma:example.org", token)
    time.sleep(3)  # a delivered invite is not sent again
    assert len(homeserver.onbinds("uma@example.net")) == 1


def test_a_permanent_refusal_is_not_retried(server, homeserver, mailbox):
    started(server)
    homeserver.onbind_status = 403
    store_invite(server, "vic@example.net")
    sid = validate_email(server, mailbox, "vic@example.net", "vic-secret", headers=server.auth())
    server.http.post(V2 + "/3pid/bind", headers=server.auth(),
                     json={"sid": sid, "client_secret": "vic-secret", "mxid": INVITER})
    wait_until(lambda: homeserver.onbinds("vic@example.net", 403), what="the refused onbind")
    wait_until(lambda: "not retried" in server.log(), what="the log of the refusal")
    time.sleep(3)  # retry_first is 1s: a retry would have come by now
    assert len(homeserver.onbinds("vic@example.net", 403)) == 1


def test_a_store_sync_resolves_the_invite(server, homeserver):
    started(server)
    token = store_invite(server, "walt@example.com").json()["token"]
    server.write_people(PEOPLE + [{"localpart": "walt", "emails": ["walt@example.com"]}])
    assert server.cli("index", "--store", "people").returncode == 0
    [onbind] = wait_until(lambda: homeserver.onbinds("walt@example.com"), what="the onbind after the sync")
    check_onbind(server, onbind, "walt@example.com", "@walt:example.org", token)


def test_invites_expire(server):
    server.config["invites"]["expire_after"] = "2s"
    started(server)
    answer = store_invite(server, "xena@example.net").json()
    ephemeral = answer["public_keys"][1]["public_key"]
    wait_until(lambda: server.http.get(V2 + "/pubkey/ephemeral/isvalid", params={"public_key": ephemeral})
               .json() == {"valid": False}, what="the invite to expire")
    signed = server.http.post(V2 + "/sign-ed25519", headers=server.auth(), json={
        "mxid": "@x:example.org", "token": answer["token"],
        "private_key": "YJDBA9Xnr2sVqXD9Vj7XVUnmFZcZrlw8Md7kMW+3XA1"})
    assert signed.status_code == 404
    assert "forgot 1 expired invites" in server.log()


def test_a_login_publishes_the_invite_at_once(server, homeserver):
    server.config["invites"]["check_every"] = "1h"  # the periodic check cannot be what finds it
    started(server)
    token = store_invite(server, "wendy@example.com").json()["token"]
    hashed = bcrypt.hashpw(b"wendy-password", bcrypt.gensalt(rounds=4)).decode()
    server.write_people(PEOPLE + [{"localpart": "wendy", "emails": ["wendy@example.com"], "password": hashed}])
    assert server.cli("index", "--store", "people").returncode == 0
    assert homeserver.onbinds("wendy@example.com") == []
    login = server.http.post("/_matrix-internal/identity/v1/check_credentials",
                             json={"user": {"id": "@wendy:example.org", "password": "wendy-password"}})
    assert login.json()["auth"]["success"] is True
    [onbind] = wait_until(lambda: homeserver.onbinds("wendy@example.com"), what="the onbind after the login")
    check_onbind(server, onbind, "wendy@example.com", "@wendy:example.org", token)


def test_an_invite_stored_on_another_host_is_published_at_the_next_login_here(server, make_server, homeserver,
                                                                               postgres_url, rclient, prefix):
    # Two hosts sharing Redis and SQL. A login asks SQL for invites only when Redis marks the
    # address as invited: the host storing an invite marks it for every host.
    hashed = bcrypt.hashpw(b"vera-password", bcrypt.gensalt(rounds=4)).decode()
    vera = {"localpart": "vera", "emails": ["vera@example.com"], "password": hashed}
    here, there = server, make_server()
    there.config["server"]["public_url"] = there.url
    there.config["invites"] = dict(here.config["invites"])
    there.config["email"]["templates"] = here.config["email"]["templates"]
    for srv, host in ((here, "here"), (there, "there")):
        srv.config["invites"]["check_every"] = "1h"  # the periodic check cannot be what finds it
        srv.config["storage"] = {"url": postgres_url}
        srv.config["server"]["host_id"] = host
    started(here)
    there.start()
    token = store_invite(there, "vera@example.com").json()["token"]
    assert rclient.zscore(f"{prefix}invited", "email vera@example.com") is not None
    here.write_people(PEOPLE + [vera])
    assert here.cli("index", "--store", "people").returncode == 0
    assert check_login(here, "@vera:example.org", "vera-password") is True
    [onbind] = wait_until(lambda: homeserver.onbinds("vera@example.com"), what="the onbind after the login")
    try:
        check_onbind(here, onbind, "vera@example.com", "@vera:example.org", token)
    except SignatureVerifyException:  # the hosts' keys differ here, and either may send a queued delivery
        check_onbind(there, onbind, "vera@example.com", "@vera:example.org", token)
    # Settled: the next pruning (each host's start and invites.check_every) removes the mark, once
    # it is older than any invite being stored.
    there.stop()
    rclient.zadd(f"{prefix}invited", {"email vera@example.com": 0})
    there.start()
    wait_until(lambda: rclient.zscore(f"{prefix}invited", "email vera@example.com") is None,
               what="the settled invite's mark to go")


def test_invites_stored_without_a_mark_are_marked_when_the_server_starts(server, homeserver, rclient, prefix):
    # Invites stored before marks existed, imported by `mxisd migrate`, or a Redis emptied since.
    server.config["invites"]["check_every"] = "1h"
    started(server)
    token = store_invite(server, "yolanda@example.com").json()["token"]
    server.stop()
    rclient.delete(f"{prefix}invited")
    started(server)
    hashed = bcrypt.hashpw(b"yolanda-password", bcrypt.gensalt(rounds=4)).decode()
    server.write_people(PEOPLE + [{"localpart": "yolanda", "emails": ["yolanda@example.com"], "password": hashed}])
    assert server.cli("index", "--store", "people").returncode == 0
    assert check_login(server, "@yolanda:example.org", "yolanda-password") is True
    [onbind] = wait_until(lambda: homeserver.onbinds("yolanda@example.com"), what="the onbind after the login")
    check_onbind(server, onbind, "yolanda@example.com", "@yolanda:example.org", token)


def check_login(srv, user, password):
    return srv.http.post("/_matrix-internal/identity/v1/check_credentials",
                         json={"user": {"id": user, "password": password}}).json()["auth"]["success"]
