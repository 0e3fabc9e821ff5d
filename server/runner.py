"""`mxisd run`: embedded Redis, the indexer in its own process, and the Sanic server, in one command."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, TextIO

import redis
from sanic import Sanic
from sanic.worker.loader import AppLoader

from indexer.cache import Cache, connect, timeout_of
from indexer.redis_server import EmbeddedRedis
from server.app import create_app
from server.bindings import check_cache
from server.keys import Keys
from server.metrics import use_directory
from server.storage import Storage, StorageError

log = logging.getLogger(__name__)


class StartupError(Exception):
    """Something outside the config stops the server from starting."""


def hold_data_dir(data_dir: str) -> TextIO:
    """An exclusive lock on the data directory for the life of this process."""
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    handle = open(Path(data_dir) / "mxisd.pid", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise StartupError(f"another mxisd is already running with data directory {data_dir}") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def wait_for_redis(url: str, timeout_s: float, timeout: float = 10.0) -> redis.Redis:
    """A connected client, or StartupError naming the URL."""
    client = connect(url, timeout_s)
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.ping()
            return client
        except redis.exceptions.RedisError as exc:
            if time.monotonic() > deadline:
                raise StartupError(f"Redis at {url} does not answer: {exc}") from None
            time.sleep(0.2)


def prepare_storage(config: dict[str, Any], cache: Cache) -> None:
    """Upgrade the SQL schema, rebuild the Redis mirror of bindings, and have every store synced in
    full when Redis is behind what SQL saw."""
    storage = Storage(config["storage"]["url"], config["data_dir"], threads=1)
    try:
        storage.upgrade()
        log.info("storage: %s", storage.describe())
        check_cache(storage, cache, [s["name"] for s in config["stores"]], rebuild=True)
    except StorageError as exc:
        raise StartupError(str(exc)) from None
    finally:
        storage.close()


def start_indexer(config: dict[str, Any], redis_url: str) -> subprocess.Popen[bytes]:
    """The indexer in a process of its own, so that a large sync never stalls requests. The config
    goes through a pipe: it may hold secrets, which must not show in the process list."""
    process = subprocess.Popen(
        [sys.executable, "-m", "indexer.scheduler", redis_url, str(os.getpid())], stdin=subprocess.PIPE
    )
    assert process.stdin is not None
    process.stdin.write(json.dumps(config).encode())
    process.stdin.close()
    return process


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run(config: dict[str, Any]) -> None:
    """Serve until SIGINT or SIGTERM, then stop the indexer and the embedded Redis."""
    # Until Sanic installs its own handlers, a SIGTERM must still stop the children we start.
    signal.signal(signal.SIGTERM, _interrupt)
    lock = hold_data_dir(config["data_dir"])
    Keys.load_or_create(config["data_dir"], config["server"]["name"])
    # Before any worker or the indexer starts: they inherit the directory and count from zero.
    use_directory(config["data_dir"])
    url, embedded = config["redis"]["url"], None
    indexer = None
    try:
        if not url:
            embedded = EmbeddedRedis(config["data_dir"])
            embedded.start()
            url = embedded.url
        client = wait_for_redis(url, timeout_of(config))
        cache = Cache(client, config["redis"]["prefix"])
        cache.initialize()
        prepare_storage(config, cache)
        indexer = start_indexer(config, url)
        server = config["server"]
        loader = AppLoader(factory=partial(create_app, config, url))
        app = loader.load()
        app.prepare(
            host=server["bind"],
            port=server["port"],
            workers=server["workers"],
            access_log=False,  # the app logs each request itself, with secrets masked
            motd=False,
            single_process=server["workers"] == 1,
        )
        log.info("serving %s on http://%s:%d", server["name"], server["bind"], server["port"])
        if server["workers"] == 1:
            Sanic.serve_single(primary=app)
        else:
            Sanic.serve(primary=app, app_loader=loader)
    finally:
        if indexer is not None and indexer.poll() is None:
            indexer.terminate()
            try:
                indexer.wait(timeout=20)
            except subprocess.TimeoutExpired:
                log.warning("indexer did not stop in time; killing it")
                indexer.kill()
        if embedded is not None:
            embedded.stop()
        lock.close()
        log.info("stopped")
