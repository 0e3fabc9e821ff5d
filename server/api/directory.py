"""User directory search from the fulltext index, merged with the homeserver's own results
(client-server API "User directory", answered here instead of by the homeserver)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json

from server.api import access_token, config_of, json_body
from server.errors import MatrixError
from server.homeserver import answer_json, relay
from server.services.directory_ranking import Hit, IndexNotReady

log = logging.getLogger(__name__)

bp = Blueprint("directory")

DEFAULT_LIMIT, MAX_LIMIT = 10, 50


class _Relayed(Exception):
    """The homeserver refused the search: its answer goes back to the client as it is."""

    def __init__(self, response: HTTPResponse) -> None:
        self.response = response


async def _homeserver_results(request: Request, token: str, term: str, limit: int) -> tuple[list[dict[str, Any]], bool]:
    """The homeserver's own results for the same search; none when it cannot search or fails."""
    if not config_of(request).directory.homeserver:
        return [], False
    try:
        response = await request.app.ctx.homeserver.request(
            "POST", request.path, json={"search_term": term, "limit": limit},
            headers={"Authorization": f"Bearer {token}"})
    except MatrixError:
        return [], False  # logged; our own results still answer
    body = answer_json(response)
    if response.status_code != 200:
        if body.get("errcode") == "M_UNRECOGNIZED" or response.status_code >= 500:
            log.info("directory search: the homeserver answered %d; using our results only", response.status_code)
            return [], False
        raise _Relayed(relay(response))
    results = body.get("results")
    valid = [r for r in results if isinstance(r, dict) and isinstance(r.get("user_id"), str)] \
        if isinstance(results, list) else []
    return valid, body.get("limited") is True


async def _visible(request: Request, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The homeserver's results less the people that directory.hide leaves out."""
    hide = request.app.ctx.directory.hide
    if not hide or not results:
        return results
    identities = await request.app.ctx.lookups.identities([r["user_id"] for r in results])
    return [r for r, i in zip(results, identities) if i is None or not hide.hides_identity(i)]


async def _search(request: Request, term: str, limit: int) -> tuple[list[Hit], bool]:
    loop = asyncio.get_running_loop()
    try:
        return await loop.run_in_executor(request.app.ctx.search_executor, request.app.ctx.directory.search,
                                          term, limit)
    except IndexNotReady as exc:
        log.warning("directory search: %s", exc)
        raise MatrixError(503, "M_UNKNOWN", "The directory index is not ready yet, try again shortly") from None


@bp.post("/_matrix/client/r0/user_directory/search", name="search_r0")
@bp.post("/_matrix/client/v3/user_directory/search", name="search_v3")
async def search(request: Request) -> HTTPResponse:
    """POST /_matrix/client/v3/user_directory/search: people whose names match, best first."""
    token = access_token(request)
    if token is None:
        raise MatrixError(401, "M_MISSING_TOKEN", "An access token is required")
    body = json_body(request, "user_directory_search")
    await request.app.ctx.homeserver.whoami(token)
    limit = min(max(body.get("limit", DEFAULT_LIMIT), 0), MAX_LIMIT)
    term = body["search_term"].strip().removeprefix("@")
    try:
        (hits, more), (theirs, their_more) = await asyncio.gather(
            _search(request, term, limit), _homeserver_results(request, token, term, limit))
    except _Relayed as refused:
        return refused.response
    theirs = await _visible(request, theirs)
    avatars = {r["user_id"]: r.get("avatar_url") for r in theirs}
    merged = [{"user_id": h.mxid, "display_name": h.display_name, "avatar_url": avatars.get(h.mxid)} for h in hits]
    seen = {h.mxid for h in hits}
    for result in theirs:
        if result["user_id"] not in seen:
            seen.add(result["user_id"])
            merged.append({"user_id": result["user_id"], "display_name": result.get("display_name"),
                           "avatar_url": result.get("avatar_url")})
    return json({"results": merged[:limit], "limited": more or their_more or len(merged) > limit})
