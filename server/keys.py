"""The server's long-term ed25519 signing key and JSON signing (signedjson)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey
from signedjson.key import decode_signing_key_base64, encode_verify_key_base64, generate_signing_key, get_verify_key
from signedjson.sign import sign_json
from unpaddedbase64 import encode_base64

log = logging.getLogger(__name__)

KEY_ID = "ed25519:0"


class Keys:
    """The long-term key, loaded once and reused for every signature."""

    def __init__(self, signing_key: SigningKey, server_name: str) -> None:
        self.signing_key = signing_key
        self.server_name = server_name
        self.public_key = encode_verify_key_base64(get_verify_key(signing_key))

    @classmethod
    def load_or_create(cls, data_dir: str | Path, server_name: str) -> "Keys":
        """Read data_dir/keys/signing.key, generating it (mode 0600) on first start."""
        path = Path(data_dir) / "keys" / "signing.key"
        if path.exists():
            algorithm, version, seed = path.read_text().split()
            key = decode_signing_key_base64(algorithm, version, seed)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            key = generate_signing_key("0")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(f"ed25519 0 {encode_base64(key.encode())}\n")
            log.info("generated a new signing key in %s", path)
        return cls(key, server_name)

    def sign(self, body: dict[str, Any]) -> dict[str, Any]:
        """body with our signature added under the server name and key ed25519:0."""
        return sign_json(body, self.server_name, self.signing_key)
