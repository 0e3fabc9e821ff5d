"""Rate limits: fixed-window request counters in Redis, shared by every worker and host."""

from __future__ import annotations

import redis.asyncio

from indexer.rediskeys import RedisKeys


class RateLimits:
    """Fixed-window counters shared by every worker and host."""

    def __init__(self, client: redis.asyncio.Redis, prefix: str) -> None:
        self.r = client
        self.k = RedisKeys(prefix)

    async def hit(self, kind: str, key: str, limit: int, window_s: int) -> int | None:
        """Count one request; None when within limit, else milliseconds until the window ends."""
        name = self.k.rate(kind, key)
        pipe = self.r.pipeline(transaction=True)
        pipe.set(name, 0, ex=window_s, nx=True)
        pipe.incr(name)
        pipe.pttl(name)
        _, count, ttl = await pipe.execute()
        if count <= limit:
            return None
        return max(int(ttl), 1)
