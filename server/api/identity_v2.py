"""v2 hashed lookups (identity service API "Association lookup"), behind an identity-server token."""

from __future__ import annotations

from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json, raw

from server.api import authenticate, json_body
from server.container import services

bp = Blueprint("identity_v2", url_prefix="/_matrix/identity/v2")


@bp.get("/hash_details")
async def hash_details(request: Request) -> HTTPResponse:
    """GET /_matrix/identity/v2/hash_details: the current pepper and the algorithms offered."""
    await authenticate(request)
    return raw(await services(request).associations.hash_details(), content_type="application/json")


@bp.post("/lookup")
async def lookup(request: Request) -> HTTPResponse:
    """POST /_matrix/identity/v2/lookup: mxids for hashed or plain "address medium" strings."""
    requester = await authenticate(request)
    body = json_body(request, "v2_lookup")
    mappings = await services(request).associations.hashed(body["algorithm"], body["addresses"], body["pepper"],
                                                           request, requester)
    return json({"mappings": mappings})
