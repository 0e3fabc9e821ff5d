"""The lookups of the HTTP server: 3PID and hash lookups, identities by mxid, read-through answers
and the failed-login counters, each one round trip on the worker's pipelined Redis connection.

A store's hashes may be cut into buckets (indexer.rediskeys): the fields of a bulk lookup are then
grouped by bucket, one HMGET per store and bucket, all sent together (the cluster pipe sends each
node its own)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any, cast

from indexer.identity import Identity
from indexer.rediskeys import RedisKeys, claim_key, plain_key
from server.redis_pipe import CommandPipe

# A key per bucket of a store's hash (one for a binding mirror, or with one bucket).
Buckets = list[str]

_DECR_IF_EXISTS = "if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('DECR', KEYS[1]) end return 0"
# Count one attempt in a window of ARGV[1] seconds, started by the first (INCR keeps the TTL that
# SET ... NX sets): the count and the milliseconds left. A script rather than MULTI ... EXEC, which a
# Redis Cluster client cannot send as plain commands.
_CLAIM_ATTEMPT = """
redis.call('SET', KEYS[1], 0, 'EX', ARGV[1], 'NX')
return {redis.call('INCR', KEYS[1]), redis.call('PTTL', KEYS[1])}
"""

# Scripts, not TIME: a Redis Cluster client routes a command by its key.
_NOW_MS = "local now = redis.call('TIME') return now[1] * 1000 + math.floor(now[2] / 1000)"
# Mark a 3PID as invited, kept by prunings for ARGV[2] ms from now (Redis's clock: every host's).
_MARK_INVITED = """
local now = redis.call('TIME')
redis.call('ZADD', KEYS[1], 'GT', now[1] * 1000 + math.floor(now[2] / 1000) + tonumber(ARGV[2]), ARGV[1])
"""
# Unmark the 3PIDs of ARGV[2...] that no marking has kept beyond ARGV[1] (ms).
_UNMARK_INVITED = """
local removed = 0
for i = 2, #ARGV do
    local kept = redis.call('ZSCORE', KEYS[1], ARGV[i])
    if kept and tonumber(kept) < tonumber(ARGV[1]) then
        removed = removed + redis.call('ZREM', KEYS[1], ARGV[i])
    end
end
return removed
"""
_CHUNK = 1000  # members per command when pruning the invited marks
# The record and locator of each mxid of ARGV, from the first store (KEYS: every store's mxid hash,
# then their record hashes, then their locator hashes, in config order) whose mxid hash has it
# (false, false where none has). With one bucket, all of these hashes share one hash tag: one
# round trip rather than the mxids' store ids, then the records.
_IDENTITIES = """
local stores = #KEYS / 3
local out = {}
for i = 1, #ARGV do
    local record, locator = false, false
    for s = 1, stores do
        local store_id = redis.call('HGET', KEYS[s], ARGV[i])
        if store_id then
            record = redis.call('HGET', KEYS[stores + s], store_id)
            locator = redis.call('HGET', KEYS[2 * stores + s], store_id)
            break
        end
    end
    out[2 * i - 1], out[2 * i] = record, locator
end
return out
"""


def _identity(raw: str | None, locator: str | None) -> Identity | None:
    """An identity from its cached record and locator (None without a record)."""
    return replace(Identity.from_json(raw), locator=locator) if raw else None


class Lookups:
    """Non-blocking reads (and the login counters) for the HTTP server, on the worker's pipelined
    connection: one Redis round trip per request."""

    def __init__(self, pipe: CommandPipe, prefix: str, stores: list[str], hidden: frozenset[str] = frozenset(),
                 directory: list[str] | None = None, spread: int = 1) -> None:
        """stores: the lookup order (configured stores and binding mirrors), first match wins;
        hidden: those of them that lookups from other servers do not see (lookup.share_binds);
        directory: the configured stores alone (default: stores); spread: the number of buckets of
        the store hashes (redis.cluster.buckets, or 1)."""
        self.pipe = pipe
        self.k = RedisKeys(prefix, spread)
        self._orders = {True: self._keyed(stores), False: self._keyed([s for s in stores if s not in hidden])}
        self._directory = self._keyed(stores if directory is None else directory)
        directory_stores = self._directory[0]
        self._mxid_keys = [self._buckets(self.k.mxids, s) for s in directory_stores]
        self._record_keys = {s: (self._buckets(self.k.records, s), self._buckets(self.k.locators, s))
                             for s in directory_stores}
        self._identity_keys = [keys[0] for keys in self._mxid_keys] \
            + [self._record_keys[s][0][0] for s in directory_stores] \
            + [self._record_keys[s][1][0] for s in directory_stores]

    def _buckets(self, key_of: Callable[[str, int], str], store: str) -> Buckets:
        return [key_of(store, bucket) for bucket in range(self.k.spread(store))]

    def _keyed(self, stores: list[str]) -> tuple[list[str], list[Buckets], list[Buckets]]:
        """(stores, their 3PID hashes, their lookup-hash hashes): key names made once, not per lookup."""
        return (stores, [self._buckets(self.k.threepids, s) for s in stores],
                [self._buckets(self.k.hashes, s) for s in stores])

    def _hmgets(self, hashes: list[Buckets], fields: list[str]) -> tuple[list[tuple[Any, ...]], list[Any]]:
        """The HMGETs that read fields from each of hashes, and how to put their replies back in
        order (for _assemble)."""
        if self.k.buckets == 1:
            return [("HMGET", keys[0], *fields) for keys in hashes], []
        if len(fields) == 1:  # one command per hash, as with one bucket
            bucket = self.k.field_bucket(fields[0])
            return [("HMGET", keys[bucket if len(keys) > 1 else 0], *fields) for keys in hashes], []
        groups: dict[int, list[int]] = {}
        for i, field in enumerate(fields):
            groups.setdefault(self.k.field_bucket(field), []).append(i)
        commands: list[tuple[Any, ...]] = []
        shapes: list[Any] = []
        for keys in hashes:
            if len(keys) == 1:
                commands.append(("HMGET", keys[0], *fields))
                shapes.append(None)
            else:
                commands += [("HMGET", keys[bucket], *(fields[i] for i in where)) for bucket, where in groups.items()]
                shapes.append(groups)
        return commands, shapes

    @staticmethod
    def _assemble(replies: list[Any], shapes: list[Any], count: int) -> list[list[Any]]:
        """Each hash's values of _hmgets's fields, in order, from the replies to its commands."""
        if not shapes:
            return replies[:count]
        answers = iter(replies)
        out = []
        for groups in shapes:
            if groups is None:
                out.append(next(answers))
                continue
            values: list[Any] = [None] * sum(len(where) for where in groups.values())
            for where in groups.values():
                for i, value in zip(where, next(answers)):
                    values[i] = value
            out.append(values)
        return out

    async def pepper(self) -> str | None:
        return cast("str | None", await self.pipe.execute("GET", self.k.pepper))

    async def _first_match(
        self, order: tuple[list[str], list[Buckets], list[Buckets]], hashed: bool, fields: list[str], with_pepper: bool,
        sources: list[str | None] | None
    ) -> tuple[str | None, list[str | None]]:
        # One HMGET per store, sent together: a Lua script doing the same in one command cost Redis
        # five times the CPU, whatever the number of fields.
        stores, plain_keys, hash_keys = order
        commands, shapes = self._hmgets(hash_keys if hashed else plain_keys, fields)
        if with_pepper:
            commands.append(("GET", self.k.pepper))
        replies = await self.pipe.execute_many(commands)
        per_store = self._assemble(replies, shapes, len(stores))
        found: list[str | None] = per_store[0]
        origin: list[str | None] = [stores[0] if mxid is not None else None for mxid in found]
        for store, answers in zip(stores[1:], per_store[1:]):
            if None not in found:
                break
            for i, mxid in enumerate(answers):
                if found[i] is None and mxid is not None:
                    found[i], origin[i] = mxid, store
        if sources is not None:
            sources[:] = origin
        return (replies[-1] if with_pepper else None), found

    async def by_address(
        self, pairs: list[tuple[str, str]], sources: list[str | None] | None = None, local: bool = True
    ) -> list[str | None]:
        """mxids for canonical (medium, address) pairs, in order (None where unknown); sources, when
        given, is filled with the name of the store that answered each (None where none did). local:
        whether the lookup is asked locally (else the hidden binding mirrors are not read)."""
        if not pairs:
            return []
        _, found = await self._first_match(self._orders[local], False, [plain_key(a, m) for m, a in pairs],
                                           False, sources)
        return found

    async def in_directory(self, pairs: list[tuple[str, str]]) -> list[str | None]:
        """mxids the configured stores' identities give canonical (medium, address) pairs, in order
        (None where no store has the 3PID); bindings do not count."""
        if not pairs or not self._directory[0]:
            return [None] * len(pairs)
        _, found = await self._first_match(self._directory, False, [plain_key(a, m) for m, a in pairs],
                                           False, None)
        return found

    async def by_hash(
        self, hashes: list[str], sources: list[str | None] | None = None, local: bool = True
    ) -> tuple[str | None, list[str | None]]:
        """(current pepper, mxids for sha256 lookup hashes in order); sources and local as for by_address."""
        if not hashes:
            return await self.pepper(), []
        return await self._first_match(self._orders[local], True, hashes, True, sources)

    async def read_through_answers(self, store: str, pairs: list[tuple[str, str]]) -> list[str | None]:
        """Cached answers of a read-through store for (medium, address) pairs: an mxid, "" for a
        cached "not found", or None when the store has not been asked (or the answer expired)."""
        if not pairs:
            return []
        return cast("list[str | None]",
                    await self.pipe.execute("MGET", *(self.k.read_through(store, m, a) for m, a in pairs)))

    async def remember_answer(self, store: str, medium: str, address: str, mxid: str | None, ttl: int) -> None:
        """Cache a read-through store's answer (None: not found) for ttl seconds."""
        await self.pipe.execute("SET", self.k.read_through(store, medium, address), mxid or "", "EX", ttl)

    async def identities(self, mxids: list[str]) -> list[Identity | None]:
        """The identities (with their locators) of mxids, in order; the first store in config order
        that has an mxid wins. One round trip with one bucket, else two, whatever the number of mxids."""
        if not mxids:
            return []
        if self.k.buckets == 1:
            if not self._directory[0]:
                return [None] * len(mxids)
            replies = await self.pipe.execute("EVAL", _IDENTITIES, len(self._identity_keys), *self._identity_keys,
                                              *mxids)
            return [_identity(raw, locator) for raw, locator in zip(replies[::2], replies[1::2])]
        stores = self._directory[0]
        commands, shapes = self._hmgets(self._mxid_keys, mxids)
        replies = self._assemble(await self.pipe.execute_many(commands), shapes, len(stores))
        owners: list[tuple[str, str] | None] = [None] * len(mxids)
        for store, store_ids in zip(stores, replies):
            owners = [o if o is not None or i is None else (store, i) for o, i in zip(owners, store_ids)]
        reads = [("HGET", keys[self.k.bucket(store, store_id)], store_id) for store, store_id in filter(None, owners)
                 for keys in self._record_keys[store]]
        records = iter(await self.pipe.execute_many(reads))
        return [_identity(next(records), next(records)) if owner is not None else None for owner in owners]

    async def identity_everywhere(self, mxid: str) -> list[Identity]:
        """Every configured store's identity of mxid, in config order (empty when no store has one).
        Two round trips whatever the number of stores."""
        stores = self._directory[0]
        store_ids = await self.pipe.execute_many([("HGET", keys[self.k.bucket(s, mxid)], mxid)
                                                  for s, keys in zip(stores, self._mxid_keys)])
        held = [(store, store_id) for store, store_id in zip(stores, store_ids) if store_id is not None]
        if not held:
            return []
        raws = await self.pipe.execute_many([("HGET", self._record_keys[s][0][self.k.bucket(s, i)], i)
                                             for s, i in held])
        return [Identity.from_json(raw) for raw in raws if raw]

    async def failures(self, kind: str, who: str) -> tuple[int, int]:
        """(failed logins of who in the current window, milliseconds until the window ends)."""
        count, ttl = await self.pipe.execute_many([("GET", self.k.failures(kind, who)),
                                                   ("PTTL", self.k.failures(kind, who))])
        return int(count or 0), max(int(ttl), 0)

    async def claim_attempt(self, kind: str, who: str, window: int, most: int) -> int | None:
        """Count one login attempt of who, before its outcome is known: None while within most per
        window, else milliseconds until the window ends. The count and the check are one
        script, so a burst sent at once gets no more attempts than one sent after another."""
        count, ttl = await self.pipe.execute("EVAL", _CLAIM_ATTEMPT, 1, self.k.failures(kind, who), window)
        return None if int(count) <= most else max(int(ttl), 1)

    async def return_attempt(self, kind: str, who: str) -> None:
        """Uncount an attempt that did not fail (nothing once its window has ended)."""
        await self.pipe.execute("EVAL", _DECR_IF_EXISTS, 1, self.k.failures(kind, who))

    async def clear_failures(self, kind: str, who: str) -> None:
        await self.pipe.execute("DEL", self.k.failures(kind, who))

    async def invited(self, threepids: list[tuple[str, str]]) -> list[bool]:
        """Whether each (medium, canonical address) is marked as having invites waiting (SQL says
        which do: a mark may outlive its invites until the next pruning)."""
        if not threepids:
            return []
        scores = await self.pipe.execute("ZMSCORE", self.k.invited, *(claim_key(m, a) for m, a in threepids))
        return [score is not None for score in scores]

    async def mark_invited(self, medium: str, address: str, keep_ms: int) -> None:
        """Mark a 3PID as invited before its invite is stored, for prunings to keep for at least
        keep_ms (longer than storing the invite can take: a pruning reading SQL meanwhile would
        not see it)."""
        await self.pipe.execute("EVAL", _MARK_INVITED, 1, self.k.invited, claim_key(medium, address), keep_ms)

    async def invited_clock_ms(self) -> int:
        """The time in ms on the clock of the invited marks (Redis's, on the node that holds them)."""
        return int(await self.pipe.execute("EVAL", _NOW_MS, 1, self.k.invited))

    async def prune_invited(self, since_ms: int, pending: list[tuple[str, str]]) -> int:
        """Make the invited marks those of pending (the 3PIDs whose invites SQL held unsettled when
        read, after Redis's clock said since_ms), keeping those marked for after since_ms: marks
        are added for pending 3PIDs without one (invites stored before marks existed, or a Redis
        emptied) and removed from other 3PIDs; how many were removed."""
        key = self.k.invited
        members = [claim_key(m, a) for m, a in pending]
        for at in range(0, len(members), _CHUNK):
            await self.pipe.execute("ZADD", key, "NX", *(x for member in members[at:at + _CHUNK]
                                                        for x in (since_ms, member)))
        wanted = set(members)
        stale = [member for member in await self.pipe.execute("ZRANGE", key, "-inf", f"({since_ms}", "BYSCORE")
                 if member not in wanted]
        removed = 0
        for at in range(0, len(stale), _CHUNK):
            removed += int(await self.pipe.execute("EVAL", _UNMARK_INVITED, 1, key, since_ms,
                                                   *stale[at:at + _CHUNK]))
        return removed
