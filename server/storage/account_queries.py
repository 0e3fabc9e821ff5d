"""v2 accounts (their tokens kept as digests) and the terms each user accepted."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from server.storage.records import now_ms, token_hash
from server.storage.schema import accepted_terms, accounts


class AccountQueries:
    """Rows of accounts and accepted_terms."""

    engine: Engine

    def add_account(self, token: str, user_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(accounts.insert().values(token_hash=token_hash(token), user_id=user_id,
                                                  created_at=now_ms()))

    def account_user(self, token: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(accounts.c.user_id)
                                .where(accounts.c.token_hash == token_hash(token))).scalar()

    def remove_account(self, token: str) -> bool:
        with self.engine.begin() as conn:
            return conn.execute(accounts.delete().where(accounts.c.token_hash == token_hash(token))).rowcount > 0

    def accept_terms(self, user_id: str, urls: list[str]) -> None:
        with self.engine.begin() as conn:
            known = set(conn.execute(sa.select(accepted_terms.c.url)
                                     .where(accepted_terms.c.user_id == user_id)).scalars())
            new = [{"user_id": user_id, "url": u, "accepted_at": now_ms()} for u in dict.fromkeys(urls)
                   if u not in known]
            if new:
                conn.execute(accepted_terms.insert(), new)

    def accepted_urls(self, user_id: str) -> set[str]:
        with self.engine.connect() as conn:
            return set(conn.execute(sa.select(accepted_terms.c.url)
                                    .where(accepted_terms.c.user_id == user_id)).scalars())
