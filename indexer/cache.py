"""The cache in Redis, through a blocking client (key names: indexer.rediskeys): what the indexer, the
command line and `mxisd run`'s supervisor read and write there. The server's asynchronous access is
in server/ (services/lookups.py, services/admin.py, bindings.py, rate_limits.py, recursion.py)."""

from __future__ import annotations

import json
import secrets
import string
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any, cast

import redis
from redis.typing import EncodableT, FieldT

from indexer import buckets
from indexer.claims import BatchWriter
from indexer.config import ConfigError
from indexer.identity import Identity
from indexer.redis_clients import RedisTarget, cache_spread, connect, run_plan
from indexer.rediskeys import BINDINGS, LOCAL_BINDINGS, STREAM_MAXLEN, RedisKeys, lookup_fields, plain_key
from indexer.settings import RedisConfig
from indexer.status import HostBounds, status_plan, stream_id

PEPPER_LENGTH = 20
# A queued job nobody picks up, or a running one whose indexer stopped refreshing it, expires and
# frees the store for a new request; a finished job stays readable for a day.
JOB_QUEUED_TTL = 3600
JOB_RUNNING_TTL = 60
JOB_DONE_TTL = 86400

# Atomically: claim a queued job for this indexer (nothing when it was failed for waiting too long).
_CLAIM = """
if redis.call('HGET', KEYS[1], 'state') ~= 'queued' then return nil end
redis.call('HSET', KEYS[1], 'state', 'running', 'started', ARGV[1], 'host', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return redis.call('HGETALL', KEYS[1])
"""

# Create the epoch (ARGV[1]) of a new cache with its number of buckets (ARGV[2]); a cache written by a
# version without buckets had one. The number of buckets the cache holds.
_INITIALIZE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX') then
  redis.call('SET', KEYS[2], ARGV[2])
else
  redis.call('SET', KEYS[2], '1', 'NX')
end
return redis.call('GET', KEYS[2])
"""

# Raise a counter (a string key, or a hash field when ARGV[2] is given) to ARGV[1] unless it is higher.
RAISE_SCRIPT = """
local current
if ARGV[2] then current = redis.call('HGET', KEYS[1], ARGV[2]) else current = redis.call('GET', KEYS[1]) end
if tonumber(current or '0') < tonumber(ARGV[1]) then
  if ARGV[2] then redis.call('HSET', KEYS[1], ARGV[2], ARGV[1]) else redis.call('SET', KEYS[1], ARGV[1]) end
end
"""


@dataclass(frozen=True)
class StreamEntry:
    """One entry of the change stream."""

    id: str
    store: str
    store_id: str
    op: str  # "upsert" or "delete"


@dataclass(frozen=True)
class CacheAddress:
    """What another process needs to open the same cache: the Redis target, its timeout (seconds),
    the key prefix and the number of buckets of the store hashes."""

    target: RedisTarget
    timeout: float
    prefix: str
    spread: int = 1

    @classmethod
    def configured(cls, config: RedisConfig, target: RedisTarget) -> CacheAddress:
        """The address of the cache that config's redis section describes, at target."""
        return cls(target, config.timeout, config.prefix, cache_spread(config))

    def open(self) -> Cache:
        """A Cache on a new blocking client (for a process's own use)."""
        return Cache(connect(self.target, self.timeout, blocking=True), self.prefix, self.spread, address=self)


class Cache:
    """Blocking access for the indexer: sync writes, state, locks, the change stream."""

    def __init__(self, client: redis.Redis, prefix: str, spread: int = 1, address: CacheAddress | None = None) -> None:
        """spread: the number of buckets of the store hashes (redis.cluster.buckets, or 1); address:
        where client connects (a full sync of a large store then writes from a process of its own,
        see indexer.sync_writer), or None."""
        self.r = client
        self.k = RedisKeys(prefix, spread)
        self.address = address
        self._writer = BatchWriter(client, self.k)

    def initialize(self, pepper: str | None = None) -> str | None:
        """Create the epoch, with this cache's number of buckets, and the lookup pepper (random
        unless given) if this cache has none yet; return the epoch. Raises ConfigError when the
        cache was written with another number of buckets: its lookups would read the wrong keys."""
        held = int(self.r.eval(_INITIALIZE, 2, self.k.epoch, self.k.bucket_count, secrets.token_hex(8),
                               self.k.buckets))
        if held != self.k.buckets:
            raise ConfigError(
                f"the cache in Redis (prefix {self.k.prefix!r}) was written with {held} bucket(s) per store "
                f"hash, this config gives {self.k.buckets} (redis.cluster.buckets, 1 without a cluster): set it "
                f"back, or empty the cache (delete the keys of prefix {self.k.prefix!r}) to have it rebuilt "
                "from the stores and the database with the new number")
        alphabet = string.ascii_letters + string.digits
        if pepper is None:
            pepper = "".join(secrets.choice(alphabet) for _ in range(PEPPER_LENGTH))
        self.r.set(self.k.pepper, pepper, nx=True)
        return self.epoch()

    def epoch(self) -> str | None:
        return cast("str | None", self.r.get(self.k.epoch))

    def pepper(self) -> str:
        value = self.r.get(self.k.pepper)
        if not value:
            # A Redis failure like any other: the sync fails, and the indexer syncs again in full
            # once it has given the emptied cache a new epoch and pepper.
            raise redis.exceptions.ResponseError("the cache has no lookup pepper: it was emptied while running")
        return cast(str, value)

    # -- records -------------------------------------------------------------------------------

    def count(self, store: str) -> int:
        pipe = self.r.pipeline(transaction=False)
        for key in buckets.every(self.k, self.k.records, store):
            pipe.hlen(key)
        return sum(pipe.execute())

    def content_hashes(self, store: str, store_ids: list[str] | None = None) -> dict[str, str]:
        """The content hash of every record of the store, or of those of store_ids it holds."""
        if store_ids is not None:
            held = buckets.hmget(self.r, self.k, self.k.content_hashes, store, store_ids)
            return {i: h for i, h in zip(store_ids, held) if h is not None}
        pipe = self.r.pipeline(transaction=False)
        for key in buckets.every(self.k, self.k.content_hashes, store):
            pipe.hgetall(key)
        known: dict[str, str] = {}
        for part in pipe.execute():
            known.update(part)
        return known

    def get(self, store: str, store_ids: list[str]) -> list[Identity | None]:
        return [Identity.from_json(r) if r else None
                for r in buckets.hmget(self.r, self.k, self.k.records, store, store_ids)]

    def iter_identities(self, store: str, batch: int = 1000) -> Iterator[Identity]:
        for key in buckets.every(self.k, self.k.records, store):
            for _, raw in self.r.hscan_iter(key, count=batch):
                yield Identity.from_json(raw)

    def mxid_of(self, store: str, medium: str, address: str) -> str | None:
        field = plain_key(address, medium)
        return cast("str | None", self.r.hget(self.k.threepids(store, self.k.bucket(store, field)), field))

    def identity_by_mxid(self, store: str, mxid: str) -> Identity | None:
        """The store's identity for mxid with its locator (for a password check), or None."""
        store_id = cast("str | None", self.r.hget(self.k.mxids(store, self.k.bucket(store, mxid)), mxid))
        if store_id is None:
            return None
        bucket = self.k.bucket(store, store_id)
        pipe = self.r.pipeline(transaction=False)
        pipe.hget(self.k.records(store, bucket), store_id)
        pipe.hget(self.k.locators(store, bucket), store_id)
        raw, locator = pipe.execute()
        return replace(Identity.from_json(raw), locator=locator) if raw else None

    # -- writes by the sync (one writer per store, holding the store's lock) --------------------

    def mark_unchanged(self, store: str, identities: list[Identity], generation: int) -> None:
        """Mark these records as seen by the full sync of generation and record where the store
        finds them (an entry can move without its content changing), in one round trip."""
        self._write_spread(store, [
            (self.k.generations, {i.store_id: generation for i in identities}, True),
            (self.k.locators, {i.store_id: i.locator for i in identities if i.locator is not None}, False)])

    def set_locators(self, store: str, identities: Iterable[Identity]) -> None:
        """Record where the store finds these people (unchanged records too: an entry can move
        without its content changing)."""
        locators = {i.store_id: i.locator for i in identities if i.locator is not None}
        self._write_spread(store, [(self.k.locators, locators, False)])

    def _write_spread(self, store: str, writes: list[tuple[buckets.KeyOf, dict[str, Any], bool]]) -> None:
        """HSET (or ZADD, when its flag is set) the fields of each bucketed hash, one command per
        bucket, all in one pipeline."""
        pipe = self.r.pipeline(transaction=False)
        queued = False
        for key_of, mapping, zset in writes:
            for bucket, part in buckets.split(self.k, store, mapping).items():
                if zset:
                    pipe.zadd(key_of(store, bucket), cast("dict[str, float]", part))
                else:
                    pipe.hset(key_of(store, bucket), mapping=part)
                queued = True
        if queued:
            pipe.execute()

    def stale_ids(self, store: str, generation: int) -> list[str]:
        pipe = self.r.pipeline(transaction=False)
        for key in buckets.every(self.k, self.k.generations, store):
            pipe.zrangebyscore(key, "-inf", f"({generation}")
        return [i for part in pipe.execute() for i in part]

    def apply(
        self,
        store: str,
        upserts: list[tuple[Identity, Identity | None]],
        deletes: list[Identity],
        generation: int | None,
    ) -> None:
        """Write new and changed identities (with the records they replace, and where the store
        finds them) and remove deleted ones, all in one transaction (indexer.claims says who then
        answers for each address)."""
        if upserts or deletes:
            self._writer.apply(store, upserts, deletes, generation, self.pepper())

    # -- sync state and locks -----------------------------------------------------------------

    def next_generation(self, store: str) -> int:
        return int(self.r.hincrby(self.k.state(store), "generation", 1))

    def generation(self, store: str) -> int:
        return int(self.r.hget(self.k.state(store), "generation") or 0)

    def state(self, store: str) -> dict[str, Any]:
        """last_full, last_incremental (dicts), high_water_mark (as the store gave it), generation."""
        raw = self.r.hgetall(self.k.state(store))
        return {cast(str, k): json.loads(v) for k, v in raw.items()}

    def set_state(self, store: str, **fields: Any) -> None:
        self.r.hset(self.k.state(store), mapping={k: json.dumps(v) for k, v in fields.items()})

    def forget_mark(self, store: str) -> None:
        """Drop the store's high-water mark (its kind can no longer list changes)."""
        self.r.hdel(self.k.state(store), "high_water_mark")

    def lock(self, store: str, timeout: float) -> redis.lock.Lock:
        """The lock that lets only one indexer sync a store at a time (extend it while working)."""
        lock: redis.lock.Lock = self.r.lock(self.k.lock(store), timeout=timeout, thread_local=False)
        return lock

    # -- the change stream -------------------------------------------------------------------

    def last_change_id(self) -> str:
        info = self.r.xinfo_stream(self.k.changes) if self.r.exists(self.k.changes) else None
        return info["last-generated-id"] if info else "0-0"

    def first_change_id(self) -> str | None:
        first = self.r.xrange(self.k.changes, count=1)
        return cast(str, first[0][0]) if first else None

    def changes_lost_after(self, last_id: str) -> bool:
        """Whether stream entries after last_id may have been trimmed away (only past STREAM_MAXLEN)."""
        if self.r.xlen(self.k.changes) < STREAM_MAXLEN:
            return False
        first = self.first_change_id()
        return first is not None and stream_id(first) > stream_id(last_id)

    def read_changes(self, after: str, count: int, block_ms: int | None) -> list[StreamEntry]:
        reply: list[tuple[str, list[tuple[str, dict[str, str]]]]] | None = cast(
            Any, self.r.xread({self.k.changes: after}, count=count, block=block_ms))
        if not reply:
            return []
        return [StreamEntry(i, f["store"], f["id"], f["op"]) for i, f in reply[0][1]]

    def set_follower_status(self, host: str, **fields: Any) -> None:
        """Record host's follower position (fields such as last_id), and that host was heard from now."""
        tx = self.r.pipeline(transaction=True)
        tx.hset(self.k.follower(host), mapping={k: str(v) for k, v in fields.items()})
        tx.zadd(self.k.hosts, {host: time.time()})
        tx.execute()

    def status(self, stores: list[str], bounds: HostBounds) -> dict[str, Any]:
        """Each store's size, sync state and active job; each host's indexer and follower, stale ones
        marked and forgotten ones removed (see Admin.status)."""
        return cast("dict[str, Any]", run_plan(self.r, status_plan(self.k, stores, time.time(), bounds)))

    def rebuild_requests(self) -> int:
        """How many fulltext rebuilds were ever requested (a follower rebuilds when this moves)."""
        return int(self.r.get(self.k.rebuild) or 0)

    # -- sync jobs (admin-triggered syncs run by an indexer) -----------------------------------

    def next_job(self, timeout: int, host: str) -> dict[str, str] | None:
        """Wait up to timeout seconds for a queued job and claim it for host's indexer: its fields,
        now "running"."""
        reply = self.r.brpop([self.k.jobs], timeout=timeout)
        if not reply:
            return None
        # Expired while queued, or failed for waiting too long: nothing to run.
        fields = self.r.eval(_CLAIM, 1, self.k.job(cast(str, reply[1])), time.time(), JOB_RUNNING_TTL, host)
        return dict(zip(fields[::2], fields[1::2])) if fields else None

    # -- the indexer's heartbeat ---------------------------------------------------------------

    def beat(self, host: str, ttl: int, **fields: Any) -> None:
        """Say that host's indexer is alive (with fields such as its pid) for the next ttl seconds."""
        tx = self.r.pipeline(transaction=True)
        now = time.time()
        tx.set(self.k.indexer(host), json.dumps(dict(fields, beat=now)), ex=ttl)
        tx.zadd(self.k.hosts, {host: now})
        tx.execute()

    def indexer_exited(self, host: str, **fields: Any) -> None:
        """Record how host's indexer ended, and forget its heartbeat: it is down from now on."""
        tx = self.r.pipeline(transaction=True)
        tx.delete(self.k.indexer(host))
        now = time.time()
        tx.set(self.k.indexer_exit(host), json.dumps(dict(fields, at=now)))
        tx.zadd(self.k.hosts, {host: now})
        tx.execute()

    def fail_running_jobs(self, host: str, stores: list[str], error: str) -> list[str]:
        """Fail the jobs that host's indexer was running (it died); their ids."""
        failed = []
        for store in stores:
            job_id = cast("str | None", self.r.get(self.k.store_job(store)))
            if job_id is None:
                continue
            job = self.r.hmget(self.k.job(job_id), ["state", "host"])
            if job == ["running", host]:
                self.finish_job(store, job_id, None, error)
                failed.append(job_id)
        return failed

    def update_job(self, job_id: str, **fields: Any) -> None:
        """Record progress of a running job and keep it alive."""
        tx = self.r.pipeline(transaction=True)
        if fields:
            tx.hset(self.k.job(job_id), mapping={k: str(v) for k, v in fields.items()})
        tx.expire(self.k.job(job_id), JOB_RUNNING_TTL)
        tx.execute()

    def finish_job(self, store: str, job_id: str, result: dict[str, Any] | None, error: str | None) -> None:
        """Mark a job done with the sync's result, and free the store for the next request."""
        fields: dict[str, Any] = {"state": "done", "ended": time.time()}
        if result is not None:
            fields.update(outcome=result["outcome"], result=json.dumps(result))
            error = error or result.get("error")
        else:
            fields["outcome"] = "failed"
        if error:
            fields["error"] = error
        tx = self.r.pipeline(transaction=True)
        tx.hset(self.k.job(job_id), mapping={k: str(v) for k, v in fields.items()})
        tx.expire(self.k.job(job_id), JOB_DONE_TTL)
        tx.execute()
        # Only clear the pointer if it is still ours (a newer job may have replaced an expired one).
        pointer = self.k.store_job(store)
        with self.r.pipeline(transaction=True) as watch:
            try:
                watch.watch(pointer)
                if watch.get(pointer) == job_id:
                    watch.multi()
                    watch.delete(pointer)
                    watch.execute()
            except redis.exceptions.WatchError:
                pass

    # -- the mirror of /3pid/bind bindings ----------------------------------------------------

    def bindings_mirrored(self, generation: int) -> bool:
        """Whether the binding mirror was built for this cache's epoch (it is lost with the cache) and
        holds the SQL bindings generation given (an older copy of Redis holds an older one)."""
        epoch, held = self.r.hmget(self.k.state(BINDINGS), ["epoch", "generation"])
        return epoch is not None and epoch == self.epoch() and int(held or 0) >= generation

    def rebuild_bindings(self, bindings: Iterable[tuple[str, str, str, bool]], generation: int) -> int:
        """Replace the mirror with these (medium, address, mxid, local) bindings, read at the SQL
        bindings generation given (or later); how many lookup keys were written."""
        pepper, epoch = self.pepper(), self.epoch()
        plain: dict[bool, dict[FieldT, EncodableT]] = {False: {}, True: {}}
        hashed: dict[bool, dict[FieldT, EncodableT]] = {False: {}, True: {}}
        for medium, address, mxid, local in bindings:
            fields, hashes = lookup_fields(medium, address, pepper)
            plain[local].update((f, mxid) for f in fields)
            hashed[local].update((h, mxid) for h in hashes)
        tx = self.r.pipeline(transaction=True)
        for local, family in ((False, BINDINGS), (True, LOCAL_BINDINGS)):
            # The binding mirrors are not bucketed: one key each, beside their state.
            tx.delete(self.k.threepids(family, 0), self.k.hashes(family, 0))
            if plain[local]:
                tx.hset(self.k.threepids(family, 0), mapping=plain[local])
                tx.hset(self.k.hashes(family, 0), mapping=hashed[local])
        tx.hset(self.k.state(BINDINGS), mapping={"epoch": epoch or "", "generation": generation})
        tx.execute()
        return len(plain[False]) + len(plain[True])

    # -- knowing whether this Redis holds everything it should ---------------------------------

    def generation_counter(self) -> int:
        """The cache generation: how many syncs completed into this Redis."""
        return int(self.r.get(self.k.generation) or 0)

    def advance_generation(self) -> None:
        self.r.incr(self.k.generation)

    def raise_generation(self, value: int) -> None:
        self.r.eval(RAISE_SCRIPT, 1, self.k.generation, value)

    def mark_synced(self, store: str, epoch: str | None) -> None:
        """Record that a full sync begun in this epoch completed."""
        self.set_state(store, synced_epoch=epoch)

    def incomplete_stores(self, stores: list[str]) -> list[str]:
        """The stores that no full sync completed into since this cache was emptied (or since it was
        found behind)."""
        pipe = self.r.pipeline(transaction=False)
        pipe.get(self.k.epoch)
        for store in stores:
            pipe.hget(self.k.state(store), "synced_epoch")
        epoch, *marks = pipe.execute()
        return [s for s, m in zip(stores, marks) if epoch is None or m is None or json.loads(m) != epoch]

    def forget_full_syncs(self, stores: list[str]) -> None:
        """Let every store count as not wholly in the cache, so that the indexer syncs each in full,
        and have every fulltext index rebuilt from what the cache holds now."""
        pipe = self.r.pipeline(transaction=False)
        for store in stores:
            pipe.hdel(self.k.state(store), "synced_epoch")
        pipe.incr(self.k.rebuild)
        pipe.execute()
