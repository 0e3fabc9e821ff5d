"""The Redis layout of the cache: the one module that knows key names.

Per store S (all keys under the configured prefix):
  s:S:rec     hash  store_id -> identity JSON
  s:S:chash   hash  store_id -> content hash (unchanged records are not rewritten)
  s:S:gen     zset  store_id scored by the generation of the last full sync that saw it (mark-and-sweep)
  s:S:3pid    hash  "<address> <medium>" -> mxid (the v2 "none" form, also used by v1 lookups)
  s:S:sha256  hash  base64url(sha256("<address> <medium> <pepper>")) -> mxid
  s:S:mxid    hash  mxid -> store_id
  s:S:locator hash  store_id -> where the store finds the person for a password check (an LDAP DN)
  s:S:state   hash  generation, last_full, last_incremental, high_water_mark (each JSON)
  s:S:lock    the sync lock (redis-py Lock)
  s:S:rt:<address> <medium>  string, with a TTL: a read-through store's answer, mxid or "" (not found)
Global: epoch (changes when the cache is emptied), pepper, changes (stream of upsert/delete events),
fulltext:<host> (follower position, for status), fail:<kind>:<who> (failed logins counted in a
window, with a TTL; kind is "user" or "ip").
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass, replace
from typing import Any, Iterable, Iterator

import redis
import redis.asyncio

from indexer.identity import Identity
from indexer.normalize import lookup_forms, lookup_hash

STREAM_MAXLEN = 1_000_000
PEPPER_LENGTH = 20


def connect(url: str) -> redis.Redis:
    """A blocking client for the indexer and the command line."""
    return redis.Redis.from_url(url, decode_responses=True, health_check_interval=30)


def connect_async(url: str) -> redis.asyncio.Redis:
    """An asyncio client for the HTTP server."""
    return redis.asyncio.Redis.from_url(url, decode_responses=True, health_check_interval=30)


@dataclass(frozen=True)
class Change:
    """One entry of the change stream."""

    id: str
    store: str
    store_id: str
    op: str  # "upsert" or "delete"


class Keys:
    """Key names under a prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.epoch = f"{prefix}epoch"
        self.pepper = f"{prefix}pepper"
        self.changes = f"{prefix}changes"

    def store(self, store: str, part: str) -> str:
        return f"{self.prefix}s:{store}:{part}"

    def follower(self, host: str) -> str:
        return f"{self.prefix}fulltext:{host}"

    def failures(self, kind: str, who: str) -> str:
        return f"{self.prefix}fail:{kind}:{who}"


def _stream_id(value: str) -> tuple[int, int]:
    ms, _, seq = value.partition("-")
    return int(ms), int(seq or 0)


def _plain_key(address: str, medium: str) -> str:
    return f"{address} {medium}"


class Cache:
    """Blocking access for the indexer: sync writes, state, locks, the change stream."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.r = client
        self.k = Keys(prefix)

    def initialize(self, pepper: str | None = None) -> str:
        """Create the epoch and the lookup pepper (random unless given) if this cache has none yet;
        return the epoch."""
        self.r.set(self.k.epoch, secrets.token_hex(8), nx=True)
        alphabet = string.ascii_letters + string.digits
        if pepper is None:
            pepper = "".join(secrets.choice(alphabet) for _ in range(PEPPER_LENGTH))
        self.r.set(self.k.pepper, pepper, nx=True)
        return self.epoch()

    def epoch(self) -> str | None:
        return self.r.get(self.k.epoch)

    def pepper(self) -> str:
        value = self.r.get(self.k.pepper)
        if not value:
            raise RuntimeError("the cache has no lookup pepper: it was emptied while running")
        return value

    # -- records -------------------------------------------------------------------------------

    def count(self, store: str) -> int:
        return self.r.hlen(self.k.store(store, "rec"))

    def content_hashes(self, store: str) -> dict[str, str]:
        return self.r.hgetall(self.k.store(store, "chash"))

    def get(self, store: str, store_ids: list[str]) -> list[Identity | None]:
        if not store_ids:
            return []
        raw = self.r.hmget(self.k.store(store, "rec"), store_ids)
        return [Identity.from_json(r) if r else None for r in raw]

    def iter_identities(self, store: str, batch: int = 1000) -> Iterator[Identity]:
        for _, raw in self.r.hscan_iter(self.k.store(store, "rec"), count=batch):
            yield Identity.from_json(raw)

    def mxid_of(self, store: str, medium: str, address: str) -> str | None:
        return self.r.hget(self.k.store(store, "3pid"), _plain_key(address, medium))

    def identity_by_mxid(self, store: str, mxid: str) -> Identity | None:
        """The store's identity for mxid with its locator (for a password check), or None."""
        store_id = self.r.hget(self.k.store(store, "mxid"), mxid)
        if store_id is None:
            return None
        pipe = self.r.pipeline(transaction=False)
        pipe.hget(self.k.store(store, "rec"), store_id)
        pipe.hget(self.k.store(store, "locator"), store_id)
        raw, locator = pipe.execute()
        return replace(Identity.from_json(raw), locator=locator) if raw else None

    # -- writes by the sync (one writer per store, holding the store's lock) --------------------

    def mark(self, store: str, store_ids: Iterable[str], generation: int) -> None:
        ids = list(store_ids)
        if ids:
            self.r.zadd(self.k.store(store, "gen"), {i: generation for i in ids})

    def set_locators(self, store: str, identities: Iterable[Identity]) -> None:
        """Record where the store finds these people (unchanged records too: an entry can move
        without its content changing)."""
        locators = {i.store_id: i.locator for i in identities if i.locator is not None}
        if locators:
            self.r.hset(self.k.store(store, "locator"), mapping=locators)

    def stale_ids(self, store: str, generation: int) -> list[str]:
        return self.r.zrangebyscore(self.k.store(store, "gen"), "-inf", f"({generation}")

    def apply(
        self,
        store: str,
        upserts: list[tuple[Identity, Identity | None]],
        deletes: list[Identity],
        generation: int | None,
    ) -> None:
        """Write new and changed identities (with the records they replace) and remove deleted ones,
        all in one transaction, so a lookup sees every identity either before or after."""
        if not upserts and not deletes:
            return
        pepper = self.pepper()
        k3, kh, km = self.k.store(store, "3pid"), self.k.store(store, "sha256"), self.k.store(store, "mxid")

        def keys_of(identity: Identity) -> tuple[set[str], set[str]]:
            plain, hashed = set(), set()
            for medium, address in identity.threepids:
                for form in lookup_forms(medium, address):
                    plain.add(_plain_key(form, medium))
                    hashed.add(lookup_hash(form, medium, pepper))
            return plain, hashed

        # What each changed identity stops claiming; removed only where it still points at it.
        dropped: list[tuple[str, str, str]] = []  # (redis key, field, mxid that must own it)
        claims: list[tuple[Identity, set[str], set[str]]] = []
        for new, old in upserts:
            plain, hashed = keys_of(new)
            claims.append((new, plain, hashed))
            if old is not None:
                old_plain, old_hashed = keys_of(old)
                dropped += [(k3, f, old.mxid) for f in old_plain - plain]
                dropped += [(kh, f, old.mxid) for f in old_hashed - hashed]
                if old.mxid != new.mxid:
                    dropped.append((km, old.mxid, old.store_id))
        for gone in deletes:
            plain, hashed = keys_of(gone)
            dropped += [(k3, f, gone.mxid) for f in plain] + [(kh, f, gone.mxid) for f in hashed]
            dropped.append((km, gone.mxid, gone.store_id))

        owners: list[Any] = []
        if dropped:
            check = self.r.pipeline(transaction=False)
            for key, field, _ in dropped:
                check.hget(key, field)
            owners = check.execute()

        tx = self.r.pipeline(transaction=True)
        for (key, field, owner), current in zip(dropped, owners):
            if current == owner:
                tx.hdel(key, field)
        # One command per key for the whole batch (later identities win a shared field, as they
        # would written one by one): a full sync of a large store is mostly these writes.
        if claims:
            plain_owners = {f: new.mxid for new, plain, _ in claims for f in plain}
            hashed_owners = {f: new.mxid for new, _, hashed in claims for f in hashed}
            tx.hset(self.k.store(store, "rec"), mapping={new.store_id: new.to_json() for new, _, _ in claims})
            tx.hset(self.k.store(store, "chash"), mapping={new.store_id: new.hash for new, _, _ in claims})
            if plain_owners:
                tx.hset(k3, mapping=plain_owners)
                tx.hset(kh, mapping=hashed_owners)
            tx.hset(km, mapping={new.mxid: new.store_id for new, _, _ in claims})
            if generation is not None:
                tx.zadd(self.k.store(store, "gen"), {new.store_id: generation for new, _, _ in claims})
        for new, _, _ in claims:
            tx.xadd(self.k.changes, {"store": store, "id": new.store_id, "op": "upsert"},
                    maxlen=STREAM_MAXLEN, approximate=True)
        for gone in deletes:
            tx.hdel(self.k.store(store, "rec"), gone.store_id)
            tx.hdel(self.k.store(store, "chash"), gone.store_id)
            tx.zrem(self.k.store(store, "gen"), gone.store_id)
            tx.hdel(self.k.store(store, "locator"), gone.store_id)
            tx.xadd(self.k.changes, {"store": store, "id": gone.store_id, "op": "delete"},
                    maxlen=STREAM_MAXLEN, approximate=True)
        tx.execute()

    # -- sync state and locks -----------------------------------------------------------------

    def next_generation(self, store: str) -> int:
        return int(self.r.hincrby(self.k.store(store, "state"), "generation", 1))

    def generation(self, store: str) -> int:
        return int(self.r.hget(self.k.store(store, "state"), "generation") or 0)

    def state(self, store: str) -> dict[str, Any]:
        """last_full, last_incremental (dicts), high_water_mark (as the store gave it), generation."""
        raw = self.r.hgetall(self.k.store(store, "state"))
        return {k: json.loads(v) for k, v in raw.items()}

    def set_state(self, store: str, **fields: Any) -> None:
        self.r.hset(self.k.store(store, "state"), mapping={k: json.dumps(v) for k, v in fields.items()})

    def lock(self, store: str, timeout: float) -> redis.lock.Lock:
        """The lock that lets only one indexer sync a store at a time (extend it while working)."""
        return self.r.lock(self.k.store(store, "lock"), timeout=timeout, thread_local=False)

    # -- the change stream -------------------------------------------------------------------

    def last_change_id(self) -> str:
        info = self.r.xinfo_stream(self.k.changes) if self.r.exists(self.k.changes) else None
        return info["last-generated-id"] if info else "0-0"

    def first_change_id(self) -> str | None:
        first = self.r.xrange(self.k.changes, count=1)
        return first[0][0] if first else None

    def changes_lost_after(self, last_id: str) -> bool:
        """Whether stream entries after last_id may have been trimmed away (only past STREAM_MAXLEN)."""
        if self.r.xlen(self.k.changes) < STREAM_MAXLEN:
            return False
        first = self.first_change_id()
        return first is not None and _stream_id(first) > _stream_id(last_id)

    def read_changes(self, after: str, count: int, block_ms: int | None) -> list[Change]:
        reply = self.r.xread({self.k.changes: after}, count=count, block=block_ms)
        if not reply:
            return []
        return [Change(i, f["store"], f["id"], f["op"]) for i, f in reply[0][1]]

    def set_follower_status(self, host: str, **fields: Any) -> None:
        self.r.hset(self.k.follower(host), mapping={k: str(v) for k, v in fields.items()})


class Lookups:
    """Non-blocking reads for the HTTP server: one Redis round trip per request."""

    def __init__(self, client: redis.asyncio.Redis, prefix: str, stores: list[str]) -> None:
        self.r = client
        self.k = Keys(prefix)
        self.stores = stores

    async def pepper(self) -> str | None:
        return await self.r.get(self.k.pepper)

    async def _first_match(self, part: str, fields: list[str], with_pepper: bool) -> tuple[str | None, list[str | None]]:
        pipe = self.r.pipeline(transaction=False)
        pipe.get(self.k.pepper)
        for store in self.stores:
            pipe.hmget(self.k.store(store, part), fields)
        replies = await pipe.execute()
        found: list[str | None] = [None] * len(fields)
        for per_store in replies[1:]:
            found = [f if f is not None else s for f, s in zip(found, per_store)]
        return (replies[0] if with_pepper else None), found

    async def by_address(self, pairs: list[tuple[str, str]]) -> list[str | None]:
        """mxids for canonical (medium, address) pairs, in order (None where unknown)."""
        if not pairs:
            return []
        _, found = await self._first_match("3pid", [_plain_key(a, m) for m, a in pairs], False)
        return found

    async def by_hash(self, hashes: list[str]) -> tuple[str | None, list[str | None]]:
        """(current pepper, mxids for sha256 lookup hashes in order)."""
        if not hashes:
            return await self.pepper(), []
        return await self._first_match("sha256", hashes, True)

    async def read_through_answers(self, store: str, pairs: list[tuple[str, str]]) -> list[str | None]:
        """Cached answers of a read-through store for (medium, address) pairs: an mxid, "" for a
        cached "not found", or None when the store has not been asked (or the answer expired)."""
        if not pairs:
            return []
        return await self.r.mget([self.k.store(store, f"rt:{_plain_key(a, m)}") for m, a in pairs])

    async def remember_answer(self, store: str, medium: str, address: str, mxid: str | None, ttl: int) -> None:
        """Cache a read-through store's answer (None: not found) for ttl seconds."""
        await self.r.set(self.k.store(store, f"rt:{_plain_key(address, medium)}"), mxid or "", ex=ttl)

    async def identities(self, mxids: list[str]) -> list[Identity | None]:
        """The identities (with their locators) of mxids, in order; the first store in config order
        that has an mxid wins. Two round trips whatever the number of mxids."""
        if not mxids:
            return []
        pipe = self.r.pipeline(transaction=False)
        for store in self.stores:
            pipe.hmget(self.k.store(store, "mxid"), mxids)
        owners: list[tuple[str, str] | None] = [None] * len(mxids)
        for store, store_ids in zip(self.stores, await pipe.execute()):
            owners = [o if o is not None or i is None else (store, i) for o, i in zip(owners, store_ids)]
        pipe = self.r.pipeline(transaction=False)
        for owner in owners:
            if owner is not None:
                pipe.hget(self.k.store(owner[0], "rec"), owner[1])
                pipe.hget(self.k.store(owner[0], "locator"), owner[1])
        replies = iter(await pipe.execute())
        found: list[Identity | None] = []
        for owner in owners:
            raw, locator = (next(replies), next(replies)) if owner is not None else (None, None)
            found.append(replace(Identity.from_json(raw), locator=locator) if raw else None)
        return found

    async def failures(self, kind: str, who: str) -> tuple[int, int]:
        """(failed logins of who in the current window, milliseconds until the window ends)."""
        pipe = self.r.pipeline(transaction=False)
        pipe.get(self.k.failures(kind, who))
        pipe.pttl(self.k.failures(kind, who))
        count, ttl = await pipe.execute()
        return int(count or 0), max(int(ttl), 0)

    async def add_failure(self, kind: str, who: str, window: int) -> None:
        """Count one failed login of who; the window of window seconds starts at the first."""
        pipe = self.r.pipeline(transaction=True)
        pipe.set(self.k.failures(kind, who), 0, ex=window, nx=True)  # INCR keeps the TTL set here
        pipe.incr(self.k.failures(kind, who))
        await pipe.execute()

    async def clear_failures(self, kind: str, who: str) -> None:
        await self.r.delete(self.k.failures(kind, who))

    async def ping(self) -> bool:
        return bool(await self.r.ping())
