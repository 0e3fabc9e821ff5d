"""Liveness, readiness and version (mxisd's GET /status and GET /version, and GET /_mxisd/ready)."""

from __future__ import annotations

from importlib.metadata import version as package_version

from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json

from server.container import services

bp = Blueprint("health")

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
    """GET /_mxisd/ready: 200 when every readiness check passes, else 503; each check's state in the body."""
    is_ready, checks = await services(request).readiness.check()
    return json({"ready": is_ready, "checks": checks}, status=200 if is_ready else 503)
