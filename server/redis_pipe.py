"""One asyncio Redis connection per worker that pipelines every caller's commands: the HTTP
server's hot reads (lookups) go through it.

redis-py's asyncio client takes a pooled connection, sends, waits and gives it back for each
command: about 60 us of CPU per command, which was most of what a single lookup cost. Here a
command is one write on a shared connection and its reply one item parsed by hiredis; concurrent
requests' commands travel together, so the round trips overlap too (about 6 us per command). Errors
are redis-py's exception classes, so callers and the error mapping treat both clients alike.

Every call has a deadline (connecting included): past it the call raises redis.exceptions.TimeoutError
and the connection is dropped, since the replies still owed on it would arrive out of step.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from typing import Any, cast

import hiredis
import redis.exceptions
from redis.asyncio.connection import SSLConnection, parse_url

TIMEOUT_S = 5.0


class _Protocol(asyncio.Protocol):
    """Replies come back in the order the commands went out: each resolves the oldest waiter."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader(encoding="utf-8")
        self.waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.outgoing: list[bytes] = []
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        try:
            while (reply := self.reader.gets()) is not False:
                waiter = self.waiting.popleft()
                if waiter.done():  # its request was cancelled; the reply still had to be read
                    continue
                if isinstance(reply, hiredis.ReplyError):
                    waiter.set_exception(_error(str(reply)))
                else:
                    waiter.set_result(reply)
        except (hiredis.ProtocolError, IndexError) as exc:
            self._fail(redis.exceptions.ConnectionError(f"Redis sent what is not a reply: {exc}"))
            assert self.transport is not None
            self.transport.abort()

    def abandon(self, error: Exception) -> None:
        """Give up on this connection: every command still waiting fails with error."""
        self._fail(error)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(redis.exceptions.ConnectionError(f"Connection to Redis lost: {exc or 'closed by the server'}"))

    def _fail(self, error: Exception) -> None:
        self.lost = True
        while self.waiting:
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_exception(error)

    def send(self, commands: list[tuple[Any, ...]]) -> list[asyncio.Future[Any]]:
        if not commands:
            return []
        loop = asyncio.get_running_loop()
        waiters = [loop.create_future() for _ in commands]
        self.waiting.extend(waiters)
        if not self.outgoing:
            loop.call_soon(self._flush)
        self.outgoing.extend(hiredis.pack_command(c) for c in commands)
        return waiters

    def _flush(self) -> None:
        # Writes on loopback cost a system call each, as much as the rest of a lookup: the commands
        # of every request handled in one turn of the event loop leave in one write.
        data, self.outgoing = b"".join(self.outgoing), []
        if self.transport is not None and not self.lost:
            self.transport.write(data)


def _error(message: str) -> redis.exceptions.RedisError:
    if message.startswith(("WRONGPASS", "NOAUTH")) or "invalid password" in message:
        return redis.exceptions.AuthenticationError(message)
    return redis.exceptions.ResponseError(message)


async def _replies(waiters: list[asyncio.Future[Any]]) -> list[Any]:
    """Every waiter's reply, or the first error once all have come back (none is left unread)."""
    replies = await asyncio.gather(*waiters, return_exceptions=True)
    for reply in replies:
        if isinstance(reply, BaseException):
            raise reply
    return replies


class PipelinedRedis:
    """Connects on first use and again after the connection is lost (the commands in flight then
    fail with redis.exceptions.ConnectionError, as redis-py's would)."""

    def __init__(self, url: str, timeout_s: float = TIMEOUT_S) -> None:
        self.options = parse_url(url)
        self.timeout_s = timeout_s
        self._protocol: _Protocol | None = None
        self._attempt: asyncio.Future[_Protocol] | None = None

    async def execute(self, *command: Any) -> Any:
        """The reply to one command."""
        [reply] = await self.execute_many([command])
        return reply

    async def execute_many(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """The replies to several commands sent together (one round trip); the first error raises."""
        protocol: _Protocol | None = None
        try:
            async with asyncio.timeout(self.timeout_s):
                protocol = await self._connected()
                return await _replies(protocol.send(commands))
        except TimeoutError:
            error = redis.exceptions.TimeoutError(f"Redis did not answer within {self.timeout_s:g} s")
            if protocol is not None:
                protocol.abandon(error)
            raise error from None

    async def _connected(self) -> _Protocol:
        if self._protocol is not None and not self._protocol.lost:
            return self._protocol
        # Every request arriving while Redis is unreachable shares one attempt and its outcome:
        # one after another, a burst would wait a connect timeout each.
        attempt = self._attempt
        # An attempt whose callers all gave up before it ended is still used if it succeeded.
        if attempt is None or (attempt.done() and (attempt.cancelled() or attempt.exception() is not None
                                                   or attempt.result().lost)):
            attempt = self._attempt = asyncio.ensure_future(self._connect())
            # Its failure is read here too, for when every caller's own deadline ended first.
            attempt.add_done_callback(lambda done: done.cancelled() or done.exception())
        try:
            self._protocol = await asyncio.shield(attempt)
        finally:
            if attempt.done() and self._attempt is attempt:
                self._attempt = None
        return self._protocol

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        options = self.options
        setup: list[tuple[Any, ...]] = []
        if options.get("password"):
            setup.append(("AUTH", *([options["username"]] if options.get("username") else []), options["password"]))
        if options.get("db"):
            setup.append(("SELECT", options["db"]))
        protocol: _Protocol | None = None
        try:
            async with asyncio.timeout(self.timeout_s):
                if "path" in options:
                    _, protocol = await loop.create_unix_connection(_Protocol, options["path"])
                else:
                    _, protocol = await loop.create_connection(
                        _Protocol, options.get("host", "localhost"), options.get("port", 6379), ssl=self._tls())
                await _replies(protocol.send(setup))
        except BaseException as exc:
            if protocol is not None and protocol.transport is not None:
                protocol.transport.close()
            if not isinstance(exc, (OSError, TimeoutError)):
                raise
            raise redis.exceptions.ConnectionError(f"Cannot connect to Redis: {str(exc) or 'timed out'}") from None
        return protocol

    def _tls(self) -> ssl.SSLContext | None:
        if self.options.get("connection_class") is not SSLConnection:
            return None
        context = ssl.create_default_context(cafile=cast("str | None", self.options.get("ssl_ca_certs")))
        if self.options.get("ssl_cert_reqs") in ("none", ssl.CERT_NONE):
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def close(self) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
