"""Matrix errors: {"errcode", "error"} bodies with the spec's status codes, and the log line of a 400."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from indexer import logs

if TYPE_CHECKING:
    from sanic import Request

log = logging.getLogger(__name__)

# Enough of a value to recognise it; a client cannot fill the log with its bodies.
SHOWN_CHARS = 200


class MatrixError(Exception):
    """An error answered to the client as a Matrix error body."""

    def __init__(self, status: int, errcode: str, error: str, **extra: Any) -> None:
        super().__init__(error)
        self.status = status
        self.errcode = errcode
        self.error = error
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"errcode": self.errcode, "error": self.error, **self.extra}


def shown(value: str) -> str:
    """An untrusted value as a log line may carry it: quoted, line breaks and control characters
    escaped (a client cannot forge a line of its own), cut to SHOWN_CHARS (logs.untrusted)."""
    return logs.untrusted(repr(value), SHOWN_CHARS)


def log_bad_request(request: Request, error: MatrixError) -> None:
    """One line for a 400 we answer, with its reason: a client that gets one (such as a homeserver
    that then fails its own user) leaves the operator something to read."""
    route = "/" + request.route.path if request.route is not None else shown(request.path)
    log.info("400 %s for %s %s: %s", error.errcode, request.method, route, shown(error.error))
