"""`mxisd import-data`: a Java mxisd's or ma1sd's signing key and database, taken over.

The long-term key is written as ours with its serial kept (so its key id and every signature made
with it stay as they were); from the database (SQLite or PostgreSQL, tables as ORMLite made them:
`invite_3pid`, `session_3pid`, and ma1sd's `account` and `accepted`) the pending invites, the v2
accounts still valid, their accepted terms and the validation sessions still open are copied into
our storage. What is there already is left as it is, so a second run changes nothing.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from signedjson.key import encode_verify_key_base64, generate_signing_key, get_verify_key
from signedjson.types import SigningKey

from indexer.normalize import InvalidAddress
from indexer.normalize import email as canonical_email
from indexer.normalize import msisdn as canonical_msisdn
from indexer.settings import Config
from server.migration import MigrationError
from server.migration.jdbc import sqlalchemy_url
from server.migration.keyfile import OldKeys, read_old_keys
from server.signing import key_path, read_signing_key, write_signing_key
from server.storage import Storage, StorageError, now_ms, token_hash

OLD_TABLES = ("invite_3pid", "session_3pid", "account", "accepted")
# Timestamps below this are seconds, above it milliseconds (10^11 s is the year 5138).
_SECONDS_BELOW = 10**11


@dataclass
class Kind:
    """What became of the rows of one kind."""

    name: str
    read: int = 0
    imported: int = 0
    present: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    notes: Counter[str] = field(default_factory=Counter)

    def line(self) -> str:
        parts = [f"{self.imported} imported"]
        if self.present:
            parts.append(f"{self.present} already there")
        parts += [f"{count} skipped ({reason})" for reason, count in sorted(self.skipped.items())]
        parts += [f"{count} {note}" for note, count in sorted(self.notes.items())]
        return f"{self.name}: {self.read} read, " + ", ".join(parts)


@dataclass
class Report:
    key: str | None = None
    key_changed: bool = False
    kinds: list[Kind] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return self.key_changed or any(kind.imported for kind in self.kinds)

    def lines(self) -> list[str]:
        out = [self.key] if self.key else []
        out += [kind.line() for kind in self.kinds]
        out.append("done" if self.changed else "nothing changed: everything was imported before")
        return out


def _get(node: Any, *path: str) -> Any:
    for name in path:
        if not isinstance(node, dict):
            return None
        node = node.get(name)
    return node


def old_key_path(old: dict[str, Any], base: Path) -> str | None:
    """The key store an mxisd or ma1sd config names (None for an in-memory one)."""
    path = _get(old, "key", "path")
    if not isinstance(path, str) or not path:
        raise MigrationError("the old config has no key.path")
    return None if path == ":memory:" else str(base / path)


def old_database_url(old: dict[str, Any], base: Path) -> str | None:
    """The URL of the database an mxisd or ma1sd config names (None for an in-memory one)."""
    backend = _get(old, "storage", "backend") or "sqlite"
    if backend == "sqlite":
        path = _get(old, "storage", "provider", "sqlite", "database")
        if not isinstance(path, str) or not path:
            raise MigrationError("the old config has no storage.provider.sqlite.database")
        return None if path == ":memory:" else sqlalchemy_url("sqlite", path, base=base)[0]
    if backend == "postgresql":
        settings = _get(old, "storage", "provider", "postgresql") or {}
        if not isinstance(settings.get("database"), str):
            raise MigrationError("the old config has no storage.provider.postgresql.database")
        return sqlalchemy_url("postgresql", settings["database"], settings.get("username"),
                              settings.get("password"))[0]
    raise MigrationError(f"storage.backend {backend!r} of the old config is neither sqlite nor postgresql")


def _ms(value: Any) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    number = int(value)
    return number * 1000 if number < _SECONDS_BELOW else number


def read_old_database(url: str) -> dict[str, list[dict[str, Any]]]:
    """The rows of mxisd's tables, by table, each row keyed by lower-cased column name (ORMLite
    quotes names on PostgreSQL, so a column may be roomId or roomid)."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite" and not Path(parsed.database or "").is_file():
        raise MigrationError(f"no mxisd database at {parsed.database}")
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    engine = sa.create_engine(parsed, poolclass=sa.pool.NullPool)
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in OLD_TABLES}
    try:
        with engine.connect() as conn:
            present = {name.lower(): name for name in sa.inspect(conn).get_table_names()}
            if "invite_3pid" not in present and "session_3pid" not in present:
                raise MigrationError(f"{parsed.render_as_string(hide_password=True)} has no mxisd tables "
                                     "(invite_3pid, session_3pid)")
            for name in OLD_TABLES:
                if name in present:
                    table = sa.Table(present[name], sa.MetaData(), autoload_with=conn)
                    rows[name] = [{k.lower(): v for k, v in row._mapping.items()}
                                  for row in conn.execute(sa.select(table))]
    except sa.exc.SQLAlchemyError as exc:
        raise MigrationError(f"cannot read {parsed.render_as_string(hide_password=True)}: "
                             f"{getattr(exc, 'orig', None) or exc}") from None
    finally:
        engine.dispose()
    return rows


def _properties(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return {}
    return value if isinstance(value, dict) else {}


def _invites(rows: list[dict[str, Any]], keys: OldKeys | None, kind: Kind, now: int) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        properties = _properties(row.get("properties"))
        if not all(isinstance(row.get(column), str) for column in ("token", "sender", "roomid")):
            kind.skipped["no token, sender or room"] += 1
            continue
        if row.get("medium") != "email":
            kind.skipped[f"{row.get('medium')} invites are not supported, only email"] += 1
            continue
        try:
            address = canonical_email(str(row.get("address")))
        except InvalidAddress:
            kind.skipped["not a valid email address"] += 1
            continue
        ephemeral = properties.get("e_key_public")
        if not isinstance(ephemeral, str) and keys is not None:
            ephemeral = keys.ephemeral.get(str(properties.get("e_key_serial")))
        if not isinstance(ephemeral, str):
            # mxisd never gave the ephemeral key to the homeserver, so nobody can hold it: a key whose
            # private half is thrown away stands in for it.
            ephemeral = encode_verify_key_base64(get_verify_key(generate_signing_key("0")))
            kind.notes["without their ephemeral key (a new one stands in)"] += 1
        out.append({
            "token": row["token"], "medium": "email", "address": address, "room_id": row.get("roomid"),
            "sender": row.get("sender"), "ephemeral_public_key": ephemeral.rstrip("="),
            # The request's fields (room_name, sender_display_name, ...); mxisd's key records are ours no more.
            "properties": {k: v for k, v in properties.items()
                           if isinstance(v, str) and not k.startswith(("p_key_", "e_key_"))},
            # mxisd kept no time of storing: the invite's lifetime starts now.
            "created_at": now, "settled_at": None, "known_mxid": None,
        })
    return out


def _accounts(rows: list[dict[str, Any]], kind: Kind, now: int) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        if not isinstance(row.get("token"), str) or not isinstance(row.get("userid"), str):
            kind.skipped["no token or user"] += 1
            continue
        created_s = int(row.get("createdat") or 0)
        expires_s = row.get("expiresin")
        # ma1sd refused a token once (createdAt + expiresIn) seconds had passed.
        if expires_s is not None and (created_s + int(expires_s)) * 1000 < now:
            kind.skipped["expired"] += 1
            continue
        out.append({"token_hash": token_hash(row["token"]), "user_id": row["userid"], "created_at": created_s * 1000})
    return out


def _terms(rows: list[dict[str, Any]], now: int) -> list[dict[str, Any]]:
    return [{"user_id": row["userid"], "url": row["url"], "accepted_at": _ms(row.get("acceptedat")) or now}
            for row in rows]


def _sessions(rows: list[dict[str, Any]], region: str | None, lifetime_ms: int, kind: Kind,
              now: int) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        if row.get("isremote"):
            kind.skipped["remote sessions (mxisd 1.2) are not supported"] += 1
            continue
        created = _ms(row.get("creationtime")) or 0
        validated = _ms(row.get("validationtime")) if row.get("validated") else None
        modified = max(created, validated or 0)
        if now - modified > lifetime_ms:
            kind.skipped["older than sessions.lifetime"] += 1
            continue
        medium, address = row.get("medium"), str(row.get("address"))
        try:
            if medium == "email":
                address = canonical_email(address)
            elif medium == "msisdn":
                address = canonical_msisdn("+" + address.lstrip("+"), region)
            else:
                kind.skipped[f"medium {medium} is not supported"] += 1
                continue
        except InvalidAddress:
            kind.skipped["not a valid address"] += 1
            continue
        out.append({
            "sid": str(row["id"]), "medium": medium, "address": address, "client_secret": row["secret"],
            "token": row["token"], "send_attempt": int(row.get("attempt") or 0), "next_link": row.get("nextlink"),
            "failed_attempts": 0, "created_at": created, "modified_at": modified, "validated_at": validated,
        })
    return out


def _key_is_new(data_dir: str, keys: OldKeys) -> bool:
    """Whether the old key is still to be written; raises when another key is in its place."""
    path = key_path(data_dir)
    if not path.exists():
        return True
    try:
        mine: SigningKey = read_signing_key(path)
    except (OSError, ValueError) as exc:
        raise MigrationError(f"{path} holds no signing key we can read ({exc}): move it away first") from None
    if mine.encode() == keys.signing_key.encode() and mine.version == keys.signing_key.version:
        return False
    raise MigrationError(
        f"{key_path(data_dir)} already holds another signing key (ed25519:{mine.version}): move it away "
        "first, if nothing was signed with it yet (this server made it on its first start)")


def import_data(config: Config, key_source: Path | None, database: str | None) -> Report:
    """Take over the key at key_source and the rows of the database at URL database (either may be
    None); everything is read and checked before anything is written."""
    report = Report()
    try:
        keys = read_old_keys(key_source) if key_source is not None else None
    except OSError as exc:
        raise MigrationError(f"cannot read the key store {key_source}: {exc.strerror or exc}") from None
    old_rows = read_old_database(database) if database is not None else None
    now = now_ms()
    write_key = keys is not None and _key_is_new(config.data_dir, keys)
    rows: dict[str, list[dict[str, Any]]] = {}
    if old_rows is not None:
        lifetime_ms = config.sessions.lifetime * 1000
        region = config.threepids.msisdn.default_region
        kinds = {name: Kind(label) for name, label in (
            ("invites", "pending invites"), ("accounts", "v2 accounts"), ("accepted_terms", "accepted terms"),
            ("sessions", "validation sessions"))}
        for ours, theirs in (("invites", "invite_3pid"), ("accounts", "account"), ("accepted_terms", "accepted"),
                             ("sessions", "session_3pid")):
            kinds[ours].read = len(old_rows[theirs])
        rows = {
            "invites": _invites(old_rows["invite_3pid"], keys, kinds["invites"], now),
            "accounts": _accounts(old_rows["account"], kinds["accounts"], now),
            "accepted_terms": _terms(old_rows["accepted"], now),
            "sessions": _sessions(old_rows["session_3pid"], region, lifetime_ms, kinds["sessions"], now),
        }
        report.kinds = list(kinds.values())
    if rows:
        try:
            storage = Storage(config.storage.url, config.data_dir, threads=1)
        except OSError as exc:
            raise MigrationError(f"cannot create {config.data_dir}: {exc.strerror or exc}") from None
        try:
            storage.upgrade()
            added = storage.import_rows(rows)
        except StorageError as exc:
            raise MigrationError(str(exc)) from None
        except sa.exc.SQLAlchemyError as exc:
            raise MigrationError(f"cannot write to {storage.describe()}: {getattr(exc, 'orig', None) or exc}") from None
        finally:
            storage.close()
        for name, kind in zip(rows, report.kinds, strict=True):
            kind.imported = added[name]
            kind.present = len(rows[name]) - added[name]
    # Last: a database that cannot be written to leaves the key as it was too.
    if keys is not None:
        key_id = f"ed25519:{keys.signing_key.version}"
        if write_key:
            try:
                write_signing_key(config.data_dir, keys.signing_key)
            except OSError as exc:
                raise MigrationError(f"cannot write the signing key into {config.data_dir}: "
                                     f"{exc.strerror or exc}") from None
            report.key = f"signing key: taken over from {key_source} as {key_id} (public key {keys.public_key})"
        else:
            report.key = f"signing key: {key_id} was taken over before, unchanged"
        report.key_changed = write_key
    return report

