"""The cache in Redis (key names: indexer.rediskeys): the indexer's blocking access, the admin API's
asynchronous one, and the counters and memories the server keeps there."""

from __future__ import annotations

import json
import secrets
import string
import time
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any, cast

import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.typing import EncodableT, FieldT

from indexer.config import parse_duration
from indexer.identity import Identity
from indexer.normalize import lookup_forms, lookup_hash
from indexer.rediskeys import BINDINGS, RedisKeys, claim_key, plain_key

STREAM_MAXLEN = 1_000_000
PEPPER_LENGTH = 20
# A queued job nobody picks up, or a running one whose indexer stopped refreshing it, expires and
# frees the store for a new request; a finished job stays readable for a day.
JOB_QUEUED_TTL = 3600
JOB_RUNNING_TTL = 60
JOB_DONE_TTL = 86400
JOB_ACTIVE = ("queued", "running")

# Atomically: the store's active job if it has one, else a new queued job (returns [id, created]).
_ENQUEUE = """
local current = redis.call('GET', KEYS[1])
if current then
  local state = redis.call('HGET', ARGV[1] .. current, 'state')
  if state == 'queued' or state == 'running' then return {current, 0} end
end
local key = ARGV[1] .. ARGV[2]
redis.call('HSET', key, unpack(ARGV, 4))
redis.call('EXPIRE', key, ARGV[3])
redis.call('SET', KEYS[1], ARGV[2])
redis.call('LPUSH', KEYS[2], ARGV[2])
return {ARGV[2], 1}
"""

# Atomically: claim a queued job for this indexer (nothing when it was failed for waiting too long).
_CLAIM = """
if redis.call('HGET', KEYS[1], 'state') ~= 'queued' then return nil end
redis.call('HSET', KEYS[1], 'state', 'running', 'started', ARGV[1], 'host', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return redis.call('HGETALL', KEYS[1])
"""

# Atomically: fail a job that is still queued, take it off the queue and free its store.
_ABANDON = """
if redis.call('HGET', KEYS[1], 'state') ~= 'queued' then return 0 end
redis.call('LREM', KEYS[2], 0, ARGV[1])
redis.call('HSET', KEYS[1], 'state', 'done', 'outcome', 'failed', 'error', ARGV[2], 'ended', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
if redis.call('GET', KEYS[3]) == ARGV[1] then redis.call('DEL', KEYS[3]) end
return 1
"""

# Raise a counter (a string key, or a hash field when ARGV[2] is given) to ARGV[1] unless it is higher.
_RAISE = """
local current
if ARGV[2] then current = redis.call('HGET', KEYS[1], ARGV[2]) else current = redis.call('GET', KEYS[1]) end
if tonumber(current or '0') < tonumber(ARGV[1]) then
  if ARGV[2] then redis.call('HSET', KEYS[1], ARGV[2], ARGV[1]) else redis.call('SET', KEYS[1], ARGV[1]) end
end
"""


DEFAULT_TIMEOUT_S = 5.0
# Longest a command of ours asks Redis to block (XREAD BLOCK, BRPOP): a client that sends them waits
# that much longer for a reply.
MAX_BLOCK_S = 1.0


def timeout_of(config: dict[str, Any]) -> float:
    """The configured deadline of every Redis command (redis.timeout), in seconds."""
    return float(parse_duration(config["redis"]["timeout"]))


def _client_options(timeout_s: float, blocking: bool) -> dict[str, Any]:
    # redis-py retries a timed-out command three times with backoff by default, so that a frozen
    # Redis held a request for a minute; one retry on a dropped connection (Redis restarted) is kept.
    return {"decode_responses": True, "health_check_interval": 30,
            "socket_timeout": timeout_s + (MAX_BLOCK_S if blocking else 0), "socket_connect_timeout": timeout_s,
            "retry": Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,))}


def connect(url: str, timeout_s: float = DEFAULT_TIMEOUT_S, blocking: bool = False) -> redis.Redis:
    """A blocking client for the indexer and the command line; blocking: for a client that also
    sends the indexer's blocking reads."""
    return redis.Redis.from_url(url, **_client_options(timeout_s, blocking))


def connect_async(url: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> redis.asyncio.Redis:
    """An asyncio client for the HTTP server."""
    options = _client_options(timeout_s, False)
    options["retry"] = AsyncRetry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,))
    return redis.asyncio.Redis.from_url(url, **options)


@dataclass(frozen=True)
class StreamEntry:
    """One entry of the change stream."""

    id: str
    store: str
    store_id: str
    op: str  # "upsert" or "delete"


def _stream_id(value: str) -> tuple[int, int]:
    ms, _, seq = value.partition("-")
    return int(ms), int(seq or 0)


# A read of several dependent round trips, written once for both clients: the plan yields the
# commands of one pipeline, receives their replies, and finally returns its answer.
Commands = list[tuple[Any, ...]]
Plan = Generator[Commands, list[Any], Any]


def _pipeline(client: Any, commands: Commands) -> Any:
    pipe = client.pipeline(transaction=False)
    for name, *args in commands:
        getattr(pipe, name)(*args)
    return pipe


def _run_plan(client: redis.Redis, plan: Plan) -> Any:
    try:
        commands = next(plan)
        while True:
            commands = plan.send(_pipeline(client, commands).execute() if commands else [])
    except StopIteration as done:
        return done.value


async def _run_plan_async(client: redis.asyncio.Redis, plan: Plan) -> Any:
    try:
        commands = next(plan)
        while True:
            commands = plan.send(await _pipeline(client, commands).execute() if commands else [])
    except StopIteration as done:
        return done.value


def _job_view(job_id: str, raw: dict[str, str]) -> dict[str, Any] | None:
    """A job hash as the admin API shows it; None when it expired."""
    if not raw.get("store"):
        return None
    total = int(raw["total"]) if raw.get("total") else None
    read, applied = int(raw.get("read") or 0), int(raw.get("applied") or 0)
    percent = None
    if raw.get("outcome") == "ok":
        percent = 100
    elif total:
        percent = min(99, read * 100 // total)
    elif total == 0:
        percent = 0

    def number(name: str) -> float | None:
        return float(raw[name]) if raw.get(name) else None

    return {
        "id": job_id, "store": raw["store"], "full": raw.get("full") == "1", "state": raw.get("state"),
        "read": read, "applied": applied, "total": total, "percent": percent,
        "created": number("created"), "started": number("started"), "ended": number("ended"),
        "outcome": raw.get("outcome"), "error": raw.get("error"),
        "result": json.loads(raw["result"]) if raw.get("result") else None,
        "request_id": raw.get("request_id") or None,
    }


def _status_plan(k: RedisKeys, stores: list[str], now: float) -> Plan:
    """Every store's size, sync state and active job, and every follower's position and lag."""
    first: Commands = []
    for store in stores:
        first += [("hlen", k.store(store, "rec")), ("hgetall", k.store(store, "state")), ("get", k.store(store, "job"))]
    first += [("smembers", k.followers), ("xrevrange", k.changes, "+", "-", 1), ("get", k.epoch),
              ("smembers", k.indexer_hosts)]
    replies = yield first
    per_store = [replies[i:i + 3] for i in range(0, 3 * len(stores), 3)]
    hosts, newest, epoch, indexer_hosts = sorted(replies[-4]), replies[-3], replies[-2], sorted(replies[-1])
    newest_id = newest[0][0] if newest else "0-0"
    pointers = [job_id for _, _, job_id in per_store]
    job_ids = [j for j in pointers if j]
    second: Commands = ([("hgetall", k.job(j)) for j in job_ids] + [("hgetall", k.follower(h)) for h in hosts]
                        + [("get", key(h)) for h in indexer_hosts for key in (k.indexer, k.indexer_exit)])
    replies = yield second
    jobs = dict(zip(job_ids, replies[:len(job_ids)]))
    followers = [dict(raw, host=h) for h, raw in zip(hosts, replies[len(job_ids):len(job_ids) + len(hosts)])]
    indexer_replies = replies[len(job_ids) + len(hosts):]
    behind = [f for f in followers if _stream_id(f.get("last_id") or "0-0") < _stream_id(newest_id)]
    replies = yield [("xrange", k.changes, "(" + f.get("last_id", "0-0"), "+", 1) for f in behind]
    oldest_unapplied = {f["host"]: (r[0][0] if r else newest_id) for f, r in zip(behind, replies)}
    result: dict[str, Any] = {"stores": {}, "followers": [], "last_change_id": newest_id, "indexers": []}
    for i, host in enumerate(indexer_hosts):
        beat, last_exit = indexer_replies[2 * i], indexer_replies[2 * i + 1]
        result["indexers"].append({"host": host, "alive": beat is not None,
                                   **(json.loads(beat) if beat else {}),
                                   "last_exit": json.loads(last_exit) if last_exit else None})
    for store, (count, state, job_id) in zip(stores, per_store):
        fields = {name: json.loads(value) for name, value in state.items()}
        job = _job_view(job_id, jobs[job_id]) if job_id else None
        result["stores"][store] = {
            "identities": count,
            **{name: fields.get(name) for name in ("last_full", "last_incremental", "last_success", "next_full")},
            # Without a high-water mark (a store that cannot list changes) no incremental sync runs.
            "next_incremental": fields.get("next_incremental") if "high_water_mark" in fields else None,
            "job": job if job and job["state"] in JOB_ACTIVE else None,
            # Whether a full sync completed into this cache (not one since emptied or replaced by an older copy).
            "complete": epoch is not None and fields.get("synced_epoch") == epoch,
        }
    for follower in followers:
        pending = oldest_unapplied.get(follower["host"])
        lag = max(0.0, now - _stream_id(pending)[0] / 1000) if pending else 0.0
        result["followers"].append({
            "host": follower["host"], "last_id": follower.get("last_id"), "lag_seconds": round(lag, 3),
            "updated": float(follower["updated"]) if follower.get("updated") else None,
            "rebuilt": float(follower["rebuilt"]) if follower.get("rebuilt") else None,
        })
    return result


def _inspect_plan(k: RedisKeys, stores: list[str], medium: str | None, address: str) -> Plan:
    """What each store's cache holds for a 3PID (medium, canonical address) or, with medium None, an mxid."""
    if medium is None:
        mxids = [address] * len(stores)
    else:
        mxids = yield [("hget", k.store(s, "3pid"), plain_key(address, medium)) for s in stores]
    found = [(s, m) for s, m in zip(stores, mxids) if m]
    store_ids = yield [("hget", k.store(s, "mxid"), m) for s, m in found]
    held = [(s, m, i) for (s, m), i in zip(found, store_ids)]
    records = yield [("hget", k.store(s, "rec"), i) for s, _, i in held if i]
    records_by = iter(records)
    matches = []
    for store, mxid, store_id in held:
        record = next(records_by) if store_id else None
        matches.append({"store": store, "mxid": mxid, "store_id": store_id,
                        "identity": json.loads(record) if record else None})
    return matches

def _binding_fields(medium: str, address: str, pepper: str) -> tuple[list[str], list[str]]:
    forms = lookup_forms(medium, address)
    return [plain_key(f, medium) for f in forms], [lookup_hash(f, medium, pepper) for f in forms]


class Cache:
    """Blocking access for the indexer: sync writes, state, locks, the change stream."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.r = client
        self.k = RedisKeys(prefix)

    def initialize(self, pepper: str | None = None) -> str | None:
        """Create the epoch and the lookup pepper (random unless given) if this cache has none yet;
        return the epoch."""
        self.r.set(self.k.epoch, secrets.token_hex(8), nx=True)
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
        return self.r.hlen(self.k.store(store, "rec"))

    def content_hashes(self, store: str) -> dict[str, str]:
        return cast("dict[str, str]", self.r.hgetall(self.k.store(store, "chash")))

    def get(self, store: str, store_ids: list[str]) -> list[Identity | None]:
        if not store_ids:
            return []
        raw = self.r.hmget(self.k.store(store, "rec"), store_ids)
        return [Identity.from_json(r) if r else None for r in raw]

    def iter_identities(self, store: str, batch: int = 1000) -> Iterator[Identity]:
        for _, raw in self.r.hscan_iter(self.k.store(store, "rec"), count=batch):
            yield Identity.from_json(raw)

    def mxid_of(self, store: str, medium: str, address: str) -> str | None:
        return cast("str | None", self.r.hget(self.k.store(store, "3pid"), plain_key(address, medium)))

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
        locators: dict[FieldT, EncodableT] = {i.store_id: i.locator for i in identities if i.locator is not None}
        if locators:
            self.r.hset(self.k.store(store, "locator"), mapping=locators)

    def stale_ids(self, store: str, generation: int) -> list[str]:
        return cast("list[str]", self.r.zrangebyscore(self.k.store(store, "gen"), "-inf", f"({generation}"))

    def apply(
        self,
        store: str,
        upserts: list[tuple[Identity, Identity | None]],
        deletes: list[Identity],
        generation: int | None,
    ) -> None:
        """Write new and changed identities (with the records they replace) and remove deleted ones,
        all in one transaction, so a lookup sees every identity either before or after.

        Who answers for an address or a Matrix ID is decided by store record, not by mxid: a record
        that stops holding it (changed, deleted, or re-created under a new stable id) gives up only
        its own hold, and the address goes only when no record holds it any more. While several
        records hold one, s:S:claims lists them, and the one written last answers."""
        if not upserts and not deletes:
            return
        pepper = self.pepper()
        kc, km = self.k.store(store, "claims"), self.k.store(store, "mxid")
        k3, kh = self.k.store(store, "3pid"), self.k.store(store, "sha256")
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
        self._ensure_claims(store)
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
        deleted = {gone.store_id for gone in deletes}
        mxids = {store_id: identity.mxid for store_id, identity in written.items() if store_id not in deleted}
        unread = sorted({held[-1] for key, held in lists.items()
                         if held and held[-1] not in mxids and held[-1] != answered[key]})
        for store_id, raw in zip(unread, self.r.hmget(self.k.store(store, "rec"), unread) if unread else []):
            if raw:
                mxids[store_id] = Identity.from_json(raw).mxid

        set_claims: dict[FieldT, EncodableT] = {}
        set_plain: dict[FieldT, EncodableT] = {}
        set_hashed: dict[FieldT, EncodableT] = {}
        set_mxid: dict[FieldT, EncodableT] = {}
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
            plain, hashed = _binding_fields(what[1], what[2], pepper)
            mxid = mxids.get(owner) if owner is not None else None
            if mxid is None:
                drop_plain += plain
                drop_hashed += hashed
            else:
                set_plain.update((f, mxid) for f in plain)
                set_hashed.update((h, mxid) for h in hashed)

        tx = self.r.pipeline(transaction=True)
        for key, fields in ((kc, drop_claims), (k3, drop_plain), (kh, drop_hashed), (km, drop_mxid)):
            if fields:
                tx.hdel(key, *fields)
        for key, mapping in ((kc, set_claims), (k3, set_plain), (kh, set_hashed), (km, set_mxid)):
            if mapping:
                tx.hset(key, mapping=mapping)
        if written:
            tx.hset(self.k.store(store, "rec"), mapping={i: new.to_json() for i, new in written.items()})
            tx.hset(self.k.store(store, "chash"), mapping={i: new.hash for i, new in written.items()})
            if generation is not None:
                tx.zadd(self.k.store(store, "gen"), {i: generation for i in written})
        for new, _ in upserts:
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

    def _holders(self, store: str, meaning: dict[str, tuple[str, ...]],
                 steps: list[tuple[str, set[str], set[str]]]) -> tuple[dict[str, list[str]], set[str]]:
        """Which records hold each claim before this batch (the one answering last), and which
        claims have a list in s:S:claims. Only claims that several records hold have one; a claim
        held once is known from what answers it: s:S:mxid for a Matrix ID; for an address, the
        record of this batch that held it, else the record with the answering mxid that holds it."""
        keys = list(meaning)
        mxid_keys = [k for k in keys if meaning[k][0] == "mxid"]
        addresses = [k for k in keys if meaning[k][0] == "3pid"]
        read = self.r.pipeline(transaction=False)
        read.hmget(self.k.store(store, "claims"), keys)
        read.hmget(self.k.store(store, "mxid"), mxid_keys)
        if addresses:
            read.hmget(self.k.store(store, "3pid"), [plain_key(meaning[k][2], meaning[k][1]) for k in addresses])
        listed, owners, *rest = read.execute()
        holders = {key: json.loads(raw) for key, raw in zip(keys, listed) if raw}
        with_list = set(holders)
        for key, owner in zip(mxid_keys, owners):
            holders.setdefault(key, [owner] if owner else [])
        held_before: dict[str, list[str]] = {}
        for store_id, before, _ in steps:
            for key in before:
                held_before.setdefault(key, []).append(store_id)
        unknown: dict[str, str] = {}  # address claim -> the mxid answering it, whose record is to be found
        for key, answer in zip(addresses, rest[0] if rest else []):
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
            read = self.r.pipeline(transaction=False)
            read.hmget(self.k.store(store, "claims"), mxids)
            read.hmget(self.k.store(store, "mxid"), mxids)
            listed_ids, single_ids = read.execute()
            candidates = {m: json.loads(raw) if raw else [i] if i else []
                          for m, raw, i in zip(mxids, listed_ids, single_ids)}
            ids = sorted({i for found in candidates.values() for i in found})
            records = {i: Identity.from_json(raw)
                       for i, raw in zip(ids, self.r.hmget(self.k.store(store, "rec"), ids) if ids else []) if raw}
            for key, mxid in unknown.items():
                claim = (meaning[key][1], meaning[key][2])
                holders[key] = [i for i in candidates[mxid] if i in records and claim in records[i].threepids][-1:]
        return holders, with_list

    def _ensure_claims(self, store: str) -> None:
        """Build the store's lists of what several records hold, from its records, when the cache
        was written by a version without them; the records that answer today keep answering."""
        state = self.k.store(store, "state")
        if self.r.hexists(state, "claims"):
            return
        held: dict[str, list[str]] = {}
        plain: dict[str, str] = {}  # claim of a 3PID -> its field in s:S:3pid
        mxids: dict[str, str] = {}
        for identity in self.iter_identities(store):
            mxids[identity.store_id] = identity.mxid
            held.setdefault(identity.mxid, []).append(identity.store_id)
            for medium, address in identity.threepids:
                key = claim_key(medium, address)
                held.setdefault(key, []).append(identity.store_id)
                plain[key] = plain_key(address, medium)
        shared = [key for key, ids in held.items() if len(ids) > 1]
        if shared:
            read = self.r.pipeline(transaction=False)
            for key in shared:
                if key in plain:
                    read.hget(self.k.store(store, "3pid"), plain[key])
                else:
                    read.hget(self.k.store(store, "mxid"), key)
            for key, answer in zip(shared, read.execute()):
                held[key].sort(key=lambda i: (mxids[i] if key in plain else i) == answer)
        items = [(key, json.dumps(held[key], separators=(",", ":"))) for key in shared]
        for start in range(0, len(items), 1000):
            self.r.hset(self.k.store(store, "claims"), mapping=dict(items[start:start + 1000]))
        self.r.hset(state, "claims", json.dumps(1))

    # -- sync state and locks -----------------------------------------------------------------

    def next_generation(self, store: str) -> int:
        return int(self.r.hincrby(self.k.store(store, "state"), "generation", 1))

    def generation(self, store: str) -> int:
        return int(self.r.hget(self.k.store(store, "state"), "generation") or 0)

    def state(self, store: str) -> dict[str, Any]:
        """last_full, last_incremental (dicts), high_water_mark (as the store gave it), generation."""
        raw = self.r.hgetall(self.k.store(store, "state"))
        return {cast(str, k): json.loads(v) for k, v in raw.items()}

    def set_state(self, store: str, **fields: Any) -> None:
        self.r.hset(self.k.store(store, "state"), mapping={k: json.dumps(v) for k, v in fields.items()})

    def forget_mark(self, store: str) -> None:
        """Drop the store's high-water mark (its kind can no longer list changes)."""
        self.r.hdel(self.k.store(store, "state"), "high_water_mark")

    def lock(self, store: str, timeout: float) -> redis.lock.Lock:
        """The lock that lets only one indexer sync a store at a time (extend it while working)."""
        lock: redis.lock.Lock = self.r.lock(self.k.store(store, "lock"), timeout=timeout, thread_local=False)
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
        return first is not None and _stream_id(first) > _stream_id(last_id)

    def read_changes(self, after: str, count: int, block_ms: int | None) -> list[StreamEntry]:
        reply: list[tuple[str, list[tuple[str, dict[str, str]]]]] | None = cast(
            Any, self.r.xread({self.k.changes: after}, count=count, block=block_ms))
        if not reply:
            return []
        return [StreamEntry(i, f["store"], f["id"], f["op"]) for i, f in reply[0][1]]

    def set_follower_status(self, host: str, **fields: Any) -> None:
        tx = self.r.pipeline(transaction=True)
        tx.hset(self.k.follower(host), mapping={k: str(v) for k, v in fields.items()})
        tx.sadd(self.k.followers, host)
        tx.execute()

    def status(self, stores: list[str]) -> dict[str, Any]:
        """Each store's size, sync state and active job; each follower's lag (see Admin.status)."""
        return cast("dict[str, Any]", _run_plan(self.r, _status_plan(self.k, stores, time.time())))

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
        tx.set(self.k.indexer(host), json.dumps(dict(fields, beat=time.time())), ex=ttl)
        tx.sadd(self.k.indexer_hosts, host)
        tx.execute()

    def indexer_exited(self, host: str, **fields: Any) -> None:
        """Record how host's indexer ended, and forget its heartbeat: it is down from now on."""
        tx = self.r.pipeline(transaction=True)
        tx.delete(self.k.indexer(host))
        tx.set(self.k.indexer_exit(host), json.dumps(dict(fields, at=time.time())))
        tx.sadd(self.k.indexer_hosts, host)
        tx.execute()

    def fail_running_jobs(self, host: str, stores: list[str], error: str) -> list[str]:
        """Fail the jobs that host's indexer was running (it died); their ids."""
        failed = []
        for store in stores:
            job_id = cast("str | None", self.r.get(self.k.store(store, "job")))
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
        pointer = self.k.store(store, "job")
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
        epoch, held = self.r.hmget(self.k.store(BINDINGS, "state"), ["epoch", "generation"])
        return epoch is not None and epoch == self.epoch() and int(held or 0) >= generation

    def rebuild_bindings(self, bindings: Iterable[tuple[str, str, str]], generation: int) -> int:
        """Replace the mirror with these (medium, address, mxid) bindings, read at the SQL bindings
        generation given (or later); how many lookup keys were written."""
        pepper, epoch = self.pepper(), self.epoch()
        plain: dict[FieldT, EncodableT] = {}
        hashed: dict[FieldT, EncodableT] = {}
        for medium, address, mxid in bindings:
            fields, hashes = _binding_fields(medium, address, pepper)
            plain.update((f, mxid) for f in fields)
            hashed.update((h, mxid) for h in hashes)
        tx = self.r.pipeline(transaction=True)
        tx.delete(self.k.store(BINDINGS, "3pid"), self.k.store(BINDINGS, "sha256"))
        if plain:
            tx.hset(self.k.store(BINDINGS, "3pid"), mapping=plain)
            tx.hset(self.k.store(BINDINGS, "sha256"), mapping=hashed)
        tx.hset(self.k.store(BINDINGS, "state"), mapping={"epoch": epoch or "", "generation": generation})
        tx.execute()
        return len(plain)

    # -- knowing whether this Redis holds everything it should ---------------------------------

    def generation_counter(self) -> int:
        """The cache generation: how many syncs completed into this Redis."""
        return int(self.r.get(self.k.generation) or 0)

    def advance_generation(self) -> None:
        self.r.incr(self.k.generation)

    def raise_generation(self, value: int) -> None:
        self.r.eval(_RAISE, 1, self.k.generation, value)

    def mark_synced(self, store: str, epoch: str | None) -> None:
        """Record that a full sync begun in this epoch completed."""
        self.set_state(store, synced_epoch=epoch)

    def incomplete_stores(self, stores: list[str]) -> list[str]:
        """The stores that no full sync completed into since this cache was emptied (or since it was
        found behind)."""
        pipe = self.r.pipeline(transaction=False)
        pipe.get(self.k.epoch)
        for store in stores:
            pipe.hget(self.k.store(store, "state"), "synced_epoch")
        epoch, *marks = pipe.execute()
        return [s for s, m in zip(stores, marks) if epoch is None or m is None or json.loads(m) != epoch]

    def forget_full_syncs(self, stores: list[str]) -> None:
        """Let every store count as not wholly in the cache, so that the indexer syncs each in full,
        and have every fulltext index rebuilt from what the cache holds now."""
        pipe = self.r.pipeline(transaction=False)
        for store in stores:
            pipe.hdel(self.k.store(store, "state"), "synced_epoch")
        pipe.incr(self.k.rebuild)
        pipe.execute()


class Admin:
    """Non-blocking reads and requests for the admin API and the readiness check."""

    def __init__(self, client: redis.asyncio.Redis, prefix: str, stores: list[str],
                 job_start_timeout: float = 30.0) -> None:
        self.r = client
        self.k = RedisKeys(prefix)
        self.stores = stores
        self.job_start_timeout = job_start_timeout
        self._enqueue = client.register_script(_ENQUEUE)
        self._abandon = client.register_script(_ABANDON)

    async def status(self) -> dict[str, Any]:
        """{"stores": {name: {identities, last_full, last_incremental, last_success, next_full,
        next_incremental, job}}, "followers": [{host, last_id, lag_seconds, ...}], "last_change_id"}."""
        return cast("dict[str, Any]", await _run_plan_async(self.r, _status_plan(self.k, self.stores, time.time())))

    async def start_job(self, store: str, full: bool, request_id: str | None) -> tuple[dict[str, Any], bool]:
        """The store's queued or running job, or a new queued one; (job, whether it is new)."""
        new_id = secrets.token_hex(8)
        fields = {"id": new_id, "store": store, "full": "1" if full else "0", "state": "queued",
                  "created": str(time.time()), "read": "0", "applied": "0", "request_id": request_id or ""}
        flat = [x for pair in fields.items() for x in pair]
        job_id, created = await self._enqueue(
            keys=[self.k.store(store, "job"), self.k.jobs], args=[self.k.job_prefix, new_id, JOB_QUEUED_TTL, *flat],
        )
        job = await self.job(job_id)
        assert job is not None
        return job, bool(created)

    async def job(self, job_id: str) -> dict[str, Any] | None:
        """A job as the admin API shows it; a job queued for longer than job_start_timeout is failed
        first, since no live indexer took it (one that is down would otherwise leave it waiting)."""
        view = _job_view(job_id, cast("dict[str, str]", await self.r.hgetall(self.k.job(job_id))))
        if view is None or view["state"] != "queued" or time.time() - (view["created"] or 0) < self.job_start_timeout:
            return view
        error = (f"no indexer took this job within {self.job_start_timeout:g} s: the indexer is not running "
                 "(see `mxisd status` and the server's log)")
        await self._abandon(keys=[self.k.job(job_id), self.k.jobs, self.k.store(view["store"], "job")],
                            args=[job_id, error, time.time(), JOB_DONE_TTL])
        return _job_view(job_id, cast("dict[str, str]", await self.r.hgetall(self.k.job(job_id))))

    async def inspect(self, medium: str | None, address: str) -> list[dict[str, Any]]:
        """Per store that has it: the mxid, store id and record cached for a 3PID or an mxid."""
        return cast("list[dict[str, Any]]",
                    await _run_plan_async(self.r, _inspect_plan(self.k, self.stores, medium, address)))

    async def request_rebuild(self) -> int:
        """Ask every host's follower to rebuild its fulltext index from the cache."""
        return int(await self.r.incr(self.k.rebuild))

class BindingMirror:
    """Writes /3pid/bind bindings into the "_bindings" pseudo-store, so lookups find them at once."""

    def __init__(self, client: redis.asyncio.Redis, prefix: str) -> None:
        self.r = client
        self.k = RedisKeys(prefix)

    async def put(self, medium: str, address: str, mxid: str, generation: int) -> None:
        """Mirror one bind, made at this SQL bindings generation."""
        pepper = cast("str | None", await self.r.get(self.k.pepper))
        if not pepper:
            raise redis.exceptions.RedisError("the cache has no lookup pepper yet")
        fields, hashes = _binding_fields(medium, address, pepper)
        tx = self.r.pipeline(transaction=True)
        tx.hset(self.k.store(BINDINGS, "3pid"), mapping={f: mxid for f in fields})
        tx.hset(self.k.store(BINDINGS, "sha256"), mapping={h: mxid for h in hashes})
        tx.eval(_RAISE, 1, self.k.store(BINDINGS, "state"), generation, "generation")
        await tx.execute()

    async def remove(self, medium: str, address: str, generation: int) -> None:
        """Mirror one unbind, made at this SQL bindings generation."""
        pepper = cast(str, await self.r.get(self.k.pepper) or "")
        fields, hashes = _binding_fields(medium, address, pepper)
        tx = self.r.pipeline(transaction=True)
        tx.hdel(self.k.store(BINDINGS, "3pid"), *fields)
        tx.hdel(self.k.store(BINDINGS, "sha256"), *hashes)
        tx.eval(_RAISE, 1, self.k.store(BINDINGS, "state"), generation, "generation")
        await tx.execute()

    async def behind(self, generation: int) -> str | None:
        """Why the mirror does not hold SQL's bindings generation, or None when it does."""
        epoch, (mirrored_epoch, held) = await _run_plan_async(self.r, self._state_plan())
        if epoch is None or mirrored_epoch != epoch:
            return "the cache lost the bindings mirror; it is being rebuilt from the database"
        if int(held or 0) < generation:
            return (f"the bindings mirror holds generation {int(held or 0)}, the database {generation}; "
                    "it is being rebuilt from the database")
        return None

    def _state_plan(self) -> Plan:
        epoch, state = yield [("get", self.k.epoch),
                              ("hmget", self.k.store(BINDINGS, "state"), ["epoch", "generation"])]
        return epoch, state


class RateLimits:
    """Fixed-window counters shared by every worker and host."""

    def __init__(self, client: redis.asyncio.Redis, prefix: str) -> None:
        self.r = client
        self.k = RedisKeys(prefix)

    async def hit(self, kind: str, key: str, limit: int, window_s: int) -> int | None:
        """Count one request; None when within limit, else milliseconds until the window ends."""
        name = self.k.rate(kind, key)
        pipe = self.r.pipeline(transaction=True)
        pipe.set(name, 0, ex=window_s, nx=True)
        pipe.incr(name)
        pipe.pttl(name)
        _, count, ttl = await pipe.execute()
        if count <= limit:
            return None
        return max(int(ttl), 1)


class RemoteAnswers:
    """Answers of other identity servers to recursive lookups, each kept for its own TTL."""

    def __init__(self, client: redis.asyncio.Redis, prefix: str) -> None:
        self.r = client
        self.k = RedisKeys(prefix)

    async def get(self, pairs: list[tuple[str, str]]) -> list[str | None]:
        """For (medium, address) pairs: an mxid, "" for a remembered "not found", or None when not asked lately."""
        if not pairs:
            return []
        return cast("list[str | None]", await self.r.mget([self.k.remote(m, a) for m, a in pairs]))

    async def remember(self, medium: str, address: str, mxid: str | None, ttl: int) -> None:
        await self.r.set(self.k.remote(medium, address), mxid or "", ex=ttl)
