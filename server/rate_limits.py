"""Rate limits: fixed-window request counters in Redis, shared by every worker and host."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import cast

import redis.asyncio

from indexer.rediskeys import RedisKeys

# Atomically: start a window of ARGV[1] seconds unless one runs, count one request in it; the count
# and the milliseconds left. A script rather than MULTI: redis-py's asyncio cluster client runs a
# transaction's commands in a thread of their own, blocking the event loop.
_HIT = """
redis.call('SET', KEYS[1], 0, 'EX', ARGV[1], 'NX')
return {redis.call('INCR', KEYS[1]), redis.call('PTTL', KEYS[1])}
"""


class RateLimits:
    """Fixed-window counters shared by every worker and host."""

    def __init__(self, client: redis.asyncio.Redis, prefix: str) -> None:
        self.r = client
        self.k = RedisKeys(prefix)

    async def hit(self, kind: str, key: str, limit: int, window_s: int) -> int | None:
        """Count one request; None when within limit, else milliseconds until the window ends."""
        count, ttl = await cast("Awaitable[list[int]]", self.r.eval(_HIT, 1, self.k.rate(kind, key), window_s))
        if count <= limit:
            return None
        return max(int(ttl), 1)
