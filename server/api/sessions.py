"""3PID validation sessions (identity service API "Email associations" and "Phone number
associations", v2 and the legacy v1 paths): requestToken, submitToken, getValidated3pid."""

from __future__ import annotations

import html
from collections.abc import Callable, Coroutine
from typing import Any

import phonenumbers
from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json, redirect
from sanic.response import html as html_response

from indexer.normalize import InvalidAddress
from indexer.normalize import email as canonical_email
from server.api import V1, V2, authenticate_v2, check_params, json_body
from server.caller import client_address
from server.container import services
from server.errors import MatrixError, log_bad_request
from server.notify import read_template, render

bp = Blueprint("sessions")

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


@_route("/validate/email/requestToken", ["POST"])
async def request_email_token(request: Request) -> HTTPResponse:
    """POST /_matrix/identity/v2/validate/email/requestToken (and v1): email a validation token."""
    await authenticate_v2(request)
    body = json_body(request, "request_email_token")
    try:
        address = canonical_email(body["email"])
    except InvalidAddress:
        raise MatrixError(400, "M_INVALID_EMAIL", "Not a valid email address") from None
    svc = services(request)
    session = await svc.sessions.request_token(
        "email", address, body["client_secret"], _send_attempt(body["send_attempt"]), body.get("next_link"),
        client_address(request, svc.config.server.proxies_count))
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
    svc = services(request)
    session = await svc.sessions.request_token(
        "msisdn", msisdn, body["client_secret"], _send_attempt(body["send_attempt"]), body.get("next_link"),
        client_address(request, svc.config.server.proxies_count))
    return json({"sid": session.sid, "msisdn": msisdn,
                 "intl_fmt": phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.INTERNATIONAL)})


def _submit_routes(medium: str) -> None:
    async def submit_token(request: Request) -> HTTPResponse:
        await authenticate_v2(request)
        params = json_body(request, "submit_token", allow_form=True)
        try:
            await services(request).sessions.submit_token(medium, params["sid"], params["client_secret"],
                                                          params["token"])
        except MatrixError as exc:
            exc.extra.setdefault("success", False)
            raise
        return json({"success": True})

    async def submit_token_link(request: Request) -> HTTPResponse:
        # The link in the message: opened in a browser, so no token and an HTML answer.
        svc = services(request)
        pages = svc.config.sessions.pages
        try:
            params = check_params({k: v[0] for k, v in request.args.items()}, "submit_token")
            session = await svc.sessions.submit_token(medium, params["sid"], params["client_secret"], params["token"])
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
    session = await services(request).sessions.validated_3pid(params["sid"], params["client_secret"])
    return json({"medium": session.medium, "address": session.address, "validated_at": session.validated_at})
