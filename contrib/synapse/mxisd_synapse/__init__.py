"""A Synapse password auth provider backed by mxisd: directory passwords checked by mxisd's
`POST /_matrix-internal/identity/v1/check_credentials`, the account created at first login with the
directory's display name, and display name and 3PIDs kept in step at later logins.

Whatever the person typed (localpart, Matrix ID, email address, phone number in any format) is sent
to mxisd as typed, and the login lands in the Matrix ID mxisd answers, which is the person's own.

In homeserver.yaml:

    modules:
      - module: mxisd_synapse.PasswordProvider
        config:
          endpoint: http://127.0.0.1:8090
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from synapse.module_api import (
    ModuleApi,
    UserID,
    make_deferred_yieldable,
    run_in_background,
)
from synapse.module_api.errors import ConfigError
from twisted.internet import reactor as twisted_reactor

logger = logging.getLogger(__name__)
# Typed through zope interfaces, which mypy understands only with the mypy-zope plugin.
reactor: Any = twisted_reactor

CHECK_CREDENTIALS = "/_matrix-internal/identity/v1/check_credentials"
LoginResult = tuple[str, Callable[[Any], Awaitable[None]] | None] | None


@dataclass(frozen=True)
class Config:
    endpoint: str
    timeout_s: float = 10.0
    create_users: bool = True
    update_display_name: bool = True
    update_threepids: bool = True


class PasswordProvider:
    """Registers an `m.login.password` checker and a 3PID login checker that ask mxisd."""

    def __init__(self, config: Config, api: ModuleApi) -> None:
        self.config = config
        self.api = api
        self.url = config.endpoint.rstrip("/") + CHECK_CREDENTIALS
        # What is wrong with mxisd right now (None: nothing) and how many logins it has cost: a
        # fault is logged when it starts or changes, not at every login it refuses.
        self.fault: str | None = None
        self.refused = 0
        api.register_password_auth_provider_callbacks(
            auth_checkers={("m.login.password", ("password",)): self.check_password},
            check_3pid_auth=self.check_3pid,
        )

    @staticmethod
    def parse_config(config: dict[str, Any]) -> Config:
        if not isinstance(config, dict):
            raise ConfigError("mxisd_synapse: config must be a mapping with at least 'endpoint'")
        endpoint = config.get("endpoint")
        if not isinstance(endpoint, str) or not endpoint.startswith(("http://", "https://")):
            raise ConfigError("mxisd_synapse: 'endpoint' must be mxisd's internal base URL, like "
                              "http://127.0.0.1:8090")
        unknown = set(config) - {"endpoint", "timeout_s", "create_users", "update_display_name",
                                 "update_threepids"}
        if unknown:
            raise ConfigError(f"mxisd_synapse: unknown config key(s): {', '.join(sorted(unknown))}")
        timeout = config.get("timeout_s", 10.0)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ConfigError("mxisd_synapse: 'timeout_s' must be a positive number of seconds")
        flags = {}
        for key in ("create_users", "update_display_name", "update_threepids"):
            value = config.get(key, True)
            if not isinstance(value, bool):
                raise ConfigError(f"mxisd_synapse: '{key}' must be true or false")
            flags[key] = value
        return Config(endpoint=endpoint, timeout_s=float(timeout), **flags)

    async def check_password(self, username: str, login_type: str, login_dict: dict[str, Any]) -> LoginResult:
        """An `m.login.password` login with a user identifier: a localpart, a Matrix ID, or an email
        address or phone number typed as the username."""
        password = login_dict.get("password")
        if not isinstance(username, str) or not isinstance(password, str) or not password:
            return None
        return await self._login(username, password)

    async def check_3pid(self, medium: str, address: str, password: str) -> LoginResult:
        """A login with an email or phone identifier (Synapse hands phone numbers over as digits
        with the country code, without the +)."""
        if not password or medium not in ("email", "msisdn"):
            return None
        return await self._login("+" + address if medium == "msisdn" else address, password)

    async def _ask(self, user: str, password: str) -> dict[str, Any] | None:
        """mxisd's answer, or None when it cannot be had (logged: the login then fails)."""
        body = {"user": {"id": user, "password": password}}
        request = run_in_background(self.api.http_client.post_json_get_json, self.url, body)
        timer = reactor.callLater(self.config.timeout_s, request.cancel)
        try:
            answer = await make_deferred_yieldable(request)
        except Exception as exc:  # noqa: BLE001 - any failure to reach mxisd refuses the login, never a crash
            if not timer.active():
                # Cancelled by the timer (Synapse 1.163's client then raises an IndexError, not CancelledError).
                self._unavailable(f"did not answer within {self.config.timeout_s:g} s")
            else:
                self._unavailable(f"could not be asked ({type(exc).__name__}: {exc})")
            return None
        finally:
            if timer.active():
                timer.cancel()
        if not isinstance(answer, dict) or not isinstance(answer.get("auth"), dict):
            self._unavailable('answered something other than {"auth": {...}}')
            return None
        if self.fault is not None:
            logger.warning("mxisd at %s answers again; %d login(s) refused while it did not", self.url, self.refused)
            self.fault, self.refused = None, 0
        return answer["auth"]

    def _unavailable(self, fault: str) -> None:
        self.refused += 1
        if fault != self.fault:
            self.fault = fault
            logger.error("mxisd at %s %s: login refused (until it answers again, further refusals are only counted)",
                         self.url, fault)

    async def _login(self, user: str, password: str) -> LoginResult:
        auth = await self._ask(user, password)
        if auth is None or auth.get("success") is not True:
            return None
        mxid = auth.get("mxid")
        if not isinstance(mxid, str) or not self.api.is_mine(mxid):
            logger.error("mxisd accepted %r as %r, which is not a user of this homeserver: login refused", user, mxid)
            return None
        profile = auth.get("profile")
        if not isinstance(profile, dict):
            profile = {}
        name = profile.get("display_name") if isinstance(profile.get("display_name"), str) else None
        threepids = [(t["medium"], t["address"]) for t in profile.get("three_pids") or []
                     if isinstance(t, dict) and t.get("medium") in ("email", "msisdn")
                     and isinstance(t.get("address"), str)]
        try:
            account = await self.api.check_user_exists(mxid)
            if account is None:
                if not self.config.create_users:
                    logger.info("%s has no account here and create_users is off: login refused", mxid)
                    return None
                # Registration would take an address from the account holding it: only free ones.
                store = self.api._hs.get_datastores().main
                emails = [a for m, a in threepids if m == "email" and self.config.update_threepids
                          and await store.get_user_id_by_threepid(m, a) is None]
                account = await self.api.register_user(UserID.from_string(mxid).localpart, name, emails)
                logger.info("created %s at first login (as %r)", account, user)
            elif self.config.update_display_name and name:
                await self._update_display_name(account, name)
            if self.config.update_threepids:
                await self._add_threepids(account, threepids)
        except Exception as exc:  # noqa: BLE001 - a failed registration or update refuses the login, cleanly
            logger.error("login of %s refused: could not create or update the account (%s: %s)",
                         mxid, type(exc).__name__, exc)
            return None
        return account, None

    async def _update_display_name(self, account: str, name: str) -> None:
        user = UserID.from_string(account)
        current = await self.api.get_profile_for_user(user.localpart)
        if current.display_name != name:
            await self.api.set_displayname(user, name)
            logger.info("display name of %s set from the directory", account)

    async def _add_threepids(self, account: str, threepids: list[tuple[str, str]]) -> None:
        """Add the directory's 3PIDs the account lacks; a 3PID another account holds is left with that
        account. The module API can neither add 3PIDs nor say who holds one, so this (and the check
        before registering) goes through Synapse's own store and auth handler."""
        have = {(t["medium"], t["address"]) for t in await self.api.get_threepids_for_user(account)}
        missing = [t for t in threepids if t not in have]
        if not missing:
            return
        store, auth_handler = self.api._hs.get_datastores().main, self.api._hs.get_auth_handler()
        for medium, address in missing:
            owner = await store.get_user_id_by_threepid(medium, address)
            if owner is not None:
                logger.warning("%s %s not added to %s: account %s has it", medium, address, account, owner)
                continue
            await auth_handler.add_threepid(account, medium, address, self.api.get_current_time_msec())
            logger.info("%s %s added to %s from the directory", medium, address, account)
