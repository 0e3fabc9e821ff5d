"""The Redis key layout, shared by the indexer and the server: the one module that spells key names.

Every key starts with the configured prefix P. The cache's own keys (all but those of single
requests: rate:, fail:, remote: and s:S:rt:) then carry a hash tag. The keys of single requests are
untagged, so that a Cluster spreads them over its nodes.

A store's large hashes (rec, chash, gen, 3pid, sha256, mxid, claims, locator: one field per
identity or address) are each cut into B buckets (redis.cluster.buckets on a Redis Cluster, else 1):
a field lives in bucket crc32(field) mod B, whose key carries the tag "{cache:<bucket>.<n>}"
(P{cache:7.12}s:S:3pid), so that a Cluster spreads them, and their memory, over its masters. n is
the first number that puts the tag's slot in the middle of the bucket's own B-th of the 16,384
slots (bucket_tags): the buckets lie evenly over the slots, so masters that serve equal ranges of
slots (as `redis-cli --cluster create` makes them) hold equal numbers of buckets when B is a
multiple of their number (B = 24: 2, 3, 4, 6, 8 or 12 masters). With B = 1
(one Redis, or Sentinel) there is one bucket and its key is tagged "{cache}" (P{cache}s:S:3pid): the
key names and the number of keys of a single node stay those of versions without buckets. B is
recorded in the cache (buckets); a cache written with another B is refused (Cache.initialize).
Everything else carries "{cache}" (P{cache}epoch, P{cache}changes): scripts and transactions of
jobs, heartbeats, follower status and the binding mirror span several keys, so in a Redis Cluster
they share one slot (the binding mirror, written one bind at a time, is not bucketed).

Per store S (the cache's keys are written below without P{cache} or P{cache:<bucket>}; bucketed:
rec, chash, gen, 3pid, sha256, mxid, claims and locator of configured stores):
  s:S:rec     hash  store_id -> identity JSON
  s:S:chash   hash  store_id -> content hash (unchanged records are not rewritten)
  s:S:gen     zset  store_id scored by the generation of the last full sync that saw it (mark-and-sweep)
  s:S:3pid    hash  "<address> <medium>" -> mxid (the v2 "none" form, also used by v1 lookups)
  s:S:sha256  hash  base64url(sha256("<address> <medium> <pepper>")) -> mxid
  s:S:mxid    hash  mxid -> store_id
  s:S:claims  hash  "<medium> <canonical address>" or mxid held by several records -> JSON list of
                    their store_ids, the one answering last (one holder needs no list: s:S:mxid
                    names it, or s:S:3pid its mxid); ownership is by record, not by mxid
  s:S:locator hash  store_id -> where the store finds the person for a password check (an LDAP DN)
  s:S:state   hash  generation, last_full, last_incremental, last_success, high_water_mark,
                    next_full, next_incremental, claims (s:S:claims was built), synced_epoch
                    (the cache epoch the last complete full sync wrote into: the store is wholly
                    in this cache only when it is the current epoch) (each JSON)
  s:S:lock    the sync lock (redis-py Lock)
  s:S:job     the id of the store's queued or running admin-triggered sync job
  s:S:rt:<address> <medium>  (untagged: P s:S:rt:...) string, with a TTL: a read-through store's answer, mxid or ""
              (not found)
Bindings made with /3pid/bind (SQL is their truth) are mirrored as the pseudo-store "_bindings",
which no configured store can be named (store names start with [a-z0-9]): s:_bindings:3pid and
s:_bindings:sha256 as above, and s:_bindings:state {epoch, generation}: the cache epoch they were
rebuilt for and the SQL bindings generation they hold (SQL counts every bind and unbind).
Bindings of local addresses (a store knew the address when it was bound) are mirrored apart, as the
pseudo-store "_localbinds" (s:_localbinds:3pid and s:_localbinds:sha256; its state is _bindings'),
so that lookups from other servers can leave them out (lookup.share_binds: false) at no extra cost.
Global: epoch (changes when the cache is emptied), pepper, buckets (B, the number of buckets the
store hashes were cut into; written with the epoch), changes (stream of upsert/delete events),
generation (counts completed syncs; SQL keeps the highest any server saw, so a Redis restored from an
older copy shows a lower one),
<host> is a host id (server.host_id): fulltext:<host> (hash: the follower's position, for status),
fulltext-rebuild (a counter: followers rebuild their index when it moves),
jobs (list: ids of sync jobs waiting for an indexer), job:<id> (hash: one sync job, expiring),
indexer:<host> (the indexer's heartbeat: JSON, expiring unless renewed), indexer-exit:<host> (JSON: how
the host's indexer last ended, written by `mxisd run`'s supervisor), hosts-seen (zset: host id scored by
when its indexer or follower last reported; status forgets a host, with its fulltext: and indexer-exit:
keys, once that is longer ago than health.forget_host_after),
untagged (P rate:...): rate:<kind>:<key> (rate-limit windows), remote:<address> <medium> (another
identity server's answer to a recursive lookup, mxid or "" for not found, with a TTL),
fail:<kind>:<who> (failed logins counted in a window, with a TTL; kind is "user" or "ip"),
invited (zset: "<medium> <canonical address>" of every 3PID with a stored invite not settled yet,
and maybe of some settled since (SQL is the truth; a login asks it only for these), each scored by
the time in ms until which no pruning removes it whatever SQL says).
"""

from __future__ import annotations

import hashlib
import zlib
from functools import lru_cache

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from indexer.normalize import lookup_forms, lookup_hash

# The change stream is trimmed to about this many entries.
STREAM_MAXLEN = 1_000_000

# The pseudo-store that mirrors /3pid/bind bindings; a configured store's name starts with [a-z0-9].
BINDINGS = "_bindings"
# The pseudo-store that mirrors bindings of local addresses (known to a store when they were bound).
LOCAL_BINDINGS = "_localbinds"


def _short(name: str) -> str:
    """A client-chosen name as part of a key: a long one (a megabyte of login ID) by its digest."""
    return name if len(name) <= 256 else "sha256:" + hashlib.sha256(name.encode("utf-8", "replace")).hexdigest()


def plain_key(address: str, medium: str) -> str:
    """The field of s:S:3pid (and the end of an s:S:rt: key) for a 3PID: "<address> <medium>"."""
    return f"{address} {medium}"


def claim_key(medium: str, address: str) -> str:
    """The field of s:S:claims for a 3PID: "<medium> <canonical address>" (a Matrix ID's field is
    the mxid itself, which no medium name starts like)."""
    return f"{medium} {address}"


def lookup_fields(medium: str, address: str, pepper: str) -> tuple[list[str], list[str]]:
    """The fields of s:S:3pid and of s:S:sha256 that answer for a 3PID: one per lookup form of it."""
    forms = lookup_forms(medium, address)
    return [plain_key(f, medium) for f in forms], [lookup_hash(f, medium, pepper) for f in forms]


# The hash tag of the cache's own keys (see the module's docstring): in a Redis Cluster, every key
# holding it lives in one slot.
CACHE_TAG = "{cache}"


@lru_cache(maxsize=4)
def bucket_tags(buckets: int) -> tuple[str, ...]:
    """The hash tag of each of B buckets: "cache:<bucket>.<n>", n the first number that puts its slot
    in the middle half of the bucket's B-th of the slots (see the module's docstring)."""
    width = REDIS_CLUSTER_HASH_SLOTS / buckets
    tags = []
    for bucket in range(buckets):
        low, high = (bucket + 0.25) * width, (bucket + 0.75) * width
        n = 0
        while not low <= key_slot(f"cache:{bucket}.{n}".encode()) < high:
            n += 1
        tags.append(f"cache:{bucket}.{n}")
    return tuple(tags)


class RedisKeys:
    """Key names under a prefix, with the store hashes cut into buckets (see the module's docstring)."""

    def __init__(self, prefix: str, buckets: int = 1) -> None:
        self.prefix = prefix
        self.buckets = buckets
        self._tags = bucket_tags(buckets) if buckets > 1 else ()
        cache = self.cache_prefix = f"{prefix}{CACHE_TAG}"
        self.epoch = f"{cache}epoch"
        self.bucket_count = f"{cache}buckets"
        self.pepper = f"{cache}pepper"
        self.changes = f"{cache}changes"
        self.rebuild = f"{cache}fulltext-rebuild"
        self.jobs = f"{cache}jobs"
        self.job_prefix = f"{cache}job:"
        self.generation = f"{cache}generation"
        self.hosts = f"{cache}hosts-seen"
        self.invited = f"{prefix}invited"

    def indexer(self, host: str) -> str:
        return f"{self.cache_prefix}indexer:{host}"

    def indexer_exit(self, host: str) -> str:
        return f"{self.cache_prefix}indexer-exit:{host}"

    def _store(self, store: str, part: str) -> str:
        return f"{self.cache_prefix}s:{store}:{part}"

    def spread(self, store: str) -> int:
        """How many buckets the store's hashes are cut into (the binding mirrors are not cut)."""
        return 1 if store.startswith("_") else self.buckets

    def bucket(self, store: str, field: str) -> int:
        """The bucket of a field of any of the store's bucketed hashes."""
        if store.startswith("_") or self.buckets == 1:
            return 0
        return self.field_bucket(field)

    def field_bucket(self, field: str) -> int:
        """The bucket of a field in the hashes of a configured store."""
        return zlib.crc32(field.encode("utf-8", "surrogatepass")) % self.buckets

    def _bucketed(self, store: str, part: str, bucket: int) -> str:
        if self.buckets == 1 or store.startswith("_"):
            return self._store(store, part)
        return f"{self.prefix}{{{self._tags[bucket]}}}s:{store}:{part}"

    # Each takes a bucket: bucket(store, field) for one field, or each of range(spread(store)).
    def records(self, store: str, bucket: int) -> str:
        return self._bucketed(store, "rec", bucket)

    def content_hashes(self, store: str, bucket: int) -> str:
        return self._bucketed(store, "chash", bucket)

    def generations(self, store: str, bucket: int) -> str:
        return self._bucketed(store, "gen", bucket)

    def threepids(self, store: str, bucket: int) -> str:
        return self._bucketed(store, "3pid", bucket)

    def hashes(self, store: str, bucket: int) -> str:
        return self._bucketed(store, "sha256", bucket)

    def mxids(self, store: str, bucket: int) -> str:
        return self._bucketed(store, "mxid", bucket)

    def claims(self, store: str, bucket: int) -> str:
        return self._bucketed(store, "claims", bucket)

    def locators(self, store: str, bucket: int) -> str:
        return self._bucketed(store, "locator", bucket)

    def state(self, store: str) -> str:
        return self._store(store, "state")

    def lock(self, store: str) -> str:
        return self._store(store, "lock")

    def store_job(self, store: str) -> str:
        return self._store(store, "job")

    def read_through(self, store: str, medium: str, address: str) -> str:
        # Untagged, like the other keys of one request: a Cluster spreads them over its nodes.
        return f"{self.prefix}s:{store}:rt:{plain_key(address, medium)}"

    def follower(self, host: str) -> str:
        return f"{self.cache_prefix}fulltext:{host}"

    def job(self, job_id: str) -> str:
        return f"{self.job_prefix}{job_id}"

    def rate(self, kind: str, key: str) -> str:
        return f"{self.prefix}rate:{kind}:{_short(key)}"

    def failures(self, kind: str, who: str) -> str:
        return f"{self.prefix}fail:{kind}:{_short(who)}"

    def remote(self, medium: str, address: str) -> str:
        return f"{self.prefix}remote:{plain_key(address, medium)}"
