"""v2 accounts: identity-server tokens handed out for a homeserver's OpenID token, the check of a
token on every v2 request, and logout."""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass

from indexer import logs
from indexer.normalize import InvalidAddress
from indexer.normalize import mxid as parse_mxid
from indexer.settings import Config
from server.errors import MatrixError
from server.federation import Federation, FederationError, split_server_name
from server.services.terms_of_service import TermsOfService
from server.storage import Storage
from server.token_cache import TokenCache

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Accounts:
    """Identity-server tokens, kept in SQL as digests, each checked token remembered briefly by the
    worker (TokenCache)."""

    config: Config
    storage: Storage
    federation: Federation
    terms: TermsOfService
    tokens: TokenCache

    async def register(self, matrix_server_name: str, openid_token: str) -> str:
        """A new identity-server token for the user whom the homeserver matrix_server_name says owns
        openid_token.

        Raises MatrixError: 400 M_INVALID_PARAM for a malformed server name; 403 M_UNAUTHORIZED for a
        homeserver not in accounts.homeservers or one that answers a user not its own; 401
        M_UNAUTHORIZED when it does not recognise the token; 502 M_UNKNOWN when it cannot be asked."""
        server_name = matrix_server_name.lower()
        try:
            split_server_name(server_name)
        except ValueError:
            raise MatrixError(400, "M_INVALID_PARAM", f"Not a valid server name: {server_name!r}") from None
        allowed = self.config.accounts.homeservers
        if "*" not in allowed and server_name not in allowed:
            log.info("register refused: homeserver %s is not in accounts.homeservers", server_name)
            raise MatrixError(403, "M_UNAUTHORIZED",
                              f"Users of {server_name} cannot register with this identity server")
        try:
            sub = await self.federation.openid_user(server_name, openid_token)
        except FederationError as exc:
            logs.repeated.warning(log, "register: OpenID check with %s failed: %s", server_name, exc,
                                  key=f"openid {server_name}")
            raise MatrixError(502, "M_UNKNOWN", f"Could not check the OpenID token with {server_name}") from None
        if sub is None:
            raise MatrixError(401, "M_UNAUTHORIZED", f"{server_name} does not recognise the OpenID token")
        try:
            user_id, _ = parse_mxid(sub, lowercase=False)
        except InvalidAddress:
            user_id = ""
        if not user_id or sub.partition(":")[2].lower() != server_name:
            log.warning("register refused: %s answered sub %r, not a user of its own", server_name, sub)
            raise MatrixError(403, "M_UNAUTHORIZED", f"{server_name} answered a user that is not its own")
        token = secrets.token_urlsafe(32)
        await self.storage.run(self.storage.add_account, token, sub)
        log.info("registered an identity-server token for %s", sub)
        return token

    async def authenticate(self, token: str, terms: bool = True) -> str:
        """The Matrix ID owning token. A token checked in the last TOKEN_TRUST_S seconds is answered
        from the worker's TokenCache.

        Raises MatrixError: 401 M_UNAUTHORIZED for an unknown token; (unless terms=False) 403
        M_TERMS_NOT_SIGNED until its user has accepted every policy."""
        known = self.tokens.get(token)
        if known is not None and (known[1] or not terms):
            return known[0]
        user_id = await self.storage.run(self.storage.account_user, token)
        if user_id is None:
            self.tokens.forget(token)
            raise MatrixError(401, "M_UNAUTHORIZED", "Unrecognised access token")
        missing = await self.terms.unsigned(user_id)
        self.tokens.put(token, user_id, not missing)
        if terms and missing:
            raise MatrixError(403, "M_TERMS_NOT_SIGNED", f"Accept the terms first: {', '.join(missing)}")
        return user_id

    async def logout(self, token: str) -> None:
        """Forget token (whether or not its user has accepted the terms).

        Raises MatrixError: 401 M_UNAUTHORIZED for an unknown token."""
        user_id = await self.authenticate(token, terms=False)
        await self.storage.run(self.storage.remove_account, token)
        self.tokens.forget(token)
        log.info("token of %s logged out", user_id)
