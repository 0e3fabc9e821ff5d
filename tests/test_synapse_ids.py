"""What a current Synapse sends, without a Synapse: room IDs of every room version (v12 IDs have no
server part) and user IDs of the spec's whole grammar, through store-invite, onbind, bind and
sign-ed25519; and check_credentials answering only the person's own Matrix ID, whatever was typed."""

from __future__ import annotations

import bcrypt
import redis

from indexer.cache import Cache
from tests.conftest import V1, V2, wait_until
from tests.test_api import validate_email

ROOM_V12 = "!31hneApxJ_1o-63DmFrpeqnkFfWppnzWso1JvH3ogLM"
PASSWORD = "correct horse battery"
PEOPLE = [{"localpart": "alice", "display_name": "Alice Liddell", "emails": ["alice@example.com"],
           "phones": ["+44 7700 900456"], "password": bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()}]


def started(make_server, redis_url, prefix):
    server = make_server(PEOPLE)
    server.config["invites"] = {"retry_first": "1s"}
    Cache(redis.Redis.from_url(redis_url, decode_responses=True), prefix).initialize(pepper="matrixrocks")
    server.start()
    wait_until(lambda: server.lookup_v1("email", "alice@example.com").get("mxid"), what="the first sync")
    return server


def test_room_and_user_ids_of_every_room_version(make_server, redis_url, prefix, homeserver, mailbox):
    server = started(make_server, redis_url, prefix)
    rooms = [ROOM_V12, "!abc:example.org", "!abc:[2001:db8::1]:8448"]
    senders = ["@tester:example.org", "@Old=Style/Name+x:example.org", "@t:[2001:db8::1]:8448", "@t:10.0.0.1:80"]
    for room, sender in zip([*rooms, ROOM_V12], senders, strict=True):
        stored = server.http.post(V1 + "/store-invite", json={
            "medium": "email", "address": f"guest{len(mailbox.messages)}@example.net", "room_id": room,
            "sender": sender})
        assert stored.status_code == 200, (room, sender, stored.text)
    for room, sender, what in [("room", "@tester:example.org", "room_id"), ("!", "@tester:example.org", "room_id"),
                               ("!a b", "@tester:example.org", "room_id"),
                               (ROOM_V12 + "\n", "@t:example.org", "room_id"),
                               (ROOM_V12, "@tester", "sender"), (ROOM_V12, "@te ster:example.org", "sender"),
                               (ROOM_V12, "@tester:exa mple.org", "sender"), (ROOM_V12, "@t:a:b", "sender")]:
        refused = server.http.post(V1 + "/store-invite", json={
            "medium": "email", "address": "guest@example.net", "room_id": room, "sender": sender})
        assert refused.status_code == 400, (room, sender, refused.text)
        assert refused.json()["errcode"] == "M_INVALID_PARAM" and refused.json()["error"].startswith(what)

    # The invite to the v12 room reaches the invitee's homeserver once the address is bound.
    secret = "s3cret"
    sid = validate_email(server, mailbox, "guest0@example.net", secret, headers=server.auth())
    bound = server.http.post(V2 + "/3pid/bind", headers=server.auth(),
                             json={"sid": sid, "client_secret": secret, "mxid": "@tester:example.org"})
    assert bound.status_code == 200, bound.text
    [(status, body)] = wait_until(lambda: [r for r in homeserver.onbind_received
                                           if r[1]["address"] == "guest0@example.net"], what="the onbind")
    assert status == 200 and [i["room_id"] for i in body["invites"]] == [ROOM_V12]

    # sign-ed25519 takes any user ID of the grammar (here the token is unknown: 404, not 400).
    for mxid, expected in [("@x:[2001:db8::1]:8448", 404), ("@x=y:example.org", 404), ("@x:", 400), ("x:y", 400)]:
        signed = server.http.post(V2 + "/sign-ed25519", headers=server.auth(), json={
            "mxid": mxid, "token": "nosuchtoken", "private_key": "YJDBA9Xnr2sVqXD9Vj7XVUnmFZcZrlw8Md7kMW+3XA1"})
        assert signed.status_code == expected, (mxid, signed.text)


def test_check_credentials_answers_the_owners_matrix_id(make_server, redis_url, prefix):
    server = started(make_server, redis_url, prefix)
    accepted = {"success": True, "mxid": "@alice:example.org"}
    for typed in ["alice", "@alice:example.org", "@ALICE:example.org", "Alice@Example.com",
                  "@alice@example.com:example.org", "+447700900456", "+44 7700 900456", "07700 900456",
                  "@+447700900456:example.org", "@+44 (0)7700 900456:example.org"]:
        answer = server.http.post("/_matrix-internal/identity/v1/check_credentials",
                                  json={"user": {"id": typed, "password": PASSWORD}}).json()["auth"]
        assert {k: answer.get(k) for k in accepted} == accepted, typed
    # A number nobody has, and a localpart that only looks like the owner's number: no one's login.
    for typed in ["+447700900999", "@+447700900999:example.org", "447700900456x"]:
        answer = server.http.post("/_matrix-internal/identity/v1/check_credentials",
                                  json={"user": {"id": typed, "password": PASSWORD}}).json()
        assert answer == {"auth": {"success": False, "profile": {}}}, typed
