"""The homeserver requests the reverse proxy sends here so that the organisation's policies apply
(client-server API "Registration" requestToken, "Room membership" invite and createRoom's
invite_3pid): checked, then passed on to the homeserver with its answer relayed."""

from __future__ import annotations

from typing import Any

from sanic import Blueprint, Request
from sanic.exceptions import BadRequest
from sanic.response import HTTPResponse

from server.api import access_token, json_body
from server.caller import client_address
from server.container import services
from server.errors import MatrixError
from server.homeserver import relay

bp = Blueprint("policies")


def _json_object(request: Request) -> dict[str, Any]:
    """The request's JSON object body, as the homeserver would parse it: 400 M_NOT_JSON otherwise."""
    try:
        body: Any = request.json
    except BadRequest:
        body = None
    if not isinstance(body, dict):
        raise MatrixError(400, "M_NOT_JSON", "The request body must be a JSON object")
    return body


@bp.post("/_matrix/client/r0/register/email/requestToken", name="register_email_token_r0")
@bp.post("/_matrix/client/v3/register/email/requestToken", name="register_email_token_v3")
async def register_email_token(request: Request) -> HTTPResponse:
    """POST /_matrix/client/v3/register/email/requestToken: registration.policy, then the homeserver's answer."""
    body = json_body(request, "register_email_token")
    svc = services(request)
    return relay(await svc.registration.request_token(
        "email", body, request.body, request.path, request.headers,
        client_address(request, svc.config.server.proxies_count)))


@bp.post("/_matrix/client/r0/register/msisdn/requestToken", name="register_msisdn_token_r0")
@bp.post("/_matrix/client/v3/register/msisdn/requestToken", name="register_msisdn_token_v3")
async def register_msisdn_token(request: Request) -> HTTPResponse:
    """POST /_matrix/client/v3/register/msisdn/requestToken: registration.policy, then the homeserver's answer."""
    body = json_body(request, "register_msisdn_token")
    svc = services(request)
    return relay(await svc.registration.request_token(
        "msisdn", body, request.body, request.path, request.headers,
        client_address(request, svc.config.server.proxies_count)))


@bp.post("/_matrix/client/r0/rooms/<room_id>/invite", name="room_invite_r0")
@bp.post("/_matrix/client/v3/rooms/<room_id>/invite", name="room_invite_v3")
async def room_invite(request: Request, room_id: str) -> HTTPResponse:
    """POST /_matrix/client/v3/rooms/{roomId}/invite: invites.policy for 3PID invites, then the homeserver's answer."""
    svc = services(request)
    return relay(await svc.invite_policy.invite(
        _json_object(request), request.body, access_token(request), request.path, request.query_string,
        request.headers, client_address(request, svc.config.server.proxies_count)))


@bp.post("/_matrix/client/r0/createRoom", name="create_room_r0")
@bp.post("/_matrix/client/v3/createRoom", name="create_room_v3")
async def create_room(request: Request) -> HTTPResponse:
    """POST /_matrix/client/v3/createRoom: invites.policy for its invite_3pid, then the homeserver's answer."""
    svc = services(request)
    return relay(await svc.invite_policy.create_room(
        _json_object(request), request.body, access_token(request), request.path, request.query_string,
        request.headers, client_address(request, svc.config.server.proxies_count)))
