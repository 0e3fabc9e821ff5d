"""Talking to homeservers: federation server discovery (override, IP literal, explicit port,
.well-known, SRV, 8448), OpenID userinfo, server keys and X-Matrix request checks."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.resolver
import httpx
from signedjson.key import decode_verify_key_bytes
from signedjson.sign import SignatureVerifyException, verify_signed_json
from unpaddedbase64 import decode_base64

from indexer.settings import FederationConfig
from server.metrics import OUTGOING_FAILURES

log = logging.getLogger(__name__)

MAX_RESPONSE = 64 * 1024
WELL_KNOWN_TTL = 24 * 3600
WELL_KNOWN_ERROR_TTL = 3600
_SERVER_NAME = re.compile(
    r"^(?P<host>\[[0-9A-Fa-f:.]+\]|\d{1,3}(?:\.\d{1,3}){3}|[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*)(?::(?P<port>[1-9][0-9]{0,4}))?$")
_X_MATRIX_PARAM = re.compile(r'\s*([A-Za-z]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))\s*(?:,|$)')


class FederationError(Exception):
    """The homeserver could not be reached or answered something unusable; the message says which."""


class BadSignature(FederationError):
    """A request's X-Matrix signature does not verify with the homeserver's key."""


class WrongDestination(FederationError):
    """A request signed for a server name that is not one of ours."""

    def __init__(self, destination: str, our_names: list[str]) -> None:
        super().__init__(f"signed for {destination!r}, not one of {', '.join(our_names)}")
        self.destination = destination
        self.our_names = our_names


@dataclass(frozen=True)
class Target:
    """Where to connect for a server name, and the name its certificate must carry."""

    ip: str
    port: int
    tls_name: str
    host_header: str
    via: str = ""  # how discovery found it, for people (`mxisd doctor`)


def split_server_name(name: str) -> tuple[str, int | None]:
    """(host, port or None) of a valid server name; ValueError otherwise."""
    match = _SERVER_NAME.fullmatch(name)
    if not match or (match.group("port") and int(match.group("port")) > 65535):
        raise ValueError(f"not a valid server name: {name!r}")
    host = match.group("host")
    if host.startswith("["):
        ipaddress.IPv6Address(host[1:-1])
    port = match.group("port")
    return host, int(port) if port else None


NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")


def embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses a connection to this IPv6 address may end up at: IPv4-mapped and
    IPv4-compatible addresses, NAT64 (64:ff9b::/96), 6to4 (2002::/16) and Teredo (2001::/32, its
    server and its client)."""
    if address.ipv4_mapped is not None:
        return [address.ipv4_mapped]
    if address in NAT64 or (address in IPV4_COMPATIBLE and int(address) > 1):
        return [ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)]
    if address.sixtofour is not None:
        return [address.sixtofour]
    if address.teredo is not None:
        return list(address.teredo)
    return []


def _ip_literal(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return None


class _Slots:
    """A semaphore per destination, kept only while someone holds or waits for it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._slots: dict[str, tuple[asyncio.Semaphore, list[int]]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, destination: str) -> AsyncIterator[None]:
        semaphore, users = self._slots.setdefault(destination, (asyncio.Semaphore(self.limit), [0]))
        users[0] += 1
        try:
            async with semaphore:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._slots[destination]


def verify_server_keys(body: dict[str, Any], server_name: str, key_id: str, key: str) -> None:
    """FederationError unless a key answer of server_name is signed by its key key_id (base64 key)."""
    try:
        verify_signed_json(body, server_name, decode_verify_key_bytes(key_id, decode_base64(key)))
    except (SignatureVerifyException, ValueError) as exc:
        raise FederationError(f"{server_name}'s key response is not signed by {key_id}: {exc}") from None


class Federation:
    """Outgoing requests to homeservers, with the config's overrides, TLS and address policy; each
    within an overall deadline, and only a few at a time to any one destination."""

    def __init__(self, settings: FederationConfig) -> None:
        self.overrides = settings.overrides
        self.allowed_private = settings.allow_private_networks
        self.timeout = settings.timeout_s
        self.deadline_s = settings.deadline_s
        self._slots = _Slots(settings.max_in_flight)
        if not settings.verify_tls:
            self.tls: ssl.SSLContext | bool = False
        else:
            self.tls = ssl.create_default_context(cafile=settings.ca_file)
        self.http = httpx.AsyncClient(verify=self.tls, timeout=self.timeout, follow_redirects=False)
        self.resolver = dns.asyncresolver.Resolver()
        self.well_known_port = 443  # fixed by the spec; tests serve .well-known elsewhere
        self._well_known: dict[str, tuple[float, str | None, str]] = {}
        self._keys: dict[tuple[str, str], tuple[float, str]] = {}

    async def close(self) -> None:
        await self.http.aclose()

    @contextlib.asynccontextmanager
    async def _bounded(self, destination: str, kind: str = "homeserver") -> AsyncIterator[None]:
        """Within deadline_s (waiting for a turn included), as one of at most max_in_flight requests
        to destination: a peer that answers a byte at a time holds a few connections for a bounded
        time, never the requests to everyone else."""
        try:
            async with asyncio.timeout(self.deadline_s):
                async with self._slots.hold(destination):
                    yield
        except TimeoutError:
            OUTGOING_FAILURES.labels(kind).inc()
            raise FederationError(f"{destination} did not answer within {self.deadline_s:g} s") from None

    # -- addresses --------------------------------------------------------------------------------

    def _allowed(self, ip: str) -> bool:
        address = ipaddress.ip_address(ip)
        if any(address in net for net in self.allowed_private):
            return True
        if isinstance(address, ipaddress.IPv6Address):
            inner = embedded_ipv4(address)
            if inner:
                return all(self._allowed(str(v4)) for v4 in inner)
        return address.is_global

    async def _addresses(self, host: str) -> list[str]:
        literal = _ip_literal(host)
        if literal:
            return [literal]
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise FederationError(f"cannot resolve {host}: {exc.strerror}") from None
        return list(dict.fromkeys(str(info[4][0]) for info in infos))

    async def _connectable(self, host: str) -> str:
        """The first address of host that policy allows connecting to."""
        addresses = await self._addresses(host)
        for ip in addresses:
            if self._allowed(ip):
                return ip
        raise FederationError(f"{host} resolves only to non-public addresses ({', '.join(addresses)}), "
                              "which federation.allow_private_networks does not allow")

    async def _srv(self, host: str) -> tuple[str, str, int] | None:
        """The SRV record name that answered, and its target host and port."""
        for prefix in ("_matrix-fed._tcp.", "_matrix._tcp."):
            try:
                answer = await self.resolver.resolve(prefix + host, "SRV", lifetime=self.timeout)
            except (dns.exception.DNSException, dns.resolver.NoAnswer):
                continue
            records = sorted(answer, key=lambda r: (r.priority, -r.weight))
            if records:
                return prefix + host, str(records[0].target).rstrip("."), int(records[0].port)
        return None

    # -- discovery --------------------------------------------------------------------------------

    async def resolve(self, server_name: str) -> Target:
        """Where the homeserver called server_name answers federation requests."""
        if server_name in self.overrides:
            host, port = split_server_name(self.overrides[server_name])
            return Target(await self._connectable(host), port or 8448, split_server_name(server_name)[0],
                          server_name, f"federation.overrides sends {server_name} to {self.overrides[server_name]}")
        host, port = split_server_name(server_name)
        if _ip_literal(host) or port is not None:
            return Target(await self._connectable(host), port or 8448, host.strip("[]"), server_name,
                          "the server name gives the address")
        delegated, answer = await self._delegation(host)
        if delegated:
            how = f"its .well-known/matrix/server delegates to {delegated}"
            d_host, d_port = split_server_name(delegated)
            if _ip_literal(d_host) or d_port is not None:
                return Target(await self._connectable(d_host), d_port or 8448, d_host.strip("[]"), delegated, how)
            srv = await self._srv(d_host)
            if srv:
                return Target(await self._connectable(srv[1]), srv[2], d_host, d_host,
                              f"{how}, whose SRV record {srv[0]} names {srv[1]}:{srv[2]}")
            return Target(await self._connectable(d_host), 8448, d_host, d_host, f"{how}, without an SRV record")
        how = f"no .well-known/matrix/server delegation ({answer})"
        srv = await self._srv(host)
        if srv:
            return Target(await self._connectable(srv[1]), srv[2], host, host,
                          f"{how}; SRV record {srv[0]} names {srv[1]}:{srv[2]}")
        return Target(await self._connectable(host), 8448, host, host, f"{how}, no SRV record: port 8448")

    async def _delegation(self, host: str) -> tuple[str | None, str]:
        """The server name host delegates to with .well-known/matrix/server (None: it does not), and
        what that answer was."""
        cached = self._well_known.get(host)
        if cached and cached[0] > time.monotonic():
            return cached[1], cached[2]
        delegated, ttl = None, WELL_KNOWN_ERROR_TTL
        try:
            target = Target(await self._connectable(host), self.well_known_port, host, host)
            status, body = await self._get(target, "/.well-known/matrix/server")
            server = body.get("m.server") if status == 200 and isinstance(body, dict) else None
            answer = f"HTTP {status}" if status != 200 else "no m.server in the answer"
            if isinstance(server, str):
                split_server_name(server)
                delegated, ttl, answer = server, WELL_KNOWN_TTL, f"m.server {server}"
        except (FederationError, ValueError) as exc:
            log.info("no usable .well-known/matrix/server for %s: %s", host, exc)
            answer = str(exc)
        self._well_known[host] = (time.monotonic() + ttl, delegated, answer)
        return delegated, answer

    async def _get(self, target: Target, path_and_query: str) -> tuple[int, Any]:
        return await self._request("GET", target, path_and_query)

    async def _request(self, method: str, target: Target, path_and_query: str,
                       body: Any = None, scheme: str = "https", kind: str = "homeserver") -> tuple[int, Any]:
        host = f"[{target.ip}]" if ":" in target.ip else target.ip
        url = f"{scheme}://{host}:{target.port}{path_and_query}"
        extensions = {"sni_hostname": target.tls_name} if not _ip_literal(target.tls_name) else {}
        try:
            async with self.http.stream(method, url, headers={"Host": target.host_header}, json=body,
                                        extensions=extensions) as response:
                raw = b""
                async for chunk in response.aiter_bytes():
                    raw += chunk
                    if len(raw) > MAX_RESPONSE:
                        raise FederationError(f"{target.host_header} answered more than {MAX_RESPONSE} bytes")
        except httpx.HTTPError as exc:
            OUTGOING_FAILURES.labels(kind).inc()
            raise FederationError(f"{target.host_header} ({target.ip}:{target.port}) cannot be reached: "
                                  f"{exc or type(exc).__name__}") from None
        try:
            return response.status_code, json.loads(raw)
        except ValueError:
            return response.status_code, None

    # -- requests ---------------------------------------------------------------------------------

    async def openid_user(self, server_name: str, access_token: str) -> str | None:
        """The Matrix ID the homeserver's OpenID userinfo gives for the token, or None if it refuses it."""
        query = httpx.QueryParams({"access_token": access_token})
        async with self._bounded(server_name):
            target = await self.resolve(server_name)
            status, body = await self._get(target, f"/_matrix/federation/v1/openid/userinfo?{query}")
        if status != 200:
            log.info("OpenID token refused by %s (HTTP %d)", server_name, status)
            return None
        sub = body.get("sub") if isinstance(body, dict) else None
        if not isinstance(sub, str):
            raise FederationError(f"{server_name} answered userinfo without a \"sub\"")
        return sub

    async def post(self, server_name: str, path: str, body: Any) -> tuple[int, Any]:
        """POST body as JSON to the homeserver; its status and JSON answer (None if not JSON)."""
        async with self._bounded(server_name):
            return await self._request("POST", await self.resolve(server_name), path, body)

    async def request_url(self, method: str, base_url: str, path_and_query: str, body: Any = None,
                          kind: str = "identity") -> tuple[int, Any]:
        """A request to another service (an identity server, a bridge) at base_url, under the same
        address policy, timeouts and size limit as requests to homeservers."""
        parts = httpx.URL(base_url)
        if parts.scheme not in ("http", "https") or not parts.host:
            raise FederationError(f"not an http(s) URL: {base_url}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        host_header = parts.host if parts.port is None else f"{parts.host}:{parts.port}"
        async with self._bounded(host_header, kind):
            target = Target(await self._connectable(parts.host), port, parts.host, host_header)
            return await self._request(method, target, parts.raw_path.decode().rstrip("/") + path_and_query, body,
                                       parts.scheme, kind)

    async def server_keys(self, server_name: str, target: Target | None = None) -> dict[str, Any]:
        """The homeserver's /_matrix/key/v2/server answer (at target, else where discovery finds it),
        checked to be for server_name; its signatures are not checked here."""
        async with self._bounded(server_name):
            status, body = await self._get(target or await self.resolve(server_name), "/_matrix/key/v2/server")
        if status != 200 or not isinstance(body, dict) or body.get("server_name") != server_name:
            raise FederationError(f"{server_name} did not answer its server keys")
        return body

    async def verify_key(self, server_name: str, key_id: str) -> str:
        """The base64 public key key_id of the homeserver, from its /_matrix/key/v2/server."""
        cached = self._keys.get((server_name, key_id))
        if cached and cached[0] > time.time() * 1000:
            return cached[1]
        body = await self.server_keys(server_name)
        key = (body.get("verify_keys") or {}).get(key_id, {}).get("key")
        if not isinstance(key, str):
            raise FederationError(f"{server_name} has no key {key_id}")
        verify_server_keys(body, server_name, key_id, key)
        valid_until = body.get("valid_until_ts")
        if isinstance(valid_until, int):
            self._keys[(server_name, key_id)] = (valid_until, key)
        return key

    async def verify_request(self, authorization: str, method: str, uri: str, content: Any,
                             our_names: list[str]) -> str:
        """The origin of a request carrying a valid X-Matrix signature for us; FederationError or
        ValueError (malformed header) otherwise."""
        if not authorization.startswith("X-Matrix "):
            raise ValueError("no X-Matrix authorization")
        params: dict[str, str] = {}
        for match in _X_MATRIX_PARAM.finditer(authorization[len("X-Matrix "):]):
            value = match.group(2) if match.group(2) is not None else match.group(3)
            params[match.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
        origin, key_id, sig = params.get("origin"), params.get("key"), params.get("sig")
        if not origin or not key_id or not sig:
            raise ValueError("the X-Matrix authorization lacks origin, key or sig")
        split_server_name(origin)  # ValueError: not a server name
        destination = params.get("destination")
        if destination is not None and destination.lower() not in our_names:
            raise WrongDestination(destination, our_names)
        key = await self.verify_key(origin, key_id)
        # Synapse signs "destination_is" with the name it was told to reach us by, and says which;
        # a homeserver that does not say may have used any of our names.
        for name in [destination] if destination is not None else our_names:
            signed = {"method": method, "uri": uri, "origin": origin, "destination_is": name,
                      "content": content, "signatures": {origin: {key_id: sig}}}
            try:
                verify_signed_json(signed, origin, decode_verify_key_bytes(key_id, decode_base64(key)))
                return origin
            except (SignatureVerifyException, ValueError) as exc:
                failure = str(exc)
        raise BadSignature(f"bad X-Matrix signature from {origin}: {failure}")
