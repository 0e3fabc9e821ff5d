"""Public key endpoints, on the v2 and the legacy v1 paths ("Key management")."""

from __future__ import annotations

from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json

from server.errors import MatrixError

bp = Blueprint("pubkey")
PREFIXES = ("/_matrix/identity/v2", "/_matrix/identity/api/v1")


async def get_key(request: Request, key_id: str) -> HTTPResponse:
    """GET /pubkey/{keyId}: the public part of a long-term key."""
    if key_id != request.app.ctx.keys.key_id:
        raise MatrixError(404, "M_NOT_FOUND", "The public key was not found")
    return json({"public_key": request.app.ctx.keys.public_key})


async def is_valid(request: Request) -> HTTPResponse:
    """GET /pubkey/isvalid: whether a public key is our current long-term key."""
    public_key = request.args.get("public_key")
    if public_key is None:
        raise MatrixError(400, "M_MISSING_PARAMS", "Missing parameters: public_key")
    # A "+" sent unencoded in a query string arrives as a space.
    candidate = public_key.replace(" ", "+").rstrip("=")
    return json({"valid": candidate == request.app.ctx.keys.public_key})


for prefix in PREFIXES:
    name = prefix.rsplit("/", 1)[-1]
    bp.add_route(is_valid, f"{prefix}/pubkey/isvalid", methods=["GET"], name=f"isvalid_{name}")
    bp.add_route(get_key, f"{prefix}/pubkey/<key_id>", methods=["GET"], name=f"key_{name}")
