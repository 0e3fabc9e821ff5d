"""/3pid/bind bindings, and the counters Redis is checked against (the bindings generation moves
with every bind and unbind, in the same transaction)."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from server.storage.records import Binding
from server.storage.schema import BINDINGS_GENERATION, bindings, counters


def _counter(conn: Connection, name: str) -> int:
    return int(conn.execute(sa.select(counters.c.value).where(counters.c.name == name)).scalar() or 0)


def _next_generation(conn: Connection) -> int:
    # The update takes the row's lock: concurrent binds get distinct generations in commit order.
    conn.execute(counters.update().where(counters.c.name == BINDINGS_GENERATION).values(value=counters.c.value + 1))
    return _counter(conn, BINDINGS_GENERATION)


class BindingQueries:
    """Rows of bindings and counters."""

    engine: Engine

    def bind(self, medium: str, address: str, mxid: str, ts: int, local: bool = False) -> tuple[Binding | None, int]:
        """Bind the 3PID to mxid (replacing any earlier binding); local: whether a store knows the
        address. The binding it replaced and the bindings generation this bind made."""
        try:
            return self._bind(medium, address, mxid, ts, local)
        except sa.exc.IntegrityError:
            # Another request bound the same new 3PID at the same moment: now there is a row to replace.
            return self._bind(medium, address, mxid, ts, local)

    def _bind(self, medium: str, address: str, mxid: str, ts: int, local: bool) -> tuple[Binding | None, int]:
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(bindings).where(
                bindings.c.medium == medium, bindings.c.address == address).with_for_update()).first()
            if row is None:
                conn.execute(bindings.insert().values(medium=medium, address=address, mxid=mxid, ts=ts,
                                                      local_address=local))
                return None, _next_generation(conn)
            conn.execute(bindings.update().where(bindings.c.medium == medium, bindings.c.address == address)
                         .values(mxid=mxid, ts=ts, local_address=local))
            return Binding(**row._mapping), _next_generation(conn)

    def unbind(self, medium: str, address: str, mxid: str) -> int | None:
        """Remove the binding of the 3PID if it is bound to mxid; the bindings generation this made,
        or None when there was no such binding."""
        with self.engine.begin() as conn:
            removed = conn.execute(bindings.delete().where(
                bindings.c.medium == medium, bindings.c.address == address, bindings.c.mxid == mxid)).rowcount
            return _next_generation(conn) if removed else None

    def binding(self, medium: str, address: str) -> Binding | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(bindings).where(
                bindings.c.medium == medium, bindings.c.address == address)).first()
        return Binding(**row._mapping) if row is not None else None

    def all_bindings(self) -> list[Binding]:
        with self.engine.connect() as conn:
            return [Binding(**row._mapping) for row in conn.execute(sa.select(bindings))]

    def counter(self, name: str) -> int:
        with self.engine.connect() as conn:
            return _counter(conn, name)

    def raise_counter(self, name: str, value: int) -> None:
        """Set the counter to value unless it is already at least that."""
        with self.engine.begin() as conn:
            conn.execute(counters.update().where(counters.c.name == name, counters.c.value < value).values(value=value))
