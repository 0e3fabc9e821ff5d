"""Terms of service: the configured policies, and which of them each user has accepted."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from indexer.settings import Config
from server.errors import MatrixError
from server.storage import Storage


@dataclass(frozen=True)
class TermsOfService:
    """The policies of `terms.policies` and the users' acceptance of them, kept in SQL."""

    config: Config
    storage: Storage

    def policies(self) -> Mapping[str, Mapping[str, Any]]:
        """The policies users must accept: id -> {"version", language -> {"name", "url"}}."""
        return self.config.terms.policies

    async def accept(self, user_id: str, urls: list[str]) -> None:
        """Record that user_id accepted the policy documents at urls.

        Raises MatrixError: 400 M_INVALID_PARAM when a URL is none of the policies' documents
        (nothing is recorded then)."""
        known = {lang["url"] for policy in self.policies().values() for lang in policy.values()
                 if isinstance(lang, dict)}
        unknown = [u for u in urls if u not in known]
        if unknown:
            raise MatrixError(400, "M_INVALID_PARAM", f"Unrecognised policy URLs: {', '.join(unknown)}")
        await self.storage.run(self.storage.accept_terms, user_id, urls)

    async def unsigned(self, user_id: str) -> list[str]:
        """The ids of the policies of which user_id has accepted no language (none without policies)."""
        policies = self.policies()
        if not policies:
            return []
        accepted = await self.storage.run(self.storage.accepted_urls, user_id)
        return [pid for pid, policy in policies.items()
                if not any(isinstance(v, dict) and v["url"] in accepted for v in policy.values())]
