"""Black-box tests of accounts, terms, validation sessions, bind and unbind against `mxisd run`,
with a fake homeserver (HTTPS), a real SMTP listener and a fake Twilio."""

from __future__ import annotations

import re
import signal
import time
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from sanic.compat import Header
from sanic.request import Request
from signedjson.key import decode_verify_key_bytes, generate_signing_key
from signedjson.sign import verify_signed_json
from unpaddedbase64 import decode_base64

from indexer.cache import Cache
from indexer.normalize import lookup_hash
from server.api import query_params
from server.services.binding import our_names
from server.token_cache import TOKEN_TRUST_S
from tests.conftest import V1, V2, started, typed_config, wait_until

DAVE = "@dave:example.org"
TERMS = {
    "privacy": {"version": "1.0",
                "en": {"name": "Privacy", "url": "https://example.org/privacy-1.0-en.html"},
                "fr": {"name": "Confidentialité", "url": "https://example.org/privacy-1.0-fr.html"}},
    "tos": {"version": "2", "en": {"name": "Terms", "url": "https://example.org/tos-2-en.html"}},
}


@pytest.fixture
def server(make_server, redis_url, prefix):
    srv = make_server()
    Cache(redis.Redis.from_url(redis_url, decode_responses=True), prefix).initialize(pepper="matrixrocks")
    return srv


def request_email(srv, address, secret, attempt=1, prefix=V2, headers=None, **extra):
    return srv.http.post(prefix + "/validate/email/requestToken", headers=headers,
                         json={"client_secret": secret, "email": address, "send_attempt": attempt, **extra})


def link_of(message):
    """The validation link's path and query, and its parameters."""
    link = re.search(r"https?://\S+/submitToken\?\S+", message.get_content()).group(0)
    parts = urlsplit(link)
    return f"{parts.path}?{parts.query}", {k: v[0] for k, v in parse_qs(parts.query).items()}


def validate_email(srv, mailbox, address, secret, prefix=V2, headers=None):
    """requestToken, read the mail, submit the token by POST; the sid."""
    recipient = address.lower()
    before = len(mailbox.to(recipient))
    response = request_email(srv, address, secret, prefix=prefix, headers=headers)
    assert response.status_code == 200, response.text
    sid = response.json()["sid"]
    wait_until(lambda: len(mailbox.to(recipient)) > before, what="the validation email")
    _, params = link_of(mailbox.to(recipient)[-1])
    assert params["sid"] == sid
    submitted = srv.http.post(prefix + "/validate/email/submitToken", headers=headers,
                              json={"sid": sid, "client_secret": secret, "token": params["token"]})
    assert submitted.status_code == 200 and submitted.json() == {"success": True}
    return sid


def v2_lookup(srv, headers, address, medium="email"):
    hashed = lookup_hash(address, medium, "matrixrocks")
    response = srv.http.post(V2 + "/lookup", headers=headers, json={
        "algorithm": "sha256", "pepper": "matrixrocks", "addresses": [hashed]})
    plain = srv.http.post(V2 + "/lookup", headers=headers, json={
        "algorithm": "none", "pepper": "matrixrocks", "addresses": [f"{address} {medium}"]})
    assert response.status_code == 200 and plain.status_code == 200, response.text
    found = response.json()["mappings"].get(hashed)
    assert plain.json()["mappings"].get(f"{address} {medium}") == found
    return found


@pytest.mark.parametrize("storage", ["sqlite", "postgresql"])
def test_email_flow_on_v2_register_validate_bind_find_unbind(server, homeserver, mailbox, storage, request):
    if storage == "postgresql":
        server.config["storage"] = {"url": request.getfixturevalue("postgres_url")}
    started(server)
    auth = server.register(homeserver, DAVE)
    assert server.http.get(V2 + "/account", headers=auth).json() == {"user_id": DAVE}
    assert v2_lookup(server, auth, "dave@example.net") is None

    sid = validate_email(server, mailbox, "Dave@Example.NET", "secret-1", headers=auth)
    [(recipients, message)] = mailbox.messages
    assert recipients == ["dave@example.net"] and message["To"] == "dave@example.net"
    assert "Example.org" in message["Subject"]
    validated = server.http.get(V2 + "/3pid/getValidated3pid", headers=auth,
                                params={"sid": sid, "client_secret": "secret-1"}).json()
    assert validated["medium"] == "email" and validated["address"] == "dave@example.net"
    assert validated["validated_at"] > 0

    bound = server.http.post(V2 + "/3pid/bind", headers=auth,
                             json={"sid": sid, "client_secret": "secret-1", "mxid": DAVE})
    assert bound.status_code == 200, bound.text
    association = bound.json()
    assert {k: association[k] for k in ("medium", "address", "mxid")} == {
        "medium": "email", "address": "dave@example.net", "mxid": DAVE}
    assert association["not_before"] == association["ts"] < association["not_after"]
    public = server.http.get(V2 + "/pubkey/ed25519:0").json()["public_key"]
    verify_signed_json(association, "id.example.org", decode_verify_key_bytes("ed25519:0", decode_base64(public)))

    # A v1 lookup answers the association the bind made, signature and all.
    assert server.lookup_v1("email", "dave@example.net") == association
    assert v2_lookup(server, auth, "dave@example.net") == DAVE
    bulk = server.http.post(V1 + "/bulk_lookup", json={"threepids": [["email", "DAVE@example.net"]]}).json()
    assert bulk == {"threepids": [["email", "DAVE@example.net", DAVE]]}

    # Unbinding needs no token: the validated session is the proof.
    unbound = server.http.post(V2 + "/3pid/unbind", json={
        "sid": sid, "client_secret": "secret-1", "mxid": DAVE,
        "threepid": {"medium": "email", "address": "dave@example.net"}})
    assert unbound.status_code == 200 and unbound.json() == {}
    assert server.lookup_v1("email", "dave@example.net") == {}
    assert v2_lookup(server, auth, "dave@example.net") is None


def test_email_flow_on_v1_with_the_link_and_a_form_bind(server, mailbox):
    started(server)
    response = request_email(server, "erin@example.net", "s3cret", prefix=V1,
                             next_link="https://app.example.org/done")
    assert response.status_code == 200
    wait_until(lambda: mailbox.to("erin@example.net"), what="the validation email")
    path, params = link_of(mailbox.to("erin@example.net")[0])
    wrong = server.http.get(path.replace(params["token"], "not-the-token"))
    assert wrong.status_code == 400 and "text/html" in wrong.headers["content-type"]
    assert "incorrect" in wrong.text
    clicked = server.http.get(path)  # opened in a browser: no token, a redirect to next_link
    assert clicked.status_code == 302 and clicked.headers["location"] == "https://app.example.org/done"
    bound = server.http.post(V1 + "/3pid/bind", data={
        "sid": params["sid"], "client_secret": "s3cret", "mxid": "@erin:example.org"})
    assert bound.status_code == 200, bound.text
    assert server.lookup_v1("email", "erin@example.net")["mxid"] == "@erin:example.org"


def test_link_without_next_link_shows_a_page(server, mailbox):
    started(server)
    request_email(server, "faye@example.net", "s3cret", prefix=V1)
    wait_until(lambda: mailbox.to("faye@example.net"), what="the validation email")
    path, _ = link_of(mailbox.to("faye@example.net")[0])
    page = server.http.get(path)
    assert page.status_code == 200 and "Address verified" in page.text


def test_configured_pages_after_the_link(server, mailbox, tmp_path):
    (tmp_path / "ok.html").write_text("<p>Thanks from Example Corp</p>")
    (tmp_path / "ko.html").write_text("<p>Example Corp says: %ERROR%</p>")
    server.config["sessions"] = {"pages": {"success": str(tmp_path / "ok.html"), "failure": str(tmp_path / "ko.html")}}
    started(server)
    request_email(server, "gail@example.net", "s3cret", prefix=V1)
    wait_until(lambda: mailbox.to("gail@example.net"), what="the validation email")
    path, params = link_of(mailbox.to("gail@example.net")[0])
    wrong = server.http.get(path.replace(params["token"], "<script>"))
    assert wrong.status_code == 400 and wrong.text == "<p>Example Corp says: The token is incorrect</p>"
    assert server.http.get(path).text == "<p>Thanks from Example Corp</p>"


def test_same_session_and_resend_only_on_a_higher_send_attempt(server, homeserver, mailbox):
    started(server)
    auth = server.register(homeserver, DAVE)
    first = request_email(server, "gil@example.net", "abc", 1, headers=auth).json()["sid"]
    wait_until(lambda: mailbox.to("gil@example.net"), what="the first email")
    assert request_email(server, "gil@example.net", "abc", 1, headers=auth).json()["sid"] == first
    time.sleep(1)  # a second message would have arrived by now
    assert len(mailbox.to("gil@example.net")) == 1
    assert request_email(server, "gil@example.net", "abc", 2, headers=auth).json()["sid"] == first
    wait_until(lambda: len(mailbox.to("gil@example.net")) == 2, what="the second email")
    other = request_email(server, "gil@example.net", "another-secret", 1, headers=auth).json()["sid"]
    assert other != first
    not_int = request_email(server, "gil@example.net", "abc", "twice", headers=auth)
    assert not_int.status_code == 400 and not_int.json()["errcode"] == "M_INVALID_PARAM"


def test_bad_addresses_and_secrets_send_nothing(server, homeserver, mailbox):
    started(server)
    auth = server.register(homeserver, DAVE)
    for address in ("not-an-address", "victim@example.net\r\nBcc: evil@example.net", "a b@example.net"):
        response = request_email(server, address, "abc", headers=auth)
        assert response.status_code == 400 and response.json()["errcode"] == "M_INVALID_EMAIL", address
    bad_secret = request_email(server, "ok@example.net", "no spaces allowed", headers=auth)
    assert bad_secret.status_code == 400 and bad_secret.json()["errcode"] == "M_INVALID_PARAM"
    missing = server.http.post(V2 + "/validate/email/requestToken", headers=auth, json={"email": "ok@example.net"})
    assert missing.status_code == 400 and missing.json()["errcode"] == "M_MISSING_PARAMS"
    time.sleep(1)
    assert mailbox.messages == []


def test_v1_lookups_of_a_binding_answer_the_association_the_bind_made(server, mailbox):
    started(server)
    sid = validate_email(server, mailbox, "erin@example.net", "abc", prefix=V1)
    before = int(time.time() * 1000)
    bound = server.http.post(V1 + "/3pid/bind", json={"sid": sid, "client_secret": "abc", "mxid": DAVE})
    after = int(time.time() * 1000)
    assert bound.status_code == 200, bound.text
    association = bound.json()
    # ts is when the association was made; it holds from then on (bindings do not lapse by themselves).
    assert before <= association["ts"] == association["not_before"] <= after
    assert association["not_after"] == association["ts"] + 100 * 365 * 24 * 3600 * 1000
    time.sleep(0.1)  # a lookup signing anew would now show another ts
    assert server.lookup_v1("email", "Erin@Example.NET") == association
    assert server.stop() == 0
    server.start()  # not a copy a worker kept: made again from the binding, with the same signature
    assert server.lookup_v1("email", "erin@example.net") == association
    # A store identity still gets an association signed for association_validity from now.
    store = server.lookup_v1("email", "alice@example.com")
    assert store["not_after"] - store["ts"] == 10 * 60 * 1000 and store["ts"] >= after


def test_v2_sessions_and_bind_need_a_token(server):
    started(server)
    assert request_email(server, "h@example.net", "abc").status_code == 401
    bind = server.http.post(V2 + "/3pid/bind", json={"sid": "x", "client_secret": "y", "mxid": DAVE})
    assert bind.status_code == 401 and bind.json()["errcode"] == "M_UNAUTHORIZED"


def test_sessions_errors(server, homeserver, mailbox):
    started(server)
    auth = server.register(homeserver, DAVE)
    sid = request_email(server, "ivy@example.net", "abc", headers=auth).json()["sid"]
    not_validated = server.http.get(V2 + "/3pid/getValidated3pid", headers=auth,
                                    params={"sid": sid, "client_secret": "abc"})
    assert not_validated.status_code == 400 and not_validated.json()["errcode"] == "M_SESSION_NOT_VALIDATED"
    bind = server.http.post(V2 + "/3pid/bind", headers=auth, json={"sid": sid, "client_secret": "abc", "mxid": DAVE})
    assert bind.status_code == 400 and bind.json()["errcode"] == "M_SESSION_NOT_VALIDATED"
    wrong_secret = server.http.get(V2 + "/3pid/getValidated3pid", headers=auth,
                                   params={"sid": sid, "client_secret": "abd"})
    assert wrong_secret.status_code == 404 and wrong_secret.json()["errcode"] == "M_NO_VALID_SESSION"
    wrong_token = server.http.post(V2 + "/validate/email/submitToken", headers=auth,
                                   json={"sid": sid, "client_secret": "abc", "token": "guess"})
    assert wrong_token.status_code == 400
    assert wrong_token.json() == {"errcode": "M_TOKEN_INCORRECT", "error": "The token is incorrect", "success": False}


def test_bind_to_someone_elses_mxid_is_refused(server, homeserver, mailbox):
    started(server)
    auth = server.register(homeserver, DAVE)
    sid = validate_email(server, mailbox, "dave@example.net", "abc", headers=auth)
    other = server.http.post(V2 + "/3pid/bind", headers=auth,
                             json={"sid": sid, "client_secret": "abc", "mxid": "@mallory:example.org"})
    assert other.status_code == 403 and other.json()["errcode"] == "M_UNAUTHORIZED"
    assert server.lookup_v1("email", "dave@example.net") == {}


def test_rebinding_replaces_the_earlier_binding(server, mailbox):
    started(server)
    for mxid, secret in (("@old:example.org", "one"), ("@new:example.org", "two")):
        sid = validate_email(server, mailbox, "shared@example.net", secret, prefix=V1)
        bound = server.http.post(V1 + "/3pid/bind", json={"sid": sid, "client_secret": secret, "mxid": mxid})
        assert bound.status_code == 200
        assert server.lookup_v1("email", "shared@example.net")["mxid"] == mxid
    # The old owner cannot remove what is no longer theirs.
    server.http.post(V1 + "/3pid/unbind", json={"sid": sid, "client_secret": "two", "mxid": "@old:example.org",
                                                "threepid": {"medium": "email", "address": "shared@example.net"}})
    assert server.lookup_v1("email", "shared@example.net")["mxid"] == "@new:example.org"


@pytest.mark.parametrize("prefer, expected", [("store", "@alice:example.org"), ("binding", "@mallory:example.org")])
def test_store_or_binding_wins_as_configured(server, mailbox, prefer, expected):
    server.config["lookup"]["prefer"] = prefer
    started(server)
    sid = validate_email(server, mailbox, "alice@example.com", "abc", prefix=V1)
    server.http.post(V1 + "/3pid/bind", json={"sid": sid, "client_secret": "abc", "mxid": "@mallory:example.org"})
    assert server.lookup_v1("email", "alice@example.com")["mxid"] == expected


def test_unbind_by_homeserver_signature(server, homeserver, mailbox):
    started(server)
    sid = validate_email(server, mailbox, "dave@example.net", "abc", prefix=V1)
    server.http.post(V1 + "/3pid/bind", json={"sid": sid, "client_secret": "abc", "mxid": DAVE})
    body = {"mxid": DAVE, "threepid": {"medium": "email", "address": "dave@example.net"}}
    uri = V2 + "/3pid/unbind"

    forged = homeserver.x_matrix(uri, "id.example.org", body, signing_key=generate_signing_key("hs1"))
    refused = server.http.post(uri, json=body, headers={"Authorization": forged})
    assert refused.status_code == 403 and refused.json()["errcode"] == "M_FORBIDDEN"
    other_body = dict(body, content_changed=True)
    replayed = server.http.post(uri, json=other_body, headers={"Authorization": homeserver.x_matrix(
        uri, "id.example.org", body)})
    assert replayed.status_code == 403
    no_proof = server.http.post(uri, json=body)
    assert no_proof.status_code == 403 and no_proof.json()["errcode"] == "M_FORBIDDEN"
    foreign = dict(body, mxid="@dave:elsewhere.org")
    not_theirs = server.http.post(uri, json=foreign, headers={"Authorization": homeserver.x_matrix(
        uri, "id.example.org", foreign)})
    assert not_theirs.status_code == 403
    assert server.lookup_v1("email", "dave@example.net")["mxid"] == DAVE

    signed = homeserver.x_matrix(uri, "id.example.org", body)
    assert server.http.post(uri, json=body, headers={"Authorization": signed}).status_code == 200
    assert server.lookup_v1("email", "dave@example.net") == {}


def test_unbind_signed_for_any_of_our_names(server, homeserver, mailbox):
    server.config["server"]["public_url"] = "https://Identity.Example.NET:8443/"
    started(server)
    sid = validate_email(server, mailbox, "dave@example.net", "abc", prefix=V1)
    body = {"mxid": DAVE, "threepid": {"medium": "email", "address": "dave@example.net"}}
    uri = V2 + "/3pid/unbind"

    def bind():
        bound = server.http.post(V1 + "/3pid/bind", json={"sid": sid, "client_secret": "abc", "mxid": DAVE})
        assert bound.status_code == 200 and server.lookup_v1("email", "dave@example.net")["mxid"] == DAVE

    # What a homeserver was told to reach us by: server.name, or public_url's host with or without its port.
    for destination in ("id.example.org", "identity.example.net", "identity.example.net:8443", "IDENTITY.example.net"):
        bind()
        signed = homeserver.x_matrix(uri, destination, body)
        unbound = server.http.post(uri, json=body, headers={"Authorization": signed})
        assert unbound.status_code == 200, (destination, unbound.text)
        assert server.lookup_v1("email", "dave@example.net") == {}
    # A homeserver that does not say which name it signed for may have used any of them.
    bind()
    unnamed = re.sub(r',destination="[^"]*"', "", homeserver.x_matrix(uri, "identity.example.net:8443", body))
    assert server.http.post(uri, json=body, headers={"Authorization": unnamed}).status_code == 200

    bind()
    elsewhere = homeserver.x_matrix(uri, "other.example.com", body)
    refused = server.http.post(uri, json=body, headers={"Authorization": elsewhere})
    assert refused.status_code == 403 and refused.json()["errcode"] == "M_FORBIDDEN"
    accepted = "id.example.org, identity.example.net, identity.example.net:8443"
    assert "'other.example.com'" in refused.json()["error"] and accepted in refused.json()["error"]
    assert f"unbind refused: signed for 'other.example.com', which is not a name of this server " \
           f"(it answers to {accepted})" in server.log()
    assert server.lookup_v1("email", "dave@example.net")["mxid"] == DAVE
    # The session is proof enough whatever name the client used.
    by_session = server.http.post(V1 + "/3pid/unbind", json={**body, "sid": sid, "client_secret": "abc"})
    assert by_session.status_code == 200 and server.lookup_v1("email", "dave@example.net") == {}


def test_our_names_default_ports():
    def names(server: dict[str, str]) -> list[str]:
        return our_names(typed_config(server=server).server)

    assert names({"name": "Example.org", "public_url": "https://id.example.org"}) == [
        "example.org", "id.example.org", "id.example.org:443"]
    assert names({"name": "id.example.org", "public_url": "http://[::1]:8090/"}) == [
        "id.example.org", "[::1]", "[::1]:8090"]


def test_unbind_needs_a_session_for_that_3pid(server, mailbox):
    started(server)
    sid = validate_email(server, mailbox, "dave@example.net", "abc", prefix=V1)
    server.http.post(V1 + "/3pid/bind", json={"sid": sid, "client_secret": "abc", "mxid": DAVE})
    other = validate_email(server, mailbox, "mallory@example.net", "xyz", prefix=V1)
    response = server.http.post(V1 + "/3pid/unbind", json={
        "sid": other, "client_secret": "xyz", "mxid": DAVE,
        "threepid": {"medium": "email", "address": "dave@example.net"}})
    assert response.status_code == 403 and response.json()["errcode"] == "M_FORBIDDEN"
    assert server.lookup_v1("email", "dave@example.net")["mxid"] == DAVE


def test_expired_session(server, mailbox):
    server.config["sessions"] = {"lifetime": "2s"}
    started(server)
    request_email(server, "late@example.net", "abc", prefix=V1)
    wait_until(lambda: mailbox.to("late@example.net"), what="the validation email")
    _, params = link_of(mailbox.to("late@example.net")[0])
    time.sleep(3)
    response = server.http.post(V1 + "/validate/email/submitToken", json=params)
    assert response.status_code == 400 and response.json()["errcode"] == "M_SESSION_EXPIRED"


def test_an_expired_session_is_forgotten_after_keep_expired(server, mailbox):
    server.config["sessions"] = {"lifetime": "1s", "keep_expired": "1s", "purge_every": "1s"}
    started(server)
    request_email(server, "gone@example.net", "abc", prefix=V1)
    wait_until(lambda: mailbox.to("gone@example.net"), what="the validation email")
    _, params = link_of(mailbox.to("gone@example.net")[0])
    wait_until(lambda: "forgot 1 expired validation sessions" in server.log(), what="the session to be forgotten")
    response = server.http.post(V1 + "/validate/email/submitToken", json=params)
    assert response.status_code == 404 and response.json()["errcode"] == "M_NO_VALID_SESSION"


def test_token_guessing_is_cut_off(server, mailbox):
    server.config["sessions"] = {"max_token_attempts": 3}
    started(server)
    request_email(server, "target@example.net", "abc", prefix=V1)
    wait_until(lambda: mailbox.to("target@example.net"), what="the validation email")
    _, params = link_of(mailbox.to("target@example.net")[0])
    for guess in range(3):
        wrong = server.http.post(V1 + "/validate/email/submitToken", json=dict(params, token=f"guess{guess}"))
        assert wrong.json()["errcode"] == "M_TOKEN_INCORRECT"
    right = server.http.post(V1 + "/validate/email/submitToken", json=params)
    assert right.status_code == 400 and right.json()["errcode"] == "M_SESSION_EXPIRED"
    # Asking again sends a new token, which works.
    assert request_email(server, "target@example.net", "abc", 2, prefix=V1).json()["sid"] == params["sid"]
    wait_until(lambda: len(mailbox.to("target@example.net")) == 2, what="the second email")
    _, fresh = link_of(mailbox.to("target@example.net")[1])
    assert fresh["token"] != params["token"]
    assert server.http.post(V1 + "/validate/email/submitToken", json=fresh).json() == {"success": True}


def test_request_token_is_rate_limited_per_address(server, mailbox):
    server.config["sessions"] = {"rate_limit": {"per_address": {"requests": 2, "window": "1h"}}}
    started(server)
    for attempt in (1, 2):
        assert request_email(server, "spam@example.net", "abc", attempt, prefix=V1).status_code == 200
    limited = request_email(server, "spam@example.net", "abc", 3, prefix=V1)
    assert limited.status_code == 429 and limited.json()["errcode"] == "M_LIMIT_EXCEEDED"
    assert 0 < limited.json()["retry_after_ms"] <= 3600_000
    assert request_email(server, "other@example.net", "abc", 1, prefix=V1).status_code == 200


def test_email_that_cannot_be_sent(server, mailbox):
    server.config["email"]["smtp"]["port"] = 1  # nothing listens there
    started(server)
    response = request_email(server, "x@example.net", "abc", prefix=V1)
    assert response.status_code == 500 and response.json()["errcode"] == "M_EMAIL_SEND_ERROR"
    assert "could not send the email validation message" in server.log()


def test_header_values_cannot_add_headers(server, mailbox, tmp_path):
    template = tmp_path / "validation.eml"
    template.write_text("Subject: Verify %RECIPIENT_ADDRESS%\nX-Link: %VALIDATION_LINK%\nX-Next: %NEXT_URL%\n"
                        "From: %FROM_EMAIL%\nTo: %RECIPIENT_ADDRESS%\n\nToken %VALIDATION_TOKEN%\n%VALIDATION_LINK%\n")
    server.config["email"]["templates"] = {"validation": str(template)}
    started(server)
    response = request_email(server, "h@example.net", "abc", prefix=V1,
                             next_link="https://x.example/\r\nBcc: evil@example.net")
    assert response.status_code == 200
    wait_until(lambda: mailbox.to("h@example.net"), what="the email")
    [(recipients, message)] = mailbox.messages
    assert recipients == ["h@example.net"] and "Bcc" not in message and message["Subject"] == "Verify h@example.net"


def test_msisdn_flow_as_synapse_and_element_do_it(server, homeserver, twilio):
    started(server)
    # Synapse, as account_threepid_delegates.msisdn, calls the v1 session endpoints.
    response = server.http.post(V1 + "/validate/msisdn/requestToken", json={
        "client_secret": "abc", "country": "GB", "phone_number": "07400 123456", "send_attempt": 1})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["msisdn"] == "447400123456" and answer["intl_fmt"] == "+44 7400 123456"
    [sms] = twilio.sent
    assert sms["To"] == "+447400123456" and sms["From"] == "+15005550006"
    code = re.search(r"\b(\d{6})\b", sms["Body"]).group(1)
    submitted = server.http.post(V1 + "/validate/msisdn/submitToken",
                                 json={"sid": answer["sid"], "client_secret": "abc", "token": code})
    assert submitted.json() == {"success": True}
    validated = server.http.get(V1 + "/3pid/getValidated3pid", params={"sid": answer["sid"], "client_secret": "abc"})
    assert validated.json()["address"] == "447400123456" and validated.json()["medium"] == "msisdn"
    auth = server.register(homeserver, DAVE)
    bound = server.http.post(V2 + "/3pid/bind", headers=auth,
                             json={"sid": answer["sid"], "client_secret": "abc", "mxid": DAVE})
    assert bound.status_code == 200 and bound.json()["address"] == "447400123456"
    assert v2_lookup(server, auth, "447400123456", "msisdn") == DAVE


def test_msisdn_errors(server, twilio):
    started(server)

    def request(**body):
        return server.http.post(V1 + "/validate/msisdn/requestToken", json={
            "client_secret": "abc", "send_attempt": 1, **body})

    bad = request(country="GB", phone_number="12")
    assert bad.status_code == 400 and bad.json()["errcode"] == "M_INVALID_ADDRESS"
    twilio.fail = True
    failed = request(country="GB", phone_number="07400 123457")
    assert failed.status_code == 400 and failed.json()["errcode"] == "M_SEND_ERROR"
    assert "Twilio refused the SMS to +447400123457 (HTTP 400)" in server.log()
    twilio.fail = False
    assert request(country="GB", phone_number="07400 123457").status_code == 200
    assert [s["To"] for s in twilio.sent] == ["+447400123457"]


def test_terms_must_be_accepted_in_some_language_of_every_policy(server, homeserver):
    server.config["terms"] = {"policies": TERMS}
    started(server)
    assert server.http.get(V2 + "/terms").json() == {"policies": TERMS}
    auth = server.register(homeserver, DAVE)
    blocked = server.http.get(V2 + "/hash_details", headers=auth)
    assert blocked.status_code == 403 and blocked.json()["errcode"] == "M_TERMS_NOT_SIGNED"
    assert server.http.get(V2 + "/account", headers=auth).status_code == 403

    unknown = server.http.post(V2 + "/terms", headers=auth, json={"user_accepts": ["https://evil.example/x"]})
    assert unknown.status_code == 400 and unknown.json()["errcode"] == "M_INVALID_PARAM"
    accepted = server.http.post(V2 + "/terms", headers=auth,
                                json={"user_accepts": ["https://example.org/privacy-1.0-fr.html"]})
    assert accepted.status_code == 200 and accepted.json() == {}
    assert server.http.get(V2 + "/hash_details", headers=auth).status_code == 403  # tos still missing
    # Acceptances accumulate: the client need not send the earlier ones again.
    server.http.post(V2 + "/terms", headers=auth, json={"user_accepts": ["https://example.org/tos-2-en.html"]})
    assert server.http.get(V2 + "/hash_details", headers=auth).status_code == 200
    assert server.http.get(V2 + "/account", headers=auth).json() == {"user_id": DAVE}


def test_no_policies_blocks_nothing(server, homeserver):
    started(server)
    assert server.http.get(V2 + "/terms").json() == {"policies": {}}
    auth = server.register(homeserver, DAVE)
    assert server.http.get(V2 + "/hash_details", headers=auth).status_code == 200


def test_register_errors_and_logout(server, homeserver):
    started(server)
    unknown = server.http.post(V2 + "/account/register", json={
        "access_token": "never-issued", "token_type": "Bearer", "matrix_server_name": "example.org", "expires_in": 60})
    assert unknown.status_code == 401 and unknown.json()["errcode"] == "M_UNAUTHORIZED"
    foreign = server.http.post(V2 + "/account/register", json=dict(
        homeserver.openid_token("@x:example.org"), matrix_server_name="other.example"))
    assert foreign.status_code == 403 and foreign.json()["errcode"] == "M_UNAUTHORIZED"
    invalid = server.http.post(V2 + "/account/register", json=dict(
        homeserver.openid_token("@x:example.org"), matrix_server_name="bad name!"))
    assert invalid.status_code == 400 and invalid.json()["errcode"] == "M_INVALID_PARAM"
    # The homeserver answers for a user that is not its own: refused.
    impostor = server.http.post(V2 + "/account/register", json=homeserver.openid_token("@x:evil.example"))
    assert impostor.status_code == 403

    registered = server.http.post(V2 + "/account/register", json=homeserver.openid_token(DAVE)).json()
    assert registered["token"] == registered["access_token"]
    auth = {"Authorization": f"Bearer {registered['token']}"}
    assert server.http.get(V2 + "/account", params={"access_token": registered["token"]}).json() == {"user_id": DAVE}
    assert server.http.post(V2 + "/account/logout", headers=auth).json() == {}
    gone = server.http.get(V2 + "/account", headers=auth)
    assert gone.status_code == 401 and gone.json()["errcode"] == "M_UNAUTHORIZED"
    assert server.http.post(V2 + "/account/logout", headers=auth).status_code == 401


def test_logout_reaches_every_worker_within_the_token_trust_bound(server, homeserver):
    server.config["server"]["workers"] = 2
    started(server)
    wait_until(lambda: server.log().count("Worker ready") >= 2, what="both workers")
    auth = server.register(homeserver, DAVE)

    def fresh(path):  # a new connection each time, so that the requests spread over the workers
        return httpx.get(server.url + path, headers=auth, timeout=10)

    # Both workers have checked (and remember) the token before the logout.
    assert all(fresh(V2 + "/hash_details").status_code == 200 for _ in range(20))
    assert server.http.post(V2 + "/account/logout", headers=auth).json() == {}
    time.sleep(TOKEN_TRUST_S)
    answers = [fresh(V2 + "/hash_details") for _ in range(20)]
    assert [a.status_code for a in answers] == [401] * 20
    assert {a.json()["errcode"] for a in answers} == {"M_UNAUTHORIZED"}


def test_homeserver_named_by_ip_literal_and_port_needs_no_discovery(server, homeserver):
    server.config["accounts"] = {"homeservers": ["*"]}
    started(server)
    name = f"127.0.0.1:{homeserver.port}"
    token = dict(homeserver.openid_token(f"@ip:{name}"), matrix_server_name=name)
    response = server.http.post(V2 + "/account/register", json=token)
    assert response.status_code == 200, response.text
    auth = {"Authorization": f"Bearer {response.json()['token']}"}
    assert server.http.get(V2 + "/account", headers=auth).json() == {"user_id": f"@ip:{name}"}


def test_homeserver_on_a_private_address_is_refused_unless_allowed(server, homeserver):
    server.config["federation"]["allow_private_networks"] = []
    started(server)
    response = server.http.post(V2 + "/account/register", json=homeserver.openid_token(DAVE))
    assert response.status_code == 502
    assert "which federation.allow_private_networks does not allow" in server.log()


def test_homeserver_with_an_untrusted_certificate_is_refused(server, homeserver, tmp_path):
    import trustme

    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    server.config["federation"]["ca_file"] = str(other_ca)
    started(server)
    response = server.http.post(V2 + "/account/register", json=homeserver.openid_token(DAVE))
    assert response.status_code == 502 and response.json()["errcode"] == "M_UNKNOWN"


def test_binding_survives_kill_and_a_lost_cache(server, mailbox, redis_url, prefix):
    started(server)
    sid = validate_email(server, mailbox, "dave@example.net", "abc", prefix=V1)
    bind = {"sid": sid, "client_secret": "abc", "mxid": DAVE}
    assert server.http.post(V1 + "/3pid/bind", json=bind).status_code == 200
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(timeout=30)
    client = redis.Redis.from_url(redis_url)
    client.delete(*client.scan_iter(match=f"{prefix}*"))  # the cache is gone too
    client.close()
    started(server)
    assert server.lookup_v1("email", "dave@example.net")["mxid"] == DAVE
    assert "lookup keys rebuilt from the database" in server.log()


def test_test_email_command(server, mailbox):
    server.config_path.write_text(__import__("yaml").safe_dump(server.config))
    result = server.cli("test-email", "Admin@Example.net")
    assert result.returncode == 0, result.stderr
    [(recipients, message)] = mailbox.messages
    assert recipients == ["admin@example.net"] and "test message" in message["Subject"]
    bad = server.cli("test-email", "not an address")
    assert bad.returncode == 2 and "not a valid email address" in bad.stderr
    server.config["email"]["smtp"]["port"] = 1  # nothing listens there
    server.config_path.write_text(__import__("yaml").safe_dump(server.config))
    down = server.cli("test-email", "admin@example.net")
    assert down.returncode == 1 and "test email to admin@example.net failed: SMTP server 127.0.0.1:1" in down.stderr




def test_bindings_come_back_when_redis_is_emptied_while_running(server, mailbox, redis_url, prefix):
    started(server)
    sid = validate_email(server, mailbox, "dave@example.net", "abc", prefix=V1)
    server.http.post(V1 + "/3pid/bind", json={"sid": sid, "client_secret": "abc", "mxid": DAVE})
    client = redis.Redis.from_url(redis_url)
    client.delete(*client.scan_iter(match=f"{prefix}*"))
    client.close()
    assert server.lookup_v1("email", "dave@example.net") == {}
    # The server checks every redis.check_every (5 s by default).
    wait_until(lambda: server.lookup_v1("email", "dave@example.net").get("mxid") == DAVE, timeout=30,
               what="the binding mirror to be rebuilt")


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")  # the fake's implicit-TLS mode
@pytest.mark.parametrize("tls", ["starttls", "tls"])
def test_email_over_starttls_with_login_and_over_implicit_tls(server, homeserver, tls):
    from tests.conftest import free_port
    from tests.fakes import Mailbox

    secure = Mailbox(free_port(), tls=tls, cert=homeserver.ca.issue_cert("localhost"),
                     login=("mxisd", "smtp-password"))
    try:
        server.config["email"]["smtp"] = {"host": "localhost", "port": secure.port, "tls": tls,
                                          "ca_file": str(homeserver.ca_file), "login": "mxisd",
                                          "password": "smtp-password"}
        started(server)
        assert request_email(server, "tls@example.net", "abc", prefix=V1).status_code == 200
        wait_until(lambda: secure.to("tls@example.net"), what="the email over TLS")
        assert secure.logins == ["mxisd"]
        assert "smtp-password" not in server.log()
    finally:
        secure.close()


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(["medium", "address", "a", "=", "&", "+", "%", "%2", "%40", "%6D", "%zz", "%C3",
                                 "%A9", ";"]), max_size=12).map("".join))
def test_query_params_read_the_query_as_sanic_args_do(query):
    request = Request(b"/_matrix/identity/api/v1/lookup?" + query.encode(), Header(), "1.1", "GET", None, None)
    assert query_params(request) == {name: values[0] for name, values in request.args.items()}
