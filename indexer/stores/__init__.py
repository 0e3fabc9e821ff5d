"""The store interface: read-only adapters that turn a source's entries into Identity records."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import Any

import jsonschema

from indexer import normalize
from indexer.config import Validator, explain, load_schema
from indexer.identity import Identity
from indexer.settings import Config, StoreConfig

log = logging.getLogger(__name__)

# Runs a blocking password check off the event loop (in a thread of the server's) and awaits it.
InThread = Callable[[Callable[[], bool]], Awaitable[bool]]


class StoreError(Exception):
    """The source could not be read completely; a sync that sees this changes nothing."""


class StoreUnavailable(StoreError):
    """The source could not be reached or did not answer in time: a password check it raises this
    from was not made (neither accepted nor refused)."""


@dataclass(frozen=True)
class Change:
    """One entry of the source that changed after a high-water mark."""

    store_id: str
    identity: Identity | None  # None: the entry is gone, or the store no longer selects it
    mark: Any  # the source's own ordering value (USN, timestamp, sequence): JSON-serialisable, ordered by max()


class Store(ABC):
    """One configured source of identities. Blocking: call it from the indexer, never the event loop."""

    kind: str = ""
    enumerable: bool = True  # False: never synced; the server asks the source on cache misses

    def __init__(self, settings: StoreConfig, config: Config) -> None:
        self.name = settings.name
        self.domain = config.matrix.domain
        self.default_region = config.threepids.msisdn.default_region

    @abstractmethod
    def enumerate(self) -> Iterator[Identity]:
        """Every identity the source holds; raises StoreError when it cannot read them all."""

    def size(self) -> int | None:
        """How many entries a full enumeration will read, when the source can tell cheaply (for
        progress reports); None otherwise."""
        return None

    def high_water_mark(self) -> Any:
        """The source's current high-water mark, read before a full sync enumerates; None when the
        store cannot list changes (then every sync is a full one)."""
        return None

    def changes_since(self, mark: Any) -> Iterator[Change]:
        """Entries changed after mark (a value from high_water_mark or a Change); only called on
        stores whose high_water_mark is not None."""
        raise StoreError(f"store kind {self.kind} cannot list changes; only full syncs apply to it")

    def authenticate(self, identity: Identity, password: str) -> bool:
        """Whether password is this identity's password; stores without passwords refuse. identity
        comes from the cache (Cache.identity_by_mxid), with the locator the sync recorded. May raise
        StoreUnavailable when the source cannot answer."""
        log.info("store %s cannot check passwords", self.name)
        return False

    async def authenticate_async(self, identity: Identity, password: str, in_thread: InThread) -> bool:
        """authenticate() from the event loop: whatever may block runs through in_thread. All of it
        by default; a store that can wait for an answer without blocking overrides it."""
        return await in_thread(partial(self.authenticate, identity, password))

    def close(self) -> None:  # noqa: B027 (a hook: stores holding connections override it)
        """Release connections; the default store holds none."""

    @classmethod  # noqa: B027 (a hook, like close)
    def complete_config(cls, store: dict[str, Any], path: str, base: Path) -> None:
        """Complete one entry of the config's stores (valid, with the schema's defaults) in place,
        relative paths taken from base; raise ConfigError naming path for what the JSON Schema
        cannot check. Nothing by default."""

    def person_id(self, entry: Any, where: str) -> str | None:
        """The stable id of an entry in the person format (schemas/file-store.schema.json), or None
        (logged with where) when the entry does not match that format."""
        error = next(iter(_person_validator().iter_errors(entry)), None)
        if error is not None:
            log.warning("store %s: %s skipped: %s", self.name, where, explain(error))
            return None
        # Without an explicit id, the user id is the stable id (case does not make a new person).
        return str(entry.get("id") or (entry.get("mxid") or entry["localpart"]).strip().lower())

    def person_identity(self, store_id: str, entry: dict[str, Any]) -> Identity | None:
        """The Identity of a valid person-format entry (see build_identity)."""
        threepids = [("email", a) for a in entry.get("emails", [])]
        threepids += [("msisdn", str(a)) for a in entry.get("phones", [])]
        threepids += [(t["medium"], t["address"]) for t in entry.get("threepids", [])]
        return self.build_identity(store_id, entry.get("mxid") or entry["localpart"], entry.get("display_name"),
                                   threepids, roles=entry.get("roles", ()))

    def build_identity(
        self,
        store_id: str,
        user: str,
        display_name: str | None,
        threepids: Iterable[tuple[str, str]],
        locator: str | None = None,
        lowercase: bool = True,
        roles: Iterable[str] = (),
    ) -> Identity | None:
        """An Identity from raw values, or None (logged) when the user id is unusable. An invalid
        3PID is logged with the record's id and left out; the rest of the record is kept. Roles
        are kept as given, without surrounding blanks; empty ones are left out."""
        try:
            if user.startswith("@"):
                mxid, local = normalize.mxid(user, lowercase)
            else:
                local = normalize.localpart(user, lowercase)
                mxid = f"@{local}:{self.domain}"
        except normalize.InvalidAddress as exc:
            log.warning("store %s: record %s skipped: %s", self.name, store_id, exc)
            return None
        canonical = []
        for medium, address in threepids:
            try:
                canonical.append(normalize.threepid(medium, address, self.default_region))
            except normalize.InvalidAddress as exc:
                log.warning("store %s: record %s: %s left out: %s", self.name, store_id, medium, exc)
        name = display_name.strip() if isinstance(display_name, str) and display_name.strip() else None
        return Identity.build(
            mxid=mxid, localpart=local, display_name=name, threepids=canonical, store=self.name, store_id=store_id,
            locator=locator, roles=[r.strip() for r in roles if r.strip()],
        )


@cache
def _person_validator() -> jsonschema.protocols.Validator:
    return Validator(load_schema("file-store.schema.json")["$defs"]["person"])


def store_class(kind: str) -> type[Store]:
    """The adapter class for a configured kind."""
    from indexer.stores.file import FileStore
    from indexer.stores.ldap import LdapStore
    from indexer.stores.rest import RestStore
    from indexer.stores.sql import SqlStore

    kinds: dict[str, type[Store]] = {
        kind.kind: kind for kind in (FileStore, LdapStore, SqlStore, RestStore)
    }
    return kinds[kind]


def build_store(settings: StoreConfig, config: Config) -> Store:
    """The adapter for one entry of the config's stores list."""
    return store_class(settings.kind)(settings, config)
