"""The OpenAPI document of the server's own routes (GET /_mxisd/openapi.json)."""

from __future__ import annotations

from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json

from server.openapi import document

bp = Blueprint("openapi")


@bp.get("/_mxisd/openapi.json")
async def openapi(request: Request) -> HTTPResponse:
    """GET /_mxisd/openapi.json: the OpenAPI 3.1 document of the routes this server answers."""
    if getattr(request.app.ctx, "openapi", None) is None:
        request.app.ctx.openapi = document(request.app)
    return json(request.app.ctx.openapi)
