"""`mxisd import-config`: a Java mxisd or ma1sd config (`mxisd.yaml`, `ma1sd.yaml`) as a config of ours.

Every key of the old file is accounted for: carried over, or listed with the reason it was not (no
equivalent here, or a key mxisd and ma1sd did not know and ignored silently, such as a typo).
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from indexer.normalize import InvalidAddress, email_domain
from indexer.stores.ldap_mapping import PRESETS
from server.migration import MigrationError
from server.migration.java_keys import MA1SD_ONLY, UNSUPPORTED, known
from server.migration.jdbc import sqlalchemy_url

# mxisd's lookup.recursive.allowedCidr default.
DEFAULT_RECURSION_CIDRS = ["127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "::1/128"]
# mxisd's ldap.attribute.threepid defaults, which the openldap and active_directory presets narrow.
MXISD_LDAP_THREEPIDS = {"email": ["mailPrimaryAddress", "mail", "otherMailbox"],
                        "msisdn": ["telephoneNumber", "mobile", "homePhone", "otherTelephone", "otherMobile",
                                   "otherHomePhone"]}
SMTP_TLS = {0: "none", 1: "starttls", 2: "starttls", 3: "tls"}
LOG_LEVELS = {"trace": "DEBUG", "debug": "DEBUG", "info": "INFO", "warn": "WARNING", "warning": "WARNING",
              "error": "ERROR"}

def _dotted(path: tuple[str, ...]) -> str:
    return ".".join(path)


def _leaves(node: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if isinstance(node, dict) and node:
        return [leaf for key, value in node.items() for leaf in _leaves(value, (*path, str(key)))]
    return [path]


@dataclass
class OldConfig:
    """The old file, with the keys read so far marked, and the notes on keys not carried over."""

    data: dict[str, Any]
    base: Path
    read: set[tuple[str, ...]] = field(default_factory=set)
    taken: set[tuple[str, ...]] = field(default_factory=set)
    notes: dict[str, str] = field(default_factory=dict)

    def get(self, dotted: str, default: Any = None) -> Any:
        """The value at a dotted path (marked as read; a mapping's keys are not), else default."""
        path = tuple(dotted.split("."))
        node: Any = self.data
        for name in path:
            if not isinstance(node, dict) or name not in node:
                return default
            node = node[name]
        self.read.add(path)
        return default if node is None else node

    def integer(self, dotted: str, default: int) -> int:
        """The whole number at a dotted path, else default; anything else is named in an error."""
        value = self.get(dotted, default)
        if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().isdigit():
            raise MigrationError(f"{dotted}: expected a whole number, got {value!r}")
        return int(value)

    def has(self, dotted: str) -> bool:
        node: Any = self.data
        for name in dotted.split("."):
            if not isinstance(node, dict) or name not in node:
                return False
            node = node[name]
        return True

    def note(self, dotted: str, reason: str) -> None:
        """dotted (and all under it) is not carried over, for this reason."""
        self.taken.add(tuple(dotted.split(".")))
        self.notes[dotted] = reason

    def unread(self) -> list[str]:
        def covered(leaf: tuple[str, ...]) -> bool:
            return leaf in self.read or any(leaf[:i] in self.taken for i in range(1, len(leaf) + 1))

        return [_dotted(leaf) for leaf in _leaves(self.data) if leaf and not covered(leaf)]


def _read_old(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MigrationError("file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MigrationError(f"cannot read it: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise MigrationError(f"not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise MigrationError(f"expected an mxisd or ma1sd config (a mapping of keys), got {type(data).__name__}")
    return data


def read_old_config(path: str | Path) -> tuple[dict[str, Any], Path]:
    """An mxisd or ma1sd YAML file and the folder its relative paths are taken from."""
    location = Path(path)
    try:
        return _read_old(location), location.resolve().parent
    except MigrationError as exc:
        raise MigrationError(f"{location}: {exc}") from None


def _flavour(old: OldConfig, path: Path) -> str:
    if "ma1sd" in path.name or any(old.has(key) for key in MA1SD_ONLY):
        return "ma1sd"
    return "mxisd"


def _file(old: OldConfig, key: str) -> str | None:
    """A template or page path, made absolute; None for mxisd's built-in ones and for a file not
    readable here (noted: the shipped one is used until it is copied over)."""
    value = old.get(key)
    if not isinstance(value, str) or not value or value.startswith("classpath:"):
        return None
    path = Path(value) if os.path.isabs(value) else old.base / value
    if not os.access(path, os.R_OK):
        old.notes[key] = f"cannot read {path} here: the shipped template is used until it is copied over"
        return None
    return str(path)


def _bool(value: Any, default: bool) -> bool:
    return value if isinstance(value, bool) else default


def _server(old: OldConfig, out: dict[str, Any], domain: str) -> None:
    server: dict[str, Any] = {}
    name = old.get("server.name") or domain
    server["name"] = name
    public_url = old.get("server.publicUrl") or f"https://{name}"
    server["public_url"] = str(public_url).replace("%SERVER_NAME%", name)
    # mxisd listened on every interface.
    server["bind"] = old.get("server.hostname") or "0.0.0.0"
    server["port"] = old.integer("server.port", 8090)
    out["server"] = server


_MEDIUM = re.compile(r"[a-z][a-z0-9_.-]{0,31}")
_ATTRIBUTE = re.compile(r"[A-Za-z][A-Za-z0-9-]*")
_LANGUAGE = re.compile(r"[a-z]{2,3}([_-][A-Za-z0-9]{2,8})*")


def _enabled(old: OldConfig, root: str) -> bool:
    """Whether a store section is to be imported: unless `enabled: false`; without `enabled` too, but
    saying so, as the Java servers left a section without it unused."""
    enabled = old.get(f"{root}.enabled")
    if enabled is False:
        old.note(root, "disabled in the old config")
        return False
    if enabled is None:
        old.notes[f"{root}.enabled"] = ("not set, so the old server did not use this section: imported all the "
                                        "same (remove the store if it should not be read)")
    return True


def _ldap(old: OldConfig, root: str) -> dict[str, Any] | None:
    if not old.has(root):
        return None
    if not _enabled(old, root):
        return None
    host = old.get(f"{root}.connection.host")
    configured = old.get(f"{root}.connection.baseDNs") or []
    bases = [configured] if isinstance(configured, str) else list(configured)
    legacy = old.get(f"{root}.connection.baseDn")
    if legacy and legacy not in bases:
        bases.append(legacy)
    if not host or not bases:
        old.note(root, "no connection.host or no base DN: the directory cannot be imported")
        return None
    tls = old.get(f"{root}.connection.tls") is True
    store: dict[str, Any] = {"name": root, "kind": "ldap"}
    uid_value = old.get(f"{root}.attribute.uid.value", "saMAccountName")
    active_directory = root == "ldap" and (
        old.get("ldap.activeDirectory") is True or str(uid_value).lower() in ("samaccountname", "userprincipalname"))
    preset = "active_directory" if active_directory else "openldap"
    store["preset"] = preset
    store["uri"] = f"{'ldaps' if tls else 'ldap'}://{host}:{old.integer(f'{root}.connection.port', 389)}"
    bind_dn, bind_password = old.get(f"{root}.connection.bindDn"), old.get(f"{root}.connection.bindPassword")
    if bind_dn and bind_password:
        store["bind"] = {"dn": str(bind_dn), "password": str(bind_password)}
    elif bind_dn:
        old.notes[f"{root}.connection.bindDn"] = "a bind DN without a password: the directory is read anonymously"
    store["base_dns"] = [str(b) for b in bases]
    extra = old.get(f"{root}.filter")
    if extra and extra != PRESETS[preset]["filter"]:
        store["filter"] = f"(&{PRESETS[preset]['filter']}{extra})"
    for feature in ("auth", "directory", "identity", "profile"):
        own = old.get(f"{root}.{feature}.filter")
        if own and own != extra:
            old.notes[f"{root}.{feature}.filter"] = (
                "one filter selects the people for every purpose here (the preset's, with ldap.filter)")
    attributes: dict[str, Any] = {}
    uid_type = old.get(f"{root}.attribute.uid.type", "uid")
    attributes["user_id_type"] = "mxid" if uid_type == "mxid" else "localpart"
    attributes["user_id"] = "sAMAccountName" if str(uid_value).lower() == "samaccountname" else str(uid_value)
    name = old.get(f"{root}.attribute.name")
    if name:
        attributes["display_name"] = [str(name)]
    threepids = old.get(f"{root}.attribute.threepid")
    if isinstance(threepids, dict):
        attributes["threepids"] = {}
        for medium in threepids:
            key = f"{root}.attribute.threepid.{medium}"
            names = [str(a) for a in old.get(key, [])]
            if not _MEDIUM.fullmatch(str(medium)) or not all(_ATTRIBUTE.fullmatch(a) for a in names):
                old.notes[key] = "not a 3PID medium name and LDAP attribute names this server takes"
                continue
            attributes["threepids"][str(medium)] = names
    else:
        old.notes[f"{root}.attribute.threepid"] = (
            "not set: mxisd read " + "; ".join(f"{m}: {', '.join(a)}" for m, a in MXISD_LDAP_THREEPIDS.items())
            + f"; the {preset} preset reads mail, telephoneNumber and mobile: list the others under "
            "attributes.threepids if your entries use them")
    store["attributes"] = attributes
    if root == "netiq":
        old.notes["netiq"] = "read as an LDAP directory (openldap preset, user ids lower-cased as NetIQ's were)"
    for key, reason in (
            ("defaultDomain", "userPrincipalName: the part before @ is the localpart, whatever the domain"),
            ("identity.token", "3PIDs are looked up in the cache, not with per-medium LDAP queries"),
            ("identity.medium", "3PIDs are looked up in the cache, not with per-medium LDAP queries"),
            ("identity.lookup", "every entry is in the cache and its hashes: v2 lookups need nothing more"),
            ("directory.attribute.other", "directory search matches display names, localparts and (with "
                                          "directory.threepids) 3PIDs")):
        if old.has(f"{root}.{key}"):
            old.note(f"{root}.{key}", reason)
    return store


def _concat_plus(kind: str, column: str) -> str:
    return f"CONCAT('+', {column})" if kind in ("mysql", "mariadb") else f"'+' || {column}"


def _address(kind: str, medium: str, address: str) -> str:
    # Matrix-style msisdns are digits without "+", which the sql store would read as national numbers.
    return f"CASE WHEN {medium} = 'msisdn' THEN {_concat_plus(kind, address)} ELSE {address} END"


def _identities_from_lookup(query: str, kind: str) -> str:
    """ma1sd's lookup.query (rows of mxid, medium, address) as our identities query."""
    return (f"SELECT t.mxid AS id, t.mxid AS user_id, NULL AS display_name, t.medium, "
            f"{_address(kind, 't.medium', 't.address')} AS address FROM ({query}) t")


_IDENTITY_QUERY = re.compile(r"\s*SELECT\s+(?P<select>.+?)\s+FROM\s+(?P<rest>.+?)\s*;?\s*", re.I | re.S)
_UID_COLUMN = re.compile(r"(?:^|,)\s*(?P<expr>[\w.\"`]+)\s+(?:AS\s+)?uid\s*(?:,|$)|(?:^|,)\s*(?P<bare>uid)\s*(?:,|$)",
                         re.I)
_PARAMETER = re.compile(r"(?P<column>[\w.\"`]+)\s*=\s*\?")


def _identities_from_single(query: str, kind: str) -> str | None:
    """mxisd's identity.query (a uid for `medium = ? AND address = ?`) turned into a query of every
    row it could have answered; None when its shape is not that simple."""
    match = _IDENTITY_QUERY.fullmatch(query)
    if not match:
        return None
    uid = _UID_COLUMN.search(match["select"])
    parameters = list(_PARAMETER.finditer(match["rest"]))
    if uid is None or len(parameters) != 2 or match["rest"].count("?") != 2:
        return None
    expr = uid["expr"] or uid["bare"]
    medium, address = parameters[0]["column"], parameters[1]["column"]
    rest = _PARAMETER.sub("1 = 1", match["rest"])
    return (f"SELECT {expr} AS id, {expr} AS user_id, NULL AS display_name, {medium} AS medium, "
            f"{_address(kind, medium, address)} AS address FROM {rest}")


def _sql(old: OldConfig, root: str, flavour: str) -> dict[str, Any] | None:
    if not old.has(root):
        return None
    if not _enabled(old, root):
        return None
    kind, connection = old.get(f"{root}.type"), old.get(f"{root}.connection")
    if not isinstance(kind, str) or not isinstance(connection, str):
        old.note(root, "no type or connection: the database cannot be imported")
        return None
    try:
        url, unused = sqlalchemy_url(kind, connection, base=old.base)
    except MigrationError as exc:
        old.note(root, f"{exc}: the database cannot be imported")
        return None
    if unused:
        old.notes[f"{root}.connection"] = f"JDBC parameters not carried over: {', '.join(unused)}"
    store: dict[str, Any] = {"name": "synapse" if root == "synapseSql" else "sql", "kind": "sql", "url": url}
    if root == "synapseSql":
        store["preset"] = "synapse"
        if old.has(f"{root}.profile.role"):
            old.note(f"{root}.profile.role", "Synapse's roles were its communities (group_users), which Synapse "
                                             "removed in 1.62: write a roles query under queries if another table "
                                             "holds roles (README: Roles)")
        for key in ("identity", "directory", "profile", "lookup", "legacyRoomNames"):
            if old.has(f"{root}.{key}"):
                old.note(f"{root}.{key}", "the synapse preset reads Synapse's current schema; its queries can be "
                                          "replaced under queries")
        for feature in ("auth", "directory", "identity", "profile"):
            old.get(f"{root}.{feature}.enabled")
        return store
    if old.get(f"{root}.identity.enabled") is False:
        old.note(root, "identity lookups are off: a sql store here is there to be looked up")
        return None
    lookup = old.get(f"{root}.lookup.query")
    default_table = "user_threepid_id_server" if flavour == "ma1sd" else "user_threepids"
    single = old.get(f"{root}.identity.query",
                     f"SELECT user_id AS uid FROM {default_table} WHERE medium = ? AND address = ?")
    identities = _identities_from_lookup(lookup, kind) if lookup else _identities_from_single(single, kind)
    if identities is None:
        old.note(root, "identity.query is not of the shape SELECT <uid> AS uid FROM ... WHERE <medium> = ? AND "
                       "<address> = ?: write the store's identities query by hand (README: The sql store)")
        return None
    store["queries"] = {"identities": identities}
    # The identities query's id is the user id of lookup.query (a Matrix ID) or identity.query's uid.
    id_type = "mxid" if lookup else str(old.get(f"{root}.identity.type", "mxid"))
    _roles(old, root, id_type, store["queries"])
    for key in ("identity.medium", "directory.query", "profile.displayName", "profile.threepid"):
        if old.has(f"{root}.{key}"):
            old.note(f"{root}.{key}", "not carried over: add display names to the store's identities query; "
                                      "directory search and profiles are answered from the cache")
    for feature in ("auth", "directory", "profile"):
        old.get(f"{root}.{feature}.enabled")
    return store


_ROLE_COLUMN = re.compile(r"(?P<distinct>DISTINCT\b\s*)?(?P<expr>[^,]+?)(?:\s+(?:AS\s+)?\w+)?", re.I | re.S)


def _roles(old: OldConfig, root: str, id_type: str, queries: dict[str, str]) -> None:
    """mxisd's profile.role.query (the roles of one user, `<column> = ?`) as our roles query of
    every person's roles, when its shape is that simple and its ? is the identities query's id."""
    query = old.get(f"{root}.profile.role.query")
    if not isinstance(query, str):
        return
    role_type = str(old.get(f"{root}.profile.role.type", id_type))
    match = _IDENTITY_QUERY.fullmatch(query)
    parameters = list(_PARAMETER.finditer(match["rest"])) if match else []
    column = _ROLE_COLUMN.fullmatch(match["select"].strip()) if match else None
    if match is None or column is None or len(parameters) != 1 or match["rest"].count("?") != 1:
        old.note(f"{root}.profile.role", "profile.role.query is not of the shape SELECT <role> FROM ... WHERE "
                                         "<user column> = ?: write the store's roles query by hand (README: Roles)")
        return
    if role_type != id_type:
        old.note(f"{root}.profile.role", f"profile.role.query is given a {role_type} where the store's records are "
                                         f"keyed by {id_type}: write the store's roles query by hand (README: Roles)")
        return
    rest = _PARAMETER.sub("1 = 1", match["rest"])
    distinct = "DISTINCT " if column["distinct"] else ""
    queries["roles"] = f"SELECT {distinct}{parameters[0]['column']} AS id, {column['expr'].strip()} AS role FROM {rest}"


def _rest(old: OldConfig) -> dict[str, Any] | None:
    if not old.has("rest"):
        return None
    if not _enabled(old, "rest"):
        return None
    host = old.get("rest.host")
    if not isinstance(host, str) or not re.match(r"https?://", host):
        old.note("rest", "rest.host is not an http(s) URL: the web application cannot be imported")
        return None
    endpoints: dict[str, Any] = {}
    for ours, theirs in (("auth", "auth"), ("lookup", "identity.single")):
        if old.has(f"rest.endpoints.{theirs}"):
            endpoints[ours] = old.get(f"rest.endpoints.{theirs}") or None
    for key, reason in (
            ("identity.bulk", "bulk lookups ask the lookup endpoint once per address (read-through)"),
            ("directory", "a store that cannot list its people is not searched: add an enumerate endpoint "
                          "(README: The rest store)"),
            ("profile.roles", "roles are synced, not asked per user: add an enumerate endpoint whose people carry "
                              "their roles (README: The rest store, Roles)"),
            ("profile", "profiles are answered from the cache")):
        if old.has(f"rest.endpoints.{key}"):
            old.note(f"rest.endpoints.{key}", reason)
    return {"name": "rest", "kind": "rest", "url": host.rstrip("/"), "endpoints": endpoints}


def _email(old: OldConfig, out: dict[str, Any]) -> None:
    root = "threepid.medium.email"
    connector = old.get(f"{root}.connector", "smtp")
    if connector != "smtp":
        old.note(f"{root}.connector", f"the {connector} connector is not supported, only smtp")
    smtp = {key: old.get(f"{root}.connectors.smtp.{key}") for key in ("host", "login", "password")}
    sender = old.get(f"{root}.identity.from")
    if not smtp["host"] or not sender:
        if old.has(root):
            old.note(root, "no SMTP host or no identity.from: email is not set up (requestToken for email "
                           "answers M_EMAIL_SEND_ERROR)")
        return
    tls = old.integer(f"{root}.connectors.smtp.tls", 1)
    if tls == 1:
        old.notes[f"{root}.connectors.smtp.tls"] = "1 (STARTTLS when offered) became starttls: required here"
    email: dict[str, Any] = {"from": str(sender), "from_name": str(old.get(f"{root}.identity.name", ""))}
    email["smtp"] = {"host": str(smtp["host"]), "port": old.integer(f"{root}.connectors.smtp.port", 587),
                     "tls": SMTP_TLS.get(tls, "starttls"), "login": smtp["login"] or None,
                     "password": smtp["password"] or None}
    templates = f"{root}.generators.template"
    email["templates"] = {"invite": _file(old, f"{templates}.invite"),
                          "validation": _file(old, f"{templates}.session.validation")}
    for key in ("session.unbind", "generic"):
        if old.has(f"{templates}.{key}"):
            old.note(f"{templates}.{key}", "this message is never sent here")
    register_url = old.get(f"{templates}.placeholder.REGISTER_URL") or old.get(f"{templates}.placeholder.register_url")
    if register_url:
        out.setdefault("invites", {})["register_url"] = str(register_url)
    generator = old.get(f"{root}.generator", "template")
    if generator != "template":
        old.note(f"{root}.generator", f"the {generator} generator is not supported, only templates")
    out["email"] = email


def _sms(old: OldConfig, out: dict[str, Any]) -> None:
    root = "threepid.medium.msisdn"
    connector = old.get(f"{root}.connector", "twilio")
    twilio = {key: old.get(f"{root}.connectors.twilio.{key}") for key in ("account_sid", "auth_token", "number")}
    if connector != "twilio" or not all(twilio.values()):
        if old.has(root):
            old.note(root, "no complete Twilio connector (account_sid, auth_token, number): SMS is not set up")
        return
    out["sms"] = {"twilio": {k: str(twilio[k]) for k in ("account_sid", "auth_token", "number")},
                  "templates": {"validation": _file(old, f"{root}.generators.template.session.validation"),
                                "invite": _file(old, f"{root}.generators.template.invite")}}
    old.get(f"{root}.generator")
    for key in ("session.unbind", "generic"):
        if old.has(f"{root}.generators.template.{key}"):
            old.note(f"{root}.generators.template.{key}", "this message is never sent here")


def _recursion(old: OldConfig, out: dict[str, Any]) -> None:
    recursion: dict[str, Any] = {}
    if old.get("lookup.recursive.enabled", True) is not False:
        recursion["allow"] = [str(c) for c in old.get("lookup.recursive.allowedCidr", DEFAULT_RECURSION_CIDRS)]
        old.notes["lookup.recursive.enabled"] = (
            "recursion.allow is lookup.recursive.allowedCidr (or mxisd's default networks); mxisd believed any "
            "X-Forwarded-For: list your reverse proxies under recursion.proxies")
    servers = old.get("matrix.identity.servers") or {"matrix-org": ["https://matrix.org"]}
    forwarders = []
    for label in old.get("forward.servers", []) or []:
        urls = old.get(f"matrix.identity.servers.{label}") or (servers.get(label) if isinstance(servers, dict)
                                                               else None)
        if not urls:
            old.notes[f"forward.servers.{label}"] = "names no matrix.identity.servers entry"
        forwarders += [str(u).rstrip("/") for u in urls or []]
    if forwarders:
        recursion["forwarders"] = forwarders
    if old.get("lookup.recursive.bridge.enabled") is True:
        fallback = old.get("lookup.recursive.bridge.server")
        mappings = {medium: old.get(f"lookup.recursive.bridge.mappings.{medium}")
                    for medium in old.get("lookup.recursive.bridge.mappings", {}) or {}}
        bridges = {medium: str(mappings.get(medium) or fallback) for medium in ("email", "msisdn")
                   if mappings.get(medium) or fallback}
        if bridges:
            recursion["bridges"] = bridges
        for medium in set(mappings) - {"email", "msisdn"}:
            old.notes[f"lookup.recursive.bridge.mappings.{medium}"] = "only email and msisdn can be bridged"
        if old.get("lookup.recursive.bridge.recursiveOnly") is False:
            old.notes["lookup.recursive.bridge.recursiveOnly"] = (
                "bridges are asked only for clients that may recurse (recursion.allow)")
    else:
        old.get("lookup.recursive.bridge")
    out["recursion"] = recursion


def _homeserver(old: OldConfig, out: dict[str, Any]) -> None:
    client = old.get("dns.overwrite.homeserver.client", []) or []
    if client:
        first = client[0] if isinstance(client[0], dict) else {}
        if first.get("value"):
            out["homeserver"] = {"url": str(first["value"]).rstrip("/")}
        if len(client) > 1:
            old.notes["dns.overwrite.homeserver.client"] = (
                f"one homeserver here: {first.get('value')} (the first entry) is used")
    federation = old.get("dns.overwrite.homeserver.federation", []) or []
    overrides = {}
    for entry in federation:
        if isinstance(entry, dict) and entry.get("name") and entry.get("value"):
            value = str(entry["value"])
            overrides[str(entry["name"])] = urlsplit(value).netloc if "://" in value else value
    if overrides:
        out["federation"] = {"overrides": overrides}
        old.notes["dns.overwrite.homeserver.federation"] = (
            "carried to federation.overrides; a homeserver on a private network also needs "
            "federation.allow_private_networks")


def _invites(old: OldConfig, out: dict[str, Any]) -> None:
    invites = out.setdefault("invites", {})
    if old.get("invite.expiration.enabled", True) is False:
        invites["expire_after"] = "3650d"
        old.notes["invite.expiration.enabled"] = "invites cannot be kept forever here: they expire after 10 years"
    elif old.has("invite.expiration.after"):
        invites["expire_after"] = f"{old.integer('invite.expiration.after', 10080)}m"
    if old.has("invite.resolution.timer"):
        unit = "s" if old.get("invite.resolution.period") == "seconds" else "m"
        invites["check_every"] = f"{old.integer('invite.resolution.timer', 5)}{unit}"
    for key, reason in (
            ("invite.expiration.resolveTo", "an expired invite is forgotten, not resolved to a user"),
            ("invite.fullDisplayName", "the display name of an invite is always the redacted address"),
            ("invite.resolution.recursive", "pending invites are checked against the cache (what recursive "
                                            "lookups found is in it)")):
        if old.has(key):
            old.note(key, reason)
    if not invites:
        del out["invites"]


def _invite_policy(old: OldConfig, out: dict[str, Any]) -> None:
    roles = old.get("invite.policy.ifSender.hasRole", []) or []
    roles = [str(role) for role in (roles if isinstance(roles, list) else [roles]) if str(role)]
    if roles:
        out.setdefault("invites", {})["policy"] = {"senders": {"roles": roles}}
        old.notes["invite.policy.ifSender.hasRole"] = (
            "carried to invites.policy.senders.roles, enforced when the reverse proxy sends room invites here "
            "(docs/synapse.md); roles come from the stores (LDAP groups too, which mxisd never read): check the names")


_DOMAIN_ENTRY = re.compile(r"[*.]?[^\s@*.][^\s@*]*")


def _usable(kind: str, entry: str) -> bool:
    """Whether a whitelist or blacklist entry is one our schema takes (a regular expression Python
    compiles, or a domain entry)."""
    try:
        if kind == "pattern":
            re.compile(entry)
        elif not _DOMAIN_ENTRY.fullmatch(entry):
            return False
        else:
            email_domain(entry.lstrip("*."))
    except (re.error, InvalidAddress):
        return False
    return True


def _registration(old: OldConfig, out: dict[str, Any]) -> None:
    """register.policy as registration.policy. mxisd let an address through when invited (if
    register.policy.invite), else refused it on a blacklist, let it through on a whitelist, else
    answered register.policy.allowed; here deny lists come first (README: Registration and invite
    policies), the rest maps onto allowed, invite_only and the allow lists."""
    if not old.has("register"):
        return
    allowed = _bool(old.get("register.policy.allowed"), False)
    invite = _bool(old.get("register.policy.invite"), True)
    lists: dict[str, dict[str, dict[str, list[str]]]] = {}
    for medium in old.get("register.policy.threepid", {}) or {}:
        root = f"register.policy.threepid.{medium}"
        if medium not in ("email", "msisdn"):
            old.note(root, "registration policies are for email and msisdn only")
            continue
        for kind, ours in (("pattern", "patterns"), ("domain", "domains")):
            for theirs, which in (("whitelist", "allow"), ("blacklist", "deny")):
                key = f"{root}.{kind}.{theirs}"
                values = old.get(key, []) or []
                values = [str(v) for v in (values if isinstance(values, list) else [values])]
                if values and kind == "domain" and medium == "msisdn":
                    old.note(key, "phone numbers have no domain")
                    continue
                kept = [v for v in values if _usable(kind, v)]
                if len(kept) < len(values):
                    old.notes[key] = "left out, not a valid " + ("regular expression" if kind == "pattern" else
                                                                "domain entry") + ": " + ", ".join(
                        repr(v) for v in values if v not in kept)
                if kept:
                    lists.setdefault(medium, {}).setdefault(ours, {})[which] = kept
    allow_lists = {m: any("allow" in lists.get(m, {}).get(k, {}) for k in ("patterns", "domains"))
                   for m in ("email", "msisdn")}
    policy: dict[str, Any] = {}
    if allowed:
        if any(allow_lists.values()):
            old.notes["register.policy.allowed"] = (
                "true: every address not blacklisted could register, so the whitelists changed nothing and are "
                "left out")
            for rules in lists.values():
                for kind_lists in rules.values():
                    kind_lists.pop("allow", None)
    elif invite:
        policy["invite_only"] = True
    elif not any(allow_lists.values()):
        policy["allowed"] = False
    else:
        for medium, listed in allow_lists.items():
            if not listed:  # mxisd refused every address of a medium without a whitelist
                lists.setdefault(medium, {}).setdefault("patterns", {}).setdefault("deny", []).append(".*")
                old.notes[f"register.policy.threepid.{medium}"] = (
                    f"no whitelist: {medium} registration was closed, and is here by the deny pattern '.*'")
    if invite and not allowed and any("deny" in k for rules in lists.values() for k in rules.values()):
        old.notes["register.policy.invite"] = (
            "an invited address on a blacklist could register with mxisd; here the deny lists win over invites")
    policy.update({medium: {kind: values for kind, values in rules.items() if values}
                   for medium, rules in lists.items() if any(rules.values())})
    if policy:
        out["registration"] = {"policy": policy}
    old.notes.setdefault("register", "enforced only when the reverse proxy sends register requestToken here "
                                     "(docs/synapse.md, sections 4 and 8)")


def _terms(old: OldConfig, out: dict[str, Any]) -> None:
    policies = old.get("policy.policies", {}) or {}
    converted: dict[str, Any] = {}
    for name in policies:
        root = f"policy.policies.{name}"
        entry: dict[str, Any] = {"version": str(old.get(f"{root}.version", ""))}
        for language in old.get(f"{root}.terms", {}) or {}:
            entry[str(language)] = {key: str(old.get(f"{root}.terms.{language}.{key}", "")) for key in ("name", "url")}
        complete = [term for language, term in entry.items() if language != "version" and _LANGUAGE.fullmatch(language)
                    and term["name"] and re.fullmatch(r"https?://\S+", term["url"])]
        if not entry["version"] or len(complete) != len(entry) - 1 or not complete:
            old.notes[root] = "a policy needs a version and, per language, a name and an http(s) URL: left out"
            continue
        converted[str(name)] = entry
        if old.get(f"{root}.regexp"):
            old.notes[f"policy.policies.{name}.regexp"] = (
                "a policy applies to every v2 endpoint except account and terms")
    if converted:
        out["terms"] = {"policies": converted}


def _sessions(old: OldConfig, out: dict[str, Any]) -> None:
    pages = {}
    for ours in ("success", "failure"):
        key = f"view.session.onTokenSubmit.{ours}"
        legacy = f"view.session.local.onTokenSubmit.{ours}"
        page = _file(old, key) or _file(old, legacy)
        if page:
            pages[ours] = page
    if pages:
        out["sessions"] = {"pages": pages}
    policy = _session_policy(old, out)
    if policy:
        out.setdefault("sessions", {})["policy"] = policy


# What mxisd 1.2's validation sessions did for local and remote 3PIDs, and ma1sd's on/off switch,
# as sessions.policy (mxisd had one policy for every medium).
HISTORICAL = "session.policy.validation"


def _session_policy(old: OldConfig, out: dict[str, Any]) -> dict[str, Any]:
    rules: dict[str, Any] = {}
    if not _bool(old.get(f"{HISTORICAL}.enabled", True), True):
        rules["enabled"] = False
    for kind in ("local", "remote"):
        root = f"{HISTORICAL}.for{kind.capitalize()}"
        ignored = " (mxisd 1.3 and later ignored this key: check that it still says what you want)"
        if not _bool(old.get(f"{root}.enabled", True), True):
            rules[kind] = "deny"
            old.notes[f"{root}.enabled"] = f"carried over as sessions.policy.<medium>.{kind}: deny{ignored}"
        if not _bool(old.get(f"{root}.toLocal", True), True):
            rules[kind] = "deny"
            old.notes[f"{root}.toLocal"] = (
                f"carried over as sessions.policy.<medium>.{kind}: deny: validation by another identity server "
                f"(toRemote) is not offered here{ignored}")
        if old.has(f"{root}.toRemote"):
            old.note(f"{root}.toRemote", "validation by another identity server (remote sessions) is not offered "
                                         "here: only this server validates 3PIDs")
            if kind == "local" and old.get(f"{root}.toRemote.enabled") is False:
                # Local 3PIDs never went to a central identity server: their binds stay inside.
                out.setdefault("lookup", {})["share_binds"] = False
                old.notes[f"{root}.toRemote"] += (
                    "; toRemote.enabled: false is carried over as lookup.share_binds: false (binds of local "
                    "addresses are not answered to other servers)")
    return {medium: dict(rules) for medium in ("email", "msisdn")} if rules else {}


def _storage(old: OldConfig, out: dict[str, Any]) -> None:
    backend = old.get("storage.backend", "sqlite")
    if backend == "postgresql":
        settings = {key: old.get(f"storage.provider.postgresql.{key}") for key in ("database", "username", "password")}
        url, _ = sqlalchemy_url("postgresql", str(settings["database"] or ""), settings["username"],
                                settings["password"])
        out["storage"] = {"url": url}
        old.notes["storage.backend"] = (
            "our tables live beside ma1sd's in the same database (no name is shared); `mxisd import-data` copies "
            "its invites, accounts, terms and sessions; the pool settings are not needed")
    elif old.has("storage.provider.sqlite.database"):
        old.note("storage.provider.sqlite.database", "read by `mxisd import-data`; our own SQLite is in data_dir")
    if old.has("key.path"):
        old.note("key.path", "taken over by `mxisd import-data` into data_dir/keys/signing.key")


def _rest_of(old: OldConfig, out: dict[str, Any]) -> None:
    directory: dict[str, Any] = {}
    if old.has("directory.exclude.homeserver"):
        directory["homeserver"] = not _bool(old.get("directory.exclude.homeserver"), False)
    if old.has("directory.exclude.threepid"):
        directory["threepids"] = not _bool(old.get("directory.exclude.threepid"), False)
    else:
        old.notes["directory.exclude.threepid"] = (
            "not set: mxisd searched 3PIDs too; here directory.threepids is off unless set to true")
    if directory:
        out["directory"] = directory
    if old.get("accountConfig.allowOnlyTrustDomains") is False:
        out["accounts"] = {"homeservers": ["*"]}
    if old.get("lookup.bulk.enabled") is False:
        old.notes["lookup.bulk.enabled"] = "bulk lookups cannot be turned off (lookup.bulk_max limits them)"
    for key in ("matrix.v1", "matrix.v2"):
        if old.get(key) is False:
            old.notes[key] = "v1 and v2 are both always served"
    app, root = old.get("logging.app"), old.get("logging.root")
    level = app or root
    if isinstance(level, str) and level.lower() in LOG_LEVELS:
        out["log_level"] = LOG_LEVELS[level.lower()]
    if old.get("logging.requests") is True:
        out["server"]["access_log"] = True
        old.notes["logging.requests"] = "server.access_log logs one line per request, not whole requests"
    for prefix, reason in UNSUPPORTED.items():
        if old.has(prefix):
            old.note(prefix, reason)


def convert(path: str | Path, data_dir: str) -> tuple[dict[str, Any], OldConfig, str]:
    """Our config for the mxisd or ma1sd file at path, the old file with its notes, and its flavour."""
    location = Path(path)
    try:
        return _convert(location, data_dir)
    except MigrationError as exc:
        raise MigrationError(f"{location}: {exc}") from None
    except (TypeError, AttributeError) as exc:
        # A section that mxisd would have refused (a list where a mapping belongs, and so on).
        raise MigrationError(f"{location}: a value of an unexpected type: {exc}") from None


def _convert(location: Path, data_dir: str) -> tuple[dict[str, Any], OldConfig, str]:
    old = OldConfig(_read_old(location), location.resolve().parent)
    flavour = _flavour(old, location)
    domain = old.get("matrix.domain")
    if not isinstance(domain, str) or not domain:
        raise MigrationError("has no matrix.domain: not an mxisd or ma1sd config")
    out: dict[str, Any] = {"matrix": {"domain": domain}}
    _server(old, out, domain)
    out["data_dir"] = data_dir
    stores = [_ldap(old, "ldap"), _ldap(old, "netiq"), _sql(old, "sql", flavour), _sql(old, "synapseSql", flavour),
              _rest(old)]
    out["stores"] = [store for store in stores if store is not None]
    if not out["stores"]:
        why = "; ".join(f"{key}: {old.notes[key]}" for key in ("ldap", "netiq", "sql", "synapseSql", "rest")
                        if key in old.notes)
        raise MigrationError("no identity store could be carried over (ldap, netiq, sql, synapseSql or rest), and "
                             "this server needs one" + (f": {why}" if why else ""))
    _storage(old, out)
    _homeserver(old, out)
    _recursion(old, out)
    _invites(old, out)
    _invite_policy(old, out)
    _registration(old, out)
    _email(old, out)
    _sms(old, out)
    _sessions(old, out)
    _terms(old, out)
    _rest_of(old, out)
    for key in old.unread():
        old.notes[key] = ("not carried over: no equivalent here" if known(key) else
                          f"not a key {flavour} knows: it ignored it silently (a typo?)")
    return out, old, flavour


def render(config: dict[str, Any], old: OldConfig, source: Path, flavour: str) -> str:
    """The config as YAML, after a comment block listing what was not carried over and why."""
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# Imported from {source} ({flavour}) by `mxisd import-config` on {when}.",
             "# Every key is described in schemas/config.schema.json and the README's Configuration section."]
    if old.notes:
        lines.append("#\n# Not carried over, or carried over with a difference:")
        lines += [f"#   {key}: {reason}" for key, reason in sorted(old.notes.items())]
    body = yaml.safe_dump(config, sort_keys=False, allow_unicode=True, default_flow_style=False)
    return "\n".join(lines) + "\n\n" + body
