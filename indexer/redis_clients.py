"""Redis clients for both processes, with one deadline for every command and no retry of a timed-out
one; and reads of several dependent round trips (plans), written once for either client."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

DEFAULT_TIMEOUT_S = 5.0
# Longest a command of ours asks Redis to block (XREAD BLOCK, BRPOP): a client that sends them waits
# that much longer for a reply.
MAX_BLOCK_S = 1.0


def _client_options(timeout_s: float, blocking: bool) -> dict[str, Any]:
    # redis-py retries a timed-out command three times with backoff by default, so that a frozen
    # Redis held a request for a minute; one retry on a dropped connection (Redis restarted) is kept.
    return {"decode_responses": True, "health_check_interval": 30,
            "socket_timeout": timeout_s + (MAX_BLOCK_S if blocking else 0), "socket_connect_timeout": timeout_s,
            "retry": Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,))}


def connect(url: str, timeout_s: float = DEFAULT_TIMEOUT_S, blocking: bool = False) -> redis.Redis:
    """A blocking client for the indexer and the command line; blocking: for a client that also
    sends the indexer's blocking reads."""
    return redis.Redis.from_url(url, **_client_options(timeout_s, blocking))


def connect_async(url: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> redis.asyncio.Redis:
    """An asyncio client for the HTTP server."""
    options = _client_options(timeout_s, False)
    options["retry"] = AsyncRetry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,))
    return redis.asyncio.Redis.from_url(url, **options)


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
