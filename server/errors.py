"""Matrix errors: {"errcode", "error"} bodies with the spec's status codes."""

from __future__ import annotations

from typing import Any


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
