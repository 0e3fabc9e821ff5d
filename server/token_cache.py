"""A short-lived in-process memory of the identity-server tokens a worker has recently checked."""

from __future__ import annotations

import time
from collections import OrderedDict

# How long a worker trusts a token it has checked without asking the database again. A token
# logged out through another worker is refused by this one at the latest this long after.
TOKEN_TRUST_S = 2.0
TOKENS_KEPT = 10_000


class TokenCache:
    """token -> (user_id, whether every policy was accepted), each trusted for TOKEN_TRUST_S."""

    def __init__(self, trust_s: float = TOKEN_TRUST_S, kept: int = TOKENS_KEPT) -> None:
        self.trust_s = trust_s
        self.kept = kept
        self._entries: OrderedDict[str, tuple[float, str, bool]] = OrderedDict()

    def get(self, token: str) -> tuple[str, bool] | None:
        """(user_id, terms accepted) while the token's last check is fresh, else None."""
        entry = self._entries.get(token)
        if entry is None:
            return None
        checked, user_id, terms_ok = entry
        if time.monotonic() - checked >= self.trust_s:
            del self._entries[token]
            return None
        return user_id, terms_ok

    def put(self, token: str, user_id: str, terms_ok: bool) -> None:
        self._entries[token] = (time.monotonic(), user_id, terms_ok)
        self._entries.move_to_end(token)
        if len(self._entries) > self.kept:
            self._entries.popitem(last=False)

    def forget(self, token: str) -> None:
        self._entries.pop(token, None)
