"""/3pid/bind bindings: their signed association, and keeping Redis true to SQL: the mirror of
bindings (SQL is their truth), and noticing a Redis that was emptied or went back in time (restored
from an older copy, a replica that was behind)."""

from __future__ import annotations

import logging
from typing import Any

from indexer.cache import Cache
from server.signing import SigningKeys
from server.storage import BINDINGS_GENERATION, CACHE_GENERATION, Binding, Storage

log = logging.getLogger(__name__)

ASSOCIATION_LIFETIME_MS = 100 * 365 * 24 * 3600 * 1000  # as Sydent: bindings do not lapse by themselves


def bound_association(keys: SigningKeys, binding: Binding) -> dict[str, Any]:
    """The signed association of a binding, made at its ts: the bind answer and every later v1
    lookup of it carry the same one (ed25519 signatures are deterministic)."""
    return keys.sign({"address": binding.address, "medium": binding.medium, "mxid": binding.mxid,
                      "not_before": binding.ts, "not_after": binding.ts + ASSOCIATION_LIFETIME_MS, "ts": binding.ts})


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
    count = cache.rebuild_bindings(((b.medium, b.address, b.mxid) for b in storage.all_bindings()), generation)
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
