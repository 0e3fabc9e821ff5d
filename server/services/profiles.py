"""Profiles: the homeserver's, with the person's 3PIDs from the cache added (client-server API
"Profiles", profile.threepids), and the internal profile of an identity."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from indexer.settings import Config
from server.errors import MatrixError
from server.homeserver import Homeserver, answer_json
from server.services.lookups import Lookups


@dataclass(frozen=True)
class Profiles:
    """Profiles from the homeserver and the cache."""

    config: Config
    homeserver: Homeserver
    lookups: Lookups

    async def profile(self, version: str, user_id: str, headers: dict[str, str],
                      token: str | None) -> tuple[httpx.Response, dict[str, Any] | None]:
        """(the homeserver's answer to GET /_matrix/client/{version}/profile/{user_id} sent with
        headers, its body with the 3PIDs we know added, or None when the answer goes back as it is):
        the 3PIDs only for a client whose access token the homeserver confirms.

        Raises MatrixError: those of Homeserver.request (502, 503)."""
        response = await self.homeserver.request(
            "GET", f"/_matrix/client/{version}/profile/{quote(user_id, safe='')}", headers=headers)
        body = answer_json(response)
        if response.status_code != 200 or not body or not self.config.profile.threepids:
            return response, None
        if not await self._signed_in(token):
            return response, None  # a homeserver may show profiles to anyone; the 3PIDs only its users see
        identity = (await self.lookups.identities([user_id]))[0]
        if identity is not None:
            body["threepids"] = identity.threepid_objects()
        return response, body

    async def _signed_in(self, token: str | None) -> bool:
        """Whether token is an access token the homeserver confirms (whoami, cached briefly)."""
        if token is None:
            return False
        try:
            await self.homeserver.whoami(token)
        except MatrixError:  # refused, or the homeserver cannot tell now (logged): no 3PIDs either way
            return False
        return True

    async def internal(self, user_id: str) -> dict[str, Any]:
        """{"user_id", "display_name", "threepids", "roles"} of user_id from the cache: the name and
        3PIDs of the first store in config order that has the user (as lookups answer), the roles
        of every store that has them (an organisation may keep people in one store and roles in
        another, as mxisd gathered roles from every store).

        Raises MatrixError: 404 M_NOT_FOUND when the cache has none."""
        identities = await self.lookups.identity_everywhere(user_id)
        if not identities:
            raise MatrixError(404, "M_NOT_FOUND", "No such user in the directory")
        first = identities[0]
        roles = sorted({role for identity in identities for role in identity.roles})
        return {"user_id": first.mxid, "display_name": first.display_name,
                "threepids": first.threepid_objects(), "roles": roles}
