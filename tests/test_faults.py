"""Faults injected into a real `mxisd run`: its children killed, a store failing in a way nobody
planned for, signals at awkward moments, a sync job nobody takes. Marked `faults` (each starts and
kills processes, so they are slow): `pytest -m "not faults"` leaves them out."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psutil
import pytest
import redis
import yaml

from indexer.fulltext import FullText
from indexer.redis_server import EmbeddedRedis
from indexer.rediskeys import RedisKeys
from tests.conftest import PEOPLE, V1, V2, Server, search_mxids, started, wait_until
from tests.test_health_metrics import scrape, value

pytestmark = pytest.mark.faults

ADMIN_TOKEN = "fault-injection-admin-token"


def child(server: Server, marker: str) -> psutil.Process:
    """The child process of `mxisd run` whose command line holds marker."""
    assert server.process is not None
    for process in psutil.Process(server.process.pid).children():
        if any(marker in part for part in process.cmdline()):
            return process
    raise AssertionError(f"no child process {marker!r} of mxisd run")


def readiness(server: Server) -> tuple[int, dict[str, Any]]:
    response = server.http.get("/_mxisd/ready")
    return response.status_code, response.json()


def descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def test_a_killed_indexer_is_restarted_and_readiness_shows_the_gap(make_server):
    srv = make_server()
    # A long first wait, so that the gap can be seen from a second command (`mxisd status`).
    srv.config["supervisor"] = {"heartbeat": "1s", "restart_first": "8s"}
    srv.config["admin"] = {"token": ADMIN_TOKEN}
    srv.start()
    wait_until(lambda: readiness(srv)[0] == 200, what="readiness after the first sync")
    indexer = child(srv, "indexer.main")

    indexer.kill()
    status, body = wait_until(lambda: (r := readiness(srv))[0] == 503 and r, what="readiness to fail")
    assert body["checks"]["indexer"]["ok"] is False
    assert "killed by SIGKILL" in body["checks"]["indexer"]["error"]
    shown = srv.cli("status")
    assert shown.returncode == 0 and "NOT RUNNING: it was killed by SIGKILL" in shown.stdout
    assert srv.lookup_v1("email", "bob@example.com")["mxid"] == "@bob:example.org"  # the cache still answers

    wait_until(lambda: readiness(srv)[0] == 200, 40, "readiness once the indexer is back")
    assert child(srv, "indexer.main").pid != indexer.pid
    assert "indexer was killed by SIGKILL; starting it again in 8 s" in srv.log()
    assert "indexer on " in (shown := srv.cli("status").stdout) and ": running (pid" in shown

    # The new indexer does the work: a sync job through the admin API, then lookups find erin.
    srv.write_people(PEOPLE + [{"localpart": "erin", "emails": ["erin@example.com"]}])
    done = srv.cli("index")
    assert done.returncode == 0, done.stderr
    assert srv.lookup_v1("email", "erin@example.com")["mxid"] == "@erin:example.org"


def test_a_killed_fulltext_follower_is_started_again_and_status_shows_it(make_server):
    srv = make_server()
    srv.config["supervisor"] = {"heartbeat": "1s"}
    srv.start()
    wait_until(lambda: readiness(srv)[0] == 200, what="readiness after the first sync")
    indexer = child(srv, "indexer.main")
    first = readiness(srv)[1]["checks"]["indexer"]["follower_pid"]
    assert first in [p.pid for p in indexer.children()]  # a process of its own, the indexer's child

    psutil.Process(first).kill()
    check = wait_until(lambda: (c := readiness(srv)[1]["checks"].get("indexer", {})).get("follower_restarts") and c,
                       what="the heartbeat to report the restart")
    assert check["ok"] and check["follower_restarts"] == 1 and check["follower_pid"] not in (None, first)
    assert (f"fulltext follower (pid {first}) was killed by SIGKILL; starting it again (1 restarts so far)"
            in srv.log())
    shown = srv.cli("status").stdout
    assert (f"its fulltext follower: pid {check['follower_pid']}, started again 1 time (the follower before it "
            "was killed by SIGKILL)") in shown
    assert child(srv, "indexer.main").pid == indexer.pid  # the indexer itself went on

    # The new follower indexes what the next sync brings.
    srv.write_people(PEOPLE + [{"localpart": "erin", "display_name": "Érin Ölsen"}])
    assert srv.cli("index").returncode == 0
    index = FullText(srv.root / "data" / "fulltext")
    wait_until(lambda: search_mxids(index.path, "olsen") == ["@erin:example.org"], what="the follower to index erin")


def test_a_killed_embedded_redis_is_restarted_with_its_data(make_server):
    srv = make_server(embedded_redis=True)
    srv.config["supervisor"] = {"heartbeat": "1s", "restart_first": "3s"}
    srv.start()
    wait_until(lambda: readiness(srv)[0] == 200, what="readiness after the first sync")
    redis_server, indexer = child(srv, "redis-server"), child(srv, "indexer.main")

    redis_server.kill()
    status, body = wait_until(lambda: (r := readiness(srv))[0] == 503 and r, what="readiness to fail")
    assert body["checks"]["redis"]["ok"] is False
    assert srv.http.get(V1 + "/lookup", params={"medium": "email", "address": "bob@example.com"}).status_code == 503

    wait_until(lambda: readiness(srv)[0] == 200, 40, "readiness once Redis is back")
    assert child(srv, "redis-server").pid != redis_server.pid
    assert "embedded Redis was killed by SIGKILL; starting it again in 3 s" in srv.log()
    # Its append-only file brought the cache back: bob is known although nothing synced since.
    assert srv.lookup_v1("email", "bob@example.com")["mxid"] == "@bob:example.org"
    assert srv.log().count("full sync started") == 1
    # The indexer waited Redis out: the same process goes on.
    assert child(srv, "indexer.main").pid == indexer.pid


def test_the_indexer_outlives_an_emptied_cache(make_server):
    srv = make_server(embedded_redis=True)
    srv.config["stores"][0]["sync"]["full_every"] = "2s"
    srv.config["supervisor"] = {"heartbeat": "1s"}
    srv.start()
    wait_until(lambda: readiness(srv)[0] == 200, what="readiness after the first sync")
    indexer = child(srv, "indexer.main")
    syncs = srv.log().count("full sync started")

    redis.Redis(unix_socket_path=str(EmbeddedRedis(srv.root / "data").socket)).flushdb()
    wait_until(lambda: srv.log().count("full sync started") >= syncs + 2, what="syncs after the flush")
    assert indexer.is_running() and child(srv, "indexer.main").pid == indexer.pid
    wait_until(lambda: readiness(srv)[1]["checks"].get("indexer", {}).get("ok"), what="the indexer's heartbeat again")


def test_a_store_raising_an_unexpected_error_fails_that_sync_only(make_server):
    srv = make_server()
    database = srv.root / "people.sqlite3"
    with sqlite3.connect(database) as db:
        db.execute("CREATE TABLE people (login TEXT, email TEXT, mark INTEGER)")
        db.execute("INSERT INTO people VALUES ('alice', 'alice@example.com', 1)")
    columns = "login AS id, login AS user_id, NULL AS display_name, 'email' AS medium, email AS address"
    srv.config["stores"] = [{
        "name": "people", "kind": "sql", "url": "sqlite:///people.sqlite3",
        "queries": {
            "identities": f"SELECT {columns} FROM people",
            # A mark of another type for erin: ordering the changes raises TypeError inside the store.
            "changes": f"SELECT {columns}, CASE WHEN login = 'erin' THEN 'x' || mark ELSE mark END AS mark "
                       "FROM people WHERE mark > :since",
            "high_water_mark": "SELECT COALESCE(MAX(mark), 0) FROM people",
        },
        "sync": {"full_every": "1h", "changes_every": "1s"},
    }]
    srv.config["admin"] = {"token": ADMIN_TOKEN}
    srv.start()
    wait_until(lambda: readiness(srv)[0] == 200, what="readiness after the first sync")
    indexer = child(srv, "indexer.main")

    with sqlite3.connect(database) as db:
        db.execute("INSERT INTO people VALUES ('dave', 'dave@example.com', 2), ('erin', 'erin@example.com', 3)")
    wait_until(lambda: "TypeError" in srv.cli("status").stdout, what="the failed sync in mxisd status")
    shown = srv.cli("status").stdout
    assert "failed" in shown and "TypeError: '<' not supported" in shown
    assert "store people: incremental sync failed on an unexpected error: TypeError" in srv.log()
    # Each later incremental sync fails the same way (counted; logged once a minute); none of them
    # ends the indexer.
    wait_until(lambda: value(scrape(srv), "mxisd_syncs_total", store="people", kind="incremental",
                             outcome="failed") >= 3, what="incremental syncs going on")
    assert indexer.is_running() and child(srv, "indexer.main").pid == indexer.pid
    assert readiness(srv)[0] == 200

    # The next sync that can work does: a full one, run by the same indexer.
    done = srv.cli("index", "--full")
    assert done.returncode == 0, done.stderr
    assert srv.lookup_v1("email", "erin@example.com")["mxid"] == "@erin:example.org"
    assert child(srv, "indexer.main").pid == indexer.pid


def probe_limits(per_address: int) -> dict[str, Any]:
    """The sessions section for second_request_refused_of: per_address limited, the client's address
    not (each probe costs two requests, and a probe is sent every tenth of a second)."""
    return {"rate_limit": {"per_address": {"requests": per_address, "window": "1h"},
                           "per_ip": {"requests": 10000, "window": "1h"}}}


def second_request_refused_of(srv: Server, probe: Iterator[int]) -> bool:
    """Whether an address's second validation request is refused (the default allows 5)."""
    address = f"probe{next(probe)}@example.net"
    answers = [srv.http.post(V1 + "/validate/email/requestToken",
                             json={"client_secret": "s3cret", "email": address, "send_attempt": attempt})
               for attempt in (1, 2)]
    assert answers[0].status_code == 200, answers[0].text
    return answers[1].status_code == 429 and f"(per_address) for email:{address}" in srv.log()


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_reloads_what_it_can_and_never_stops_the_server(make_server, workers):
    srv = make_server()
    srv.config["server"]["workers"] = workers
    srv.config["sessions"] = probe_limits(per_address=5)
    # After the first full sync: the indexer a reload starts then counts from it ("next full sync in").
    started(srv)
    assert srv.process is not None
    probes = itertools.count()

    def second_request_refused() -> bool:
        return second_request_refused_of(srv, probes)
    assert not second_request_refused()

    srv.config["stores"][0]["sync"]["full_every"] = "2h"
    srv.config["sessions"] = probe_limits(per_address=1)
    srv.config["lookup"]["bulk_max"] = 7
    srv.config_path.write_text(yaml.safe_dump(srv.config))
    srv.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "re-read; store sync settings, sessions.rate_limit and sessions.policy applied" in srv.log(),
               what="the reload's log line")
    assert "changes to lookup need a restart of mxisd run; not applied" in srv.log()
    wait_until(lambda: "next full sync in 71" in srv.log(), what="the indexer on the new sync settings")
    wait_until(second_request_refused, 60, "the HTTP server on the new rate limit")

    srv.config_path.write_text(srv.config_path.read_text().replace("full_every: 2h", "full_every: 12"))
    srv.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "not reloaded" in srv.log(), what="the refused reload's log line")
    assert "stores[0].sync.full_every" in srv.log()

    assert srv.process.poll() is None
    assert srv.lookup_v1("email", "bob@example.com")["mxid"] == "@bob:example.org"
    wait_until(lambda: readiness(srv)[0] == 200, what="readiness")
    assert srv.stop() == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_a_reload_while_the_server_starts_is_applied_and_later_ones_too(make_server, workers):
    srv = make_server()
    srv.config["server"]["workers"] = workers
    srv.config["sessions"] = probe_limits(per_address=5)
    srv.launch()
    assert srv.process is not None
    probes = itertools.count()
    # At once, while the HTTP server process is still starting (importing, or Sanic starting its
    # workers): `systemctl reload mxisd` right after `systemctl start mxisd`.
    wait_until(lambda: "HTTP server started" in srv.log(), 60, "the HTTP server process to be started")
    srv.config["sessions"] = probe_limits(per_address=1)
    srv.config_path.write_text(yaml.safe_dump(srv.config))
    srv.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "sessions.rate_limit and sessions.policy applied" in srv.log(), what="the reload's log line")
    wait_until(lambda: srv.http.get("/_matrix/identity/v2").status_code == 200, 60, "the server to answer")
    assert second_request_refused_of(srv, probes)
    assert "Traceback" not in srv.log()

    # The reload came before the server could take it; the next one is not lost either.
    srv.config["sessions"] = probe_limits(per_address=3)
    srv.config_path.write_text(yaml.safe_dump(srv.config))
    srv.process.send_signal(signal.SIGHUP)
    wait_until(lambda: not second_request_refused_of(srv, probes), 60, "the HTTP server on the second reload")
    assert srv.stop() == 0


def test_a_reload_reaches_a_client_whose_connection_was_busy(make_server):
    srv = make_server()
    srv.config["server"]["workers"] = 2
    srv.config["sessions"] = probe_limits(per_address=5)
    srv.start()
    assert srv.process is not None
    probes = itertools.count()
    assert not second_request_refused_of(srv, probes)  # the connection the client keeps

    # A request on that connection is in flight (its OpenID check held) while its worker is
    # replaced on a reload.
    srv.homeserver.userinfo_open.clear()
    checks = srv.homeserver.requests.count("/_matrix/federation/v1/openid/userinfo")
    try:
        with ThreadPoolExecutor(1) as pool:
            busy = pool.submit(srv.http.post, V2 + "/account/register",
                               json=srv.homeserver.openid_token("@busy:example.org"))
            wait_until(lambda: srv.homeserver.requests.count("/_matrix/federation/v1/openid/userinfo") > checks,
                       what="the OpenID check")
            srv.config["sessions"] = probe_limits(per_address=1)
            srv.config_path.write_text(yaml.safe_dump(srv.config))
            srv.process.send_signal(signal.SIGHUP)
            wait_until(lambda: srv.log().count("Stopping worker") >= 2, 60, "the old workers to stop")
            srv.homeserver.userinfo_open.set()
            answer = busy.result(timeout=30)
    finally:
        srv.homeserver.userinfo_open.set()
    assert answer.status_code == 200, answer.text
    # It ends its connection: the client's next requests reach a worker on the new config, not the
    # old one (which would answer them for as long as Sanic lets it finish, 15 s).
    assert answer.headers["connection"] == "close"
    wait_until(lambda: second_request_refused_of(srv, probes), 5, "the client on the new rate limit")
    assert srv.stop() == 0


@pytest.mark.parametrize("moment, signals", [
    ("indexer started", 1),           # mxisd run still starting its children
    ("Starting worker", 1),           # Sanic's workers starting: Sanic itself would wait forever
    ("Starting worker", 2),           # and a second signal, as an impatient operator sends
])
def test_a_stop_signal_during_start_up_leaves_no_process(make_server, moment, signals):
    srv = make_server(embedded_redis=True)
    srv.config["server"]["workers"] = 2
    srv.config_path.write_text(yaml.safe_dump(srv.config))
    with open(srv.log_path, "ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "server.cli", "run", "--config", str(srv.config_path)],
                                   stdout=log, stderr=subprocess.STDOUT, cwd=srv.root, start_new_session=True)
    try:
        wait_until(lambda: moment in srv.log(), 60, f"{moment!r} in the log")
        started = descendants(process.pid)
        for _ in range(signals):
            process.send_signal(signal.SIGTERM)
            time.sleep(0.2)
        process.wait(timeout=20)
        data = str(srv.root / "data")

        def alive(p: psutil.Process) -> bool:
            try:
                return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
            except psutil.Error:
                return False

        def leftovers() -> list[psutil.Process]:
            found = [p for p in started if alive(p)]
            for p in psutil.process_iter(["cmdline"]):  # whatever started after the snapshot
                if any(data in part or str(srv.config_path) in part for part in p.info["cmdline"] or []):
                    found.append(p)
            return [p for p in found if alive(p)]

        wait_until(lambda: not leftovers(), 10, "every process of mxisd run to exit")
        assert "embedded Redis" in srv.log()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def test_a_job_whose_indexer_dies_fails_at_once(make_server):
    srv = make_server()
    srv.config["admin"] = {"token": ADMIN_TOKEN}
    srv.start()
    wait_until(lambda: readiness(srv)[0] == 200, what="readiness after the first sync")
    srv.people_path.unlink()
    os.mkfifo(srv.people_path)  # reading it waits for a writer that never comes: the job hangs
    following = subprocess.Popen([sys.executable, "-m", "server.cli", "index", "--config", str(srv.config_path)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=srv.root)
    try:
        def job_state() -> str | None:
            stores = srv.http.get("/_mxisd/admin/v1/stores", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
            job = stores.json()["stores"][0]["job"]
            return job and job["state"]

        wait_until(lambda: job_state() == "running", what="the job to run")
        child(srv, "indexer.main").kill()
        _, stderr = following.communicate(timeout=30)  # well before the job would expire (a minute)
    finally:
        following.kill()
    assert following.returncode == 1
    assert "people: sync failed: the indexer running this job was killed by SIGKILL" in stderr
    indexers = srv.http.get("/_mxisd/admin/v1/stores", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()
    assert indexers["indexers"][0]["last_exit"]["reason"] == "was killed by SIGKILL"


def test_a_job_no_indexer_takes_fails_with_a_message(make_server, redis_url, prefix):
    srv = make_server()
    srv.config["supervisor"] = {"restart_first": "1h"}  # the indexer stays down once killed
    srv.config["admin"] = {"token": ADMIN_TOKEN, "job_start_timeout": "2s"}
    srv.start()
    wait_until(lambda: readiness(srv)[0] == 200, what="readiness after the first sync")
    child(srv, "indexer.main").kill()
    wait_until(lambda: "indexer was killed by SIGKILL" in srv.log(), what="the indexer's death in the log")

    done = srv.cli("index")
    assert done.returncode == 1
    assert "people: sync failed: no indexer took this job within 2 s: the indexer is not running" in done.stderr
    # The failed job is no longer queued: an indexer started later does not run it after all.
    assert redis.Redis.from_url(redis_url).llen(RedisKeys(prefix).jobs) == 0


def test_an_http_server_that_cannot_listen_ends_mxisd_run(make_server):
    """Starting it again would not help: the port is taken."""
    srv = make_server(embedded_redis=True)
    srv.config_path.write_text(yaml.safe_dump(srv.config))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", srv.port))
        taken.listen()
        run = subprocess.run([sys.executable, "-m", "server.cli", "run", "--config", str(srv.config_path)],
                             capture_output=True, text=True, timeout=120, cwd=srv.root)
    assert run.returncode == 1
    assert "the HTTP server exited with status 1 before it answered" in run.stderr
    assert "Address already in use" in run.stderr and "embedded Redis stopped" in run.stderr
