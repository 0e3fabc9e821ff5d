"""Email over SMTP (aiosmtplib): a template is a complete message, headers then body."""

from __future__ import annotations

import email.errors
import email.policy
import email.utils
import logging
import re
from email.message import EmailMessage
from email.parser import BytesParser, Parser
from typing import Any

import aiosmtplib
import idna

from indexer.settings import EmailConfig
from server.metrics import NOTIFICATIONS
from server.notify import AddressRefused, SendError, read_template, recipient_values, render

log = logging.getLogger(__name__)

_LINE_BREAKS = re.compile(r"[\r\n]+")


def render_message(template: str, values: dict[str, str]) -> EmailMessage:
    """The template with values filled in; in the header block a value cannot start a new header."""
    text = template.replace("\r\n", "\n")
    head, sep, body = text.partition("\n\n")
    safe = {k: _LINE_BREAKS.sub(" ", v) for k, v in values.items()}
    head = render(head, safe) + sep
    # The body as UTF-8 bytes: text beyond ASCII then goes out 8-bit, or re-encoded in its charset
    # where the SMTP server cannot take 8-bit. Headers set again through the API are encoded (RFC
    # 2047) where they go beyond ASCII: as parsed, they would go out raw.
    message = BytesParser(policy=email.policy.default).parsebytes((head + render(body, values)).encode("utf-8"))
    headers = list(Parser(policy=email.policy.default).parsestr(head, headersonly=True).items())
    for name in {name for name, _ in headers}:
        del message[name]
    for name, value in headers:
        message[name] = str(value)
    return message


class EmailSender:
    """Sends rendered templates with the configured SMTP server and identity."""

    def __init__(self, settings: EmailConfig, domain: str) -> None:
        self.smtp = settings.smtp
        self.sender = settings.from_
        self.sender_name = settings.from_name
        self.domain = domain
        self.templates = settings.templates

    def _smtp_options(self) -> dict[str, Any]:
        """How to reach the SMTP server and log in, as aiosmtplib takes it."""
        tls = self.smtp.tls
        return {"hostname": self.smtp.host, "port": self.smtp.port, "use_tls": tls == "tls",
                "start_tls": tls == "starttls", "username": self.smtp.login, "password": self.smtp.password,
                "cert_bundle": self.smtp.ca_file, "timeout": self.smtp.timeout_s}

    async def try_login(self) -> None:
        """Connect, start TLS and log in as configured, then quit without sending; SendError saying
        which step failed."""
        where = f"SMTP server {self.smtp.host}:{self.smtp.port}"
        client = aiosmtplib.SMTP(**self._smtp_options())
        try:
            await client.connect()
        except aiosmtplib.SMTPAuthenticationError as exc:
            raise SendError(f"{where} refused the login as {self.smtp.login}: {exc.code} {exc.message}") from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise SendError(f"{where} cannot be reached: {exc}") from None
        try:
            await client.quit()
        except (aiosmtplib.SMTPException, OSError):
            client.close()  # the check is over: how the server takes a goodbye does not matter

    def template(self, kind: str) -> str:
        return read_template(getattr(self.templates, kind), f"email-{kind}.eml")

    def base_values(self, address: str) -> dict[str, str]:
        return {**recipient_values(self.domain, "email", address), "FROM_EMAIL": self.sender,
                "FROM_NAME": self.sender_name}

    async def send(self, kind: str, address: str, values: dict[str, str]) -> None:
        """Render the template of this kind for address and send it, to address only. The domain goes
        out in its ASCII (IDNA) form; a local part beyond ASCII needs an SMTP server offering SMTPUTF8."""
        local, _, domain = address.rpartition("@")
        try:
            address = f"{local}@{idna.encode(domain, uts46=True).decode('ascii')}"
        except idna.IDNAError as exc:
            raise AddressRefused(f"the domain of {address!r} has no IDNA form: {exc}") from None
        # The config's values win: what a caller passes never replaces the sender or the recipient.
        message = render_message(self.template(kind), {**values, **self.base_values(address)})
        if "From" not in message:
            message["From"] = email.utils.formataddr((self.sender_name, self.sender))
        if "To" not in message:
            message["To"] = address
        if "Date" not in message:
            message["Date"] = email.utils.formatdate(localtime=False)
        if "Message-ID" not in message:
            message["Message-ID"] = email.utils.make_msgid(domain=self.sender.rpartition("@")[2] or None)
        try:
            await aiosmtplib.send(message, sender=self.sender, recipients=[address], **self._smtp_options())
        except (aiosmtplib.SMTPNotSupported, aiosmtplib.SMTPRecipientsRefused, aiosmtplib.SMTPRecipientRefused,
                ValueError, email.errors.MessageError) as exc:
            # ValueError and MessageError: an address the message cannot carry (UnicodeError is one).
            NOTIFICATIONS.labels("email", "failed").inc()
            raise AddressRefused(f"{address!r} cannot be sent to: {exc}") from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            NOTIFICATIONS.labels("email", "failed").inc()
            raise SendError(f"SMTP server {self.smtp.host}:{self.smtp.port} refused or failed: {exc}") from None
        NOTIFICATIONS.labels("email", "sent").inc()
        log.info("sent %s email to %s via %s:%d", kind, address, self.smtp.host, self.smtp.port)
