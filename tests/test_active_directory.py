"""The ldap store's active_directory preset against a real Active Directory: a Samba AD domain
controller provisioned for the test run, reached by LDAPS on 127.0.0.1:636."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import ldap3
import pytest

from indexer.stores.ldap import LdapStore
from indexer.sync import full_sync, incremental_sync
from tests.conftest import make_store, wait_until
from tests.samba import ADMIN_DN, ADMIN_PASSWORD, DOMAIN_DN, REALM, SambaDC

CONFIG = {"matrix": {"domain": "example.org"}, "threepids": {"msisdn": {"default_region": "GB"}}}


class Domain:
    """An organizational unit of the test's own, with users made by samba-tool."""

    def __init__(self, dc: SambaDC) -> None:
        self.dc = dc
        self.tag = uuid.uuid4().hex[:5]
        self.ou = f"OU=t{self.tag},{DOMAIN_DN}"
        self.conn = dc.admin()
        self.conn.add(self.ou, ["organizationalUnit"])

    def name(self, base: str) -> str:
        """A sAMAccountName unique in the domain (they are domain-wide)."""
        return f"{base}-{self.tag}"

    def add(self, base: str, password: str, mail: str | None = None, phone: str | None = None) -> str:
        name = self.name(base)
        args = ["user", "create", name, password, f"--userou=OU=t{self.tag}", f"--given-name={base.title()}",
                "--surname=Tester"]
        if mail:
            args.append(f"--mail-address={mail}")
        if phone:
            args.append(f"--telephone-number={phone}")
        self.dc.tool(*args)
        return name

    def dn(self, name: str) -> str:
        self.conn.search(self.ou, f"(sAMAccountName={name})", attributes=["cn"])
        return self.conn.response[0]["dn"]

    def guid(self, name: str) -> str:
        shown = self.dc.tool("user", "show", name, "--attributes=objectGUID")
        return next(line.split(":", 1)[1].strip() for line in shown.splitlines() if line.startswith("objectGUID"))

    def store(self, **overrides: Any) -> LdapStore:
        config: dict[str, Any] = {"name": "ad", "kind": "ldap", "preset": "active_directory",
                                  "uri": "ldaps://127.0.0.1", "tls": {"ca_file": str(self.dc.cert)},
                                  "bind": {"dn": ADMIN_DN, "password": ADMIN_PASSWORD}, "base_dns": [self.ou]}
        config.update(overrides)
        return make_store(config, CONFIG)


@pytest.fixture
def domain(samba_dc: SambaDC) -> Iterator[Domain]:
    d = Domain(samba_dc)
    yield d
    d.conn.unbind()


def test_objectguid_keys_records_and_disabled_accounts_are_left_out(domain, cache):
    alice = domain.add("alice", "Passw0rd-Alice!", mail=f"alice.{domain.tag}@corp.example.org",
                       phone="+44 7700 900001")
    bob = domain.add("bob", "Passw0rd-Bob!", mail=f"bob.{domain.tag}@corp.example.org")
    domain.dc.tool("user", "disable", bob)
    store = domain.store()
    result = full_sync(cache, store, 0.2)
    assert (result.outcome, result.added) == ("ok", 1), result.error
    record = cache.identity_by_mxid("ad", f"@{alice}:example.org")
    assert record.store_id == domain.guid(alice)
    assert record.display_name == "Alice Tester"
    assert record.threepids == (("email", f"alice.{domain.tag}@corp.example.org"), ("msisdn", "447700900001"))
    assert cache.mxid_of("ad", "email", f"bob.{domain.tag}@corp.example.org") is None
    assert isinstance(cache.state("ad")["high_water_mark"], int)
    store.close()


def test_incremental_sync_by_usn(domain, cache):
    ann = domain.add("ann", "Passw0rd-Ann!", mail=f"ann.{domain.tag}@corp.example.org")
    cid = domain.add("cid", "Passw0rd-Cid!", mail=f"cid.{domain.tag}@corp.example.org")
    eve = domain.add("eve", "Passw0rd-Eve!", mail=f"eve.{domain.tag}@corp.example.org")
    store = domain.store()
    assert full_sync(cache, store, 0.2).added == 3
    mark = cache.state("ad")["high_water_mark"]

    domain.conn.modify(domain.dn(ann), {"mail": [(ldap3.MODIFY_REPLACE, [f"ann.new.{domain.tag}@corp.example.org"])]})
    dan = domain.add("dan", "Passw0rd-Dan!", mail=f"dan.{domain.tag}@corp.example.org")
    domain.dc.tool("user", "disable", cid)
    domain.dc.tool("user", "delete", eve)
    result = incremental_sync(cache, store)
    assert result.outcome == "ok", result.error
    assert (result.added, result.changed, result.removed) == (1, 1, 2)
    assert cache.mxid_of("ad", "email", f"ann.new.{domain.tag}@corp.example.org") == f"@{ann}:example.org"
    assert cache.mxid_of("ad", "email", f"ann.{domain.tag}@corp.example.org") is None
    assert cache.mxid_of("ad", "email", f"dan.{domain.tag}@corp.example.org") == f"@{dan}:example.org"
    assert cache.mxid_of("ad", "email", f"cid.{domain.tag}@corp.example.org") is None  # disabled
    assert cache.mxid_of("ad", "email", f"eve.{domain.tag}@corp.example.org") is None  # deleted
    assert cache.state("ad")["high_water_mark"] > mark
    store.close()


def test_login_by_samaccountname_and_by_user_principal_name(domain, cache):
    alice = domain.add("alice", "Passw0rd-Alice!")
    jsmith = domain.add("jsmith", "Passw0rd-John!")
    domain.conn.modify(domain.dn(jsmith), {
        "userPrincipalName": [(ldap3.MODIFY_REPLACE, [f"john.smith.{domain.tag}@{REALM}"])]})

    by_sam = domain.store()
    full_sync(cache, by_sam, 0.2)
    record = cache.identity_by_mxid("ad", f"@{alice}:example.org")
    assert by_sam.authenticate(record, "Passw0rd-Alice!") is True
    assert by_sam.authenticate(record, "Passw0rd-Wrong!") is False
    assert by_sam.authenticate(record, "") is False
    by_sam.close()

    by_upn = domain.store(name="upn", attributes={"user_id": "userPrincipalName"})
    full_sync(cache, by_upn, 0.2)
    john = cache.identity_by_mxid("upn", f"@john.smith.{domain.tag}:example.org")
    assert john is not None and john.store_id == domain.guid(jsmith)
    assert by_upn.authenticate(john, "Passw0rd-John!") is True
    assert by_upn.authenticate(john, "Passw0rd-Alice!") is False
    by_upn.close()


def test_simple_binds_without_tls_are_refused(domain, cache):
    domain.add("alice", "Passw0rd-Alice!")
    plain = domain.store(uri="ldap://127.0.0.1")
    result = full_sync(cache, plain, 0.2)
    assert result.outcome == "failed" and "strongerAuthRequired" in result.error
    assert cache.count("ad") == 0
    plain.close()


def test_roles_through_nested_groups_reach_the_internal_profile(domain, make_server: Callable[..., Any]):
    alice = domain.add("alice", "Passw0rd-Alice!", mail=f"alice.{domain.tag}@corp.example.org")
    bob = domain.add("bob", "Passw0rd-Bob!")
    team, inviters = domain.name("team"), domain.name("inviters")
    for group in (team, inviters):
        domain.dc.tool("group", "add", group, f"--groupou=OU=t{domain.tag}")
    domain.dc.tool("group", "addmembers", team, alice)
    domain.dc.tool("group", "addmembers", inviters, team)  # alice is an inviter through her team
    server = make_server([])
    server.config["stores"] = [{
        "name": "ad", "kind": "ldap", "preset": "active_directory", "uri": "ldaps://127.0.0.1",
        "tls": {"ca_file": str(domain.dc.cert)}, "bind": {"dn": ADMIN_DN, "password": ADMIN_PASSWORD},
        "base_dns": [domain.ou], "sync": {"full_every": "6h", "changes_every": None},
        "roles": {"source": "groups", "nested": True},
    }]
    server.start()

    def roles_of(name: str) -> list[str] | None:
        response = server.http.get(f"/_matrix-internal/profile/v1/@{name}:example.org")
        return response.json()["roles"] if response.status_code == 200 else None

    assert wait_until(lambda: roles_of(alice), 90, "the first sync") == sorted([inviters, team])
    assert roles_of(bob) == []
    # bob joins the inner group: its USN moves, and the incremental sync finds bob in both groups.
    domain.dc.tool("group", "addmembers", team, bob)
    done = server.cli("index")
    assert done.returncode == 0 and "incremental sync" in done.stderr, done.stdout + done.stderr
    assert roles_of(bob) == sorted([inviters, team])
    # The team leaves the inviters: nobody's entry changed; the next full sync reads the groups again.
    domain.dc.tool("group", "removemembers", inviters, team)
    done = server.cli("index", "--full")
    assert done.returncode == 0, done.stdout + done.stderr
    assert roles_of(alice) == [team] and roles_of(bob) == [team]
