"""User directory search: the people of the fulltext index whose names match, merged with the
homeserver's own results (client-server API "User directory", answered here instead of by it)."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx

from indexer.settings import Config
from server.errors import MatrixError
from server.homeserver import Homeserver, answer_json
from server.services.directory_ranking import Hit, IndexNotReady
from server.services.directory_search import DirectorySearch
from server.services.lookups import Lookups

log = logging.getLogger(__name__)


class HomeserverRefused(Exception):
    """The homeserver refused the search: its answer goes back to the client as it is."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"the homeserver answered {response.status_code}")
        self.response = response


@dataclass(frozen=True)
class UserDirectory:
    """Searches of the Whoosh index (in the executor's one thread: Whoosh blocks) and of the homeserver."""

    config: Config
    search_index: DirectorySearch
    search_executor: ThreadPoolExecutor
    homeserver: Homeserver
    lookups: Lookups

    async def search(self, token: str, term: str, limit: int, path: str) -> tuple[list[dict[str, Any]], bool]:
        """At most limit people matching term, best first, ours before the homeserver's (whose
        avatars complete ours), and whether there were more: the answer of the homeserver's search at
        path for the client whose access token is token.

        Raises MatrixError: those of Homeserver.whoami (401 M_UNKNOWN_TOKEN, 502, 503); 503 M_UNKNOWN
        while the index is not ready. HomeserverRefused: the homeserver refused its search for
        another reason than not offering it."""
        await self.homeserver.whoami(token)
        (hits, more), (theirs, their_more) = await asyncio.gather(
            self._search(term, limit), self._homeserver_results(token, term, limit, path))
        theirs = await self._visible(theirs)
        avatars = {r["user_id"]: r.get("avatar_url") for r in theirs}
        merged = [{"user_id": h.mxid, "display_name": h.display_name, "avatar_url": avatars.get(h.mxid)}
                  for h in hits]
        seen = {h.mxid for h in hits}
        for result in theirs:
            if result["user_id"] not in seen:
                seen.add(result["user_id"])
                merged.append({"user_id": result["user_id"], "display_name": result.get("display_name"),
                               "avatar_url": result.get("avatar_url")})
        return merged[:limit], more or their_more or len(merged) > limit

    async def _search(self, term: str, limit: int) -> tuple[list[Hit], bool]:
        # Most searches find every match they need kept from earlier ones: answered at once.
        found = self.search_index.search_kept(term, limit)
        if found is not None:
            return found
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.search_executor, self.search_index.search, term, limit)
        except IndexNotReady as exc:
            log.warning("directory search: %s", exc)
            raise MatrixError(503, "M_UNKNOWN", "The directory index is not ready yet, try again shortly") from None

    async def _homeserver_results(self, token: str, term: str, limit: int,
                                  path: str) -> tuple[list[dict[str, Any]], bool]:
        """The homeserver's own results for the same search; none when it cannot search or fails."""
        if not self.config.directory.homeserver:
            return [], False
        try:
            response = await self.homeserver.request(
                "POST", path, json={"search_term": term, "limit": limit}, headers={"Authorization": f"Bearer {token}"})
        except MatrixError:
            return [], False  # logged; our own results still answer
        body = answer_json(response)
        if response.status_code != 200:
            if body.get("errcode") == "M_UNRECOGNIZED" or response.status_code >= 500:
                log.info("directory search: the homeserver answered %d; using our results only", response.status_code)
                return [], False
            raise HomeserverRefused(response)
        results = body.get("results")
        valid = [r for r in results if isinstance(r, dict) and isinstance(r.get("user_id"), str)] \
            if isinstance(results, list) else []
        return valid, body.get("limited") is True

    async def _visible(self, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The homeserver's results less the people that directory.hide leaves out."""
        hide = self.search_index.hide
        if not hide or not results:
            return results
        identities = await self.lookups.identities([r["user_id"] for r in results])
        return [r for r, i in zip(results, identities) if i is None or not hide.hides_identity(i)]
