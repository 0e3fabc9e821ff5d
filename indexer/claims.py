"""One batch of a sync written into the cache, in one transaction: the records, the lookup keys of
their addresses and Matrix IDs, and the change stream entries.

Who answers for an address or a Matrix ID is decided by store record, not by mxid: a record that
stops holding it (changed, deleted, or re-created under a new stable id) gives up only its own hold,
and the address goes only when no record holds it any more. While several records hold one,
s:S:claims lists them, and the one written last answers.

With one bucket (indexer.rediskeys) a batch is one MULTI ... EXEC with its change stream entries, so a
lookup sees every identity of the batch either before or after it. With several, the buckets lie on
several Redis Cluster nodes, which share no transaction, so a batch is written in three steps, each
only once the one before it succeeded: the lookup hashes (3pid, sha256, mxid, claims); then, bucket
by bucket in one script each, the records with their content hashes, generations and locators, so a
record and its content hash change together; then the change stream entries. So the stream never
announces what is not readable yet, and a lookup sees each address before or after the batch (not
the whole batch at once). A batch that fails part-way (a master lost in the middle of it) leaves
the records and their content hashes as they were before it, so the next sync writes those
records again and with them their lookup keys; the lists of several holders, which that rewrite
reads, are rebuilt from the records first (the store's "claims" state is cleared for the length of
the write and set again after it)."""

from __future__ import annotations

import json
from typing import Any, cast

import redis
from redis.typing import EncodableT, FieldT

from indexer import buckets
from indexer.identity import Identity
from indexer.rediskeys import STREAM_MAXLEN, RedisKeys, claim_key, lookup_fields, plain_key

# One bucket's records side of a batch (see the module's docstring): KEYS rec, chash, gen, locator of
# the bucket; ARGV[1] the generation ("" for none), ARGV[2] how many records are written, then each
# as store_id, JSON, content hash; then the store_ids of deleted records.
_RECORDS = """
local n = tonumber(ARGV[2])
for i = 0, n - 1 do
  local id = ARGV[3 + 3 * i]
  redis.call('HSET', KEYS[1], id, ARGV[4 + 3 * i])
  redis.call('HSET', KEYS[2], id, ARGV[5 + 3 * i])
  if ARGV[1] ~= '' then redis.call('ZADD', KEYS[3], ARGV[1], id) end
end
for i = 3 + 3 * n, #ARGV do
  redis.call('HDEL', KEYS[1], ARGV[i])
  redis.call('HDEL', KEYS[2], ARGV[i])
  redis.call('ZREM', KEYS[3], ARGV[i])
  redis.call('HDEL', KEYS[4], ARGV[i])
end
"""

# The change stream entries of a batch, one per record in order, in one command rather than one
# XADD each (their encoding and replies were a good part of a full sync's writing).
# KEYS[1]: the stream; ARGV: its approximate length limit, the store, the op, then the records' ids.
_CHANGES = """
for i = 4, #ARGV do
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'store', ARGV[2], 'id', ARGV[i], 'op', ARGV[3])
end
"""


class BatchWriter:
    """The sync's writes of one store's batches (one writer per store, holding the store's lock)."""

    def __init__(self, client: redis.Redis, keys: RedisKeys) -> None:
        self.r = client
        self.k = keys

    def apply(
        self,
        store: str,
        upserts: list[tuple[Identity, Identity | None]],
        deletes: list[Identity],
        generation: int | None,
        pepper: str,
    ) -> None:
        """Write new and changed identities (with the records they replace; their locators too) and
        remove deleted ones, all in one transaction, so a lookup sees every identity either before
        or after; pepper: the cache's, for the hashed lookup keys."""
        # Every claim an identity makes, with what it stands for: ("3pid", medium, address) or ("mxid", mxid).
        meaning: dict[str, tuple[str, ...]] = {}

        def claims_of(identity: Identity | None) -> set[str]:
            if identity is None:
                return set()
            keys = {identity.mxid}
            meaning[identity.mxid] = ("mxid", identity.mxid)
            for medium, address in identity.threepids:
                key = claim_key(medium, address)
                meaning[key] = ("3pid", medium, address)
                keys.add(key)
            return keys

        # In order: each record's claims before and after this batch (after: none for a deletion).
        steps = [(new.store_id, claims_of(old), claims_of(new)) for new, old in upserts]
        steps += [(gone.store_id, claims_of(gone), set()) for gone in deletes]
        lists, with_list = self._holders(store, meaning, steps)
        answered = {key: held[-1] if held else None for key, held in lists.items()}
        for store_id, before, after in steps:
            for key in before | after:
                held = lists[key]
                if store_id in held:
                    held.remove(store_id)
                if key in after:
                    held.append(store_id)

        # The mxid of each record that answers for an address: written in this batch, or read.
        written = {new.store_id: new for new, _ in upserts}
        locators: dict[str, EncodableT] = {i: new.locator for i, new in written.items() if new.locator is not None}
        deleted = {gone.store_id for gone in deletes}
        mxids = {store_id: identity.mxid for store_id, identity in written.items() if store_id not in deleted}
        unread = sorted({held[-1] for key, held in lists.items()
                         if held and held[-1] not in mxids and held[-1] != answered[key]})
        for store_id, raw in zip(unread, buckets.hmget(self.r, self.k, self.k.records, store, unread)):
            if raw:
                mxids[store_id] = Identity.from_json(raw).mxid

        set_claims: dict[str, EncodableT] = {}
        set_plain: dict[str, EncodableT] = {}
        set_hashed: dict[str, EncodableT] = {}
        set_mxid: dict[str, EncodableT] = {}
        drop_claims: list[str] = []
        drop_plain: list[str] = []
        drop_hashed: list[str] = []
        drop_mxid: list[str] = []
        for key, held in lists.items():
            what = meaning[key]
            owner = held[-1] if held else None
            if len(held) > 1:
                set_claims[key] = json.dumps(held, separators=(",", ":"))
            elif key in with_list:
                drop_claims.append(key)
            if owner == answered[key] and owner not in written:
                continue  # the same unchanged record still answers
            if what[0] == "mxid":
                if owner is None:
                    drop_mxid.append(what[1])
                else:
                    set_mxid[what[1]] = owner
                continue
            plain, hashed = lookup_fields(what[1], what[2], pepper)
            mxid = mxids.get(owner) if owner is not None else None
            if mxid is None:
                drop_plain += plain
                drop_hashed += hashed
            else:
                set_plain.update((f, mxid) for f in plain)
                set_hashed.update((h, mxid) for h in hashed)

        drops = ((self.k.claims, drop_claims), (self.k.threepids, drop_plain), (self.k.hashes, drop_hashed),
                 (self.k.mxids, drop_mxid))
        sets = ((self.k.claims, set_claims), (self.k.threepids, set_plain), (self.k.hashes, set_hashed),
                (self.k.mxids, set_mxid))
        if self.k.spread(store) == 1:
            tx = self.r.pipeline(transaction=True)
            for key_of, fields in drops:
                if fields:
                    tx.hdel(key_of(store, 0), *fields)
            for key_of, mapping in sets:
                if mapping:
                    tx.hset(key_of(store, 0), mapping=cast("dict[FieldT, EncodableT]", mapping))
            if written:
                tx.hset(self.k.records(store, 0), mapping={i: new.to_json() for i, new in written.items()})
                tx.hset(self.k.content_hashes(store, 0), mapping={i: new.hash for i, new in written.items()})
                if generation is not None:
                    tx.zadd(self.k.generations(store, 0), {i: generation for i in written})
                if locators:
                    tx.hset(self.k.locators(store, 0), mapping=cast("dict[FieldT, EncodableT]", locators))
            if deletes:
                gone_ids = [gone.store_id for gone in deletes]
                tx.hdel(self.k.records(store, 0), *gone_ids)
                tx.hdel(self.k.content_hashes(store, 0), *gone_ids)
                tx.zrem(self.k.generations(store, 0), *gone_ids)
                tx.hdel(self.k.locators(store, 0), *gone_ids)
            self._announce(tx, store, upserts, deletes)
            tx.execute()
            return
        state = self.k.state(store)
        self.r.hdel(state, "claims")  # until the batch is whole: see the module's docstring
        lookups = self.r.pipeline(transaction=False)
        for key_of, fields in drops:
            for bucket, names in buckets.by_bucket(self.k, store, fields).items():
                lookups.hdel(key_of(store, bucket), *names)
        for key_of, mapping in sets:
            for bucket, part in buckets.split(self.k, store, mapping).items():
                lookups.hset(key_of(store, bucket), mapping=part)
        lookups.execute()
        per_bucket: dict[int, tuple[list[str], list[str]]] = {}
        for store_id, new in written.items():
            per_bucket.setdefault(self.k.bucket(store, store_id), ([], []))[0].extend(
                (store_id, new.to_json(), new.hash))
        for gone in deletes:
            per_bucket.setdefault(self.k.bucket(store, gone.store_id), ([], []))[1].append(gone.store_id)
        records = self.r.pipeline(transaction=False)
        for bucket, (values, removed) in per_bucket.items():
            # As a plain command: redis-py's cluster pipeline has no eval(), but routes EVAL by its keys.
            records.execute_command(  # type: ignore[no-untyped-call]
                "EVAL", _RECORDS, 4, self.k.records(store, bucket), self.k.content_hashes(store, bucket),
                self.k.generations(store, bucket), self.k.locators(store, bucket),
                "" if generation is None else generation, len(values) // 3, *values, *removed)
        for bucket, part in buckets.split(self.k, store, locators).items():
            records.hset(self.k.locators(store, bucket), mapping=part)
        records.execute()
        tx = self.r.pipeline(transaction=True)
        self._announce(tx, store, upserts, deletes)
        tx.hset(state, "claims", json.dumps(1))
        tx.execute()

    def _announce(self, tx: Any, store: str, upserts: list[tuple[Identity, Identity | None]],
                  deletes: list[Identity]) -> None:
        """The batch's change stream entries, added to the transaction tx."""
        # (A cluster's transaction has an eval() of its own, taking no script; redis-py does not
        # type execute_command.)
        command: Any = tx.execute_command
        if upserts:
            command("EVAL", _CHANGES, 1, self.k.changes, STREAM_MAXLEN, store, "upsert",
                    *(new.store_id for new, _ in upserts))
        if deletes:
            command("EVAL", _CHANGES, 1, self.k.changes, STREAM_MAXLEN, store, "delete",
                    *(gone.store_id for gone in deletes))

    def _holders(self, store: str, meaning: dict[str, tuple[str, ...]],
                 steps: list[tuple[str, set[str], set[str]]],
                 built: bool = False) -> tuple[dict[str, list[str]], set[str]]:
        """Which records hold each claim before this batch (the one answering last), and which
        claims have a list in s:S:claims. Only claims that several records hold have one; a claim
        held once is known from what answers it: s:S:mxid for a Matrix ID; for an address, the
        record of this batch that held it, else the record with the answering mxid that holds it.
        The lists are built first when the store's state says they are not whole (built: they
        just were)."""
        keys = list(meaning)
        mxid_keys = [k for k in keys if meaning[k][0] == "mxid"]
        addresses = [k for k in keys if meaning[k][0] == "3pid"]
        # The state's "claims" flag is read in the same round trip as the lists it vouches for (the
        # store's lock keeps other writers out); it is rarely missing.
        listed, owners, answers, flag = buckets.hmget_many(self.r, self.k, store, [
            (self.k.claims, keys), (self.k.mxids, mxid_keys),
            (self.k.threepids, [plain_key(meaning[k][2], meaning[k][1]) for k in addresses]),
            (lambda of, _: self.k.state(of), ["claims"])])
        if flag[0] is None and not built:
            self._ensure_claims(store)
            return self._holders(store, meaning, steps, built=True)
        holders = {key: json.loads(raw) for key, raw in zip(keys, listed) if raw}
        with_list = set(holders)
        for key, owner in zip(mxid_keys, owners):
            holders.setdefault(key, [owner] if owner else [])
        held_before: dict[str, list[str]] = {}
        for store_id, before, _ in steps:
            for key in before:
                held_before.setdefault(key, []).append(store_id)
        unknown: dict[str, str] = {}  # address claim -> the mxid answering it, whose record is to be found
        for key, answer in zip(addresses, answers):
            if key in holders:
                continue
            if answer is None:
                holders[key] = []
            elif key in held_before:
                holders[key] = held_before[key]
            else:
                unknown[key] = answer
        if unknown:
            # A record outside this batch holds the address alone: one of those with its mxid.
            mxids = sorted(set(unknown.values()))
            listed_ids, single_ids = buckets.hmget_many(self.r, self.k, store,
                                                        [(self.k.claims, mxids), (self.k.mxids, mxids)])
            candidates = {m: json.loads(raw) if raw else [i] if i else []
                          for m, raw, i in zip(mxids, listed_ids, single_ids)}
            ids = sorted({i for found in candidates.values() for i in found})
            records = {i: Identity.from_json(raw)
                       for i, raw in zip(ids, buckets.hmget(self.r, self.k, self.k.records, store, ids)) if raw}
            for key, mxid in unknown.items():
                claim = (meaning[key][1], meaning[key][2])
                holders[key] = [i for i in candidates[mxid] if i in records and claim in records[i].threepids][-1:]
        return holders, with_list

    def _ensure_claims(self, store: str) -> None:
        """Build the store's lists of what several records hold, from its records, when the cache
        was written by a version without them or a batch failed part-way; the records that answer
        today keep answering."""
        state = self.k.state(store)
        if self.r.hexists(state, "claims"):
            return
        held: dict[str, list[str]] = {}
        plain: dict[str, str] = {}  # claim of a 3PID -> its field in s:S:3pid
        mxids: dict[str, str] = {}
        self.r.delete(*buckets.every(self.k, self.k.claims, store))
        raws = (raw for key in buckets.every(self.k, self.k.records, store)
                for _, raw in self.r.hscan_iter(key, count=1000))
        for raw in raws:
            identity = Identity.from_json(raw)
            mxids[identity.store_id] = identity.mxid
            held.setdefault(identity.mxid, []).append(identity.store_id)
            for medium, address in identity.threepids:
                key = claim_key(medium, address)
                held.setdefault(key, []).append(identity.store_id)
                plain[key] = plain_key(address, medium)
        shared = [key for key, ids in held.items() if len(ids) > 1]
        if shared:
            addresses = [key for key in shared if key in plain]
            others = [key for key in shared if key not in plain]
            answered, owners = buckets.hmget_many(self.r, self.k, store, [
                (self.k.threepids, [plain[key] for key in addresses]), (self.k.mxids, others)])
            for key, answer in (*zip(addresses, answered), *zip(others, owners)):
                held[key].sort(key=lambda i: (mxids[i] if key in plain else i) == answer)
        items = [(key, json.dumps(held[key], separators=(",", ":"))) for key in shared]
        for start in range(0, len(items), 1000):
            for bucket, part in buckets.split(self.k, store, dict(items[start:start + 1000])).items():
                self.r.hset(self.k.claims(store, bucket), mapping=part)
        self.r.hset(state, "claims", json.dumps(1))
