"""Everything between an identity store and the cache: stores, normalisation, Redis, Whoosh, sync."""
