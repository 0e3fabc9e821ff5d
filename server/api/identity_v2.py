"""v2 hashed lookups (identity service API "Association lookup"), behind an identity-server token."""

from __future__ import annotations

from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json

from indexer.normalize import query_address
from server.api import authenticate, json_body
from server.container import services
from server.errors import MatrixError
from server.metrics import count_lookups

bp = Blueprint("identity_v2", url_prefix="/_matrix/identity/v2")

ALGORITHMS = ["none", "sha256"]


async def _pepper(request: Request) -> str:
    pepper = await services(request).lookups.pepper()
    if not pepper:
        raise MatrixError(503, "M_UNKNOWN", "The lookup cache is not ready yet")
    return pepper


@bp.get("/hash_details")
async def hash_details(request: Request) -> HTTPResponse:
    """GET /_matrix/identity/v2/hash_details: the current pepper and the algorithms offered."""
    await authenticate(request)
    return json({"lookup_pepper": await _pepper(request), "algorithms": ALGORITHMS})


@bp.post("/lookup")
async def lookup(request: Request) -> HTTPResponse:
    """POST /_matrix/identity/v2/lookup: mxids for hashed or plain "address medium" strings."""
    await authenticate(request)
    body = json_body(request, "v2_lookup")
    algorithm, addresses = body["algorithm"], body["addresses"]
    svc = services(request)
    lookups = svc.lookups
    bulk_max = svc.config.lookup.bulk_max
    found: list[str | None] = []
    sources: list[str | None] = []
    if algorithm == "sha256" and len(addresses) <= bulk_max:
        pepper, found = await lookups.by_hash(addresses, sources)  # the pepper comes in the same round trip
        if not pepper:
            raise MatrixError(503, "M_UNKNOWN", "The lookup cache is not ready yet")
    else:
        pepper = await _pepper(request)
    local = found  # sha256 lookups never recurse: a hash cannot be asked elsewhere
    if body["pepper"] != pepper:
        raise MatrixError(400, "M_INVALID_PEPPER", "Unknown or invalid pepper: call hash_details again",
                          algorithm="sha256", lookup_pepper=pepper)
    if algorithm not in ALGORITHMS:
        raise MatrixError(400, "M_INVALID_PARAM", f"Unsupported algorithm {algorithm!r}; use one of {ALGORITHMS}")
    if len(addresses) > bulk_max:
        raise MatrixError(400, "M_TOO_LARGE", f"At most {bulk_max} addresses per request")
    if algorithm == "none":
        pairs = []
        for item in addresses:
            address, _, medium = item.rpartition(" ")
            if not address or not medium:
                raise MatrixError(400, "M_INVALID_PARAM", f'Expected "address medium", got {item!r}')
            pairs.append((medium, query_address(medium, address)))
        local = await svc.read_through.fill(pairs, await lookups.by_address(pairs, sources))
        found = await svc.recursion.fill(pairs, local, request)
    count_lookups(found, sources, local)
    return json({"mappings": {a: mxid for a, mxid in zip(addresses, found) if mxid is not None}})
