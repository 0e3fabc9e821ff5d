"""Binding and unbinding 3PIDs to Matrix IDs (identity service API "Association"), v2 and v1."""

from __future__ import annotations

from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json

from indexer.normalize import query_address
from server.api import V1, V2, authenticate_v2, json_body
from server.container import services
from server.errors import MatrixError
from server.services.binding import SignedRequest

bp = Blueprint("bind")


@bp.post(V1 + "/3pid/bind", name="bind_v1")
@bp.post(V2 + "/3pid/bind", name="bind_v2")
async def bind(request: Request) -> HTTPResponse:
    """POST /_matrix/identity/v2/3pid/bind (and v1): bind a validated 3PID to a Matrix ID."""
    owner = await authenticate_v2(request)
    body = json_body(request, "bind", allow_form=True)
    return json(await services(request).binding.bind(body["sid"], body["client_secret"], body["mxid"], owner))


@bp.post(V1 + "/3pid/unbind", name="unbind_v1")
@bp.post(V2 + "/3pid/unbind", name="unbind_v2")
async def unbind(request: Request) -> HTTPResponse:
    """POST /_matrix/identity/v2/3pid/unbind (and v1): remove a binding, proven by a session or by its homeserver."""
    body = json_body(request, "unbind")
    medium = body["threepid"]["medium"]
    address = query_address(medium, body["threepid"]["address"])
    binding = services(request).binding
    authorization = request.headers.get("authorization", "")
    if "sid" in body and "client_secret" in body:
        await binding.unbind_by_session(medium, address, body["mxid"], body["sid"], body["client_secret"])
    elif authorization.startswith("X-Matrix "):
        uri = request.path + (f"?{request.query_string}" if request.query_string else "")
        signed = SignedRequest(authorization, request.method, uri, request.json)
        await binding.unbind_by_homeserver(medium, address, body["mxid"], signed)
    else:
        raise MatrixError(403, "M_FORBIDDEN", "Unbinding needs a validated session (sid, client_secret) "
                                              "or the homeserver's X-Matrix signature")
    return json({})
