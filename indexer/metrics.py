"""Prometheus metrics recorded by the indexer process: sync durations and outcomes per store.

`mxisd run` points PROMETHEUS_MULTIPROC_DIR at a directory of its data_dir before it starts the
indexer, so these values land in files that the HTTP workers' /metrics handler aggregates.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from indexer.sync import SyncResult

SYNC_SECONDS = Histogram(
    "mxisd_sync_duration_seconds", "How long syncs of a store took", ["store", "kind"],
    buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 1800, 3600, 7200),
)
SYNCS = Counter("mxisd_syncs", "Syncs of a store by outcome (ok, failed, refused)", ["store", "kind", "outcome"])


def observe_sync(result: SyncResult) -> None:
    """Count one finished sync and its duration."""
    SYNCS.labels(result.store, result.kind, result.outcome).inc()
    if result.ended is not None:
        SYNC_SECONDS.labels(result.store, result.kind).observe(result.ended - result.started)
