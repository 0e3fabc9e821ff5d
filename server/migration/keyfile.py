"""mxisd's and ma1sd's signing key stores, read for `mxisd import-data`.

`key.path` is a folder (mxisd 1.3 and later, ma1sd): `current` names the key in use as JSON
`{"type", "algo", "serial"}`, and each key is a JSON file `{"version", "isValid", "key"}` (the key a
base64 ed25519 seed) at `regular/ed25519/<serial>` (long-term) or `ephemeral/ed25519/<serial>` (one
per stored invite). Before 1.3 it was a single file holding the seed, which mxisd gave serial `0`.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nacl.exceptions import CryptoError
from signedjson.key import decode_signing_key_base64, encode_verify_key_base64, get_verify_key
from signedjson.types import SigningKey
from unpaddedbase64 import encode_base64

from server.migration import MigrationError

SEED_BYTES = 32
_KEY_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-.")


@dataclass
class OldKeys:
    """The long-term key (its version is mxisd's serial, so its key id stays `ed25519:<serial>`) and
    the public halves of the ephemeral keys, by serial."""

    signing_key: SigningKey
    ephemeral: dict[str, str] = field(default_factory=dict)

    @property
    def public_key(self) -> str:
        return encode_verify_key_base64(get_verify_key(self.signing_key))


def _seed(text: str, where: Path) -> bytes:
    """A base64 seed in any of the spellings Java's encoders make (padded or not, URL-safe or not);
    a 64-byte NaCl secret key is its seed followed by its public key."""
    cleaned = text.strip().rstrip("=")
    padded = cleaned + "=" * (-len(cleaned) % 4)
    for altchars in (None, b"-_"):
        try:
            raw = base64.b64decode(padded, altchars=altchars, validate=True)
        except (binascii.Error, ValueError):
            continue
        if len(raw) in (SEED_BYTES, 2 * SEED_BYTES):
            return raw[:SEED_BYTES]
    raise MigrationError(f"{where}: not an ed25519 key (expected a base64 seed of {SEED_BYTES} bytes)")


def _signing_key(seed: bytes, serial: str, where: Path) -> SigningKey:
    if not serial or not set(serial) <= _KEY_ID_CHARS:
        raise MigrationError(f"{where}: the key serial {serial!r} cannot be a Matrix key id")
    try:
        return decode_signing_key_base64("ed25519", serial, encode_base64(seed))
    except (CryptoError, ValueError) as exc:
        raise MigrationError(f"{where}: not an ed25519 key: {exc}") from None


def _json_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise MigrationError(f"cannot read {path}: {exc}") from None
    except ValueError:
        raise MigrationError(f"{path}: not JSON (expected mxisd's key file format)") from None
    if not isinstance(data, dict):
        raise MigrationError(f"{path}: expected a JSON object")
    return data


def _key_file(path: Path) -> tuple[bytes, bool]:
    """The seed of one key file and whether mxisd still counted it valid."""
    data = _json_file(path)
    if not isinstance(data.get("key"), str):
        raise MigrationError(f"{path}: has no \"key\" (expected mxisd's key file format)")
    return _seed(data["key"], path), data.get("isValid", True) is not False


def _current_serial(folder: Path) -> str | None:
    """The serial `current` names, else (as mxisd did at start) the first valid long-term key's."""
    current = folder / "current"
    if current.exists():
        data = _json_file(current)
        if data.get("type", "regular") != "regular" or data.get("algo", "ed25519") != "ed25519":
            raise MigrationError(f"{current}: the current key is not a regular ed25519 key: {data}")
        serial = data.get("serial")
        if not isinstance(serial, str):
            raise MigrationError(f"{current}: has no \"serial\"")
        return serial
    regular = folder / "regular" / "ed25519"
    for path in sorted(regular.iterdir()) if regular.is_dir() else []:
        if _key_file(path)[1]:
            return path.name
    return None


def read_old_keys(path: str | Path) -> OldKeys:
    """The key store at mxisd's `key.path`: a key folder, or a single pre-1.3 key file."""
    location = Path(path)
    if location.is_file():
        text = location.read_text(encoding="utf-8", errors="replace").strip()
        parts = text.split()
        if len(parts) == 3 and parts[0] == "ed25519":  # the signedjson line Synapse and Sydent write
            return OldKeys(_signing_key(_seed(parts[2], location), parts[1], location))
        return OldKeys(_signing_key(_seed(text, location), "0", location))
    if not location.is_dir():
        raise MigrationError(f"no mxisd key store at {location} (key.path: a folder, or a key file)")
    serial = _current_serial(location)
    if serial is None:
        raise MigrationError(f"{location}: holds no valid long-term key (regular/ed25519/<serial>)")
    key_file = location / "regular" / "ed25519" / serial
    if not key_file.is_file():
        raise MigrationError(f"{location}: the current key {serial!r} has no file {key_file}")
    seed, _valid = _key_file(key_file)
    keys = OldKeys(_signing_key(seed, serial, key_file))
    ephemeral = location / "ephemeral" / "ed25519"
    for item in sorted(ephemeral.iterdir()) if ephemeral.is_dir() else []:
        # mxisd called an ephemeral key valid whatever its file said: so do we.
        seed, _valid = _key_file(item)
        keys.ephemeral[item.name] = encode_verify_key_base64(get_verify_key(_signing_key(seed, "0", item)))
    return keys
