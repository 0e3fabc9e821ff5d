"""Copying a store into the cache: full sync by mark-and-sweep, with a guard against mass deletion."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from indexer import logs
from indexer.cache import Cache
from indexer.identity import Identity
from indexer.settings import SyncConfig
from indexer.stores import Change, Store, StoreError
from indexer.sync_writer import HANDOVER_AFTER, Batch, SyncWriter, WriterFailed, write_batch

log = logging.getLogger(__name__)

BATCH = 500
LOCK_TIMEOUT = 60.0

Progress = Callable[[int, int], None]  # (entries read, identities written or removed)


class SyncBusy(Exception):
    """Another indexer holds the store's sync lock."""


@dataclass
class SyncResult:
    """What one sync did; stored as the store's last_full state."""

    store: str
    kind: str = "full"
    started: float = field(default_factory=time.time)
    ended: float | None = None
    outcome: str = "running"  # ok | failed | refused
    read: int = 0
    added: int = 0
    changed: int = 0
    removed: int = 0
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Heartbeat:
    """Keeps the sync lock alive while a slow store is read."""

    def __init__(self, lock: redis.lock.Lock) -> None:
        self.lock = lock
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"lock-{lock.name}", daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(LOCK_TIMEOUT / 3):
            try:
                self.lock.reacquire()
            except (redis.exceptions.LockError, redis.exceptions.RedisError) as exc:
                log.warning("could not extend sync lock %s: %s", self.lock.name, exc)

    def __enter__(self) -> _Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def _locked_run(
    cache: Cache,
    store: Store,
    kind: str,
    body: Callable[[SyncResult], None],
    wait_for_lock: float,
) -> SyncResult:
    """Run body under the store's sync lock, turning store and Redis failures into a failed result
    and recording the result as the store's last_<kind> state."""
    lock = cache.lock(store.name, LOCK_TIMEOUT)
    if not lock.acquire(blocking=wait_for_lock > 0, blocking_timeout=wait_for_lock or None):
        raise SyncBusy(f"store {store.name} is being synced by another indexer")
    result = SyncResult(store.name, kind)
    try:
        with _Heartbeat(lock):
            body(result)
    except StoreError as exc:
        result.outcome, result.error = "failed", str(exc)
        logs.repeated.error(log, "store %s: %s sync failed, cache left as it was: %s", store.name, kind, exc,
                            key=f"{store.name} {kind} store")
    except redis.exceptions.RedisError as exc:
        result.outcome, result.error = "failed", f"redis: {exc}"
        logs.repeated.error(log, "store %s: %s sync failed on Redis: %s", store.name, kind, exc,
                            key=f"{store.name} {kind} redis")
    except WriterFailed as exc:
        result.outcome, result.error = "failed", str(exc)
        logs.repeated.error(log, "store %s: %s sync failed: %s", store.name, kind, exc,
                            key=f"{store.name} {kind} writer")
    except Exception as exc:  # a store's bug: that sync fails, the indexer carries on
        result.outcome, result.error = "failed", f"{type(exc).__name__}: {exc}"
        logs.repeated.error(log, "store %s: %s sync failed on an unexpected error: %s", store.name, kind,
                            result.error, key=f"{store.name} {kind} {type(exc).__name__}", exc_info=True)
    finally:
        result.ended = time.time()
        state: dict[str, Any] = {f"last_{kind}": result.as_dict()}
        if result.outcome == "ok":
            state["last_success"] = result.ended
        try:
            cache.set_state(store.name, **state)
            if result.outcome == "ok":
                cache.advance_generation()
        except redis.exceptions.RedisError as exc:
            log.error("store %s: could not record sync state: %s", store.name, exc)
        try:
            lock.release()
        except redis.exceptions.LockError:
            log.warning("store %s: sync lock had expired before the sync ended", store.name)
    return result


def full_sync(
    cache: Cache,
    store: Store,
    max_delete_ratio: float,
    progress: Progress | None = None,
    wait_for_lock: float = 0.0,
) -> SyncResult:
    """Enumerate the whole store, write what changed, then remove what the store no longer has.

    Nothing is removed unless the enumeration completed, and not when more than max_delete_ratio of
    the store's identities (and more than one) would go: that sync is refused and reported.
    """
    report = progress or (lambda read, applied: None)
    return _locked_run(cache, store, "full",
                       lambda result: _run_full(cache, store, max_delete_ratio, result, report), wait_for_lock)


def incremental_sync(
    cache: Cache,
    store: Store,
    progress: Progress | None = None,
    wait_for_lock: float = 0.0,
) -> SyncResult | None:
    """Apply the entries changed since the stored high-water mark, then advance the mark to the
    largest the source reported. None when there is no mark yet (a full sync must run first)."""
    mark = cache.state(store.name).get("high_water_mark")
    if mark is None:
        return None
    report = progress or (lambda read, applied: None)
    return _locked_run(cache, store, "incremental",
                       lambda result: _run_incremental(cache, store, mark, result, report), wait_for_lock)


def sync_store(
    cache: Cache,
    store: Store,
    settings: SyncConfig,
    full: bool,
    progress: Progress | None = None,
    wait_for_lock: float = 0.0,
) -> SyncResult:
    """A full sync when asked, or when the store cannot list changes or has no mark yet; else an
    incremental one."""
    result = None if full else incremental_sync(cache, store, progress, wait_for_lock)
    if result is None:
        result = full_sync(cache, store, settings.max_delete_ratio, progress, wait_for_lock)
    return result


def _run_incremental(cache: Cache, store: Store, mark: Any, result: SyncResult, progress: Progress) -> None:
    generation = cache.generation(store.name)
    # The content hash of each record these changes touch (None: not in the cache), read a batch at
    # a time (not every record's: that grew with the store, whatever the number of changes), then
    # kept as this sync leaves it.
    known: dict[str, str | None] = {}
    newest = mark
    batch: list[Change] = []
    applied = 0

    def flush() -> None:
        nonlocal applied
        unread = list({c.store_id for c in batch if c.store_id not in known})
        hashes = cache.content_hashes(store.name, unread)
        known.update((i, hashes.get(i)) for i in unread)
        # An entry can move without its content changing: only where it is now is written (apply
        # writes the locators of the records it writes).
        moved: list[Identity] = []
        pending: dict[str, Identity | None] = {}
        for change in batch:
            previous = known[change.store_id]
            if change.identity is not None and previous == change.identity.hash:
                moved.append(change.identity)
                continue
            if change.identity is None and previous is None:
                continue
            if change.identity is not None:
                if previous is not None:
                    result.changed += 1
                else:
                    result.added += 1
                known[change.store_id] = change.identity.hash
            else:
                known[change.store_id] = None
            pending[change.store_id] = change.identity
        batch.clear()
        cache.set_locators(store.name, moved)
        ids = list(pending)
        old = dict(zip(ids, cache.get(store.name, ids)))
        upserts = [(new, old[i]) for i, new in pending.items() if new is not None]
        deletes = [held for i, new in pending.items() if new is None and (held := old[i]) is not None]
        cache.apply(store.name, upserts, deletes, generation)
        applied += len(upserts) + len(deletes)
        result.removed += len(deletes)
        progress(result.read, applied)

    for change in store.changes_since(mark):
        result.read += 1
        newest = max(newest, change.mark)
        batch.append(change)
        if len(batch) >= BATCH:
            flush()
    flush()
    # Only now that every change is in the cache may the mark move on.
    cache.set_state(store.name, high_water_mark=newest)
    result.outcome = "ok"
    log.info("store %s: incremental sync: read %d, added %d, changed %d, removed %d; mark %s",
             store.name, result.read, result.added, result.changed, result.removed, newest)


def _run_full(cache: Cache, store: Store, ratio: float, result: SyncResult, progress: Progress) -> None:
    mark = store.high_water_mark()  # before reading: changes made meanwhile come in the next incremental
    epoch = cache.epoch()  # a cache emptied during the sync does not hold what was written before
    generation = cache.next_generation(store.name)
    known = cache.content_hashes(store.name)
    before = len(known)
    seen: set[str] = set()
    unchanged: list[Identity] = []
    changed: list[Identity] = []
    applied = 0
    writer: SyncWriter | None = None
    handed_over = False

    def flush() -> None:
        nonlocal applied, writer, handed_over
        # Only the records this sync replaces are read: one with no content hash is not in the
        # cache (a record and its content hash are written and removed together), and most of a
        # first sync's are new.
        batch = Batch(unchanged[:], changed[:], [i.store_id for i in changed if i.store_id in known])
        unchanged.clear()
        changed.clear()
        if writer is None and cache.address is not None and result.read >= HANDOVER_AFTER:
            writer = SyncWriter(cache.address, store.name, generation)
        if writer is not None and not handed_over and writer.ready:
            handed_over = True
            log.info("store %s: full sync: the batches from entry %d on are written by process %s", store.name,
                     result.read - len(batch.unchanged) - len(batch.changed) + 1, writer.pid)
        if batch.unchanged or batch.changed:
            applied += (writer.write(batch) if writer is not None and handed_over
                        else write_batch(cache, store.name, generation, batch))
        progress(result.read, applied)

    log.info("store %s: full sync started (%d identities cached)", store.name, before)
    try:
        for identity in store.enumerate():
            result.read += 1
            if identity.store_id in seen:
                log.warning("store %s: id %s appears twice; the first entry is kept", store.name, identity.store_id)
                continue
            seen.add(identity.store_id)
            previous = known.get(identity.store_id)
            if previous == identity.hash:
                unchanged.append(identity)
            else:
                changed.append(identity)
                if previous is None:
                    result.added += 1
                else:
                    result.changed += 1
            if len(unchanged) + len(changed) >= BATCH:
                flush()
        flush()
        if writer is not None:
            applied += writer.finish()
    finally:
        if writer is not None:
            writer.close()

    stale = cache.stale_ids(store.name, generation)
    if len(stale) > 1 and len(stale) > ratio * before:
        result.outcome = "refused"
        result.error = (
            f"would remove {len(stale)} of {before} identities, more than max_delete_ratio {ratio:g}; "
            "nothing was removed (check the store's filter or contents, or raise sync.max_delete_ratio)"
        )
        log.error("store %s: full sync refused: %s", store.name, result.error)
        return
    for start in range(0, len(stale), BATCH):
        gone = [i for i in cache.get(store.name, stale[start:start + BATCH]) if i is not None]
        cache.apply(store.name, [], gone, None)
        applied += len(gone)
        result.removed += len(gone)
        progress(result.read, applied)
    if mark is not None:
        cache.set_state(store.name, high_water_mark=mark)
    else:
        # A store renamed onto another kind must not keep a mark its new kind cannot follow.
        cache.forget_mark(store.name)
    cache.mark_synced(store.name, epoch)
    result.outcome = "ok"
    log.info(
        "store %s: full sync done in %.1f s: read %d, added %d, changed %d, removed %d",
        store.name, time.time() - result.started, result.read, result.added, result.changed, result.removed,
    )
