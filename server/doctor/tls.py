"""Failed HTTP requests in words, a refused TLS certificate told apart from other failures."""

from __future__ import annotations

import re

import httpx

from server.doctor import Finding, problem

_VERIFY_FAILED = re.compile(r"certificate verify failed: ([^(]*)")


def bad_certificate(error: str) -> str | None:
    """Why the peer's certificate was refused, when error is a refused certificate."""
    match = _VERIFY_FAILED.search(error)
    return match.group(1).strip() if match else None


def request_failed(subject: str, url: str, exc: httpx.HTTPError, certificate_advice: str,
                   advice: str) -> Finding:
    """The problem of a request to url that failed: with certificate_advice when the certificate was
    refused, else with advice."""
    reason = bad_certificate(str(exc))
    if reason is not None:
        return problem(subject, f"{url} has no valid TLS certificate ({reason}): {certificate_advice}")
    return problem(subject, f"{url} cannot be reached: {type(exc).__name__}: {exc}: {advice}")
