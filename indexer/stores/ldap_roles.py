"""The `ldap` store's roles: the groups a person belongs to (README "Roles"), read from the person's
memberOf attribute or from a search for groups listing their members, with Active Directory's
nested groups through the matching rule in chain."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import ldap3
from ldap3.core.exceptions import LDAPException
from ldap3.utils.dn import parse_dn

from indexer.settings import LdapStoreConfig
from indexer.stores.ldap_connection import Directory
from indexer.stores.ldap_mapping import Mapping, filter_value, first_value

log = logging.getLogger(__name__)

IN_CHAIN = "1.2.840.113556.1.4.1941"  # LDAP_MATCHING_RULE_IN_CHAIN: membership through nested groups (AD)
GROUP_FILTERS = {
    "openldap": "(|(objectClass=groupOfNames)(objectClass=groupOfUniqueNames)(objectClass=posixGroup))",
    "active_directory": "(objectClass=group)",
}
BY_USER_ID = "memberuid"  # the one member attribute naming people by user id rather than by DN
# Above this many people read by an incremental sync, reading every group once (as a full sync
# does) is cheaper than one search for the groups of each person.
SEARCHES_PER_PERSON_UP_TO = 50


def dn_key(dn: str) -> str:
    """A DN as directories compare them: attribute types and values case-folded, blanks around
    separators dropped (memberOf and member values need not be spelled as the entry's DN is)."""
    if not any(c in dn for c in '\\"+#;<>'):  # the common plain DN: split by hand, 20 times faster than parse_dn
        parts = [part.partition("=") for part in dn.split(",")]
        if all(sep for _, sep, _ in parts):
            return ",".join(f"{kind.strip().lower()}={value.strip().lower()}" for kind, _, value in parts)
    try:
        return ",".join(f"{kind.strip().lower()}={value.strip().lower()}" for kind, value, _ in parse_dn(dn))
    except LDAPException:
        return dn.strip().lower()


def unescape_value(value: str) -> str:
    """An attribute value as a DN writes it (RFC 4514: `\\,` or `\\2C`, hex pairs being UTF-8
    bytes) as the value itself: a group `CN=Sales\\, EMEA` is the role `Sales, EMEA`."""
    out, i = bytearray(), 0
    while i < len(value):
        pair = value[i + 1:i + 3]
        if value[i] == "\\" and len(pair) == 2 and all(c in "0123456789abcdefABCDEF" for c in pair):
            out.append(int(pair, 16))
            i += 3
        elif value[i] == "\\" and i + 1 < len(value):
            out += value[i + 1].encode()
            i += 2
        else:
            out += value[i].encode()
            i += 1
    return out.decode("utf-8", "replace")


class GroupRoles:
    """Which roles a person of one `ldap` store has. A full sync asks membership() once, then
    roles() for each person; an incremental sync asks roles_of_changed() for each changed person
    and changed_groups() for the groups whose members changed."""

    def __init__(self, name: str, settings: LdapStoreConfig, directory: Directory, mapping: Mapping) -> None:
        roles = settings.roles
        self.store = name
        self.source = roles.source
        self.name = roles.name
        self.by_dn = roles.name.lower() == "dn"
        self.member_of = roles.member_of
        self.base_dns = list(roles.base_dns or settings.base_dns)
        self.filter = roles.filter or GROUP_FILTERS[settings.preset]
        self.member_attribute = roles.member_attribute
        self.by_user_id = roles.member_attribute.lower() == BY_USER_ID
        self.nested = roles.nested
        self.directory = directory
        self.person_bases = list(settings.base_dns)
        self.person_filter = mapping.filter
        self.user_id = mapping.user_id
        self.changed = mapping.changed
        # What the store reads of a person entry, so that members of changed groups become identities.
        self.person_wanted = list(dict.fromkeys(mapping.wanted() + self.person_attributes()))
        self._names: dict[str, str | None] = {}  # group DN key -> role, for the sync under way
        # Group names are read on a connection of their own: the sync's may be mid-way through a
        # paged search of people when a memberOf value needs one.
        self._own: ldap3.Connection | None = None

    def person_attributes(self) -> list[str]:
        """What to read with each person entry besides the store's mapping."""
        return [self.member_of] if self.source == "member_of" else []

    def start(self) -> None:
        """Forget the group names read by the previous sync: a renamed group is read again."""
        self._names.clear()

    def finish(self) -> None:
        """Close the connection group names were read on, if one was opened."""
        if self._own is not None:
            try:
                self._own.unbind()
            except LDAPException:
                pass
            self._own = None

    def _own_connection(self) -> ldap3.Connection:
        if self._own is None or self._own.closed:
            self._own = self.directory.bind_service(self.directory.deadline())
            self._own.socket.settimeout(self.directory.timeout)
        return self._own

    # -- the role of a group ------------------------------------------------------------------

    def _role(self, dn: str, entry: dict[str, Any] | None = None) -> str | None:
        """The role a group stands for: its DN, or the value of its name attribute (from entry,
        from its DN when that is the first RDN's attribute, else read once per sync)."""
        if self.by_dn:
            return dn
        key = dn_key(dn)
        if entry is not None:
            self._names[key] = first_value(entry["raw_attributes"].get(self.name))
        if key not in self._names:
            try:
                kind, value, _ = parse_dn(dn)[0]
            except (LDAPException, IndexError):
                kind, value = "", ""
            if kind.strip().lower() == self.name.lower():
                self._names[key] = unescape_value(value.strip())
            else:
                found = list(self.directory.search(dn, "(objectClass=*)", [self.name], own=self._own_connection(),
                                                   scope="BASE", missing_ok=True))
                self._names[key] = first_value(found[0]["raw_attributes"].get(self.name)) if found else None
                if self._names[key] is None:
                    log.warning("store %s: group %s has no %s; not a role", self.store, dn, self.name)
        return self._names[key]

    def _member_key(self, entry: dict[str, Any]) -> str | None:
        """How groups name this person: their DN, or (memberUid) their user id."""
        if self.by_user_id:
            user = first_value(entry["raw_attributes"].get(self.user_id))
            return user.strip().lower() if user else None
        return dn_key(entry["dn"])

    # -- full syncs ---------------------------------------------------------------------------

    def membership(self) -> dict[str, set[str]]:
        """source groups: every member's roles, keyed as _member_key keys them: one search for the
        groups, and with nested one search per group for its members through nested groups (not
        one per person). Empty for other sources."""
        members: dict[str, set[str]] = {}
        if self.source != "groups":
            return members
        wanted = ([] if self.by_dn else [self.name]) + ([] if self.nested else [self.member_attribute])
        groups = [g for base in self.base_dns for g in self.directory.search(base, self.filter, wanted)]
        for group in groups:
            role = self._role(group["dn"], group)
            if role is None:
                continue
            if self.nested:
                keys = [dn_key(p["dn"]) for p in self._transitive_members(group["dn"], ["1.1"])]
            else:
                keys = [self._value_key(v) for v in group["raw_attributes"].get(self.member_attribute, [])]
            for key in keys:
                members.setdefault(key, set()).add(role)
        log.info("store %s: %d groups name roles of %d members", self.store, len(groups), len(members))
        return members

    def _value_key(self, value: bytes) -> str:
        text = value.decode("utf-8", "replace")
        if self.by_user_id:
            return text.strip().lower()
        return dn_key(text.split("#'", 1)[0])  # uniqueMember may end in #'<uid bits>'B

    def _transitive_members(self, group_dn: str, attributes: list[str]) -> Iterator[dict[str, Any]]:
        """The people in a group directly or through groups nested in it (matching rule in chain)."""
        search_filter = f"(&{self.person_filter}(memberOf:{IN_CHAIN}:={filter_value(group_dn)}))"
        for base in self.person_bases:
            yield from self.directory.search(base, search_filter, attributes)

    def roles(self, entry: dict[str, Any], members: dict[str, set[str]]) -> list[str]:
        """The roles of a person entry read by a full sync (members from membership())."""
        if self.source == "member_of":
            return self._from_member_of(entry)
        if self.source == "groups":
            key = self._member_key(entry)
            return sorted(members.get(key, ())) if key else []
        return []

    def _from_member_of(self, entry: dict[str, Any]) -> list[str]:
        dns = [v.decode("utf-8", "replace") for v in entry["raw_attributes"].get(self.member_of, [])]
        return [role for dn in dns if (role := self._role(dn)) is not None]

    # -- incremental syncs --------------------------------------------------------------------

    def roles_of_changed(self, entry: dict[str, Any]) -> list[str]:
        """The roles of one person entry read by an incremental sync: with source groups, one
        search for the groups naming this person (not a search of every group)."""
        if self.source != "groups":
            return self.roles(entry, {})
        key = self._member_key(entry)
        if key is None:
            return []
        if self.nested:
            condition = f"(member:{IN_CHAIN}:={filter_value(entry['dn'])})"
        elif self.by_user_id:
            condition = f"({self.member_attribute}={filter_value(key)})"
        else:
            condition = f"({self.member_attribute}={filter_value(entry['dn'])})"
        wanted = [] if self.by_dn else [self.name]
        roles = []
        for base in self.base_dns:
            for group in self.directory.search(base, f"(&{self.filter}{condition})", wanted):
                role = self._role(group["dn"], group)
                if role is not None:
                    roles.append(role)
        return roles

    def roles_of_many(self, entries: list[dict[str, Any]]) -> list[list[str]]:
        """The roles of each person entry read by an incremental sync, in order: one search each
        for a few people, the full sync's reading of the groups for many."""
        if self.source == "groups" and len(entries) > SEARCHES_PER_PERSON_UP_TO:
            members = self.membership()
            return [self.roles(entry, members) for entry in entries]
        return [self.roles_of_changed(entry) for entry in entries]

    def changed_groups(self, since: str) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
        """Each group changed since (a filter on the changed attribute) with its current members'
        person entries (attributes: what the store reads of a person). Members added to a group get
        its role at the next incremental sync; see the README for members removed."""
        if self.source is None:
            return
        wanted = [self.changed] + ([] if self.nested or self.source == "member_of" else [self.member_attribute])
        groups = [g for base in self.base_dns for g in self.directory.search(base, f"(&{self.filter}{since})", wanted)]
        for group in groups:
            yield group, list(self._current_members(group))

    def _current_members(self, group: dict[str, Any]) -> Iterator[dict[str, Any]]:
        if self.nested:
            yield from self._transitive_members(group["dn"], self.person_wanted)
            return
        if self.source == "member_of":
            condition = f"({self.member_of}={filter_value(group['dn'])})"
            for base in self.person_bases:
                yield from self.directory.search(base, f"(&{self.person_filter}{condition})", self.person_wanted)
            return
        for value in group["raw_attributes"].get(self.member_attribute, []):
            text = value.decode("utf-8", "replace")
            if self.by_user_id:
                condition = f"({self.user_id}={filter_value(text.strip())})"
                for base in self.person_bases:
                    yield from self.directory.search(base, f"(&{self.person_filter}{condition})", self.person_wanted)
            else:
                yield from self._entry(text.split("#'", 1)[0])

    def _entry(self, dn: str) -> Iterator[dict[str, Any]]:
        """The person entry at dn, if the store selects one there (a member may be a group, be gone,
        or be outside the store's base DNs, where a full sync would not read them either)."""
        key = dn_key(dn)
        if not any(key == base or key.endswith("," + base) for base in map(dn_key, self.person_bases)):
            return
        yield from self.directory.search(dn, self.person_filter, self.person_wanted, scope="BASE",
                                         missing_ok=True)
