"""The server's long-term ed25519 signing key and JSON signing (signedjson)."""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from signedjson.key import decode_signing_key_base64, encode_verify_key_base64, generate_signing_key, get_verify_key
from signedjson.sign import sign_json
from signedjson.types import SigningKey
from unpaddedbase64 import encode_base64

log = logging.getLogger(__name__)

# A signed v1 association is handed out again for this long (and re-signed after), so that a
# popular address costs one ed25519 signature per minute instead of one per request; its
# not_after stays at least association_validity minus this in the future.
ASSOCIATION_REUSE_MS = 60_000
ASSOCIATIONS_KEPT = 10_000


def key_path(data_dir: str | Path) -> Path:
    """Where the long-term key of a data_dir is kept."""
    return Path(data_dir) / "keys" / "signing.key"


def read_signing_key(path: Path) -> SigningKey:
    """The key in a key file ("ed25519 <version> <seed in unpadded base64>"); OSError when it cannot
    be read, ValueError when it holds something else."""
    parts = path.read_text().split()
    if len(parts) != 3:
        raise ValueError("expected one line \"ed25519 <version> <base64 seed>\"")
    return decode_signing_key_base64(*parts)


def write_signing_key(data_dir: str | Path, key: SigningKey) -> None:
    """Write key as data_dir/keys/signing.key (mode 0600); refuses to replace an existing file."""
    path = key_path(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(f"{key.alg} {key.version} {encode_base64(key.encode())}\n")


class SigningKeys:
    """The long-term key, loaded once and reused for every signature."""

    def __init__(self, signing_key: SigningKey, server_name: str) -> None:
        self.signing_key = signing_key
        self.server_name = server_name
        self.public_key = encode_verify_key_base64(get_verify_key(signing_key))
        # "ed25519:0" for a key made here; a key taken over from mxisd keeps its serial.
        self.key_id = f"{signing_key.alg}:{signing_key.version}"
        self._associations: OrderedDict[tuple[str, str, str], dict[str, Any]] = OrderedDict()

    @classmethod
    def load_or_create(cls, data_dir: str | Path, server_name: str) -> SigningKeys:
        """Read data_dir/keys/signing.key, generating it (mode 0600) on first start."""
        path = key_path(data_dir)
        if path.exists():
            key = read_signing_key(path)
        else:
            key = generate_signing_key("0")
            write_signing_key(data_dir, key)
            log.info("generated a new signing key in %s", path)
        return cls(key, server_name)

    def sign(self, body: dict[str, Any]) -> dict[str, Any]:
        """body with our signature added under the server name and our key id."""
        return sign_json(body, self.server_name, self.signing_key)

    def association(self, medium: str, address: str, mxid: str, validity_ms: int) -> dict[str, Any]:
        """The signed v1 association of a 3PID with mxid, valid from now for validity_ms; the same
        signed object is reused for ASSOCIATION_REUSE_MS (the most recent ASSOCIATIONS_KEPT kept)."""
        now = int(time.time() * 1000)
        key = (medium, address, mxid)
        signed = self._associations.get(key)
        if signed is not None and now - signed["ts"] < min(ASSOCIATION_REUSE_MS, validity_ms // 2):
            self._associations.move_to_end(key)
            return signed
        signed = self.sign({"address": address, "medium": medium, "mxid": mxid,
                           "not_before": now, "not_after": now + validity_ms, "ts": now})
        self._associations[key] = signed
        if len(self._associations) > ASSOCIATIONS_KEPT:
            self._associations.popitem(last=False)
        return signed
