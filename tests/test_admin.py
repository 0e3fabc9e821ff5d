"""The admin API over real HTTP: access control, sync jobs run by the server's indexer, status,
cache inspection, the fulltext rebuild, and `mxisd index`/`mxisd status` through it."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
import yaml

from indexer.cache import Cache
from tests.conftest import PEOPLE, wait_until

ADMIN_TOKEN = "admin-token-0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
API = "/_mxisd/admin/v1"


@pytest.fixture
def server(make_server):
    srv = make_server()
    srv.config["admin"] = {"token": ADMIN_TOKEN}
    srv.config["log_format"] = "json"
    srv.config["server"]["access_log"] = True
    srv.start()
    wait_until(lambda: srv.lookup_v1("email", "alice@example.com").get("mxid"), what="the first sync")
    return srv


def get_job(server, job_id):
    response = server.http.get(f"{API}/jobs/{job_id}", headers=ADMIN)
    assert response.status_code == 200, response.text
    return response.json()


def test_admin_api_needs_the_token(server):
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789abcdef"}, {"Authorization": ADMIN_TOKEN}):
        response = server.http.get(f"{API}/stores", headers=headers)
        assert response.status_code == 401 and response.json()["errcode"] == "M_UNAUTHORIZED"
        sync = server.http.post(f"{API}/stores/people/sync", headers=headers, json={"full": True})
        assert sync.status_code == 401
    # Tokens in query strings end up in logs: the admin API only takes the header.
    assert server.http.get(f"{API}/stores", params={"access_token": ADMIN_TOKEN}).status_code == 401
    assert server.http.get(f"{API}/stores", headers=ADMIN).status_code == 200
    page = server.http.get("/_mxisd/admin/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    csp = page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "script-src 'sha256-" in csp and "unsafe-inline" not in csp
    assert server.http.get("/_mxisd/admin").headers["location"] == "/_mxisd/admin/"


def test_admin_api_is_off_without_a_token_and_limited_by_address(make_server):
    off = make_server()
    off.config["metrics"] = {"allow": ["10.0.0.0/8"]}
    off.start()
    for method, path in (("GET", f"{API}/stores"), ("GET", "/_mxisd/admin/"), ("POST", f"{API}/stores/people/sync"),
                         ("GET", f"{API}/stores/people/sync")):
        response = off.http.request(method, path, headers=ADMIN)
        assert response.status_code == 404 and response.json()["errcode"] == "M_UNRECOGNIZED"
    scrape = off.http.get("/metrics")
    assert scrape.status_code == 403 and scrape.json()["errcode"] == "M_FORBIDDEN"
    off.stop()

    elsewhere = make_server()
    elsewhere.config["admin"] = {"token": ADMIN_TOKEN, "allow": ["10.0.0.0/8", "fd00::/8"]}
    elsewhere.start()
    for path in (f"{API}/stores", "/_mxisd/admin/"):
        response = elsewhere.http.get(path, headers=ADMIN)
        assert response.status_code == 403 and response.json()["errcode"] == "M_FORBIDDEN"
    assert elsewhere.http.get("/metrics").status_code == 200


def test_sync_through_the_api_with_progress_then_the_identity_is_found(server, rclient, prefix):
    people = PEOPLE + [{"localpart": f"user{i}", "emails": [f"user{i}@example.org"]} for i in range(1200)]
    server.write_people(people)
    # Holding the store's sync lock (as a scheduled sync would) keeps the job waiting where the test
    # can see it, however fast the machine.
    lock = Cache(rclient, prefix).lock("people", timeout=120)
    assert lock.acquire(blocking=False)
    try:
        started = server.http.post(f"{API}/stores/people/sync", headers={**ADMIN, "X-Request-ID": "req-sync-42"},
                                   json={"full": True})
        assert started.status_code == 202, started.text
        job = started.json()["job"]
        assert started.json()["created"] is True and job["store"] == "people" and job["full"] is True
        assert job["request_id"] == "req-sync-42"
        assert started.headers["x-request-id"] == "req-sync-42"

        # Concurrent requests while it waits get the same job, whatever they ask for.
        def again(full):
            return server.http.post(f"{API}/stores/people/sync", headers=ADMIN, json={"full": full})

        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(again, [True, False, True, False]))
        assert {a.status_code for a in answers} == {200}
        assert {a.json()["job"]["id"] for a in answers} == {job["id"]}
        assert not any(a.json()["created"] for a in answers)

        waiting = wait_until(lambda: (j := get_job(server, job["id"]))["total"] is not None and j,
                             what="the indexer to take the job")
        assert waiting["state"] == "running" and waiting["total"] == len(people)
        assert waiting["percent"] == 0 and waiting["read"] == 0
        listed = server.http.get(f"{API}/stores", headers=ADMIN).json()["stores"][0]
        assert listed["job"]["id"] == job["id"]
    finally:
        lock.release()

    seen = []

    def finished():
        current = get_job(server, job["id"])
        seen.append(current)
        return current["state"] == "done" and current

    done = wait_until(finished, 60, "the job to finish")
    reads = [j["read"] for j in seen]
    assert reads == sorted(reads)  # progress only moves forward
    assert done["outcome"] == "ok" and done["error"] is None
    assert done["read"] == len(people) and done["percent"] == 100
    assert done["result"]["added"] == 1200 and done["result"]["removed"] == 0 and done["result"]["kind"] == "full"
    assert server.lookup_v1("email", "user1199@example.org")["mxid"] == "@user1199:example.org"

    # The next request starts a new job.
    after = server.http.post(f"{API}/stores/people/sync", headers=ADMIN)
    assert after.status_code == 202 and after.json()["job"]["id"] != job["id"]

    # The request id followed the job into the indexer's log lines.
    events = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    indexer_lines = [e for e in events if e["process"] == "indexer" and e.get("request_id") == "req-sync-42"]
    assert any("full sync done" in e["message"] for e in indexer_lines), indexer_lines
    assert ADMIN_TOKEN not in server.log()


def test_store_status_jobs_and_bad_requests(server):
    # The indexer records its schedule once the first sync is done.
    stores = wait_until(lambda: (s := server.http.get(f"{API}/stores", headers=ADMIN).json())["stores"][0]["next_full"]
                        and s, what="the schedule")
    [people] = stores["stores"]
    assert people["name"] == "people" and people["kind"] == "file" and people["identities"] == 3
    assert people["last_full"]["outcome"] == "ok" and people["last_full"]["added"] == 3
    assert people["last_success"] >= people["last_full"]["started"]
    assert people["next_full"] > time.time() + 3000  # full_every is 1h
    assert people["next_incremental"] is None  # a file cannot list its changes: it is only read whole
    assert people["job"] is None

    def caught_up():
        status = server.http.get(f"{API}/stores", headers=ADMIN).json()
        return [f for f in status["followers"] if f["last_id"] == status["last_change_id"]]

    [follower] = wait_until(caught_up, what="the follower to catch up")
    assert follower["lag_seconds"] == 0

    missing = server.http.get(f"{API}/jobs/0123456789abcdef", headers=ADMIN)
    assert missing.status_code == 404 and missing.json()["errcode"] == "M_NOT_FOUND"
    nostore = server.http.post(f"{API}/stores/nope/sync", headers=ADMIN, json={"full": True})
    assert nostore.status_code == 404 and nostore.json()["errcode"] == "M_NOT_FOUND"
    bad = server.http.post(f"{API}/stores/people/sync", headers=ADMIN, json={"full": "yes"})
    assert bad.status_code == 400 and bad.json()["errcode"] == "M_INVALID_PARAM"
    unknown = server.http.post(f"{API}/stores/people/sync", headers=ADMIN, json={"fulll": True})
    assert unknown.status_code == 400 and unknown.json()["errcode"] == "M_INVALID_PARAM"
    noq = server.http.get(f"{API}/identities", headers=ADMIN)
    assert noq.status_code == 400 and noq.json()["errcode"] == "M_MISSING_PARAMS"
    assert server.http.get(f"{API}/stores", headers=ADMIN).json()["stores"][0]["job"] is None  # nothing queued


def test_identities_shows_what_the_cache_holds(server):
    by_email = server.http.get(f"{API}/identities", params={"q": "Carol@example.org"}, headers=ADMIN).json()
    assert by_email["query"] == {"medium": "email", "address": "carol@example.org"}
    assert by_email["lookup_answer"] == "@carol:example.org"
    [match] = by_email["matches"]
    assert match["store"] == "people" and match["identity"]["display_name"] == "Carol Danvers"
    by_phone = server.http.get(f"{API}/identities", params={"q": "+1 800 555 2067"}, headers=ADMIN).json()
    assert by_phone["lookup_answer"] == "@alice:example.org"
    by_mxid = server.http.get(f"{API}/identities", params={"q": "@bob:example.org"}, headers=ADMIN).json()
    assert by_mxid["matches"][0]["identity"]["threepids"][0]["address"] == "b.builder@example.org"
    nobody = server.http.get(f"{API}/identities", params={"q": "nobody@example.org"}, headers=ADMIN).json()
    assert nobody["lookup_answer"] is None and nobody["matches"] == []


def test_rebuild_fulltext_from_the_cache(server):
    before = time.time()
    response = server.http.post(f"{API}/cache/rebuild-fulltext", headers=ADMIN)
    assert response.status_code == 202

    def rebuilt():
        followers = server.http.get(f"{API}/stores", headers=ADMIN).json()["followers"]
        return followers and (followers[0]["rebuilt"] or 0) > before

    wait_until(rebuilt, 30, "the follower to rebuild")
    assert "rebuilt from the cache because an admin asked for it: 3 identities" in server.log()


def test_index_command_uses_the_running_servers_indexer(server, rclient, prefix):
    server.write_people(PEOPLE + [{"localpart": "dave", "emails": ["dave@example.com"]}])
    lock = Cache(rclient, prefix).lock("people", timeout=120)
    assert lock.acquire(blocking=False)
    # Someone started a full sync from the page a moment ago: the command follows that job.
    earlier = server.http.post(f"{API}/stores/people/sync", headers=ADMIN, json={"full": True}).json()["job"]
    primary, secondary = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "index", "--store", "people", "--full",
         "--config", str(server.config_path)],
        stdout=secondary, stderr=secondary, cwd=server.root)
    os.close(secondary)
    output = b""

    def read_some() -> bool:
        nonlocal output
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # the terminal closes when the command exits
            return False
        output += chunk
        return bool(chunk)

    try:
        # While the job waits for the lock, the command shows a bar at 0% of the file's 4 entries.
        deadline = time.monotonic() + 60
        while b"0%" not in output and time.monotonic() < deadline:
            if select.select([primary], [], [], 0.5)[0] and not read_some():
                break
        assert b"0%" in output, output
    finally:
        lock.release()
    while read_some():
        pass
    assert process.wait(timeout=60) == 0
    text = output.decode()
    assert "people: a sync of this store is already " in text and f"(job {earlier['id']}): following it" in text
    assert "\rpeople: [" in text and "] " in text
    assert "people: full sync ok in" in text and "added 1, changed 0, removed 0" in text
    assert server.lookup_v1("email", "dave@example.com")["mxid"] == "@dave:example.org"
    # The server's indexer did the work, under a job.
    assert any("full sync of store people started" in line and '"indexer"' in line
               for line in server.log().splitlines())

    status = server.cli("status")
    assert status.returncode == 0, status.stderr
    header, row = status.stdout.splitlines()[:2]
    assert header.split()[:3] == ["STORE", "KIND", "IDENTITIES"]
    assert row.split()[:4] == ["people", "file", "4", "ok"]
    assert "behind the cache" in status.stdout


def test_index_command_reports_a_failed_job(server):
    server.people_path.write_text("- localpart: [unclosed\n")
    failed = server.cli("index", "--store", "people")
    assert failed.returncode == 1
    assert "people: full sync failed" in failed.stderr and "not valid YAML" in failed.stderr
    assert server.lookup_v1("email", "alice@example.com")["mxid"] == "@alice:example.org"


def test_index_command_without_a_running_server_syncs_itself(make_server, redis_url, prefix):
    srv = make_server()
    srv.config["admin"] = {"token": ADMIN_TOKEN}
    srv.config_path.write_text(yaml.safe_dump(srv.config))
    done = srv.cli("index")
    assert done.returncode == 0, done.stderr
    assert "people: full sync ok" in done.stderr
    assert Cache(redis.Redis.from_url(redis_url, decode_responses=True), prefix).count("people") == 3


def test_index_command_with_a_wrong_admin_token_says_so(server):
    config = yaml.safe_load(server.config_path.read_text())
    config["admin"]["token"] = "not-the-servers-token-0123456789"
    other = server.root / "other.yml"
    other.write_text(yaml.safe_dump(config))
    refused = subprocess.run([sys.executable, "-m", "server.cli", "index", "--config", str(other)],
                             capture_output=True, text=True, timeout=120, cwd=server.root)
    assert refused.returncode == 1
    assert "refused the admin API call: 401 M_UNAUTHORIZED: Unrecognised admin token" in refused.stderr
