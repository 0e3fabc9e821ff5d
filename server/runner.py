"""`mxisd run`: the embedded Redis, the indexer and the HTTP server, each in a process of its own,
started, watched and stopped by this one (the supervisor)."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import redis

from indexer.cache import Cache
from indexer.config import ConfigError, load_config, write_config
from indexer.logs import describe_exit
from indexer.redis_clients import REDIS_ERRORS, RedisTarget, cache_spread, configured_target, connect, describe
from indexer.redis_server import EmbeddedRedis
from indexer.settings import Config
from server.bindings import check_cache
from server.metrics import use_directory
from server.service_manager import monotonic_usec, notify
from server.signing import SigningKeys
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


def wait_for_redis(target: RedisTarget, timeout_s: float, timeout: float = 10.0,
                   cancelled: Callable[[], bool] = lambda: False) -> redis.Redis:
    """A connected client, or StartupError naming the Redis."""
    client = connect(target, timeout_s)
    deadline = time.monotonic() + timeout
    while not cancelled():
        try:
            client.ping()
            return client
        except REDIS_ERRORS as exc:
            if time.monotonic() > deadline:
                raise StartupError(f"Redis at {describe(target)} does not answer: {exc}") from None
            time.sleep(0.2)
    return client


def prepare_storage(config: Config, cache: Cache) -> None:
    """Upgrade the SQL schema, rebuild the Redis mirror of bindings, and have every store synced in
    full when Redis is behind what SQL saw."""
    storage = Storage(config.storage.url, config.data_dir, threads=1)
    try:
        storage.upgrade()
        log.info("storage: %s", storage.describe())
        check_cache(storage, cache, [s.name for s in config.stores], rebuild=True)
    except StorageError as exc:
        raise StartupError(str(exc)) from None
    finally:
        storage.close()



# How long a child process has to stop after SIGTERM before it is killed. Syncs stop between
# batches, and Sanic answers the requests it has begun within this.
STOP_GRACE = 5.0
TICK = 0.2


def _spawn(module: str, config: Config, embedded_url: str, *extra: int,
           keep_stdin: bool = False) -> subprocess.Popen[bytes]:
    """`python -m module EMBEDDED_URL OUR_PID [FD...]` (EMBEDDED_URL: the embedded Redis', or "-"
    when the config names the Redis: no password shows in the process list) in a session of its
    own (a terminal's Ctrl-C or hangup reaches this process alone, which decides), with the config
    on a pipe (write_config). The file descriptors in extra are passed on; with keep_stdin, the
    pipe stays open for configs re-read later."""
    process = subprocess.Popen([sys.executable, "-m", module, embedded_url, str(os.getpid()), *map(str, extra)],
                               stdin=subprocess.PIPE, start_new_session=True, pass_fds=extra)
    assert process.stdin is not None
    write_config(process.stdin, config)
    if not keep_stdin:
        process.stdin.close()
    return process


def _send_config(process: subprocess.Popen[bytes] | None, config: Config) -> None:
    """Hand a re-read config to a child started with keep_stdin."""
    if process is None or process.stdin is None or process.poll() is not None:
        return  # it starts with the new config when it is started again
    with contextlib.suppress(BrokenPipeError):
        write_config(process.stdin, config)


class Child:
    """A process of `mxisd run`: started again after it dies, first after restart_first, then twice
    as long each time up to restart_max (the wait starts over once it has run for restart_max)."""

    def __init__(self, name: str, spawn: Callable[[], subprocess.Popen[bytes] | None], restart_first: float,
                 restart_max: float, on_exit: Callable[[str, float], None] | None = None,
                 group: bool = False, give_up: Callable[[], bool] = lambda: False) -> None:
        self.name = name
        self.spawn = spawn
        self.first, self.most = restart_first, restart_max
        self.delay = restart_first
        self.on_exit = on_exit
        self.group = group  # stop its whole process group (the HTTP server's workers)
        self.give_up = give_up  # whether a death is fatal (a server that never came up will not)
        self.process: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.restart_at: float | None = None
        self.replacing = False
        self.kill_at: float | None = None

    def start(self) -> None:
        self.process = self.spawn()
        self.started = time.monotonic()
        self.restart_at = None
        if self.process is not None:
            log.info("%s started (pid %d)", self.name, self.process.pid)

    def replace(self) -> None:
        """Stop it and start it again at once (a reload): not a failure."""
        if self.process is None or self.process.poll() is not None:
            return
        self.replacing = True
        self.kill_at = time.monotonic() + STOP_GRACE
        self._signal(signal.SIGTERM)

    def check(self) -> None:
        """Notice a death, and start it again when its wait is over."""
        now = time.monotonic()
        if self.process is None:
            if self.restart_at is not None and now >= self.restart_at:
                try:
                    self.start()
                except Exception as exc:  # such as the embedded Redis failing to start: try again later
                    log.error("%s could not be started: %s", self.name, exc)
                    self._wait_then_restart(now, "could not be started")
            return
        status = self.process.poll()
        if status is None:
            if self.kill_at is not None and now >= self.kill_at:
                log.warning("%s did not stop in time; killing it", self.name)
                self._signal(signal.SIGKILL)
                self.kill_at = None
            return
        self._sweep()
        self.process = None
        if self.give_up():
            raise StartupError(f"the {self.name} {describe_exit(status)} before it answered; see the lines above")
        if self.replacing:
            self.replacing, self.kill_at = False, None
            self.start()
            return
        if now - self.started >= self.most:
            self.delay = self.first
        self._wait_then_restart(now, describe_exit(status))

    def _wait_then_restart(self, now: float, what: str) -> None:
        delay = self.delay
        log.error("%s %s; starting it again in %g s", self.name, what, delay)
        if self.on_exit is not None:
            self.on_exit(what, delay)
        self.restart_at = now + delay
        self.delay = min(delay * 2, self.most)

    def _signal(self, signum: int) -> None:
        """SIGKILL reaches the whole group of a group child; other signals its leader alone, which
        stops the rest in order (Sanic's manager shuts its workers down before its state process)."""
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            if self.group and signum == signal.SIGKILL:
                os.killpg(self.process.pid, signum)
            else:
                self.process.send_signal(signum)

    def _sweep(self) -> None:
        """Kill what is left of its process group (Sanic's workers when Sanic's manager died)."""
        if self.group and self.process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)

    def terminate(self) -> None:
        """Ask it to stop (once: a second SIGTERM makes Sanic kill its workers at once)."""
        if self.process is not None and self.process.poll() is None and not self.replacing:
            self._signal(signal.SIGTERM)

    def finish(self, hurry: Callable[[], bool]) -> None:
        """Wait for it to stop after terminate(), and SIGKILL it after STOP_GRACE (at once when hurry()
        says so)."""
        if self.process is None:
            return
        deadline = time.monotonic() + STOP_GRACE
        while self.process.poll() is None and time.monotonic() < deadline and not hurry():
            time.sleep(0.05)
        if self.process.poll() is None:
            log.warning("%s did not stop in time; killing it", self.name)
            self._signal(signal.SIGKILL)
            self.process.wait()
        self._sweep()
        self.process = None


class Signals:
    """Stop and reload requests, noted by the signal handlers and acted on by the supervisor's loop
    (a handler that did the work could interrupt a process start half-way and orphan it)."""

    def __init__(self) -> None:
        self.stops: list[str] = []
        self.reload = False
        # A handler that set a threading.Event could wait forever for the Event's lock, held by the
        # very loop it interrupted: the handlers take no lock, and the interpreter writes each
        # signal's number to this pipe (set_wakeup_fd), which wait() selects on.
        self._woken, wakeup = os.pipe()
        os.set_blocking(self._woken, False)
        os.set_blocking(wakeup, False)
        signal.set_wakeup_fd(wakeup, warn_on_full_buffer=False)
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, self._note)

    def _note(self, signum: int, frame: object) -> None:
        if signum == signal.SIGHUP:
            self.reload = True
        else:
            self.stops.append(signal.Signals(signum).name)

    def wait(self, timeout: float) -> None:
        """Until a signal comes or timeout seconds have passed."""
        select.select([self._woken], [], [], timeout)
        with contextlib.suppress(BlockingIOError):
            while os.read(self._woken, 64):
                pass

    def stopping(self) -> bool:
        return bool(self.stops)

    def hurry(self) -> bool:
        """A second stop signal: kill what is left instead of waiting for it."""
        return len(self.stops) > 1


class Stopped(Exception):
    """A stop signal came while `mxisd run` was starting."""


# The keys a reload applies, and what the log calls them.
RELOADED = {"log_level": "log_level", "stores": "store sync settings",
            "sessions": "sessions.rate_limit and sessions.policy",
            "auth": "auth.rate_limit"}


def reloadable(old: Config, new: Config) -> tuple[Config, list[str]]:
    """The config to go on with after a reload (old, with the changes that can be applied without a
    restart: log_level, each store's sync settings, sessions.rate_limit, sessions.policy and
    auth.rate_limit) and the
    keys whose changes cannot."""
    changes: dict[str, Any] = {}
    ignored = []
    for key in sorted(f.name for f in dataclasses.fields(Config)):
        was, now = getattr(old, key), getattr(new, key)
        if was == now:
            continue
        if key == "log_level":
            changes[key] = now
        elif key == "sessions":
            if dataclasses.replace(was, rate_limit=now.rate_limit, policy=now.policy) == now:
                changes[key] = now
            else:
                ignored.append("sessions (other than rate_limit and policy)")
        elif key == "auth":
            if dataclasses.replace(was, rate_limit=now.rate_limit) == now:
                changes[key] = now
            else:
                ignored.append("auth (other than rate_limit)")
        elif key == "stores":
            if len(was) == len(now) and all(dataclasses.replace(w, sync=n.sync) == n for w, n in zip(was, now)):
                changes[key] = now
            else:
                ignored.append("stores (other than their sync settings)")
        else:
            ignored.append(key)
    return dataclasses.replace(old, **changes), ignored


class Supervisor:
    """Starts the children, restarts the ones that die, and stops them all on SIGINT or SIGTERM."""

    def __init__(self, config: Config, config_path: str | None) -> None:
        self.config = config
        self.path = config_path
        self.signals = Signals()
        self.host = config.server.host_id
        self.cache: Cache | None = None
        self.children: list[Child] = []

    def checkpoint(self) -> None:
        if self.signals.stopping():
            raise Stopped()

    def run(self) -> None:
        config = self.config
        first = max(1, config.supervisor.restart_first)
        most = max(first, config.supervisor.restart_max)
        lock = hold_data_dir(config.data_dir)
        SigningKeys.load_or_create(config.data_dir, config.server.name)
        # Before any worker or the indexer starts: they inherit the directory and count from zero.
        use_directory(config.data_dir)
        target, embedded = configured_target(config.redis), None
        redis_child = None
        # The server writes to this pipe once it listens: dying before that (its port taken, say) is
        # fatal, since starting it again would not help.
        listening, told = os.pipe()
        os.set_blocking(listening, False)
        try:
            if target is None:
                embedded = EmbeddedRedis(config.data_dir)

                def start_redis() -> subprocess.Popen[bytes] | None:
                    assert embedded is not None
                    embedded.start(cancelled=self.signals.stopping)
                    return embedded.process

                redis_child = Child("embedded Redis", start_redis, first, most)
                redis_child.start()
                if redis_child.process is None:
                    log.warning("the embedded Redis was already running: it is used but not watched")
                    redis_child = None
                else:
                    self.children.append(redis_child)
                target = embedded.url
            self.checkpoint()
            client = wait_for_redis(target, config.redis.timeout, cancelled=self.signals.stopping)
            self.checkpoint()
            self.cache = Cache(client, config.redis.prefix, cache_spread(config.redis))
            self.cache.initialize()
            prepare_storage(config, self.cache)
            self.checkpoint()
            redis_url = embedded.url if embedded is not None else "-"
            indexer = Child("indexer", lambda: _spawn("indexer.main", self.config, redis_url), first, most,
                            on_exit=self._indexer_exited)
            self.children.append(indexer)
            indexer.start()
            up: list[bool] = []
            server = Child("HTTP server",
                           lambda: _spawn("server.serve", self.config, redis_url, *([] if up else [told]),
                                          keep_stdin=True),
                           first, most, group=True, give_up=lambda: not up)
            self.children.append(server)
            server.start()
            while not self.signals.stopping():
                if not up:
                    with contextlib.suppress(BlockingIOError):
                        if os.read(listening, 16):
                            up.append(True)
                            notify("READY=1", f"STATUS=answering on {config.server.bind}:{config.server.port}")
                self.signals.wait(TICK)
                if self.signals.reload:
                    self.signals.reload = False
                    if up:
                        notify("RELOADING=1", monotonic_usec())
                    self.reload(indexer, server)
                    if up:
                        notify("READY=1")
                for child in self.children:
                    if not self.signals.stopping():
                        child.check()
            log.info("received %s: stopping", self.signals.stops[0])
            notify("STOPPING=1")
        except Stopped:
            log.info("received %s while starting: stopping", self.signals.stops[0])
        finally:
            workers = [c for c in self.children if c is not redis_child]
            for child in workers:  # all at once: their graces run together
                child.terminate()
            for child in workers:
                child.finish(self.signals.hurry)
            if embedded is not None:
                embedded.stop()
            os.close(listening)
            os.close(told)
            lock.close()
            log.info("stopped")

    def _indexer_exited(self, what: str, restart_in: float) -> None:
        """Readiness fails from now on (the indexer's heartbeat is gone), and its running jobs."""
        if self.cache is None:
            return
        try:
            self.cache.indexer_exited(self.host, reason=what, restart_in=restart_in)
            # Those following its jobs (`mxisd index`) learn it now, not when the jobs expire.
            for job_id in self.cache.fail_running_jobs(self.host, [s.name for s in self.config.stores],
                                                       f"the indexer running this job {what}"):
                log.error("job %s failed: the indexer running it %s", job_id, what)
        except REDIS_ERRORS as exc:
            log.warning("could not record the indexer's exit: %s", exc)

    def reload(self, indexer: Child, server: Child) -> None:
        """SIGHUP: apply what can change without a restart; say what cannot."""
        if self.path is None:
            log.info("received SIGHUP: no config file to re-read; ignored")
            return
        try:
            new = load_config(self.path)
        except ConfigError as exc:
            log.error("received SIGHUP: config %s not reloaded: %s", self.path, exc)
            return
        merged, ignored = reloadable(self.config, new)
        if ignored:
            log.warning("received SIGHUP: changes to %s need a restart of mxisd run; not applied", ", ".join(ignored))
        if merged == self.config:
            log.info("received SIGHUP: config %s re-read, nothing to apply", self.path)
            return
        applied = [key for key in RELOADED if getattr(merged, key) != getattr(self.config, key)]
        self.config = merged
        logging.getLogger().setLevel(merged.log_level)
        log.info("received SIGHUP: config %s re-read; %s applied", self.path,
                 ", ".join(RELOADED[key] for key in applied))
        if {"log_level", "stores"} & set(applied):
            indexer.replace()  # it has nothing else to lose: everything it knows is in Redis
        if {"log_level", "sessions", "auth"} & set(applied):
            _send_config(server.process, merged)


def run(config: Config, config_path: str | None = None) -> None:
    """Serve until SIGINT or SIGTERM, then stop the HTTP server, the indexer and the embedded Redis."""
    Supervisor(config, config_path).run()
