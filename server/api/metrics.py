"""Prometheus scrape endpoint (GET /metrics), limited to metrics.allow."""

from __future__ import annotations

import asyncio

import redis
from prometheus_client import CONTENT_TYPE_LATEST
from sanic import Blueprint, Request
from sanic.response import HTTPResponse, raw

from server.api import require_client_in
from server.container import services
from server.metrics import exposition
from server.services.readiness import REDIS_TIMEOUT

bp = Blueprint("metrics")


@bp.get("/metrics")
async def metrics(request: Request) -> HTTPResponse:
    """GET /metrics: this host's processes' metrics and the cache's gauges, in Prometheus text format."""
    require_client_in(request, services(request).config.metrics.allow)
    try:
        status = await asyncio.wait_for(services(request).admin.status(), REDIS_TIMEOUT)
    except (TimeoutError, redis.exceptions.RedisError, OSError):
        status = None
    body = await asyncio.get_running_loop().run_in_executor(None, exposition, status)
    return raw(body, content_type=CONTENT_TYPE_LATEST)
