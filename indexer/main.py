"""The indexer process: periodic syncs per store (with `schedule`), admin-triggered sync jobs, and
the fulltext follower's process, started again when it dies."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

import schedule

from indexer import logs
from indexer.cache import Cache, CacheAddress
from indexer.config import read_config
from indexer.follower import FollowerProcess
from indexer.jobs import JobRunner
from indexer.metrics import observe_sync
from indexer.redis_clients import REDIS_ERRORS, RedisTarget, configured_target
from indexer.settings import Config, SyncConfig
from indexer.stores import Store, build_store
from indexer.sync import SyncBusy, SyncResult, full_sync, incremental_sync

log = logging.getLogger(__name__)

# How long the indexer's loop waits after an unexpected error (such as Redis being down) before it
# tries again.
RETRY_AFTER = 5.0
# A store that cannot be synced in full while it is missing from the cache is tried again after this
# long, twice as long each time, up to RESYNC_RETRY_MAX_S.
RESYNC_RETRY_FIRST_S = 10.0
RESYNC_RETRY_MAX_S = 300.0


class Stopping(Exception):
    """The indexer was asked to stop while a sync ran."""


class Indexer:
    """Syncs every configured store when it is due, then every sync.full_every, and reads changes
    every sync.changes_every in between (for stores that can list them)."""

    def __init__(self, config: Config, cache: Cache) -> None:
        self.config = config
        self.cache = cache
        self.stores: list[tuple[Store, SyncConfig]] = [(build_store(s, config), s.sync) for s in config.stores]
        self.scheduler = schedule.Scheduler()
        self.published: dict[str, dict[str, float | None]] = {}
        self.stop = threading.Event()
        self.check_every = max(1, config.redis.check_every)
        self.next_check = 0.0
        self.retry_after: dict[str, tuple[float, float]] = {}  # store -> (monotonic time, next delay)

    def _progress(self, read: int, applied: int) -> None:
        # Between two batches: a sync asked to stop fails there, and frees its store's lock, instead
        # of being killed when `mxisd run` stops waiting for it.
        if self.stop.is_set():
            raise Stopping("the indexer was stopped during this sync")

    def sync(self, store: Store, settings: SyncConfig) -> None:
        self._run(store, "full", lambda: full_sync(self.cache, store, settings.max_delete_ratio, self._progress))

    def sync_changes(self, store: Store) -> None:
        self._run(store, "incremental", lambda: incremental_sync(self.cache, store, self._progress))

    # A scheduled job must never raise: `schedule` would then run it again at once, in a loop, and
    # the loop itself would end.
    def _run(self, store: Store, kind: str, sync: Callable[[], SyncResult | None]) -> None:
        try:
            result = sync()
            if result is not None:
                observe_sync(result)
        except SyncBusy as exc:
            log.info("%s; skipping this run", exc)
        except REDIS_ERRORS as exc:
            logs.repeated.error(log, "store %s: %s sync not started, Redis unavailable: %s", store.name, kind, exc,
                                key=f"{store.name} {kind} redis")
        except Exception as exc:
            logs.repeated.error(log, "store %s: %s sync not started: %s: %s", store.name, kind,
                                type(exc).__name__, exc, key=f"{store.name} {kind} {type(exc).__name__}",
                                exc_info=True)

    def _first_delay(self, store: Store, every: int | None) -> float | None:
        last = self.cache.state(store.name).get("last_full") or {}
        if not last.get("ended"):
            return 0.0
        if every is None:
            return None
        return max(0.0, float(last["ended"]) + every - time.time())

    def plan(self) -> None:
        """Schedule each store's first run for when it is due, and every full_every after that."""
        self.scheduler.clear()  # planning again after a failure must not double the jobs
        for store, sync_config in self.stores:
            if not store.enumerable:
                log.info("store %s cannot be enumerated: lookups ask it on cache misses instead", store.name)
                continue
            if sync_config.changes_every:
                self.scheduler.every(sync_config.changes_every).seconds.do(
                    self.sync_changes, store).tag(store.name, "incremental")
            every = sync_config.full_every or None
            delay = self._first_delay(store, every)
            if delay is None:
                continue
            if delay == 0:
                self.sync(store, sync_config)
                if every:
                    self.scheduler.every(every).seconds.do(self.sync, store, sync_config).tag(store.name, "full")
                continue

            assert every is not None  # a delay is counted from the last full sync only when there is an every

            def first(store: Store = store, sync_config: SyncConfig = sync_config,
                      every: int = every) -> type[schedule.CancelJob]:
                self.sync(store, sync_config)
                self.scheduler.every(every).seconds.do(self.sync, store, sync_config).tag(store.name, "full")
                return schedule.CancelJob

            self.scheduler.every(max(1, int(delay))).seconds.do(first).tag(store.name, "full")
            log.info("store %s: next full sync in %d s", store.name, int(delay))

    def resync_incomplete(self) -> None:
        """Every redis.check_every: sync in full, now, each store that is not wholly in the cache (the
        cache was emptied, or a server found it restored from an older copy)."""
        now = time.monotonic()
        if now < self.next_check:
            return
        self.next_check = now + self.check_every
        self.cache.initialize()  # an emptied cache gets its epoch and pepper before anything is written
        enumerable = {store.name: (store, sync_config) for store, sync_config in self.stores if store.enumerable}
        for name in self.cache.incomplete_stores(list(enumerable)):
            when, delay = self.retry_after.get(name, (0.0, RESYNC_RETRY_FIRST_S))
            if now < when:
                continue
            log.warning("store %s is not wholly in the cache (emptied, or restored from an older copy): "
                        "full sync now", name)
            self.sync(*enumerable[name])
            if self.cache.incomplete_stores([name]):
                self.retry_after[name] = (time.monotonic() + delay, min(delay * 2, RESYNC_RETRY_MAX_S))
            else:
                self.retry_after.pop(name, None)

    def publish_schedule(self) -> None:
        """Record each store's next scheduled full and incremental sync (epoch seconds) for status."""
        for store, _ in self.stores:
            planned: dict[str, float | None] = {"next_full": None, "next_incremental": None}
            for job in self.scheduler.get_jobs(store.name):
                kind = "next_full" if "full" in job.tags else "next_incremental"
                if job.next_run is not None:
                    when = job.next_run.timestamp()
                    planned[kind] = min(when, planned[kind] or when)
            if self.published.get(store.name) != planned:
                self.cache.set_state(store.name, **planned)
                self.published[store.name] = planned

    def run(self, stop: threading.Event) -> None:
        """Run the syncs when they are due until stop is set. Nothing ends this loop but stop: an
        error (Redis down or emptied meanwhile) is logged and the loop tries again a little later."""
        self.stop = stop
        planned = False
        while not stop.is_set():
            try:
                if not planned:
                    self.plan()
                    planned = True
                self.resync_incomplete()
                self.scheduler.run_pending()
                self.publish_schedule()
            except REDIS_ERRORS as exc:
                logs.repeated.error(log, "indexer: Redis unavailable (%s); trying again in %.0f s", exc, RETRY_AFTER,
                                    key="indexer loop redis")
                stop.wait(RETRY_AFTER)
                continue
            except Exception as exc:
                logs.repeated.error(log, "indexer: unexpected error (%s: %s); trying again in %.0f s",
                                    type(exc).__name__, exc, RETRY_AFTER, key=f"indexer loop {type(exc).__name__}",
                                    exc_info=True)
                stop.wait(RETRY_AFTER)
                continue
            idle = self.scheduler.idle_seconds
            stop.wait(1.0 if idle is None else min(1.0, max(idle, 0.05)))

    def close(self) -> None:
        for store, _ in self.stores:
            store.close()


def run_indexer(config: Config, target: RedisTarget, stop: threading.Event, parent_pid: int | None = None) -> None:
    """The body of the indexer process: the follower's process, sync jobs and scheduled syncs, until
    stop is set (or the parent process has gone away)."""
    cache = CacheAddress.configured(config.redis, target).open()
    while not stop.is_set():
        try:
            cache.initialize()
            break
        except REDIS_ERRORS as exc:
            logs.repeated.error(log, "indexer: Redis unavailable (%s); trying again in %.0f s", exc, RETRY_AFTER,
                                key="indexer start redis")
            stop.wait(RETRY_AFTER)
    follower = FollowerProcess(config, target)
    follower.start()
    if parent_pid is not None:
        threading.Thread(target=_watch_parent, args=(parent_pid, stop), daemon=True).start()
    jobs = threading.Thread(target=JobRunner(config, cache, observe_sync).run, args=(stop,), name="sync-jobs",
                            daemon=True)
    jobs.start()
    heartbeat = threading.Thread(target=_heartbeat, name="heartbeat", daemon=True,
                                 args=(cache, config.server.host_id, config.supervisor.heartbeat, [jobs], follower,
                                       stop))
    heartbeat.start()
    indexer = Indexer(config, cache)
    try:
        indexer.run(stop)
    finally:
        stop.set()
        follower.stop()
        jobs.join(timeout=10)
        indexer.close()


def _heartbeat(cache: Cache, host: str, every: int, threads: list[threading.Thread], follower: FollowerProcess,
               stop: threading.Event) -> None:
    """Tell Redis that this host's indexer is alive every `every` seconds, while each of its threads
    is: readiness fails, and `mxisd status` says the indexer is down, once three beats are missed.
    A follower process found dead is started again, and the beat says how often that happened."""
    started, failing = time.time(), False
    while not stop.is_set():
        dead = [t.name for t in threads if not t.is_alive()]
        if dead:
            # Its loops catch every error, so this is a bug: end the process, and `mxisd run` restarts it.
            log.error("indexer: thread %s ended; stopping so that the indexer is restarted", ", ".join(dead))
            stop.set()
            return
        try:
            follower.revive()
        except OSError as exc:  # no process could be started (out of memory or processes): the next beat tries again
            logs.repeated.error(log, "indexer: could not start the fulltext follower: %s", exc, key="follower start")
        try:
            cache.beat(host, 3 * every, pid=os.getpid(), started=started, follower_pid=follower.pid,
                       follower_restarts=follower.restarts, follower_last_exit=follower.last_exit)
            if failing:
                log.info("indexer: heartbeat recorded again")
            failing = False
        except REDIS_ERRORS as exc:
            if not failing:  # once per outage, not once per beat
                log.warning("indexer: could not record its heartbeat: %s", exc)
            failing = True
        stop.wait(every)


def _watch_parent(parent_pid: int, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        if os.getppid() != parent_pid:
            log.warning("the server process is gone; indexer stopping")
            stop.set()


def main() -> None:
    """`python -m indexer.main EMBEDDED_URL PARENT_PID` with the config on stdin (read_config): the
    indexer process that `mxisd run` starts (EMBEDDED_URL is used when the config names no Redis)."""
    embedded_url, parent_pid = sys.argv[1], int(sys.argv[2])
    config = read_config(sys.stdin.fileno())
    if config is None:
        raise SystemExit("indexer: no config on stdin")
    logs.setup(config.log_level, "indexer", config.log_format)
    stop = threading.Event()
    # Ctrl-C reaches the whole process group; the server decides when the indexer stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    run_indexer(config, configured_target(config.redis) or embedded_url, stop, parent_pid)


if __name__ == "__main__":
    main()
