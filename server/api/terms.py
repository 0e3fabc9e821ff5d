"""Terms of service (identity service API "Terms of service")."""

from __future__ import annotations

from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json

from server.api import V2, authenticate, config_of, json_body
from server.errors import MatrixError

bp = Blueprint("terms", url_prefix=V2 + "/terms")


@bp.get("")
async def get_terms(request: Request) -> HTTPResponse:
    """GET /_matrix/identity/v2/terms: the policies users must accept."""
    return json({"policies": config_of(request).terms.policies})


@bp.post("")
async def accept_terms(request: Request) -> HTTPResponse:
    """POST /_matrix/identity/v2/terms: add policy URLs to those the user has accepted."""
    user_id = await authenticate(request, terms=False)
    urls = json_body(request, "v2_terms")["user_accepts"]
    if isinstance(urls, str):
        urls = [urls]
    known = {lang["url"] for policy in config_of(request).terms.policies.values()
             for lang in policy.values() if isinstance(lang, dict)}
    unknown = [u for u in urls if u not in known]
    if unknown:
        raise MatrixError(400, "M_INVALID_PARAM", f"Unrecognised policy URLs: {', '.join(unknown)}")
    storage = request.app.ctx.storage
    await storage.run(storage.accept_terms, user_id, urls)
    return json({})
