"""Authentication for the homeserver: check_credentials for the Synapse module in contrib/synapse, and
client logins with an email address or phone number rewritten to the Matrix ID (client-server API
"Login")."""

from __future__ import annotations

from typing import Any

from sanic import Blueprint, Request
from sanic.exceptions import BadRequest
from sanic.response import HTTPResponse, json

from indexer.identity import Identity
from server.api import json_body
from server.caller import client_address
from server.container import services
from server.errors import MatrixError
from server.homeserver import forwarded_headers, relay

bp = Blueprint("auth")


def _profile(identity: Identity) -> dict[str, Any]:
    return {"display_name": identity.display_name,
            "three_pids": identity.threepid_objects()}


@bp.post("/_matrix-internal/identity/v1/check_credentials")
async def check_credentials(request: Request) -> HTTPResponse:
    """POST /_matrix-internal/identity/v1/check_credentials: whether a password is the user's (Synapse module)."""
    user = json_body(request, "check_credentials")["user"]
    identity = await services(request).logins.check_credentials(user["id"], user["password"])
    if identity is None:
        # Always 200 with a profile: the provider treats any other answer as an error, and reads profile.
        return json({"auth": {"success": False, "profile": {}}})
    return json({"auth": {"success": True, "mxid": identity.mxid, "profile": _profile(identity)}})


@bp.post("/_matrix/client/r0/login", name="login_r0")
@bp.post("/_matrix/client/v3/login", name="login_v3")
async def login(request: Request) -> HTTPResponse:
    """POST /_matrix/client/v3/login: 3PID identifiers rewritten to Matrix IDs, then the homeserver's answer."""
    try:
        body = request.json
    except BadRequest:
        body = None
    if not isinstance(body, dict):
        raise MatrixError(400, "M_NOT_JSON", "The request body must be a JSON object")
    svc = services(request)
    client = client_address(request, svc.config.server.proxies_count)
    return relay(await svc.logins.login(body, client, request.path, request.headers))


@bp.get("/_matrix/client/r0/login", name="flows_r0")
@bp.get("/_matrix/client/v3/login", name="flows_v3")
async def login_flows(request: Request) -> HTTPResponse:
    """GET /_matrix/client/v3/login: the homeserver's login flows, passed through."""
    return relay(await services(request).homeserver.request(
        "GET", request.path, headers=forwarded_headers(request.headers)))
