"""Log setup shared by every mxisd process: one line per event (text or JSON), naming the process's
role and the request that caused it, with secrets masked."""

from __future__ import annotations

import contextvars
import json
import logging
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

# The id of the HTTP request (or of the job it started) being handled, for every log line it causes.
request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

_SECRET_PARAM = re.compile(
    r"""(?P<key>["']?\b(?:access_token|token|password|passwd|client_secret|secret)["']?\s*[=:]\s*["']?)"""
    r"""(?P<value>[^&\s"',}]+)""",
    re.IGNORECASE,
)
_BEARER = re.compile(r"(?P<key>\bBearer\s+)(?P<value>[^\s\"',]+)", re.IGNORECASE)
REDACTED = "<redacted>"

UNTRUSTED_MAX = 200  # characters of a client-supplied value in a log line
MESSAGE_MAX = 8192  # characters of any one message: no event can flood the log
# Line and paragraph separators, and every C0/C1 control character: none may start a forged line.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escape(match: re.Match[str]) -> str:
    return match.group().encode("unicode_escape").decode("ascii")


def untrusted(value: object, limit: int = UNTRUSTED_MAX) -> str:
    """A client-supplied value (login ID, address, path) as it may appear in a log line: control
    characters escaped as \\n, \\x00 and so on, and cut after limit characters, saying how many more."""
    text = value if isinstance(value, str) else str(value)
    more = len(text) - limit
    text = _CONTROL.sub(_escape, text[:limit] if more > 0 else text)
    return f"{text}...(+{more} characters)" if more > 0 else text


def one_line(message: str) -> str:
    """message escaped and capped as untrusted() does, for values that reached a message unescaped."""
    return untrusted(message, MESSAGE_MAX)


def mask_secrets(text: str) -> str:
    """text with the values of token, password and secret parameters (and bearer tokens) masked."""
    text = _SECRET_PARAM.sub(lambda m: m.group("key") + REDACTED, text)
    return _BEARER.sub(lambda m: m.group("key") + REDACTED, text)


class _Context(logging.Filter):
    """Adds the role and request id, and masks secrets in the message before any handler sees it."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def filter(self, record: logging.LogRecord) -> bool:
        record.role = self.role
        record.request_id = request_id.get()
        record.msg, record.args = one_line(mask_secrets(record.getMessage())), None
        return True


_ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]


def _added(record: logging.LogRecord, name: str) -> Any:
    """An attribute _Context added to the record (the type of LogRecord does not know them)."""
    return record.__dict__[name]


class _Text(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(role)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        request = _added(record, "request_id")
        return line if request is None else f"{line} [request {request}]"

    def formatException(self, ei: _ExcInfo) -> str:  # noqa: N802 (logging's name)
        return mask_secrets(super().formatException(ei))


class _Json(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "process": _added(record, "role"),
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if _added(record, "request_id") is not None:
            event["request_id"] = _added(record, "request_id")
        if hasattr(record, "http"):  # the access log's fields
            event["http"] = record.http
        if record.exc_info:
            event["exception"] = mask_secrets(self.formatException(record.exc_info))
        return json.dumps(event, ensure_ascii=False)


# (level, format) as setup() last set them, for the processes this one spawns.
_settings = ("WARNING", "text")


def setup(level: str, role: str, fmt: str = "text") -> None:
    """Send every logger's events to stderr, one line each, in the configured format."""
    global _settings
    _settings = (level, fmt)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_Context(role))
    handler.setFormatter(_Json() if fmt == "json" else _Text())
    logging.basicConfig(level=getattr(logging, level), handlers=[handler], force=True)
    # httpx logs every request at INFO: one line per read-through lookup or sync page is noise.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, getattr(logging, level)))


def settings() -> tuple[str, str]:
    """(level, format) of this process's logging, for setup() in a process it spawns."""
    return _settings


def describe_exit(status: int) -> str:
    """A child process's exit status (a negative one: the signal that killed it) for a message."""
    if status < 0:
        try:
            return f"was killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"was killed by signal {-status}"
    return f"exited with status {status}"


class Repeated:
    """Logs an error at its first occurrence, then at most once per interval with how many times it
    came meanwhile, so that an outage hit by every request writes a line a minute, not a line a request.
    The count is written with the next occurrence after the interval (an outage that ends leaves its
    last count unwritten: the lines before it said the fault was going on)."""

    def __init__(self, interval_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, int, str], tuple[float, int]] = {}  # key -> (last logged, since then)

    def log(self, logger: logging.Logger, level: int, msg: str, *args: object, key: str | None = None,
            exc_info: bool = False) -> None:
        """Log msg % args unless the same message (or key) was logged less than interval_s ago (with
        exc_info, the exception being handled is logged with it)."""
        text = msg % args if args else msg
        ident = (logger.name, level, key if key is not None else text)
        now = self.clock()
        with self._lock:
            last, count = self._seen.get(ident, (None, 0))
            if last is not None and now - last < self.interval_s:
                self._seen[ident] = (last, count + 1)
                return
            self._seen[ident] = (now, 0)
            if len(self._seen) > 10_000:  # keys that carry a varying part must not grow without end
                self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.interval_s}
        if count:
            text += f" ({count} more times in the last {now - last:.0f} s)"  # type: ignore[operator]
        logger.log(level, "%s", text, exc_info=exc_info)

    def error(self, logger: logging.Logger, msg: str, *args: object, key: str | None = None,
              exc_info: bool = False) -> None:
        self.log(logger, logging.ERROR, msg, *args, key=key, exc_info=exc_info)

    def warning(self, logger: logging.Logger, msg: str, *args: object, key: str | None = None) -> None:
        self.log(logger, logging.WARNING, msg, *args, key=key)


# Shared by every module of a process: one outage seen by several modules is still one line a minute each.
repeated = Repeated()
