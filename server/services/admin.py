"""The admin API's and the readiness check's access to the cache: status, sync jobs requested and
watched, what the cache holds for an address or an mxid, fulltext rebuilds."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Sequence
from typing import Any, cast

import redis.asyncio

from indexer import normalize
from indexer.cache import JOB_DONE_TTL, JOB_QUEUED_TTL
from indexer.redis_clients import Plan, run_plan_async
from indexer.rediskeys import RedisKeys, plain_key
from indexer.settings import StoreConfig
from indexer.status import HostBounds, job_view, status_plan
from server.errors import MatrixError

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

# Atomically: fail a job that is still queued, take it off the queue and free its store.
_ABANDON = """
if redis.call('HGET', KEYS[1], 'state') ~= 'queued' then return 0 end
redis.call('LREM', KEYS[2], 0, ARGV[1])
redis.call('HSET', KEYS[1], 'state', 'done', 'outcome', 'failed', 'error', ARGV[2], 'ended', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
if redis.call('GET', KEYS[3]) == ARGV[1] then redis.call('DEL', KEYS[3]) end
return 1
"""


def _inspect_plan(k: RedisKeys, stores: list[str], medium: str | None, address: str) -> Plan:
    """What each store's cache holds for a 3PID (medium, canonical address) or, with medium None, an mxid."""
    if medium is None:
        mxids = [address] * len(stores)
    else:
        field = plain_key(address, medium)
        mxids = yield [("hget", k.threepids(s, k.bucket(s, field)), field) for s in stores]
    found = [(s, m) for s, m in zip(stores, mxids) if m]
    store_ids = yield [("hget", k.mxids(s, k.bucket(s, m)), m) for s, m in found]
    held = [(s, m, i) for (s, m), i in zip(found, store_ids)]
    records = yield [("hget", k.records(s, k.bucket(s, i)), i) for s, _, i in held if i]
    records_by = iter(records)
    matches = []
    for store, mxid, store_id in held:
        record = next(records_by) if store_id else None
        matches.append({"store": store, "mxid": mxid, "store_id": store_id,
                        "identity": json.loads(record) if record else None})
    return matches


def _no_job() -> MatrixError:
    return MatrixError(404, "M_NOT_FOUND", "No such job (finished jobs are kept for a day)")


class Admin:
    """Non-blocking reads and requests for the admin API and the readiness check."""

    def __init__(self, client: redis.asyncio.Redis, prefix: str, stores: Sequence[StoreConfig],
                 job_start_timeout: float, bounds: HostBounds, spread: int = 1) -> None:
        """spread: the number of buckets of the store hashes (redis.cluster.buckets, or 1)."""
        self.r = client
        self.bounds = bounds
        self.k = RedisKeys(prefix, spread)
        self.kinds = {s.name: s.kind for s in stores}
        self.stores = list(self.kinds)
        self.job_start_timeout = job_start_timeout
        self._enqueue = client.register_script(_ENQUEUE)
        self._abandon = client.register_script(_ABANDON)

    async def status(self) -> dict[str, Any]:
        """{"stores": {name: {identities, last_full, last_incremental, last_success, next_full,
        next_incremental, job}}, "followers": [{host, last_id, lag_seconds, last_seen, stale, ...}],
        "indexers": [{host, alive, last_exit, last_seen, stale, ...}], "hosts": [{host, last_seen, stale}],
        "last_change_id"}: one entry per host id that reported within health.forget_host_after."""
        return cast("dict[str, Any]",
                    await run_plan_async(self.r, status_plan(self.k, self.stores, time.time(), self.bounds)))

    async def overview(self) -> dict[str, Any]:
        """{"stores": [{name, kind, and what status() tells of it}, in config order], "followers",
        "last_change_id", "indexers", "hosts"}: the admin API's view of the stores and of every host.
        Raises nothing of its own."""
        status = await self.status()
        listed = [{"name": name, "kind": kind, **status["stores"][name]} for name, kind in self.kinds.items()]
        return {"stores": listed, "followers": status["followers"], "last_change_id": status["last_change_id"],
                "indexers": status["indexers"], "hosts": status["hosts"]}

    async def start_job(self, store: str, full: bool, request_id: str | None) -> tuple[dict[str, Any], bool]:
        """The store's queued or running job, or a new queued one; (job, whether it is new).

        Raises MatrixError: 404 M_NOT_FOUND when no store has that name."""
        if store not in self.kinds:
            raise MatrixError(404, "M_NOT_FOUND", f"No store named {store!r}")
        new_id = secrets.token_hex(8)
        fields = {"id": new_id, "store": store, "full": "1" if full else "0", "state": "queued",
                  "created": str(time.time()), "read": "0", "applied": "0", "request_id": request_id or ""}
        flat = [x for pair in fields.items() for x in pair]
        job_id, created = await self._enqueue(
            keys=[self.k.store_job(store), self.k.jobs], args=[self.k.job_prefix, new_id, JOB_QUEUED_TTL, *flat],
        )
        return await self.job(job_id), bool(created)

    async def job(self, job_id: str) -> dict[str, Any]:
        """A job as the admin API shows it; a job queued for longer than job_start_timeout is failed
        first, since no live indexer took it (one that is down would otherwise leave it waiting).

        Raises MatrixError: 404 M_NOT_FOUND for a job that does not exist (or no longer does)."""
        view = job_view(job_id, cast("dict[str, str]", await self.r.hgetall(self.k.job(job_id)))) \
            if job_id.isalnum() else None
        if view is None:
            raise _no_job()
        if view["state"] != "queued" or time.time() - (view["created"] or 0) < self.job_start_timeout:
            return view
        error = (f"no indexer took this job within {self.job_start_timeout:g} s: the indexer is not running "
                 "(see `mxisd status` and the server's log)")
        await self._abandon(keys=[self.k.job(job_id), self.k.jobs, self.k.store_job(view["store"])],
                            args=[job_id, error, time.time(), JOB_DONE_TTL])
        view = job_view(job_id, cast("dict[str, str]", await self.r.hgetall(self.k.job(job_id))))
        if view is None:
            raise _no_job()
        return view

    async def inspect(self, q: str) -> dict[str, Any]:
        """{"query", "lookup_answer", "matches"}: what the cache holds for q, a 3PID or an mxid, store
        by store, and the mxid a lookup of the 3PID answers (the first store in config order that has it).

        Raises MatrixError: 400 M_INVALID_PARAM for an mxid that is not one."""
        if q.startswith("@"):
            try:
                medium, address = None, normalize.mxid(q)[0]
            except normalize.InvalidAddress as exc:
                raise MatrixError(400, "M_INVALID_PARAM", str(exc)) from None
        else:
            # Read as a lookup would read it: a phone number in international form.
            medium = "email" if "@" in q else "msisdn"
            address = normalize.query_address(medium, q)
        matches = cast("list[dict[str, Any]]",
                       await run_plan_async(self.r, _inspect_plan(self.k, self.stores, medium, address)))
        query = {"mxid": address} if medium is None else {"medium": medium, "address": address}
        return {"query": query, "lookup_answer": matches[0]["mxid"] if matches and medium else None,
                "matches": matches}

    async def request_rebuild(self) -> int:
        """Ask every host's follower to rebuild its fulltext index from the cache."""
        return int(await self.r.incr(self.k.rebuild))
