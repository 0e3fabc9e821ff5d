"""The `ldap` store: OpenLDAP, Active Directory or any LDAPv3 directory, read with ldap3. Connections
are in ldap_connection.py, the presets and the attribute mapping in ldap_mapping.py."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, cast

from indexer.config import ConfigError
from indexer.identity import Identity
from indexer.settings import Config, LdapStoreConfig
from indexer.stores import Change, InThread, Store, StoreError, StoreUnavailable
from indexer.stores.ldap_connection import Directory
from indexer.stores.ldap_mapping import Mapping, filter_value, first_value, normalize_time
from indexer.stores.ldap_roles import BY_USER_ID, GroupRoles

log = logging.getLogger(__name__)

SHOW_DELETED = "1.2.840.113556.1.4.417"  # AD: deleted objects (tombstones) are returned
EPOCH = "19700101000000.000000Z"
# The directory's newest change is looked for among entries changed in the last hour, day, ...
# (a search hint only: the mark is the largest value the directory returns), then among all.
MARK_WINDOWS = (timedelta(hours=1), timedelta(days=1), timedelta(days=31), timedelta(days=366), None)


class LdapStore(Store):
    """People in an LDAP directory: paged full reads, changes since a USN or modifyTimestamp, and
    password checks by binding as the person's entry."""

    kind = "ldap"

    def __init__(self, settings: LdapStoreConfig, config: Config) -> None:
        super().__init__(settings, config)
        self.mapping = Mapping.from_config(settings)
        self.directory = Directory(self.name, settings)
        self.base_dns = list(settings.base_dns)
        self.roles = GroupRoles(self.name, settings, self.directory, self.mapping)
        # Why password checks cannot reach the directory (None while they can), and how many failed
        # so: an outage is logged when it starts and when it ends, not once per login.
        self._unreachable: str | None = None
        self._failed_checks = 0
        self._state_lock = threading.Lock()
        self._probing = threading.Lock()  # held by the one check trying an unreachable directory

    @classmethod
    def complete_config(cls, store: dict[str, Any], path: str, base: Path) -> None:
        """roles.nested only with roles.source groups, and members named by DN."""
        roles = store["roles"]
        if roles["nested"] and roles["source"] != "groups":
            raise ConfigError(f"{path}.roles.nested: needs roles.source: groups (nested groups are searched for)")
        if roles["nested"] and roles["member_attribute"].lower() == BY_USER_ID:
            raise ConfigError(f"{path}.roles.nested: groups listing members by memberUid cannot nest")

    def close(self) -> None:
        self.roles.finish()
        self.directory.close()

    def _identity(self, entry: dict[str, Any], roles: list[str]) -> Identity | None:
        raw = entry["raw_attributes"]
        store_id = self.mapping.store_id(entry)
        if store_id is None:
            log.warning("store %s: %s has no %s; skipped", self.name, entry["dn"], self.mapping.stable_id)
            return None
        user = first_value(raw.get(self.mapping.user_id))
        if not user:
            log.warning("store %s: %s has no %s; skipped", self.name, entry["dn"], self.mapping.user_id)
            return None
        if self.mapping.user_id_type == "localpart" and "@" in user:
            user = user.rpartition("@")[0]  # a userPrincipalName: its name part is the localpart
        display = next((v for a in self.mapping.display_name if (v := first_value(raw.get(a)))), None)
        threepids = [
            (medium, value.decode("utf-8", "replace"))
            for medium, names in self.mapping.threepids.items()
            for name in names
            for value in raw.get(name, [])
        ]
        return self.build_identity(store_id, user, display, threepids, locator=entry["dn"],
                                   lowercase=self.mapping.lowercase, roles=roles)

    def enumerate(self) -> Iterator[Identity]:
        """Every entry the filter selects under every base DN, page by page, with its roles (with
        roles.source groups, the groups are read once first)."""
        self.roles.start()
        try:
            members = self.roles.membership()
            for base in self.base_dns:
                for entry in self.directory.search(base, self.mapping.filter, self.roles.person_wanted):
                    identity = self._identity(entry, self.roles.roles(entry, members))
                    if identity is not None:
                        yield identity
        finally:
            self.roles.finish()

    # -- changes ----------------------------------------------------------------------------

    def high_water_mark(self) -> Any:
        """Active Directory: highestCommittedUSN. Otherwise the newest modifyTimestamp under the
        base DNs (looked for among recent changes first, so that it rarely reads every entry)."""
        if self.mapping.by_usn:
            value = first_value(self.directory.root_dse(["highestCommittedUSN"]).get("highestCommittedUSN"))
            if value is None:
                raise StoreError("the root DSE has no highestCommittedUSN: is this Active Directory?")
            return int(value)
        now = datetime.now(UTC)
        for window in MARK_WINDOWS:
            since = (now - window).strftime("%Y%m%d%H%M%SZ") if window else None
            search_filter = f"({self.mapping.changed}>={since})" if since else "(objectClass=*)"
            newest = None
            for base in self.base_dns:
                for entry in self.directory.search(base, search_filter, [self.mapping.changed]):
                    mark = self.mapping.mark_of(entry)
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
        selected (say, a disabled account) as removals, then the members of groups changed after
        mark (their roles may have changed; README "Roles"); on Active Directory also deleted
        entries, when the service account may see them."""
        self.roles.start()
        try:
            yield from self._changes_since(mark)
        finally:
            self.roles.finish()

    def _changes_since(self, mark: Any) -> Iterator[Change]:
        since = self._since_filter(mark)
        wanted = self.roles.person_wanted
        # People whose roles are looked up in groups: read them all first, then their groups (a
        # search may not start on the connection while a paged search still reads from it).
        later: list[tuple[dict[str, Any], Any]] = []
        for base in self.base_dns:
            for entry in self.directory.search(base, f"(&{self.mapping.filter}{since})", wanted):
                if self.roles.source == "groups":
                    later.append((entry, self.mapping.mark_of(entry) or mark))
                    continue
                identity = self._identity(entry, self.roles.roles_of_changed(entry))
                if identity is not None:
                    yield Change(identity.store_id, identity, self.mapping.mark_of(entry) or mark)
            left = [self.mapping.stable_id, self.mapping.changed]
            for entry in self.directory.search(base, f"(&(!{self.mapping.filter}){since})", left):
                store_id = self.mapping.store_id(entry)
                if store_id is not None:
                    yield Change(store_id, None, self.mapping.mark_of(entry) or mark)
        for group, members in self.roles.changed_groups(since):
            later += [(entry, self.mapping.mark_of(group) or mark) for entry in members]
        roles = self.roles.roles_of_many([entry for entry, _ in later])
        for (entry, entry_mark), entry_roles in zip(later, roles, strict=True):
            identity = self._identity(entry, entry_roles)
            if identity is not None:
                yield Change(identity.store_id, identity, entry_mark)
        if self.mapping.by_usn:
            yield from self._deleted_since(since, mark)

    def _deleted_since(self, since: str, mark: Any) -> Iterator[Change]:
        naming = first_value(self.directory.root_dse(["defaultNamingContext"]).get("defaultNamingContext"))
        if not naming:
            return
        try:
            entries = list(self.directory.search(naming, f"(&(isDeleted=TRUE){since})",
                                        [self.mapping.stable_id, self.mapping.changed],
                                        controls=[(SHOW_DELETED, True, None)]))
        except StoreError as exc:
            log.info("store %s: deleted entries not readable (%s); they leave at the next full sync",
                     self.name, exc)
            return
        for entry in entries:
            store_id = self.mapping.store_id(entry)
            if store_id is not None:
                yield Change(store_id, None, self.mapping.mark_of(entry) or mark)

    # -- authentication ---------------------------------------------------------------------

    def _find_dn(self, store_id: str, deadline: float) -> str | None:
        """The current DN of the entry with this stable id (one search on a connection of its own:
        password checks run in several threads), or None."""
        try:
            value: str | bytes = uuid.UUID(store_id).bytes_le if self.mapping.binary_id else store_id
        except ValueError:
            return None
        search_filter = f"(&{self.mapping.filter}({self.mapping.stable_id}={filter_value(value)}))"
        conn = self.directory.bind_service(deadline)
        try:
            for base in self.base_dns:
                self.directory.wait_at_most(conn, deadline)
                for entry in self.directory.search(base, search_filter, [self.mapping.stable_id], own=conn):
                    return cast(str, entry["dn"])
            return None
        finally:
            conn.unbind()

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

    async def authenticate_async(self, identity: Identity, password: str, in_thread: InThread) -> bool:
        """authenticate(), its bind on an open pooled connection sent and awaited on the event loop
        while the directory answers; in_thread whatever else: connecting, finding a moved entry
        after a refused bind, and every check while the directory is unreachable."""
        if not password or not identity.locator or self._unreachable is not None:
            return await in_thread(partial(self.authenticate, identity, password))
        started = time.monotonic()
        deadline = self.directory.deadline()
        try:
            bound = await self.directory.bind_async(identity.locator, password, deadline)
        except StoreUnavailable as exc:
            self._reached(exc)
            raise
        if bound is None:
            return await in_thread(partial(self.authenticate, identity, password))
        if not bound:
            return await in_thread(partial(self._authenticate, identity, password, started, deadline, bound))
        self._reached(None)
        self._log_outcome(identity, bound, started)
        return bound

    def _authenticate(self, identity: Identity, password: str, started: float | None = None,
                      deadline: float | None = None, bound: bool | None = None) -> bool:
        """bound: the outcome of a first bind already made (by authenticate_async), begun at started."""
        started = time.monotonic() if started is None else started
        deadline = self.directory.deadline() if deadline is None else deadline
        try:
            ok = bound if bound is not None else \
                bool(identity.locator) and self.directory.bind(identity.locator or "", password, deadline)
            current = None if ok else self._find_dn(identity.store_id, deadline)
            moved = current is not None and current != identity.locator
            if moved:
                log.info("store %s: %s moved from %s to %s", self.name, identity.mxid, identity.locator, current)
                ok = self.directory.bind(current or "", password, deadline)
        except StoreError as exc:
            # A refused service account or a failed search stops password checks as an outage does.
            unavailable = exc if isinstance(exc, StoreUnavailable) else StoreUnavailable(str(exc))
            self._reached(unavailable)
            raise unavailable from None
        self._reached(None)
        self._log_outcome(identity, ok, started)
        return ok

    def _log_outcome(self, identity: Identity, ok: bool, started: float) -> None:
        if ok:
            log.info("store %s: %s authenticated in %.0f ms", self.name, identity.mxid,
                     1000 * (time.monotonic() - started))
        else:
            log.info("store %s: wrong password for %s", self.name, identity.mxid)
