"""Readiness: whether this host's server can answer correctly now (GET /_mxisd/ready), check by check."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import redis
import sqlalchemy

from indexer.settings import Config
from server.bindings import BindingMirror
from server.read_through import ReadThrough
from server.services.admin import Admin
from server.services.directory_search import DirectorySearch
from server.storage import BINDINGS_GENERATION, Storage

REDIS_TIMEOUT = 2.0
SQL_TIMEOUT = 2.0
# How long a readiness check waits for this worker's first opening of the fulltext index: a worker
# started before the index existed begins opening it at its first check, and would otherwise answer
# 503 where the host's other workers answer 200 (an index of 100,000 people opens in about 1.5 s).
OPEN_TIMEOUT = 3.0


@dataclass(frozen=True)
class Readiness:
    """The checks of SQL, Redis, the bindings mirror, the stores' syncs, this host's indexer and its
    fulltext follower, each bounded by a timeout, and of this worker's open fulltext index."""

    config: Config
    storage: Storage
    admin: Admin
    binding_mirror: BindingMirror
    read_through: ReadThrough
    directory: DirectorySearch

    async def check(self) -> tuple[bool, dict[str, Any]]:
        """Whether the server is ready: Redis and the SQL database answer, Redis holds every binding
        SQL has and a full sync of every store completed into it (since it was last emptied or found
        restored from an older copy), this host's indexer is alive (its heartbeat is recent) with its
        fulltext follower's process, and this host's fulltext index keeps up and this worker has it
        open for searches (the first search would otherwise wait for its terms to be read: a second
        and more at 100,000 people); and each check's state ({"ok", and "error" or details})."""
        checks: dict[str, Any] = {}
        generation = None
        try:
            generation = await asyncio.wait_for(self.storage.run(self.storage.counter, BINDINGS_GENERATION),
                                                SQL_TIMEOUT)
            checks["sql"] = {"ok": True}
        except (TimeoutError, sqlalchemy.exc.SQLAlchemyError, OSError) as exc:
            checks["sql"] = {"ok": False, "error": str(getattr(exc, "orig", None) or exc) or "no answer in time"}
        try:
            state = await asyncio.wait_for(self.admin.status(), REDIS_TIMEOUT)
            behind = None if generation is None else await asyncio.wait_for(self.binding_mirror.behind(generation),
                                                                             REDIS_TIMEOUT)
            checks["redis"] = {"ok": True}
        except (TimeoutError, redis.exceptions.RedisError, OSError) as exc:
            state = None
            checks["redis"] = {"ok": False, "error": str(exc) or "no answer in time"}
        if state is not None:
            if generation is not None:
                checks["bindings"] = {"ok": behind is None, **({"error": behind} if behind else {})}
            never_synced = {service.name for service in self.read_through.services}  # asked on cache misses instead
            checks["stores"] = {
                name: {"ok": s["complete"] or name in never_synced, "last_success": s["last_success"],
                       "identities": s["identities"],
                       **({} if s["complete"] or name in never_synced
                          else {"error": "no full sync has completed into this cache yet"})}
                for name, s in state["stores"].items()
            }
            host = self.config.server.host_id
            indexer = next((i for i in state["indexers"] if i["host"] == host), None)
            if indexer is not None and indexer["alive"]:
                # The indexer starts a dead follower again at each beat: none running means it could not.
                following = indexer.get("follower_pid") is not None
                checks["indexer"] = {"ok": following, "host": host, "pid": indexer["pid"], "heartbeat": indexer["beat"],
                                     "follower_pid": indexer.get("follower_pid"),
                                     "follower_restarts": indexer.get("follower_restarts", 0),
                                     **({} if following else {"error": "the fulltext follower of this host's indexer "
                                                                       "could not be started"})}
            else:
                last_exit = indexer and indexer["last_exit"]
                checks["indexer"] = {"ok": False, "host": host, "error": "the indexer of this host is not running" + (
                    f" (it {last_exit['reason']})" if last_exit else ": no recent heartbeat")}
            mine = next((f for f in state["followers"] if f["host"] == host), None)
            limit = self.config.health.max_follower_lag
            # A thread only for the wait, which a worker makes once, opening its first index.
            opened = self.directory.ready() or await asyncio.to_thread(self.directory.ready, OPEN_TIMEOUT)
            checks["fulltext"] = (
                {"ok": False, "host": host, "error": "no fulltext follower has reported from this host"} if mine is None
                else {"ok": mine["lag_seconds"] <= limit and opened, "host": host, "lag_seconds": mine["lag_seconds"],
                      "max_lag_seconds": limit, "opened": opened,
                      **({} if opened else {"error": "the index is being opened for searches (its terms read)"})}
            )
        is_ready = (state is not None and checks["sql"]["ok"] and checks["fulltext"]["ok"] and checks["bindings"]["ok"]
                    and checks["indexer"]["ok"] and all(c["ok"] for c in checks["stores"].values()))
        return is_ready, checks
