"""Admin-triggered syncs: the indexer takes jobs queued in Redis by the admin API and runs them,
recording progress and outcome in the job for the API to report."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import redis

from indexer import logs
from indexer.cache import JOB_RUNNING_TTL, Cache
from indexer.settings import Config
from indexer.stores import Store, StoreError, build_store
from indexer.sync import SyncBusy, SyncResult, sync_store

log = logging.getLogger(__name__)

# How long a job waits for a scheduled sync of the same store to end before giving up.
LOCK_WAIT = 600.0

Observer = Callable[[SyncResult], None]


class JobRunner:
    """Takes queued jobs one at a time and runs each in a thread of its own, so that a long sync of
    one store does not hold up another's."""

    def __init__(self, config: Config, cache: Cache, observe: Observer) -> None:
        self.config = config
        self.cache = cache
        self.observe = observe
        self.stores = {s.name: s for s in config.stores}

    def run(self, stop: threading.Event) -> None:
        """Wait for jobs until stop is set; Redis outages are waited out."""
        while not stop.is_set():
            try:
                job = self.cache.next_job(timeout=1, host=self.config.server.host_id)
            except redis.exceptions.RedisError as exc:
                logs.repeated.warning(log, "sync jobs: Redis unavailable (%s); retrying", exc, key="jobs redis")
                stop.wait(2)
                continue
            except Exception as exc:  # this thread must go on, or queued jobs wait for nobody
                logs.repeated.error(log, "sync jobs: unexpected error (%s: %s); retrying in 5 s", type(exc).__name__,
                                    exc, key=f"jobs {type(exc).__name__}", exc_info=True)
                stop.wait(5)
                continue
            if job is not None:
                threading.Thread(target=self.execute, args=(job, stop), name=f"job-{job['id']}", daemon=True).start()

    def execute(self, job: dict[str, str], stop: threading.Event) -> None:
        """Run one job to its end, keeping it alive in Redis meanwhile."""
        job_id, name = job["id"], job["store"]
        token = logs.request_id.set(job.get("request_id") or None)
        alive = threading.Event()
        keeper = threading.Thread(target=self._keep_alive, args=(job_id, alive), daemon=True)
        keeper.start()
        result: SyncResult | None = None
        error = None
        try:
            settings = self.stores.get(name)
            if settings is None:
                error = f"this indexer has no store named {name!r}"
                return
            store = build_store(settings, self.config)
            full = job.get("full") == "1"
            try:
                # Without a high-water mark the sync is a full one whatever was asked.
                if full or self.cache.state(name).get("high_water_mark") is None:
                    self._record_total(job_id, store)
                log.info("job %s: %s sync of store %s started", job_id, "full" if full else "incremental", name)
                result = sync_store(self.cache, store, settings.sync, full,
                                    lambda read, applied: self.cache.update_job(job_id, read=read, applied=applied),
                                    wait_for_lock=LOCK_WAIT)
                self.observe(result)
            finally:
                store.close()
        except SyncBusy as exc:
            error = f"{exc}; gave up after waiting {LOCK_WAIT:.0f} s"
        except redis.exceptions.RedisError as exc:
            error = f"redis: {exc}"
        except Exception as exc:  # a job must always end, or its store stays busy until it expires
            log.exception("job %s: store %s: sync crashed", job_id, name)
            error = f"internal error: {exc}"
        finally:
            alive.set()
            keeper.join()
            try:
                self.cache.finish_job(name, job_id, result.as_dict() if result else None, error)
            except redis.exceptions.RedisError as exc:
                log.error("job %s: could not record its end: %s", job_id, exc)
            log.info("job %s: store %s: %s", job_id, name, result.outcome if result else f"failed: {error}")
            logs.request_id.reset(token)

    def _record_total(self, job_id: str, store: Store) -> None:
        try:
            total = store.size()
        except StoreError:
            return  # the sync itself meets the error, and records it as its outcome
        if total is not None:
            self.cache.update_job(job_id, total=total)

    def _keep_alive(self, job_id: str, done: threading.Event) -> None:
        while not done.wait(JOB_RUNNING_TTL / 3):
            try:
                self.cache.update_job(job_id)
            except redis.exceptions.RedisError as exc:
                log.warning("job %s: could not refresh it: %s", job_id, exc)
