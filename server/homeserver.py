"""The homeserver beside us, at its internal client-server URL: access-token checks (whoami, with
answers cached briefly), and requests passed on to it with its answers relayed."""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

import httpx
from sanic.response import HTTPResponse, raw

from indexer import logs
from indexer.settings import HomeserverConfig
from server.caller import usable_token
from server.errors import MatrixError

log = logging.getLogger(__name__)

MAX_CACHED_TOKENS = 10_000
# Headers of the client's request worth passing on; hop-by-hop and length headers are httpx's business.
FORWARDED_REQUEST_HEADERS = ("authorization", "content-type", "accept", "accept-language", "user-agent")


class Homeserver:
    """One worker's client of the homeserver."""

    def __init__(self, settings: HomeserverConfig) -> None:
        self.url = settings.url
        self.whoami_ttl = settings.whoami_cache
        self.http = httpx.AsyncClient(base_url=self.url, timeout=settings.timeout) if self.url else None
        self._tokens: dict[bytes, tuple[float, str]] = {}

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """The homeserver's answer, or 503/502 Matrix errors when there is none."""
        if self.http is None:
            raise MatrixError(503, "M_UNKNOWN", "This identity server has no homeserver configured")
        try:
            return await self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            logs.repeated.warning(log, "homeserver %s: %s %s failed: %s: %s", self.url, method, path,
                                  type(exc).__name__, exc, key=f"homeserver {type(exc).__name__}")
            raise MatrixError(502, "M_UNKNOWN", "The homeserver did not answer") from None

    async def whoami(self, token: str) -> str:
        """The user id a client access token belongs to; 401 M_UNKNOWN_TOKEN when the homeserver refuses it."""
        if not usable_token(token):
            raise MatrixError(401, "M_UNKNOWN_TOKEN", "Unrecognised access token")
        key = hashlib.sha256(token.encode()).digest()
        now = time.monotonic()
        cached = self._tokens.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        response = await self.request("GET", "/_matrix/client/v3/account/whoami",
                                      headers={"Authorization": f"Bearer {token}"})
        if response.status_code in (401, 403):
            raise MatrixError(401, "M_UNKNOWN_TOKEN", "Unrecognised access token")
        user_id = answer_json(response).get("user_id") if response.status_code == 200 else None
        if not isinstance(user_id, str):
            log.warning("homeserver %s: whoami answered %d without a user_id", self.url, response.status_code)
            raise MatrixError(502, "M_UNKNOWN", "The homeserver could not check the access token")
        if len(self._tokens) >= MAX_CACHED_TOKENS:
            self._tokens = {k: v for k, v in self._tokens.items() if v[0] > now}
            if len(self._tokens) >= MAX_CACHED_TOKENS:
                self._tokens.clear()
        self._tokens[key] = (now + self.whoami_ttl, user_id)
        return user_id

    async def close(self) -> None:
        if self.http is not None:
            await self.http.aclose()


def answer_json(response: httpx.Response) -> dict[str, Any]:
    """The homeserver's JSON object answer ({} when it answered anything else)."""
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def forwarded_headers(headers: Any) -> dict[str, str]:
    """The headers of a client request to pass on to the homeserver. An Authorization that is not a
    usable Bearer token is refused here as Synapse would (401), and never sent; other values that
    could not be sent as they are (bytes that are not ASCII, control characters) are left out."""
    forwarded = {}
    for name in FORWARDED_REQUEST_HEADERS:
        value = headers.get(name)
        if value is None:
            continue
        if name == "authorization":
            scheme, _, token = value.partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token:
                raise MatrixError(401, "M_MISSING_TOKEN", "Missing access token")
            if not usable_token(token):
                raise MatrixError(401, "M_UNKNOWN_TOKEN", "Unrecognised access token")
            value = f"Bearer {token}"
        if value.isascii() and value.isprintable() and value == value.strip():
            forwarded[name] = value
    return forwarded


def relay(response: httpx.Response) -> HTTPResponse:
    """The homeserver's answer, as it gave it."""
    return raw(response.content, status=response.status_code,
               content_type=response.headers.get("content-type", "application/json"))
