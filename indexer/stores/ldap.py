"""The `ldap` store: OpenLDAP, Active Directory or any LDAPv3 directory, read with ldap3."""

from __future__ import annotations

import logging
import math
import queue
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, cast

import ldap3
from ldap3.core.exceptions import LDAPException
from ldap3.utils.conv import escape_filter_chars

from indexer.config import parse_duration
from indexer.identity import Identity
from indexer.stores import Change, Store, StoreError, StoreUnavailable

log = logging.getLogger(__name__)

PAGED_RESULTS = "1.2.840.113556.1.4.319"  # RFC 2696
SHOW_DELETED = "1.2.840.113556.1.4.417"  # AD: deleted objects (tombstones) are returned
INVALID_CREDENTIALS = 49
SIZE_LIMIT_EXCEEDED = 4
ADMIN_LIMIT_EXCEEDED = 11
SIZE_LIMIT_HINT = (" (the directory limits how many entries the service account may read, paged"
                   " searches included: on OpenLDAP give it limits dn.exact=\"<bind dn>\" size=unlimited)")
DISABLED_ACCOUNT = "(!(userAccountControl:1.2.840.113556.1.4.803:=2))"
EPOCH = "19700101000000.000000Z"
# The directory's newest change is looked for among entries changed in the last hour, day, ...
# (a search hint only: the mark is the largest value the directory returns), then among all.
MARK_WINDOWS = (timedelta(hours=1), timedelta(days=1), timedelta(days=31), timedelta(days=366), None)

PRESETS: dict[str, dict[str, Any]] = {
    "openldap": {
        "filter": "(objectClass=inetOrgPerson)",
        "attributes": {
            "user_id": "uid",
            "stable_id": "entryUUID",
            "changed": "modifyTimestamp",
            "display_name": ["displayName", "cn"],
            "threepids": {"email": ["mail"], "msisdn": ["telephoneNumber", "mobile"]},
        },
    },
    "active_directory": {
        "filter": f"(&(objectCategory=person)(objectClass=user){DISABLED_ACCOUNT})",
        "attributes": {
            "user_id": "sAMAccountName",
            "stable_id": "objectGUID",
            "changed": "uSNChanged",
            "display_name": ["displayName", "cn"],
            "threepids": {"email": ["mail"], "msisdn": ["telephoneNumber", "mobile"]},
        },
    },
}


def filter_value(value: str | bytes) -> str:
    """value as an RFC 4515 assertion value: `*`, `(`, `)`, `\\` and NUL (every byte, for binary
    values) escaped, so no input can change what a filter selects."""
    if isinstance(value, bytes):
        return "".join(f"\\{b:02x}" for b in value)
    return escape_filter_chars(value)


def normalize_time(value: str) -> str:
    """A generalizedTime as UTC "YYYYMMDDHHMMSS.ffffffZ", so that string order is time order."""
    text = value.strip().replace(",", ".")
    offset = UTC
    if text.endswith("Z"):
        text = text[:-1]
    elif len(text) > 5 and text[-5] in "+-":
        sign = 1 if text[-5] == "+" else -1
        offset = timezone(sign * timedelta(hours=int(text[-4:-2]), minutes=int(text[-2:])))
        text = text[:-5]
    whole, _, fraction = text.partition(".")
    moment = datetime.strptime(whole.ljust(14, "0"), "%Y%m%d%H%M%S").replace(tzinfo=offset)
    moment += timedelta(seconds=float(f"0.{fraction or 0}"))
    return moment.astimezone(UTC).strftime("%Y%m%d%H%M%S.%fZ")


def _first(values: list[bytes] | None) -> str | None:
    return values[0].decode("utf-8", "replace") if values else None


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


@dataclass
class Mapping:
    """Which attributes hold what, after the preset and the config are merged."""

    filter: str
    user_id: str
    user_id_type: str
    lowercase: bool
    stable_id: str
    changed: str
    display_name: list[str]
    threepids: dict[str, list[str]]
    binary_id: bool = field(init=False)
    by_usn: bool = field(init=False)

    def __post_init__(self) -> None:
        self.binary_id = self.stable_id.lower() == "objectguid"
        self.by_usn = self.changed.lower() == "usnchanged"

    def wanted(self) -> list[str]:
        names = [self.user_id, self.stable_id, self.changed, *self.display_name]
        names += [a for attrs in self.threepids.values() for a in attrs]
        return list(dict.fromkeys(names))


class LdapStore(Store):
    """People in an LDAP directory: paged full reads, changes since a USN or modifyTimestamp, and
    password checks by binding as the person's entry."""

    kind = "ldap"

    def __init__(self, store_config: dict[str, Any], config: dict[str, Any]) -> None:
        super().__init__(store_config, config)
        preset = PRESETS[store_config.get("preset", "openldap")]
        attrs = {**preset["attributes"], **store_config.get("attributes", {})}
        # Media merge one by one: adding a medium keeps the preset's email and msisdn attributes.
        attrs["threepids"] = {**preset["attributes"]["threepids"], **attrs["threepids"]}
        self.mapping = Mapping(
            filter=store_config.get("filter") or preset["filter"],
            user_id=attrs["user_id"],
            user_id_type=attrs.get("user_id_type", "localpart"),
            lowercase=attrs.get("lowercase", True),
            stable_id=attrs["stable_id"],
            changed=attrs["changed"],
            display_name=list(attrs["display_name"]),
            threepids={m: list(a) for m, a in attrs["threepids"].items()},
        )
        uris = store_config["uri"]
        self.uris: list[str] = [uris] if isinstance(uris, str) else list(uris)
        self.base_dns: list[str] = list(store_config["base_dns"])
        self.page_size: int = store_config.get("page_size", 500)
        self.start_tls: bool = store_config.get("start_tls", False)
        tls = store_config.get("tls", {})
        self.tls = ldap3.Tls(
            validate=ssl.CERT_REQUIRED if tls.get("verify", True) else ssl.CERT_NONE,
            ca_certs_file=tls.get("ca_file"),
        )
        # timeout bounds connecting (every URI in turn), binding and searching together: a password
        # check as a whole, a sync's connection, and each page a sync reads.
        self.timeout = parse_duration(store_config.get("timeout", "8s"))
        self.connect_timeout = min(parse_duration(store_config.get("connect_timeout", "3s")), self.timeout)
        bind = store_config.get("bind") or {}
        self.bind_dn: str | None = bind.get("dn")
        self.bind_password: str | None = bind.get("password")
        self._conn: ldap3.Connection | None = None
        self._auth_pool: queue.LifoQueue[ldap3.Connection] = queue.LifoQueue()
        self._auth_pool_size: int = store_config.get("auth_pool_size", 4)
        # Why password checks cannot reach the directory (None while they can), and how many failed
        # so: an outage is logged when it starts and when it ends, not once per login.
        self._unreachable: str | None = None
        self._failed_checks = 0
        self._state_lock = threading.Lock()
        self._probing = threading.Lock()  # held by the one check trying an unreachable directory

    # -- connections ------------------------------------------------------------------------

    def _deadline(self) -> float:
        return time.monotonic() + self.timeout

    @staticmethod
    def _wait_at_most(conn: ldap3.Connection, deadline: float) -> None:
        """Let the connection's next answers take no longer than until deadline."""
        conn.socket.settimeout(max(deadline - time.monotonic(), 0.001))

    def _connect(self, dn: str | None, password: str | None, deadline: float) -> ldap3.Connection:
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
            conn = ldap3.Connection(server, user=dn, password=password,
                                    authentication=ldap3.SIMPLE if dn else ldap3.ANONYMOUS,
                                    read_only=True, raise_exceptions=False, auto_referrals=False,
                                    receive_timeout=math.ceil(left))
            try:
                conn.open()
                self._wait_at_most(conn, deadline)
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

    def _service(self) -> ldap3.Connection:
        """The sync's connection, bound as the service account (reopened after a failure)."""
        if self._conn is not None and not self._conn.closed and self._conn.bound:
            return self._conn
        self._conn = self._bind_service(self._deadline())
        # Each page of a sync's searches may take the whole timeout.
        self._conn.socket.settimeout(self.timeout)
        return self._conn

    def _bind_service(self, deadline: float) -> ldap3.Connection:
        conn = self._connect(self.bind_dn, self.bind_password, deadline)
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

    def _drop_service(self) -> None:
        if self._conn is not None:
            try:
                self._conn.unbind()
            except LDAPException:
                pass
        self._conn = None

    def reachable(self) -> str:
        """The first URI that accepts a connection (TLS started where configured), without binding;
        StoreUnavailable when none does."""
        conn = self._connect(None, None, self._deadline())
        try:
            return str(conn.server.name)
        finally:
            conn.unbind()

    def missing_base_dns(self) -> list[str]:
        """The base DNs that the service account does not find (absent, or hidden from it); binding
        as the service account first, so StoreError when that bind is refused."""
        conn = self._service()
        missing = []
        for base in self.base_dns:
            try:
                conn.search(base, "(objectClass=*)", ldap3.BASE, attributes=["1.1"])
            except LDAPException as exc:
                self._drop_service()
                raise StoreUnavailable(f"directory {', '.join(self.uris)} failed to answer a search: {exc}") from None
            if conn.result.get("result") != 0:
                missing.append(base)
        return missing

    def close(self) -> None:
        self._drop_service()
        while True:
            try:
                self._auth_pool.get_nowait().unbind()
            except queue.Empty:
                return
            except LDAPException:
                continue

    # -- searches ---------------------------------------------------------------------------

    def _pages(self, conn: ldap3.Connection, base: str, search_filter: str, attributes: list[str],
               controls: list[tuple[str, bool, Any]] | None) -> Iterator[list[dict[str, Any]]]:
        cookie: bytes | None = None
        while True:
            conn.search(base, search_filter, ldap3.SUBTREE, attributes=attributes,
                        paged_size=self.page_size, paged_cookie=cookie, controls=controls)
            code = conn.result.get("result")
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

    def _search(self, base: str, search_filter: str, attributes: list[str],
                controls: list[tuple[str, bool, Any]] | None = None,
                own: ldap3.Connection | None = None) -> Iterator[dict[str, Any]]:
        """Every entry under base matching search_filter (on own, else on the sync's service
        connection), the next page requested while this one is used, so that a distant
        directory's round trips overlap our work; StoreError when the directory fails, times out
        or drops the connection before the last page."""
        conn = own or self._service()
        pages = Prefetch(self._pages(conn, base, search_filter, attributes, controls))
        try:
            for page in pages:
                yield from page
        except LDAPException as exc:
            if own is None:
                self._drop_service()
            raise StoreUnavailable(f"directory {', '.join(self.uris)} failed mid-read: {exc}") from None
        except StoreError:
            if own is None:
                self._drop_service()
            raise
        finally:
            if not pages.close(2 * self.timeout) and own is None:
                self._drop_service()  # the page being read still uses the connection: never share it

    def _store_id(self, entry: dict[str, Any]) -> str | None:
        raw: list[bytes] | None = entry["raw_attributes"].get(self.mapping.stable_id)
        if not raw:
            return None
        if self.mapping.binary_id:
            return str(uuid.UUID(bytes_le=raw[0]))
        return raw[0].decode("utf-8", "replace").lower()

    def _mark_of(self, entry: dict[str, Any]) -> Any:
        value = _first(entry["raw_attributes"].get(self.mapping.changed))
        if value is None:
            return None
        return int(value) if self.mapping.by_usn else normalize_time(value)

    def _identity(self, entry: dict[str, Any]) -> Identity | None:
        raw = entry["raw_attributes"]
        store_id = self._store_id(entry)
        if store_id is None:
            log.warning("store %s: %s has no %s; skipped", self.name, entry["dn"], self.mapping.stable_id)
            return None
        user = _first(raw.get(self.mapping.user_id))
        if not user:
            log.warning("store %s: %s has no %s; skipped", self.name, entry["dn"], self.mapping.user_id)
            return None
        if self.mapping.user_id_type == "localpart" and "@" in user:
            user = user.rpartition("@")[0]  # a userPrincipalName: its name part is the localpart
        display = next((v for a in self.mapping.display_name if (v := _first(raw.get(a)))), None)
        threepids = [
            (medium, value.decode("utf-8", "replace"))
            for medium, names in self.mapping.threepids.items()
            for name in names
            for value in raw.get(name, [])
        ]
        return self.build_identity(store_id, user, display, threepids, locator=entry["dn"],
                                   lowercase=self.mapping.lowercase)

    def enumerate(self) -> Iterator[Identity]:
        """Every entry the filter selects under every base DN, page by page."""
        wanted = self.mapping.wanted()
        for base in self.base_dns:
            for entry in self._search(base, self.mapping.filter, wanted):
                identity = self._identity(entry)
                if identity is not None:
                    yield identity

    # -- changes ----------------------------------------------------------------------------

    def _root_dse(self, attributes: list[str]) -> dict[str, list[bytes]]:
        conn = self._service()
        try:
            conn.search("", "(objectClass=*)", ldap3.BASE, attributes=attributes)
        except LDAPException as exc:
            self._drop_service()
            raise StoreUnavailable(f"cannot read the root DSE: {exc}") from None
        if conn.result.get("result") != 0 or not conn.response:
            raise StoreError(f"cannot read the root DSE: {conn.result.get('description')}")
        return cast("dict[str, list[bytes]]", conn.response[0]["raw_attributes"])

    def high_water_mark(self) -> Any:
        """Active Directory: highestCommittedUSN. Otherwise the newest modifyTimestamp under the
        base DNs (looked for among recent changes first, so that it rarely reads every entry)."""
        if self.mapping.by_usn:
            value = _first(self._root_dse(["highestCommittedUSN"]).get("highestCommittedUSN"))
            if value is None:
                raise StoreError("the root DSE has no highestCommittedUSN: is this Active Directory?")
            return int(value)
        now = datetime.now(UTC)
        for window in MARK_WINDOWS:
            since = (now - window).strftime("%Y%m%d%H%M%SZ") if window else None
            search_filter = f"({self.mapping.changed}>={since})" if since else "(objectClass=*)"
            newest = None
            for base in self.base_dns:
                for entry in self._search(base, search_filter, [self.mapping.changed]):
                    mark = self._mark_of(entry)
                    if mark is not None and (newest is None or mark > newest):
                        newest = mark
            if newest is not None:
                return newest
        return EPOCH

    def _since_filter(self, mark: Any) -> str:
        if self.mapping.by_usn:
            return f"({self.mapping.changed}>={int(mark) + 1})"
        # Whole seconds, inclusive: entries changed in the mark's own second are read again (and
        # skipped when unchanged) rather than missed.
        return f"({self.mapping.changed}>={filter_value(normalize_time(mark)[:14] + 'Z')})"

    def changes_since(self, mark: Any) -> Iterator[Change]:
        """Selected entries changed after mark, then entries that changed and are no longer
        selected (say, a disabled account) as removals; on Active Directory also deleted entries,
        when the service account may see them."""
        since = self._since_filter(mark)
        wanted = self.mapping.wanted()
        for base in self.base_dns:
            for entry in self._search(base, f"(&{self.mapping.filter}{since})", wanted):
                identity = self._identity(entry)
                if identity is not None:
                    yield Change(identity.store_id, identity, self._mark_of(entry) or mark)
            left = [self.mapping.stable_id, self.mapping.changed]
            for entry in self._search(base, f"(&(!{self.mapping.filter}){since})", left):
                store_id = self._store_id(entry)
                if store_id is not None:
                    yield Change(store_id, None, self._mark_of(entry) or mark)
        if self.mapping.by_usn:
            yield from self._deleted_since(since, mark)

    def _deleted_since(self, since: str, mark: Any) -> Iterator[Change]:
        naming = _first(self._root_dse(["defaultNamingContext"]).get("defaultNamingContext"))
        if not naming:
            return
        try:
            entries = list(self._search(naming, f"(&(isDeleted=TRUE){since})",
                                        [self.mapping.stable_id, self.mapping.changed],
                                        controls=[(SHOW_DELETED, True, None)]))
        except StoreError as exc:
            log.info("store %s: deleted entries not readable (%s); they leave at the next full sync",
                     self.name, exc)
            return
        for entry in entries:
            store_id = self._store_id(entry)
            if store_id is not None:
                yield Change(store_id, None, self._mark_of(entry) or mark)

    # -- authentication ---------------------------------------------------------------------

    def _find_dn(self, store_id: str, deadline: float) -> str | None:
        """The current DN of the entry with this stable id (one search on a connection of its own:
        password checks run in several threads), or None."""
        try:
            value: str | bytes = uuid.UUID(store_id).bytes_le if self.mapping.binary_id else store_id
        except ValueError:
            return None
        search_filter = f"(&{self.mapping.filter}({self.mapping.stable_id}={filter_value(value)}))"
        conn = self._bind_service(deadline)
        try:
            for base in self.base_dns:
                self._wait_at_most(conn, deadline)
                for entry in self._search(base, search_filter, [self.mapping.stable_id], own=conn):
                    return cast(str, entry["dn"])
            return None
        finally:
            conn.unbind()

    def _bind(self, dn: str, password: str, deadline: float) -> bool:
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
                    conn = self._connect(None, None, deadline)
                assert conn is not None
                self._wait_at_most(conn, deadline)
                conn.user, conn.password, conn.authentication = dn, password, ldap3.SIMPLE
                ok = bool(conn.bind())
                break
            except LDAPException as exc:
                if conn is not None:
                    try:
                        conn.unbind()
                    except LDAPException:
                        pass
                conn = None
                # A pooled connection the directory closed is replaced, if there is time left.
                if not reused or time.monotonic() >= deadline:
                    raise StoreUnavailable(
                        f"cannot reach the directory: {', '.join(self.uris)}: no answer to a bind: {exc}") from None
        if not ok and conn.result.get("result") != INVALID_CREDENTIALS:
            log.warning("store %s: bind as %s refused: %s %s", self.name, dn,
                        conn.result.get("description"), conn.result.get("message") or "")
        if self._auth_pool.qsize() < self._auth_pool_size:
            self._auth_pool.put(conn)
        else:
            conn.unbind()
        return ok

    def _reached(self, error: StoreUnavailable | None) -> None:
        """Record whether a password check reached the directory; log only when that changes."""
        with self._state_lock:
            if error is None:
                if self._unreachable is not None:
                    log.warning("store %s: password checks reach the directory again (%d failed while it was "
                                "unreachable)", self.name, self._failed_checks)
                    self._unreachable, self._failed_checks = None, 0
                return
            self._failed_checks += 1
            if self._unreachable is None:
                self._unreachable = str(error)
                log.warning("store %s: password checks fail until the directory answers again: %s", self.name, error)
            else:
                log.debug("store %s: password check failed, the directory is still unreachable: %s", self.name, error)

    def authenticate(self, identity: Identity, password: str) -> bool:
        """Bind as the identity's entry; when that fails and the entry has moved (found by its
        stable id), bind once more at its new DN. An empty password never reaches the directory.
        All of it within the store's timeout; StoreUnavailable when the directory cannot be
        reached or does not answer in time. While it cannot, one check at a time tries it and
        the others fail at once, rather than each holding a thread and a login for the timeout."""
        if not password:
            log.info("store %s: empty password for %s refused", self.name, identity.mxid)
            return False
        probe = self._unreachable is not None
        if probe and not self._probing.acquire(blocking=False):
            busy = StoreUnavailable(f"{self._unreachable} (another password check is trying it again)")
            self._reached(busy)
            raise busy
        try:
            return self._authenticate(identity, password)
        finally:
            if probe:
                self._probing.release()

    def _authenticate(self, identity: Identity, password: str) -> bool:
        started = time.monotonic()
        deadline = self._deadline()
        try:
            ok = bool(identity.locator) and self._bind(identity.locator or "", password, deadline)
            current = None if ok else self._find_dn(identity.store_id, deadline)
            moved = current is not None and current != identity.locator
            if moved:
                log.info("store %s: %s moved from %s to %s", self.name, identity.mxid, identity.locator, current)
                ok = self._bind(current or "", password, deadline)
        except StoreError as exc:
            # A refused service account or a failed search stops password checks as an outage does.
            unavailable = exc if isinstance(exc, StoreUnavailable) else StoreUnavailable(str(exc))
            self._reached(unavailable)
            raise unavailable from None
        self._reached(None)
        if ok:
            log.info("store %s: %s authenticated in %.0f ms", self.name, identity.mxid,
                     1000 * (time.monotonic() - started))
        else:
            log.info("store %s: wrong password for %s", self.name, identity.mxid)
        return ok
