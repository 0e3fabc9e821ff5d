"""Login identifiers resolved from the cache, password checks by the identity's store, and the
failed-login limits per user and per client address."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from indexer import logs, normalize
from indexer.identity import Identity
from indexer.settings import AuthRateLimitConfig, Config
from indexer.stores import Store, build_store
from server.services.lookups import Lookups

log = logging.getLogger(__name__)

_PHONE = re.compile(r"\+?[0-9][0-9 ().\-/]{4,}")


@dataclass(frozen=True)
class Limited(Exception):
    """Too many failed logins: retry after retry_after_ms."""

    retry_after_ms: int


class Credentials:
    """Resolves who is logging in and checks their password, within the configured limits."""

    def __init__(self, config: Config, lookups: Lookups) -> None:
        self.lookups = lookups
        self.domain = config.matrix.domain
        self.region = config.threepids.msisdn.default_region
        self.set_limits(config.auth.rate_limit)
        self.stores: dict[str, Store] = {s.name: build_store(s, config) for s in config.stores}
        # Password checks block (a bind, a query, an HTTP call): threads, never the event loop (but
        # for what a store awaits there, Store.authenticate_async). Each waits on its store for at
        # most that store's timeout, so these many bound how many logins a slow directory can hold
        # up at once.
        self.executor = ThreadPoolExecutor(max_workers=config.auth.threads, thread_name_prefix="auth")

    def set_limits(self, limits: AuthRateLimitConfig) -> None:
        """auth.rate_limit (again on SIGHUP)."""
        self.per_user = limits.per_user
        self.per_ip = limits.per_ip
        self.window = limits.window

    def threepid(self, login: str) -> tuple[str, str] | None:
        """(medium, canonical address) when a login identifier is an email address or a phone number."""
        try:
            if "@" in login:
                return normalize.threepid("email", login, self.region)
            if _PHONE.fullmatch(login):
                return normalize.threepid("msisdn", login, self.region)
        except normalize.InvalidAddress:
            return None
        return None

    async def mxid_of_threepid(self, medium: str, address: str, region: str | None = None) -> str | None:
        """The mxid the cache holds for a 3PID given in any usual form (a phone number written
        without its country code is read as one of region, by default threepids.msisdn.default_region)."""
        try:
            canonical = normalize.threepid(medium, address, region or self.region)
        except normalize.InvalidAddress:
            return None
        return (await self.lookups.by_address([canonical]))[0]

    async def resolve(self, login: str) -> Identity | None:
        """The identity a login identifier names: a Matrix ID or localpart of ours, an email address
        or a phone number (also wrapped as @<email or phone>:<our domain>, as Synapse qualifies
        whatever was typed as a username)."""
        return await self._identity(self._named(login))

    def _named(self, login: str) -> tuple[str, str] | str | None:
        """What a login identifier names: a (medium, canonical address), a Matrix ID, or None."""
        text = login.strip()
        if text.startswith("@"):
            inner, _, server = text[1:].rpartition(":")
            if not inner:
                inner, server = text[1:], self.domain
            if server.lower() != self.domain.lower():
                return None
            text = inner
        threepid = self.threepid(text)
        if threepid is not None:
            return threepid
        try:
            return f"@{normalize.localpart(text)}:{self.domain}"
        except normalize.InvalidAddress:
            return None

    async def _identity(self, named: tuple[str, str] | str | None) -> Identity | None:
        mxid = (await self.lookups.by_address([named]))[0] if isinstance(named, tuple) else named
        return (await self.lookups.identities([mxid]))[0] if mxid else None

    async def check_limits(self, user: str | None) -> None:
        """Raise Limited when user has used up its failed logins for now (counting nothing)."""
        if user is None:
            return
        count, ttl_ms = await self.lookups.failures("user", user)
        if count >= self.per_user:
            log.warning("login for %s refused: too many failed logins", logs.untrusted(user))
            raise Limited(max(ttl_ms, 1000))

    async def claim(self, user: str | None, ip: str | None) -> None:
        """Count one attempt against user and ip (each where given) before its outcome is known;
        Limited (counting nothing) when either has used up its failed logins for now."""
        claimed: list[tuple[str, str]] = []
        for kind, who, most in (("user", user, self.per_user), ("ip", ip, self.per_ip)):
            if who is None:
                continue
            wait_ms = await self.lookups.claim_attempt(kind, who, self.window, most)
            claimed.append((kind, who))
            if wait_ms is not None:
                log.warning("login for %s refused: too many failed logins by this %s", logs.untrusted(user), kind)
                for taken in claimed:
                    await self.lookups.return_attempt(*taken)
                raise Limited(max(wait_ms, 1000))

    async def settle(self, user: str | None, ip: str | None, success: bool) -> None:
        """After claim(): a failure stays counted; a success clears the user's count and returns the ip's."""
        if not success:
            return
        if user is not None:
            await self.lookups.clear_failures("user", user)
        if ip is not None:
            await self.lookups.return_attempt("ip", ip)

    async def authenticate(self, login: str, password: str, ip: str | None,
                           then: Callable[[Identity], Awaitable[None]] | None = None) -> Identity | None:
        """The identity when password is the password of whoever login names, else None (an
        unknown user and a wrong password look the same); raises Limited first when over a limit,
        and StoreUnavailable (not counted as a failed login) when the store could not check it.
        then, when given, is awaited with the identity of a successful check, alongside the
        clearing of its failed logins (their Redis commands leave together)."""
        named = self._named(login)
        # One count per person however they name themselves; unknown names are counted as typed.
        typed = login.strip().lower()
        if named == typed:
            # A Matrix ID written as the cache files identities: counted under it whether the cache
            # knows it or not, so the attempt is claimed while the cache is read (a round trip less).
            user = typed
            claiming = asyncio.ensure_future(self.claim(user, ip))
            try:
                identity = await self._identity(named)
            except BaseException:
                with contextlib.suppress(Limited):  # what failed the read is what is raised
                    await claiming
                    await self._give_back(user, ip)
                raise
            await claiming
        else:
            identity = await self._identity(named)
            user = identity.mxid if identity is not None else typed
            await self.claim(user, ip)
        ok = checked = False
        try:
            if identity is None:
                log.info("login for %s refused: no such user in the cache", logs.untrusted(user))
            elif not password:
                log.info("login for %s refused: empty password", identity.mxid)
            else:
                ok = await self.stores[identity.store].authenticate_async(identity, password, self._in_thread)
            checked = True
        finally:
            if not checked:  # the store could not check the password: nothing against it, the attempt is returned
                await self._give_back(user, ip)
        if ok and identity is not None and then is not None:
            await asyncio.gather(self.settle(user, ip, ok), then(identity))
        else:
            await self.settle(user, ip, ok)
        return identity if ok else None

    async def _in_thread(self, check: Callable[[], bool]) -> bool:
        return await asyncio.get_running_loop().run_in_executor(self.executor, check)

    async def _give_back(self, user: str | None, ip: str | None) -> None:
        """Return the attempts claim() counted, that said nothing against the password."""
        for kind, who in (("user", user), ("ip", ip)):
            if who is not None:
                await self.lookups.return_attempt(kind, who)

    def close(self) -> None:
        """Stop the password-check threads and close the stores' connections."""
        self.executor.shutdown(wait=True)
        for store in self.stores.values():
            store.close()
