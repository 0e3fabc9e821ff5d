"""3PID validation sessions: a token sent by email or SMS to an address, proven by sending it back;
the session then vouches for the address (to bind it, or to unbind it)."""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlencode

from indexer import logs
from indexer.settings import Config, RequestLimitConfig
from server.errors import MatrixError
from server.notify import AddressRefused, SendError
from server.notify.email import EmailSender
from server.notify.sms import SmsSender
from server.rate_limits import RateLimits
from server.services.session_policy import SessionPolicy
from server.storage import Session, Storage, now_ms

log = logging.getLogger(__name__)

NOT_SENT = -1  # send_attempt of a session whose first message has not gone out
SUBMIT_PATH = "/_matrix/identity/v2/validate/{medium}/submitToken"


def _new_token(medium: str) -> str:
    if medium == "msisdn":  # typed in by hand from an SMS
        return f"{secrets.randbelow(10**6):06d}"
    return secrets.token_urlsafe(24)


@dataclass
class ValidationSessions:
    """Validation sessions in SQL; their messages sent by the email and SMS senders (None when their
    config section is absent); requests for them rate limited in Redis and checked against
    sessions.policy."""

    # Not frozen: a reload (Services.reload) replaces config, whose rate limits are read at each use.
    config: Config
    storage: Storage
    rate_limits: RateLimits
    email: EmailSender | None
    sms: SmsSender | None
    policy: SessionPolicy

    async def request_token(self, medium: str, address: str, client_secret: str, send_attempt: int,
                            next_link: str | None, client: str) -> Session:
        """The session for (medium, address, client_secret), made when there is none and started over
        when it expired or used up its token attempts; its token is sent when the session is new or
        send_attempt went up, else nothing is sent. address is canonical; client is the requester's
        address, for the rate limits.

        Raises MatrixError: 429 M_LIMIT_EXCEEDED (with retry_after_ms); 403 M_FORBIDDEN when
        sessions.policy refuses to validate the address; for email 400
        M_EMAIL_SEND_ERROR when the address cannot be sent to and 500 M_EMAIL_SEND_ERROR when sending
        failed; for msisdn 400 M_SEND_ERROR when sending failed. A session whose message was not sent
        keeps its send_attempt, so the same request can be tried again."""
        await self._rate_limit(f"{medium}:{address}", client)
        await self.policy.may_validate(medium, address)
        storage = self.storage
        now = now_ms()
        session = await storage.run(storage.find_session, medium, address, client_secret)
        if session is None:
            fresh = Session(sid=secrets.token_urlsafe(18), medium=medium, address=address,
                            client_secret=client_secret, token=_new_token(medium), send_attempt=NOT_SENT,
                            next_link=next_link, failed_attempts=0, created_at=now, modified_at=now,
                            validated_at=None)
            session = await storage.run(storage.create_session, fresh)
        elif self._expired(session) or (
                session.failed_attempts >= self.config.sessions.max_token_attempts
                and send_attempt > session.send_attempt):
            # A dead session starts over under the same sid, with a token nobody has guessed at.
            changes: dict[str, Any] = dict(token=_new_token(medium), send_attempt=NOT_SENT, failed_attempts=0,
                                           created_at=now, modified_at=now, validated_at=None, next_link=next_link)
            await storage.run(storage.update_session, session.sid, changes)
            session = replace(session, **changes)
        if send_attempt <= session.send_attempt:
            return session
        try:
            await self._send(session)
        except SendError as exc:
            logs.repeated.error(log, "could not send the %s validation message for session %s: %s", medium,
                                session.sid, exc, key=f"send {medium}")
            if medium == "msisdn":
                raise MatrixError(400, "M_SEND_ERROR", "The verification SMS could not be sent") from None
            if isinstance(exc, AddressRefused):
                raise MatrixError(400, "M_EMAIL_SEND_ERROR", "No email can be sent to this address") from None
            raise MatrixError(500, "M_EMAIL_SEND_ERROR", "The verification email could not be sent") from None
        changes = {"send_attempt": send_attempt, "modified_at": now_ms()}
        if next_link is not None:
            changes["next_link"] = next_link
        await storage.run(storage.update_session, session.sid, changes)
        return session

    async def submit_token(self, medium: str, sid: str, client_secret: str, token: str) -> Session:
        """The session, validated now if it was not yet: token is its token. Each wrong token counts
        towards sessions.max_token_attempts; a right one gives its attempt back.

        Raises MatrixError: 404 M_NO_VALID_SESSION (also for a session of another medium); 400
        M_SESSION_EXPIRED for an expired session or one out of attempts; 403 M_FORBIDDEN when
        sessions.policy (since reloaded) refuses to validate its address; 400 M_TOKEN_INCORRECT
        (with success: false)."""
        session = await self.live_session(sid, client_secret)
        if session.medium != medium:
            raise MatrixError(404, "M_NO_VALID_SESSION", "No session with that sid and client_secret")
        await self.policy.may_validate(session.medium, session.address)
        storage = self.storage
        max_attempts = self.config.sessions.max_token_attempts
        # The attempt is counted before the token is compared: a burst of guesses sent at once gets
        # no more tries than one sent after another.
        attempts = await storage.run(storage.claim_token_attempt, session.sid, max_attempts)
        if attempts is None:
            raise MatrixError(400, "M_SESSION_EXPIRED",
                              "Too many wrong tokens for this session; request a new token")
        if not secrets.compare_digest(token.strip().encode(), session.token.encode()):
            log.info("wrong token for session %s (%d of %d allowed)", session.sid, attempts, max_attempts)
            raise MatrixError(400, "M_TOKEN_INCORRECT", "The token is incorrect", success=False)
        await storage.run(storage.return_token_attempt, session.sid)
        if session.validated_at is None:
            now = now_ms()
            await storage.run(storage.update_session, session.sid, {"validated_at": now, "modified_at": now})
            session = replace(session, validated_at=now, modified_at=now)
            log.info("session %s validated its %s", session.sid, medium)
        return session

    async def live_session(self, sid: str, client_secret: str) -> Session:
        """The session for sid and client_secret, validated or not.

        Raises MatrixError: 404 M_NO_VALID_SESSION when there is none; 400 M_SESSION_EXPIRED."""
        session = await self.storage.run(self.storage.session, sid, client_secret)
        if session is None:
            raise MatrixError(404, "M_NO_VALID_SESSION", "No session with that sid and client_secret")
        if self._expired(session):
            raise MatrixError(400, "M_SESSION_EXPIRED", "This validation session has expired; start a new one")
        return session

    async def validated_session(self, sid: str, client_secret: str) -> Session:
        """The live session for sid and client_secret, which has validated its 3PID.

        Raises MatrixError: those of live_session; 400 M_SESSION_NOT_VALIDATED."""
        session = await self.live_session(sid, client_secret)
        if session.validated_at is None:
            raise MatrixError(400, "M_SESSION_NOT_VALIDATED", "This 3PID has not been validated yet")
        return session

    async def validated_3pid(self, sid: str, client_secret: str) -> Session:
        """The live session for sid and client_secret, which has validated a 3PID that
        sessions.policy still lets be validated.

        Raises MatrixError: those of validated_session; 403 M_FORBIDDEN."""
        session = await self.validated_session(sid, client_secret)
        await self.policy.may_validate(session.medium, session.address)
        return session

    def _expired(self, session: Session) -> bool:
        lifetime_ms = self.config.sessions.lifetime * 1000
        return now_ms() - session.modified_at > lifetime_ms

    async def _rate_limit(self, address_key: str, client: str) -> None:
        limits = self.config.sessions.rate_limit
        for kind, key in (("per_ip", client), ("per_address", address_key)):
            limit: RequestLimitConfig = getattr(limits, kind)
            wait_ms = await self.rate_limits.hit(f"requestToken:{kind}", key, limit.requests, limit.window)
            if wait_ms is not None:
                log.info("requestToken rate limited (%s) for %s", kind, address_key if kind == "per_address" else key)
                raise MatrixError(429, "M_LIMIT_EXCEEDED", "Too many verification requests; try again later",
                                  retry_after_ms=wait_ms)

    def _link(self, session: Session) -> str:
        query = urlencode({"sid": session.sid, "client_secret": session.client_secret, "token": session.token})
        return f"{self.config.server.public_url}{SUBMIT_PATH.format(medium=session.medium)}?{query}"

    async def _send(self, session: Session) -> None:
        """The session's token to its address, with the link that proves it."""
        link = self._link(session)
        if session.medium == "email":
            if self.email is None:
                raise SendError("email is not configured (no email section in the config)")
            await self.email.send("validation", session.address, {
                "VALIDATION_LINK": link, "VALIDATION_TOKEN": session.token, "NEXT_URL": link})
        else:
            if self.sms is None:
                raise SendError("SMS is not configured (no sms section in the config)")
            # NEXT_URL: as in mxisd, the validation link.
            await self.sms.send("validation", session.address, {"VALIDATION_TOKEN": session.token,
                                                                 "VALIDATION_LINK": link, "NEXT_URL": link})
