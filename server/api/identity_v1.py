"""Legacy v1 lookups (identity service r0.x "Association lookup"), unauthenticated."""

from __future__ import annotations

from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json

from server.api import json_body, query_params
from server.container import services
from server.errors import MatrixError

bp = Blueprint("identity_v1", url_prefix="/_matrix/identity/api/v1")


@bp.get("/lookup")
async def lookup(request: Request) -> HTTPResponse:
    """GET /_matrix/identity/api/v1/lookup: the signed association for one 3PID, or {}."""
    params = query_params(request)
    medium, address = params.get("medium"), params.get("address")
    if not medium or not address:
        missing = [n for n, v in (("medium", medium), ("address", address)) if not v]
        raise MatrixError(400, "M_MISSING_PARAMS", f"Missing parameters: {','.join(missing)}")
    return json(await services(request).associations.association(medium, address, request) or {})


@bp.post("/bulk_lookup")
async def bulk_lookup(request: Request) -> HTTPResponse:
    """POST /_matrix/identity/api/v1/bulk_lookup: [medium, address, mxid] for the 3PIDs that match."""
    pairs = json_body(request, "v1_bulk_lookup")["threepids"]
    return json({"threepids": await services(request).associations.bulk(pairs, request)})
