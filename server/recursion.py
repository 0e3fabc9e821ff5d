"""Recursive lookups: 3PIDs our cache does not know, asked of other identity servers.

An email address on a domain that is not ours is asked of the identity server its domain names in
DNS (`_matrix-identity._tcp.<domain>` SRV), by v2 lookup when that server allows it without a
token, else by v1 lookup (whose signature must verify against the server's published key); then of
the configured forwarders, the same way; then of the bridge configured for the medium (mxisd's
bridge: the v1 lookup protocol, trusted unsigned). Answers and misses are remembered in Redis; a
source that fails or answers garbage counts as "not found" for this request only.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Iterable
from typing import Any, cast

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver
import httpx
import redis.asyncio
from sanic import Request
from signedjson.key import decode_verify_key_bytes
from signedjson.sign import SignatureVerifyException, verify_signed_json
from unpaddedbase64 import decode_base64

from indexer import logs
from indexer.normalize import lookup_hash
from indexer.rediskeys import RedisKeys
from indexer.settings import Config, Network
from server.caller import client_address
from server.federation import Federation, FederationError

log = logging.getLogger(__name__)

V1_LOOKUP = "/_matrix/identity/api/v1/lookup"


class RemoteAnswers:
    """Answers of other identity servers to recursive lookups, each kept for its own TTL."""

    def __init__(self, client: redis.asyncio.Redis, prefix: str) -> None:
        self.r = client
        self.k = RedisKeys(prefix)

    async def get(self, pairs: list[tuple[str, str]]) -> list[str | None]:
        """For (medium, address) pairs: an mxid, "" for a remembered "not found", or None when not asked lately."""
        if not pairs:
            return []
        return cast("list[str | None]", await self.r.mget([self.k.remote(m, a) for m, a in pairs]))

    async def remember(self, medium: str, address: str, mxid: str | None, ttl: int) -> None:
        await self.r.set(self.k.remote(medium, address), mxid or "", ex=ttl)


class Unusable(Exception):
    """A source answered something that cannot be used; the message says what."""


def _nameserver(text: str) -> dns.nameserver.Do53Nameserver:
    """ "192.0.2.53", "192.0.2.53:5353", "2001:db8::53" or "[2001:db8::53]:5353"."""
    if text.startswith("["):
        host, _, port = text[1:].partition("]")
        port = port.lstrip(":")
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""
    return dns.nameserver.Do53Nameserver(host, int(port) if port else 53)


class Recursion:
    """Answers misses from other identity servers, for the requesters allowed to recurse."""

    def __init__(self, config: Config, federation: Federation, answers: RemoteAnswers) -> None:
        settings = config.recursion
        self.allowed = settings.allow
        self.proxies = settings.proxies
        self.own_domains = {d.lower() for d in [config.matrix.domain, *settings.own_domains]}
        self.scheme = settings.scheme
        self.forwarders = settings.forwarders
        self.bridges = {m: url for m in ("email", "msisdn") if (url := getattr(settings.bridges, m))}
        self.budget_s = settings.budget_s
        self.ttl = settings.ttl
        self.miss_ttl = settings.miss_ttl
        self.proxies_count = config.server.proxies_count
        self.federation = federation
        self.answers = answers
        self.resolver = dns.asyncresolver.Resolver(configure=not settings.resolvers)
        if settings.resolvers:
            self.resolver.nameservers = [_nameserver(r) for r in settings.resolvers]
        self._srv: dict[str, tuple[float, str | None]] = {}

    def _in(self, text: str, networks: Iterable[Network]) -> bool:
        try:
            address = ipaddress.ip_address(text.strip())
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in n for n in networks)

    def client_allowed(self, request: Request) -> bool:
        """Whether the requester may recurse. Behind recursion.proxies: the nearest X-Forwarded-For hop
        that is not one of them (read from the right: the left is whatever the client wrote); else the
        client address of server.proxies_count (the TCP peer's without proxies)."""
        client = client_address(request, self.proxies_count)
        if self._in(request.ip, self.proxies):
            client = request.ip
            hops = [h.strip() for header in request.headers.getall("x-forwarded-for", []) for h in header.split(",")]
            for hop in reversed(hops):
                client = hop
                if not self._in(client, self.proxies):
                    break
        return self._in(client, self.allowed)

    async def fill(self, pairs: list[tuple[str, str]], found: list[str | None],
                   request: Request | None = None) -> list[str | None]:
        """found with the misses answered by other identity servers; for a request only when its
        client may recurse (internal callers pass none); nothing while recursion is off (no `allow`). Within the
        time budget: what is late is a miss."""
        if not self.allowed:
            return found
        misses = [i for i, (pair, mxid) in enumerate(zip(pairs, found)) if mxid is None and self._asks(*pair)]
        if not misses or (request is not None and not self.client_allowed(request)):
            return found
        remembered = await self.answers.get([pairs[i] for i in misses])
        tasks = {i: asyncio.ensure_future(self.resolve(*pairs[i])) for i, cached in zip(misses, remembered)
                 if cached is None}
        result = list(found)
        for i, cached in zip(misses, remembered):
            if cached:
                result[i] = cached
        if tasks:
            done, late = await asyncio.wait(tasks.values(), timeout=self.budget_s)
            for task in late:
                task.cancel()
            if late:
                log.warning("recursive lookup: %d of %d answers missed the %.1f s budget", len(late), len(tasks),
                            self.budget_s)
            for i, task in tasks.items():
                if task not in done:
                    continue
                if task.exception() is not None:
                    logs.repeated.error(log, "recursive lookup of %s %s failed: %s", *pairs[i], task.exception(),
                                        key=f"recursion {type(task.exception()).__name__}")
                else:
                    result[i] = task.result()
        return result

    def _asks(self, medium: str, address: str) -> bool:
        if medium == "email":
            return address.rpartition("@")[2].lower() not in self.own_domains
        return bool(self.forwarders or self.bridges.get(medium))

    async def resolve(self, medium: str, address: str) -> str | None:
        """Ask each source in turn; remember the answer (or a miss when every source answered)."""
        servers = list(self.forwarders)
        if medium == "email":
            discovered = await self.discover(address.rpartition("@")[2].lower())
            if discovered:
                servers.insert(0, discovered)
        clean = True
        for base in servers:
            try:
                mxid = await self.ask_identity_server(base, medium, address)
            except (FederationError, Unusable) as exc:
                logs.repeated.warning(log, "recursive lookup of %s %s at %s failed: %s", medium, address, base, exc,
                                      key=f"recursion at {base}")
                clean = False
                continue
            if mxid:
                await self.answers.remember(medium, address, mxid, self.ttl)
                return mxid
        bridge = self.bridges.get(medium)
        if bridge:
            try:
                mxid = await self.ask_v1(bridge, medium, address, signed=False)
            except (FederationError, Unusable) as exc:
                logs.repeated.warning(log, "bridge lookup of %s %s failed: %s", medium, address, exc,
                                      key=f"bridge {bridge}")
                return None
            if mxid:
                await self.answers.remember(medium, address, mxid, self.ttl)
                return mxid
        if clean:
            await self.answers.remember(medium, address, None, self.miss_ttl)
        return None

    async def discover(self, domain: str) -> str | None:
        """The base URL of the identity server of domain, from its SRV record (cached for the record's TTL)."""
        cached = self._srv.get(domain)
        if cached and cached[0] > time.monotonic():
            return cached[1]
        base, ttl = None, float(self.miss_ttl)
        try:
            answer = await self.resolver.resolve(f"_matrix-identity._tcp.{domain}", "SRV", lifetime=self.budget_s)
            records = sorted(answer, key=lambda r: (r.priority, -r.weight))
            if records:
                host = str(records[0].target).rstrip(".")
                base = f"{self.scheme}://{host}:{records[0].port}"
                ttl = float(answer.rrset.ttl) if answer.rrset is not None else ttl
        except (dns.exception.DNSException, dns.resolver.NoAnswer) as exc:
            log.debug("no identity server SRV record for %s: %s", domain, exc)
        self._srv[domain] = (time.monotonic() + ttl, base)
        return base

    async def ask_identity_server(self, base: str, medium: str, address: str) -> str | None:
        """v2 lookup when the server answers it without a token, else v1."""
        status, details = await self.federation.request_url("GET", base, "/_matrix/identity/v2/hash_details")
        if status == 200 and isinstance(details, dict) and "sha256" in (details.get("algorithms") or []) \
                and isinstance(details.get("lookup_pepper"), str):
            hashed = lookup_hash(address, medium, details["lookup_pepper"])
            status, answer = await self.federation.request_url("POST", base, "/_matrix/identity/v2/lookup", {
                "algorithm": "sha256", "pepper": details["lookup_pepper"], "addresses": [hashed]})
            if status == 200 and isinstance(answer, dict) and isinstance(answer.get("mappings"), dict):
                mxid = answer["mappings"].get(hashed)
                if mxid is not None and not isinstance(mxid, str):
                    raise Unusable("a v2 mapping that is not a string")
                return mxid
        return await self.ask_v1(base, medium, address, signed=True)

    async def ask_v1(self, base: str, medium: str, address: str, signed: bool) -> str | None:
        """The mxid of a v1 lookup answer; with signed, only when its signature verifies."""
        query = "?" + str(httpx.QueryParams({"medium": medium, "address": address}))
        status, body = await self.federation.request_url("GET", base, V1_LOOKUP + query,
                                                         kind="identity" if signed else "bridge")
        if status != 200 or not isinstance(body, dict):
            raise Unusable(f"HTTP {status} with {'a JSON object' if isinstance(body, dict) else 'no JSON object'}")
        if not body:
            return None
        if (body.get("medium"), body.get("address")) != (medium, address) or not isinstance(body.get("mxid"), str):
            raise Unusable("an association for another 3PID or without mxid")
        if signed:
            await self._verify(base, body)
        mxid: str = body["mxid"]
        return mxid

    async def _verify(self, base: str, body: dict[str, Any]) -> None:
        signatures = body.get("signatures")
        if not isinstance(signatures, dict) or not signatures:
            raise Unusable("an unsigned association")
        for server_name, keys in signatures.items():
            for key_id in keys if isinstance(keys, dict) else {}:
                if not key_id.startswith("ed25519:"):
                    continue
                status, key = await self.federation.request_url("GET", base,
                                                                f"/_matrix/identity/api/v1/pubkey/{key_id}")
                public = key.get("public_key") if status == 200 and isinstance(key, dict) else None
                if not isinstance(public, str):
                    raise Unusable(f"no public key {key_id}")
                try:
                    verify_signed_json(body, server_name, decode_verify_key_bytes(key_id, decode_base64(public)))
                except (SignatureVerifyException, ValueError) as exc:
                    raise Unusable(f"the signature does not verify: {exc}") from None
                now = int(time.time() * 1000)
                not_after = body.get("not_after")
                if isinstance(not_after, int) and not_after < now:
                    raise Unusable("an expired association")
                return
        raise Unusable("no ed25519 signature")
