"""One asyncio Redis connection per worker that pipelines every caller's commands: the HTTP
server's hot reads (lookups) go through it.

redis-py's asyncio client takes a pooled connection, sends, waits and gives it back for each
command: about 60 us of CPU per command, which was most of what a single lookup cost. Here a
command is one write on a shared connection and its reply one item parsed by hiredis; concurrent
requests' commands travel together, so the round trips overlap too (about 6 us per command). Errors
are redis-py's exception classes, so callers and the error mapping treat both clients alike.

Every call has a deadline (connecting included): past it the call raises redis.exceptions.TimeoutError
and the connection is dropped, since the replies still owed on it would arrive out of step. On a
connection that is up, the deadline is the connection's, not each call's: replies come in order, so
when the oldest command still waiting has waited the timeout, every command behind it fails too (a
timer per call, scheduled and cancelled, cost about 14 us of a lookup's 135).

With Redis Sentinel the same connection goes to the master that the sentinels name when it
connects; a reply saying that the node is now a replica drops it, like a lost connection, so the
next call asks again. With a Redis Cluster (ClusterPipe), each node gets such a connection, each
command goes to its slot's master, and the slot map is redis-py's cluster client's (README
"Redis Sentinel and Cluster" gives the figures).
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, cast

import hiredis
import redis.asyncio.cluster
import redis.exceptions
from redis.asyncio.connection import SSLConnection, parse_url
from redis.crc import key_slot

from indexer.redis_clients import RedisTarget, cluster_async, sentinel_async
from indexer.settings import RedisClusterConfig, RedisSentinelConfig, RedisTlsConfig

TIMEOUT_S = 5.0


class _Protocol(asyncio.Protocol):
    """Replies come back in the order the commands went out: each resolves the oldest waiter. A
    watchdog abandons the connection when the oldest command still waiting was sent timeout_s ago."""

    def __init__(self, timeout_s: float) -> None:
        self.reader = hiredis.Reader(encoding="utf-8")
        self.waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.outgoing: list[bytes] = []
        self.lost = False
        self.timeout_s = timeout_s
        self.sent = 0  # commands sent so far: those answered are sent - len(waiting)
        # (when a write left, commands sent up to it) of the writes not wholly answered, oldest first.
        self.writes: collections.deque[tuple[float, int]] = collections.deque()
        self.watchdog: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        demoted = False
        try:
            while (reply := self.reader.gets()) is not False:
                waiter = self.waiting.popleft()
                demoted = demoted or (isinstance(reply, hiredis.ReplyError) and str(reply).startswith("READONLY"))
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
        if demoted:
            # The master we connected to was made a replica (a Sentinel failover): connect anew.
            self.abandon(redis.exceptions.ConnectionError("the Redis master is now a replica"))

    def abandon(self, error: Exception) -> None:
        """Give up on this connection: every command still waiting fails with error."""
        self._fail(error)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(redis.exceptions.ConnectionError(f"Connection to Redis lost: {exc or 'closed by the server'}"))

    def _fail(self, error: Exception) -> None:
        self.lost = True
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
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
        self.sent += len(commands)
        if not self.outgoing:
            loop.call_soon(self._flush)
        self.outgoing.extend(hiredis.pack_command(c) for c in commands)
        return waiters

    def _flush(self) -> None:
        # Writes on loopback cost a system call each, as much as the rest of a lookup: the commands
        # of every request handled in one turn of the event loop leave in one write.
        data, self.outgoing = b"".join(self.outgoing), []
        if self.transport is not None and not self.lost:
            loop = asyncio.get_running_loop()
            self._forget_answered()
            self.writes.append((loop.time(), self.sent))
            self.transport.write(data)
            if self.watchdog is None:
                self.watchdog = loop.call_at(loop.time() + self.timeout_s, self._watch)

    def _forget_answered(self) -> None:
        answered = self.sent - len(self.waiting)
        while self.writes and self.writes[0][1] <= answered:
            self.writes.popleft()

    def _watch(self) -> None:
        """Abandon the connection if its oldest unanswered write is timeout_s old, else look again
        when it will be (not at all while nothing is waiting: the next write starts the watch)."""
        self._forget_answered()
        if not self.writes:
            self.watchdog = None
            return
        loop = asyncio.get_running_loop()
        deadline = self.writes[0][0] + self.timeout_s
        if loop.time() < deadline:
            self.watchdog = loop.call_at(deadline, self._watch)
            return
        self.watchdog = None
        self.abandon(redis.exceptions.TimeoutError(f"Redis did not answer within {self.timeout_s:g} s"))


def _error(message: str) -> redis.exceptions.RedisError:
    if message.startswith(("WRONGPASS", "NOAUTH")) or "invalid password" in message:
        return redis.exceptions.AuthenticationError(message)
    if message.startswith("READONLY"):
        return redis.exceptions.ConnectionError(f"the Redis master is now a replica: {message}")
    return redis.exceptions.ResponseError(message)


async def _replies(waiters: list[asyncio.Future[Any]]) -> list[Any]:
    """Every waiter's reply, or the first error once all have come back (none is left unread)."""
    # Replies, and the failures of a lost connection, reach the waiters in the order they were sent:
    # once the last is done, all are (gather's own future and callbacks cost more than the wait).
    if not waiters:
        return []
    try:
        await waiters[-1]
    except asyncio.CancelledError:
        for waiter in waiters:
            waiter.cancel()
        raise
    except Exception:
        pass  # read below, with the others' replies
    errors = [waiter.exception() for waiter in waiters]
    for error in errors:
        if error is not None:
            raise error
    return [waiter.result() for waiter in waiters]


class CommandPipe(Protocol):
    """What the lookups send their commands through."""

    async def execute(self, *command: Any) -> Any:
        """The reply to one command."""

    async def execute_many(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """The replies to several commands sent together; the first error raises."""

    async def aclose(self) -> None:
        """Close the connections."""


def lookup_pipe(target: RedisTarget, timeout_s: float = TIMEOUT_S) -> CommandPipe:
    """The lookups' client of target: PipelinedRedis for one Redis and for Sentinel, ClusterPipe for
    a Redis Cluster."""
    if isinstance(target, RedisClusterConfig):
        return ClusterPipe(cluster_async(target, timeout_s), _options(target.username, target.password, target.tls),
                           timeout_s)
    if isinstance(target, RedisSentinelConfig):
        sentinels = sentinel_async(target, timeout_s)
        options = {**_options(target.username, target.password, target.tls), "db": target.db}
        master = target.master

        async def locate() -> tuple[str, int]:
            host, port = await sentinels.discover_master(master)
            return str(host), int(port)

        return PipelinedRedis(options, timeout_s, locate)
    return PipelinedRedis(target, timeout_s)


def _options(username: str | None, password: str | None, tls: RedisTlsConfig) -> dict[str, Any]:
    """PipelinedRedis's options (as parse_url makes them) for credentials and a TLS section."""
    options: dict[str, Any] = {"username": username, "password": password}
    if tls.enabled:
        options.update(connection_class=SSLConnection, ssl_ca_certs=tls.ca_file,
                       ssl_cert_reqs="required" if tls.verify else "none")
    return options


class PipelinedRedis:
    """Connects on first use and again after the connection is lost (the commands in flight then
    fail with redis.exceptions.ConnectionError, as redis-py's would). url: a Redis URL, or the
    options parse_url would make of one; locate: where the master is now (host, port), asked
    before each connection (Sentinel)."""

    def __init__(self, url: str | dict[str, Any], timeout_s: float = TIMEOUT_S,
                 locate: Callable[[], Awaitable[tuple[str, int]]] | None = None) -> None:
        self.options = parse_url(url) if isinstance(url, str) else url
        self.timeout_s = timeout_s
        self.locate = locate
        self._protocol: _Protocol | None = None
        self._attempt: asyncio.Future[_Protocol] | None = None

    async def execute(self, *command: Any) -> Any:
        """The reply to one command."""
        [reply] = await self.execute_many([command])
        return reply

    async def execute_many(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """The replies to several commands sent together (one round trip); the first error raises."""
        protocol = self._protocol
        if protocol is not None and not protocol.lost:  # the connection's watchdog bounds the wait
            return await _replies(protocol.send(commands))
        protocol = None
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

        def made() -> _Protocol:
            return _Protocol(self.timeout_s)

        try:
            async with asyncio.timeout(self.timeout_s):
                if "path" in options:
                    _, protocol = await loop.create_unix_connection(made, options["path"])
                else:
                    host, port = options.get("host", "localhost"), options.get("port", 6379)
                    if self.locate is not None:
                        host, port = await self.locate()
                    _, protocol = await loop.create_connection(made, host, port, ssl=self._tls())
                await _replies(protocol.send(setup))
        except BaseException as exc:
            if protocol is not None and protocol.transport is not None:
                protocol.transport.close()
            if isinstance(exc, redis.exceptions.ConnectionError):  # the sentinels named no master
                raise
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

    async def aclose(self) -> None:
        """Close the connection."""
        self.close()


class ClusterPipe:
    """The lookups' commands on a Redis Cluster: each goes to the master of its key's slot, on a
    PipelinedRedis of that node, and the nodes are asked at once (an MGET, whose keys may lie on
    several nodes, is sent as GETs). The slot map is the one redis-py's cluster client reads from
    the seed nodes. A reply saying that a slot moved or the cluster is down, or a node that cannot
    be reached, has the map read again (one reading at a time), and the call raises
    redis.exceptions.ConnectionError: the request answers 503, and the next one goes where the
    slot is now."""

    def __init__(self, client: redis.asyncio.cluster.RedisCluster, options: dict[str, Any],
                 timeout_s: float = TIMEOUT_S) -> None:
        self.client = client
        self.options = options
        self.timeout_s = timeout_s
        self.nodes: dict[tuple[str, int], PipelinedRedis] = {}
        self._reading: asyncio.Task[None] | None = None
        # Whether the client has read its first slot map: later calls skip initialize() and its
        # deadline (about 14 us a call), as the map is then read again only on a failure.
        self._initialized = False

    async def execute(self, *command: Any) -> Any:
        """The reply to one command."""
        [reply] = await self.execute_many([command])
        return reply

    async def execute_many(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """The replies to several commands sent together (one round trip per node); the first
        error raises."""
        try:
            if not self._initialized:
                async with asyncio.timeout(self.timeout_s):
                    await self.client.initialize()
                self._initialized = True
            groups, places = self._route(commands)
        except TimeoutError:
            raise redis.exceptions.TimeoutError(f"Redis did not answer within {self.timeout_s:g} s") from None
        except redis.exceptions.RedisClusterException as exc:  # a slot no node serves
            self._read_map()
            raise redis.exceptions.ConnectionError(f"the cluster is changing: {exc}") from None
        results = await asyncio.gather(*(self._node(*node).execute_many(sent) for node, sent in groups.items()),
                                       return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise self._failed(result)
        replies = dict(zip(groups, cast("list[list[Any]]", results)))
        return [[replies[node][i] for node, i in place] if split else replies[place[0][0]][place[0][1]]
                for split, place in places]

    def _route(self, commands: list[tuple[Any, ...]]) -> tuple[
            dict[tuple[str, int], list[tuple[Any, ...]]], list[tuple[bool, list[tuple[tuple[str, int], int]]]]]:
        """The commands for each node, and where each command's replies will be: (whether it was
        an MGET split into GETs, [(node, index in what that node was sent)])."""
        manager = self.client.nodes_manager
        groups: dict[tuple[str, int], list[tuple[Any, ...]]] = {}
        places = []
        for command in commands:
            name = str(command[0]).upper()
            split = name == "MGET"
            place = []
            for sent in [("GET", key) for key in command[1:]] if split else [command]:
                key = sent[3] if name in ("EVAL", "EVALSHA") else sent[1]
                node = manager.get_node_from_slot(key_slot(str(key).encode()))
                where = (node.host, int(node.port))
                group = groups.setdefault(where, [])
                place.append((where, len(group)))
                group.append(sent)
            places.append((split, place))
        return groups, places

    def _node(self, host: str, port: int) -> PipelinedRedis:
        pipe = self.nodes.get((host, port))
        if pipe is None:
            pipe = self.nodes[(host, port)] = PipelinedRedis({**self.options, "host": host, "port": port},
                                                             self.timeout_s)
        return pipe

    def _failed(self, error: BaseException) -> BaseException:
        """What a node's failure raises; the slot map is read again when the cluster changed."""
        if isinstance(error, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
            self._read_map()
        elif isinstance(error, redis.exceptions.ResponseError) and str(error).startswith(
                ("MOVED", "ASK", "CLUSTERDOWN", "TRYAGAIN")):
            self._read_map()
            return redis.exceptions.ConnectionError(f"the cluster is changing: {error}")
        return error

    def _read_map(self) -> None:
        if self._reading is None or self._reading.done():
            self._reading = asyncio.ensure_future(self._reread())

    async def _reread(self) -> None:
        try:
            async with asyncio.timeout(self.timeout_s):
                await self.client.nodes_manager.initialize()
        except (TimeoutError, redis.exceptions.RedisError, redis.exceptions.RedisClusterException):
            pass  # the next failing call tries again

    async def aclose(self) -> None:
        """Close the connections."""
        if self._reading is not None:
            self._reading.cancel()
        for pipe in self.nodes.values():
            pipe.close()
        await self.client.aclose()
