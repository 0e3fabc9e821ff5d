"""Checks of the homeserver: its client API at homeserver.url, and its federation API as other
servers find it (.well-known, SRV, the config's overrides), with a valid TLS certificate."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx

from indexer.settings import Config
from server.doctor import Finding, not_checked, ok, problem
from server.doctor.tls import bad_certificate, request_failed
from server.federation import Federation, FederationError, Target, verify_server_keys
from server.homeserver import Homeserver, answer_json

CLIENT = "homeserver client API"
FEDERATION = "homeserver federation API"


def client_api(config: Config) -> Iterator[Finding]:
    url = config.homeserver.url
    if not url:
        yield not_checked(CLIENT, "homeserver.url is null: directory search, login checks through the "
                                  "homeserver and profiles are off")
        return
    yield asyncio.run(_client_api(config, url))


async def _client_api(config: Config, url: str) -> Finding:
    homeserver = Homeserver(config.homeserver)
    assert homeserver.http is not None  # a url is configured
    try:
        response = await homeserver.http.get("/_matrix/client/versions")
    except httpx.HTTPError as exc:
        return request_failed(CLIENT, url, exc, "give it one this host trusts, or point homeserver.url at the "
                              "homeserver's internal listener", "check homeserver.url, and that the homeserver runs")
    finally:
        await homeserver.close()
    versions = answer_json(response).get("versions")
    if response.status_code != 200 or not isinstance(versions, list) or not versions:
        return problem(CLIENT, f"{url}/_matrix/client/versions answered HTTP {response.status_code} without "
                               "a list of versions: homeserver.url must be the homeserver's client API")
    return ok(CLIENT, f"{url} answers (client API versions {', '.join(map(str, versions[-3:]))})")


def federation(config: Config) -> Iterator[Finding]:
    yield from asyncio.run(_federation(config))


async def _federation(config: Config) -> list[Finding]:
    name = config.matrix.domain
    client = Federation(config.federation)
    try:
        try:
            target = await client.resolve(name)
        except (FederationError, ValueError) as exc:
            return [problem(FEDERATION, f"cannot find where {name} serves federation: {exc}")]
        found = ok(FEDERATION, f"{name} is served at {target.ip}:{target.port}: {target.via}")
        return [found, await _server_keys(client, name, target, config.federation.verify_tls)]
    finally:
        await client.close()


async def _server_keys(client: Federation, name: str, target: Target, verify_tls: bool) -> Finding:
    where = f"{target.ip}:{target.port}"
    try:
        body = await client.server_keys(name, target)
        keys = {key_id: key.get("key") for key_id, key in (body.get("verify_keys") or {}).items()
                if isinstance(key, dict)}
        if not keys:
            return problem(FEDERATION, f"{name} at {where} answers its server keys without any key")
        for key_id, key in keys.items():
            verify_server_keys(body, name, key_id, str(key))
    except FederationError as exc:
        reason = bad_certificate(str(exc))
        if reason is not None:
            return problem(FEDERATION, f"{name} at {where} has no valid TLS certificate for {target.tls_name} "
                                       f"({reason}): homeservers need one from a CA this host trusts "
                                       "(federation.ca_file names a private one)")
        return problem(FEDERATION, f"{exc}: OpenID checks (v2 registration) and invites to {name} fail")
    tls = f"valid TLS for {target.tls_name}" if verify_tls else "TLS not verified (federation.verify_tls is false)"
    return ok(FEDERATION, f"{name} at {where} answers with {tls}, keys {', '.join(sorted(keys))}")
