"""The check of server.public_url: it reaches this identity server (the same public key as the key
file), over TLS that the federation client accepts."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx

from indexer.settings import Config
from server.doctor import Finding, ok, problem
from server.doctor.local import key_id, public_key
from server.doctor.tls import request_failed
from server.federation import Federation
from server.homeserver import answer_json

SUBJECT = "public URL"


def check(config: Config) -> Iterator[Finding]:
    try:
        ours = public_key(config)
    except (OSError, ValueError):
        ours = None  # the signing key's own line says what is wrong with it
    yield asyncio.run(_check(config, ours, key_id(config)))


async def _check(config: Config, ours: str | None, served_id: str) -> Finding:
    base = config.server.public_url
    # The federation client: its TLS settings (federation.ca_file) without its address policy, which
    # is about other servers, not this one.
    client = Federation(config.federation).http
    try:
        status = await client.get(f"{base}/_matrix/identity/v2")
        key = await client.get(f"{base}/_matrix/identity/v2/pubkey/{served_id}")
    except httpx.HTTPError as exc:
        return request_failed(SUBJECT, base, exc, "clients and homeservers refuse it",
                              "is mxisd running, and does server.public_url lead to it (DNS, reverse proxy)?")
    finally:
        await client.aclose()
    if status.status_code != 200:
        return problem(SUBJECT, f"{base}/_matrix/identity/v2 answered HTTP {status.status_code}: "
                                "server.public_url must lead to this identity server (check the reverse proxy)")
    served = answer_json(key).get("public_key")
    if ours is None:
        return ok(SUBJECT, f"{base} answers as an identity server (no key file here to compare its key with)")
    if served != ours:
        return problem(SUBJECT, f"{base} serves another identity server: its public key is {served}, the key "
                                f"file's is {ours}: check server.public_url and the reverse proxy")
    return ok(SUBJECT, f"{base} serves this identity server (the key file's public key)")
