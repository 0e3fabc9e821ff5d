"""The index follower: tails the cache's change stream into this host's Whoosh index, and rebuilds
the index from Redis alone when it is missing, from another cache, or too far behind."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import redis

from indexer import logs
from indexer.cache import Cache
from indexer.fulltext import SCHEMA_VERSION, FullText, document_key
from indexer.identity import Identity

log = logging.getLogger(__name__)

# Changes applied at once, at most: when a full sync writes faster than the index is written,
# the follower takes what has come meanwhile in one go (each batch is a segment, and a commit).
BATCH = 20_000
# Each applied batch leaves a small index segment, and searches slow down with every segment: once
# this many changes (and at least half the index) were applied batch by batch, the follower
# rebuilds the index whole (one segment) the next time the stream is quiet.
CONSOLIDATE_AFTER = 10_000


class Follower:
    """Keeps one FullText index in step with the cache for the configured stores."""

    def __init__(self, cache: Cache, fulltext: FullText, stores: list[str], host: str) -> None:
        self.cache = cache
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
            for store in self.stores:
                yield from self.cache.iter_identities(store)

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
        upserts: list[str] = []  # records' JSON: the writer process parses them
        deleted = [document_key(s, i) for (s, i), op in latest.items() if op == "delete"]
        by_store: dict[str, list[str]] = {}
        for store, store_id in wanted:
            by_store.setdefault(store, []).append(store_id)
        for store, ids in by_store.items():
            for store_id, raw in zip(ids, self.cache.get_raw(store, ids)):
                if raw is None:
                    deleted.append(document_key(store, store_id))
                else:
                    upserts.append(raw)
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
        """Follow until stop is set; Redis outages are waited out."""
        while not stop.is_set():
            try:
                if not self.epoch:
                    self.start()
                self.step(block_ms=1000)
            except redis.exceptions.RedisError as exc:
                logs.repeated.warning(log, "fulltext follower: Redis unavailable (%s); retrying", exc,
                                      key="follower redis")
                self.epoch = ""
                stop.wait(2)
            except Exception as exc:  # this thread must go on
                logs.repeated.error(log, "fulltext follower: unexpected error (%s: %s); retrying in 5 s",
                                    type(exc).__name__, exc, key=f"follower {type(exc).__name__}", exc_info=True)
                self.epoch = ""
                stop.wait(5)
