"""3PID validation sessions and their token attempts."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from server.storage.records import Session
from server.storage.schema import sessions


class SessionQueries:
    """Rows of sessions."""

    engine: Engine

    def find_session(self, medium: str, address: str, client_secret: str) -> Session | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(sessions).where(
                sessions.c.medium == medium, sessions.c.address == address,
                sessions.c.client_secret == client_secret)).first()
        return Session(**row._mapping) if row else None

    def session(self, sid: str, client_secret: str) -> Session | None:
        """The session, or None when the sid is unknown or the secret is wrong (indistinguishable)."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(sessions).where(
                sessions.c.sid == sid, sessions.c.client_secret == client_secret)).first()
        return Session(**row._mapping) if row else None

    def create_session(self, session: Session) -> Session:
        """Insert the session; when another request created one for the same 3PID and secret first,
        that one is returned instead."""
        try:
            with self.engine.begin() as conn:
                conn.execute(sessions.insert().values(**session.__dict__))
            return session
        except sa.exc.IntegrityError:
            existing = self.find_session(session.medium, session.address, session.client_secret)
            if existing is None:
                raise
            return existing

    def update_session(self, sid: str, values: dict[str, Any]) -> None:
        with self.engine.begin() as conn:
            conn.execute(sessions.update().where(sessions.c.sid == sid).values(**values))

    def claim_token_attempt(self, sid: str, most: int) -> int | None:
        """Count one token attempt of the session when it has had fewer than most: the new count,
        else None. One conditional UPDATE, so concurrent attempts can never exceed most."""
        with self.engine.begin() as conn:
            claimed = conn.execute(sessions.update().where(sessions.c.sid == sid, sessions.c.failed_attempts < most)
                                   .values(failed_attempts=sessions.c.failed_attempts + 1)).rowcount
            if not claimed:
                return None
            return conn.execute(sa.select(sessions.c.failed_attempts).where(sessions.c.sid == sid)).scalar() or 0

    def return_token_attempt(self, sid: str) -> None:
        """Uncount an attempt that brought the right token."""
        with self.engine.begin() as conn:
            conn.execute(sessions.update().where(sessions.c.sid == sid, sessions.c.failed_attempts > 0)
                         .values(failed_attempts=sessions.c.failed_attempts - 1))

    def delete_sessions_before(self, modified_before: int) -> int:
        """Forget sessions last changed before this time (ms); how many."""
        with self.engine.begin() as conn:
            return conn.execute(sessions.delete().where(sessions.c.modified_at < modified_before)).rowcount
