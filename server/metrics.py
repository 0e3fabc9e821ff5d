"""Prometheus metrics of the HTTP workers, and the exposition served at /metrics: what every process
of this host recorded (prometheus-client's multiprocess mode: the workers and the indexer write to
files in data_dir/metrics) plus gauges read from the cache when scraped (identities per store, last
successful sync, follower lag), so that they are right whichever indexer or host wrote them."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from indexer.rediskeys import BINDINGS, LOCAL_BINDINGS

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

REQUESTS = Counter("mxisd_http_requests", "HTTP requests answered, by route and status",
                   ["method", "endpoint", "status"])
LATENCY = Histogram("mxisd_http_request_duration_seconds", "Time to answer HTTP requests, by route",
                    ["method", "endpoint"],
                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
LOOKUPS = Counter("mxisd_lookups",
                  "3PIDs looked up, by where the answer came from "
                  "(binding, store_cache, read_through, federation, miss)",
                  ["source"])
NOTIFICATIONS = Counter("mxisd_notifications", "Emails and SMS messages, by medium and outcome (sent, failed)",
                        ["medium", "outcome"])
OUTGOING_FAILURES = Counter("mxisd_outgoing_request_failures",
                            "Outgoing requests that failed, by purpose "
                            "(homeserver, identity, bridge, read_through, twilio)", ["purpose"])


# The labelled children of the per-request metrics, by labels: prometheus-client's labels() (label
# checks, a tuple of str(), a lock) cost as much as the increments themselves on every request.
_REQUEST_CHILDREN: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
_LOOKUP_CHILDREN: dict[str, Counter] = {}


def use_directory(data_dir: str) -> Path:
    """Empty data_dir/metrics and make this process and the ones it starts record metrics there."""
    path = Path(data_dir) / "metrics"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    os.environ[MULTIPROC_ENV] = str(path)
    # prometheus-client chooses where values live when it is first imported, which is before `mxisd
    # run` has read the config that names the directory: choose again now.
    values.ValueClass = values.get_value_class()
    return path


def count_request(method: str, endpoint: str, status: int, took: float) -> None:
    """Count one answered request of endpoint (a route, or "unmatched") and its duration in seconds."""
    key = (method, endpoint, status)
    children = _REQUEST_CHILDREN.get(key)
    if children is None:
        children = _REQUEST_CHILDREN[key] = (REQUESTS.labels(method, endpoint, str(status)),
                                             LATENCY.labels(method, endpoint))
    children[0].inc()
    children[1].observe(took)


def count_lookups(found: list[str | None], sources: list[str | None], local: list[str | None]) -> None:
    """Count looked-up 3PIDs by answer source: sources names the cache's store of each answer (None
    where the cache had none), local holds the answers found before asking other identity servers
    (so an answer there and not in the cache came from a read-through store, and one found only
    after it from federation)."""
    tally: dict[str, int] = {}
    for mxid, store, here in zip(found, sources, local):
        if mxid is None:
            source = "miss"
        elif store is not None:
            source = "binding" if store in (BINDINGS, LOCAL_BINDINGS) else "store_cache"
        else:
            source = "read_through" if here is not None else "federation"
        tally[source] = tally.get(source, 0) + 1
    for source, count in tally.items():
        child = _LOOKUP_CHILDREN.get(source)
        if child is None:
            child = _LOOKUP_CHILDREN[source] = LOOKUPS.labels(source)
        child.inc(count)


class _CacheGauges:
    """Gauges from a status read of the cache (Admin.status), or cache_up 0 when it failed."""

    def __init__(self, status: dict[str, Any] | None) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("mxisd_cache_up", "Whether the Redis cache answered this scrape")
        up.add_metric([], 0 if self.status is None else 1)
        yield up
        if self.status is None:
            return
        identities = GaugeMetricFamily("mxisd_store_identities", "Identities the cache holds per store",
                                       labels=["store"])
        success = GaugeMetricFamily("mxisd_store_last_success_timestamp_seconds",
                                    "When a sync of the store last succeeded", labels=["store"])
        for name, store in self.status["stores"].items():
            identities.add_metric([name], store["identities"])
            if store["last_success"] is not None:
                success.add_metric([name], store["last_success"])
        lag = GaugeMetricFamily("mxisd_fulltext_follower_lag_seconds",
                                "Age of the oldest change a host's fulltext index has not applied", labels=["host"])
        for follower in self.status["followers"]:
            lag.add_metric([follower["host"]], follower["lag_seconds"])
        yield from (identities, success, lag)


def exposition(status: dict[str, Any] | None) -> bytes:
    """The text exposition of this host's processes' metrics (needs use_directory to have run in
    this process or its parent) and of the cache gauges."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    registry.register(_CacheGauges(status))
    return generate_latest(registry)
