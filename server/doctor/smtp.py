"""The check of the SMTP server: it accepts a connection, TLS as configured, and the login."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

from server.doctor import Finding, not_checked, ok, problem
from server.notify import SendError
from server.notify.email import EmailSender

SUBJECT = "email"


def check(config: dict[str, Any]) -> Iterator[Finding]:
    if "email" not in config:
        yield not_checked(SUBJECT, "no email section: email validation and invitations by email are off")
        return
    smtp = config["email"]["smtp"]
    try:
        asyncio.run(EmailSender(config["email"], config["matrix"]["domain"]).try_login())
    except SendError as exc:
        yield problem(SUBJECT, f"{exc}: check email.smtp")
        return
    login = f"accepts the login as {smtp['login']}" if smtp.get("login") else "accepts a connection (no login set)"
    yield ok(SUBJECT, f"SMTP server {smtp['host']}:{smtp['port']} {login} (TLS: {smtp['tls']})")
