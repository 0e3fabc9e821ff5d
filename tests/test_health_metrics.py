"""Liveness, readiness, version and Prometheus metrics of a real `mxisd run` over HTTP."""

from __future__ import annotations

import json
import os

import psycopg
import redis
from prometheus_client.parser import text_string_to_metric_families

from indexer.redis_server import EmbeddedRedis
from tests.conftest import free_port, wait_until
from tests.test_api import validate_email

V1 = "/_matrix/identity/api/v1"


def scrape(server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = server.http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_move_with_requests_across_workers(make_server):
    srv = make_server()
    srv.config["server"]["workers"] = 2
    srv.start()
    wait_until(lambda: srv.lookup_v1("email", "bob@example.com").get("mxid"), what="the first sync")
    wait_until(lambda: srv.log().count("Worker ready") >= 2, what="both workers")
    # The indexer counts its first sync once that sync has recorded its outcome.
    wait_until(lambda: value(scrape(srv), "mxisd_syncs_total", store="people", kind="full", outcome="ok"),
               what="the first sync to be counted")
    before = scrape(srv)
    for _ in range(6):
        srv.lookup_v1("email", "alice@example.com")
        srv.lookup_v1("email", "nobody@example.com")
    bulk = srv.http.post(V1 + "/bulk_lookup", json={"threepids": [["email", "bob@example.com"],
                                                                  ["email", "x@example.com"]]})
    assert bulk.status_code == 200
    assert srv.http.get(V1 + "/lookup", params={"medium": "email"}).status_code == 400
    after = scrape(srv)

    lookup = {"method": "GET", "endpoint": "/_matrix/identity/api/v1/lookup"}
    # Counted in whichever worker answered: the scrape adds both up.
    assert value(after, "mxisd_http_requests_total", **lookup, status="200") \
        - value(before, "mxisd_http_requests_total", **lookup, status="200") == 12
    assert value(after, "mxisd_http_requests_total", **lookup, status="400") \
        - value(before, "mxisd_http_requests_total", **lookup, status="400") == 1
    assert value(after, "mxisd_http_request_duration_seconds_count", **lookup) \
        - value(before, "mxisd_http_request_duration_seconds_count", **lookup) == 13
    assert value(after, "mxisd_lookups_total", source="store_cache") \
        - value(before, "mxisd_lookups_total", source="store_cache") == 7
    assert value(after, "mxisd_lookups_total", source="miss") - value(before, "mxisd_lookups_total", source="miss") == 7
    # Written by the indexer process, and read from the cache at scrape time.
    assert value(after, "mxisd_syncs_total", store="people", kind="full", outcome="ok") >= 1
    assert value(after, "mxisd_sync_duration_seconds_count", store="people", kind="full") >= 1
    assert value(after, "mxisd_store_identities", store="people") == 3
    assert value(after, "mxisd_store_last_success_timestamp_seconds", store="people") > 0
    assert value(after, "mxisd_cache_up") == 1

    srv.write_people([{"localpart": "alice"}, {"localpart": "bob"}])
    assert srv.cli("index").returncode == 0
    assert value(scrape(srv), "mxisd_store_identities", store="people") == 2


def test_metrics_start_from_zero_after_a_restart(make_server):
    srv = make_server()
    srv.start()
    srv.lookup_v1("email", "alice@example.com")
    assert value(scrape(srv), "mxisd_http_requests_total", method="GET",
                 endpoint="/_matrix/identity/api/v1/lookup", status="200") == 1
    assert srv.stop() == 0
    srv.start()
    assert value(scrape(srv), "mxisd_http_requests_total", method="GET",
                 endpoint="/_matrix/identity/api/v1/lookup", status="200") == 0


def test_status_version_and_readiness_follow_redis(make_server):
    srv = make_server(embedded_redis=True)
    # The test restarts the embedded Redis itself, well before `mxisd run` would (test_faults.py has that).
    srv.config["supervisor"] = {"restart_first": "1h"}
    srv.people_path.write_text("- localpart: [unclosed\n")  # the store cannot be read yet
    srv.start()
    assert srv.http.get("/status").json() == {"status": {"health": "OK"}}
    version = srv.http.get("/version").json()["server"]
    assert version["name"] == "mxisd" and version["version"]

    never_synced = srv.http.get("/_mxisd/ready")
    assert never_synced.status_code == 503
    body = never_synced.json()
    assert body["ready"] is False and body["checks"]["redis"]["ok"] is True
    assert body["checks"]["stores"]["people"]["ok"] is False

    srv.write_people([{"localpart": "alice", "emails": ["alice@example.com"]}])
    assert srv.cli("index").returncode == 0
    ready = wait_until(lambda: (r := srv.http.get("/_mxisd/ready")).status_code == 200 and r.json(),
                       what="readiness after the first sync")
    assert ready["ready"] is True and ready["checks"]["stores"]["people"]["identities"] == 1
    assert ready["checks"]["fulltext"]["ok"] is True

    data = srv.root / "data"
    embedded = EmbeddedRedis(data)
    redis.Redis(unix_socket_path=str(embedded.socket)).shutdown()
    try:
        down = wait_until(lambda: (r := srv.http.get("/_mxisd/ready")).status_code == 503 and r.json(),
                          what="readiness to notice Redis is gone")
        assert down["ready"] is False and down["checks"]["redis"]["ok"] is False
        assert srv.http.get("/status").status_code == 200  # alive all the same
        lookup = srv.http.get(V1 + "/lookup", params={"medium": "email", "address": "alice@example.com"})
        assert lookup.status_code == 503 and lookup.json()["errcode"] == "M_UNKNOWN"
        scraped = srv.http.get("/metrics")
        assert scraped.status_code == 200 and "mxisd_cache_up 0.0" in scraped.text
    finally:
        embedded.start()
    back = wait_until(lambda: (r := srv.http.get("/_mxisd/ready")).status_code == 200 and r.json(), 30,
                      "readiness once Redis is back")
    assert back["checks"]["redis"]["ok"] is True
    assert srv.lookup_v1("email", "alice@example.com")["mxid"] == "@alice:example.org"
    assert srv.stop() == 0
    embedded.process.wait(timeout=15)


def test_json_logs_carry_request_ids_and_no_secrets(make_server):
    srv = make_server()
    srv.config["log_format"] = "json"
    srv.config["server"]["access_log"] = True
    srv.start()
    response = srv.http.get("/_matrix/identity/v2/hash_details", params={"access_token": srv.token()},
                            headers={"X-Request-ID": "trace-abc.123"})
    assert response.status_code == 200 and response.headers["x-request-id"] == "trace-abc.123"
    bearer = srv.http.get("/_matrix/identity/v2/hash_details", headers=srv.auth())
    generated = bearer.headers["x-request-id"]
    assert len(generated) >= 16
    odd = srv.http.get("/status", headers={"X-Request-ID": "bad id with spaces"})
    assert odd.headers["x-request-id"] != "bad id with spaces"
    # A request no route takes has its id from the start too (on the same connection as the others).
    unknown = srv.http.get("/nope", headers={"X-Request-ID": "trace-404"})
    assert unknown.status_code == 404 and unknown.headers["x-request-id"] == "trace-404"

    lines = [line for line in srv.log().splitlines() if line.strip()]
    events = [json.loads(line) for line in lines if line.startswith("{")]
    assert events and all(set(e) >= {"time", "level", "process", "logger", "message"} for e in events)
    access = [e for e in events if e["logger"] == "mxisd.access"]
    traced = [e for e in access if e.get("request_id") == "trace-abc.123"]
    assert len(traced) == 1
    assert traced[0]["http"]["target"] == "/_matrix/identity/v2/hash_details?access_token=<redacted>"
    assert traced[0]["http"]["status"] == 200
    assert any(e.get("request_id") == generated for e in access)
    assert [e["http"]["status"] for e in access if e.get("request_id") == "trace-404"] == [404]
    assert srv.token() not in srv.log()


def test_metrics_count_bindings_mails_and_failed_homeserver_requests(make_server, homeserver, mailbox):
    srv = make_server()
    srv.config["accounts"] = {"homeservers": ["*"]}
    srv.config["federation"]["overrides"]["dead.example"] = f"127.0.0.1:{free_port()}"  # nothing listens
    srv.start()
    wait_until(lambda: srv.lookup_v1("email", "alice@example.com").get("mxid"), what="the first sync")
    dave = "@dave:example.org"
    auth = srv.register(homeserver, dave)
    before = scrape(srv)

    sid = validate_email(srv, mailbox, "dave@example.net", "secret-1", headers=auth)
    bound = srv.http.post("/_matrix/identity/v2/3pid/bind", headers=auth,
                          json={"sid": sid, "client_secret": "secret-1", "mxid": dave})
    assert bound.status_code == 200, bound.text
    assert srv.lookup_v1("email", "dave@example.net")["mxid"] == dave
    assert srv.lookup_v1("email", "alice@example.com")["mxid"] == "@alice:example.org"
    unreachable = srv.http.post("/_matrix/identity/v2/account/register", json={
        "access_token": "tok", "token_type": "Bearer", "matrix_server_name": "dead.example", "expires_in": 3600})
    assert unreachable.status_code == 502
    after = scrape(srv)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("mxisd_lookups_total", source="binding") == 1
    assert moved("mxisd_lookups_total", source="store_cache") == 1
    assert moved("mxisd_notifications_total", medium="email", outcome="sent") == 1
    assert moved("mxisd_notifications_total", medium="email", outcome="failed") == 0
    assert moved("mxisd_outgoing_request_failures_total", purpose="homeserver") >= 1


def test_readiness_follows_the_sql_database(make_server, postgres_url):
    srv = make_server()
    srv.config["storage"] = {"url": postgres_url}
    srv.start()
    wait_until(lambda: srv.http.get("/_mxisd/ready").status_code == 200, what="readiness")
    database = postgres_url.rsplit("/", 1)[1]
    admin_url = os.environ.get("MXISD_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (database,))
    try:
        down = wait_until(lambda: (r := srv.http.get("/_mxisd/ready")).status_code == 503 and r.json(),
                          what="readiness to notice the database is gone")
        assert down["checks"]["sql"]["ok"] is False and down["checks"]["redis"]["ok"] is True
        assert srv.http.get("/status").status_code == 200
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
    back = wait_until(lambda: (r := srv.http.get("/_mxisd/ready")).status_code == 200 and r.json(), 30,
                      "readiness once the database is back")
    assert back["checks"]["sql"] == {"ok": True}
