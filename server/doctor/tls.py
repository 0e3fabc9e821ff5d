"""Failures of TLS told apart from other failures to connect, in words."""

from __future__ import annotations

import re

_VERIFY_FAILED = re.compile(r"certificate verify failed: ([^(]*)")


def bad_certificate(error: str) -> str | None:
    """Why the peer's certificate was refused, when error is a refused certificate."""
    match = _VERIFY_FAILED.search(error)
    return match.group(1).strip() if match else None
