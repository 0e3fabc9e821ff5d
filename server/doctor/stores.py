"""Checks of each configured store, through its own adapter: reachable, credentials accepted, the
queries or searches run, and the mapping finds people (one shown as a sample)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import httpx
import sqlalchemy as sa

from indexer.identity import Identity
from indexer.settings import Config, StoreConfig
from indexer.stores import Store, StoreError, StoreUnavailable, build_store
from indexer.stores.ldap import LdapStore
from indexer.stores.rest import BadAnswer, RestStore, decode, lookup_answer, lookup_request
from indexer.stores.sql import SqlStore
from server.doctor import Finding, not_checked, ok, problem

# An address no directory holds: asking a read-through store for it shows only that it answers.
UNKNOWN_ADDRESS = "mxisd-doctor@example.invalid"


def describe(identity: Identity) -> str:
    """One person as the sample line shows them."""
    name = f" ({identity.display_name})" if identity.display_name else ""
    threepids = ", ".join(f"{medium} {address}" for medium, address in identity.threepids) or "no 3PIDs"
    return f"{identity.mxid}{name}, {threepids}"


def check(settings: StoreConfig, config: Config, where: str) -> Iterator[Finding]:
    """The checks of the store configured at where (stores[N])."""
    store = build_store(settings, config)
    try:
        if isinstance(store, LdapStore):
            yield from _ldap(store, where)
        elif isinstance(store, SqlStore):
            yield from _sql(store, where)
        elif isinstance(store, RestStore):
            yield from _rest(store, where)
        else:
            yield _sample(store, f"check {where}.path and its entries")[0]
    finally:
        store.close()


def _sample(store: Store, hint: str) -> tuple[Finding, Identity | None]:
    """The first person the store yields, shown as a sample; a problem when it yields nobody. Only as
    much of the source is read as it takes to find one."""
    subject = f"store {store.name}"
    try:
        first = next(iter(store.enumerate()), None)
    except StoreError as exc:
        return problem(subject, f"{exc}: {hint}"), None
    if first is None:
        return problem(subject, f"finds nobody (entries it skipped are logged above): {hint}"), None
    return ok(subject, f"finds people, e.g. {describe(first)}"), first


def _ldap(store: LdapStore, where: str) -> Iterator[Finding]:
    subject = f"store {store.name}"
    try:
        uri = store.directory.reachable()
    except StoreError as exc:
        yield problem(subject, f"{exc}: check {where}.uri, the firewall, and {where}.tls and start_tls")
        return
    yield ok(subject, f"{uri} answers")
    who = store.directory.bind_dn or "anonymous"
    try:
        missing = store.directory.missing_entries(store.base_dns)
    except StoreUnavailable as exc:
        yield problem(subject, str(exc))
        return
    except StoreError as exc:
        yield problem(subject, f"{exc}: check {where}.bind.dn and {where}.bind.password")
        return
    yield ok(subject, f"bind as {who} accepted")
    if missing:
        yield problem(subject, f"base DN {'; '.join(missing)} does not exist (or {who} may not read it): "
                               f"check {where}.base_dns")
        return
    yield ok(subject, f"base DN{'s' if len(store.base_dns) > 1 else ''} {'; '.join(store.base_dns)} found")
    yield _sample(store, f"check {where}.filter ({store.mapping.filter}) and {where}.attributes")[0]


def _sql(store: SqlStore, where: str) -> Iterator[Finding]:
    subject = f"store {store.name}"
    try:
        with store.engine.connect():
            pass
    except sa.exc.SQLAlchemyError as exc:
        cause = getattr(exc, "orig", None) or exc
        yield problem(subject, f"{store.where} cannot be reached: {str(cause).strip().splitlines()[0]}: "
                               f"check {where}.url, and that the database lets this host and user in")
        return
    yield ok(subject, f"{store.where} answers")
    finding, person = _sample(store, f"check {where}.queries.identities")
    yield finding
    if person is None:
        return
    try:
        ran = ["identities"]
        if "changes" in store.queries:
            list(store.changes_since(store.high_water_mark()))
            ran += ["high_water_mark", "changes"]
        if "password" in store.queries:
            # A made-up password: the query runs and the hash is read; nobody is logged in.
            store.authenticate(person, secrets.token_urlsafe(16))
            ran.append("password")
    except StoreError as exc:
        # A password check's StoreUnavailable names the store already.
        yield problem(subject, f"{str(exc).removeprefix(f'{subject}: ')}: check {where}.queries")
        return
    yield ok(subject, f"the {', '.join(ran)} queries run")


def _rest(store: RestStore, where: str) -> Iterator[Finding]:
    subject = f"store {store.name}"
    if store.enumerable:
        finding, person = _sample(store, f"check {where}.url and {where}.endpoints.enumerate")
        yield finding
        if person is not None and store.endpoints.changes is not None:
            try:
                mark = store.high_water_mark()
            except StoreError as exc:
                yield problem(subject, f"{exc}: check {where}.endpoints.changes")
                return
            yield ok(subject, f"the changes endpoint answers (high-water mark {mark!r})")
        return
    path = store.endpoints.lookup
    if path is None:
        yield not_checked(subject, "neither an enumerate nor a lookup endpoint: it answers nothing")
        return
    url = store.http.base_url.join(path)
    try:
        response = store.http.post(path, json=lookup_request("email", UNKNOWN_ADDRESS))
    except httpx.HTTPError as exc:
        yield problem(subject, f"lookup endpoint {url} cannot be reached: {type(exc).__name__}: {exc}: "
                               f"check {where}.url")
        return
    if not response.is_success:
        yield problem(subject, f"lookup endpoint {url} answered HTTP {response.status_code}: check {where}.url, "
                               f"{where}.headers and {where}.endpoints.lookup")
        return
    try:
        lookup_answer(decode(response), store.domain)
    except BadAnswer as exc:
        yield problem(subject, f"lookup endpoint {url} answered, but not mxisd's protocol: {exc}: "
                               f"check {where}.endpoints.lookup")
        return
    yield ok(subject, f"the lookup endpoint {url} answers")
