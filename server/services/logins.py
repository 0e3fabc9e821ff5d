"""Logins: the password checks the homeserver asks for (its Synapse module), and client logins with
an email address or phone number rewritten to the Matrix ID, passed on to the homeserver."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import httpx

from indexer import logs
from indexer.identity import Identity
from indexer.stores import StoreUnavailable
from server.credentials import Credentials, Limited
from server.errors import MatrixError
from server.homeserver import Homeserver, forwarded_headers
from server.services.onbind import InviteWorker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Logins:
    """Password checks within the failed-login limits (Credentials), and logins through the homeserver."""

    credentials: Credentials
    homeserver: Homeserver
    invite_worker: InviteWorker

    async def check_credentials(self, login: str, password: str) -> Identity | None:
        """The identity whose password password is, named by login (a Matrix ID, localpart, email
        address or phone number); None when it is not, or when the login is over its limits. The
        invites waiting for the identity's 3PIDs are queued for delivery.

        Raises MatrixError: 503 M_UNKNOWN when the identity's store does not answer."""
        try:
            # Only the homeserver calls here: its address says nothing about who is logging in.
            identity = await self.credentials.authenticate(login, password, None, self._logged_in)
        except Limited:
            return None
        except StoreUnavailable:
            # Not "wrong password": the homeserver fails this login with an error, and the user may retry.
            raise MatrixError(503, "M_UNKNOWN", "The password could not be checked: the user directory does not "
                              "answer. Try again later.") from None
        if identity is None:
            return None
        log.info("check_credentials: %s authenticated as %s", logs.untrusted(login), identity.mxid)
        return identity

    async def _logged_in(self, identity: Identity) -> None:
        # A login proves who owns these 3PIDs: invites waiting for them go to the user's homeserver.
        await self.invite_worker.logged_in(list(identity.threepids), identity.mxid)

    async def login(self, body: dict[str, Any], client: str, path: str, headers: Any) -> httpx.Response:
        """The homeserver's answer to the login body (sent to path with the client's headers), its
        3PID identifier rewritten to the Matrix ID we know for it. A password login counts against
        the limits of its user and of client (the requester's address).

        Raises MatrixError: 429 M_LIMIT_EXCEEDED (with retry_after_ms); those of
        forwarded_headers and Homeserver.request (401, 502, 503)."""
        credentials = self.credentials
        password = body.get("type") == "m.login.password"
        user = await self._rewrite(body) if password else None
        if password:
            try:
                # The user's failures are counted by check_credentials, which the homeserver calls.
                await credentials.check_limits(user)
                await credentials.claim(None, client)
            except Limited as limited:
                raise MatrixError(429, "M_LIMIT_EXCEEDED", "Too many failed logins, try again later",
                                  retry_after_ms=limited.retry_after_ms) from None
        failed = False  # a homeserver that cannot answer says nothing against the password
        try:
            response = await self.homeserver.request("POST", path, json=body, headers=forwarded_headers(headers))
            failed = response.status_code == 403
        finally:
            if password:
                await credentials.settle(None, client, not failed)
        return response

    async def _rewrite(self, body: dict[str, Any]) -> str | None:
        """Replace a third-party identifier with the Matrix ID the cache holds for it; the name the
        login is counted under (None when the body names nobody)."""
        credentials = self.credentials
        identifier = body.get("identifier")
        if not isinstance(identifier, dict):
            # Before identifiers existed: top-level "user", or "medium" and "address".
            identifier = {"type": "m.id.thirdparty", "medium": body.get("medium"), "address": body.get("address")} \
                if "address" in body else {"type": "m.id.user", "user": body.get("user")}
        kind = identifier.get("type")
        mxid: str | None = None
        name: str | None = None
        if kind == "m.id.thirdparty" and isinstance(identifier.get("medium"), str) \
                and isinstance(identifier.get("address"), str):
            name = identifier["address"]
            mxid = await credentials.mxid_of_threepid(identifier["medium"], identifier["address"])
        elif kind == "m.id.phone" and isinstance(identifier.get("phone"), str):
            name = identifier["phone"]
            country = identifier.get("country") if isinstance(identifier.get("country"), str) else None
            mxid = await credentials.mxid_of_threepid("msisdn", identifier["phone"], country and country.upper())
        elif kind == "m.id.user" and isinstance(identifier.get("user"), str):
            name = identifier["user"]
        if mxid is not None:
            log.info("login: %s identifier rewritten to %s", logs.untrusted(kind), mxid)
            body.pop("medium", None)
            body.pop("address", None)
            body.pop("user", None)
            body["identifier"] = {"type": "m.id.user", "user": mxid}
            return mxid
        if name is None:
            return None
        identity: Identity | None = await credentials.resolve(name)
        return identity.mxid if identity is not None else name.strip().lower()
