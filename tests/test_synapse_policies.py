"""The registration and 3PID invite policies in front of a real Synapse (see tests/test_synapse.py),
with the Synapse settings docs/synapse.md gives for them: the test stands where the reverse proxy
would, sending register requestToken and room invites to mxisd, which passes what its policies let
through on to Synapse."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest

from tests.conftest import wait_until
from tests.fakes import Mailbox
from tests.test_synapse import HASH, Stack, running_stack

pytestmark = pytest.mark.synapse

PEOPLE = [
    {"localpart": "alice", "display_name": "Alice Liddell", "emails": ["alice@example.com"], "password": HASH,
     "roles": ["inviters"]},
    {"localpart": "bob", "display_name": "Bob Builder", "emails": ["bob@example.com"], "password": HASH,
     "roles": ["staff"]},
    {"localpart": "erin", "display_name": "Erin Brockovich", "emails": ["erin@example.com"], "password": HASH},
]


def registration_settings(mailbox: Mailbox) -> dict[str, Any]:
    """docs/synapse.md, section 8: Synapse sends its own registration emails, and every account
    proves an address."""
    return {
        "enable_registration": True,
        "enable_registration_without_verification": False,
        "registrations_require_3pid": ["email"],
        "email": {"smtp_host": "127.0.0.1", "smtp_port": mailbox.port, "force_tls": False,
                  "require_transport_security": False, "enable_tls": False,
                  "notif_from": "Example chat <chat@example.org>", "app_name": "Example chat"},
    }


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("synapse-policies"), redis_url, PEOPLE, registration_settings,
                       registration={"policy": {"email": {"domains": {"allow": ["example.com"]}}}},
                       invites={"policy": {"senders": {"roles": ["inviters"]}}}) as running:
        yield running


def test_registration_request_token_passed_to_synapse_or_refused(stack: Stack) -> None:
    path = "/_matrix/client/v3/register/email/requestToken"
    secret = "secret" + uuid.uuid4().hex
    allowed = stack.server.http.post(path, json={"client_secret": secret, "email": "newcomer@example.com",
                                                 "send_attempt": 1})
    assert allowed.status_code == 200, allowed.text
    sid = allowed.json()["sid"]
    # Synapse sent its own validation email, with its own submit link.
    [mail] = wait_until(lambda: stack.mailbox.to("newcomer@example.com"), 30, "Synapse's registration email")
    text = mail.get_body(preferencelist=("plain",)).get_content()
    assert f"sid={sid}" in text and "registration/email/submit_token" in text, text
    # Synapse's own answer, as it gave it: asking again with the same secret is the same session.
    again = stack.server.http.post(path, json={"client_secret": secret, "email": "newcomer@example.com",
                                               "send_attempt": 1})
    assert again.status_code == 200 and again.json()["sid"] == sid
    refused = stack.server.http.post(path, json={"client_secret": secret, "email": "stranger@elsewhere.example",
                                                 "send_attempt": 1})
    assert refused.status_code == 403, refused.text
    assert refused.json() == {"errcode": "M_THREEPID_DENIED",
                              "error": "Registration refused: this email address is not on the server's allow lists"}
    assert not stack.mailbox.to("stranger@elsewhere.example")


def test_3pid_invites_only_from_senders_with_the_role(stack: Stack) -> None:
    synapse, server = stack.synapse, stack.server
    alice, bob = synapse.session("alice"), synapse.session("bob")
    synapse.session("erin")  # her account exists from her first login
    created = synapse.http.post("/_matrix/client/v3/createRoom", headers=alice,
                                json={"name": "Policy room", "preset": "public_chat",
                                      "power_level_content_override": {"invite": 0}})
    assert created.status_code == 200, created.text
    room_id = created.json()["room_id"]
    joined = synapse.http.post(f"/_matrix/client/v3/join/{quote(room_id)}", headers=bob, json={})
    assert joined.status_code == 200, joined.text
    path = f"/_matrix/client/v3/rooms/{quote(room_id)}/invite"

    def invite(session: dict[str, str], user: str, address: str) -> Any:
        body = {"id_server": stack.id_server, "id_access_token": stack.identity_token(session, user),
                "medium": "email", "address": address}
        return server.http.post(path, headers=session, json=body)

    # Bob has no role that may: refused here, Synapse never asked, no email.
    refused = invite(bob, "@bob:example.org", "carol@elsewhere.example")
    assert refused.status_code == 403, refused.text
    assert refused.json()["errcode"] == "M_FORBIDDEN"
    assert "by email address or phone number" in refused.json()["error"]
    # Invites by Matrix ID are his to send.
    by_mxid = server.http.post(path, headers=bob, json={"user_id": "@erin:example.org"})
    assert by_mxid.status_code == 200, by_mxid.text
    # Alice has: Synapse gets the invite and stores it with us (store-invite), which emails it.
    passed = invite(alice, "@alice:example.org", "dave@elsewhere.example")
    assert passed.status_code == 200, passed.text + "\n" + server.log()[-3000:]
    [mail] = wait_until(lambda: stack.mailbox.to("dave@elsewhere.example"), 30, "the invite email")
    assert "Policy room" in mail.get_content()
    state = synapse.http.get(f"/_matrix/client/v3/rooms/{quote(room_id)}/state", headers=alice).json()
    invites = [e for e in state if e["type"] == "m.room.third_party_invite"]
    assert len(invites) == 1, invites
    # The other way to send 3PID invites, createRoom's invite_3pid: the same roles.
    room_with_invite = {"name": "Second room", "invite_3pid": [{
        "id_server": stack.id_server, "id_access_token": stack.identity_token(bob, "@bob:example.org"),
        "medium": "email", "address": "carol@elsewhere.example"}]}
    refused = server.http.post("/_matrix/client/v3/createRoom", headers=bob, json=room_with_invite)
    assert refused.status_code == 403 and refused.json()["errcode"] == "M_FORBIDDEN", refused.text
    room_with_invite["invite_3pid"][0].update(address="erin.home@elsewhere.example",
                                              id_access_token=stack.identity_token(alice, "@alice:example.org"))
    created = server.http.post("/_matrix/client/v3/createRoom", headers=alice, json=room_with_invite)
    assert created.status_code == 200 and created.json()["room_id"].startswith("!"), created.text
    wait_until(lambda: stack.mailbox.to("erin.home@elsewhere.example"), 30, "the createRoom invite email")
    assert not stack.mailbox.to("carol@elsewhere.example")
    assert "Traceback" not in synapse.log()
