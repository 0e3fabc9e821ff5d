"""The `ldap` store's connections to its directory: connecting to the first URI that answers, within
the store's timeouts; the sync's connection bound as the service account; paged searches read one
page ahead; and the pool of connections that password checks bind on."""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any, Literal, cast

import ldap3
from ldap3.core.exceptions import LDAPException
from ldap3.operation.bind import bind_operation

from indexer.settings import LdapStoreConfig
from indexer.stores import StoreError, StoreUnavailable
from indexer.stores.ldap_decode import lean

log = logging.getLogger(__name__)

PAGED_RESULTS = "1.2.840.113556.1.4.319"  # RFC 2696
INVALID_CREDENTIALS = 49
NO_SUCH_OBJECT = 32
Scope = Literal["BASE", "LEVEL", "SUBTREE"]
SIZE_LIMIT_EXCEEDED = 4
ADMIN_LIMIT_EXCEEDED = 11
SIZE_LIMIT_HINT = (" (the directory limits how many entries the service account may read, paged"
                   " searches included: on OpenLDAP give it limits dn.exact=\"<bind dn>\" size=unlimited)")

class Prefetch:
    """Runs a generator one item ahead in a thread of its own; its exceptions reach the reader."""

    _DONE = object()

    def __init__(self, source: Iterator[Any]) -> None:
        self._source = source
        self._items: queue.Queue[Any] = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ldap-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._source:
                if not self._put(item):
                    return
        except BaseException as exc:  # handed to the reader, who raises it
            self._put(exc)
            return
        self._put(self._DONE)

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self._items.get()
            if item is self._DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self, timeout: float) -> bool:
        """Stop reading ahead; whether the thread has finished within timeout seconds."""
        self._stop.set()
        self._thread.join(timeout)
        return not self._thread.is_alive()


class Directory:
    """The connections of one `ldap` store (ldap3's, each bounded by the store's timeouts)."""

    def __init__(self, name: str, settings: LdapStoreConfig) -> None:
        self.name = name
        self.uris = list(settings.uri)
        self.page_size = settings.page_size
        self.start_tls = settings.start_tls
        self.tls = ldap3.Tls(
            validate=ssl.CERT_REQUIRED if settings.tls.verify else ssl.CERT_NONE,
            ca_certs_file=settings.tls.ca_file,
        )
        # timeout bounds connecting (every URI in turn), binding and searching together: a password
        # check as a whole, a sync's connection, and each page a sync reads.
        self.timeout = settings.timeout
        self.connect_timeout = min(settings.connect_timeout, self.timeout)
        self.bind_dn = settings.bind.dn if settings.bind else None
        self.bind_password = settings.bind.password if settings.bind else None
        self._conn: ldap3.Connection | None = None
        self._auth_pool: queue.LifoQueue[ldap3.Connection] = queue.LifoQueue()
        self._auth_pool_size = settings.auth_pool_size

    def deadline(self) -> float:
        """When an operation begun now must be done by (time.monotonic())."""
        return time.monotonic() + self.timeout

    @staticmethod
    def wait_at_most(conn: ldap3.Connection, deadline: float) -> None:
        """Let the connection's next answers take no longer than until deadline."""
        conn.socket.settimeout(max(deadline - time.monotonic(), 0.001))

    def connect(self, dn: str | None, password: str | None, deadline: float) -> ldap3.Connection:
        """An open connection (TLS started when configured) to the first URI that accepts one, that
        binds as dn, or anonymously. Each URI may take connect_timeout, all of them together no
        longer than until deadline. (ldap3's ServerPool is not used: when no server answers, it
        waits 10 s more before giving up, whatever the timeouts say.)"""
        failures = []
        for uri in self.uris:
            left = deadline - time.monotonic()
            if left <= 0:
                failures.append(f"{uri}: not tried, the {self.timeout} s timeout was up")
                continue
            server = ldap3.Server(uri, connect_timeout=min(self.connect_timeout, left), tls=self.tls,
                                  get_info=ldap3.NONE)
            # The TLS handshake of ldaps:// may take what is left (ldap3 wants whole seconds here).
            # Attributes an entry lacks are absent, not empty lists: they are read with get().
            conn = lean(ldap3.Connection(server, user=dn, password=password,
                                         authentication=ldap3.SIMPLE if dn else ldap3.ANONYMOUS,
                                         read_only=True, raise_exceptions=False, auto_referrals=False,
                                         receive_timeout=math.ceil(left), return_empty_attributes=False))
            try:
                conn.open()
                self.wait_at_most(conn, deadline)
                if self.start_tls and not server.ssl and not conn.start_tls():
                    conn.unbind()
                    raise StoreError(f"STARTTLS refused by {server.host}: {conn.result.get('description')}")
                return conn
            except LDAPException as exc:
                failures.append(f"{uri}: {exc}")
                try:
                    conn.unbind()  # a socket opened before STARTTLS failed
                except LDAPException:
                    pass
        raise StoreUnavailable(f"cannot reach the directory: {'; '.join(failures)}")

    def service(self) -> ldap3.Connection:
        """The sync's connection, bound as the service account (reopened after a failure)."""
        if self._conn is not None and not self._conn.closed and self._conn.bound:
            return self._conn
        self._conn = self.bind_service(self.deadline())
        # Each page of a sync's searches may take the whole timeout.
        self._conn.socket.settimeout(self.timeout)
        return self._conn

    def bind_service(self, deadline: float) -> ldap3.Connection:
        """A new connection bound as the service account (or anonymous, without one)."""
        conn = self.connect(self.bind_dn, self.bind_password, deadline)
        try:
            if not conn.bind():
                who = self.bind_dn or "anonymous"
                reason = conn.result.get("description") or conn.last_error
                conn.unbind()
                raise StoreError(f"bind as {who} refused: {reason}")
        except LDAPException as exc:
            raise StoreUnavailable(
                f"cannot reach the directory: {', '.join(self.uris)}: no answer to a bind: {exc}") from None
        return conn

    def reachable(self) -> str:
        """The first URI that accepts a connection (TLS started where configured), without binding;
        StoreUnavailable when none does."""
        conn = self.connect(None, None, self.deadline())
        try:
            return str(conn.server.name)
        finally:
            conn.unbind()

    def missing_entries(self, dns: list[str]) -> list[str]:
        """The DNs among dns that the service account does not find (absent, or hidden from it);
        binding as the service account first, so StoreError when that bind is refused."""
        conn = self.service()
        missing = []
        for dn in dns:
            try:
                conn.search(dn, "(objectClass=*)", ldap3.BASE, attributes=["1.1"])
            except LDAPException as exc:
                self.drop_service()
                raise StoreUnavailable(f"directory {', '.join(self.uris)} failed to answer a search: {exc}") from None
            if conn.result.get("result") != 0:
                missing.append(dn)
        return missing

    def drop_service(self) -> None:
        """Close the sync's connection: the next search opens a new one."""
        if self._conn is not None:
            try:
                self._conn.unbind()
            except LDAPException:
                pass
        self._conn = None

    def close(self) -> None:
        """Close every connection, the pooled ones of password checks too."""
        self.drop_service()
        while True:
            try:
                self._auth_pool.get_nowait().unbind()
            except queue.Empty:
                return
            except LDAPException:
                continue

    def _pages(self, conn: ldap3.Connection, base: str, search_filter: str, attributes: list[str],
               controls: list[tuple[str, bool, Any]] | None, scope: Scope,
               missing_ok: bool) -> Iterator[list[dict[str, Any]]]:
        cookie: bytes | None = None
        while True:
            conn.search(base, search_filter, scope, attributes=attributes,
                        paged_size=self.page_size, paged_cookie=cookie, controls=controls)
            code = conn.result.get("result")
            if code == NO_SUCH_OBJECT and missing_ok:
                return
            if code != 0:
                hint = SIZE_LIMIT_HINT if code in (SIZE_LIMIT_EXCEEDED, ADMIN_LIMIT_EXCEEDED) else ""
                raise StoreError(
                    f"search under {base!r} failed: {conn.result.get('description')} "
                    f"{conn.result.get('message') or ''}".strip() + hint
                )
            yield [e for e in cast("list[dict[str, Any]]", conn.response) if e.get("type") == "searchResEntry"]
            cookie = conn.result.get("controls", {}).get(PAGED_RESULTS, {}).get("value", {}).get("cookie")
            if not cookie:
                return

    def search(self, base: str, search_filter: str, attributes: list[str],
                controls: list[tuple[str, bool, Any]] | None = None,
                own: ldap3.Connection | None = None, scope: Scope = "SUBTREE",
                missing_ok: bool = False) -> Iterator[dict[str, Any]]:
        """Every entry under base (or base itself, with scope BASE) matching search_filter (on own,
        else on the sync's service connection), the next page requested while this one is used,
        so that a distant directory's round trips overlap our work; StoreError when the directory
        fails, times out or drops the connection before the last page, or when base does not
        exist unless missing_ok. One search at a time per connection: finish reading one before
        starting another on the same connection."""
        conn = own or self.service()
        pages = Prefetch(self._pages(conn, base, search_filter, attributes, controls, scope, missing_ok))
        try:
            for page in pages:
                yield from page
        except LDAPException as exc:
            if own is None:
                self.drop_service()
            raise StoreUnavailable(f"directory {', '.join(self.uris)} failed mid-read: {exc}") from None
        except StoreError:
            if own is None:
                self.drop_service()
            raise
        finally:
            if not pages.close(2 * self.timeout) and own is None:
                self.drop_service()  # the page being read still uses the connection: never share it

    def root_dse(self, attributes: list[str]) -> dict[str, list[bytes]]:
        """Attributes of the directory's root DSE, read on the sync's connection."""
        conn = self.service()
        try:
            conn.search("", "(objectClass=*)", ldap3.BASE, attributes=attributes)
        except LDAPException as exc:
            self.drop_service()
            raise StoreUnavailable(f"cannot read the root DSE: {exc}") from None
        if conn.result.get("result") != 0 or not conn.response:
            raise StoreError(f"cannot read the root DSE: {conn.result.get('description')}")
        return cast("dict[str, list[bytes]]", conn.response[0]["raw_attributes"])

    def bind(self, dn: str, password: str, deadline: float) -> bool:
        """One simple bind as dn, on a pooled connection when one is open (a pooled connection the
        directory has meanwhile closed is replaced by a new one), answered before deadline."""
        try:
            conn: ldap3.Connection | None = self._auth_pool.get_nowait()
        except queue.Empty:
            conn = None
        while True:
            reused = conn is not None and not conn.closed
            try:
                if not reused:
                    conn = self.connect(None, None, deadline)
                assert conn is not None
                self.wait_at_most(conn, deadline)
                conn.user, conn.password, conn.authentication = dn, password, ldap3.SIMPLE
                ok = bool(conn.bind())
                break
            except LDAPException as exc:
                if conn is not None:
                    self._discard(conn)
                conn = None
                # A pooled connection the directory closed is replaced, if there is time left.
                if not reused or time.monotonic() >= deadline:
                    raise StoreUnavailable(
                        f"cannot reach the directory: {', '.join(self.uris)}: no answer to a bind: {exc}") from None
        return self._bound(conn, dn, ok)

    async def bind_async(self, dn: str, password: str, deadline: float) -> bool | None:
        """bind() on an open pooled connection, its answer awaited on the event loop rather than
        in a thread (the hand-off to a thread and back cost a login more than the bind's own round
        trip); None when no pooled connection is open, or when the one taken fails to send or to
        read (the directory closed it): bind() then connects anew, in a thread."""
        try:
            conn = self._auth_pool.get_nowait()
        except queue.Empty:
            return None
        if conn.closed:
            self._discard(conn)
            return None
        try:
            # Bounds the send, and the reading of an answer once it has begun: one segment carries a
            # bind's answer, but the rest of one cut short would be waited for here, on the event loop.
            self.wait_at_most(conn, deadline)
            conn.user, conn.password, conn.authentication = dn, password, ldap3.SIMPLE
            message_id = conn.send("bindRequest", bind_operation(conn.version, ldap3.SIMPLE, dn, password,
                                                                 auto_encode=conn.auto_encode), None)
            await _readable(conn.socket, deadline)
            conn.post_send_single_response(message_id)
        except LDAPException:
            self._discard(conn)
            return None
        except TimeoutError:
            self._discard(conn)  # its answer may still come: never reused
            raise StoreUnavailable(
                f"cannot reach the directory: {', '.join(self.uris)}: no answer to a bind: timed out") from None
        except BaseException:
            self._discard(conn)  # cancelled while its answer was awaited
            raise
        conn.bound = ok = conn.result is not None and conn.result.get("result") == 0
        return self._bound(conn, dn, ok)

    @staticmethod
    def _discard(conn: ldap3.Connection) -> None:
        try:
            conn.unbind()
        except LDAPException:
            pass

    def _bound(self, conn: ldap3.Connection, dn: str, ok: bool) -> bool:
        """ok, the outcome of a bind as dn on conn, logged when the directory refused it for another
        reason than a wrong password; conn pooled for the next bind."""
        if not ok and conn.result.get("result") != INVALID_CREDENTIALS:
            log.warning("store %s: bind as %s refused: %s %s", self.name, dn,
                        conn.result.get("description"), conn.result.get("message") or "")
        if self._auth_pool.qsize() < self._auth_pool_size:
            self._auth_pool.put(conn)
        else:
            conn.unbind()
        return ok


async def _readable(sock: Any, deadline: float) -> None:
    """Until sock has something to read; TimeoutError once deadline (time.monotonic()) is past."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def settle(error: Exception | None) -> None:
        if not ready.done():
            if error is None:
                ready.set_result(None)
            else:
                ready.set_exception(error)

    fd = sock.fileno()
    loop.add_reader(fd, settle, None)
    # A timer on the future itself: asyncio.wait_for's own future and callbacks cost more.
    timer = loop.call_later(max(deadline - time.monotonic(), 0), settle, TimeoutError())
    try:
        await ready
    finally:
        loop.remove_reader(fd)
        timer.cancel()
