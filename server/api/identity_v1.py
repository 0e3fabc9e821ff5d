"""Legacy v1 lookups (identity service r0.x "Association lookup"), unauthenticated."""

from __future__ import annotations

from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json

from indexer.normalize import query_address
from indexer.rediskeys import BINDINGS
from server.api import json_body
from server.container import services
from server.errors import MatrixError
from server.metrics import count_lookups

bp = Blueprint("identity_v1", url_prefix="/_matrix/identity/api/v1")


@bp.get("/lookup")
async def lookup(request: Request) -> HTTPResponse:
    """GET /_matrix/identity/api/v1/lookup: the signed association for one 3PID, or {}."""
    medium, address = request.args.get("medium"), request.args.get("address")
    missing = [n for n, v in (("medium", medium), ("address", address)) if not v]
    if missing:
        raise MatrixError(400, "M_MISSING_PARAMS", f"Missing parameters: {','.join(missing)}")
    canonical = query_address(medium, address)
    pairs = [(medium, canonical)]
    sources: list[str | None] = []
    svc = services(request)
    local = await svc.read_through.fill(pairs, await svc.lookups.by_address(pairs, sources))
    [mxid] = await svc.recursion.fill(pairs, local, request)
    count_lookups([mxid], sources, local)
    if mxid is None:
        return json({})
    if sources[0] == BINDINGS:
        # The association the bind answered, not a new one: ts is when it was made.
        bound = await svc.binding.association(medium, canonical, mxid)
        if bound is not None:
            return json(bound)
    return json(svc.keys.association(medium, canonical, mxid, svc.config.lookup.association_validity * 1000))


@bp.post("/bulk_lookup")
async def bulk_lookup(request: Request) -> HTTPResponse:
    """POST /_matrix/identity/api/v1/bulk_lookup: [medium, address, mxid] for the 3PIDs that match."""
    pairs = json_body(request, "v1_bulk_lookup")["threepids"]
    svc = services(request)
    bulk_max = svc.config.lookup.bulk_max
    if len(pairs) > bulk_max:
        raise MatrixError(400, "M_TOO_LARGE", f"At most {bulk_max} 3PIDs per request")
    canonical = [(m, query_address(m, a)) for m, a in pairs]
    sources: list[str | None] = []
    local = await svc.read_through.fill(canonical, await svc.lookups.by_address(canonical, sources))
    found = await svc.recursion.fill(canonical, local, request)
    count_lookups(found, sources, local)
    return json({"threepids": [[m, a, mxid] for (m, a), mxid in zip(pairs, found) if mxid is not None]})
