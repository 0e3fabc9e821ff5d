"""Notifications to a 3PID: email over SMTP and SMS through Twilio, from %PLACEHOLDER% templates."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from urllib.parse import quote


class SendError(Exception):
    """The message could not be handed over; the message says why (no secrets)."""


class AddressRefused(SendError):
    """Nothing can be sent to this address the way the server is set up (no IDNA form, refused by
    the SMTP server, or beyond ASCII where it does not offer SMTPUTF8): the client's to fix (400)."""


def read_template(path: str | None, default: str) -> str:
    """The configured template file, or the one shipped in server/notify/templates/."""
    if path:
        return Path(path).read_text(encoding="utf-8")
    return resources.files(__package__).joinpath("templates", default).read_text(encoding="utf-8")


def render(template: str, values: dict[str, str]) -> str:
    """Replace every %NAME% whose NAME is in values; unknown placeholders stay as written."""
    for name, value in values.items():
        template = template.replace(f"%{name}%", value)
    return template


def recipient_values(domain: str, medium: str, address: str) -> dict[str, str]:
    """mxisd's placeholders of every message, so that its templates work unchanged."""
    return {
        "DOMAIN": domain,
        "DOMAIN_PRETTY": domain[:1].upper() + domain[1:],
        "RECIPIENT_MEDIUM": medium,
        "RECIPIENT_MEDIUM_URL_ENCODED": quote(medium, safe=""),
        "RECIPIENT_ADDRESS": address,
        "RECIPIENT_ADDRESS_URL_ENCODED": quote(address, safe=""),
    }
