"""Directory search over real HTTP: the fulltext index, the homeserver's results merged in, limits,
access tokens and hidden people, with a fake homeserver speaking Synapse's wire format."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import wait_until
from tests.fake_homeserver import ClientHomeserver

PEOPLE = [
    {"localpart": "jdoe", "display_name": "John Doe", "emails": ["john.doe@corp.example"]},
    {"localpart": "johanna", "display_name": "Johanna Berg"},
    {"localpart": "jsmith", "display_name": "Jane Smith"},
    {"localpart": "mdupont", "display_name": "Marie-Hélène Dupont"},
    {"localpart": "aliddell", "display_name": "Alice Liddell"},
    {"localpart": "svc-backup", "display_name": "Backup Service"},
    {"localpart": "ingrid", "display_name": "Ingrid Bergman"},
]
TOKEN = "syt_client_token"


@pytest.fixture
def started(make_server, client_homeserver: ClientHomeserver):
    """A server over PEOPLE whose homeserver knows one client token; directory settings adjustable."""

    def start(**directory: Any):
        server = make_server(PEOPLE)
        server.config["homeserver"] = {"url": client_homeserver.url}
        server.config["directory"] = directory
        client_homeserver.tokens[TOKEN] = "@searcher:example.org"
        server.start()
        wait_until(lambda: search(server, "ingrid")[1].get("results"), 60, "the directory index")
        return server

    return start


def search(server, term: str, token: str | None = TOKEN, version: str = "v3", **extra: Any) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = server.http.post(f"/_matrix/client/{version}/user_directory/search",
                                json={"search_term": term, **extra}, headers=headers)
    return response.status_code, response.json()


def ids(server, term: str, **extra: Any) -> list[str]:
    status, body = search(server, term, **extra)
    assert status == 200, body
    return [r["user_id"] for r in body["results"]]


def test_search_by_name_prefix_inside_a_word_typo_and_accents(started, client_homeserver):
    server = started(homeserver=False, hide=[{"mxid": "@svc-.*"}])
    assert sorted(ids(server, "joh")) == ["@jdoe:example.org", "@johanna:example.org"]
    assert ids(server, "berg") == ["@johanna:example.org", "@ingrid:example.org"]  # the whole word first
    assert ids(server, "Doe") == ["@jdoe:example.org"]
    assert ids(server, "smi") == ["@jsmith:example.org"]
    assert ids(server, "ddel") == ["@aliddell:example.org"]  # inside a word
    assert ids(server, "liddel") == ["@aliddell:example.org"]  # one letter missing
    assert ids(server, "smoth") == ["@jsmith:example.org"]  # one letter wrong
    assert ids(server, "helene") == ids(server, "HÉLÈNE") == ["@mdupont:example.org"]
    assert ids(server, "dupont marie") == ["@mdupont:example.org"]
    assert ids(server, "@jdoe:example.org") == ["@jdoe:example.org"]
    assert ids(server, "jsmith", version="r0") == ["@jsmith:example.org"]  # by localpart, r0 too
    assert ids(server, "zzz") == []
    # 3PIDs are not searched unless the config allows it; hidden people are never found.
    assert ids(server, "corp") == []
    assert ids(server, "backup") == [] and ids(server, "svc") == []
    status, body = search(server, "john")
    assert body["results"][0] == {"user_id": "@jdoe:example.org", "display_name": "John Doe", "avatar_url": None}
    assert body["limited"] is False
    assert client_homeserver.requests.count(("GET", "/_matrix/client/v3/account/whoami", None)) == 1  # cached


def test_access_token_and_request_checks(started):
    server = started(homeserver=False)
    assert search(server, "john", token="wrong") == (
        401, {"errcode": "M_UNKNOWN_TOKEN", "error": "Unrecognised access token"})
    assert search(server, "john", token=None)[1]["errcode"] == "M_MISSING_TOKEN"
    response = server.http.post("/_matrix/client/v3/user_directory/search", params={"access_token": TOKEN},
                                json={"limit": 3})
    assert response.status_code == 400 and response.json()["errcode"] == "M_MISSING_PARAMS"
    response = server.http.post("/_matrix/client/v3/user_directory/search", params={"access_token": TOKEN},
                                json={"search_term": "jo", "limit": "ten"})
    assert response.status_code == 400 and response.json()["errcode"] == "M_INVALID_PARAM"


def test_threepids_searched_when_allowed(started):
    server = started(homeserver=False, threepids=True)
    assert ids(server, "corp.example") == ["@jdoe:example.org"]


def test_homeserver_results_merged_without_duplicates_and_limited(started, client_homeserver):
    client_homeserver.directory = [
        {"user_id": "@jdoe:example.org", "display_name": "John Doe", "avatar_url": "mxc://example.org/jd"},
        {"user_id": "@johnny:remote.example", "display_name": "Johnny Remote", "avatar_url": None},
        {"user_id": "@svc-backup:example.org", "display_name": "John's backup", "avatar_url": None},
    ]
    server = started(hide=[{"store": "people", "mxid": "@svc-.*"}])
    status, body = search(server, "john")
    assert status == 200
    assert body == {"limited": False, "results": [
        {"user_id": "@jdoe:example.org", "display_name": "John Doe", "avatar_url": "mxc://example.org/jd"},
        {"user_id": "@johnny:remote.example", "display_name": "Johnny Remote", "avatar_url": None},
    ]}
    assert ("POST", "/_matrix/client/v3/user_directory/search", {"search_term": "john", "limit": 10}) \
        in client_homeserver.requests
    status, body = search(server, "john", limit=1)
    assert [r["user_id"] for r in body["results"]] == ["@jdoe:example.org"]
    assert body["limited"] is True
    status, body = search(server, "jo", limit=2)
    assert len(body["results"]) == 2 and body["limited"] is True
    assert len(search(server, "j", limit=500)[1]["results"]) == 4  # hidden people left out of theirs too
    assert ("POST", "/_matrix/client/v3/user_directory/search", {"search_term": "j", "limit": 50}) \
        in client_homeserver.requests  # a limit above 50 is 50, as Synapse does
    # A homeserver without directory search is left out; its other refusals reach the client.
    client_homeserver.search_error = (404, {"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"})
    assert ids(server, "john") == ["@jdoe:example.org"]
    client_homeserver.search_error = (429, {"errcode": "M_LIMIT_EXCEEDED", "error": "Too many", "retry_after_ms": 500})
    assert search(server, "john") == (429, {"errcode": "M_LIMIT_EXCEEDED", "error": "Too many",
                                            "retry_after_ms": 500})


def test_search_follows_directory_changes(started):
    server = started(homeserver=False)
    server.write_people(PEOPLE + [{"localpart": "zoe", "display_name": "Zoë Quist"}])
    assert server.cli("index").returncode == 0
    wait_until(lambda: ids(server, "zoe") == ["@zoe:example.org"], 60, "the new person to be searchable")
