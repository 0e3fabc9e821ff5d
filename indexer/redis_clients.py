"""Redis clients for both processes, with one deadline for every command and no retry of a timed-out
one; and reads of several dependent round trips (plans), written once for either client.

A client reaches the configured target: one Redis (a URL), the master that Redis Sentinel names, or
a Redis Cluster. With Sentinel and Cluster, redis-py's own clients follow a failover: a command
that meets the old master fails (a request answers 503), and the next connection asks the
sentinels, or reads the cluster's slot map, again. A RedisCluster offers the commands of a Redis
(every multi-key command of ours stays within one slot: indexer.rediskeys), so it is handed out
under that type. The asyncio cluster client must not be given a transaction (MULTI): redis-py 8.1
runs each of its commands in a thread with an event loop of its own, blocking the server's loop, so
the server's atomic writes are Lua scripts."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.sentinel
import redis.cluster
import redis.sentinel
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from indexer.settings import RedisClusterConfig, RedisConfig, RedisSentinelConfig, RedisTlsConfig

# What a client connects to: a Redis URL, or a Sentinel or Cluster section of the config.
RedisTarget = str | RedisSentinelConfig | RedisClusterConfig

# What a failing Redis raises: a RedisClusterException (a slot that no node serves while a cluster
# changes) is no RedisError.
REDIS_ERRORS = (redis.exceptions.RedisError, redis.exceptions.RedisClusterException)

DEFAULT_TIMEOUT_S = 5.0
# Longest a command of ours asks Redis to block (XREAD BLOCK, BRPOP): a client that sends them waits
# that much longer for a reply.
MAX_BLOCK_S = 1.0


def configured_target(config: RedisConfig) -> RedisTarget | None:
    """The Redis the config names; None for the embedded one."""
    return config.sentinel or config.cluster or config.url


def cache_spread(config: RedisConfig) -> int:
    """How many buckets the store hashes are cut into (indexer.rediskeys): redis.cluster.buckets on a
    Redis Cluster; else 1, which keeps a single node's keys those of versions without buckets."""
    return config.cluster.buckets if config.cluster else 1


def describe(target: RedisTarget) -> str:
    """The target for a message (no password)."""
    if isinstance(target, RedisSentinelConfig):
        return f"the master {target.master!r} of the sentinels {', '.join(target.addresses)}"
    if isinstance(target, RedisClusterConfig):
        return f"the Redis Cluster of {', '.join(target.nodes)}"
    parts = urlsplit(target)
    if parts.password is None:
        return target
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)))


def address(text: str) -> tuple[str, int]:
    """host:port (an IPv6 host in brackets) as (host, port)."""
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def tls_options(tls: RedisTlsConfig) -> dict[str, Any]:
    """redis-py's connection options for a TLS section."""
    if not tls.enabled:
        return {}
    return {"ssl": True, "ssl_ca_certs": tls.ca_file, "ssl_cert_reqs": "required" if tls.verify else "none",
            "ssl_check_hostname": tls.verify}


def _client_options(timeout_s: float, blocking: bool) -> dict[str, Any]:
    # redis-py retries a timed-out command three times with backoff by default, so that a frozen
    # Redis held a request for a minute; one retry on a dropped connection (Redis restarted, or a
    # failover: the retry asks the sentinels again) is kept.
    return {"decode_responses": True, "health_check_interval": 30,
            "socket_timeout": timeout_s + (MAX_BLOCK_S if blocking else 0), "socket_connect_timeout": timeout_s,
            "retry": Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,))}


def _sentinel_options(target: RedisSentinelConfig, timeout_s: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """The options of the sentinels' connections, and those of the master's."""
    tls = tls_options(target.tls)
    sentinels = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s,
                 "password": target.sentinel_password, **tls}
    master = {"username": target.username, "password": target.password, "db": target.db, **tls}
    return sentinels, master


def _cluster_options(target: RedisClusterConfig) -> dict[str, Any]:
    return {"username": target.username, "password": target.password, **tls_options(target.tls)}


def connect(target: RedisTarget, timeout_s: float = DEFAULT_TIMEOUT_S, blocking: bool = False) -> redis.Redis:
    """A blocking client for the indexer and the command line; blocking: for a client that also
    sends the indexer's blocking reads."""
    options = _client_options(timeout_s, blocking)
    if isinstance(target, RedisSentinelConfig):
        sentinels, master = _sentinel_options(target, timeout_s)
        manager = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
            [address(a) for a in target.addresses], sentinel_kwargs=sentinels)
        return cast(redis.Redis, manager.master_for(target.master, **options, **master))  # type: ignore[no-untyped-call]
    if isinstance(target, RedisClusterConfig):
        return cast(redis.Redis, redis.cluster.RedisCluster(
            startup_nodes=[redis.cluster.ClusterNode(*address(n)) for n in target.nodes],  # type: ignore[no-untyped-call]
            **options, **_cluster_options(target)))
    return redis.Redis.from_url(target, **options)


def connect_async(target: RedisTarget, timeout_s: float = DEFAULT_TIMEOUT_S) -> redis.asyncio.Redis:
    """An asyncio client for the HTTP server."""
    options = _client_options(timeout_s, False)
    options["retry"] = AsyncRetry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,))
    if isinstance(target, RedisSentinelConfig):
        manager = sentinel_async(target, timeout_s)
        return cast(redis.asyncio.Redis, manager.master_for(
            target.master, **options, **_sentinel_options(target, timeout_s)[1]))
    if isinstance(target, RedisClusterConfig):
        return cast(redis.asyncio.Redis, cluster_async(target, timeout_s))
    return redis.asyncio.Redis.from_url(target, **options)


def sentinel_async(target: RedisSentinelConfig, timeout_s: float) -> redis.asyncio.sentinel.Sentinel:
    """An asyncio client of the sentinels themselves (discover_master names the master)."""
    sentinels, _ = _sentinel_options(target, timeout_s)
    return redis.asyncio.sentinel.Sentinel(  # type: ignore[no-untyped-call]
        [address(a) for a in target.addresses], sentinel_kwargs=sentinels)


def cluster_async(target: RedisClusterConfig, timeout_s: float) -> redis.asyncio.cluster.RedisCluster:
    """An asyncio client of a Redis Cluster."""
    options = _client_options(timeout_s, False)
    options["retry"] = AsyncRetry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,))
    return redis.asyncio.cluster.RedisCluster(
        startup_nodes=[redis.asyncio.cluster.ClusterNode(*address(n)) for n in target.nodes],
        **options, **_cluster_options(target))


# A read of several dependent round trips, written once for both clients: the plan yields the
# commands of one pipeline, receives their replies, and finally returns its answer.
Commands = list[tuple[Any, ...]]
Plan = Generator[Commands, list[Any], Any]


def _pipeline(client: Any, commands: Commands) -> Any:
    pipe = client.pipeline(transaction=False)
    for name, *args in commands:
        getattr(pipe, name)(*args)
    return pipe


def run_plan(client: redis.Redis, plan: Plan) -> Any:
    """Run a plan on a blocking client: its answer."""
    try:
        commands = next(plan)
        while True:
            commands = plan.send(_pipeline(client, commands).execute() if commands else [])
    except StopIteration as done:
        return done.value


async def run_plan_async(client: redis.asyncio.Redis, plan: Plan) -> Any:
    """Run a plan on an asyncio client: its answer."""
    try:
        commands = next(plan)
        while True:
            commands = plan.send(await _pipeline(client, commands).execute() if commands else [])
    except StopIteration as done:
        return done.value
