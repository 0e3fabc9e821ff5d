"""v2 accounts (identity service API "Authentication"): register with an OpenID token, whoami, logout."""

from __future__ import annotations

import logging
import secrets

from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json

from indexer import logs
from indexer.normalize import InvalidAddress
from indexer.normalize import mxid as parse_mxid
from server.api import V2, access_token, authenticate, config_of, json_body
from server.errors import MatrixError
from server.federation import FederationError, split_server_name

log = logging.getLogger(__name__)

bp = Blueprint("account", url_prefix=V2 + "/account")


@bp.post("/register")
async def register(request: Request) -> HTTPResponse:
    """POST /_matrix/identity/v2/account/register: an identity-server token for an OpenID token."""
    body = json_body(request, "v2_account_register")
    server_name = body["matrix_server_name"].lower()
    try:
        split_server_name(server_name)
    except ValueError:
        raise MatrixError(400, "M_INVALID_PARAM", f"Not a valid server name: {server_name!r}") from None
    allowed = config_of(request).accounts.homeservers
    if "*" not in allowed and server_name not in allowed:
        log.info("register refused: homeserver %s is not in accounts.homeservers", server_name)
        raise MatrixError(403, "M_UNAUTHORIZED", f"Users of {server_name} cannot register with this identity server")
    try:
        sub = await request.app.ctx.federation.openid_user(server_name, body["access_token"])
    except FederationError as exc:
        logs.repeated.warning(log, "register: OpenID check with %s failed: %s", server_name, exc,
                              key=f"openid {server_name}")
        raise MatrixError(502, "M_UNKNOWN", f"Could not check the OpenID token with {server_name}") from None
    if sub is None:
        raise MatrixError(401, "M_UNAUTHORIZED", f"{server_name} does not recognise the OpenID token")
    try:
        user_id, _ = parse_mxid(sub, lowercase=False)
    except InvalidAddress:
        user_id = ""
    if not user_id or sub.partition(":")[2].lower() != server_name:
        log.warning("register refused: %s answered sub %r, not a user of its own", server_name, sub)
        raise MatrixError(403, "M_UNAUTHORIZED", f"{server_name} answered a user that is not its own")
    token = secrets.token_urlsafe(32)
    storage = request.app.ctx.storage
    await storage.run(storage.add_account, token, sub)
    log.info("registered an identity-server token for %s", sub)
    return json({"token": token, "access_token": token})


@bp.get("")
async def account(request: Request) -> HTTPResponse:
    """GET /_matrix/identity/v2/account: the Matrix ID owning the token."""
    return json({"user_id": await authenticate(request)})


@bp.post("/logout")
async def logout(request: Request) -> HTTPResponse:
    """POST /_matrix/identity/v2/account/logout: forget the token."""
    user_id = await authenticate(request, terms=False)
    storage = request.app.ctx.storage
    token = access_token(request)
    await storage.run(storage.remove_account, token)
    request.app.ctx.tokens.forget(token)
    log.info("token of %s logged out", user_id)
    return json({})
