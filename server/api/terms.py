"""Terms of service (identity service API "Terms of service")."""

from __future__ import annotations

from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json

from server.api import V2, authenticate, json_body
from server.container import services

bp = Blueprint("terms", url_prefix=V2 + "/terms")


@bp.get("")
async def get_terms(request: Request) -> HTTPResponse:
    """GET /_matrix/identity/v2/terms: the policies users must accept."""
    return json({"policies": services(request).terms.policies()})


@bp.post("")
async def accept_terms(request: Request) -> HTTPResponse:
    """POST /_matrix/identity/v2/terms: add policy URLs to those the user has accepted."""
    user_id = await authenticate(request, terms=False)
    urls = json_body(request, "v2_terms")["user_accepts"]
    await services(request).terms.accept(user_id, [urls] if isinstance(urls, str) else urls)
    return json({})
