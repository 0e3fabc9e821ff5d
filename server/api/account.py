"""v2 accounts (identity service API "Authentication"): register with an OpenID token, whoami, logout."""

from __future__ import annotations

from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json

from server.api import V2, authenticate, identity_token, json_body
from server.container import services

bp = Blueprint("account", url_prefix=V2 + "/account")


@bp.post("/register")
async def register(request: Request) -> HTTPResponse:
    """POST /_matrix/identity/v2/account/register: an identity-server token for an OpenID token."""
    body = json_body(request, "v2_account_register")
    token = await services(request).accounts.register(body["matrix_server_name"], body["access_token"])
    return json({"token": token, "access_token": token})


@bp.get("")
async def account(request: Request) -> HTTPResponse:
    """GET /_matrix/identity/v2/account: the Matrix ID owning the token."""
    return json({"user_id": await authenticate(request)})


@bp.post("/logout")
async def logout(request: Request) -> HTTPResponse:
    """POST /_matrix/identity/v2/account/logout: forget the token."""
    await services(request).accounts.logout(identity_token(request))
    return json({})
