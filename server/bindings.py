"""/3pid/bind bindings: their signed association, and keeping their Redis mirror in step with SQL,
their truth."""

from __future__ import annotations

import logging
from typing import Any

from indexer.cache import Cache
from server.keys import Keys
from server.storage import Binding, Storage

log = logging.getLogger(__name__)

ASSOCIATION_LIFETIME_MS = 100 * 365 * 24 * 3600 * 1000  # as Sydent: bindings do not lapse by themselves


def bound_association(keys: Keys, binding: Binding) -> dict[str, Any]:
    """The signed association of a binding, made at its ts: the bind answer and every later v1
    lookup of it carry the same one (ed25519 signatures are deterministic)."""
    return keys.sign({"address": binding.address, "medium": binding.medium, "mxid": binding.mxid,
                      "not_before": binding.ts, "not_after": binding.ts + ASSOCIATION_LIFETIME_MS, "ts": binding.ts})


def restore_mirror(storage: Storage, cache: Cache) -> bool:
    """Rebuild the mirror from SQL when the mirror was not built for the cache's epoch (the cache was
    emptied or is new); whether it was rebuilt. Blocking."""
    cache.initialize()  # an emptied cache gets its new epoch and pepper now, not at the next sync
    if cache.bindings_mirrored():
        return False
    count = cache.rebuild_bindings((b.medium, b.address, b.mxid) for b in storage.all_bindings())
    log.info("bindings: the cache had none for its epoch; %d lookup keys rebuilt from the database", count)
    return True
