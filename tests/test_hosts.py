"""Several `mxisd run` hosts on one Redis and one key prefix: each reports under its own
server.host_id in readiness, the admin API and `mxisd status`, and a host that stops is shown as
stale after three missed heartbeats, then no longer shown after health.forget_host_after."""

from __future__ import annotations

import time
from typing import Any

from tests.conftest import Server, started, wait_until

ADMIN_TOKEN = "admin-token-0123456789abcdef"
API = "/_mxisd/admin/v1"
HEARTBEAT = 2  # seconds: stale after 6 s without a report
FORGET = 15  # seconds


def overview(srv: Server) -> dict[str, Any]:
    response = srv.http.get(f"{API}/stores", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def by_host(entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {entry["host"]: entry for entry in entries}


def ready(srv: Server) -> dict[str, Any] | None:
    response = srv.http.get("/_mxisd/ready")
    return response.json() if response.status_code == 200 else None


def test_every_host_reports_for_itself_and_a_stopped_one_ages_out(make_server):
    hosts = []
    for host_id in ("alpha", "beta"):
        srv = make_server()
        srv.config["server"]["host_id"] = host_id
        srv.config["admin"] = {"token": ADMIN_TOKEN}
        srv.config["supervisor"] = {"heartbeat": f"{HEARTBEAT}s"}
        srv.config["health"] = {"forget_host_after": f"{FORGET}s"}
        hosts.append(started(srv))
    alpha, beta = hosts

    for srv, host_id in ((alpha, "alpha"), (beta, "beta")):
        checks = wait_until(lambda srv=srv: ready(srv), 30, f"readiness of {host_id}")["checks"]
        assert checks["indexer"]["host"] == host_id and checks["indexer"]["ok"] is True
        assert checks["fulltext"]["host"] == host_id and checks["fulltext"]["ok"] is True
    for srv in (alpha, beta):  # either host's admin API shows both
        seen = overview(srv)
        assert sorted(by_host(seen["followers"])) == ["alpha", "beta"]
        assert {h: i["alive"] for h, i in by_host(seen["indexers"]).items()} == {"alpha": True, "beta": True}
        assert {h["host"]: h["stale"] for h in seen["hosts"]} == {"alpha": False, "beta": False}
    status = alpha.cli("status")
    assert status.returncode == 0, status.stderr
    for host_id in ("alpha", "beta"):
        assert f"fulltext index on {host_id}: " in status.stdout
        assert f"indexer on {host_id}: running" in status.stdout
    assert "STALE" not in status.stdout

    assert beta.stop() == 0
    gone = wait_until(lambda: (s := overview(alpha)) and by_host(s["hosts"])["beta"]["stale"]
                      and not by_host(s["indexers"])["beta"]["alive"] and s, 3 * HEARTBEAT + 10,
                      "beta to be shown as stale")
    last_seen = by_host(gone["hosts"])["beta"]["last_seen"]
    assert time.time() - last_seen >= 3 * HEARTBEAT  # not before three heartbeats were missed
    assert by_host(gone["hosts"])["alpha"]["stale"] is False
    assert by_host(gone["followers"])["beta"]["stale"] is True
    assert ready(alpha) is not None  # another host's loss leaves this one ready
    status = alpha.cli("status")
    assert "host beta: STALE: last reported" in status.stdout
    assert "indexer on beta: NOT RUNNING" in status.stdout and "indexer on alpha: running" in status.stdout

    forgotten = wait_until(lambda: (s := overview(alpha)) and "beta" not in by_host(s["hosts"]) and s, FORGET + 10,
                           "beta to be forgotten")
    assert time.time() - last_seen >= FORGET
    assert sorted(by_host(forgotten["followers"])) == ["alpha"]
    assert sorted(by_host(forgotten["indexers"])) == ["alpha"]
    assert "beta" not in alpha.cli("status").stdout

    # A host that comes back reports again under its id.
    beta.start()
    back = wait_until(lambda: (s := overview(alpha)) and not by_host(s["hosts"]).get("beta", {"stale": True})["stale"]
                      and s, 30, "beta to report again")
    assert by_host(back["indexers"])["beta"]["alive"] is True
