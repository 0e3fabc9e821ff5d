"""The Redis mirror of /3pid/bind bindings (SQL is their truth), and keeping Redis true to SQL:
rebuilding the mirror, and noticing a Redis that was emptied or went back in time (restored from an
older copy, a replica that was behind)."""

from __future__ import annotations

import logging
from typing import cast

import redis
import redis.asyncio

from indexer.cache import Cache
from indexer.redis_clients import Plan, run_plan_async
from indexer.rediskeys import BINDINGS, LOCAL_BINDINGS, RedisKeys, lookup_fields
from server.storage import BINDINGS_GENERATION, CACHE_GENERATION, Storage

log = logging.getLogger(__name__)

# Atomically: for each pair of keys after KEYS[1] (a family's plain and hashed fields), remove the
# ARGV[3] plain fields and the hashed ones that follow them from the first ARGV[4] pairs, and map
# them to the mxid ARGV[2] in the pair after those (when ARGV[2] is not empty); then raise the
# generation in KEYS[1] to ARGV[1]. A script rather than MULTI: redis-py's asyncio cluster client
# runs a transaction's commands in a thread of their own, blocking the event loop.
_MIRROR = """
local n, drop = tonumber(ARGV[3]), tonumber(ARGV[4])
for pair = 0, (#KEYS - 1) / 2 - 1 do
  for i = 5, 4 + 2 * n do
    local key = KEYS[2 + 2 * pair]
    if i > 4 + n then key = KEYS[3 + 2 * pair] end
    if pair < drop then redis.call('HDEL', key, ARGV[i]) else redis.call('HSET', key, ARGV[i], ARGV[2]) end
  end
end
if tonumber(redis.call('HGET', KEYS[1], 'generation') or '0') < tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'generation', ARGV[1])
end
"""


class BindingMirror:
    """Writes /3pid/bind bindings into the "_bindings" pseudo-store (those of local addresses into
    "_localbinds"), so lookups find them at once."""

    def __init__(self, client: redis.asyncio.Redis, prefix: str) -> None:
        self.r = client
        self.k = RedisKeys(prefix)

    async def put(self, medium: str, address: str, mxid: str, generation: int, local: bool = False) -> None:
        """Mirror one bind, made at this SQL bindings generation; local: of a local address."""
        pepper = cast("str | None", await self.r.get(self.k.pepper))
        if not pepper:
            raise redis.exceptions.RedisError("the cache has no lookup pepper yet")
        family, other = (LOCAL_BINDINGS, BINDINGS) if local else (BINDINGS, LOCAL_BINDINGS)
        # A rebind may move the 3PID from one family to the other.
        await self._mirror(medium, address, pepper, [other], family, mxid, generation)

    async def remove(self, medium: str, address: str, generation: int) -> None:
        """Mirror one unbind, made at this SQL bindings generation."""
        pepper = cast(str, await self.r.get(self.k.pepper) or "")
        await self._mirror(medium, address, pepper, [BINDINGS, LOCAL_BINDINGS], None, None, generation)

    async def _mirror(self, medium: str, address: str, pepper: str, drop: list[str], family: str | None,
                      mxid: str | None, generation: int) -> None:
        """Remove the 3PID from the drop families, then (with family) map it to mxid there."""
        fields, hashes = lookup_fields(medium, address, pepper)
        families = [*drop, *([family] if family else [])]
        await self.r.eval(_MIRROR, 1 + 2 * len(families), self.k.state(BINDINGS),
                          *(key for f in families for key in (self.k.threepids(f, 0), self.k.hashes(f, 0))),
                          generation, mxid or "", len(fields), len(drop), *fields, *hashes)

    async def behind(self, generation: int) -> str | None:
        """Why the mirror does not hold SQL's bindings generation, or None when it does."""
        epoch, (mirrored_epoch, held) = await run_plan_async(self.r, self._state_plan())
        if epoch is None or mirrored_epoch != epoch:
            return "the cache lost the bindings mirror; it is being rebuilt from the database"
        if int(held or 0) < generation:
            return (f"the bindings mirror holds generation {int(held or 0)}, the database {generation}; "
                    "it is being rebuilt from the database")
        return None

    def _state_plan(self) -> Plan:
        epoch, state = yield [("get", self.k.epoch),
                              ("hmget", self.k.state(BINDINGS), ["epoch", "generation"])]
        return epoch, state


def restore_mirror(storage: Storage, cache: Cache, always: bool = False) -> bool:
    """Rebuild the mirror from SQL when it was not built for the cache's epoch (the cache was emptied
    or is new) or holds an older bindings generation than SQL (an older copy of Redis), or always;
    whether it was rebuilt. Blocking."""
    cache.initialize()  # an emptied cache gets its new epoch and pepper now, not at the next sync
    # The generation is read before the bindings: a bind committed in between is in the rebuilt
    # mirror, which then only counts as older than it is and is rebuilt once more.
    generation = storage.counter(BINDINGS_GENERATION)
    if not always and cache.bindings_mirrored(generation):
        return False
    count = cache.rebuild_bindings(((b.medium, b.address, b.mxid, b.local_address) for b in storage.all_bindings()),
                                   generation)
    log.info("bindings: %d lookup keys rebuilt from the database (bindings generation %d)", count, generation)
    return True


def check_generation(storage: Storage, cache: Cache, stores: list[str]) -> bool:
    """Whether Redis went back in time: its cache generation (counting completed syncs) is below the
    highest one SQL recorded. Then every store counts as not synced, so that the indexer syncs each in
    full now; else SQL records Redis's generation. Blocking."""
    # SQL first: Redis's counter only grows, so read after it, it is at least what any server recorded.
    recorded = storage.counter(CACHE_GENERATION)
    current = cache.generation_counter()
    if current < recorded:
        log.warning("Redis is behind: its cache generation is %d, %d was seen before (emptied, or restored "
                    "from an older copy); every store gets a full sync now", current, recorded)
        cache.forget_full_syncs(stores)
        cache.raise_generation(recorded)
        return True
    if current > recorded:
        storage.raise_counter(CACHE_GENERATION, current)
    return False


def check_cache(storage: Storage, cache: Cache, stores: list[str], rebuild: bool = False) -> None:
    """Both checks: stores resynced in full and the bindings mirror rebuilt (always, with rebuild)
    where Redis lost them. Blocking."""
    behind = check_generation(storage, cache, stores)
    restore_mirror(storage, cache, always=behind or rebuild)
