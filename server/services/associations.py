"""Association lookups, v1 and v2 (identity service API "Association lookup"): the cache first, then
the read-through stores, then other identity servers; each answer counted by its source, a v1 answer
signed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
from sanic import Request

from indexer.normalize import query_address
from indexer.rediskeys import BINDINGS, LOCAL_BINDINGS
from indexer.settings import Config
from server.errors import MatrixError
from server.metrics import count_lookups
from server.read_through import ReadThrough
from server.recursion import Recursion
from server.services.binding import Bindings
from server.services.lookups import Lookups
from server.signing import SigningKeys

ALGORITHMS = ["none", "sha256"]


def _not_ready() -> MatrixError:
    return MatrixError(503, "M_UNKNOWN", "The lookup cache is not ready yet")


@dataclass(frozen=True)
class Associations:
    """Who a 3PID belongs to, for the lookup endpoints; each lookup is one Redis round trip unless a
    miss has to be asked of a read-through store or another identity server."""

    config: Config
    lookups: Lookups
    read_through: ReadThrough
    recursion: Recursion
    binding: Bindings
    keys: SigningKeys
    _hash_details: dict[str, bytes] = field(default_factory=dict, init=False, repr=False)  # pepper -> answer

    def _local_v1(self, request: Request) -> bool:
        """Whether an unauthenticated (v1) lookup is asked locally: by a client of recursion.allow.
        Only asked when lookup.share_binds is false (else every lookup sees the same)."""
        return self.config.lookup.share_binds or self.recursion.client_allowed(request)

    def _local_v2(self, requester: str) -> bool:
        """Whether a v2 lookup is asked locally: by a token of a Matrix ID on matrix.domain."""
        domain = self.config.matrix.domain.lower()
        return self.config.lookup.share_binds or requester.partition(":")[2].lower() == domain

    async def _find(self, pairs: list[tuple[str, str]], request: Request,
                    asked_locally: bool) -> tuple[list[str | None], list[str | None]]:
        """(mxids for canonical (medium, address) pairs, in order, from wherever they are known (other
        identity servers only if request's client may recurse; bindings of local addresses only when
        asked_locally or lookup.share_binds), the cache's store of each or None); counted by source."""
        sources: list[str | None] = []
        local = await self.read_through.fill(pairs, await self.lookups.by_address(pairs, sources, asked_locally))
        found = await self.recursion.fill(pairs, local, request)
        count_lookups(found, sources, local)
        return found, sources

    async def association(self, medium: str, address: str, request: Request) -> dict[str, Any] | None:
        """The signed v1 association of one 3PID, or None when nobody has it: the one its binding
        answered (made when it was bound) if a binding holds it, else a new one. Raises nothing."""
        canonical = query_address(medium, address)
        pairs = [(medium, canonical)]
        [mxid], sources = await self._find(pairs, request, self._local_v1(request))
        if mxid is None:
            return None
        if sources[0] in (BINDINGS, LOCAL_BINDINGS):
            bound = await self.binding.association(medium, canonical, mxid)
            if bound is not None:
                return bound
        return self.keys.association(medium, canonical, mxid, self.config.lookup.association_validity * 1000)

    async def bulk(self, pairs: list[tuple[str, str]], request: Request) -> list[list[str]]:
        """[medium, address as sent, mxid] of the (medium, address) pairs that someone has, in order.

        Raises MatrixError: 400 M_TOO_LARGE for more than lookup.bulk_max pairs."""
        bulk_max = self.config.lookup.bulk_max
        if len(pairs) > bulk_max:
            raise MatrixError(400, "M_TOO_LARGE", f"At most {bulk_max} 3PIDs per request")
        found, _ = await self._find([(m, query_address(m, a)) for m, a in pairs], request, self._local_v1(request))
        return [[m, a, mxid] for (m, a), mxid in zip(pairs, found) if mxid is not None]

    async def hash_details(self) -> bytes:
        """{"lookup_pepper", "algorithms"} as JSON: what a v2 lookup must use. Encoded once per
        pepper (the pepper is still read on each call: Redis rebuilt afresh has a new one).

        Raises MatrixError: 503 M_UNKNOWN while the cache has no pepper yet."""
        pepper = await self._pepper()
        encoded = self._hash_details.get(pepper)
        if encoded is None:
            encoded = orjson.dumps({"lookup_pepper": pepper, "algorithms": ALGORITHMS})
            self._hash_details.clear()
            self._hash_details[pepper] = encoded
        return encoded

    async def _pepper(self) -> str:
        pepper = await self.lookups.pepper()
        if not pepper:
            raise _not_ready()
        return pepper

    async def hashed(self, algorithm: str, addresses: list[str], pepper: str,
                     request: Request, requester: str) -> dict[str, str]:
        """{address as sent: mxid} for the v2 lookup of addresses (sha256 hashes, or "address medium"
        with algorithm "none") under pepper, asked by requester (the Matrix ID of the request's
        token); a sha256 lookup is one round trip, pepper included, and is never asked elsewhere (a
        hash cannot be).

        Raises MatrixError: 503 M_UNKNOWN while the cache has no pepper; 400 M_INVALID_PEPPER (with
        the current one) for another pepper; 400 M_INVALID_PARAM for an unknown algorithm or an
        address without a medium; 400 M_TOO_LARGE for more than lookup.bulk_max addresses."""
        bulk_max = self.config.lookup.bulk_max
        asked_locally = self._local_v2(requester)
        found: list[str | None] = []
        sources: list[str | None] = []
        if algorithm == "sha256" and len(addresses) <= bulk_max:
            current, found = await self.lookups.by_hash(addresses, sources, asked_locally)
            if not current:
                raise _not_ready()
        else:
            current = await self._pepper()
        if pepper != current:
            raise MatrixError(400, "M_INVALID_PEPPER", "Unknown or invalid pepper: call hash_details again",
                              algorithm="sha256", lookup_pepper=current)
        if algorithm not in ALGORITHMS:
            raise MatrixError(400, "M_INVALID_PARAM", f"Unsupported algorithm {algorithm!r}; use one of {ALGORITHMS}")
        if len(addresses) > bulk_max:
            raise MatrixError(400, "M_TOO_LARGE", f"At most {bulk_max} addresses per request")
        if algorithm == "none":
            pairs = []
            for item in addresses:
                address, _, medium = item.rpartition(" ")
                if not address or not medium:
                    raise MatrixError(400, "M_INVALID_PARAM", f'Expected "address medium", got {item!r}')
                pairs.append((medium, query_address(medium, address)))
            found, _ = await self._find(pairs, request, asked_locally)
        else:
            count_lookups(found, sources, found)
        return {a: mxid for a, mxid in zip(addresses, found) if mxid is not None}
