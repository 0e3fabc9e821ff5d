"""3PID validation sessions (identity service API "Email associations" and "Phone number
associations", v2 and the legacy v1 paths): requestToken, submitToken, getValidated3pid."""

from __future__ import annotations

import html
import logging
import secrets
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import replace
from typing import Any
from urllib.parse import urlencode

import phonenumbers
from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json, redirect
from sanic.response import html as html_response

from indexer import logs
from indexer.normalize import InvalidAddress
from indexer.normalize import email as canonical_email
from indexer.settings import RequestLimitConfig
from server.api import V1, V2, authenticate_v2, check_params, config_of, json_body
from server.caller import client_address
from server.errors import MatrixError, log_bad_request
from server.notify import AddressRefused, SendError, read_template, render
from server.storage import Session, now_ms

log = logging.getLogger(__name__)

bp = Blueprint("sessions")

NOT_SENT = -1  # send_attempt of a session whose first message has not gone out


Handler = Callable[[Request], Coroutine[Any, Any, HTTPResponse]]


def _route(path: str, methods: list[str]) -> Callable[[Handler], Handler]:
    """Register the handler under both the v2 and the legacy v1 prefix."""
    def register(handler: Handler) -> Handler:
        for version, prefix in (("v1", V1), ("v2", V2)):
            bp.add_route(handler, prefix + path, methods=methods, name=f"{handler.__name__}_{version}")
        return handler
    return register


def _send_attempt(value: Any) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise MatrixError(400, "M_INVALID_PARAM", "send_attempt must be an integer")


async def _rate_limit(request: Request, address_key: str) -> None:
    limits = config_of(request).sessions.rate_limit
    for kind, key in (("per_ip", client_address(request)), ("per_address", address_key)):
        limit: RequestLimitConfig = getattr(limits, kind)
        wait_ms = await request.app.ctx.rate_limits.hit(f"requestToken:{kind}", key, limit.requests, limit.window)
        if wait_ms is not None:
            log.info("requestToken rate limited (%s) for %s", kind, address_key if kind == "per_address" else key)
            raise MatrixError(429, "M_LIMIT_EXCEEDED", "Too many verification requests; try again later",
                              retry_after_ms=wait_ms)


def _expired(request: Request, session: Session) -> bool:
    lifetime_ms = config_of(request).sessions.lifetime * 1000
    return now_ms() - session.modified_at > lifetime_ms


def _new_token(medium: str) -> str:
    if medium == "msisdn":  # typed in by hand from an SMS
        return f"{secrets.randbelow(10**6):06d}"
    return secrets.token_urlsafe(24)


async def _start(request: Request, medium: str, address: str, body: dict[str, Any],
                 send: Callable[[Session], Awaitable[None]]) -> Session:
    """Get or create the session for (medium, address, client_secret); send a message when it is new
    or send_attempt went up, else nothing."""
    attempt = _send_attempt(body["send_attempt"])
    await _rate_limit(request, f"{medium}:{address}")
    storage = request.app.ctx.storage
    secret = body["client_secret"]
    next_link = body.get("next_link")
    now = now_ms()
    session: Session | None = await storage.run(storage.find_session, medium, address, secret)
    if session is None:
        fresh = Session(sid=secrets.token_urlsafe(18), medium=medium, address=address, client_secret=secret,
                        token=_new_token(medium), send_attempt=NOT_SENT, next_link=next_link, failed_attempts=0,
                        created_at=now, modified_at=now, validated_at=None)
        session = await storage.run(storage.create_session, fresh)
    elif _expired(request, session) or (
            session.failed_attempts >= config_of(request).sessions.max_token_attempts
            and attempt > session.send_attempt):
        # A dead session starts over under the same sid, with a token nobody has guessed at.
        changes: dict[str, Any] = dict(token=_new_token(medium), send_attempt=NOT_SENT, failed_attempts=0,
                                       created_at=now, modified_at=now, validated_at=None, next_link=next_link)
        await storage.run(storage.update_session, session.sid, changes)
        session = replace(session, **changes)
    if attempt <= session.send_attempt:
        return session
    try:
        await send(session)
    except SendError as exc:
        logs.repeated.error(log, "could not send the %s validation message for session %s: %s", medium, session.sid,
                            exc, key=f"send {medium}")
        raise
    changes = {"send_attempt": attempt, "modified_at": now_ms()}
    if next_link is not None:
        changes["next_link"] = next_link
    await storage.run(storage.update_session, session.sid, changes)
    return session


def _validation_link(request: Request, session: Session) -> str:
    query = urlencode({"sid": session.sid, "client_secret": session.client_secret, "token": session.token})
    return f"{config_of(request).server.public_url}{V2}/validate/{session.medium}/submitToken?{query}"


@_route("/validate/email/requestToken", ["POST"])
async def request_email_token(request: Request) -> HTTPResponse:
    """POST /_matrix/identity/v2/validate/email/requestToken (and v1): email a validation token."""
    await authenticate_v2(request)
    body = json_body(request, "request_email_token")
    try:
        address = canonical_email(body["email"])
    except InvalidAddress:
        raise MatrixError(400, "M_INVALID_EMAIL", "Not a valid email address") from None
    sender = request.app.ctx.email

    async def send(session: Session) -> None:
        if sender is None:
            raise SendError("email is not configured (no email section in the config)")
        link = _validation_link(request, session)
        await sender.send("validation", address, {
            "VALIDATION_LINK": link, "VALIDATION_TOKEN": session.token, "NEXT_URL": link})

    try:
        session = await _start(request, "email", address, body, send)
    except AddressRefused:
        raise MatrixError(400, "M_EMAIL_SEND_ERROR", "No email can be sent to this address") from None
    except SendError:
        raise MatrixError(500, "M_EMAIL_SEND_ERROR", "The verification email could not be sent") from None
    return json({"sid": session.sid})


@_route("/validate/msisdn/requestToken", ["POST"])
async def request_msisdn_token(request: Request) -> HTTPResponse:
    """POST /_matrix/identity/v2/validate/msisdn/requestToken (and v1): text a validation code."""
    await authenticate_v2(request)
    body = json_body(request, "request_msisdn_token")
    try:
        number = phonenumbers.parse(body["phone_number"], body["country"].upper())
    except phonenumbers.NumberParseException:
        number = None
    if number is None or not phonenumbers.is_valid_number(number):
        raise MatrixError(400, "M_INVALID_ADDRESS", "Not a valid phone number for that country")
    msisdn = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164).lstrip("+")
    sender = request.app.ctx.sms

    async def send(session: Session) -> None:
        if sender is None:
            raise SendError("SMS is not configured (no sms section in the config)")
        link = _validation_link(request, session)
        # NEXT_URL: as in mxisd, the validation link.
        await sender.send("validation", msisdn, {"VALIDATION_TOKEN": session.token, "VALIDATION_LINK": link,
                                                  "NEXT_URL": link})

    try:
        session = await _start(request, "msisdn", msisdn, body, send)
    except SendError:
        raise MatrixError(400, "M_SEND_ERROR", "The verification SMS could not be sent") from None
    return json({"sid": session.sid, "msisdn": msisdn,
                 "intl_fmt": phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.INTERNATIONAL)})


async def live_session(request: Request, sid: str, client_secret: str) -> Session:
    """The session for sid and secret: 404 M_NO_VALID_SESSION, or 400 M_SESSION_EXPIRED."""
    storage = request.app.ctx.storage
    session: Session | None = await storage.run(storage.session, sid, client_secret)
    if session is None:
        raise MatrixError(404, "M_NO_VALID_SESSION", "No session with that sid and client_secret")
    if _expired(request, session):
        raise MatrixError(400, "M_SESSION_EXPIRED", "This validation session has expired; start a new one")
    return session


async def validated_session(request: Request, sid: str, client_secret: str) -> Session:
    """A live session whose 3PID was proven: else the errors of live_session or M_SESSION_NOT_VALIDATED."""
    session = await live_session(request, sid, client_secret)
    if session.validated_at is None:
        raise MatrixError(400, "M_SESSION_NOT_VALIDATED", "This 3PID has not been validated yet")
    return session


async def _submit(request: Request, params: dict[str, Any], medium: str) -> Session:
    session = await live_session(request, params["sid"], params["client_secret"])
    if session.medium != medium:
        raise MatrixError(404, "M_NO_VALID_SESSION", "No session with that sid and client_secret")
    storage = request.app.ctx.storage
    max_attempts = config_of(request).sessions.max_token_attempts
    # The attempt is counted before the token is compared: a burst of guesses sent at once gets
    # no more tries than one sent after another.
    attempts = await storage.run(storage.claim_token_attempt, session.sid, max_attempts)
    if attempts is None:
        raise MatrixError(400, "M_SESSION_EXPIRED",
                          "Too many wrong tokens for this session; request a new token")
    if not secrets.compare_digest(params["token"].strip().encode(), session.token.encode()):
        log.info("wrong token for session %s (%d of %d allowed)", session.sid, attempts, max_attempts)
        raise MatrixError(400, "M_TOKEN_INCORRECT", "The token is incorrect", success=False)
    await storage.run(storage.return_token_attempt, session.sid)
    if session.validated_at is None:
        now = now_ms()
        await storage.run(storage.update_session, session.sid, {"validated_at": now, "modified_at": now})
        session = replace(session, validated_at=now, modified_at=now)
        log.info("session %s validated its %s", session.sid, medium)
    return session


def _submit_routes(medium: str) -> None:
    async def submit_token(request: Request) -> HTTPResponse:
        await authenticate_v2(request)
        params = json_body(request, "submit_token", allow_form=True)
        try:
            await _submit(request, params, medium)
        except MatrixError as exc:
            exc.extra.setdefault("success", False)
            raise
        return json({"success": True})

    async def submit_token_link(request: Request) -> HTTPResponse:
        # The link in the message: opened in a browser, so no token and an HTML answer.
        pages = config_of(request).sessions.pages
        try:
            params = check_params({k: v[0] for k, v in request.args.items()}, "submit_token")
            session = await _submit(request, params, medium)
        except MatrixError as exc:
            if exc.status == 400:
                log_bad_request(request, exc)
            page = read_template(pages.failure, "submit-failure.html")
            return html_response(render(page, {"ERROR": html.escape(exc.error)}), status=exc.status)
        if session.next_link and session.next_link.lower().startswith(("https://", "http://")):
            return redirect(session.next_link)
        return html_response(read_template(pages.success, "submit-success.html"))

    submit_token.__doc__ = f"POST /_matrix/identity/v2/validate/{medium}/submitToken (and v1): prove the token."
    submit_token_link.__doc__ = f"GET /_matrix/identity/v2/validate/{medium}/submitToken (and v1): the link."
    submit_token.__name__ = f"submit_{medium}_token"
    submit_token_link.__name__ = f"submit_{medium}_token_link"
    _route(f"/validate/{medium}/submitToken", ["POST"])(submit_token)
    _route(f"/validate/{medium}/submitToken", ["GET"])(submit_token_link)


_submit_routes("email")
_submit_routes("msisdn")


@_route("/3pid/getValidated3pid", ["GET"])
async def get_validated(request: Request) -> HTTPResponse:
    """GET /_matrix/identity/v2/3pid/getValidated3pid (and v1): the 3PID a session validated."""
    await authenticate_v2(request)
    params = check_params({k: v[0] for k, v in request.args.items()}, "get_validated_3pid")
    session = await validated_session(request, params["sid"], params["client_secret"])
    return json({"medium": session.medium, "address": session.address, "validated_at": session.validated_at})
