"""Authentication for the homeserver: check_credentials for the Synapse module in contrib/synapse, and
client logins with an email address or phone number rewritten to the Matrix ID (client-server API
"Login")."""

from __future__ import annotations

import logging
from typing import Any

from sanic import Blueprint, Request
from sanic.exceptions import BadRequest
from sanic.response import HTTPResponse, json

from indexer import logs
from indexer.identity import Identity
from indexer.stores import StoreUnavailable
from server.api import json_body
from server.caller import client_address
from server.credentials import Limited
from server.errors import MatrixError
from server.homeserver import forwarded_headers, relay

log = logging.getLogger(__name__)

bp = Blueprint("auth")


def _profile(identity: Identity) -> dict[str, Any]:
    return {"display_name": identity.display_name,
            "three_pids": identity.threepid_objects()}


@bp.post("/_matrix-internal/identity/v1/check_credentials")
async def check_credentials(request: Request) -> HTTPResponse:
    """POST /_matrix-internal/identity/v1/check_credentials: whether a password is the user's (Synapse module)."""
    user = json_body(request, "check_credentials")["user"]
    try:
        # Only the homeserver calls here: its address says nothing about who is logging in.
        identity = await request.app.ctx.credentials.authenticate(user["id"], user["password"], None)
    except Limited:
        identity = None
    except StoreUnavailable:
        # Not "wrong password": the homeserver fails this login with an error, and the user may retry.
        raise MatrixError(503, "M_UNKNOWN", "The password could not be checked: the user directory does not "
                          "answer. Try again later.") from None
    if identity is None:
        # Always 200 with a profile: the provider treats any other answer as an error, and reads profile.
        return json({"auth": {"success": False, "profile": {}}})
    log.info("check_credentials: %s authenticated as %s", logs.untrusted(user["id"]), identity.mxid)
    # A login proves who owns these 3PIDs: invites waiting for them go to the user's homeserver.
    await request.app.ctx.invites.addresses_known(list(identity.threepids), identity.mxid)
    return json({"auth": {"success": True, "mxid": identity.mxid, "profile": _profile(identity)}})


async def _rewrite(request: Request, body: dict[str, Any]) -> str | None:
    """Replace a third-party identifier with the Matrix ID the cache holds for it; the name the
    login is counted under (None when the body names nobody)."""
    credentials = request.app.ctx.credentials
    identifier = body.get("identifier")
    if not isinstance(identifier, dict):
        # Before identifiers existed: top-level "user", or "medium" and "address".
        identifier = {"type": "m.id.thirdparty", "medium": body.get("medium"), "address": body.get("address")} \
            if "address" in body else {"type": "m.id.user", "user": body.get("user")}
    kind = identifier.get("type")
    mxid: str | None = None
    name: str | None = None
    if kind == "m.id.thirdparty" and isinstance(identifier.get("medium"), str) \
            and isinstance(identifier.get("address"), str):
        name = identifier["address"]
        mxid = await credentials.mxid_of_threepid(identifier["medium"], identifier["address"])
    elif kind == "m.id.phone" and isinstance(identifier.get("phone"), str):
        name = identifier["phone"]
        country = identifier.get("country") if isinstance(identifier.get("country"), str) else None
        mxid = await credentials.mxid_of_threepid("msisdn", identifier["phone"], country and country.upper())
    elif kind == "m.id.user" and isinstance(identifier.get("user"), str):
        name = identifier["user"]
    if mxid is not None:
        log.info("login: %s identifier rewritten to %s", logs.untrusted(kind), mxid)
        body.pop("medium", None)
        body.pop("address", None)
        body.pop("user", None)
        body["identifier"] = {"type": "m.id.user", "user": mxid}
        return mxid
    if name is None:
        return None
    identity: Identity | None = await credentials.resolve(name)
    return identity.mxid if identity is not None else name.strip().lower()


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
    credentials = request.app.ctx.credentials
    ip = client_address(request)
    password = body.get("type") == "m.login.password"
    user = await _rewrite(request, body) if password else None
    if password:
        try:
            # The user's failures are counted by check_credentials, which the homeserver calls.
            await credentials.check_limits(user)
            await credentials.claim(None, ip)
        except Limited as limited:
            raise MatrixError(429, "M_LIMIT_EXCEEDED", "Too many failed logins, try again later",
                              retry_after_ms=limited.retry_after_ms) from None
    failed = False  # a homeserver that cannot answer says nothing against the password
    try:
        response = await request.app.ctx.homeserver.request(
            "POST", request.path, json=body, headers=forwarded_headers(request.headers))
        failed = response.status_code == 403
    finally:
        if password:
            await credentials.settle(None, ip, not failed)
    return relay(response)


@bp.get("/_matrix/client/r0/login", name="flows_r0")
@bp.get("/_matrix/client/v3/login", name="flows_v3")
async def login_flows(request: Request) -> HTTPResponse:
    """GET /_matrix/client/v3/login: the homeserver's login flows, passed through."""
    return relay(await request.app.ctx.homeserver.request(
        "GET", request.path, headers=forwarded_headers(request.headers)))
