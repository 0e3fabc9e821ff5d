"""3PID invites: storing an invite and telling the invitee (an email, or an SMS with a short link),
or, for an address we know, handing it to the onbind delivery queue; the invite's ephemeral key,
signing with it, and where the short link of an invite SMS leads."""

from __future__ import annotations

import logging
import re
import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import phonenumbers
from nacl.exceptions import CryptoError
from signedjson.key import decode_signing_key_base64, encode_verify_key_base64, generate_signing_key, get_verify_key
from signedjson.sign import sign_json
from unpaddedbase64 import encode_base64

from indexer import logs
from indexer.normalize import InvalidAddress
from indexer.normalize import email as canonical_email
from indexer.normalize import msisdn as canonical_msisdn
from indexer.settings import Config, RequestLimitConfig
from server.errors import MatrixError
from server.notify import AddressRefused, SendError
from server.notify.email import EmailSender
from server.notify.sms import SmsSender
from server.rate_limits import RateLimits
from server.read_through import ReadThrough
from server.recursion import Recursion
from server.services.lookups import Lookups
from server.services.onbind import InviteWorker
from server.signing import SigningKeys
from server.storage import Invite, Storage, now_ms

log = logging.getLogger(__name__)

# The request fields the spec's store-invite defines for the message; each fills %FIELD_NAME%.
# Nothing else a request sends reaches the message: From, To, the subject and the rest of the
# template come from the config.
TEMPLATE_FIELDS = ("room_alias", "room_avatar_url", "room_join_rules", "room_name", "room_type",
                   "sender_avatar_url", "sender_display_name")
MAX_FIELD_LENGTH = 200  # characters of a request field in an email; more is cut
# In an SMS: two fields of 40 and a short link stay within one 160-character message.
MAX_SMS_FIELD_LENGTH = 40
LINK_PATH = "/i/"  # the short link of an invite SMS: <server.public_url>/i/<code>
_LINK_CODE_BYTES = 8  # 64 random bits, 11 characters: nobody finds a pending invite by trying codes
_LINK_CODE = re.compile(r"[A-Za-z0-9_-]{11}")  # what secrets.token_urlsafe(_LINK_CODE_BYTES) makes
_NAMES = {"email": "email address", "msisdn": "phone number"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")


def redact(medium: str, address: str) -> str:
    """An address shown to the room before the invitee joins: "ali...@cor..." for an email, the
    country code and the first digits of a phone number ("+44 740..."): the rest would identify it."""
    if medium == "msisdn":
        country = str(phonenumbers.parse("+" + address).country_code)
        national = address[len(country):]
        return f"+{country} {national[:len(national) // 3]}..."
    local, _, domain = address.partition("@")

    def part(text: str) -> str:
        return text[:3] + "..." if len(text) > 3 else text[:1] + "..."

    return f"{part(local)}@{part(domain)}"


def clean(value: Any, limit: int = MAX_FIELD_LENGTH, ellipsis: str = "…") -> str:
    """A request field as it may appear in a message: one line of printable text, at most limit
    characters (a longer one cut, ending in ellipsis)."""
    if not isinstance(value, str):
        return ""
    text = _CONTROL.sub(" ", value).strip()
    return text if len(text) <= limit else text[:limit - len(ellipsis)] + ellipsis


def template_values(body: dict[str, Any], register_url: str, sms: bool = False) -> dict[str, str]:
    """mxisd's invite placeholders, and the spec's optional fields as %FIELD_NAME%, each request field
    cut to MAX_FIELD_LENGTH characters, or for an SMS to MAX_SMS_FIELD_LENGTH."""
    # In an SMS an ASCII "...": one character outside the GSM alphabet cuts a message's 160 characters to 70.
    limit, ellipsis = (MAX_SMS_FIELD_LENGTH, "...") if sms else (MAX_FIELD_LENGTH, "…")
    values = {field.upper(): clean(body.get(field), limit, ellipsis) for field in TEMPLATE_FIELDS}
    sender, room_id, address = (clean(body["sender"], limit, ellipsis), clean(body["room_id"], limit, ellipsis),
                                body["address"])
    sender_name, room_name = values["SENDER_DISPLAY_NAME"], values["ROOM_NAME"]
    values.update({
        "SENDER_ID": sender,
        "SENDER_NAME": sender_name,
        "SENDER_NAME_OR_ID": sender_name or sender,
        "INVITE_MEDIUM": body["medium"],
        "INVITE_MEDIUM_URL_ENCODED": quote(body["medium"], safe=""),
        "INVITE_ADDRESS": address,
        "INVITE_ADDRESS_URL_ENCODED": quote(address, safe=""),
        "ROOM_ID": room_id,
        "ROOM_NAME_OR_ID": room_name or values["ROOM_ALIAS"] or room_id,
        "REGISTER_URL": register_url,
    })
    return values


def canonical_address(medium: str, address: str) -> str:
    """The invited address in its canonical form: an email address, or a phone number in the Matrix
    msisdn form (E.164 digits without "+"), given in international form with or without its "+".

    Raises MatrixError: 400 M_INVALID_EMAIL, 400 M_INVALID_ADDRESS (a phone number), 400
    M_UNRECOGNIZED for another medium."""
    if medium == "email":
        try:
            return canonical_email(address)
        except InvalidAddress:
            raise MatrixError(400, "M_INVALID_EMAIL", "Not a valid email address") from None
    if medium == "msisdn":
        # Never read as a national number: which country's would be a guess.
        try:
            return canonical_msisdn("+" + address.strip().removeprefix("+"), None)
        except InvalidAddress:
            raise MatrixError(400, "M_INVALID_ADDRESS",
                              "Not a valid phone number in international form (country code first)") from None
    raise MatrixError(400, "M_UNRECOGNIZED", "Only email and msisdn invites are supported")


def with_query(url: str, params: dict[str, str]) -> str:
    """url with params added to its query (what it has already is kept)."""
    parts = urlsplit(url)
    query = urlencode([*parse_qsl(parts.query, keep_blank_values=True), *params.items()])
    return urlunsplit(parts._replace(query=query))


@dataclass(frozen=True)
class Invitations:
    """Invites stored in SQL until the invited address is bound; requests rate limited in Redis."""

    config: Config
    storage: Storage
    rate_limits: RateLimits
    lookups: Lookups
    read_through: ReadThrough
    recursion: Recursion
    invite_worker: InviteWorker
    email: EmailSender | None
    sms: SmsSender | None
    keys: SigningKeys

    async def store(self, body: dict[str, Any], owner: str | None, client: str, may_recurse: bool) -> Invite:
        """Store the invite of body (a store-invite request: sender, medium, address, room_id, and
        the optional fields of its message). For an address that only we (a read-through store, or
        another identity server when may_recurse) know, or know under another spelling, the invite
        goes to the Matrix ID by onbind after invites.known_address_delay; else the invitee gets an
        email, which holds the invite's token and ephemeral private key, or an SMS with the invite's
        short link (link_target). owner is the Matrix ID of the request's token (None on the v1
        paths); client is the requester's address, for the rate limits. The stored invite: its
        address canonical, its ephemeral_public_key the key the email carries.

        Raises MatrixError: 403 M_UNAUTHORIZED when owner is not the sender; 400 M_UNRECOGNIZED for a
        medium other than email and msisdn; 400 M_INVALID_EMAIL or M_INVALID_ADDRESS; 429
        M_LIMIT_EXCEEDED (with retry_after_ms); 400 M_THREEPID_IN_USE (with the mxid) when the
        homeserver's lookup should have found the address; 400 M_EMAIL_SEND_ERROR (M_SEND_ERROR for
        an SMS) when the address cannot be sent to, 500 M_EMAIL_SEND_ERROR (M_SEND_ERROR) when
        sending failed or email (sms) is not configured: no invite is kept then."""
        if owner is not None and body["sender"] != owner:
            raise MatrixError(403, "M_UNAUTHORIZED", "A token can only store invites sent by its own Matrix ID")
        medium = body["medium"]
        address = canonical_address(medium, body["address"])
        await self._rate_limit(body["sender"], address, client)
        pair = [(medium, address)]
        synced = await self.lookups.by_address(pair)
        if synced[0] is not None and body["address"] == address:
            # The homeserver's own (hashed) lookup of this address found it: it should have invited the Matrix ID.
            raise MatrixError(400, "M_THREEPID_IN_USE", f"This {_NAMES[medium]} is already bound to a Matrix ID",
                              mxid=synced[0])
        # Known only under another spelling, or only to a read-through store or another identity server,
        # none of which a hashed lookup reaches: the homeserver missed it, and refusing would fail the invite.
        known = await self.read_through.fill(pair, synced)
        [mxid] = await self.recursion.fill(pair, known) if may_recurse else known

        ephemeral = generate_signing_key("0")
        invite = Invite(token=secrets.token_urlsafe(48), medium=medium, address=address, room_id=body["room_id"],
                        sender=body["sender"],
                        ephemeral_public_key=encode_verify_key_base64(get_verify_key(ephemeral)),
                        properties={k: body[k] for k in TEMPLATE_FIELDS if isinstance(body.get(k), str)},
                        created_at=now_ms(), settled_at=None, known_mxid=mxid,
                        # Only an invite texted to its number has a short link.
                        link_code=secrets.token_urlsafe(_LINK_CODE_BYTES) if medium == "msisdn" and mxid is None
                        else None)
        storage = self.storage
        errcode = "M_EMAIL_SEND_ERROR" if medium == "email" else "M_SEND_ERROR"
        message = "email" if medium == "email" else "SMS"
        if mxid is not None:
            await self.invite_worker.storing(medium, address)
            await storage.run(storage.add_invite, invite)
            log.info("stored invite from %s to room %s for %s %s, known to %s: no %s, delivered by onbind",
                     invite.sender, invite.room_id, medium, logs.untrusted(address), mxid, message)
            await self.invite_worker.stored_for_known_address(medium, address, mxid)
            return invite
        sender = self.email if medium == "email" else self.sms
        if sender is None:
            raise MatrixError(500, errcode, f"The invite {message} could not be sent: the {message.lower()} "
                                            "section is not configured")
        await self.invite_worker.storing(medium, address)
        await storage.run(storage.add_invite, invite)
        sent = False
        try:
            await sender.send("invite", address, self._message_values(invite, body, ephemeral.encode()))
            sent = True
        except AddressRefused as exc:
            log.info("invite from %s to %s not stored: %s", invite.sender, logs.untrusted(address), exc)
            raise MatrixError(400, errcode, f"No {message} can be sent to this {_NAMES[medium]}") from None
        except SendError as exc:
            log.error("invite from %s to %s not stored: %s", invite.sender, logs.untrusted(address), exc)
            raise MatrixError(500, errcode, f"The invite {message} could not be sent") from None
        finally:
            if not sent:  # whatever stopped the message, no invite waits for a message never sent
                await storage.run(storage.delete_invite, invite.token)
        log.info("stored invite from %s to room %s for %s %s", invite.sender, invite.room_id, medium,
                 logs.untrusted(address))
        return invite

    def _message_values(self, invite: Invite, body: dict[str, Any], ephemeral_seed: bytes) -> dict[str, str]:
        """The placeholders of the invite's email, or of its SMS (shorter fields, the short link)."""
        fields = {**body, "address": invite.address}
        if invite.medium == "email":
            values = template_values(fields, self.register_url)
            values.update({"TOKEN": invite.token, "EPHEMERAL_PRIVATE_KEY": encode_base64(ephemeral_seed)})
            return values
        # Nothing secret in an SMS: the invite reaches the invitee's Matrix ID once the number is bound.
        values = template_values(fields, self.register_url, sms=True)
        values["INVITE_LINK"] = f"{self.config.server.public_url}{LINK_PATH}{invite.link_code}"
        return values

    @property
    def register_url(self) -> str:
        """invites.register_url, or the Matrix domain's website."""
        return self.config.invites.register_url or f"https://{self.config.matrix.domain}"

    async def link_target(self, code: str) -> str:
        """Where the short link <public_url>/i/<code> of an invite SMS leads: invites.register_url
        with the invite's medium, address and room_id added to its query; register_url alone for a
        code of no invite (expired, or never given). Never anywhere else: the link is no open redirect."""
        if not _LINK_CODE.fullmatch(code):
            return self.register_url
        invite = await self.storage.run(self.storage.invite_by_link_code, code)
        if invite is None:
            return self.register_url
        return with_query(self.register_url, {"medium": invite.medium, "address": invite.address,
                                              "room_id": invite.room_id})

    async def ephemeral_key_valid(self, public_key: str) -> bool:
        """Whether public_key is the ephemeral key of an invite we keep."""
        return await self.storage.run(self.storage.ephemeral_key_known, public_key)

    async def sign(self, token: str, mxid: str, private_key: str) -> dict[str, Any]:
        """{mxid, sender, token} of the invite with token, signed with private_key (its ephemeral
        key, from the invite email) under our server name.

        Raises MatrixError: 404 M_UNRECOGNIZED for an unknown token; 400 M_INVALID_PARAM when
        private_key is not an unpadded base64 ed25519 seed."""
        invite = await self.storage.run(self.storage.invite, token)
        if invite is None:
            raise MatrixError(404, "M_UNRECOGNIZED", "Didn't recognize token")
        try:
            key = decode_signing_key_base64("ed25519", "0", private_key)
        except (ValueError, CryptoError):
            raise MatrixError(400, "M_INVALID_PARAM", "private_key is not an unpadded base64 ed25519 seed") from None
        signed = {"mxid": mxid, "sender": invite.sender, "token": invite.token}
        return sign_json(signed, self.keys.server_name, key)

    async def _rate_limit(self, sender: str, address: str, client: str) -> None:
        limits = self.config.invites.rate_limit
        for kind, key in (("per_sender", sender), ("per_ip", client), ("per_address", address)):
            limit: RequestLimitConfig = getattr(limits, kind)
            wait_ms = await self.rate_limits.hit(f"store-invite:{kind}", key, limit.requests, limit.window)
            if wait_ms is not None:
                log.info("store-invite rate limited (%s) for %s", kind, logs.untrusted(key))
                raise MatrixError(429, "M_LIMIT_EXCEEDED", "Too many invites; try again later",
                                  retry_after_ms=wait_ms)
