"""Session control (sessions.policy): which 3PIDs may be validated, and which Matrix IDs they may
then be bound to. A 3PID is local when a store knows it, remote otherwise."""

from __future__ import annotations

from dataclasses import dataclass

from indexer.settings import Config, ValidationPolicyConfig
from server.errors import MatrixError
from server.read_through import ReadThrough
from server.services.lookups import Lookups

_NOUNS = {"email": ("email address", "email addresses"), "msisdn": ("phone number", "phone numbers")}


def _forbidden(why: str) -> MatrixError:
    return MatrixError(403, "M_FORBIDDEN", why)


@dataclass
class SessionPolicy:
    """The checks of sessions.policy, asked of the stores through the cache (one Redis round trip)
    and the read-through stores."""

    # Not frozen: a reload (Services.reload) replaces config, whose policy is read at each check.
    config: Config
    lookups: Lookups
    read_through: ReadThrough

    async def directory_owner(self, medium: str, address: str) -> str | None:
        """The Matrix ID a store gives the canonical 3PID (it is local), or None (it is remote)."""
        pairs = [(medium, address)]
        [owner] = await self.read_through.fill(pairs, await self.lookups.in_directory(pairs))
        return owner

    def _rules(self, medium: str) -> ValidationPolicyConfig:
        rules: ValidationPolicyConfig = getattr(self.config.sessions.policy, medium)
        return rules

    async def may_validate(self, medium: str, address: str) -> str | None:
        """The directory owner (as directory_owner) of a canonical 3PID that may be validated.

        Raises MatrixError: 403 M_FORBIDDEN when sessions.policy refuses to validate it."""
        rules = self._rules(medium)
        plural = _NOUNS[medium][1]
        if not rules.enabled:
            raise _forbidden(f"This identity server does not validate {plural}")
        owner = await self.directory_owner(medium, address)
        if owner is not None and rules.local == "deny":
            raise _forbidden(f"This identity server does not validate the {plural} of its organisation's directory")
        if owner is None and rules.remote == "deny":
            raise _forbidden(f"This identity server only validates {plural} known to its organisation's directory")
        return owner

    async def may_bind(self, medium: str, address: str, mxid: str) -> bool:
        """Whether the canonical 3PID is local, when it may be validated and bound to mxid.

        Raises MatrixError: 403 M_FORBIDDEN when sessions.policy refuses either."""
        owner = await self.may_validate(medium, address)
        rules = self._rules(medium)
        singular = _NOUNS[medium][0]
        if owner is not None:
            if rules.local == "bind_only_own" and mxid != owner:
                raise _forbidden(f"This {singular} belongs to the organisation's directory: it can only be bound "
                                 "to the Matrix ID the directory gives it")
            return True
        if rules.remote == "bind_only_own":
            domain = self.config.matrix.domain
            ours = mxid.partition(":")[2].lower() == domain.lower()
            if ours and self.config.sessions.policy.remote_bind_to == "other_domains":
                raise _forbidden(f"A {singular} unknown to the organisation's directory cannot be bound to a "
                                 f"Matrix ID of {domain}")
            if not ours and self.config.sessions.policy.remote_bind_to == "this_domain":
                raise _forbidden(f"A {singular} unknown to the organisation's directory can only be bound to a "
                                 f"Matrix ID of {domain}")
        return False
