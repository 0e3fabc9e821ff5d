"""User directory search from the fulltext index, merged with the homeserver's own results
(client-server API "User directory", answered here instead of by the homeserver)."""

from __future__ import annotations

from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json

from server.api import access_token, json_body
from server.container import services
from server.errors import MatrixError
from server.homeserver import relay
from server.services.user_directory import HomeserverRefused

bp = Blueprint("directory")

DEFAULT_LIMIT, MAX_LIMIT = 10, 50


@bp.post("/_matrix/client/r0/user_directory/search", name="search_r0")
@bp.post("/_matrix/client/v3/user_directory/search", name="search_v3")
async def search(request: Request) -> HTTPResponse:
    """POST /_matrix/client/v3/user_directory/search: people whose names match, best first."""
    token = access_token(request)
    if token is None:
        raise MatrixError(401, "M_MISSING_TOKEN", "An access token is required")
    body = json_body(request, "user_directory_search")
    limit = min(max(body.get("limit", DEFAULT_LIMIT), 0), MAX_LIMIT)
    term = body["search_term"].strip().removeprefix("@")
    try:
        results, limited = await services(request).user_directory.search(token, term, limit, request.path)
    except HomeserverRefused as refused:
        return relay(refused.response)
    return json({"results": results, "limited": limited})
