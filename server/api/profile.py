"""Profiles: the homeserver's, with the person's 3PIDs added (client-server API "Profiles"), and the
internal profile of an identity from the cache."""

from __future__ import annotations

from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json

from server.api import access_token
from server.container import services
from server.homeserver import forwarded_headers, relay

bp = Blueprint("profile")


@bp.get("/_matrix/client/r0/profile/<user_id>", name="profile_r0")
@bp.get("/_matrix/client/v3/profile/<user_id>", name="profile_v3")
async def profile(request: Request, user_id: str) -> HTTPResponse:
    """GET /_matrix/client/v3/profile/{userId}: the homeserver's profile, with the 3PIDs we know (profile.threepids)."""
    response, body = await services(request).profiles.profile(
        request.path.split("/")[3], user_id, forwarded_headers(request.headers), access_token(request))
    return relay(response) if body is None else json(body)


@bp.get("/_matrix-internal/profile/v1/<user_id>")
async def internal_profile(request: Request, user_id: str) -> HTTPResponse:
    """GET /_matrix-internal/profile/v1/{userId}: display name, 3PIDs and roles of an identity from the cache."""
    return json(await services(request).profiles.internal(user_id))
