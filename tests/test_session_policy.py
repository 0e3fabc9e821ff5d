"""Session control (sessions.policy) and lookup.share_binds, black-box against `mxisd run`: a file
store knows alice's email address and phone number (local addresses); dave's are known to no store
(remote addresses)."""

from __future__ import annotations

import re
import signal
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from indexer.cache import Cache
from indexer.normalize import lookup_hash
from tests.conftest import V1, V2, started, wait_until
from tests.fakes import FakeHomeserver

ALICE = "@alice:example.org"  # what the directory gives alice's addresses
DAVE = "@dave:example.org"  # a user of this domain that no store knows
ZED = "@zed:other.example"  # a user of another homeserver
PEOPLE = [{"localpart": "alice", "display_name": "Alice", "emails": ["alice@example.com"],
           "phones": ["+44 7400 123456"]}]
# (medium, local address, remote address), addresses canonical.
ADDRESSES = {"email": ("alice@example.com", "dave@example.net"), "msisdn": ("447400123456", "447400123457")}
PEPPER = "matrixrocks"


@pytest.fixture
def policy_server(make_server, redis_url, prefix):
    """A server (not started) whose store knows alice, with sessions.policy set by the test."""
    def build(policy: dict[str, Any], lookup: dict[str, Any] | None = None) -> Any:
        srv = make_server(PEOPLE)
        srv.config["sessions"] = {"policy": policy}
        srv.config["lookup"] = {**srv.config["lookup"], **(lookup or {})}
        Cache(redis.Redis.from_url(redis_url, decode_responses=True), prefix).initialize(pepper=PEPPER)
        return srv
    return build


def request_token(srv, medium, address, secret, prefix=V1, headers=None):
    """requestToken for a canonical address (a phone number as +<digits> with no country needed)."""
    body: dict[str, Any] = {"client_secret": secret, "send_attempt": 1}
    if medium == "email":
        body["email"] = address
    else:
        body.update(country="GB", phone_number=f"+{address}")
    return srv.http.post(f"{prefix}/validate/{medium}/requestToken", headers=headers, json=body)


def validate(srv, mailbox, twilio, medium, address, secret, prefix=V1, headers=None):
    """A session that validated address: requestToken, the token read from the message, submitToken; its sid."""
    response = request_token(srv, medium, address, secret, prefix, headers)
    assert response.status_code == 200, response.text
    sid = response.json()["sid"]
    if medium == "email":
        wait_until(lambda: mailbox.to(address), what="the validation email")
        token = re.search(r"token=([\w-]+)", mailbox.to(address)[-1].get_content()).group(1)
    else:
        wait_until(lambda: [m for m in twilio.sent if m["To"] == f"+{address}"], what="the validation SMS")
        token = re.search(r"\b(\d{6})\b", [m for m in twilio.sent if m["To"] == f"+{address}"][-1]["Body"]).group(1)
    submitted = srv.http.post(f"{prefix}/validate/{medium}/submitToken", headers=headers,
                              json={"sid": sid, "client_secret": secret, "token": token})
    assert submitted.status_code == 200 and submitted.json() == {"success": True}, submitted.text
    return sid


def bind(srv, sid, secret, mxid, headers=None):
    """/3pid/bind: on v2 with headers (a token), else on v1."""
    prefix = V2 if headers else V1
    return srv.http.post(prefix + "/3pid/bind", headers=headers, json={"sid": sid, "client_secret": secret,
                                                                         "mxid": mxid})


def forbidden(response, words):
    assert response.status_code == 403, response.text
    assert response.json()["errcode"] == "M_FORBIDDEN" and words in response.json()["error"], response.text


@pytest.mark.parametrize("denied", ["local", "remote"])
def test_deny_refuses_to_validate_that_kind_of_address_on_v1_and_v2(policy_server, homeserver, mailbox, twilio,
                                                                   denied):
    allowed = "remote" if denied == "local" else "local"
    srv = started(policy_server({"email": {denied: "deny"}, "msisdn": {denied: "deny"}}))
    auth = srv.register(homeserver, DAVE)
    why = "of its organisation's directory" if denied == "local" else "known to its organisation's directory"
    for medium, (local, remote) in ADDRESSES.items():
        refused, accepted = (local, remote) if denied == "local" else (remote, local)
        forbidden(request_token(srv, medium, refused, "s1"), why)
        forbidden(request_token(srv, medium, refused, "s2", V2, auth), why)
        # The other kind of address is validated and bound as before.
        sid = validate(srv, mailbox, twilio, medium, accepted, f"ok-{medium}")
        target = ALICE if allowed == "local" else DAVE
        assert bind(srv, sid, f"ok-{medium}", target).status_code == 200
    assert [m for m in twilio.sent if m["To"] == f"+{ADDRESSES['msisdn'][0 if denied == 'local' else 1]}"] == []
    assert mailbox.to(ADDRESSES["email"][0 if denied == "local" else 1]) == []


def test_a_medium_can_be_closed_to_validation(policy_server, homeserver, mailbox, twilio):
    srv = started(policy_server({"msisdn": {"enabled": False}}))
    auth = srv.register(homeserver, DAVE)
    for address in ADDRESSES["msisdn"]:
        forbidden(request_token(srv, "msisdn", address, "s1"), "does not validate phone numbers")
        forbidden(request_token(srv, "msisdn", address, "s1", V2, auth), "does not validate phone numbers")
    assert twilio.sent == []
    validate(srv, mailbox, twilio, "email", "dave@example.net", "s2", V2, auth)


@pytest.mark.parametrize("medium", ["email", "msisdn"])
def test_bind_only_own_binds_a_local_address_only_to_its_directory_mxid(policy_server, homeserver, mailbox,
                                                                        twilio, medium):
    srv = started(policy_server({medium: {"local": "bind_only_own"}}))
    local, remote = ADDRESSES[medium]
    dave, alice = srv.register(homeserver, DAVE), srv.register(homeserver, ALICE)
    sid = validate(srv, mailbox, twilio, medium, local, "s1", V2, dave)
    why = "only be bound to the Matrix ID the directory gives it"
    forbidden(bind(srv, sid, "s1", DAVE, dave), why)
    forbidden(bind(srv, sid, "s1", DAVE), why)
    forbidden(bind(srv, sid, "s1", ZED), why)
    assert bind(srv, sid, "s1", ALICE, alice).status_code == 200
    assert bind(srv, sid, "s1", ALICE).status_code == 200
    # A remote address is bound to anyone, as before.
    other = validate(srv, mailbox, twilio, medium, remote, "s2")
    assert bind(srv, other, "s2", DAVE, dave).status_code == 200


@pytest.mark.parametrize("bind_to", ["other_domains", "this_domain"])
def test_bind_only_own_for_remote_addresses_as_configured(policy_server, homeserver, mailbox, twilio, bind_to):
    policy = {"email": {"remote": "bind_only_own"}, "msisdn": {"remote": "bind_only_own"}}
    srv = started(policy_server({**policy, "remote_bind_to": bind_to}))
    dave, alice = srv.register(homeserver, DAVE), srv.register(homeserver, ALICE)
    for medium, (local, remote) in ADDRESSES.items():
        sid = validate(srv, mailbox, twilio, medium, remote, f"r-{medium}", V2, dave)
        if bind_to == "other_domains":
            why = "cannot be bound to a Matrix ID of example.org"
            forbidden(bind(srv, sid, f"r-{medium}", DAVE, dave), why)
            forbidden(bind(srv, sid, f"r-{medium}", DAVE), why)
            assert bind(srv, sid, f"r-{medium}", ZED).status_code == 200
        else:
            forbidden(bind(srv, sid, f"r-{medium}", ZED), "can only be bound to a Matrix ID of example.org")
            assert bind(srv, sid, f"r-{medium}", DAVE, dave).status_code == 200
        # A local address is bound as before (even to a Matrix ID the directory does not give it).
        own = validate(srv, mailbox, twilio, medium, local, f"l-{medium}")
        assert bind(srv, own, f"l-{medium}", ALICE, alice).status_code == 200


def test_a_reload_that_tightens_the_policy_applies_to_started_sessions(policy_server, homeserver, mailbox, twilio):
    srv = policy_server({})
    # Polled below until the reload applies: more requests than the default limit lets through.
    many = {"requests": 1000, "window": "1h"}
    srv.config["sessions"]["rate_limit"] = {"per_address": many, "per_ip": many}
    started(srv)
    auth = srv.register(homeserver, DAVE)
    address = "dave@example.net"
    # One session validated, one whose token is not submitted yet.
    validated = validate(srv, mailbox, twilio, "email", address, "s1", V2, auth)
    pending = request_token(srv, "email", address, "s2", V2, auth)
    assert pending.status_code == 200
    wait_until(lambda: len(mailbox.to(address)) == 2, what="the second email")
    token = re.search(r"token=([\w-]+)", mailbox.to(address)[-1].get_content()).group(1)

    srv.config["sessions"]["policy"] = {"email": {"remote": "deny"}}
    srv.config_path.write_text(yaml.safe_dump(srv.config))
    assert srv.process is not None
    srv.process.send_signal(signal.SIGHUP)
    wait_until(lambda: request_token(srv, "email", address, "s3").status_code == 403, what="the reload")

    why = "only validates email addresses known to its organisation's directory"
    submitted = srv.http.post(V2 + "/validate/email/submitToken", headers=auth,
                              json={"sid": pending.json()["sid"], "client_secret": "s2", "token": token})
    forbidden(submitted, why)
    assert submitted.json()["success"] is False
    # The link in the message shows the refusal too.
    link = re.search(r"https?://\S+/submitToken\?\S+", mailbox.to(address)[-1].get_content()).group(0)
    page = srv.http.get(link[link.index("/_matrix"):])
    assert page.status_code == 403 and "known to its organisation" in page.text
    forbidden(srv.http.get(V2 + "/3pid/getValidated3pid", headers=auth,
                           params={"sid": validated, "client_secret": "s1"}), why)
    forbidden(bind(srv, validated, "s1", DAVE, auth), why)
    assert srv.lookup_v1("email", address) == {}


def v2_lookup(srv, headers, address, medium):
    """The mxid a v2 lookup finds for address, by sha256 and by "none" (both must agree)."""
    hashed = lookup_hash(address, medium, PEPPER)
    by_hash = srv.http.post(V2 + "/lookup", headers=headers, json={
        "algorithm": "sha256", "pepper": PEPPER, "addresses": [hashed]})
    plain = srv.http.post(V2 + "/lookup", headers=headers, json={
        "algorithm": "none", "pepper": PEPPER, "addresses": [f"{address} {medium}"]})
    assert by_hash.status_code == 200 and plain.status_code == 200, by_hash.text + plain.text
    found = by_hash.json()["mappings"].get(hashed)
    assert plain.json()["mappings"].get(f"{address} {medium}") == found
    return found


def v1_lookups(srv, address, medium, forwarded_for):
    """(the mxid of a v1 lookup, that of a v1 bulk lookup), for a client at forwarded_for."""
    headers = {"X-Forwarded-For": forwarded_for}
    single = srv.http.get(V1 + "/lookup", headers=headers, params={"medium": medium, "address": address})
    bulk = srv.http.post(V1 + "/bulk_lookup", headers=headers, json={"threepids": [[medium, address]]})
    assert single.status_code == 200 and bulk.status_code == 200, single.text + bulk.text
    return single.json().get("mxid"), [t[2] for t in bulk.json()["threepids"]]


@pytest.fixture
def other_homeserver(tmp_path: Path) -> Any:
    """The homeserver of other.example, whose users can register here too."""
    root = tmp_path / "other-hs"
    root.mkdir()
    hs = FakeHomeserver("other.example", root)
    yield hs
    hs.close()


@pytest.mark.parametrize("share", [False, True])
def test_share_binds_false_keeps_binds_of_local_addresses_from_other_servers(
        policy_server, homeserver, other_homeserver, mailbox, twilio, tmp_path, share):
    # prefer: binding, so that a bind is what lookups answer even for an address a store knows.
    srv = policy_server({}, {"share_binds": share, "prefer": "binding"})
    cas = tmp_path / "cas.pem"
    cas.write_text(homeserver.ca_file.read_text() + other_homeserver.ca_file.read_text())
    srv.config["federation"]["ca_file"] = str(cas)
    srv.config["federation"]["overrides"]["other.example"] = f"127.0.0.1:{other_homeserver.port}"
    srv.config["accounts"] = {"homeservers": ["example.org", "other.example"]}
    # Behind one reverse proxy; clients of 10.0.0.0/8 are local (they may recurse).
    srv.config["server"]["proxies_count"] = 1
    srv.config["recursion"] = {"allow": ["10.0.0.0/8"]}
    started(srv)
    ours, theirs = srv.register(homeserver, DAVE), srv.register(other_homeserver, ZED)
    inside, outside = "10.1.2.3", "203.0.113.9"

    for medium, (local, remote) in ADDRESSES.items():
        # alice binds her directory address to a second account; dave binds a remote address.
        sid = validate(srv, mailbox, twilio, medium, local, f"l-{medium}")
        assert bind(srv, sid, f"l-{medium}", DAVE).status_code == 200
        other = validate(srv, mailbox, twilio, medium, remote, f"r-{medium}")
        assert bind(srv, other, f"r-{medium}", DAVE).status_code == 200

        # Local lookups see the bind: v2 with a token of example.org, v1 from the local network.
        assert v2_lookup(srv, ours, local, medium) == DAVE
        assert v1_lookups(srv, local, medium, inside) == (DAVE, [DAVE])
        # Lookups from other servers see it only when binds are shared; they then get the directory's answer.
        expected = DAVE if share else ALICE
        assert v2_lookup(srv, theirs, local, medium) == expected
        assert v1_lookups(srv, local, medium, outside) == (expected, [expected])
        # A bind of a remote address is answered to everyone.
        assert v2_lookup(srv, theirs, remote, medium) == DAVE
        assert v1_lookups(srv, remote, medium, outside) == (DAVE, [DAVE])


def test_a_bind_of_someone_who_left_stays_inside_even_after_the_cache_is_lost(policy_server, mailbox, twilio,
                                                                               redis_url, prefix):
    srv = policy_server({}, {"share_binds": False})
    others = [{"localpart": name, "emails": [f"{name}@example.com"]} for name in ("bob", "carol")]
    srv.write_people(PEOPLE + others)
    srv.config["server"]["proxies_count"] = 1
    srv.config["recursion"] = {"allow": ["10.0.0.0/8"]}
    started(srv)
    address = "alice@example.com"
    sid = validate(srv, mailbox, twilio, "email", address, "s1")
    assert bind(srv, sid, "s1", ALICE).status_code == 200
    inside, outside = "10.1.2.3", "203.0.113.9"
    assert v1_lookups(srv, address, "email", outside) == (ALICE, [ALICE])  # the directory's own answer

    # Alice leaves the directory: only local lookups still find her binding.
    srv.write_people(others)
    assert srv.cli("index").returncode == 0
    wait_until(lambda: v1_lookups(srv, address, "email", outside) == (None, []), what="the sync")
    assert v1_lookups(srv, address, "email", inside) == (ALICE, [ALICE])

    # The mirror rebuilt from SQL after Redis lost everything keeps the binding inside.
    client = redis.Redis.from_url(redis_url)
    client.delete(*client.scan_iter(match=f"{prefix}*"))
    client.close()
    wait_until(lambda: v1_lookups(srv, address, "email", inside) == (ALICE, [ALICE]), timeout=60,
               what="the binding mirror to be rebuilt")
    assert v1_lookups(srv, address, "email", outside) == (None, [])
