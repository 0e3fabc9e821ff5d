"""The writing half of a large full sync, in a process of its own.

A full sync's process reads and normalises the store's entries (ldap3's decoding, phonenumbers) and
writes them into Redis (the claims, the lookup keys, redis-py's encoding): on two cores, each half
was about half of its CPU. Once a sync has read HANDOVER_AFTER entries, it starts a SyncWriter and,
as soon as that process is ready, sends it every further batch, in order, while it reads on: the
batches written before, and every write of a small store's sync, stay in the sync's own process.
A spawned process takes about a second to start (its imports), which a small sync does not wait for.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import signal
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, NoReturn

import orjson
import redis

from indexer import logs
from indexer.cache import Cache, CacheAddress
from indexer.identity import Identity

log = logging.getLogger(__name__)

# Entries a full sync reads in its own process before it starts a writer process: a store this
# small is synced before the process would be ready.
HANDOVER_AFTER = 2000
# Batches sent to the writer and not yet written, at most: the sync's memory, and how soon it sees
# that the writer failed.
IN_FLIGHT = 4
STOP_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Batch:
    """One batch of a full sync: identities unchanged since the last sync (their generation and
    locator are written), and new or changed ones, with the store ids of those whose records the
    cache holds (read back, to be replaced)."""

    unchanged: list[Identity]
    changed: list[Identity]
    replaced: list[str]

    def encode(self) -> bytes:
        """The batch as sent to the writer process (as JSON: pickling the identities cost the
        sync's process four times as much)."""
        return orjson.dumps([[_fields(i) for i in self.unchanged], [_fields(i) for i in self.changed], self.replaced])

    @classmethod
    def decode(cls, data: bytes, store: str) -> Batch:
        """The batch that encode() gave data for, of store's identities."""
        unchanged, changed, replaced = orjson.loads(data)
        return cls([_identity(f, store) for f in unchanged], [_identity(f, store) for f in changed], replaced)


def _fields(i: Identity) -> tuple[object, ...]:
    return i.store_id, i.mxid, i.localpart, i.display_name, i.threepids, i.hash, i.locator, i.roles


def _identity(fields: list[Any], store: str) -> Identity:
    store_id, mxid, localpart, display_name, threepids, digest, locator, roles = fields
    return Identity(mxid, localpart, display_name, tuple(map(tuple, threepids)), store, store_id, digest, locator,
                    tuple(roles))


def write_batch(cache: Cache, store: str, generation: int, batch: Batch) -> int:
    """Write one batch of store's full sync of generation; the number of identities written."""
    if batch.unchanged:
        cache.mark_unchanged(store, batch.unchanged, generation)
    if batch.changed:
        old = dict(zip(batch.replaced, cache.get(store, batch.replaced))) if batch.replaced else {}
        cache.apply(store, [(i, old.get(i.store_id)) for i in batch.changed], [], generation)
    return len(batch.changed)


class WriterFailed(Exception):
    """The writer process could not write a batch, or stopped answering."""


def _serve(conn: Connection, address: CacheAddress, store: str, generation: int, log_settings: tuple[str, str]) -> None:
    """The writer process: write each batch received, in order, answering ("done", n) for each, until
    the pipe closes; after a failure, ("failed", kind, message) and nothing more."""
    level, fmt = log_settings
    logs.setup(level, "sync-writer", fmt)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the sync decides when this process stops
    cache = address.open()
    # Batches are taken off the pipe as soon as they come (the sync sends at most IN_FLIGHT ahead):
    # a sync sending the next batch while this one was written waited for the pipe to drain.
    batches: queue.Queue[Batch | None] = queue.Queue()
    threading.Thread(target=_receive, args=(conn, batches, store), name="receive", daemon=True).start()
    conn.send(("ready",))
    while (batch := batches.get()) is not None:
        try:
            conn.send(("done", write_batch(cache, store, generation, batch)))
        except redis.exceptions.RedisError as exc:
            conn.send(("failed", "redis", str(exc)))
            return
        except Exception as exc:  # reported to the sync, which fails and logs it
            conn.send(("failed", type(exc).__name__, str(exc)))
            return


def _receive(conn: Connection, batches: queue.Queue[Batch | None], store: str) -> None:
    try:
        while True:
            batches.put(Batch.decode(conn.recv_bytes(), store))
    except (EOFError, OSError, ValueError):  # the sync is done, or gone (or sent what no sync sends)
        batches.put(None)


class SyncWriter:
    """A process writing one store's full-sync batches into the cache at address, started at once;
    ready once it can take them. Not thread-safe: the sync's thread alone uses it."""

    def __init__(self, address: CacheAddress, store: str, generation: int) -> None:
        # Spawned, not forked: the indexer's process has threads and open connections.
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process: BaseProcess = context.Process(
            target=_serve, args=(child, address, store, generation, logs.settings()), name=f"sync-writer-{store}",
            daemon=True)
        self._process.start()
        child.close()
        # A batch is a few Redis commands, each bounded by the cache's timeout: a writer silent for
        # much longer than that is hung.
        self._stall_s = max(30.0, 10 * address.timeout)
        self._ready = False
        self._in_flight = 0

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def ready(self) -> bool:
        """Whether the process has started and takes batches (once true, it stays true)."""
        if not self._ready and self._process.is_alive() and self._conn.poll(0):
            try:
                self._ready = self._conn.recv() == ("ready",)
            except (EOFError, OSError):  # it died as it started: the sync writes on by itself
                pass
        return self._ready

    def write(self, batch: Batch) -> int:
        """Send batch to be written after those sent before; the number of identities written
        meanwhile (waits only while IN_FLIGHT batches are unwritten). Raises WriterFailed."""
        try:
            self._conn.send_bytes(batch.encode())
        except OSError as exc:  # its end of the pipe is closed: it is gone, or going
            self._process.join(STOP_TIMEOUT_S)
            while self._in_flight and self._conn.poll(0):
                self._answer()  # raises the failure it answered before it went, if it did
            self._died(f"could not be sent a batch ({exc})")
        self._in_flight += 1
        written = 0
        while self._in_flight > IN_FLIGHT or (self._in_flight and self._conn.poll(0)):
            written += self._answer()
        return written

    def finish(self) -> int:
        """Wait until every batch sent is written; the number of identities written meanwhile.
        Raises WriterFailed."""
        written = 0
        while self._in_flight:
            written += self._answer()
        return written

    def _answer(self) -> int:
        waited = 0.0
        while not self._conn.poll(1.0):
            waited += 1.0
            if not self._process.is_alive():
                self._died("")
            if waited >= self._stall_s:
                self._died(f"wrote nothing for {waited:.0f} s")
        try:
            answer = self._conn.recv()
        except (EOFError, OSError):  # closed, or reset by a killed process
            self._process.join(STOP_TIMEOUT_S)
            self._died("closed its pipe")
        if answer[0] == "failed":
            kind, message = answer[1], answer[2]
            if kind == "redis":
                raise redis.exceptions.RedisError(message)
            raise WriterFailed(f"the sync's writer process failed: {kind}: {message}")
        self._in_flight -= 1
        return int(answer[1])

    def _died(self, how: str) -> NoReturn:
        """Raise WriterFailed saying how the process ended, if it has, else how."""
        if self._process.exitcode is not None:
            how = logs.describe_exit(self._process.exitcode)
        raise WriterFailed(f"the sync's writer process (pid {self._process.pid}) {how}")

    def close(self) -> None:
        """Stop the process (at once, if batches are still being written) and wait for it, bounded."""
        self._conn.close()
        if self._in_flight or not self._ready:  # batches left unwritten, or still starting
            self._process.terminate()
        self._process.join(STOP_TIMEOUT_S)
        if self._process.is_alive():
            log.warning("the sync's writer process (pid %s) did not stop within %.0f s; killing it",
                        self._process.pid, STOP_TIMEOUT_S)
            self._process.kill()
            self._process.join(STOP_TIMEOUT_S)
        if not self._ready and self._process.exitcode not in (0, -15, None):
            log.warning("the sync's writer process %s before it was ready; the sync wrote in its own process",
                        logs.describe_exit(self._process.exitcode or 0))
        self._process.close()
