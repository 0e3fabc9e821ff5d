"""Roles from the file store, synced into the cache and served at the internal profile (the other
stores' roles are tested with each store)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import yaml

from tests.conftest import wait_until


def roles_of(server: Any, mxid: str) -> list[str] | None:
    """The roles GET /_matrix-internal/profile/v1/{userId} answers, None while the user is unknown."""
    response = server.http.get(f"/_matrix-internal/profile/v1/{mxid}")
    return response.json()["roles"] if response.status_code == 200 else None


def test_file_store_roles_reach_the_internal_profile_and_leave_with_the_file(make_server: Callable[..., Any]):
    people = [{"localpart": "alice", "display_name": "Alice", "emails": ["alice@example.com"],
               "roles": ["staff", "inviters", " staff "]},
              {"localpart": "bob", "emails": ["bob@example.com"]}]
    server = make_server(people)
    server.start()
    assert wait_until(lambda: roles_of(server, "@alice:example.org"), 60, "alice's roles") == ["inviters", "staff"]
    assert server.http.get("/_matrix-internal/profile/v1/@alice:example.org").json() == {
        "user_id": "@alice:example.org", "display_name": "Alice", "roles": ["inviters", "staff"],
        "threepids": [{"medium": "email", "address": "alice@example.com"}]}
    assert roles_of(server, "@bob:example.org") == []

    people[0]["roles"] = ["staff"]
    people[1]["roles"] = ["inviters"]
    server.write_people(people)
    done = server.cli("index")
    assert done.returncode == 0, done.stdout + done.stderr
    assert roles_of(server, "@alice:example.org") == ["staff"]
    assert roles_of(server, "@bob:example.org") == ["inviters"]


def test_roles_of_a_user_in_several_stores_are_gathered(make_server: Callable[..., Any]):
    server = make_server([{"localpart": "alice", "display_name": "Alice", "emails": ["alice@example.com"],
                           "roles": ["staff"]}])
    (server.root / "roles.yml").write_text(yaml.safe_dump([
        {"localpart": "alice", "display_name": "A. L.", "roles": ["inviters", "staff"]},
        {"localpart": "dave", "roles": ["contractors"]}]))
    server.config["stores"].append({"name": "roles", "kind": "file", "path": "roles.yml"})
    server.start()
    assert wait_until(lambda: roles_of(server, "@dave:example.org"), 60, "both stores") == ["contractors"]
    # Name and 3PIDs from the first store in config order (as lookups answer), roles from both.
    assert server.http.get("/_matrix-internal/profile/v1/@alice:example.org").json() == {
        "user_id": "@alice:example.org", "display_name": "Alice", "roles": ["inviters", "staff"],
        "threepids": [{"medium": "email", "address": "alice@example.com"}]}
