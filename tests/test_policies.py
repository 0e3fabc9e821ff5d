"""The registration and 3PID invite policies over real HTTP: `mxisd run` in front of a fake
homeserver speaking the client-server wire format, as the reverse proxy of docs/synapse.md sends
register requestToken and room invites to it."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import PEOPLE, V1, wait_until
from tests.fake_homeserver import ClientHomeserver

EMAIL = "/_matrix/client/v3/register/email/requestToken"
MSISDN = "/_matrix/client/v3/register/msisdn/requestToken"
ROOM = "!tea:example.org"
INVITE = f"/_matrix/client/v3/rooms/{ROOM}/invite"
DENIED = "M_THREEPID_DENIED"


@pytest.fixture
def started(make_server, client_homeserver: ClientHomeserver):
    def start(people: list[dict[str, Any]] = PEOPLE, proxies_count: int = 0, **config: Any):
        server = make_server(people)
        server.config["homeserver"] = {"url": client_homeserver.url}
        server.config["server"]["proxies_count"] = proxies_count
        server.config.update(config)
        server.start()
        wait_until(lambda: server.lookup_v1("email", "alice@example.com").get("mxid"), 60, "the first sync")
        return server

    return start


def email_token(server, address: str, path: str = EMAIL) -> httpx.Response:
    return server.http.post(path, json={"client_secret": "s3cret", "email": address, "send_attempt": 1})


def msisdn_token(server, number: str, country: str = "GB") -> httpx.Response:
    return server.http.post(MSISDN, json={"client_secret": "s3cret", "country": country, "phone_number": number,
                                          "send_attempt": 1})


def refused(response: httpx.Response, says: str) -> bool:
    assert response.status_code == 403, response.text
    body = response.json()
    assert body["errcode"] == DENIED and says in body["error"], body
    return True


def passed(response: httpx.Response) -> bool:
    assert response.status_code == 200, response.text
    assert response.json()["sid"].startswith("hs-sid-")  # the homeserver's answer, not ours
    return True


def test_by_default_registration_passes_through_unchanged(started, client_homeserver):
    server = started(proxies_count=1)
    body = b'{"client_secret": "s3cret", "email": "Anyone@Anywhere.example", "send_attempt": 1,\n "next_link": "x"}'
    for path in (EMAIL, EMAIL.replace("/v3/", "/r0/")):
        response = server.http.post(path, content=body, headers={"Content-Type": "application/json",
                                                                "Accept-Language": "fr",
                                                                "X-Forwarded-For": "10.9.9.9, 203.0.113.7"})
        assert passed(response)
        # The body went on byte for byte (the address as typed), to the path it came to, with the
        # client's address as our reverse proxy gave it (the homeserver limits requests per address).
        sent_path, headers, raw = client_homeserver.raw[-1]
        assert (sent_path, raw, headers["accept-language"]) == (path, body, "fr")
        assert headers["x-forwarded-for"] == "203.0.113.7"
    assert passed(msisdn_token(server, "07700 900000"))
    # The homeserver's refusal comes back as it gave it, status and body.
    client_homeserver.register_answer = (400, {"errcode": "M_THREEPID_IN_USE", "error": "Email is already in use",
                                               "extra": [1, 2]})
    response = email_token(server, "alice@example.com")
    assert (response.status_code, response.json()) == (400, client_homeserver.register_answer[1])


def test_bad_bodies_are_matrix_errors(started, client_homeserver):
    server = started()
    for content, status, errcode in [
            (b"not json", 400, "M_NOT_JSON"),
            (b"[1]", 400, "M_BAD_JSON"),
            (b'{"client_secret": "s", "send_attempt": 1}', 400, "M_MISSING_PARAMS"),
            (b'{"client_secret": "s", "email": 5, "send_attempt": 1}', 400, "M_INVALID_PARAM"),
            (b'{"client_secret": "s", "email": "no-at-sign", "send_attempt": 1}', 400, "M_INVALID_PARAM")]:
        response = server.http.post(EMAIL, content=content, headers={"Content-Type": "application/json"})
        assert (response.status_code, response.json()["errcode"]) == (status, errcode), content
    bad_phone = msisdn_token(server, "12")
    assert (bad_phone.status_code, bad_phone.json()["errcode"]) == (400, "M_INVALID_PARAM")
    no_country = server.http.post(MSISDN, json={"client_secret": "s", "phone_number": "07700900000",
                                                "send_attempt": 1})
    assert (no_country.status_code, no_country.json()["errcode"]) == (400, "M_MISSING_PARAMS")
    assert not [r for r in client_homeserver.raw if "/register/" in r[0]]  # none reached the homeserver


POLICY = {
    "invite_only": True,
    "email": {
        "domains": {"allow": ["example.com", ".partner.example", "*corp.example"],
                    "deny": ["*spam.example", "old.corp.example"]},
        "patterns": {"allow": [r"contractor-[0-9]+@agency\.example"], "deny": [r"(admin|root)@.*"]},
    },
    "msisdn": {"patterns": {"allow": ["44[0-9]+"], "deny": ["447700900999"]}},
}


def test_domains_patterns_invites_and_deny_winning(started, client_homeserver):
    server = started(registration={"policy": POLICY})
    invite_only = "by invitation only"
    # Domains: exact, subdomains only, both.
    assert passed(email_token(server, "alice@example.com"))
    assert passed(email_token(server, "Someone@EXAMPLE.com"))  # canonicalised like lookups
    assert refused(email_token(server, "x@sub.example.com"), invite_only)
    assert refused(email_token(server, "x@partner.example"), invite_only)
    assert passed(email_token(server, "x@eu.partner.example"))
    assert passed(email_token(server, "x@corp.example"))
    assert passed(email_token(server, "x@a.b.corp.example"))
    assert refused(email_token(server, "x@notcorp.example"), invite_only)  # "*corp.example" is no glob
    # Deny lists win over allow lists: a denied subdomain of an allowed domain, a denied pattern.
    assert refused(email_token(server, "x@old.corp.example"), "domain of this email address is on the server's deny")
    assert refused(email_token(server, "x@spam.example"), "deny list")
    assert refused(email_token(server, "x@mail.spam.example"), "deny list")
    assert refused(email_token(server, "x@notspam.example"), invite_only)
    assert refused(email_token(server, "Admin@example.com"), "matches a pattern on the server's deny list")
    # Patterns match the whole canonical address.
    assert passed(email_token(server, "Contractor-12@Agency.example"))
    assert refused(email_token(server, "contractor-12x@agency.example"), invite_only)
    assert refused(email_token(server, "xcontractor-12@agency.example"), invite_only)
    # Invite-only: a pending invite admits its address, and only that one; not one on a deny list.
    for address in ("guest@elsewhere.example", "guest@spam.example"):
        stored = server.http.post(V1 + "/store-invite", json={"medium": "email", "address": address,
                                                                "room_id": ROOM, "sender": "@alice:example.org"})
        assert stored.status_code == 200, stored.text
    assert passed(email_token(server, "Guest@Elsewhere.example"))
    assert refused(email_token(server, "guest2@elsewhere.example"), invite_only)
    assert refused(email_token(server, "guest@spam.example"), "deny list")
    # Phone numbers: E.164 digits, as lookups hold them.
    assert passed(msisdn_token(server, "07700 900123"))
    assert passed(msisdn_token(server, "+44 7700 900124", "US"))
    assert refused(msisdn_token(server, "07700 900999"), "phone number matches a pattern on the server's deny")
    assert refused(msisdn_token(server, "+1 202 555 0143"), "no pending invite for this phone number")
    texted = server.http.post(V1 + "/store-invite", json={"medium": "msisdn", "address": "+1 202 555 0143",
                                                            "room_id": ROOM, "sender": "@alice:example.org"})
    assert texted.status_code == 200, texted.text
    assert passed(msisdn_token(server, "(202) 555-0143", "US"))  # an SMS invite admits that number
    # What reached the homeserver: exactly the requests that passed.
    sent = [json.loads(raw).get("email") or json.loads(raw)["phone_number"]
            for path, _, raw in client_homeserver.raw if "/register/" in path]
    assert sent == ["alice@example.com", "Someone@EXAMPLE.com", "x@eu.partner.example", "x@corp.example",
                    "x@a.b.corp.example", "Contractor-12@Agency.example", "Guest@Elsewhere.example",
                    "07700 900123", "+44 7700 900124", "(202) 555-0143"]
    assert "registration refused for email x@spam.example" in server.log()


def test_an_expired_invite_no_longer_admits(started):
    server = started(registration={"policy": {"invite_only": True}}, invites={"expire_after": "3s"})
    stored = server.http.post(V1 + "/store-invite", json={"medium": "email", "address": "guest@elsewhere.example",
                                                            "room_id": ROOM, "sender": "@alice:example.org"})
    assert stored.status_code == 200, stored.text
    assert passed(email_token(server, "guest@elsewhere.example"))
    wait_until(lambda: email_token(server, "guest@elsewhere.example").status_code == 403, 10, "the invite to expire")
    assert refused(email_token(server, "guest@elsewhere.example"), "no pending invite for this email address")


def test_allow_lists_without_invite_only_and_a_medium_without_lists(started):
    server = started(registration={"policy": {"email": {"domains": {"allow": ["example.com"]}}}})
    assert passed(email_token(server, "bob@example.com"))
    assert refused(email_token(server, "bob@example.org"), "this email address is not on the server's allow lists")
    assert passed(msisdn_token(server, "+1 202 555 0143"))  # no lists for phone numbers


def test_registration_not_allowed_at_all(started):
    server = started(registration={"policy": {"allowed": False, "email": {"domains": {"allow": ["example.com"]}}}})
    assert refused(email_token(server, "bob@example.com"), "Registration with an email address is not allowed")
    assert refused(msisdn_token(server, "07700 900123"), "Registration with a phone number is not allowed")


def test_a_homeserver_that_does_not_answer(started, client_homeserver, make_server):
    server = started()
    client_homeserver.stop()
    response = email_token(server, "bob@example.com")
    assert (response.status_code, response.json()["errcode"]) == (502, "M_UNKNOWN")
    invite = server.http.post(INVITE, headers={"Authorization": "Bearer tok"}, json={"user_id": "@bob:example.org"})
    assert (invite.status_code, invite.json()["errcode"]) == (502, "M_UNKNOWN")
    lonely = make_server()  # no homeserver.url
    lonely.start()
    response = email_token(lonely, "bob@example.com")
    assert (response.status_code, response.json()["errcode"]) == (503, "M_UNKNOWN")


ROLES_PEOPLE = [dict(PEOPLE[0], roles=["inviters", "staff"]), dict(PEOPLE[1], roles=["staff"]), PEOPLE[2]]


def test_3pid_invites_only_from_senders_with_a_role(make_server, client_homeserver):
    server = make_server(ROLES_PEOPLE)
    # Carol's roles are in a store of their own (README "Roles": every store's count).
    (server.root / "groups.yml").write_text(yaml.safe_dump([{"mxid": "@carol:example.org", "roles": ["admins"]}]))
    server.config["stores"].append({"name": "groups", "kind": "file", "path": "groups.yml",
                                    "sync": {"full_every": "1h"}})
    server.config.update(homeserver={"url": client_homeserver.url},
                         invites={"policy": {"senders": {"roles": ["inviters", "admins"]}}})
    server.start()
    wait_until(lambda: server.http.get("/_matrix-internal/profile/v1/@carol:example.org").json().get("roles"),
               60, "the first sync of both stores")
    client_homeserver.tokens.update({"alice-token": "@alice:example.org", "bob-token": "@bob:example.org",
                                     "carol-token": "@carol:example.org",
                                     "dan-token": "@dan:example.org"})  # dan: in no store
    threepid = {"id_server": "id.example.org", "id_access_token": "x", "medium": "email",
                "address": "guest@elsewhere.example"}

    def invite(token: str | None, body: Any, path: str = INVITE, query: str = "") -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return server.http.post(path + query, headers=headers, json=body)

    forbidden = "You may not invite people by email address or phone number"
    for token in ("bob-token", "dan-token"):
        response = invite(token, threepid)
        assert response.status_code == 403 and response.json()["errcode"] == "M_FORBIDDEN", response.text
        assert response.json()["error"].startswith(forbidden)
    # Either key makes it a 3PID invite, whatever the homeserver would make of the rest.
    assert invite("bob-token", {"medium": "email", "user_id": "@carol:example.org"}).status_code == 403
    assert invite("bob-token", {"address": "guest@elsewhere.example"}).status_code == 403
    assert not [p for p, _, _ in client_homeserver.raw if p.endswith("/invite")]  # none reached it
    # By Matrix ID: anyone, passed on unchanged (r0 too); the homeserver's answer relayed.
    by_mxid = invite("bob-token", {"user_id": "@carol:example.org", "reason": "tea"}, INVITE.replace("/v3/", "/r0/"))
    assert (by_mxid.status_code, by_mxid.json()) == (200, {})
    path, headers, raw = client_homeserver.raw[-1]
    assert path == INVITE.replace("/v3/", "/r0/") and json.loads(raw) == {"user_id": "@carol:example.org",
                                                                          "reason": "tea"}
    assert headers["authorization"] == "Bearer bob-token" and headers["x-forwarded-for"] == "127.0.0.1"
    # A sender with one of the roles (in any store): passed on, the token in the query string as well.
    assert invite("alice-token", threepid).status_code == 200
    assert invite("carol-token", threepid).status_code == 200
    assert invite(None, threepid, query="?access_token=alice-token").status_code == 200
    assert client_homeserver.raw[-1][0] == INVITE + "?access_token=alice-token"
    # Without a token, or with one the homeserver refuses: the homeserver's errors, from us.
    missing = invite(None, threepid)
    assert (missing.status_code, missing.json()["errcode"]) == (401, "M_MISSING_TOKEN")
    unknown = invite("stolen", threepid)
    assert (unknown.status_code, unknown.json()["errcode"]) == (401, "M_UNKNOWN_TOKEN")
    not_json = server.http.post(INVITE, headers={"Authorization": "Bearer alice-token"}, content=b"{nope")
    assert (not_json.status_code, not_json.json()["errcode"]) == (400, "M_NOT_JSON")
    # createRoom's invite_3pid is held to the same roles; a room without it is anyone's to create.
    create = "/_matrix/client/v3/createRoom"
    with_invite = {"name": "Tea", "invite_3pid": [threepid]}
    refused = invite("bob-token", with_invite, create)
    assert refused.status_code == 403 and refused.json()["error"].startswith(forbidden)
    assert invite("alice-token", with_invite, create).json()["room_id"].startswith("!new")
    for body in ({"name": "Tea"}, {"name": "Tea", "invite_3pid": []}):
        assert invite("bob-token", body, create.replace("/v3/", "/r0/")).status_code == 200
    assert [json.loads(raw) for p, _, raw in client_homeserver.raw if "createRoom" in p] == [
        with_invite, {"name": "Tea"}, {"name": "Tea", "invite_3pid": []}]
    assert "3PID invite refused: @bob:example.org has none of the roles" in server.log()


def test_by_default_anyone_may_invite_by_3pid(started, client_homeserver):
    server = started()
    client_homeserver.tokens["bob-token"] = "@bob:example.org"
    response = server.http.post(INVITE, headers={"Authorization": "Bearer bob-token"}, json={
        "id_server": "id.example.org", "id_access_token": "x", "medium": "email", "address": "x@elsewhere.example"})
    assert (response.status_code, response.json()) == (200, {})
    # No whoami was needed to decide.
    assert not [r for r in client_homeserver.requests if r[1].endswith("/whoami")]
