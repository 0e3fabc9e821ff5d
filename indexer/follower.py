"""The index follower: tails the cache's change stream into this host's Whoosh index, and rebuilds
the index from Redis alone when it is missing, from another cache, or too far behind.

The indexer runs it in a process of its own (FollowerProcess), at a lower priority: reading the
changes and records, making documents and Whoosh's writing (pure Python) would otherwise take the
sync's interpreter lock, and the CPU time that the sync, Redis and the directory need."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.process import BaseProcess
from multiprocessing.sharedctypes import Synchronized

import redis

from indexer import logs
from indexer.cache import Cache, CacheAddress
from indexer.fulltext import SCHEMA_VERSION, FullText, document_key, fulltext_path
from indexer.identity import Identity
from indexer.redis_clients import RedisTarget
from indexer.settings import Config

log = logging.getLogger(__name__)

# Changes applied at once, at most: when a full sync writes faster than the index is written,
# the follower takes what has come meanwhile in one go (each batch is a segment, and a commit).
BATCH = 20_000
# Each applied batch leaves a small index segment, and searches slow down with every segment: once
# this many changes (and at least half the index) were applied batch by batch, the follower
# rebuilds the index whole (one segment) the next time the stream is quiet.
CONSOLIDATE_AFTER = 10_000
# The follower's process gives way to the sync, Redis and the HTTP server when they want the CPU:
# on two cores, a full sync competed with Whoosh's writing (a core's worth) for the cores its
# process, Redis and the directory need, and every identity became answerable by lookup later.
# The index is written with the CPU that is left, and wholly once the sync is done.
NICENESS = 10
PARENT_CHECK_S = 0.5  # how soon the follower process notices that the indexer is gone
# How long a stopping follower process may take (it stops between batches) before it is killed: less
# than the grace `mxisd run` gives the indexer.
STOP_TIMEOUT_S = 3.0
# A follower process that has shown no progress for this long (a batch applied, a quiet second of
# the stream waited out, 10,000 identities read for a rebuild) is stuck (a hung Whoosh write, a
# file system that stopped answering): it is killed and started again.
STUCK_AFTER_S = 1800.0
PROGRESS_EVERY = 10_000  # identities read for a rebuild between two signs of progress


class Follower:
    """Keeps one FullText index in step with the cache for the configured stores."""

    def __init__(self, cache: Cache, fulltext: FullText, stores: list[str], host: str,
                 progress: Callable[[], None] = lambda: None) -> None:
        """progress: called at every sign of progress (FollowerProcess tells a stuck process by it)."""
        self.cache = cache
        self.progress = progress
        self.fulltext = fulltext
        self.stores = stores
        self.host = host  # server.host_id: the follower reports its position under it
        self.epoch = ""
        self.last_id = "0-0"
        self.rebuilds_seen = 0
        self.indexed = 0  # identities in the index when it was last built whole
        self.applied = 0  # changes applied batch by batch since

    def _needs_rebuild(self) -> str | None:
        position = self.fulltext.position()
        if position is None:
            return "the index is missing"
        if position["schema"] != SCHEMA_VERSION:
            return "the index was built with another schema"
        if position["threepids"] != self.fulltext.threepids:
            return "directory.threepids changed"
        if position["epoch"] != self.epoch:
            return "the index was built from another cache"
        if self.cache.changes_lost_after(position["last_id"]):
            return "the index is behind the oldest change the cache still holds"
        return None

    def start(self, reason: str | None = None) -> None:
        """Open the index where it left off, or rebuild it from the cache (always when a reason is given)."""
        self.epoch = self.cache.initialize() or ""  # none: emptied meanwhile; the loop starts over
        self.rebuilds_seen = self.cache.rebuild_requests()
        reason = reason or self._needs_rebuild()
        if reason is None:
            position = self.fulltext.position()
            assert position is not None
            self.last_id = position["last_id"]
            self.indexed, self.applied = self.fulltext.count(), 0
            log.info("fulltext index at %s: following changes after %s", self.fulltext.path, self.last_id)
            self._report()
            return
        self._rebuild(reason)

    def _rebuild(self, reason: str) -> None:
        started = time.time()
        self.last_id = self.cache.last_change_id()

        def everyone() -> Iterator[Identity]:
            read = 0
            for store in self.stores:
                for identity in self.cache.iter_identities(store):
                    read += 1
                    if read % PROGRESS_EVERY == 0:
                        self.progress()
                    yield identity

        count = self.fulltext.rebuild(everyone(), self.epoch, self.last_id)
        self.indexed, self.applied = count, 0
        log.info("fulltext index rebuilt from the cache because %s: %d identities in %.1f s",
                 reason, count, time.time() - started)
        self._report(count, rebuilt=time.time())

    def step(self, block_ms: int | None = 1000) -> int:
        """Apply the next batch of changes (or rebuild, when an admin asked); the number applied."""
        if self.cache.rebuild_requests() != self.rebuilds_seen:
            self.start(reason="an admin asked for it")
            return 0
        changes = self.cache.read_changes(self.last_id, BATCH, block_ms)
        if not changes:
            if self.applied >= max(CONSOLIDATE_AFTER, self.indexed // 2):
                self._rebuild(f"{self.applied} changes were applied batch by batch (one segment searches faster)")
            return 0
        if self.cache.epoch() != self.epoch:
            log.warning("the cache was emptied and refilled: rebuilding the fulltext index")
            self.start()
            return len(changes)
        latest: dict[tuple[str, str], str] = {}
        for change in changes:
            latest[(change.store, change.store_id)] = change.op
        wanted = [(s, i) for (s, i), op in latest.items() if op == "upsert" and s in self.stores]
        upserts: list[Identity] = []
        deleted = [document_key(s, i) for (s, i), op in latest.items() if op == "delete"]
        by_store: dict[str, list[str]] = {}
        for store, store_id in wanted:
            by_store.setdefault(store, []).append(store_id)
        for store, ids in by_store.items():
            for store_id, identity in zip(ids, self.cache.get(store, ids)):
                if identity is None:
                    deleted.append(document_key(store, store_id))
                else:
                    upserts.append(identity)
        self.fulltext.apply(upserts, deleted, self.epoch, changes[-1].id)
        self.last_id = changes[-1].id
        self.applied += len(changes)
        self._report()
        return len(changes)

    def _report(self, count: int | None = None, rebuilt: float | None = None) -> None:
        fields: dict[str, object] = {"last_id": self.last_id, "updated": time.time(), "path": str(self.fulltext.path)}
        if count is not None:
            fields["count"] = count
        if rebuilt is not None:
            fields["rebuilt"] = rebuilt
        self.cache.set_follower_status(self.host, **fields)

    def run(self, stop: threading.Event) -> None:
        """Follow until stop is set; Redis outages are waited out, and no error ends the loop."""
        while not stop.is_set():
            self.progress()
            try:
                if not self.epoch:
                    self.start()
                self.step(block_ms=1000)
            except redis.exceptions.RedisError as exc:
                logs.repeated.warning(log, "fulltext follower: Redis unavailable (%s); retrying", exc,
                                      key="follower redis")
                self.epoch = ""
                stop.wait(2)
            except Exception as exc:  # the follower must go on
                logs.repeated.error(log, "fulltext follower: unexpected error (%s: %s); retrying in 5 s",
                                    type(exc).__name__, exc, key=f"follower {type(exc).__name__}", exc_info=True)
                self.epoch = ""
                stop.wait(5)


def follow(config: Config, target: RedisTarget, parent_pid: int, alive: Synchronized[float]) -> None:
    """The body of the follower process: follow the cache until SIGTERM, or until the process that
    started it is gone; alive holds the time.monotonic() of its last sign of progress."""
    logs.setup(config.log_level, "follower", config.log_format)
    os.nice(NICENESS)
    stop = threading.Event()
    # Ctrl-C reaches the whole process group; the indexer decides when the follower stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    _exit_with(parent_pid)
    cache = CacheAddress.configured(config.redis, target).open()
    fulltext = FullText(fulltext_path(config), config.directory.threepids)

    def progress() -> None:
        alive.value = time.monotonic()  # CLOCK_MONOTONIC: the same clock in every process

    Follower(cache, fulltext, [s.name for s in config.stores], config.server.host_id, progress).run(stop)


def _exit_with(parent_pid: int) -> None:
    """Exit as soon as the process that started this one is gone: a killed indexer (a second stop
    signal) cannot stop its follower, which would otherwise write the index beside the next one's."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_CHECK_S)
        os._exit(0)

    threading.Thread(target=watch, name="watch-parent", daemon=True).start()


class FollowerProcess:
    """The follower of config's stores in a process of its own, started again when it dies or has
    shown no progress for stuck_after seconds (revive). Thread-safe: the indexer's heartbeat revives
    it, its main thread stops it."""

    def __init__(self, config: Config, target: RedisTarget, stuck_after: float = STUCK_AFTER_S) -> None:
        self.config = config
        self.target = target
        self.stuck_after = stuck_after
        self._context = multiprocessing.get_context("spawn")
        self._alive: Synchronized[float] = self._context.Value("d", time.monotonic(), lock=False)
        self.restarts = 0
        self.last_exit: str | None = None  # how the last process that died ended
        self._process: BaseProcess | None = None
        self._lock = threading.Lock()
        self._stopped = False

    def start(self) -> None:
        with self._lock:
            self._start()

    def _start(self) -> None:
        # Spawned, not forked: the indexer's process has threads and open connections.
        self._alive.value = time.monotonic()
        self._process = self._context.Process(
            target=follow, args=(self.config, self.target, os.getpid(), self._alive), name="fulltext-follower")
        self._process.start()

    @property
    def pid(self) -> int | None:
        """The process's id while it runs."""
        with self._lock:
            return self._process.pid if self._process is not None and self._process.is_alive() else None

    def revive(self) -> None:
        """Start the process again if it died, is stuck (killed first) or could not be started,
        unless it was stopped."""
        with self._lock:
            process = self._process
            if self._stopped:
                return
            stuck = None
            if process is not None and process.is_alive():
                stuck_for = time.monotonic() - self._alive.value
                if stuck_for < self.stuck_after:
                    return
                process.kill()
                process.join(STOP_TIMEOUT_S)
                stuck = f"showed no progress for {stuck_for:.0f} s and was killed"
            if process is not None:
                self.restarts += 1
                self.last_exit = stuck or logs.describe_exit(process.exitcode or 0)
                log.error("fulltext follower (pid %s) %s; starting it again (%d restarts so far)", process.pid,
                          self.last_exit, self.restarts)
                process.close()
                self._process = None
            self._start()

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Ask the process to stop (it does between two batches) and kill it if it has not within timeout."""
        with self._lock:
            self._stopped = True
            process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        process.join(timeout)
        if process.is_alive():
            log.warning("fulltext follower did not stop within %.0f s; killing it", timeout)
            process.kill()
            process.join(timeout)
