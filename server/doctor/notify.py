"""Checks of the senders of notifications: the SMTP server accepts a connection, TLS as configured
and the login; Twilio accepts the account's credentials. Nothing is sent."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from indexer.settings import Config
from server.doctor import Finding, not_checked, ok, problem
from server.notify import SendError
from server.notify.email import EmailSender
from server.notify.sms import SmsSender

EMAIL = "email"
SMS = "sms"


def email(config: Config) -> Iterator[Finding]:
    if config.email is None:
        yield not_checked(EMAIL, "no email section: email validation and invitations by email are off")
        return
    smtp = config.email.smtp
    try:
        asyncio.run(EmailSender(config.email, config.matrix.domain).try_login())
    except SendError as exc:
        yield problem(EMAIL, f"{exc}: check email.smtp")
        return
    login = f"accepts the login as {smtp.login}" if smtp.login else "accepts a connection (no login set)"
    yield ok(EMAIL, f"SMTP server {smtp.host}:{smtp.port} {login} (TLS: {smtp.tls})")


def sms(config: Config) -> Iterator[Finding]:
    if config.sms is None:
        yield not_checked(SMS, "no sms section: phone number validation is off")
        return
    sender = SmsSender(config.sms, config.matrix.domain)
    try:
        status = asyncio.run(sender.check_account())
    except SendError as exc:
        yield problem(SMS, f"{exc}: check sms.twilio")
        return
    yield ok(SMS, f"Twilio at {sender.base_url} accepts the account {sender.account_sid} (status {status})")
