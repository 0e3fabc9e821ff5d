"""Versions and ping endpoints (identity service API: "API version check" and "Status check")."""

from __future__ import annotations

from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json

bp = Blueprint("status")

# r0.x: the legacy v1 API (lookups, keys); v1.1 and later: the v2 API, unchanged in its endpoints
# since, with M_TOKEN_INCORRECT from v1.18.
SUPPORTED_VERSIONS = ["r0.1.0", "r0.2.0", "r0.2.1", "r0.3.0", *(f"v1.{minor}" for minor in range(1, 20))]


@bp.get("/_matrix/identity/versions")
async def versions(request: Request) -> HTTPResponse:
    """GET /_matrix/identity/versions: the spec versions this server supports."""
    return json({"versions": SUPPORTED_VERSIONS})


@bp.get("/_matrix/identity/v2", strict_slashes=False)
async def ping_v2(request: Request) -> HTTPResponse:
    """GET /_matrix/identity/v2: status check used for discovery."""
    return json({})


@bp.get("/_matrix/identity/api/v1", strict_slashes=False)
async def ping_v1(request: Request) -> HTTPResponse:
    """GET /_matrix/identity/api/v1: legacy status check."""
    return json({})
