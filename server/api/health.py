"""Liveness, readiness and version (mxisd's GET /status and GET /version, and GET /_mxisd/ready)."""

from __future__ import annotations

import asyncio
import socket
from importlib.metadata import version as package_version
from typing import Any

import redis
import sqlalchemy
from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json

from server.api import config_of
from server.storage import BINDINGS_GENERATION

bp = Blueprint("health")

REDIS_TIMEOUT = 2.0
SQL_TIMEOUT = 2.0
VERSION = package_version("mxisd")


@bp.get("/status")
async def status(request: Request) -> HTTPResponse:
    """GET /status: liveness; this process answers."""
    return json({"status": {"health": "OK"}})


@bp.get("/version")
async def version(request: Request) -> HTTPResponse:
    """GET /version: the server's name and version."""
    return json({"server": {"name": "mxisd", "version": VERSION}})


@bp.get("/_mxisd/ready")
async def ready(request: Request) -> HTTPResponse:
    """GET /_mxisd/ready: 200 when Redis and the SQL database answer, Redis holds every binding SQL
    has and a full sync of every store completed into it (since it was last emptied or found
    restored from an older copy), this host's indexer is alive (its heartbeat is recent) and this
    host's fulltext index keeps up; else 503. Each check's state is in the body."""
    ctx = request.app.ctx
    checks: dict[str, Any] = {}
    generation = None
    try:
        generation = await asyncio.wait_for(ctx.storage.run(ctx.storage.counter, BINDINGS_GENERATION), SQL_TIMEOUT)
        checks["sql"] = {"ok": True}
    except (TimeoutError, sqlalchemy.exc.SQLAlchemyError, OSError) as exc:
        checks["sql"] = {"ok": False, "error": str(getattr(exc, "orig", None) or exc) or "no answer in time"}
    try:
        state = await asyncio.wait_for(ctx.admin.status(), REDIS_TIMEOUT)
        behind = None if generation is None else await asyncio.wait_for(ctx.binding_mirror.behind(generation),
                                                                         REDIS_TIMEOUT)
        checks["redis"] = {"ok": True}
    except (TimeoutError, redis.exceptions.RedisError, OSError) as exc:
        state = None
        checks["redis"] = {"ok": False, "error": str(exc) or "no answer in time"}
    if state is not None:
        if generation is not None:
            checks["bindings"] = {"ok": behind is None, **({"error": behind} if behind else {})}
        never_synced = {service.name for service in ctx.read_through.services}  # asked on cache misses instead
        checks["stores"] = {
            name: {"ok": s["complete"] or name in never_synced, "last_success": s["last_success"],
                   "identities": s["identities"],
                   **({} if s["complete"] or name in never_synced
                      else {"error": "no full sync has completed into this cache yet"})}
            for name, s in state["stores"].items()
        }
        host = socket.gethostname()
        indexer = next((i for i in state["indexers"] if i["host"] == host), None)
        if indexer is not None and indexer["alive"]:
            checks["indexer"] = {"ok": True, "host": host, "pid": indexer["pid"], "heartbeat": indexer["beat"]}
        else:
            last_exit = indexer and indexer["last_exit"]
            checks["indexer"] = {"ok": False, "host": host, "error": "the indexer of this host is not running" + (
                f" (it {last_exit['reason']})" if last_exit else ": no recent heartbeat")}
        mine = next((f for f in state["followers"] if f["host"] == host), None)
        limit = config_of(request).health.max_follower_lag
        checks["fulltext"] = (
            {"ok": False, "host": host, "error": "no fulltext follower has reported from this host"} if mine is None
            else {"ok": mine["lag_seconds"] <= limit, "host": host, "lag_seconds": mine["lag_seconds"],
                  "max_lag_seconds": limit}
        )
    is_ready = (state is not None and checks["sql"]["ok"] and checks["fulltext"]["ok"] and checks["bindings"]["ok"]
                and checks["indexer"]["ok"] and all(c["ok"] for c in checks["stores"].values()))
    return json({"ready": is_ready, "checks": checks}, status=200 if is_ready else 503)
