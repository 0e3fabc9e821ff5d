"""3PID invites (identity service API "Invitation Storage" and "Ephemeral invitation signing"), v2 and v1,
and the short link of an invite SMS."""

from __future__ import annotations

from typing import Any

from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json, redirect

from server.api import V1, V2, authenticate_v2, json_body
from server.caller import client_address
from server.container import services
from server.errors import MatrixError
from server.services.invitations import LINK_PATH, redact
from server.storage import Invite

bp = Blueprint("invites")


@bp.post(V1 + "/store-invite", name="store_invite_v1")
@bp.post(V2 + "/store-invite", name="store_invite_v2")
async def store_invite(request: Request) -> HTTPResponse:
    """POST /_matrix/identity/v2/store-invite (and v1): store a 3PID invite and email or text the invitee."""
    owner = await authenticate_v2(request)
    body = json_body(request, "store_invite", allow_form=True)
    svc = services(request)
    client = client_address(request, svc.config.server.proxies_count)
    invite = await svc.invitations.store(body, owner, client, svc.recursion.client_allowed(request))
    return json(_stored_answer(request, invite))


def _stored_answer(request: Request, invite: Invite) -> dict[str, Any]:
    """The spec's answer for a stored invite: its token, our long-term and its ephemeral key, a display name."""
    svc = services(request)
    base = svc.config.server.public_url + request.path.rsplit("/store-invite", 1)[0]
    server_key = {"public_key": svc.keys.public_key, "key_validity_url": base + "/pubkey/isvalid"}
    return {
        "token": invite.token,
        "public_keys": [server_key, {"public_key": invite.ephemeral_public_key,
                                     "key_validity_url": base + "/pubkey/ephemeral/isvalid"}],
        "public_key": server_key["public_key"],
        "display_name": redact(invite.medium, invite.address),
    }


@bp.get(LINK_PATH + "<code:str>", name="invite_link")
async def invite_link(request: Request, code: str) -> HTTPResponse:
    """GET /i/{code}: the short link of an invite SMS, redirecting to invites.register_url."""
    # Never cached: the same code leads elsewhere once the invite has expired.
    return redirect(await services(request).invitations.link_target(code), headers={"Cache-Control": "no-store"})


@bp.get(V1 + "/pubkey/ephemeral/isvalid", name="ephemeral_isvalid_v1")
@bp.get(V2 + "/pubkey/ephemeral/isvalid", name="ephemeral_isvalid_v2")
async def ephemeral_is_valid(request: Request) -> HTTPResponse:
    """GET /_matrix/identity/v2/pubkey/ephemeral/isvalid: whether an invite's ephemeral key is still valid."""
    public_key = request.args.get("public_key")
    if public_key is None:
        raise MatrixError(400, "M_MISSING_PARAMS", "Missing parameters: public_key")
    # A "+" sent unencoded in a query string arrives as a space.
    return json({"valid": await services(request).invitations.ephemeral_key_valid(public_key.replace(" ", "+"))})


@bp.post(V1 + "/sign-ed25519", name="sign_ed25519_v1")
@bp.post(V2 + "/sign-ed25519", name="sign_ed25519_v2")
async def sign_ed25519(request: Request) -> HTTPResponse:
    """POST /_matrix/identity/v2/sign-ed25519 (and v1): sign {mxid, sender, token} with an invite's ephemeral key."""
    await authenticate_v2(request)
    body = json_body(request, "sign_ed25519")
    return json(await services(request).invitations.sign(body["token"], body["mxid"], body["private_key"]))
