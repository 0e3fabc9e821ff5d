"""Hostile requests over real HTTP against `mxisd run`: whatever a client sends, the answer is a
Matrix error with the right status, never a 500 or a traceback, and nothing odd reaches the homeserver."""

from __future__ import annotations

import json
import re
import socket
from typing import Any

import pytest
import redis

from indexer.cache import Cache
from tests.conftest import REPO, V1, V2, started
from tests.fake_homeserver import ClientHomeserver

HS_TOKEN = "syt_searcher_token"
MAX_BODY = 64 * 1024


def raw_request(port: int, head: bytes, body: bytes = b"", timeout: float = 10.0) -> tuple[int, dict[str, str], Any]:
    """Send bytes as they are (headers httpx would refuse to send) and read one answer: status,
    headers (lower-case names) and the body (parsed when it is JSON)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head + b"\r\n" + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        header_block, _, rest = data.partition(b"\r\n\r\n")
        lines = header_block.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
    content = rest[:length]
    return status, headers, json.loads(content) if headers.get("content-type") == "application/json" else content


def head(method: str, path: str, *headers: bytes, length: int | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: 127.0.0.1", b"Connection: close", *headers]
    if length is not None:
        lines += [b"Content-Type: application/json", f"Content-Length: {length}".encode()]
    return b"\r\n".join(lines) + b"\r\n"


@pytest.fixture
def server(make_server, client_homeserver: ClientHomeserver, redis_url, prefix):
    srv = make_server()
    srv.config["homeserver"] = {"url": client_homeserver.url}
    srv.config["server"]["max_body_size"] = MAX_BODY
    srv.config["lookup"]["bulk_max"] = 10_000
    srv.config["server"]["proxies_count"] = 1  # X-Forwarded-For is read, whatever bytes it holds
    srv.config["admin"] = {"token": "admin-secret-of-the-tests"}
    client_homeserver.tokens[HS_TOKEN] = "@searcher:example.org"
    client_homeserver.identity_server = srv.url
    Cache(redis.Redis.from_url(redis_url, decode_responses=True), prefix).initialize(pepper="pepper")
    return started(srv)


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


DEEP_OBJECT = b'{"a":' * 1000 + b"1" + b"}" * 1000


JSON_ROUTES = [
    V1 + "/bulk_lookup", V2 + "/lookup", V2 + "/account/register", V1 + "/store-invite", V2 + "/3pid/unbind",
    V1 + "/3pid/bind", V1 + "/validate/email/requestToken", V1 + "/validate/msisdn/submitToken",
    V1 + "/sign-ed25519", V2 + "/terms", "/_matrix-internal/identity/v1/check_credentials",
    "/_matrix/client/v3/login", "/_matrix/client/v3/user_directory/search",
    "/_mxisd/admin/v1/stores/people/sync",
]


def test_json_nested_a_thousand_deep_is_refused_as_bad_json(server):
    for path in JSON_ROUTES:
        token = HS_TOKEN if "user_directory" in path else "admin-secret-of-the-tests" if "admin" in path \
            else server.token()
        for body in (nested(1000), DEEP_OBJECT, b'{"threepids": ' + nested(500) + b"}"):
            response = server.http.post(path, content=body, headers={
                "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
            assert response.status_code == 400, (path, body[:20], response.text)
            assert response.json()["errcode"] in ("M_NOT_JSON", "M_BAD_JSON"), (path, response.text)
    # What a client really sends is still read.
    found = server.http.post(V1 + "/bulk_lookup", json={"threepids": [["email", "alice@example.com"]]}).json()
    assert found["threepids"] == [["email", "alice@example.com", "@alice:example.org"]]


def test_body_over_max_body_size_is_413_too_large(server):
    pairs = [["email", f"user{i}@example.com"] for i in range(MAX_BODY // 30)]
    response = server.http.post(V1 + "/bulk_lookup", json={"threepids": pairs})
    assert response.status_code == 413
    assert response.json()["errcode"] == "M_TOO_LARGE"
    # Announced too large, not sent: refused before the body is read.
    status, _, body = raw_request(server.port, head("POST", V1 + "/bulk_lookup", length=10 * MAX_BODY))
    assert (status, body["errcode"]) == (413, "M_TOO_LARGE")
    # Chunked, with no length announced: counted as it arrives.
    chunk = b"x" * 8192
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(MAX_BODY // len(chunk) + 2)) + b"0\r\n\r\n"
    status, _, body = raw_request(server.port, head("POST", V1 + "/bulk_lookup", b"Transfer-Encoding: chunked"), chunks)
    assert (status, body["errcode"]) == (413, "M_TOO_LARGE")
    # Just under the limit is read and answered.
    small = server.http.post(V1 + "/bulk_lookup", json={"threepids": pairs[: len(pairs) // 2]})
    assert small.status_code == 200, small.text


UNDECODABLE = b"Authorization: Bearer \xff\xfe"
NON_ASCII = "Authorization: Bearer tökén".encode()


@pytest.mark.parametrize("header", [UNDECODABLE, NON_ASCII], ids=["undecodable", "non-ascii"])
def test_token_that_is_not_ascii_is_unknown_and_never_reaches_the_homeserver(server, client_homeserver, header):
    for method, path, errcode in [
        ("GET", V2 + "/account", "M_UNAUTHORIZED"),
        ("POST", V2 + "/lookup", "M_UNAUTHORIZED"),
        ("POST", V2 + "/account/logout", "M_UNAUTHORIZED"),
        ("GET", V2 + "/hash_details", "M_UNAUTHORIZED"),
        ("POST", "/_matrix/client/v3/user_directory/search", "M_UNKNOWN_TOKEN"),
        ("GET", "/_matrix/client/v3/profile/@alice:example.org", "M_UNKNOWN_TOKEN"),
        ("GET", "/_matrix/client/v3/login", "M_UNKNOWN_TOKEN"),
        ("POST", "/_matrix/client/r0/login", "M_UNKNOWN_TOKEN"),
        ("GET", "/_mxisd/admin/v1/stores", "M_UNAUTHORIZED"),
    ]:
        body = b'{"search_term": "alice", "type": "m.login.password", "user": "alice", "password": "x"}'
        status, headers, answer = raw_request(server.port, head(method, path, header, length=len(body)), body)
        assert (status, answer["errcode"]) == (401, errcode), (method, path, answer)
        assert headers["content-type"] == "application/json"
    assert client_homeserver.requests == []


def test_bearer_with_nothing_after_it_is_a_missing_token(server, client_homeserver):
    for method, path, errcode in [
        ("GET", V2 + "/account", "M_UNAUTHORIZED"),
        ("POST", "/_matrix/client/v3/user_directory/search", "M_MISSING_TOKEN"),
        ("GET", "/_matrix/client/v3/profile/@alice:example.org", "M_MISSING_TOKEN"),
        ("GET", "/_matrix/client/v3/login", "M_MISSING_TOKEN"),
    ]:
        for header in (b"Authorization: Bearer ", b"Authorization: Bearer    ", b"Authorization: Bearer"):
            body = b'{"search_term": "alice"}'
            status, _, answer = raw_request(server.port, head(method, path, header, length=len(body)), body)
            assert (status, answer["errcode"]) == (401, errcode), (method, path, header, answer)
    assert client_homeserver.requests == []
    # Without the header, the homeserver answers as usual.
    assert server.http.get("/_matrix/client/v3/login").json() == {"flows": [{"type": "m.login.password"}]}


def test_other_odd_header_bytes_are_not_passed_on(server, client_homeserver):
    """A User-Agent or Accept-Language the homeserver client cannot send is left out, not a 500."""
    status, _, answer = raw_request(server.port, head(
        "GET", "/_matrix/client/v3/login", b"User-Agent: \xff\xfe bot", b"Accept-Language: fr\x01"))
    assert (status, answer) == (200, {"flows": [{"type": "m.login.password"}]})
    assert client_homeserver.requests == [("GET", "/_matrix/client/v3/login", None)]


def test_an_answer_later_than_the_response_timeout_is_503(make_server, monkeypatch):
    """Sanic's own response timeout (SANIC_RESPONSE_TIMEOUT) answers 503 M_UNKNOWN, not 500."""
    silent = socket.socket()  # a homeserver that takes the connection and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        srv = make_server()
        srv.config["homeserver"] = {"url": f"http://127.0.0.1:{silent.getsockname()[1]}", "timeout": "1m"}
        monkeypatch.setenv("SANIC_RESPONSE_TIMEOUT", "1")
        srv.start()
        response = srv.http.get("/_matrix/client/v3/login")
        assert response.status_code == 503
        assert response.json()["errcode"] == "M_UNKNOWN"
        assert "Traceback" not in srv.log()
    finally:
        silent.close()


def test_an_unexpected_failure_is_a_matrix_error_without_traceback(make_server):
    srv = make_server()
    page = srv.root / "failure.html"
    page.write_text("<p>%ERROR%</p>")
    srv.config["sessions"] = {"pages": {"failure": str(page)}}
    srv.start()
    page.unlink()  # the page the server must show has gone: a fault of the server, not of the request
    response = srv.http.get(V2 + "/validate/email/submitToken", params={"sid": "x", "client_secret": "y", "token": "z"})
    assert response.status_code == 500
    assert response.json() == {"errcode": "M_UNKNOWN", "error": "Internal server error"}
    assert "failure.html" not in response.text
    assert srv.log().count("FileNotFoundError") >= 1  # the traceback is in the log instead


def test_an_address_the_smtp_client_refuses_is_a_400_and_stores_no_invite(server, mailbox):
    address = "a\x00b@example.com"  # a control character: no SMTP server can take it
    response = server.http.post(V1 + "/validate/email/requestToken",
                                json={"client_secret": "abc", "email": address, "send_attempt": 1})
    assert response.status_code == 400
    assert response.json()["errcode"] in ("M_INVALID_EMAIL", "M_EMAIL_SEND_ERROR")
    response = server.http.post(V2 + "/store-invite", headers=server.auth(), json={
        "medium": "email", "address": address, "room_id": "!room:example.org", "sender": "@tester:example.org"})
    assert response.status_code == 400
    assert response.json()["errcode"] in ("M_INVALID_EMAIL", "M_EMAIL_SEND_ERROR")
    assert mailbox.messages == []
    assert "stored invite" not in server.log()


HOSTILE_HEADERS = [
    UNDECODABLE, NON_ASCII, b"Authorization: Bearer ", b"Authorization: \xff",
    b'Authorization: X-Matrix origin=\xff,key="ed25519:\xfe",sig="\x01"', b"Authorization: X-Matrix ,,,=",
    b"Content-Type: \xff/\xfe", b"Content-Type: application/x-www-form-urlencoded; charset=\xff",
    b"X-Forwarded-For: \xff, not-an-address", b"X-Forwarded-For: \xff\xfe", b"X-Forwarded-For: 1.2.3.4\x00",
    b"X-Request-ID: \xff\xfe", b"Accept-Language: \xff",
    b"User-Agent: \x01\x02", b"Cookie: \xff=\xfe",
]


def test_hostile_headers_and_query_strings_on_every_route_get_no_5xx(server, client_homeserver):
    """Each route of the OpenAPI document, with header bytes and query strings no library would send."""
    document = json.loads((REPO / "schemas" / "openapi.json").read_text(encoding="utf-8"))
    bodies = [b"{}", b'{"threepids": [["email", "\\u0000\xff"]], "search_term": "\\ud800", "user": {"id": 1}}',
              # Valid for a password login and an email requestToken: both count by client address.
              b'{"type": "m.login.password", "user": "alice", "password": "x", "client_secret": "abc", '
              b'"email": "a@example.com", "send_attempt": 1}']
    answered = 0
    for template, methods in document["paths"].items():
        path = re.sub(r"\{[^}]+\}", "%ff%fe%00", template)
        for method in methods:
            query = "?access_token=%ff%fe&medium=%ff&address=%00%ff&public_key=%fe&q=%00&sid=%ff&token=%ff"
            for header in HOSTILE_HEADERS:
                for body in bodies if method == "post" else [b""]:
                    status, _, _ = raw_request(
                        server.port, head(method.upper(), path + query, header, length=len(body)), body)
                    assert status < 500, (method, path, header, body, status)
                    answered += 1
    assert answered > 1000
    assert "Traceback" not in server.log()


MALFORMED = [
    b"GARBAGE\r\n",
    b"GET /_matrix/identity/versions HTTP/9.9\r\nHost: x\r\n",
    b"GET /_matrix/identity/\xff\xfe HTTP/1.1\r\nHost: x\r\n",
    b"POST /_matrix/identity/api/v1/bulk_lookup HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n",
    b"POST /_matrix/identity/api/v1/bulk_lookup HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 2\r\n",
    b"POST /_matrix/identity/api/v1/bulk_lookup HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n",
    b"GET /_matrix/identity/versions HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n",
    b"POST /_matrix/identity/api/v1/bulk_lookup HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 999-no\r\n",
]


def test_malformed_http_is_a_4xx_matrix_error(server):
    for request in MALFORMED:
        body = b"zz\r\n" if b"chunked" in request else b"{}" if b"POST" in request else b""
        status, headers, answer = raw_request(server.port, request, body)
        assert 400 <= status < 500, (request[:80], status, answer)
        assert headers["content-type"] == "application/json" and answer["errcode"].startswith("M_"), answer
    assert "Traceback" not in server.log()
