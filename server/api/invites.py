"""3PID invites (identity service API "Invitation Storage" and "Ephemeral invitation signing"), v2 and v1."""

from __future__ import annotations

import logging
import re
import secrets
from typing import Any
from urllib.parse import quote

from nacl.exceptions import CryptoError
from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json
from signedjson.key import decode_signing_key_base64, encode_verify_key_base64, generate_signing_key, get_verify_key
from signedjson.sign import sign_json
from unpaddedbase64 import encode_base64

from indexer import logs
from indexer.normalize import InvalidAddress
from indexer.normalize import email as canonical_email
from indexer.settings import RequestLimitConfig
from server.api import V1, V2, authenticate_v2, config_of, json_body
from server.caller import client_address
from server.errors import MatrixError
from server.notify import AddressRefused, SendError
from server.storage import Invite, now_ms

log = logging.getLogger(__name__)

bp = Blueprint("invites")

# The request fields the spec's store-invite defines for the message; each fills %FIELD_NAME%.
# Nothing else a request sends reaches the message: From, To, the subject and the rest of the
# template come from the config.
TEMPLATE_FIELDS = ("room_alias", "room_avatar_url", "room_join_rules", "room_name", "room_type",
                   "sender_avatar_url", "sender_display_name")
MAX_FIELD_LENGTH = 200  # characters of a request field in a message; more is cut
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")


def redact(address: str) -> str:
    """An email address shown to the room before the invitee joins: "ali...@cor..."."""
    local, _, domain = address.partition("@")

    def part(text: str) -> str:
        return text[:3] + "..." if len(text) > 3 else text[:1] + "..."

    return f"{part(local)}@{part(domain)}"


def clean(value: Any) -> str:
    """A request field as it may appear in a message: one line of printable text, length-limited."""
    if not isinstance(value, str):
        return ""
    text = _CONTROL.sub(" ", value).strip()
    return text if len(text) <= MAX_FIELD_LENGTH else text[:MAX_FIELD_LENGTH - 1] + "…"


def template_values(body: dict[str, Any], register_url: str) -> dict[str, str]:
    """mxisd's invite placeholders, and the spec's optional fields as %FIELD_NAME%."""
    values = {field.upper(): clean(body.get(field)) for field in TEMPLATE_FIELDS}
    sender, room_id, address = clean(body["sender"]), clean(body["room_id"]), body["address"]
    sender_name, room_name = values["SENDER_DISPLAY_NAME"], values["ROOM_NAME"]
    values.update({
        "SENDER_ID": sender,
        "SENDER_NAME": sender_name,
        "SENDER_NAME_OR_ID": sender_name or sender,
        "INVITE_MEDIUM": "email",
        "INVITE_MEDIUM_URL_ENCODED": "email",
        "INVITE_ADDRESS": address,
        "INVITE_ADDRESS_URL_ENCODED": quote(address, safe=""),
        "ROOM_ID": room_id,
        "ROOM_NAME_OR_ID": room_name or values["ROOM_ALIAS"] or room_id,
        "REGISTER_URL": register_url,
    })
    return values


async def _rate_limit(request: Request, sender: str, address: str) -> None:
    limits = config_of(request).invites.rate_limit
    for kind, key in (("per_sender", sender), ("per_ip", client_address(request)), ("per_address", address)):
        limit: RequestLimitConfig = getattr(limits, kind)
        wait_ms = await request.app.ctx.rate_limits.hit(f"store-invite:{kind}", key, limit.requests, limit.window)
        if wait_ms is not None:
            log.info("store-invite rate limited (%s) for %s", kind, logs.untrusted(key))
            raise MatrixError(429, "M_LIMIT_EXCEEDED", "Too many invites; try again later", retry_after_ms=wait_ms)


@bp.post(V1 + "/store-invite", name="store_invite_v1")
@bp.post(V2 + "/store-invite", name="store_invite_v2")
async def store_invite(request: Request) -> HTTPResponse:
    """POST /_matrix/identity/v2/store-invite (and v1): store a 3PID invite and email the invitee, or,
    for an address the homeserver's lookup missed but we know, deliver it to the Matrix ID by onbind."""
    owner = await authenticate_v2(request)
    body = json_body(request, "store_invite", allow_form=True)
    if owner is not None and body["sender"] != owner:
        raise MatrixError(403, "M_UNAUTHORIZED", "A token can only store invites sent by its own Matrix ID")
    if body["medium"] != "email":
        raise MatrixError(400, "M_UNRECOGNIZED", "Only email invites are supported")
    try:
        address = canonical_email(body["address"])
    except InvalidAddress:
        raise MatrixError(400, "M_INVALID_EMAIL", "Not a valid email address") from None
    await _rate_limit(request, body["sender"], address)
    pair = [("email", address)]
    synced = await request.app.ctx.lookups.by_address(pair)
    if synced[0] is not None and body["address"] == address:
        # The homeserver's own (hashed) lookup of this address found it: it should have invited the Matrix ID.
        raise MatrixError(400, "M_THREEPID_IN_USE", "This email address is already bound to a Matrix ID",
                          mxid=synced[0])
    # Known only under another spelling, or only to a read-through store or another identity server,
    # none of which a hashed lookup reaches: the homeserver missed it, and refusing would fail the invite.
    known = await request.app.ctx.read_through.fill(pair, synced)
    [mxid] = await request.app.ctx.recursion.fill(pair, known, request)

    ephemeral = generate_signing_key("0")
    ephemeral_public = encode_verify_key_base64(get_verify_key(ephemeral))
    invite = Invite(token=secrets.token_urlsafe(48), medium="email", address=address, room_id=body["room_id"],
                    sender=body["sender"], ephemeral_public_key=ephemeral_public,
                    properties={k: body[k] for k in TEMPLATE_FIELDS if isinstance(body.get(k), str)},
                    created_at=now_ms(), settled_at=None, known_mxid=mxid)
    storage = request.app.ctx.storage
    if mxid is not None:
        await storage.run(storage.add_invite, invite)
        log.info("stored invite from %s to room %s for email %s, known to %s: no email, delivered by onbind",
                 invite.sender, invite.room_id, logs.untrusted(address), mxid)
        await request.app.ctx.invites.stored_for_known_address("email", address, mxid)
        return json(_stored_answer(request, invite.token, ephemeral_public, address))
    sender = request.app.ctx.email
    if sender is None:
        raise MatrixError(500, "M_EMAIL_SEND_ERROR", "The invite email could not be sent: email is not configured")
    await storage.run(storage.add_invite, invite)
    config = config_of(request)
    values = template_values({**body, "address": address}, config.invites.register_url
                             or f"https://{config.matrix.domain}")
    values.update({"TOKEN": invite.token, "EPHEMERAL_PRIVATE_KEY": encode_base64(ephemeral.encode())})
    sent = False
    try:
        await sender.send("invite", address, values)
        sent = True
    except AddressRefused as exc:
        log.info("invite from %s to %s not stored: %s", invite.sender, logs.untrusted(address), exc)
        raise MatrixError(400, "M_EMAIL_SEND_ERROR", "No email can be sent to this address") from None
    except SendError as exc:
        log.error("invite from %s to %s not stored: %s", invite.sender, logs.untrusted(address), exc)
        raise MatrixError(500, "M_EMAIL_SEND_ERROR", "The invite email could not be sent") from None
    finally:
        if not sent:  # whatever stopped the message, no invite waits for a message never sent
            await storage.run(storage.delete_invite, invite.token)
    log.info("stored invite from %s to room %s for email %s", invite.sender, invite.room_id, logs.untrusted(address))
    return json(_stored_answer(request, invite.token, ephemeral_public, address))


def _stored_answer(request: Request, token: str, ephemeral_public: str, address: str) -> dict[str, Any]:
    """The spec's answer for a stored invite: its token, our long-term and its ephemeral key, a display name."""
    base = config_of(request).server.public_url + request.path.rsplit("/store-invite", 1)[0]
    server_key = {"public_key": request.app.ctx.keys.public_key, "key_validity_url": base + "/pubkey/isvalid"}
    return {
        "token": token,
        "public_keys": [server_key, {"public_key": ephemeral_public,
                                     "key_validity_url": base + "/pubkey/ephemeral/isvalid"}],
        "public_key": server_key["public_key"],
        "display_name": redact(address),
    }


@bp.get(V1 + "/pubkey/ephemeral/isvalid", name="ephemeral_isvalid_v1")
@bp.get(V2 + "/pubkey/ephemeral/isvalid", name="ephemeral_isvalid_v2")
async def ephemeral_is_valid(request: Request) -> HTTPResponse:
    """GET /_matrix/identity/v2/pubkey/ephemeral/isvalid: whether an invite's ephemeral key is still valid."""
    public_key = request.args.get("public_key")
    if public_key is None:
        raise MatrixError(400, "M_MISSING_PARAMS", "Missing parameters: public_key")
    storage = request.app.ctx.storage
    # A "+" sent unencoded in a query string arrives as a space.
    return json({"valid": await storage.run(storage.ephemeral_key_known, public_key.replace(" ", "+"))})


@bp.post(V1 + "/sign-ed25519", name="sign_ed25519_v1")
@bp.post(V2 + "/sign-ed25519", name="sign_ed25519_v2")
async def sign_ed25519(request: Request) -> HTTPResponse:
    """POST /_matrix/identity/v2/sign-ed25519 (and v1): sign {mxid, sender, token} with an invite's ephemeral key."""
    await authenticate_v2(request)
    body = json_body(request, "sign_ed25519")
    storage = request.app.ctx.storage
    invite = await storage.run(storage.invite, body["token"])
    if invite is None:
        raise MatrixError(404, "M_UNRECOGNIZED", "Didn't recognize token")
    try:
        key = decode_signing_key_base64("ed25519", "0", body["private_key"])
    except (ValueError, CryptoError):
        raise MatrixError(400, "M_INVALID_PARAM", "private_key is not an unpadded base64 ed25519 seed") from None
    signed = {"mxid": body["mxid"], "sender": invite.sender, "token": invite.token}
    return json(sign_json(signed, request.app.ctx.keys.server_name, key))
