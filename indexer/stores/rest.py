"""The `rest` store: a web application speaking mxisd's REST backend protocol (README "The rest store").

All requests are POSTs of JSON. mxisd's endpoints: auth `{"auth": {mxid, localpart, domain, password}}`
-> `{"auth": {"success": bool}}`; single lookup `{"lookup": {medium, address}}` -> `{"lookup":
{medium, address, id: {type: localpart|mxid, value}}}` or `{}`. Ours, for syncing: enumerate
`{cursor, limit}` -> `{"identities": [person...], "next_cursor"}`; changes `{since, cursor, limit}`
-> `{"changes": [{id, mark, identity: person|null}], "next_cursor", "high_water_mark"}`, where a
person is an object of the file store's format (schemas/file-store.schema.json).

A store without an enumerate endpoint is not synced: the server asks its lookup endpoint on cache
misses (server/read_through.py), with the request and answer helpers below.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import httpx

from indexer import logs, normalize
from indexer.identity import Identity
from indexer.settings import Config, RestStoreConfig
from indexer.stores import Change, Store, StoreError, StoreUnavailable

log = logging.getLogger(__name__)

MAX_PAGES = 1_000_000


class BadAnswer(ValueError):
    """The service answered something that is not the protocol."""


def lookup_request(medium: str, address: str) -> dict[str, Any]:
    """The body of a single lookup."""
    return {"lookup": {"medium": medium, "address": address}}


def lookup_answer(body: Any, domain: str) -> str | None:
    """The mxid in a single lookup's answer, None for "not found"; BadAnswer for anything else."""
    if body == {} or (isinstance(body, dict) and body.get("lookup") in (None, {})):
        return None
    found = body.get("lookup") if isinstance(body, dict) else None
    ident = found.get("id") if isinstance(found, dict) else None
    if not isinstance(ident, dict) or not isinstance(ident.get("value"), str):
        raise BadAnswer("expected {} or {\"lookup\": {\"id\": {\"type\", \"value\"}}}")
    try:
        if ident.get("type") == "mxid" or ident["value"].startswith("@"):
            return normalize.mxid(ident["value"])[0]
        return f"@{normalize.localpart(ident['value'])}:{domain}"
    except normalize.InvalidAddress as exc:
        raise BadAnswer(f"unusable user id: {exc}") from None


def decode(response: httpx.Response) -> Any:
    """The JSON body of a 2xx answer; BadAnswer otherwise."""
    if not response.is_success:
        raise BadAnswer(f"HTTP {response.status_code}")
    try:
        return response.json()
    except ValueError:
        raise BadAnswer("the body is not JSON") from None


def client_options(settings: RestStoreConfig) -> dict[str, Any]:
    """httpx client arguments shared by the indexer's and the server's clients."""
    return {"base_url": settings.url, "headers": dict(settings.headers), "timeout": settings.timeout,
            "follow_redirects": False}


class RestStore(Store):
    """People from a web application, synced by pages, or asked one address at a time (read-through)."""

    kind = "rest"

    def __init__(self, settings: RestStoreConfig, config: Config) -> None:
        super().__init__(settings, config)
        self.endpoints = settings.endpoints
        self.page_size = settings.page_size
        self.http = httpx.Client(**client_options(settings))
        self.enumerable = self.endpoints.enumerate is not None

    def _post(self, endpoint: str, body: dict[str, Any]) -> Any:
        path = getattr(self.endpoints, endpoint)
        assert path is not None, f"the {endpoint} endpoint is not configured"
        try:
            return decode(self.http.post(path, json=body))
        except httpx.HTTPError as exc:
            raise StoreError(f"{endpoint} endpoint {path}: {type(exc).__name__}: {exc}") from None
        except BadAnswer as exc:
            raise StoreError(f"{endpoint} endpoint {path}: {exc}") from None

    def _pages(self, endpoint: str, key: str, body: dict[str, Any]) -> Iterator[tuple[dict[str, Any], list[Any]]]:
        """Each page's answer and its list under key, following next_cursor until it is null."""
        cursor, seen = None, set()
        for _ in range(MAX_PAGES):
            page = self._post(endpoint, {**body, "cursor": cursor, "limit": self.page_size})
            items = page.get(key) if isinstance(page, dict) else None
            cursor = page.get("next_cursor") if isinstance(page, dict) else None
            if not isinstance(items, list) or not isinstance(cursor, (str, type(None))):
                raise StoreError(f"{endpoint} endpoint: expected {{\"{key}\": [...], \"next_cursor\": string or null}}")
            yield page, items
            if cursor is None:
                return
            if cursor in seen:
                raise StoreError(f"{endpoint} endpoint: cursor {cursor!r} came back a second time")
            seen.add(cursor)
        raise StoreError(f"{endpoint} endpoint: more than {MAX_PAGES} pages")

    def _identity(self, entry: Any, where: str) -> Identity | None:
        store_id = self.person_id(entry, where)
        return None if store_id is None else self.person_identity(store_id, entry)

    def enumerate(self) -> Iterator[Identity]:
        """Every person of the enumerate endpoint, page by page."""
        if not self.enumerable:
            raise StoreError("this store has no enumerate endpoint: it is asked on each lookup instead")
        for number, (_, items) in enumerate(self._pages("enumerate", "identities", {})):
            for index, entry in enumerate(items):
                identity = self._identity(entry, f"page {number + 1} entry {index}")
                if identity is not None:
                    yield identity

    def high_water_mark(self) -> Any:
        """The changes endpoint's current mark, asked with since null and limit 0."""
        if self.endpoints.changes is None or not self.enumerable:
            return None
        page = self._post("changes", {"since": None, "cursor": None, "limit": 0})
        mark = page.get("high_water_mark") if isinstance(page, dict) else None
        if not isinstance(mark, (int, str)) or isinstance(mark, bool):
            raise StoreError("changes endpoint: expected a high_water_mark (integer or string)")
        return mark

    def changes_since(self, mark: Any) -> Iterator[Change]:
        """The changes endpoint's entries after mark; every mark must be of mark's type."""
        for number, (_, items) in enumerate(self._pages("changes", "changes", {"since": mark})):
            for index, item in enumerate(items):
                where = f"changes page {number + 1} entry {index}"
                if (not isinstance(item, dict) or not isinstance(item.get("id"), (str, int))
                        or type(item.get("mark")) is not type(mark)):
                    raise StoreError(f"{where}: expected {{\"id\", \"mark\" (like {mark!r}), \"identity\"}}")
                entry = item.get("identity")
                identity = None if entry is None else self._identity(entry, where)
                if entry is not None and identity is None:
                    continue  # logged; a broken entry must not delete the person
                yield Change(str(item["id"]) if identity is None else identity.store_id, identity, item["mark"])

    def authenticate(self, identity: Identity, password: str) -> bool:
        """Ask the auth endpoint; anything but {"auth": {"success": true}} is a refusal."""
        if self.endpoints.auth is None:
            return super().authenticate(identity, password)
        if not password:
            return False
        body = {"auth": {"mxid": identity.mxid, "localpart": identity.localpart, "domain": self.domain,
                         "password": password}}
        try:
            answer = self._post("auth", body)
        except StoreError as exc:
            # Not a wrong password: the login is answered 503 and counts against nobody's limit.
            logs.repeated.warning(log, "store %s: cannot check the password of %s: %s", self.name, identity.mxid,
                                  exc, key=f"{self.name} auth request")
            raise StoreUnavailable(f"store {self.name}: {exc}") from None
        auth = answer.get("auth") if isinstance(answer, dict) else None
        if not isinstance(auth, dict) or not isinstance(auth.get("success"), bool):
            log.warning("store %s: login for %s refused: auth endpoint answered without auth.success",
                        self.name, identity.mxid)
            return False
        return bool(auth["success"])

    def close(self) -> None:
        """Close the HTTP client."""
        self.http.close()
