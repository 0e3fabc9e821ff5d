"""Read-through lookups: cache misses answered by REST stores that cannot be enumerated.

A miss is looked up in the store's cached answers first (hit or "not found", each with its own TTL),
and only then asked of the service, once: concurrent lookups of the same address in this process
wait for the same request. A service that fails or answers garbage gives "not found" for this
request and nothing is cached, so the next lookup asks again. Only plain addresses can be asked:
v2 `sha256` lookups are answered from synced stores alone.
"""

from __future__ import annotations

import asyncio
import logging

import httpx

from indexer import logs
from indexer.settings import Config, RestStoreConfig
from indexer.stores.rest import BadAnswer, client_options, decode, lookup_answer, lookup_request
from server.metrics import OUTGOING_FAILURES
from server.services.lookups import Lookups

log = logging.getLogger(__name__)

CONCURRENCY = 8  # requests in flight to one service from one worker


class _Service:
    def __init__(self, settings: RestStoreConfig, path: str) -> None:
        self.name = settings.name
        self.path = path
        self.http = httpx.AsyncClient(**client_options(settings))
        self.ttl = settings.read_through.ttl
        self.miss_ttl = settings.read_through.miss_ttl
        self.max_per_request = settings.read_through.max_per_request
        self.slots = asyncio.Semaphore(CONCURRENCY)


class ReadThrough:
    """The read-through stores of a config, in config order."""

    def __init__(self, config: Config, lookups: Lookups) -> None:
        self.lookups = lookups
        self.domain = config.matrix.domain
        self.services = [
            _Service(s, s.endpoints.lookup) for s in config.stores
            if isinstance(s, RestStoreConfig) and s.endpoints.enumerate is None and s.endpoints.lookup
        ]
        self._pending: dict[tuple[str, str, str], asyncio.Future[str | None]] = {}

    async def fill(self, pairs: list[tuple[str, str]], found: list[str | None]) -> list[str | None]:
        """found (the synced stores' answers for canonical (medium, address) pairs) with its gaps
        filled from the read-through stores."""
        found = list(found)
        for service in self.services:
            gaps = [i for i, mxid in enumerate(found) if mxid is None]
            if not gaps:
                break
            cached = await self.lookups.read_through_answers(service.name, [pairs[i] for i in gaps])
            unknown = []
            for i, answer in zip(gaps, cached):
                if answer is None:
                    unknown.append(i)
                else:
                    found[i] = answer or None
            if len(unknown) > service.max_per_request:
                log.warning("store %s: %d addresses not in the cache; asking about the first %d only",
                            service.name, len(unknown), service.max_per_request)
                unknown = unknown[:service.max_per_request]
            answers = await asyncio.gather(*(self._ask(service, *pairs[i]) for i in unknown))
            for i, answer in zip(unknown, answers):
                found[i] = answer
        return found

    async def _ask(self, service: _Service, medium: str, address: str) -> str | None:
        key = (service.name, medium, address)
        future = self._pending.get(key)
        if future is None:
            future = asyncio.ensure_future(self._query(service, medium, address))
            self._pending[key] = future
            future.add_done_callback(lambda _: self._pending.pop(key, None))
        # A client that goes away must not cancel the request other lookups are waiting for.
        return await asyncio.shield(future)

    async def _query(self, service: _Service, medium: str, address: str) -> str | None:
        async with service.slots:
            try:
                mxid = lookup_answer(decode(await service.http.post(
                    service.path, json=lookup_request(medium, address))), self.domain)
            except (httpx.HTTPError, BadAnswer) as exc:
                OUTGOING_FAILURES.labels("read_through").inc()
                logs.repeated.warning(log, "store %s: %s lookup failed, answered not found and not cached: %s: %s",
                                      service.name, medium, type(exc).__name__, exc,
                                      key=f"{service.name} lookup {type(exc).__name__}")
                return None
        await self.lookups.remember_answer(service.name, medium, address, mxid,
                                           service.ttl if mxid else service.miss_ttl)
        return mxid

    async def close(self) -> None:
        """Close the HTTP clients."""
        for service in self.services:
            await service.http.aclose()
