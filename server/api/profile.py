"""Profiles: the homeserver's, with the person's 3PIDs added (client-server API "Profiles"), and the
internal profile of an identity from the cache."""

from __future__ import annotations

import logging
from urllib.parse import quote

from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json

from server.api import access_token
from server.container import services
from server.errors import MatrixError
from server.homeserver import answer_json, forwarded_headers, relay

log = logging.getLogger(__name__)

bp = Blueprint("profile")


@bp.get("/_matrix/client/r0/profile/<user_id>", name="profile_r0")
@bp.get("/_matrix/client/v3/profile/<user_id>", name="profile_v3")
async def profile(request: Request, user_id: str) -> HTTPResponse:
    """GET /_matrix/client/v3/profile/{userId}: the homeserver's profile, with the 3PIDs we know (profile.threepids)."""
    version = request.path.split("/")[3]
    response = await services(request).homeserver.request(
        "GET", f"/_matrix/client/{version}/profile/{quote(user_id, safe='')}",
        headers=forwarded_headers(request.headers))
    body = answer_json(response)
    if response.status_code != 200 or not body or not services(request).config.profile.threepids:
        return relay(response)
    if not await _signed_in(request):
        return relay(response)  # a homeserver may show profiles to anyone; the 3PIDs only its users see
    identity = (await services(request).lookups.identities([user_id]))[0]
    if identity is not None:
        body["threepids"] = identity.threepid_objects()
    return json(body)


async def _signed_in(request: Request) -> bool:
    """Whether the request carries an access token the homeserver confirms (whoami, cached briefly)."""
    token = access_token(request)
    if token is None:
        return False
    try:
        await services(request).homeserver.whoami(token)
    except MatrixError:  # refused, or the homeserver cannot tell now (logged): no 3PIDs either way
        return False
    return True


@bp.get("/_matrix-internal/profile/v1/<user_id>")
async def internal_profile(request: Request, user_id: str) -> HTTPResponse:
    """GET /_matrix-internal/profile/v1/{userId}: display name and 3PIDs of an identity from the cache."""
    identity = (await services(request).lookups.identities([user_id]))[0]
    if identity is None:
        raise MatrixError(404, "M_NOT_FOUND", "No such user in the directory")
    return json({"user_id": identity.mxid, "display_name": identity.display_name,
                 "threepids": identity.threepid_objects()})
