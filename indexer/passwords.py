"""Checking a password against a stored hash: bcrypt, argon2, PBKDF2-SHA256 and SHA-512 crypt.

The format is recognised from the hash itself. An unknown or malformed hash is a failed check with
a logged reason (never the hash itself), so one bad row cannot break logins for anyone else.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import unicodedata
from typing import Literal, cast

import argon2
import bcrypt
from passlib.hash import sha512_crypt

NormalForm = Literal["NFC", "NFD", "NFKC", "NFKD"]

log = logging.getLogger(__name__)

_argon2 = argon2.PasswordHasher()
# bcrypt only ever used the first 72 bytes; bcrypt>=5 raises instead of truncating, which would turn
# a correct long password checked against a hash made by any older library into an error.
_BCRYPT_MAX = 72


def _ab64(text: str) -> bytes:
    """passlib's "adapted base64": '.' for '+', no padding."""
    text = text.replace(".", "+")
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _pbkdf2(secret: bytes, stored: str) -> bool:
    """$pbkdf2-sha256$rounds$salt$hash (passlib, ab64) or pbkdf2_sha256$rounds$salt$hash (Django)."""
    if stored.startswith("$pbkdf2-sha256$"):
        _, _, rounds, salt_text, hash_text = stored.split("$")
        salt, expected = _ab64(salt_text), _ab64(hash_text)
    else:
        _, rounds, salt_text, hash_text = stored.split("$")
        salt, expected = salt_text.encode(), base64.b64decode(hash_text, validate=True)
    if not rounds.isdigit() or not expected:
        raise ValueError("bad rounds or digest")
    actual = hashlib.pbkdf2_hmac("sha256", secret, salt, int(rounds), len(expected))
    return hmac.compare_digest(actual, expected)


def _argon2_check(secret: bytes, stored: str) -> bool:
    try:
        return _argon2.verify(stored, secret)
    except argon2.exceptions.VerifyMismatchError:
        return False
    except (argon2.exceptions.InvalidHashError, argon2.exceptions.VerificationError) as exc:
        raise ValueError(str(exc)) from None


def _bcrypt_check(secret: bytes, stored: str) -> bool:
    return bcrypt.checkpw(secret[:_BCRYPT_MAX], stored.encode("ascii"))


def _sha512_crypt_check(secret: bytes, stored: str) -> bool:
    return sha512_crypt.verify(secret, stored)


_FORMATS = (
    (("$2a$", "$2b$", "$2y$"), "bcrypt", _bcrypt_check),
    (("$argon2id$", "$argon2i$", "$argon2d$"), "argon2", _argon2_check),
    (("$pbkdf2-sha256$", "pbkdf2_sha256$"), "PBKDF2-SHA256", _pbkdf2),
    (("$6$",), "SHA-512 crypt", _sha512_crypt_check),
)


def verify(password: str, stored: str | None, *, pepper: str = "", normalize: str | None = None,
           who: str = "?") -> bool:
    """Whether password matches the stored hash. pepper is appended to the password before hashing
    (as Synapse's password_config.pepper is); normalize is a Unicode form such as "NFKC" applied
    first (as Synapse does). who names the account in log lines."""
    if not password:
        return False
    if not stored:
        log.info("login for %s refused: the account has no password hash", who)
        return False
    if normalize:
        password = unicodedata.normalize(cast(NormalForm, normalize), password)  # the schema lists the forms
    secret = password.encode("utf-8") + pepper.encode("utf-8")
    for prefixes, name, check in _FORMATS:
        if stored.startswith(prefixes):
            try:
                return check(secret, stored)
            except (ValueError, TypeError, binascii.Error) as exc:
                log.warning("login for %s refused: malformed %s hash (%s)", who, name, type(exc).__name__)
                return False
    # Nothing of the value is logged: an unknown "hash" may be a password stored in clear.
    log.warning("login for %s refused: the stored password hash is in none of the formats %s", who,
                ", ".join(name for _, name, _ in _FORMATS))
    return False
