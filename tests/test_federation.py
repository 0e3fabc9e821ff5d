"""Homeserver discovery by SRV (with a small DNS server of the test's own) and the address policy."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from server.federation import Federation, FederationError, split_server_name
from tests.conftest import typed_config


class TinyDns:
    """Answers SRV queries from a dict over UDP on 127.0.0.1; NXDOMAIN for everything else."""

    def __init__(self, srv: dict[str, str]) -> None:
        self.srv = srv
        self.queries: list[str] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            query = dns.message.from_wire(data)
            question = query.question[0]
            name = question.name.to_text().rstrip(".")
            self.queries.append(name)
            response = dns.message.make_response(query)
            if question.rdtype == dns.rdatatype.SRV and name in self.srv:
                response.answer.append(dns.rrset.from_text(question.name, 60, "IN", "SRV", self.srv[name]))
            else:
                response.set_rcode(dns.rcode.NXDOMAIN)
            self.sock.sendto(response.to_wire(), peer)

    def close(self) -> None:
        self.sock.close()


def federation(homeserver, dns_port: int | None = None, allow: list[str] | None = None) -> Federation:
    fed = Federation(typed_config(federation={
        "allow_private_networks": ["127.0.0.1/32"] if allow is None else allow, "timeout_s": 5,
        "ca_file": str(homeserver.ca_file)}).federation)
    if dns_port is not None:
        fed.resolver.nameservers = ["127.0.0.1"]
        fed.resolver.port = dns_port
    return fed


def test_srv_record_finds_the_homeserver_and_tls_checks_the_server_name(homeserver):
    # The fake homeserver's certificate names example.org; SRV sends us to localhost:<its port>.
    server = TinyDns({"_matrix-fed._tcp.example.org": f"10 5 {homeserver.port} localhost."})
    fed = federation(homeserver, server.port)

    async def check():
        target = await fed.resolve("example.org")
        token = homeserver.openid_token("@srv:example.org")["access_token"]
        user = await fed.openid_user("example.org", token)
        await fed.close()
        return target, user

    try:
        target, user = asyncio.run(check())
    finally:
        server.close()
    assert (target.port, target.tls_name, target.host_header) == (homeserver.port, "example.org", "example.org")
    assert target.via.endswith(f"; SRV record _matrix-fed._tcp.example.org names localhost:{homeserver.port}")
    assert user == "@srv:example.org"
    assert "_matrix-fed._tcp.example.org" in server.queries


def test_the_deprecated_srv_name_is_tried_second(homeserver):
    server = TinyDns({"_matrix._tcp.example.org": f"10 5 {homeserver.port} localhost."})
    fed = federation(homeserver, server.port)
    try:
        target = asyncio.run(fed.resolve("example.org"))
    finally:
        server.close()
    assert target.port == homeserver.port
    assert server.queries.index("_matrix-fed._tcp.example.org") < server.queries.index("_matrix._tcp.example.org")


def test_a_certificate_for_another_name_is_refused(homeserver):
    server = TinyDns({"_matrix-fed._tcp.other.example": f"10 5 {homeserver.port} localhost."})
    fed = federation(homeserver, server.port)

    async def check():
        try:
            return await fed.openid_user("other.example", "x")
        finally:
            await fed.close()

    try:
        with pytest.raises(FederationError, match="cannot be reached"):
            asyncio.run(check())
    finally:
        server.close()


class WellKnown:
    """https://localhost/.well-known/matrix/server (on a free port), delegating to `delegate`."""

    def __init__(self, ca, delegate: str) -> None:
        self.hits = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                fake.hits += 1
                body = json.dumps({"m.server": delegate}).encode() if self.path == "/.well-known/matrix/server" else b""
                self.send_response(200 if body else 404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert("localhost").configure_cert(context)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_well_known_delegation_is_followed_and_cached(homeserver):
    well_known = WellKnown(homeserver.ca, f"127.0.0.1:{homeserver.port}")
    fed = federation(homeserver)
    fed.well_known_port = well_known.port
    token = homeserver.openid_token("@wk:localhost")["access_token"]

    async def check():
        try:
            first = await fed.resolve("localhost")
            user = await fed.openid_user("localhost", token)
            return first, user
        finally:
            await fed.close()

    try:
        target, user = asyncio.run(check())
    finally:
        well_known.close()
    assert target.host_header == f"127.0.0.1:{homeserver.port}"
    assert (target.ip, target.port) == ("127.0.0.1", homeserver.port)
    assert target.via == f"its .well-known/matrix/server delegates to 127.0.0.1:{homeserver.port}"
    assert user == "@wk:localhost"
    assert well_known.hits == 1  # the second resolution came from the cache


def test_tls_verification_can_be_turned_off(homeserver):
    fed = Federation(typed_config(federation={
        "overrides": {"example.org": f"127.0.0.1:{homeserver.port}"}, "allow_private_networks": ["127.0.0.1"],
        "timeout_s": 5, "verify_tls": False}).federation)
    token = homeserver.openid_token("@novfy:example.org")["access_token"]

    async def check():
        try:
            return await fed.openid_user("example.org", token)
        finally:
            await fed.close()

    assert asyncio.run(check()) == "@novfy:example.org"


def test_loopback_is_refused_unless_allowed(homeserver):
    fed = federation(homeserver, allow=[])
    with pytest.raises(FederationError, match="allow_private_networks"):
        asyncio.run(fed.resolve(f"127.0.0.1:{homeserver.port}"))
    with pytest.raises(FederationError, match="allow_private_networks"):
        asyncio.run(fed.resolve("localhost:8448"))


@pytest.mark.parametrize("name, expected", [
    ("example.org", ("example.org", None)), ("example.org:8448", ("example.org", 8448)),
    ("1.2.3.4:80", ("1.2.3.4", 80)), ("[::1]:8448", ("[::1]", 8448)),
])
def test_server_names(name, expected):
    assert split_server_name(name) == expected


@pytest.mark.parametrize("name", ["", "bad name", "example.org:0", "example.org:99999", "[nothex]", "a:b:c"])
def test_invalid_server_names(name):
    with pytest.raises(ValueError):
        split_server_name(name)
