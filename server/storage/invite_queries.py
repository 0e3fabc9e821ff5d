"""Stored 3PID invites and the onbind delivery queue of their invites."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from server.storage.records import Delivery, Invite
from server.storage.schema import invites, onbind_deliveries


class InviteQueries:
    """Rows of invites and onbind_deliveries."""

    engine: Engine

    def add_invite(self, invite: Invite) -> None:
        with self.engine.begin() as conn:
            conn.execute(invites.insert().values(**invite.__dict__))

    def delete_invite(self, token: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(invites.delete().where(invites.c.token == token))

    def invite(self, token: str) -> Invite | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(invites).where(invites.c.token == token)).first()
        return Invite(**row._mapping) if row else None

    def invite_by_link_code(self, code: str) -> Invite | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(invites).where(invites.c.link_code == code)).first()
        return Invite(**row._mapping) if row else None

    def ephemeral_key_known(self, public_key: str) -> bool:
        """Whether a stored invite (delivered or not, until it expires) was given this ephemeral key."""
        with self.engine.connect() as conn:
            return conn.execute(sa.select(invites.c.token)
                                .where(invites.c.ephemeral_public_key == public_key).limit(1)).first() is not None

    def unsettled_threepids(self) -> list[tuple[str, str, bool]]:
        """(medium, address, whether a delivery of them is queued) of every invite not settled yet."""
        queued = sa.select(onbind_deliveries.c.id).where(onbind_deliveries.c.medium == invites.c.medium,
                                                         onbind_deliveries.c.address == invites.c.address)
        with self.engine.connect() as conn:
            return [(r.medium, r.address, bool(r.queued)) for r in conn.execute(
                sa.select(invites.c.medium, invites.c.address, queued.exists().label("queued")).distinct()
                .where(invites.c.settled_at.is_(None)))]

    def has_pending_invite(self, medium: str, address: str, created_after: int) -> bool:
        """Whether an invite for (medium, canonical address) stored after created_after (ms) is not
        settled yet."""
        with self.engine.connect() as conn:
            return conn.execute(sa.select(invites.c.token).where(
                invites.c.medium == medium, invites.c.address == address, invites.c.settled_at.is_(None),
                invites.c.created_at > created_after).limit(1)).first() is not None

    def unsettled_invites(self, medium: str, address: str) -> list[Invite]:
        with self.engine.connect() as conn:
            return [Invite(**r._mapping) for r in conn.execute(sa.select(invites).where(
                invites.c.medium == medium, invites.c.address == address, invites.c.settled_at.is_(None))
                .order_by(invites.c.created_at))]

    def delete_invites_before(self, created_before: int) -> int:
        """Forget invites stored before this time (ms), and deliveries left without invites; how many invites."""
        with self.engine.begin() as conn:
            count = conn.execute(invites.delete().where(invites.c.created_at < created_before)).rowcount
            if count:
                pending = sa.select(invites.c.token).where(
                    invites.c.medium == onbind_deliveries.c.medium, invites.c.address == onbind_deliveries.c.address,
                    invites.c.settled_at.is_(None))
                conn.execute(onbind_deliveries.delete().where(~pending.exists()))
            return count

    def queue_deliveries(self, threepids: list[tuple[str, str]], mxid: str, now: int,
                         delay_ms: int = 0) -> list[tuple[str, str]]:
        """Queue a delivery to mxid, due delay_ms after now, of the invites of each (medium, address)
        that has unsettled invites (a queued one for the 3PID is pointed at mxid); the 3PIDs queued.
        One query when none has invites, as on nearly every login."""
        if not threepids:
            return []
        with self.engine.connect() as conn:
            pending = [(m, a) for m, a in conn.execute(
                sa.select(invites.c.medium, invites.c.address).distinct().where(
                    sa.tuple_(invites.c.medium, invites.c.address).in_(threepids), invites.c.settled_at.is_(None)))]
        for medium, address in pending:
            with self.engine.begin() as conn:
                changed = conn.execute(onbind_deliveries.update().where(
                    onbind_deliveries.c.medium == medium, onbind_deliveries.c.address == address,
                    onbind_deliveries.c.mxid != mxid)
                    .values(mxid=mxid, attempts=0, next_at=now + delay_ms)).rowcount
            if changed:
                continue
            try:
                with self.engine.begin() as conn:
                    conn.execute(onbind_deliveries.insert().values(
                        medium=medium, address=address, mxid=mxid, attempts=0, next_at=now + delay_ms,
                        created_at=now))
            except sa.exc.IntegrityError:
                pass  # already queued (by another worker, or earlier)
        return pending

    def claim_due_deliveries(self, now: int, lease_until: int) -> list[Delivery]:
        """Deliveries due by now, each taken for this caller until lease_until (so that another
        worker does not send the same one meanwhile)."""
        with self.engine.connect() as conn:
            due = [Delivery(**r._mapping) for r in conn.execute(
                sa.select(onbind_deliveries).where(onbind_deliveries.c.next_at <= now))]
        claimed = []
        with self.engine.begin() as conn:
            for delivery in due:
                if conn.execute(onbind_deliveries.update().where(
                        onbind_deliveries.c.id == delivery.id, onbind_deliveries.c.next_at == delivery.next_at)
                        .values(next_at=lease_until)).rowcount:
                    claimed.append(delivery)
        return claimed

    def next_delivery_at(self) -> int | None:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.min(onbind_deliveries.c.next_at))).scalar()

    def finish_delivery(self, delivery_id: int, tokens: list[str], ts: int) -> None:
        """The delivery is over (accepted or refused for good): its invites are settled."""
        with self.engine.begin() as conn:
            conn.execute(invites.update().where(invites.c.token.in_(tokens)).values(settled_at=ts))
            conn.execute(onbind_deliveries.delete().where(onbind_deliveries.c.id == delivery_id))

    def retry_delivery(self, delivery_id: int, attempts: int, next_at: int, error: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(onbind_deliveries.update().where(onbind_deliveries.c.id == delivery_id)
                         .values(attempts=attempts, next_at=next_at, last_error=error[:2000]))
