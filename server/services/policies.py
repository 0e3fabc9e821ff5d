"""The organisation's policies on two homeserver requests the reverse proxy sends here first:
registration with an email address or phone number (`registration.policy`, before the homeserver's
register requestToken) and who may invite by 3PID (`invites.policy`, before its room invite). A
request the policy lets through is passed on to the homeserver, whose answer goes back unchanged."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import httpx

from indexer import logs
from indexer.normalize import InvalidAddress, email, email_domain, msisdn
from indexer.settings import AllowDenyConfig, Config
from server.errors import MatrixError
from server.homeserver import Homeserver, forwarded_headers
from server.services.lookups import Lookups
from server.storage import Storage, now_ms

log = logging.getLogger(__name__)

NAMES = {"email": "email address", "msisdn": "phone number"}
# Keys that make a room invite a 3PID invite. Synapse needs both medium and address, but either
# one is enough to need the role: a homeserver that read the body otherwise must not let one by.
THREEPID_INVITE_KEYS = ("medium", "address")


@dataclass(frozen=True)
class DomainRule:
    """One entry of a domain list: "example.org" (exact), ".example.org" (its subdomains) or
    "*example.org" (both), its domain in canonical form."""

    domain: str
    exact: bool
    subdomains: bool

    @classmethod
    def parse(cls, entry: str) -> DomainRule:
        if entry.startswith("*"):
            return cls(email_domain(entry[1:]), True, True)
        if entry.startswith("."):
            return cls(email_domain(entry[1:]), False, True)
        return cls(email_domain(entry), True, False)

    def matches(self, domain: str) -> bool:
        return (self.exact and domain == self.domain) or (self.subdomains and domain.endswith("." + self.domain))


@dataclass(frozen=True)
class MediumRules:
    """The compiled allow and deny lists of one medium."""

    allow_domains: tuple[DomainRule, ...]
    deny_domains: tuple[DomainRule, ...]
    allow_patterns: tuple[re.Pattern[str], ...]
    deny_patterns: tuple[re.Pattern[str], ...]

    @classmethod
    def build(cls, patterns: AllowDenyConfig, domains: AllowDenyConfig | None = None) -> MediumRules:
        def compiled(values: tuple[str, ...]) -> tuple[re.Pattern[str], ...]:
            return tuple(re.compile(p, re.IGNORECASE) for p in values)

        return cls(tuple(DomainRule.parse(d) for d in domains.allow) if domains else (),
                   tuple(DomainRule.parse(d) for d in domains.deny) if domains else (),
                   compiled(patterns.allow), compiled(patterns.deny))

    @property
    def has_allow_lists(self) -> bool:
        return bool(self.allow_domains or self.allow_patterns)


class RegistrationPolicy:
    """registration.policy: who may ask the homeserver for a registration token by email or SMS."""

    def __init__(self, config: Config, storage: Storage, homeserver: Homeserver) -> None:
        policy = config.registration.policy
        self.allowed = policy.allowed
        self.invite_only = policy.invite_only
        self.rules = {"email": MediumRules.build(policy.email.patterns, policy.email.domains),
                      "msisdn": MediumRules.build(policy.msisdn.patterns)}
        self.expire_ms = config.invites.expire_after * 1000
        self.storage = storage
        self.homeserver = homeserver

    async def refusal(self, medium: str, address: str) -> str | None:
        """Why the canonical address of medium ("email" or "msisdn") may not register (a message
        naming the kind of rule that refuses it), or None when it may. The order: allowed, the deny
        lists, the allow lists, invite_only, and last whether the medium has allow lists at all."""
        name = NAMES[medium]
        if not self.allowed:
            return f"Registration with {'an' if medium == 'email' else 'a'} {name} is not allowed on this server"
        rules = self.rules[medium]
        domain = address.rpartition("@")[2] if medium == "email" else ""
        if any(rule.matches(domain) for rule in rules.deny_domains):
            return f"Registration refused: the domain of this {name} is on the server's deny list"
        if any(pattern.fullmatch(address) for pattern in rules.deny_patterns):
            return f"Registration refused: this {name} matches a pattern on the server's deny list"
        if any(rule.matches(domain) for rule in rules.allow_domains) \
                or any(pattern.fullmatch(address) for pattern in rules.allow_patterns):
            return None
        if self.invite_only:
            if await self.storage.run(self.storage.has_pending_invite, medium, address, now_ms() - self.expire_ms):
                return None
            return f"Registration is by invitation only, and there is no pending invite for this {name}"
        if rules.has_allow_lists:
            return f"Registration refused: this {name} is not on the server's allow lists"
        return None

    async def request_token(self, medium: str, body: dict[str, Any], raw: bytes, path: str, headers: Any,
                            client: str) -> httpx.Response:
        """The homeserver's answer to the register requestToken body (raw, sent as it came to path
        with the client's headers and its address client) of medium, when the policy lets its
        address register.

        Raises MatrixError: 400 M_INVALID_PARAM for an address that is not one; 403
        M_THREEPID_DENIED when the policy refuses it; those of forwarded_headers and
        Homeserver.request (401, 502, 503)."""
        try:
            address = email(body["email"]) if medium == "email" else \
                msisdn(body["phone_number"], body["country"].upper())
        except InvalidAddress:
            raise MatrixError(400, "M_INVALID_PARAM", f"Not a valid {NAMES[medium]}") from None
        refused = await self.refusal(medium, address)
        if refused is not None:
            log.info("registration refused for %s %s: %s", medium, logs.untrusted(address), refused)
            raise MatrixError(403, "M_THREEPID_DENIED", refused)
        return await self.homeserver.request("POST", path, content=raw, headers=_headers(headers, client))


def _headers(headers: Any, client: str) -> dict[str, str]:
    # The homeserver limits requestToken and invites per client address (Synapse's rc_3pid_validation,
    # rc_invites), which would otherwise be ours for every client.
    return {**forwarded_headers(headers), "x-forwarded-for": client}


class InvitePolicy:
    """invites.policy: who may invite to a room by email address or phone number."""

    def __init__(self, config: Config, homeserver: Homeserver, lookups: Lookups) -> None:
        self.roles = frozenset(config.invites.policy.senders.roles)
        self.homeserver = homeserver
        self.lookups = lookups

    async def check_sender(self, token: str | None) -> None:
        """Return when the sender whose access token is token has a role that lets it send 3PID invites.

        Raises MatrixError: 401 M_MISSING_TOKEN without a token; those of Homeserver.whoami (401
        M_UNKNOWN_TOKEN, 502, 503); 403 M_FORBIDDEN when the sender has none of the roles."""
        if token is None:
            raise MatrixError(401, "M_MISSING_TOKEN", "Missing access token")
        sender = await self.homeserver.whoami(token)
        # Roles of every store that has the sender, as the internal profile answers them: an
        # organisation may keep people in one store and their roles in another.
        identities = await self.lookups.identity_everywhere(sender)
        if not any(self.roles.intersection(identity.roles) for identity in identities):
            log.info("3PID invite refused: %s has none of the roles invites.policy.senders.roles names", sender)
            raise MatrixError(403, "M_FORBIDDEN", "You may not invite people by email address or phone number on "
                              "this server: only members of certain groups may. Invite them by Matrix ID, "
                              "or ask an administrator.")

    async def invite(self, body: dict[str, Any], raw: bytes, token: str | None, path: str, query: str,
                     headers: Any, client: str) -> httpx.Response:
        """The homeserver's answer to the room invite body (raw, sent as it came to path?query with
        the client's headers and its address client) whose client's access token is token:
        invites by Matrix ID always, 3PID invites only from senders with one of
        invites.policy.senders.roles (any sender when it names none).

        Raises MatrixError: those of check_sender (401, 403, 502, 503), forwarded_headers
        and Homeserver.request (401, 502, 503)."""
        threepid = any(key in body for key in THREEPID_INVITE_KEYS)
        return await self._pass_on(threepid, raw, token, path, query, headers, client)

    async def create_room(self, body: dict[str, Any], raw: bytes, token: str | None, path: str, query: str,
                          headers: Any, client: str) -> httpx.Response:
        """The homeserver's answer to the createRoom body (as for invite), whose invite_3pid list,
        the other way to send 3PID invites, is held to the same roles.

        Raises MatrixError: as invite."""
        return await self._pass_on(bool(body.get("invite_3pid")), raw, token, path, query, headers, client)

    async def _pass_on(self, threepid: bool, raw: bytes, token: str | None, path: str, query: str,
                       headers: Any, client: str) -> httpx.Response:
        if threepid and self.roles:
            await self.check_sender(token)
        target = f"{path}?{query}" if query else path
        return await self.homeserver.request("POST", target, content=raw, headers=_headers(headers, client))
