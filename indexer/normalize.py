"""Canonical forms of Matrix IDs and 3PIDs (email addresses, phone numbers as msisdn)."""

from __future__ import annotations

import base64
import hashlib
import re
from functools import lru_cache

import idna
import phonenumbers

_LOCALPART = re.compile(r"^[a-z0-9._=\-/+]+$")
_MXID = re.compile(r"^@([^:\s]+):(\S+)$")
_MEDIUM = re.compile(r"^[a-z][a-z0-9_.-]{0,31}$")
_EMAIL_LOCAL_FORBIDDEN = re.compile(r"[\s<>()\[\],;:\\\"@\x00-\x1f\x7f-\x9f]")


class InvalidAddress(ValueError):
    """A 3PID or Matrix ID that has no canonical form."""


def localpart(value: str, lowercase: bool = True) -> str:
    """The canonical localpart, validated against the Matrix user ID grammar."""
    value = value.strip()
    if lowercase:
        value = value.lower()
    if not value or not _LOCALPART.match(value.lower()) or len(value) > 255:
        raise InvalidAddress(f"not a valid Matrix localpart: {value!r}")
    return value


def mxid(value: str, lowercase: bool = True) -> tuple[str, str]:
    """(mxid, localpart) of a full Matrix ID like @alice:example.org."""
    match = _MXID.match(value.strip())
    if not match:
        raise InvalidAddress(f"not a valid Matrix ID: {value!r}")
    local = localpart(match.group(1), lowercase)
    return f"@{local}:{match.group(2).lower()}", local


# An organisation's addresses share a few domains, and IDNA processing is most of an address's cost.
@lru_cache(maxsize=4096)
def _unicode_domain(domain: str) -> str:
    return idna.decode(idna.encode(domain.rstrip("."), uts46=True))


@lru_cache(maxsize=4096)
def _ascii_domain(domain: str) -> str:
    return idna.encode(domain, uts46=True).decode("ascii")


def email(value: str) -> str:
    """An email address trimmed, case-folded, with its domain in Unicode (IDNA) form."""
    value = value.strip()
    local, sep, domain = value.rpartition("@")
    if not sep or not local or not domain or _EMAIL_LOCAL_FORBIDDEN.search(local) or len(value) > 500:
        raise InvalidAddress(f"not a valid email address: {value!r}")
    try:
        domain = _unicode_domain(domain)
    except idna.IDNAError as exc:
        raise InvalidAddress(f"not a valid email domain in {value!r}: {exc}") from None
    return f"{local.casefold()}@{domain}"


def email_domain(value: str) -> str:
    """An email domain in the form canonical addresses hold it (case-folded, Unicode)."""
    try:
        return _unicode_domain(value.strip())
    except idna.IDNAError as exc:
        raise InvalidAddress(f"not a valid email domain: {value!r}: {exc}") from None


def msisdn(value: str, default_region: str | None) -> str:
    """A phone number as E.164 digits without "+" (the Matrix msisdn form)."""
    text = value.strip()
    try:
        number = phonenumbers.parse(text, default_region)
    except phonenumbers.NumberParseException as exc:
        raise InvalidAddress(f"not a valid phone number: {value!r} ({exc})") from None
    if not phonenumbers.is_possible_number(number):
        raise InvalidAddress(f"not a possible phone number: {value!r}")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164).lstrip("+")


def threepid(medium: str, address: str, default_region: str | None) -> tuple[str, str]:
    """(medium, canonical address) for any medium; unknown media keep their address trimmed."""
    medium = medium.strip().lower()
    if not _MEDIUM.match(medium):
        raise InvalidAddress(f"not a valid 3PID medium: {medium!r}")
    if medium == "email":
        return medium, email(address)
    if medium == "msisdn":
        return medium, msisdn(address, default_region)
    address = address.strip()
    if not address:
        raise InvalidAddress(f"empty {medium} address")
    return medium, address


def lookup_forms(medium: str, address: str) -> list[str]:
    """Every address string a client may send for this canonical 3PID: an email's domain both as
    Unicode and as its ASCII (punycode) form."""
    forms = [address]
    if medium == "email":
        local, _, domain = address.rpartition("@")
        ascii_domain = _ascii_domain(domain)
        if ascii_domain != domain:
            forms.append(f"{local}@{ascii_domain}")
    return forms


def query_address(medium: str, address: str) -> str:
    """The canonical form of an address sent in a lookup, or the address as sent when it has none."""
    try:
        return threepid(medium, address, None)[1]
    except InvalidAddress:
        return address


def lookup_hash(address: str, medium: str, pepper: str) -> str:
    """The v2 sha256 lookup hash: base64url_nopad(sha256("<address> <medium> <pepper>"))."""
    digest = hashlib.sha256(f"{address} {medium} {pepper}".encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
