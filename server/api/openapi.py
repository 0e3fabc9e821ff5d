"""The OpenAPI document of the server's own routes (GET /_mxisd/openapi.json)."""

from __future__ import annotations

from functools import cache
from typing import Any

from sanic import Blueprint, Request, Sanic
from sanic.response import HTTPResponse, json

from server.openapi import document

bp = Blueprint("openapi")


@cache
def _document(app: Sanic[Any, Any]) -> dict[str, Any]:
    """The app's document, made on the first request (its routes are fixed by then)."""
    return document(app)


@bp.get("/_mxisd/openapi.json")
async def openapi(request: Request) -> HTTPResponse:
    """GET /_mxisd/openapi.json: the OpenAPI 3.1 document of the routes this server answers."""
    return json(_document(request.app))
