"""Keeping the Redis mirror of /3pid/bind bindings in step with SQL, their truth."""

from __future__ import annotations

import logging

from indexer.cache import Cache
from server.storage import Storage

log = logging.getLogger(__name__)


def restore_mirror(storage: Storage, cache: Cache) -> bool:
    """Rebuild the mirror from SQL when the mirror was not built for the cache's epoch (the cache was
    emptied or is new); whether it was rebuilt. Blocking."""
    cache.initialize()  # an emptied cache gets its new epoch and pepper now, not at the next sync
    if cache.bindings_mirrored():
        return False
    count = cache.rebuild_bindings((b.medium, b.address, b.mxid) for b in storage.all_bindings())
    log.info("bindings: the cache had none for its epoch; %d lookup keys rebuilt from the database", count)
    return True
