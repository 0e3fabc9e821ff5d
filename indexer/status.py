"""What `mxisd status`, the admin API, readiness and /metrics show of the cache: each store's size,
sync state and active job, and per host (server.host_id) its follower's position and lag and its
indexer's heartbeat. One plan, run by the indexer's blocking client and the server's asyncio one."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from indexer.redis_clients import Commands, Plan
from indexer.rediskeys import RedisKeys
from indexer.settings import Config

JOB_ACTIVE = ("queued", "running")


@dataclass(frozen=True, slots=True)
class HostBounds:
    """When a host that stopped reporting is shown as stale, and when it is no longer shown (seconds)."""

    stale_after: float
    forget_after: float


def host_bounds(config: Config) -> HostBounds:
    """Stale after three missed heartbeats (as the indexer counts as down), forgotten after
    health.forget_host_after."""
    return HostBounds(3 * config.supervisor.heartbeat, config.health.forget_host_after)


def stream_id(value: str) -> tuple[int, int]:
    """A change stream entry id as (milliseconds, sequence), to compare two."""
    ms, _, seq = value.partition("-")
    return int(ms), int(seq or 0)


def job_view(job_id: str, raw: dict[str, str]) -> dict[str, Any] | None:
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


def status_plan(k: RedisKeys, stores: list[str], now: float, bounds: HostBounds) -> Plan:
    """Every store's size, sync state and active job, and every host's follower (position, lag) and
    indexer (heartbeat, last exit), each with when the host last reported and whether that makes it
    stale. Hosts silent for longer than bounds.forget_after are removed, with their keys."""
    first: Commands = []
    for store in stores:
        first += [("hgetall", k.state(store)), ("get", k.store_job(store))]
        first += [("hlen", k.records(store, bucket)) for bucket in range(k.spread(store))]
    first += [("zrange", k.hosts, 0, -1, False, True), ("xrevrange", k.changes, "+", "-", 1), ("get", k.epoch)]
    replies = yield first
    per_store = []
    at = 0
    for store in stores:
        # A store's size is the sum over its buckets.
        state, job_id, *sizes = replies[at:at + 2 + k.spread(store)]
        per_store.append((sum(sizes), state, job_id))
        at += 2 + k.spread(store)
    seen, newest, epoch = replies[-3], replies[-2], replies[-1]
    last_seen = {host: float(score) for host, score in seen if now - float(score) <= bounds.forget_after}
    forgotten = [host for host, _ in seen if host not in last_seen]
    hosts = sorted(last_seen)
    newest_id = newest[0][0] if newest else "0-0"
    pointers = [job_id for _, _, job_id in per_store]
    job_ids = [j for j in pointers if j]
    second: Commands = ([("hgetall", k.job(j)) for j in job_ids] + [("hgetall", k.follower(h)) for h in hosts]
                        + [("get", key(h)) for h in hosts for key in (k.indexer, k.indexer_exit)])
    # One key per command, so that each stays in its own hash slot on a Redis Cluster.
    for host in forgotten:
        second += [("zrem", k.hosts, host), ("delete", k.follower(host)), ("delete", k.indexer_exit(host))]
    replies = yield second
    jobs = dict(zip(job_ids, replies[:len(job_ids)]))
    reported = replies[len(job_ids):len(job_ids) + len(hosts)]
    followers = [dict(raw, host=h) for h, raw in zip(hosts, reported) if raw]
    indexer_replies = replies[len(job_ids) + len(hosts):len(job_ids) + 3 * len(hosts)]
    behind = [f for f in followers if stream_id(f.get("last_id") or "0-0") < stream_id(newest_id)]
    replies = yield [("xrange", k.changes, "(" + f.get("last_id", "0-0"), "+", 1) for f in behind]
    oldest_unapplied = {f["host"]: (r[0][0] if r else newest_id) for f, r in zip(behind, replies)}

    def seen_fields(host: str) -> dict[str, Any]:
        return {"last_seen": last_seen[host], "stale": now - last_seen[host] > bounds.stale_after}

    result: dict[str, Any] = {"stores": {}, "followers": [], "last_change_id": newest_id, "indexers": [],
                              "hosts": [{"host": h, **seen_fields(h)} for h in hosts]}
    for i, host in enumerate(hosts):
        beat, last_exit = indexer_replies[2 * i], indexer_replies[2 * i + 1]
        result["indexers"].append({"host": host, "alive": beat is not None,
                                   **(json.loads(beat) if beat else {}),
                                   "last_exit": json.loads(last_exit) if last_exit else None, **seen_fields(host)})
    for store, (count, state, job_id) in zip(stores, per_store):
        fields = {name: json.loads(value) for name, value in state.items()}
        job = job_view(job_id, jobs[job_id]) if job_id else None
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
        lag = max(0.0, now - stream_id(pending)[0] / 1000) if pending else 0.0
        result["followers"].append({
            "host": follower["host"], "last_id": follower.get("last_id"), "lag_seconds": round(lag, 3),
            "updated": float(follower["updated"]) if follower.get("updated") else None,
            "rebuilt": float(follower["rebuilt"]) if follower.get("rebuilt") else None,
            **seen_fields(follower["host"]),
        })
    return result
